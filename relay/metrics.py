"""Prometheus metrics of one relay, and the HTTP endpoint that serves them with ``/healthz``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["HealthServer", "RelayMetrics"]

# Probes come from outside the host (kubelet, Prometheus); bind every interface by default.
ALL_INTERFACES = "0.0.0.0"  # noqa: S104


class RelayMetrics:
    """The relay's counters, gauges and histograms, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.published = Counter(
            "outbox_relay_published",
            "Messages confirmed by the broker and marked published",
            registry=r,
        )
        self.retried = Counter(
            "outbox_relay_retried",
            "Publish attempts that will be retried, by reason",
            ["reason"],
            registry=r,
        )
        self.dead = Counter(
            "outbox_relay_dead", "Messages parked as dead after their last attempt", registry=r
        )
        self.dropped = Counter(
            "outbox_relay_unroutable_dropped",
            "Returned messages treated as sent by the 'drop' policy",
            registry=r,
        )
        self.reclaimed = Counter(
            "outbox_relay_reclaimed",
            "Keyless messages claimed again after another claim's lease ran out "
            "(each may be a wire duplicate)",
            registry=r,
        )
        self.checks = Counter(
            "outbox_relay_checks",
            "Check-backs of prepared messages, by result",
            ["result"],
            registry=r,
        )
        self.prepared_dead = Counter(
            "outbox_relay_prepared_dead",
            "Prepared messages parked as dead after max check-backs",
            registry=r,
        )
        self.pending = Gauge("outbox_relay_pending", "Pending (deliverable) messages", registry=r)
        self.oldest_age = Gauge(
            "outbox_relay_oldest_pending_age_seconds",
            "Age of the oldest pending message",
            registry=r,
        )
        self.shards = Gauge("outbox_relay_shards_owned", "Keyed shards this relay owns", registry=r)
        self.publish_latency = Histogram(
            "outbox_relay_publish_seconds",
            "From publish call to broker confirm, per batch",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 15),
            registry=r,
        )
        self.commit_to_confirm = Histogram(
            "outbox_relay_commit_to_confirm_seconds",
            "From the message's creation to the broker's confirm",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 30, 300),
            registry=r,
        )

    def render(self) -> bytes:
        """The metrics in Prometheus text format."""
        return generate_latest(self.registry)


HealthCheck = Callable[[], Awaitable[dict[str, bool]]]


class HealthServer:
    """A minimal HTTP/1.1 server: ``GET /metrics`` and ``GET /healthz`` (200 or 503 with JSON)."""

    def __init__(
        self, metrics: RelayMetrics, health: HealthCheck, port: int, host: str = ALL_INTERFACES
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
                status, ctype, body = 200, CONTENT_TYPE_LATEST, self._metrics.render()
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
