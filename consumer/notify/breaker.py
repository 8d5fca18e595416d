"""A circuit breaker per endpoint, so that one dead partner costs the others nothing.

``closed``: calls go out. After ``threshold`` consecutive failed calls it
``opens``: no call goes out for ``cooldown`` (the dispatcher postpones the
endpoint's due notifications to the end of it, without counting an attempt).
Then it is ``half_open``: one probe call goes out; its success closes the
breaker, its failure opens it for another ``cooldown``.

The state lives in the process: each notify process learns about an endpoint
by itself. Postponed rows are in the shared table, though, so one process's
open breaker also keeps the others from calling until its cooldown is over.
"""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable
    from datetime import timedelta

__all__ = ["BreakerState", "CircuitBreaker"]


class BreakerState(enum.StrEnum):
    """Where a breaker is."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Consecutive-failure breaker with a cool-down and a single half-open probe.

    Not thread-safe: the dispatcher uses it from the event loop only. ``clock``
    (seconds, monotonic) is there for tests.
    """

    def __init__(
        self,
        threshold: int,
        cooldown: timedelta,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown.total_seconds()
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> BreakerState:
        """The state now (an open breaker whose cooldown is over reads as half-open)."""
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._clock() - self._opened_at < self.cooldown:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    @property
    def failures(self) -> int:
        """Consecutive failed calls so far."""
        return self._failures

    def remaining(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when it is not open)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self.cooldown - self._clock())

    def allowed(self) -> int | None:
        """How many calls may start now: None for no limit (closed), 1 or 0 otherwise."""
        state = self.state
        if state is BreakerState.CLOSED:
            return None
        if state is BreakerState.OPEN or self._probing:
            return 0
        return 1

    def started(self) -> None:
        """A call is going out; in half-open state it is the probe."""
        if self.state is BreakerState.HALF_OPEN:
            self._probing = True

    def succeeded(self) -> bool:
        """Record a successful call; True if that closed the breaker."""
        was_open = self._opened_at is not None
        self._failures = 0
        self._opened_at = None
        self._probing = False
        return was_open

    def failed(self) -> bool:
        """Record a failed call; True if that opened the breaker (or opened it again)."""
        self._failures += 1
        state = self.state
        if state is BreakerState.HALF_OPEN:
            # The probe failed (or a call from before the cooldown ended): another cooldown.
            self._opened_at = self._clock()
            self._probing = False
            return True
        if state is BreakerState.CLOSED and self._failures >= self.threshold:
            self._opened_at = self._clock()
            return True
        return False
