"""``Consumer``: a consumer group's handlers, and the worker that runs them.

The worker runs on RabbitMQ (``consumer.amqp_transport`` declares the group's
queues: main, ordered, delay and dead-letter) or, given ``broker=``, on the
in-process ``InMemoryBroker`` (``consumer.memory_transport``). Receipts go to
``<exchange>.receipts`` after each outcome (``consumer.receipts``; best-effort,
off with ``receipts=False``).

Each message runs in one database transaction that first inserts the inbox row
(``consumer.inbox``) and then calls the handler; the transaction commits before
the message is acknowledged, so a crash in between redelivers a message whose
inbox row is already there: it is acked without a second effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from consumer.amqp_transport import AmqpTransport
from consumer.commit_guard import raise_if_aborted
from consumer.config import ConsumerConfig, Exhausted, HandlerSpec, validate_group
from consumer.deferred_inserts import coalesced_inserts, coalesced_inserts_async
from consumer.django_handler import run_django_handler
from consumer.inbox import inbox_insert, inbox_insert_batch, inbox_row, purge_inbox
from consumer.memory_transport import MemoryTransport
from consumer.message import IncomingMessage
from consumer.metrics import ConsumerMetrics
from consumer.signals import Reject, Retry
from consumer.transport import Topology
from outbox.codec import JSON
from outbox.engines import make_async_engine, make_engine
from outbox.envelope import Envelope
from outbox.errors import ConfigurationError, MalformedMessageError
from outbox.health import HealthServer, database_reachable, serve_until_signal
from outbox.jobs import Jobs
from outbox.logs import get_logger, redact_url
from outbox.tracing import consume_span, tracing_enabled

if TYPE_CHECKING:
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import AsyncEngine

    from consumer.receipts import ReceiptPublisher
    from consumer.transport import Received, Transport
    from outbox.memory_broker import InMemoryBroker
    from outbox.receipts import Outcome

__all__ = ["Consumer"]

F = TypeVar("F", bound=Callable[..., Any])
R = TypeVar("R")

ATTEMPT = "x-outbox-attempt"
TOPIC = "x-outbox-topic"
DEAD_REASON = "x-outbox-dead-reason"
LAST_ERROR = "x-outbox-last-error"

_DONE, _DUPLICATE = "done", "duplicate"
_CODECS = {JSON.content_type: JSON}
BATCH_LINGER = 0.005
"""Seconds at most a batch waits to fill up while another batch is running."""
_ROUTES_KEPT = 10_000  # topics whose handler is remembered (bounded: topics come from outside)


class Consumer:
    """A consumer group: register handlers with ``@consumer.handler(topic)``, then run it.

    ``Consumer("billing", database_url=..., amqp_url=...)``; ``engine=`` (a sync
    engine) may replace ``database_url``, and ``broker=`` (an ``InMemoryBroker``)
    ``amqp_url``. Nothing connects until ``start()``.
    """

    def __init__(
        self,
        group: str,
        *,
        database_url: str | None = None,
        amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/",
        engine: sa.Engine | None = None,
        broker: InMemoryBroker | None = None,
        config: ConsumerConfig | None = None,
    ) -> None:
        self.group = validate_group(group)
        if database_url is None and engine is None:
            raise ConfigurationError("Consumer needs database_url= or engine=")
        self.config = config or ConsumerConfig()
        self.config.validate()
        self.amqp_url = amqp_url
        self._database_url = database_url or engine.url.render_as_string(hide_password=False)  # type: ignore[union-attr]
        self._engine = engine
        self._owns_engine = engine is None
        self._async_engine: AsyncEngine | None = None
        self.handlers: list[HandlerSpec] = []
        self._routes: dict[str, HandlerSpec | None] = {}
        self.metrics = ConsumerMetrics()
        self._log = get_logger("outbox.consumer").bind(group=group)
        self._broker = broker
        self._transport: Transport | None = None
        self._threads: ThreadPoolExecutor | None = None
        self._slots = asyncio.Semaphore(self.config.concurrency)
        self._inflight: set[asyncio.Task[None]] = set()
        self._batch: deque[tuple[Received, IncomingMessage, HandlerSpec]] = deque()
        self._batched = asyncio.Event()
        self._batch_moved = asyncio.Event()  # the buffer filled a batch, or a batch ended
        self._batches_running = 0
        self._batch_slots = asyncio.Semaphore(_batches_in_flight(self.config))
        self._batcher_task: asyncio.Task[None] | None = None
        self._lanes: dict[str | None, deque[Received]] = {}
        self._stopping = asyncio.Event()
        self._jobs: Jobs | None = None
        self._health: HealthServer | None = None
        self._receipts: ReceiptPublisher | None = None

    # -- registration -------------------------------------------------------------------

    def handler(
        self,
        topic: str,
        *,
        ordered: bool = False,
        max_attempts: int = 5,
        retry_delay: timedelta = timedelta(seconds=1),
        retry_max: timedelta = timedelta(minutes=10),
        on_exhausted: Exhausted | str = Exhausted.DEAD_LETTER,
        django: bool = False,
        using: str = "default",
    ) -> Callable[[F], F]:
        """Register the decorated ``(message, session)`` function for ``topic`` (a pattern).

        ``ordered``: messages with the same key reach it one at a time in queue
        order; failures are retried in place, and ``on_exhausted`` says what
        happens after ``max_attempts`` (``dead_letter`` and go on, or ``hold``).
        Unordered failures wait in delay queues: ``retry_delay`` doubling up to
        ``retry_max``. Within a group, a message goes to one handler: the one
        registered for its exact topic, else the first whose pattern matches.
        ``django=True`` runs a ``(message)`` handler with Django's ORM in
        ``transaction.atomic(using=using)``, the inbox row written through Django.
        """

        def register(function: F) -> F:
            try:
                policy = Exhausted(on_exhausted)
            except ValueError:
                raise ConfigurationError(
                    f"on_exhausted must be one of {[e.value for e in Exhausted]}"
                ) from None
            spec = HandlerSpec(
                pattern=topic,
                function=function,
                ordered=ordered,
                max_attempts=max_attempts,
                retry_delay=retry_delay,
                retry_max=retry_max,
                on_exhausted=policy,
                django_using=using if django else None,
            )
            spec.validate()
            if any(h.pattern == topic for h in self.handlers):
                raise ConfigurationError(
                    f"group {self.group!r} already has a handler for {topic!r}"
                )
            self.handlers.append(spec)
            self._routes.clear()
            return function

        return register

    def handler_for(self, topic: str) -> HandlerSpec | None:
        """The handler that takes ``topic`` in this group, or None."""
        try:
            return self._routes[topic]
        except KeyError:
            pass
        spec = self._route(topic)
        if len(self._routes) < _ROUTES_KEPT:
            self._routes[topic] = spec
        return spec

    def _route(self, topic: str) -> HandlerSpec | None:
        for spec in self.handlers:
            if spec.pattern == topic:
                return spec
        return next((h for h in self.handlers if h.matches(topic)), None)

    # -- names --------------------------------------------------------------------------

    @property
    def queue(self) -> str:
        """The group's main queue."""
        return f"{self.config.queue_prefix}.{self.group}"

    @property
    def ordered_queue(self) -> str:
        """The group's single-active-consumer queue for ordered handlers."""
        return f"{self.queue}.ordered"

    @property
    def dead_queue(self) -> str:
        """The group's dead-letter queue."""
        return f"{self.queue}.dead"

    def retry_queue(self, tier: timedelta) -> str:
        """The delay queue of ``tier``."""
        return f"{self.queue}.retry.{int(tier.total_seconds() * 1000)}ms"

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, declare the topology, and start consuming."""
        if not self.handlers:
            raise ConfigurationError(
                f"group {self.group!r} has no handlers; add @consumer.handler(...)"
            )
        self._check_retention()
        cfg = self.config
        if self._engine is None:
            self._engine = make_engine(
                self._database_url, pool_size=cfg.concurrency, max_overflow=4
            )
        self._async_engine = make_async_engine(
            self._database_url, pool_size=cfg.concurrency, max_overflow=4
        )
        self._threads = ThreadPoolExecutor(
            cfg.concurrency, thread_name_prefix=f"outbox-{self.group}"
        )
        self._transport = (
            MemoryTransport(self._broker)
            if self._broker is not None
            else AmqpTransport(self.amqp_url, name=f"outbox-consumer {self.group}")
        )
        await self._transport.open()
        if cfg.receipts:
            self._receipts = await self._transport.receipts(self.group, cfg.exchange, self.metrics)
        self._batcher_task = asyncio.create_task(self._batcher(), name=f"batcher {self.group}")
        await self._declare()
        self._jobs = Jobs()
        self._jobs.every(3600, self._purge, "inbox purge")
        self._jobs.start()
        if cfg.metrics_port is not None:
            self._health = HealthServer(self.metrics.render, self._health_checks, cfg.metrics_port)
            await self._health.start()
        self._log.info(
            "consumer.started",
            queue=self.queue,
            handlers=[f"{h.pattern}{' (ordered)' if h.ordered else ''}" for h in self.handlers],
            prefetch=cfg.prefetch,
            concurrency=cfg.concurrency,
            broker="in-memory" if self._broker is not None else redact_url(self.amqp_url),
            database_url=redact_url(self._database_url),
        )

    async def stop(self) -> None:
        """Stop consuming, let in-flight handlers finish (shutdown_timeout), requeue the rest."""
        self._stopping.set()
        if self._transport is not None:
            await self._transport.cancel()
        if self._batcher_task is not None:
            self._batcher_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._batcher_task
            self._batcher_task = None
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=self.config.shutdown_timeout.total_seconds())
        waiting = sum(len(q) for q in self._lanes.values()) + len(self._batch)
        while self._batch:
            raw = self._batch.popleft()[0]
            with contextlib.suppress(Exception):
                await raw.nack(requeue=True)
        for lane in self._lanes.values():
            while lane:
                message = lane.popleft()
                with contextlib.suppress(Exception):
                    await message.nack(requeue=True)
        for task in list(self._inflight):
            task.cancel()
        if self._inflight:
            # Let cancelled handlers leave their transactions (rolled back) before the
            # engines are disposed: an open connection would outlive the consumer.
            await asyncio.wait(self._inflight, timeout=5)
        if self._jobs is not None:
            await self._jobs.stop(5)
            self._jobs = None
        if self._health is not None:
            await self._health.close()
            self._health = None
        if self._receipts is not None:
            await self._receipts.aclose()  # before the channel it publishes on is closed
            self._receipts = None
        if self._transport is not None:
            await self._transport.close()  # unacknowledged deliveries go back to their queue
            self._transport = None
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
            self._threads = None
        if self._async_engine is not None:
            await self._async_engine.dispose()
            self._async_engine = None
        if self._owns_engine and self._engine is not None:
            self._engine.dispose()  # the engine start() made; a given one is the caller's
            self._engine = None
        self._log.info("consumer.stopped", given_back=waiting)

    async def serve(self) -> None:
        """Start, consume until SIGTERM or SIGINT, then stop cleanly."""
        await serve_until_signal(
            self.start, self.stop, self._stopping, lambda: self._log.info("consumer.stopping")
        )

    def run(self) -> None:
        """Run the worker in this process until SIGTERM or SIGINT (blocking)."""
        asyncio.run(self.serve())

    def send_receipt(
        self,
        message_id: str,
        outcome: Outcome,
        detail: str | None = None,
        *,
        group: str | None = None,
    ) -> None:
        """Report an outcome of ``message_id`` to ``outbox status``, as the worker does itself.

        Best-effort like every receipt (``consumer.receipts``): a no-op while the
        consumer is not running or receipts are off. ``group`` overrides the name
        the receipt is filed under.
        """
        if self._receipts is not None:
            self._receipts.send(message_id, outcome, detail, group=group)

    def configure(self, **overrides: Any) -> None:
        """Replace configuration values before ``start()`` (the CLI's flags use this)."""
        if self._transport is not None:
            raise ConfigurationError("configure() must be called before start()")
        amqp_url = overrides.pop("amqp_url", None)
        database_url = overrides.pop("database_url", None)
        config = replace(self.config, **overrides)
        config.validate()
        self.config = config
        self._slots = asyncio.Semaphore(config.concurrency)
        self._batch_slots = asyncio.Semaphore(_batches_in_flight(config))
        if amqp_url:
            self.amqp_url = amqp_url
        if database_url:
            self._database_url = database_url
            self._engine = None
            self._owns_engine = True

    # -- topology -----------------------------------------------------------------------

    def topology(self) -> Topology:
        """The group's queues and bindings, as the transport declares them."""
        cfg = self.config
        ordered = tuple(h.pattern for h in self.handlers if h.ordered)
        return Topology(
            exchange=cfg.exchange,
            queue_type=cfg.queue_type,
            # The main queue exists even for a group of ordered handlers only: it is where
            # the delay queues send retries back, and operators replay dead letters into it.
            queue=self.queue,
            dead_queue=self.dead_queue,
            retry_queues={self.retry_queue(t): t for t in cfg.retry_tiers},
            patterns=tuple(h.pattern for h in self.handlers if not h.ordered),
            ordered_queue=self.ordered_queue if ordered else None,
            ordered_patterns=ordered,
        )

    async def _declare(self) -> None:
        assert self._transport is not None
        topology = self.topology()
        await self._transport.declare(topology)
        await self._transport.consume(topology.queue, self.config.prefetch, self._on_message)
        if topology.ordered_queue is not None:
            await self._transport.consume(
                topology.ordered_queue, self.config.prefetch, self._on_ordered
            )

    # -- unordered ----------------------------------------------------------------------

    def _on_message(self, raw: Received) -> Awaitable[None] | None:
        """Take a delivery: into the next batch at once, or return what handles it alone."""
        if self._stopping.is_set():
            return raw.nack(requeue=True)
        parsed = self._parse(raw)
        if not isinstance(parsed, str) and self._batchable(parsed[1]):
            self._batch.append((raw, *parsed))
            self._batched.set()
            if len(self._batch) >= self.config.batch_size:
                self._batch_moved.set()
            return None
        return self._start_unordered(raw, parsed)

    async def _start_unordered(
        self, raw: Received, parsed: tuple[IncomingMessage, HandlerSpec] | str
    ) -> None:
        await self._slots.acquire()
        task = asyncio.create_task(self._handle_unordered(raw, parsed))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _handle_unordered(
        self, raw: Received, parsed: tuple[IncomingMessage, HandlerSpec] | str
    ) -> None:
        try:
            if isinstance(parsed, str):
                await self._dead_letter(raw, parsed, attempt=_attempt(raw))
                return
            await self._process(raw, *parsed)
        finally:
            self._slots.release()

    async def _process(self, raw: Received, message: IncomingMessage, spec: HandlerSpec) -> None:
        """Handle one message in a transaction of its own, then ack, retry or dead-letter it."""
        try:
            outcome = await self._execute(spec, message)
        except Reject as e:
            await self._dead_letter(raw, f"rejected: {e.reason}", message.attempt, message.topic)
            return
        except Exception as e:
            await self._failed(raw, spec, message, e)
            return
        await self._settle(raw, outcome, message)

    # -- batches ------------------------------------------------------------------------

    def _batchable(self, spec: HandlerSpec) -> bool:
        """SQLAlchemy handlers (plain and async) share transactions; Django ones run alone."""
        return self.config.batch_size > 1 and spec.django_using is None

    async def _batcher(self) -> None:
        """Hand the buffered messages to handler slots, as many per transaction as are waiting.

        When no batch is running, a batch starts at once with the messages at hand
        (light load: one or two). While one runs, the next waits to fill up, until
        it holds ``batch_size`` messages, the running one ends, or ``BATCH_LINGER``
        has passed: the handlers are busy anyway, and a batch's cost is mostly per
        transaction, not per message. So under load batches grow to ``batch_size``.
        At most ``prefetch // (2 * batch_size)`` batches run at once (1 to
        ``concurrency``): the rest of the window is the next batch filling up.
        """
        size = self.config.batch_size
        while True:
            await self._batched.wait()
            await self._batch_slots.acquire()
            await asyncio.sleep(0)  # deliveries read in the same burst join this batch
            if self._batches_running and len(self._batch) < size:
                self._batch_moved.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(BATCH_LINGER):
                        while self._batches_running and len(self._batch) < size:
                            await self._batch_moved.wait()
                            self._batch_moved.clear()
            batch = [
                self._batch.popleft() for _ in range(min(self.config.batch_size, len(self._batch)))
            ]
            if not self._batch:
                self._batched.clear()
            if not batch:
                self._batch_slots.release()
                continue
            self.metrics.batch_size.observe(len(batch))
            self._batches_running += 1
            task = asyncio.create_task(self._handle_batch(batch))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _handle_batch(
        self, batch: list[tuple[Received, IncomingMessage, HandlerSpec]]
    ) -> None:
        """Run ``batch`` in one transaction; if anything fails, run each message alone.

        The optimistic transaction saves a commit and a round trip per message. On
        any error it is rolled back as a whole and every message of the batch is
        handled again in a transaction of its own, so a failing message is retried
        or dead-lettered alone and its neighbours commit once. (Their handlers ran
        twice then, which is why effects outside the transaction must be idempotent
        anyway; see docs/consumer.md.) Plain and ``async def`` handlers do not share
        a transaction (a ``Session`` in a thread, an ``AsyncSession`` on the loop):
        a batch holding both runs as two.
        """
        try:
            plain = [item for item in batch if not item[2].is_async]
            coroutines = [item for item in batch if item[2].is_async]
            for part in (plain, coroutines):
                if part:
                    await self._run_batch(part)
        finally:
            self._batches_running -= 1
            self._batch_moved.set()
            self._batch_slots.release()

    async def _run_batch(self, batch: list[tuple[Received, IncomingMessage, HandlerSpec]]) -> None:
        if len(batch) > 1:
            try:
                if batch[0][2].is_async:
                    outcomes = await self._execute_batch_async(batch)
                else:
                    outcomes = await self._in_thread(self._execute_batch_sync, batch)
            except Exception as e:
                self.metrics.batch_fallbacks.inc()
                self._log.info(
                    "consumer.batch_fallback", messages=len(batch), error=_describe(e)[:300]
                )
            else:
                await self._settle_batch(batch, outcomes)
                return
        for raw, message, spec in batch:
            await self._process(raw, message, spec)

    def _execute_batch_sync(
        self, batch: list[tuple[Received, IncomingMessage, HandlerSpec]]
    ) -> list[str]:
        """One transaction: one multi-row inbox INSERT, then the handlers of the new ids.

        Their one-row INSERTs are coalesced (``consumer.deferred_inserts``) unless
        ``coalesce_inserts`` is off.
        """
        assert self._engine is not None
        outcomes: list[str] = []
        traced = tracing_enabled()
        coalesce = self.config.coalesce_inserts
        with Session(self._engine) as session, session.begin():
            conn = session.connection()
            fresh = inbox_insert_batch(conn, self.group, _inbox_pairs(batch))
            with coalesced_inserts(conn) if coalesce else contextlib.nullcontext():
                for message, spec in self._new_in(batch, fresh, outcomes):
                    with self._span(message, traced):
                        spec.function(message, session)
            raise_if_aborted(conn)
        return outcomes

    async def _execute_batch_async(
        self, batch: list[tuple[Received, IncomingMessage, HandlerSpec]]
    ) -> list[str]:
        """``_execute_batch_sync`` for ``async def`` handlers: one ``AsyncSession`` transaction."""
        assert self._async_engine is not None
        outcomes: list[str] = []
        traced = tracing_enabled()
        coalesce = self.config.coalesce_inserts
        async with AsyncSession(self._async_engine) as session, session.begin():
            conn = await session.connection()
            fresh = await conn.run_sync(inbox_insert_batch, self.group, _inbox_pairs(batch))
            async with coalesced_inserts_async(conn) if coalesce else contextlib.nullcontext():
                for message, spec in self._new_in(batch, fresh, outcomes):
                    with self._span(message, traced):
                        await spec.function(message, session)
            await conn.run_sync(raise_if_aborted)
        return outcomes

    def _new_in(
        self,
        batch: list[tuple[Received, IncomingMessage, HandlerSpec]],
        fresh: set[str],
        outcomes: list[str],
    ) -> Iterator[tuple[IncomingMessage, HandlerSpec]]:
        """The messages of ``batch`` whose inbox row is new, for their handlers to run.

        ``outcomes`` gets one entry per message in batch order: a duplicate's at once
        (seen before, or a second copy within the batch), a new one's when its handler
        returned, with the handler's time observed.
        """
        observe = self.metrics.duration.observe
        for _, message, spec in batch:
            if message.message_id not in fresh:
                outcomes.append(_DUPLICATE)
                continue
            fresh.discard(message.message_id)
            started = time.perf_counter()
            yield message, spec
            observe(time.perf_counter() - started)
            outcomes.append(_DONE)

    def _span(
        self, message: IncomingMessage, traced: bool
    ) -> contextlib.AbstractContextManager[None]:
        """The handler's tracing span, or nothing when no tracer is configured."""
        if not traced:
            return contextlib.nullcontext()
        return consume_span(self.group, message.topic, message.message_id, message.headers)

    async def _in_thread(self, function: Callable[..., R], *args: Any) -> R:
        """Run ``function`` in the handler thread pool with this task's context (its span)."""
        loop = asyncio.get_running_loop()
        call = contextvars.copy_context().run
        return await loop.run_in_executor(self._threads, call, function, *args)

    async def _failed(
        self,
        raw: Received,
        spec: HandlerSpec,
        message: IncomingMessage,
        error: Exception,
    ) -> None:
        reason = _describe(error)
        if message.attempt >= spec.max_attempts:
            await self._dead_letter(
                raw,
                f"failed {message.attempt} times; last error: {reason}",
                message.attempt,
                message.topic,
            )
            return
        delay = (
            error.delay
            if isinstance(error, Retry) and error.delay is not None
            else spec.backoff(message.attempt)
        )
        tier = self.config.tier(delay)
        if isinstance(error, Retry):
            self._log.info(
                "consumer.retry_requested",
                attempt=message.attempt,
                delay_s=tier.total_seconds(),
                **_ids(message),
            )
        else:
            self._log.warning(
                "consumer.handler_failed",
                attempt=message.attempt,
                retry_in_s=tier.total_seconds(),
                error=reason,
                **_ids(message),
            )
        self.metrics.retries.inc()
        headers = {
            **_headers(raw),
            ATTEMPT: message.attempt + 1,
            TOPIC: message.topic,
            LAST_ERROR: reason[:500],
        }
        if await self._republish(raw, self.retry_queue(tier), headers):
            await raw.ack()
        else:
            await raw.nack(requeue=True)

    # -- ordered ------------------------------------------------------------------------

    async def _on_ordered(self, message: Received) -> None:
        if self._stopping.is_set():
            await message.nack(requeue=True)
            return
        key = (message.headers or {}).get("x-outbox-key")
        lane_key = key if isinstance(key, str) else None
        if lane_key is None:
            # No key, no order to keep: handle it on its own, like an unordered one.
            await self._start_lane(None, message)
            return
        lane = self._lanes.get(lane_key)
        if lane is not None:
            lane.append(message)  # the lane's task is running and will take it in turn
            return
        await self._start_lane(lane_key, message)

    async def _start_lane(self, key: str | None, first: Received) -> None:
        lane: deque[Received] = deque([first])
        if key is not None:
            self._lanes[key] = lane
        task = asyncio.create_task(self._run_lane(key, lane))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _run_lane(self, key: str | None, lane: deque[Received]) -> None:
        try:
            while lane and not self._stopping.is_set():
                raw = lane[0]
                async with self._slots:
                    await self._handle_in_place(raw)
                lane.popleft()
        finally:
            if key is not None and self._lanes.get(key) is lane and not lane:
                del self._lanes[key]

    async def _handle_in_place(self, raw: Received) -> None:
        """Handle one ordered message, retrying in place so the key's order holds."""
        parsed = self._parse(raw)
        if isinstance(parsed, str):
            await self._dead_letter(raw, parsed, attempt=_attempt(raw))
            return
        message, spec = parsed
        attempt = message.attempt
        while True:
            current = _with_attempt(message, attempt)
            try:
                outcome = await self._execute(spec, current)
            except Reject as e:
                await self._dead_letter(raw, f"rejected: {e.reason}", attempt, message.topic)
                return
            except Exception as e:
                reason = _describe(e)
                exhausted = attempt >= spec.max_attempts
                if exhausted and spec.on_exhausted is Exhausted.DEAD_LETTER:
                    await self._dead_letter(
                        raw, f"failed {attempt} times; last error: {reason}", attempt, message.topic
                    )
                    return
                delay = (
                    e.delay
                    if isinstance(e, Retry) and e.delay is not None
                    else spec.backoff(attempt)
                )
                self.metrics.retries.inc()
                log = self._log.error if exhausted else self._log.warning
                log(
                    "consumer.key_held" if exhausted else "consumer.handler_failed",
                    attempt=attempt,
                    retry_in_s=delay.total_seconds(),
                    error=reason,
                    **_ids(message),
                )
                if await self._sleep(delay.total_seconds()):
                    await raw.nack(requeue=True)  # stopping: give it back, order intact
                    return
                attempt += 1
                continue
            await self._settle(raw, outcome, current)
            return

    # -- shared steps -------------------------------------------------------------------

    def _parse(self, raw: Received) -> tuple[IncomingMessage, HandlerSpec] | str:
        """The message and its handler, or the reason it goes to the dead-letter queue."""
        headers = raw.headers or {}
        topic = headers.get(TOPIC) or raw.routing_key
        if isinstance(topic, bytes):
            topic = topic.decode(errors="replace")
        try:
            envelope = Envelope.from_amqp(
                body=raw.body,
                routing_key=str(topic),
                message_id=raw.message_id,
                content_type=raw.content_type,
                headers=headers,
                timestamp=raw.timestamp,
            )
            payload = envelope.payload(_CODECS)
        except MalformedMessageError as e:
            self.metrics.malformed.inc()
            return f"malformed: {e}"
        spec = self.handler_for(envelope.topic)
        if spec is None:
            return f"no handler in group {self.group!r} for topic {envelope.topic!r}"
        app_headers = envelope.headers
        if any(k.startswith("x-outbox-") for k in app_headers):
            app_headers = {k: v for k, v in app_headers.items() if not k.startswith("x-outbox-")}
        message = IncomingMessage(
            message_id=envelope.message_id,
            topic=envelope.topic,
            key=envelope.key,
            payload=payload,
            headers=app_headers,
            created_at=envelope.created_at,
            attempt=_attempt(raw),
            redelivered=bool(raw.redelivered),
        )
        return message, spec

    async def _execute(self, spec: HandlerSpec, message: IncomingMessage) -> str:
        """Run the handler in one transaction with the inbox row; return done or duplicate."""
        started = time.perf_counter()
        try:
            with consume_span(self.group, message.topic, message.message_id, message.headers):
                if spec.is_async:
                    return await self._execute_async(spec, message)
                # The span is current in this task; the thread gets a copy of the context.
                return await self._in_thread(self._execute_sync, spec, message)
        finally:
            self.metrics.duration.observe(time.perf_counter() - started)

    def _execute_sync(self, spec: HandlerSpec, message: IncomingMessage) -> str:
        if spec.django_using is not None:
            handled = run_django_handler(self.group, spec, message)
            return _DONE if handled else _DUPLICATE
        assert self._engine is not None
        with Session(self._engine) as session, session.begin():
            conn = session.connection()
            row = inbox_row(self.group, uuid.UUID(message.message_id), message.topic)
            if conn.execute(inbox_insert(conn.dialect.name), row).first() is None:
                return _DUPLICATE
            spec.function(message, session)
            raise_if_aborted(conn)
        return _DONE

    async def _execute_async(self, spec: HandlerSpec, message: IncomingMessage) -> str:
        assert self._async_engine is not None
        async with AsyncSession(self._async_engine) as session, session.begin():
            conn = await session.connection()
            row = inbox_row(self.group, uuid.UUID(message.message_id), message.topic)
            if (await conn.execute(inbox_insert(conn.dialect.name), row)).first() is None:
                return _DUPLICATE
            await spec.function(message, session)
            await conn.run_sync(raise_if_aborted)
        return _DONE

    async def _settle(self, raw: Received, outcome: str, message: IncomingMessage) -> None:
        await self._ack(raw, outcome, message)
        # Duplicates send none: the copy that committed sent the receipt (best-effort).
        if outcome == _DONE and self._receipts is not None:
            self._receipts.send_consumed([message.message_id])

    async def _settle_batch(
        self, batch: list[tuple[Received, IncomingMessage, HandlerSpec]], outcomes: list[str]
    ) -> None:
        """Ack a committed batch (the transport may do it in one frame); one receipt call."""
        for (raw, message, _), outcome in zip(batch, outcomes, strict=True):
            await self._ack(raw, outcome, message)
        if self._receipts is not None:
            self._receipts.send_consumed(
                [m.message_id for (_, m, _), o in zip(batch, outcomes, strict=True) if o == _DONE]
            )

    async def _ack(self, raw: Received, outcome: str, message: IncomingMessage) -> None:
        if outcome == _DUPLICATE:
            self.metrics.duplicates.inc()
            self._log.info("consumer.duplicate", **_ids(message))
        else:
            self.metrics.processed.inc()
            self._log.debug("consumer.processed", attempt=message.attempt, **_ids(message))
        try:
            await raw.ack()
        except Exception as e:
            self._log.warning("consumer.ack_failed", error=str(e)[:200], **_ids(message))

    async def _dead_letter(
        self, raw: Received, reason: str, attempt: int, topic: str | None = None
    ) -> None:
        headers = {
            **_headers(raw),
            DEAD_REASON: reason[:1000],
            ATTEMPT: attempt,
            TOPIC: topic or raw.routing_key or "",
            "x-outbox-group": self.group,
            "x-outbox-dead-at": datetime.now(UTC).isoformat(),
        }
        self.metrics.dead.inc()
        self._log.error(
            "consumer.dead_lettered",
            reason=reason[:300],
            message_id=raw.message_id,
            topic=topic,
            attempt=attempt,
        )
        if await self._republish(raw, self.dead_queue, headers):
            # Dead once the broker confirmed the copy in the dead-letter queue.
            if self._receipts is not None:
                self._receipts.send(raw.message_id, "dead", reason)
            await raw.ack()
        else:
            await raw.nack(requeue=True)

    async def _republish(self, raw: Received, queue: str, headers: dict[str, Any]) -> bool:
        """Send a copy of ``raw`` to ``queue`` with publisher confirms; True once confirmed."""
        assert self._transport is not None
        return await self._transport.send(raw, queue, headers)

    async def _sleep(self, seconds: float) -> bool:
        """Sleep; return True if the consumer is stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return self._stopping.is_set()

    async def _purge(self) -> None:
        assert self._async_engine is not None
        try:
            purged = await purge_inbox(self._async_engine, self.group, self.config.inbox_retention)
        except Exception as e:
            self._log.warning("consumer.inbox_purge_failed", error=str(e)[:200])
            return
        if purged:
            self._log.info("consumer.inbox_purged", rows=purged)

    def _check_retention(self) -> None:
        """The inbox must remember a message at least as long as it can come back."""
        horizon = self.config.replay_window
        for h in self.handlers:
            retries = sum(
                (self.config.tier(h.backoff(n)) for n in range(1, h.max_attempts)), timedelta()
            )
            horizon = max(horizon, self.config.replay_window + retries)
        if self.config.inbox_retention <= horizon:
            raise ConfigurationError(
                f"inbox_retention ({self.config.inbox_retention}) must exceed the longest "
                f"redelivery horizon ({horizon}: retries plus the replay window), or a late "
                "copy of a message would be handled twice"
            )

    async def _health_checks(self) -> dict[str, bool]:
        broker = self._transport is not None and self._transport.connected
        return {"database": await database_reachable(self._async_engine), "broker": broker}


def _inbox_pairs(
    batch: list[tuple[Received, IncomingMessage, HandlerSpec]],
) -> list[tuple[str, str]]:
    """(message id, topic) of each message: the inbox rows of ``batch``."""
    return [(message.message_id, message.topic) for _, message, _ in batch]


def _batches_in_flight(config: ConsumerConfig) -> int:
    # Half the prefetch window runs, the other half is the next batch filling up: more
    # batches at once would only contend for the GIL and make each one smaller.
    return max(1, min(config.concurrency, config.prefetch // (2 * config.batch_size)))


def _attempt(raw: Received) -> int:
    value = (raw.headers or {}).get(ATTEMPT, 1)
    return value if isinstance(value, int) and value >= 1 else 1


def _headers(raw: Received) -> dict[str, Any]:
    return dict(raw.headers or {})


def _with_attempt(message: IncomingMessage, attempt: int) -> IncomingMessage:
    from dataclasses import replace

    return message if message.attempt == attempt else replace(message, attempt=attempt)


def _describe(error: BaseException) -> str:
    if isinstance(error, Retry):
        return f"retry requested: {error.reason}"
    return f"{type(error).__name__}: {error}"[:1000]


def _ids(message: IncomingMessage) -> dict[str, Any]:
    return {"message_id": message.message_id, "topic": message.topic, "key": message.key}
