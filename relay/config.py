"""The relay's configuration: one frozen dataclass, validated before anything connects."""

from __future__ import annotations

import enum
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from urllib.parse import urlsplit

from outbox.checkback_server import check_secret
from outbox.errors import ConfigurationError
from outbox.topics import topic_matches, validate_pattern

__all__ = ["RelayConfig", "UnroutablePolicy"]


class UnroutablePolicy(enum.StrEnum):
    """What the relay does with a message RabbitMQ returns because no queue is bound for it."""

    RETRY = "retry"
    """Keep it pending and try again with backoff, then ``dead`` after max attempts (default):
    a consumer that deploys after its producer still gets every message."""
    DEAD = "dead"
    """Park it as ``dead`` at once, for topics that must always have a consumer."""
    DROP = "drop"
    """Treat it as sent (mark it published): for topics nobody must hear, like audit fan-out."""


def _default_relay_id() -> str:
    return f"{socket.gethostname()[:40]}-{os.getpid()}"


@dataclass(frozen=True, kw_only=True)
class RelayConfig:
    """Every knob of the relay; the CLI fills it from flags and ``OUTBOX_*`` variables."""

    database_url: str
    """The outbox database (PostgreSQL for production, SQLite for the embedded default)."""
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    """RabbitMQ; ignored when a broker object is given to ``Relay``."""
    exchange: str = "outbox"
    """The durable topic exchange messages are published to."""
    relay_id: str = field(default_factory=_default_relay_id)
    """Names this process in claims, locks and logs."""
    batch_size: int = 500
    """Rows claimed and published per round; also the confirm window of a round."""
    keyless_workers: int = 2
    """Concurrent claim-publish-settle loops for keyless messages: one claims while another
    waits for confirms."""
    key_lookahead: int = 50
    """Messages of one key read per round; they are published one after another."""
    lease: timedelta = timedelta(seconds=30)
    """How long a claim on keyless rows lasts; rows of a relay that died are retried after it."""
    max_attempts: int = 12
    """Publish attempts before a message is parked as ``dead``."""
    retry_base: timedelta = timedelta(seconds=1)
    """First retry delay; doubles per attempt, with jitter."""
    retry_max: timedelta = timedelta(minutes=5)
    """Longest retry delay."""
    poll_min: timedelta = timedelta(milliseconds=2)
    """Poll interval while messages keep coming (the commit-to-publish latency floor)."""
    poll_max: timedelta = timedelta(milliseconds=100)
    """Poll interval when idle; the interval grows from min to max while polls find nothing."""
    unroutable: Mapping[str, UnroutablePolicy] = field(default_factory=dict)
    """Policy per topic pattern for returned messages; the first matching pattern wins."""
    unroutable_default: UnroutablePolicy = UnroutablePolicy.RETRY
    """Policy for topics no pattern of ``unroutable`` matches."""
    confirm_timeout: timedelta = timedelta(seconds=15)
    """How long to wait for the broker's confirm before counting the attempt as failed."""
    check_interval: timedelta = timedelta(milliseconds=500)
    """How often due prepared (half) messages are looked for; also the re-look delay while
    their local PostgreSQL transaction is still in progress."""
    check_timeout: timedelta = timedelta(seconds=10)
    """How long one check-back may take before it counts as unanswered."""
    check_concurrency: int = 8
    """Check-backs running at once."""
    max_checks: int = 15
    """Unanswered check-backs before a prepared message is parked as ``dead``."""
    check_retry_base: timedelta = timedelta(seconds=10)
    """Delay after the first unanswered check-back; doubles per check, with jitter."""
    check_retry_max: timedelta = timedelta(minutes=10)
    """Longest delay between check-backs."""
    remote_checkbacks: Mapping[str, str] = field(default_factory=dict)
    """Topic pattern -> ``http(s)`` URL of a producer's ``CheckbackServer``, asked when no
    check-back of ``--app`` answers for the topic; the first matching pattern wins."""
    checkback_secret: str | None = field(default=None, repr=False)
    """The secret remote check-backs are signed with; required with ``remote_checkbacks``.
    Kept out of ``repr`` and ``public()``."""
    retention: timedelta = timedelta(days=7)
    """Published and discarded rows older than this are purged."""
    receipt_retention: timedelta = timedelta(days=30)
    """Receipts recorded longer ago than this are purged. They outlive their message's row
    (``retention``), so ``outbox status`` can still tell who consumed a purged message."""
    purge_batch: int = 1000
    """Rows deleted per purge statement, so the purge never holds long locks."""
    maintenance_interval: timedelta = timedelta(seconds=30)
    """How often purge and lease recovery run."""
    gauge_interval: timedelta = timedelta(seconds=5)
    """How often the pending-count and oldest-age gauges are refreshed."""
    rebalance_interval: timedelta = timedelta(seconds=2)
    """How often a relay re-counts its peers and takes or gives up shards of keyed messages."""
    lock_namespace: str | None = None
    """Separates the advisory locks of several outboxes in one database; default: the schema."""
    metrics_port: int | None = None
    """Serve ``/metrics`` and ``/healthz`` on this port (0.0.0.0); None: no HTTP server."""
    shutdown_timeout: timedelta = timedelta(seconds=20)
    """On SIGTERM, how long in-flight batches may take before the relay exits anyway."""

    def validate(self) -> None:
        """Raise ``ConfigurationError`` naming the first unusable value and how to fix it."""
        if not self.database_url:
            raise ConfigurationError(
                "database_url is required (--database-url / OUTBOX_DATABASE_URL)"
            )
        if not self.exchange or len(self.exchange) > 127:
            raise ConfigurationError("exchange must be a name of 1 to 127 characters")
        if not self.relay_id or len(self.relay_id) > 64:
            raise ConfigurationError("relay_id must be 1 to 64 characters")
        for name in (
            "batch_size",
            "keyless_workers",
            "key_lookahead",
            "max_attempts",
            "purge_batch",
            "check_concurrency",
            "max_checks",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name} must be a positive integer, got {value!r}")
        if self.batch_size > 10_000:
            raise ConfigurationError("batch_size above 10000 only makes rounds slow; use 100-2000")
        positive = (
            "lease",
            "retry_base",
            "retry_max",
            "poll_min",
            "poll_max",
            "confirm_timeout",
            "check_interval",
            "check_timeout",
            "check_retry_base",
            "check_retry_max",
            "retention",
            "receipt_retention",
            "maintenance_interval",
            "gauge_interval",
            "rebalance_interval",
            "shutdown_timeout",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, timedelta) or value <= timedelta(0):
                raise ConfigurationError(f"{name} must be a positive duration, got {value!r}")
        if self.poll_max < self.poll_min:
            raise ConfigurationError("poll_max must not be shorter than poll_min")
        if self.retry_max < self.retry_base:
            raise ConfigurationError("retry_max must not be shorter than retry_base")
        if self.lease <= self.confirm_timeout:
            raise ConfigurationError(
                "lease must be longer than confirm_timeout, or a slow confirm lets another "
                "relay claim the same rows again"
            )
        for pattern, policy in self.unroutable.items():
            try:
                validate_pattern(pattern)
            except ValueError as e:
                raise ConfigurationError(f"unroutable: {e}") from None
            if not isinstance(policy, UnroutablePolicy):
                raise ConfigurationError(
                    f"unroutable policy for {pattern!r} must be one of "
                    f"{[p.value for p in UnroutablePolicy]}, got {policy!r}"
                )
        for pattern, url in self.remote_checkbacks.items():
            try:
                validate_pattern(pattern)
            except ValueError as e:
                raise ConfigurationError(f"remote_checkbacks: {e}") from None
            try:
                parts = urlsplit(url)
                usable = parts.scheme in ("http", "https") and bool(parts.hostname)
            except (TypeError, ValueError, AttributeError):
                usable = False
            if not usable:
                raise ConfigurationError(
                    f"remote_checkbacks: the URL for {pattern!r} must be http(s)://host/path"
                )
        if self.remote_checkbacks:
            check_secret(self.checkback_secret, "checkback_secret (OUTBOX_CHECKBACK_SECRET)")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigurationError(f"metrics_port must be 0-65535, got {self.metrics_port}")

    def unroutable_policy(self, topic: str) -> UnroutablePolicy:
        """Return the policy for a returned message of ``topic``."""
        for pattern, policy in self.unroutable.items():
            if topic_matches(pattern, topic):
                return policy
        return self.unroutable_default

    def public(self) -> dict[str, object]:
        """The settings as loggable values, credentials redacted."""
        from outbox.logs import redact_url

        values: dict[str, object] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if name.endswith("_url"):
                value = redact_url(value)
            elif name == "checkback_secret":
                value = None if value is None else "***"
            elif name == "remote_checkbacks":
                value = {pattern: redact_url(url) for pattern, url in value.items()}
            elif isinstance(value, timedelta):
                value = value.total_seconds()
            elif isinstance(value, Mapping):
                value = {k: str(v) for k, v in value.items()}
            values[name] = value
        return values
