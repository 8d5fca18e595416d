"""The consumer's configuration and its handlers' options, validated before anything connects."""

from __future__ import annotations

import enum
import functools
import inspect
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

from outbox.errors import ConfigurationError
from outbox.topics import topic_matches, validate_pattern

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["DEFAULT_RETRY_TIERS", "ConsumerConfig", "Exhausted", "HandlerSpec"]

DEFAULT_RETRY_TIERS: tuple[timedelta, ...] = tuple(
    timedelta(seconds=s) for s in (1, 5, 30, 120, 600, 3600)
)
"""Delay queues a retry can wait in; a backoff is rounded up to the next tier."""

_GROUP = re.compile(r"[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+)*")


class Exhausted(enum.StrEnum):
    """What an ordered handler does with a message that used up its attempts."""

    DEAD_LETTER = "dead_letter"
    """Dead-letter it and go on with the key's next message (default)."""
    HOLD = "hold"
    """Keep retrying it (at ``retry_max``), holding back the rest of its key until it passes."""


@dataclass(frozen=True, kw_only=True)
class HandlerSpec:
    """A registered handler and its options."""

    pattern: str
    function: Callable[..., Any]
    ordered: bool = False
    max_attempts: int = 5
    retry_delay: timedelta = timedelta(seconds=1)
    retry_max: timedelta = timedelta(minutes=10)
    on_exhausted: Exhausted = Exhausted.DEAD_LETTER
    django_using: str | None = None
    """Run with Django's ORM on this database alias (the handler takes ``(message)``)."""

    @functools.cached_property
    def is_async(self) -> bool:
        """True for ``async def`` handlers (they get an ``AsyncSession``)."""
        return inspect.iscoroutinefunction(self.function)

    @property
    def name(self) -> str:
        """The function's qualified name, for logs."""
        return getattr(self.function, "__qualname__", repr(self.function))

    def validate(self) -> None:
        """Raise ``ConfigurationError`` saying what to fix."""
        try:
            validate_pattern(self.pattern)
        except ValueError as e:
            raise ConfigurationError(f"@handler: {e}") from None
        if not callable(self.function):
            raise ConfigurationError("@handler decorates a function (message, session)")
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ConfigurationError(f"max_attempts must be >= 1, got {self.max_attempts!r}")
        for name in ("retry_delay", "retry_max"):
            value = getattr(self, name)
            if not isinstance(value, timedelta) or value <= timedelta(0):
                raise ConfigurationError(f"{name} must be a positive timedelta, got {value!r}")
        if self.retry_max < self.retry_delay:
            raise ConfigurationError("retry_max must not be shorter than retry_delay")
        if self.django_using is not None and self.is_async:
            raise ConfigurationError("django=True handlers must be plain functions, not async")
        if not isinstance(self.on_exhausted, Exhausted):
            raise ConfigurationError(
                f"on_exhausted must be one of {[e.value for e in Exhausted]}, "
                f"got {self.on_exhausted!r}"
            )

    def backoff(self, attempt: int) -> timedelta:
        """The delay after failed ``attempt``: ``retry_delay`` doubling, capped at ``retry_max``."""
        seconds = self.retry_delay.total_seconds() * 2 ** min(attempt - 1, 30)
        return timedelta(seconds=min(seconds, self.retry_max.total_seconds()))

    def matches(self, topic: str) -> bool:
        """Tell whether this handler takes ``topic``."""
        return topic_matches(self.pattern, topic)


@dataclass(frozen=True, kw_only=True)
class ConsumerConfig:
    """How a consumer group runs; the CLI fills it from flags and ``OUTBOX_*`` variables."""

    exchange: str = "outbox"
    """The topic exchange the relay publishes to."""
    queue_prefix: str = "outbox"
    """Queues are named ``<prefix>.<group>``, ``<prefix>.<group>.dead`` and so on."""
    queue_type: Literal["quorum", "classic"] = "quorum"
    """Type of the group's main, ordered and dead-letter queues (delay queues are classic)."""
    prefetch: int = 256
    """Unacknowledged messages per queue: the window the worker works on."""
    concurrency: int = 16
    """Handlers running at once (threads for sync handlers)."""
    batch_size: int = 64
    """Most messages of unordered SQLAlchemy handlers (plain or async) that share one
    transaction (those waiting when a batch can start). ``prefetch // (2 * batch_size)``
    batches run at once, 1 to ``concurrency``: the rest of the window fills the next
    batches while those run. 1 gives every message a transaction of its own, and
    ``concurrency`` handlers at once."""
    coalesce_inserts: bool = True
    """In a batch of SQLAlchemy handlers on PostgreSQL (psycopg), send their one-row
    ``INSERT ... VALUES`` statements as one multi-row INSERT, before the next other
    statement and before the commit (``consumer.deferred_inserts``). Off: each runs
    when the handler runs it (for ``FOR EACH STATEMENT`` triggers that must fire per row)."""
    retry_tiers: tuple[timedelta, ...] = DEFAULT_RETRY_TIERS
    """Delay queues for retries; each backoff waits in the first tier at least as long."""
    inbox_retention: timedelta = timedelta(days=14)
    """Inbox rows older than this are purged; must exceed the longest redelivery horizon."""
    replay_window: timedelta = timedelta(days=7)
    """How long after first delivery a message may still arrive again (operator replays,
    relay retention): the inbox must remember it at least this long."""
    metrics_port: int | None = None
    """Serve ``/metrics`` and ``/healthz`` on this port; None: no HTTP server."""
    shutdown_timeout: timedelta = timedelta(seconds=20)
    """On SIGTERM, how long in-flight handlers may run before the rest is given back."""
    receipts: bool = True
    """Send a receipt per outcome (consumed, dead) to ``<exchange>.receipts`` for the relay
    to record (``outbox status``); best-effort, see ``consumer.receipts``."""

    def validate(self) -> None:
        """Raise ``ConfigurationError`` naming the first unusable value."""
        if not self.exchange:
            raise ConfigurationError("exchange must not be empty")
        if _GROUP.fullmatch(self.queue_prefix) is None:
            raise ConfigurationError(
                f"queue_prefix {self.queue_prefix!r}: use letters, digits, '.', '_', '-'"
            )
        if self.queue_type not in ("quorum", "classic"):
            raise ConfigurationError(
                f"queue_type must be 'quorum' or 'classic', not {self.queue_type!r}"
            )
        if not 1 <= self.prefetch <= 65535:
            raise ConfigurationError(f"prefetch must be 1-65535, got {self.prefetch}")
        if not 1 <= self.batch_size <= 1000:
            raise ConfigurationError(f"batch_size must be 1-1000, got {self.batch_size}")
        if self.concurrency < 1:
            raise ConfigurationError(f"concurrency must be >= 1, got {self.concurrency}")
        if not self.retry_tiers or any(t <= timedelta(0) for t in self.retry_tiers):
            raise ConfigurationError("retry_tiers must be positive durations")
        if list(self.retry_tiers) != sorted(self.retry_tiers):
            raise ConfigurationError("retry_tiers must be in increasing order")
        for name in ("inbox_retention", "replay_window", "shutdown_timeout"):
            if getattr(self, name) <= timedelta(0):
                raise ConfigurationError(f"{name} must be a positive duration")

    def tier(self, delay: timedelta) -> timedelta:
        """The delay queue a backoff of ``delay`` waits in: the first tier at least as long."""
        for tier in self.retry_tiers:
            if tier >= delay:
                return tier
        return self.retry_tiers[-1]


def validate_group(group: object) -> str:
    """Return ``group`` if it is a usable consumer group name."""
    if not isinstance(group, str) or _GROUP.fullmatch(group) is None or len(group) > 100:
        raise ConfigurationError(
            f"consumer group {group!r}: use 1-100 letters, digits, '.', '_' or '-' (like 'billing')"
        )
    return group
