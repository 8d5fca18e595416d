"""Prometheus metrics of one consumer worker."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

__all__ = ["ConsumerMetrics"]


class ConsumerMetrics:
    """Outcomes, receipts and handler duration of one worker, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.processed = Counter(
            "outbox_consumer_processed", "Messages handled and committed", registry=r
        )
        self.duplicates = Counter(
            "outbox_consumer_duplicates",
            "Copies acked without calling the handler (inbox hit)",
            registry=r,
        )
        self.retries = Counter(
            "outbox_consumer_retries", "Failed attempts that will be retried", registry=r
        )
        self.dead = Counter(
            "outbox_consumer_dead", "Messages sent to the dead-letter queue", registry=r
        )
        self.malformed = Counter(
            "outbox_consumer_malformed", "Messages that were not a valid envelope", registry=r
        )
        self.batch_fallbacks = Counter(
            "outbox_consumer_batch_fallbacks",
            "Shared transactions rolled back and run again one message at a time",
            registry=r,
        )
        self.receipts_sent = Counter(
            "outbox_consumer_receipts_sent", "Receipts the broker confirmed", registry=r
        )
        self.receipts_dropped = Counter(
            "outbox_consumer_receipts_dropped",
            "Receipts given up, by reason (full, unroutable, failed, stopped)",
            ["reason"],
            registry=r,
        )
        self.duration = Histogram(
            "outbox_consumer_handler_seconds",
            "Handler transaction time, inbox row included",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
            registry=r,
        )

        self.batch_size = Histogram(
            "outbox_consumer_batch_messages",
            "Messages per shared transaction of plain handlers",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000),
            registry=r,
        )

    def render(self) -> bytes:
        """The metrics in Prometheus text format."""
        return generate_latest(self.registry)
