"""What a handler raises to steer its message: control flow, never logged as an error."""

from __future__ import annotations

from datetime import timedelta

__all__ = ["Reject", "Retry"]


class Retry(Exception):
    """Roll back and try the message again after ``delay`` (default: the handler's backoff).

    Counts as an attempt; after the handler's ``max_attempts`` the message is
    dead-lettered like any other failure.
    """

    def __init__(
        self, delay: timedelta | None = None, reason: str = "the handler asked for a retry"
    ) -> None:
        super().__init__(reason)
        if delay is not None and (not isinstance(delay, timedelta) or delay < timedelta(0)):
            raise ValueError(f"Retry delay must be a timedelta >= 0, got {delay!r}")
        self.delay = delay
        self.reason = reason


class Reject(Exception):
    """Roll back and dead-letter the message at once, with ``reason`` in its headers."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
