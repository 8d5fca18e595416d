"""Prometheus metrics of one relay (served with ``/healthz`` by ``outbox.health``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["RelayMetrics"]


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
        self.receipts = Counter(
            "outbox_relay_receipts",
            "Receipts taken from the receipts queue, by outcome ('malformed': unreadable, dropped)",
            ["outcome"],
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
