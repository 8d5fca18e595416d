"""A minimal HTTP endpoint for daemons: ``GET /metrics`` (Prometheus) and ``GET /healthz``."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import sqlalchemy as sa
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "ALL_INTERFACES",
    "HealthCheck",
    "HealthServer",
    "database_reachable",
    "serve_until_signal",
]

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


async def database_reachable(engine: AsyncEngine | None, timeout: float = 2.0) -> bool:
    """True when ``engine`` answers ``SELECT 1`` within ``timeout`` seconds (for /healthz)."""
    if engine is None:
        return False
    try:
        async with engine.connect() as conn:
            await asyncio.wait_for(conn.execute(sa.text("SELECT 1")), timeout)
    except Exception:
        return False
    return True


async def serve_until_signal(
    start: Callable[[], Awaitable[None]],
    stop: Callable[[], Awaitable[None]],
    stopping: asyncio.Event,
    on_signal: Callable[[], None] | None = None,
) -> None:
    """Start, run until SIGTERM or SIGINT sets ``stopping``, then stop (also after an error).

    ``on_signal`` runs when the signal arrives (a log line), before ``stop``.
    """
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await start()
        await stopping.wait()
        if on_signal is not None:
            on_signal()
    finally:
        await stop()
