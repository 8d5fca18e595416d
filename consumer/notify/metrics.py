"""Prometheus metrics of one notify process (served with ``/healthz`` by ``outbox.health``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["NotifyMetrics"]


class NotifyMetrics:
    """Outcomes, call durations, backlog and breaker state per subscription, in a registry of
    their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        labels = ["subscription"]
        self.delivered = Counter(
            "outbox_notify_delivered", "Notifications the endpoint answered 2xx", labels, registry=r
        )
        self.failed = Counter(
            "outbox_notify_failed",
            "Calls that failed (non-2xx, connection error, timeout), whatever came next",
            labels,
            registry=r,
        )
        self.abandoned = Counter(
            "outbox_notify_abandoned",
            "Notifications given up (attempts used up, or 410 Gone)",
            labels,
            registry=r,
        )
        self.postponed = Counter(
            "outbox_notify_postponed",
            "Due notifications moved past an open circuit breaker (no attempt counted)",
            labels,
            registry=r,
        )
        self.reclaimed = Counter(
            "outbox_notify_reclaimed",
            "Notifications claimed after an earlier claim lapsed (the endpoint may get a "
            "second call)",
            labels,
            registry=r,
        )
        self.duration = Histogram(
            "outbox_notify_call_seconds",
            "Time of one call, from sending to the answer or the error",
            labels,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.pending = Gauge(
            "outbox_notify_pending",
            "Pending notifications (in the database, all processes)",
            labels,
            registry=r,
        )
        self.breaker_open = Gauge(
            "outbox_notify_breaker_open",
            "1 while the endpoint's circuit breaker is open or half-open in this process",
            labels,
            registry=r,
        )

    def render(self) -> bytes:
        """The metrics in Prometheus text format."""
        return generate_latest(self.registry)
