"""The dispatcher: takes due notifications from the database and calls the endpoints.

One asyncio loop polls adaptively (``poll_min`` after finding work, doubling up
to the configured ``poll_interval`` when idle; a new notification or a freed
call slot wakes it at once). For each subscription it asks the database for at
most as many due rows as the endpoint has free call slots (``concurrency``), so
a slow endpoint's backlog never holds a slot of another. An endpoint whose
circuit breaker is open gets no call: its due rows are postponed to the end of
the cool-down, without counting an attempt.

Each call's outcome is settled in one transaction (``NotifyStore.settle``):
2xx delivers; 410 Gone abandons at once; anything else (another status, a
connection error, a timeout) waits for the schedule's next delay, or abandons
after the last attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import httpx

from consumer.notify.breaker import BreakerState, CircuitBreaker
from consumer.notify.signature import encode_body, request_headers
from consumer.notify.store import AttemptResult
from outbox.durations import format_duration
from outbox.logs import get_logger, redact_url
from outbox.tables import NotificationStatus
from outbox.tasks import finish_or_cancel

if TYPE_CHECKING:
    from collections.abc import Callable

    from consumer.notify.config import NotifyConfig, Subscription
    from consumer.notify.metrics import NotifyMetrics
    from consumer.notify.store import Claimed, NotifyStore
    from outbox.receipts import Outcome

__all__ = ["Dispatcher"]

_USER_AGENT = "outbox-notify"
_EXCERPT = 300  # bytes of a failed answer's body kept in the error, enough to tell why
_POLL_MIN = 0.01  # seconds between looks while work keeps coming
_GAUGE_EVERY = 5.0  # seconds between refreshes of the pending gauge
_PURGE_EVERY = 3600.0  # seconds between retention purges
_WARN_EVERY = 10.0  # seconds between two warnings about a failing poll
_SETTLE_RETRIES = (0.2, 0.5, 1.0, 2.0, 4.0)  # waits between tries to record an outcome


class Dispatcher:
    """Claims due notifications and calls their endpoints; ``start()``, then ``stop()``.

    No I/O happens before ``start()``.
    """

    def __init__(
        self,
        config: NotifyConfig,
        store: NotifyStore,
        metrics: NotifyMetrics,
        on_outcome: Callable[[str, Outcome, str], None] | None = None,
    ) -> None:
        """``on_outcome(message_id, "delivered" | "abandoned", subscription)`` is told each
        notification's final outcome once it is recorded (the service sends receipts)."""
        self.config = config
        self._on_outcome = on_outcome
        self._store = store
        self._metrics = metrics
        self._subscriptions = {s.name: s for s in config.subscriptions}
        self._breakers = {
            s.name: CircuitBreaker(s.breaker_threshold, s.breaker_cooldown)
            for s in config.subscriptions
        }
        self._in_flight = dict.fromkeys(self._subscriptions, 0)
        self._calls: set[asyncio.Task[None]] = set()
        self._clients: dict[str, httpx.AsyncClient] = {}
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._log = get_logger("outbox.notify")

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the HTTP clients and start polling."""
        for sub in self.config.subscriptions:
            self._clients[sub.name] = httpx.AsyncClient(
                timeout=sub.timeout.total_seconds(),
                # The call carries a signature for this endpoint: never follow it elsewhere.
                follow_redirects=False,
                limits=httpx.Limits(max_connections=sub.concurrency),
                headers={"User-Agent": _USER_AGENT},
            )
        self._tasks = [
            asyncio.create_task(self._poll_loop(), name="outbox-notify-poll"),
            asyncio.create_task(self._housekeeping(), name="outbox-notify-housekeeping"),
        ]

    async def stop(self) -> None:
        """Stop claiming; let calls in flight finish within ``shutdown_timeout``.

        Calls still running then are cancelled: their rows stay claimed until
        the lease lapses, and are called again then (by this or another process).
        """
        self._stopping.set()
        self._wake.set()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        calls = list(self._calls)
        if calls:
            late = await finish_or_cancel(calls, self.config.shutdown_timeout.total_seconds())
            if late:
                self._log.warning(
                    "notify.calls_cut_short",
                    calls=len(late),
                    note="their claims lapse after the lease; they will be called again",
                )
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()

    def wake(self) -> None:
        """Look for due notifications now (a new one was committed, a slot came free)."""
        self._wake.set()

    @property
    def running(self) -> bool:
        """True while the polling loop runs (for ``/healthz``)."""
        return bool(self._tasks) and not self._tasks[0].done()

    # -- polling ------------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        longest = self.config.poll_interval.total_seconds()
        sleep = _POLL_MIN
        failures, last_warning = 0, -float("inf")
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                found = await self._poll_once()
                failures = 0
            except Exception as e:  # the database is away: keep the loop, say so, look later
                failures += 1
                found, sleep = 0, longest
                # One line per interval, not one per poll, for as long as the outage lasts.
                if time.monotonic() - last_warning >= _WARN_EVERY:
                    last_warning = time.monotonic()
                    self._log.warning(
                        "notify.poll_failed",
                        error=f"{type(e).__name__}: {e}"[:300],
                        failures_in_a_row=failures,
                    )
            sleep = _POLL_MIN if found else min(sleep * 2, longest)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), sleep)

    async def _poll_once(self) -> int:
        """Start the calls due now, within every endpoint's free slots; return how many."""
        started = 0
        for sub in self.config.subscriptions:
            if self._stopping.is_set():
                break
            breaker = self._breakers[sub.name]
            if breaker.state is BreakerState.OPEN:
                await self._postpone(sub, breaker)
                continue
            free = sub.concurrency - self._in_flight[sub.name]
            allowed = breaker.allowed()
            if allowed is not None:
                free = min(free, allowed)
            if free <= 0:
                continue
            for row in await self._store.claim(sub.name, free, self.config.lease):
                self._begin(sub, row)
                started += 1
        return started

    async def _postpone(self, sub: Subscription, breaker: CircuitBreaker) -> None:
        delay = timedelta(seconds=breaker.remaining())
        moved = await self._store.postpone(sub.name, delay)
        if moved:
            self._metrics.postponed.labels(sub.name).inc(moved)
            self._log.info(
                "notify.postponed",
                subscription=sub.name,
                notifications=moved,
                until_s=round(delay.total_seconds(), 3),
                reason="circuit breaker open",
            )

    def _begin(self, sub: Subscription, row: Claimed) -> None:
        self._in_flight[sub.name] += 1
        self._breakers[sub.name].started()
        task = asyncio.create_task(self._deliver(sub, row))
        self._calls.add(task)
        task.add_done_callback(lambda t: self._done(sub.name, t))

    def _done(self, subscription: str, task: asyncio.Task[None]) -> None:
        self._calls.discard(task)
        self._in_flight[subscription] -= 1
        self._wake.set()  # a slot came free
        if not task.cancelled() and (error := task.exception()) is not None:
            self._log.error(
                "notify.call_crashed",
                subscription=subscription,
                error=f"{type(error).__name__}: {error}"[:300],
                note="the claim lapses after the lease; the endpoint is called again",
            )

    # -- one call -----------------------------------------------------------------------

    async def _deliver(self, sub: Subscription, row: Claimed) -> None:
        log = self._log.bind(
            message_id=row.message_id,
            topic=row.topic,
            key=row.key,
            subscription=sub.name,
            attempt=row.attempt,
        )
        if row.reclaimed:
            self._metrics.reclaimed.labels(sub.name).inc()
            log.warning("notify.reclaimed", note="an earlier claim lapsed; this may call twice")
        result = await self._call(sub, row)
        self._metrics.duration.labels(sub.name).observe(result.duration_ms / 1000)
        breaker = self._breakers[sub.name]
        delay: timedelta | None = None
        reason: str | None = None
        if result.succeeded:
            status = NotificationStatus.DELIVERED
            if breaker.succeeded():
                log.info("notify.breaker_closed")
        else:
            if breaker.failed():
                log.warning(
                    "notify.breaker_opened",
                    consecutive_failures=breaker.failures,
                    cooldown_s=breaker.cooldown,
                )
            self._metrics.failed.labels(sub.name).inc()
            if result.status_code == 410:
                status = NotificationStatus.ABANDONED
                reason = "410 Gone: the endpoint asked not to be called again for it"
            else:
                delay = sub.delay_after(row.attempt, row.max_attempts)
                if delay is None:
                    status = NotificationStatus.ABANDONED
                    reason = f"gave up after attempt {row.attempt}; last: {result.error}"
                else:
                    status = NotificationStatus.PENDING
        self._breaker_gauge(sub.name)
        if not await self._settle(row, result, status, delay, reason):
            return
        if self._on_outcome is not None and status is not NotificationStatus.PENDING:
            outcome: Outcome = (
                "delivered" if status is NotificationStatus.DELIVERED else "abandoned"
            )
            self._on_outcome(row.message_id, outcome, sub.name)
        if status is NotificationStatus.DELIVERED:
            self._metrics.delivered.labels(sub.name).inc()
            log.info(
                "notify.delivered", status_code=result.status_code, duration_ms=result.duration_ms
            )
        elif status is NotificationStatus.PENDING:
            assert delay is not None
            log.warning(
                "notify.failed",
                status_code=result.status_code,
                error=result.error,
                duration_ms=result.duration_ms,
                retry_in=format_duration(delay),
            )
        else:
            self._metrics.abandoned.labels(sub.name).inc()
            log.error(
                "notify.abandoned",
                status_code=result.status_code,
                error=result.error,
                reason=reason,
            )

    async def _call(self, sub: Subscription, row: Claimed) -> AttemptResult:
        started_at = datetime.now(UTC)
        clock = time.perf_counter()
        code: int | None = None
        error: str | None = None
        try:
            body = encode_body(
                message_id=row.message_id,
                topic=row.topic,
                key=row.key,
                payload=row.payload,
                timestamp=row.message_created_at,
            )
            headers = request_headers(
                secret=sub.secret,
                body=body,
                message_id=row.message_id,
                topic=row.topic,
                attempt=row.attempt,
            )
            # httpx's timeout bounds each phase; this one bounds the whole call.
            async with asyncio.timeout(sub.timeout.total_seconds()):
                code, excerpt = await self._post(sub, body, headers)
            if not 200 <= code < 300:
                error = f"HTTP {code}"
                if 300 <= code < 400:
                    error += " (redirects are not followed: the call is signed for this url)"
                elif excerpt:
                    error += f": {excerpt}"
        except (TimeoutError, httpx.TimeoutException):
            code, error = None, f"timed out after {format_duration(sub.timeout)}"
        except httpx.HTTPError as e:
            # httpx may quote the URL in its message; only the redacted form may be stored.
            detail = str(e).replace(sub.url, redact_url(sub.url))[:300] or "no detail"
            code, error = None, f"{type(e).__name__}: {detail}"
        except (TypeError, ValueError) as e:
            code, error = None, f"the payload cannot be sent as JSON: {e}"[:300]
        duration_ms = int((time.perf_counter() - clock) * 1000)
        return AttemptResult(
            started_at=started_at, duration_ms=duration_ms, status_code=code, error=error
        )

    async def _post(
        self, sub: Subscription, body: bytes, headers: dict[str, str]
    ) -> tuple[int, str]:
        client = self._clients[sub.name]
        async with client.stream("POST", sub.url, content=body, headers=headers) as response:
            read = b""
            # Only the start of the answer is kept; a huge or endless body is not read on.
            async for chunk in response.aiter_bytes():
                read += chunk
                if len(read) >= _EXCERPT:
                    break
            excerpt = read[:_EXCERPT].decode("utf-8", "replace").strip()
            return response.status_code, " ".join(excerpt.split())

    async def _settle(
        self,
        row: Claimed,
        result: AttemptResult,
        status: NotificationStatus,
        delay: timedelta | None,
        reason: str | None,
    ) -> bool:
        """Record the outcome, trying again for a few seconds if the database fails.

        Returns True when the row's state was written by this process.
        """
        bound = self._log.bind(message_id=row.message_id, subscription=row.subscription)
        for wait in (*_SETTLE_RETRIES, None):
            try:
                ours = await self._store.settle(
                    row, result, status=status, delay=delay, reason=reason
                )
            except Exception as e:
                if wait is None:
                    bound.error(
                        "notify.settle_failed",
                        error=f"{type(e).__name__}: {e}"[:300],
                        note="the claim lapses after the lease; the endpoint is called again",
                    )
                    return False
                await asyncio.sleep(wait)
                continue
            if not ours:
                bound.warning(
                    "notify.claim_lost",
                    attempt=row.attempt,
                    note="the claim lapsed before the outcome was recorded; another process "
                    "took the notification over",
                )
            return ours
        return False  # not reached: the last wait is None

    def _breaker_gauge(self, subscription: str) -> None:
        state = self._breakers[subscription].state
        self._metrics.breaker_open.labels(subscription).set(
            0 if state is BreakerState.CLOSED else 1
        )

    # -- housekeeping -------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        """Refresh the pending gauge every few seconds; purge old rows every hour."""
        next_purge = time.monotonic() + 60  # a minute in: start-up stays light
        while not self._stopping.is_set():
            try:
                counts = await self._store.pending_counts()
                for name in self._subscriptions:
                    self._metrics.pending.labels(name).set(counts.get(name, 0))
                    self._breaker_gauge(name)
                if time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + _PURGE_EVERY
                    purged = await self._store.purge(self.config.retention)
                    if purged:
                        self._log.info("notify.purged", notifications=purged)
            except Exception as e:
                self._log.warning(
                    "notify.housekeeping_failed", error=f"{type(e).__name__}: {e}"[:300]
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), _GAUGE_EVERY)
