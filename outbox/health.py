"""A minimal HTTP endpoint for daemons: ``GET /metrics`` (Prometheus) and ``GET /healthz``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["ALL_INTERFACES", "HealthCheck", "HealthServer"]

# Probes come from outside the host (kubelet, Prometheus): bind every interface by default.
ALL_INTERFACES = "0.0.0.0"  # noqa: S104

HealthCheck = Callable[[], Awaitable[dict[str, bool]]]


class HealthServer:
    """A minimal HTTP/1.1 server: ``GET /metrics`` and ``GET /healthz`` (200 or 503 with JSON).

    ``metrics`` renders the Prometheus text; ``health`` returns named checks, and
    ``/healthz`` answers 200 only when all of them are true.
    """

    def __init__(
        self,
        metrics: Callable[[], bytes],
        health: HealthCheck,
        port: int,
        host: str = ALL_INTERFACES,
    ) -> None:
        self._metrics = metrics
        self._health = health
        self._port = port
        self._host = host
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Listen; returns once the socket is bound."""
        self._server = await asyncio.start_server(self._serve, self._host, self._port)

    async def close(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = request.split(b" ", 2)[1].decode() if request.count(b" ") >= 2 else "/"
            if path == "/metrics":
                status, ctype, body = 200, CONTENT_TYPE_LATEST, self._metrics()
            elif path == "/healthz":
                checks = await self._health()
                status = 200 if all(checks.values()) else 503
                ctype, body = "application/json", json.dumps(checks).encode()
            else:
                status, ctype, body = 404, "text/plain", b"not found: try /metrics or /healthz\n"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            ConnectionError,
            asyncio.LimitOverrunError,
        ):
            pass  # a client that sends no request or hangs up gets nothing
        finally:
            writer.close()
