"""``OutboxHarness``: a service's handlers and relay on an in-memory broker and a test database.

The harness runs the real ``relay.Relay`` and copies of the user's
``consumer.Consumer`` on a ``FaultyBroker``, so a test sees what production does,
crash points included, with nothing but a database. ``outbox`` must not depend
on ``relay`` or ``consumer`` (DESIGN §2): this module takes the user's
``Consumer`` as an argument and imports both packages only inside the methods
that run them.

Nothing is handled until ``drain()``: it relays committed outbox rows, runs the
consumers until every queue is empty and no retry is waiting, then stops them,
and repeats while handlers produce new messages.
"""

from __future__ import annotations

import asyncio
import functools
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from outbox.envelope import Envelope
from outbox.errors import ConfigurationError
from outbox.producer import Producer
from outbox.tables import MessageStatus, inbox_table, metadata, outbox_table
from outbox.testing.broker import FaultyBroker, twice_shuffled

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Callable, Hashable, Iterable, Mapping, Sequence

    from consumer import Consumer
    from consumer.config import HandlerSpec
    from outbox.broker import Delivery, PublishResult
    from outbox.message import HeaderValue, Message
    from relay.checkbacks import CheckbackSource

__all__ = ["DeadLetter", "OutboxHarness", "Outcomes"]

FAST_RETRY = timedelta(milliseconds=10)
"""With ``fast_retries``, every retry waits this long (ordered handlers: up to 5 times it)."""
TAP_QUEUE = "outbox.testing.tap"
"""Bound to every topic, so whatever is published is routable, as on a broker where the
queues of every other service exist."""
ROLLBACK_REASON = "outbox.testing idempotency mode: first handling rolled back"
_DELIVERY_ATTEMPTS = 10
_POLL = 0.005


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message in a consumer group's dead-letter queue."""

    group: str
    message_id: str
    topic: str
    reason: str
    attempt: int


@dataclass(frozen=True, kw_only=True)
class Outcomes:
    """What happened to the messages so far (counted over every ``drain()``)."""

    handled: int
    """Handler transactions that committed."""
    duplicates: int
    """Copies the inbox absorbed: the message was handled before, the handler was not called."""
    retried: int
    """Failed attempts that were retried (idempotency mode's own rollbacks not counted)."""
    dead_letters: tuple[DeadLetter, ...]
    """The dead-letter queues' contents, with reasons."""
    unhandled: tuple[str, ...]
    """Ids of messages a group takes that it neither handled nor dead-lettered: after
    ``drain()``, a message here was lost."""
    wire_duplicates: Mapping[str, int] = field(default_factory=dict)
    """Message id -> times the broker took it, for messages it took more than once."""
    crashes: Mapping[str, int] = field(default_factory=dict)
    """Crash point -> times it fired."""
    seed: int | None = None
    """The idempotency mode's seed, or None when the mode is off."""

    def __str__(self) -> str:
        fired = ", ".join(f"{name} {n}" for name, n in self.crashes.items() if n) or "none"
        text = (
            f"handled {self.handled}, duplicates absorbed {self.duplicates}, retried "
            f"{self.retried}, dead-lettered {len(self.dead_letters)}, unhandled "
            f"{len(self.unhandled)}, wire duplicates {len(self.wire_duplicates)}; "
            f"crash points fired: {fired}"
        )
        if self.seed is not None:
            text += f"; seed {self.seed}"
        for dead in self.dead_letters:
            text += f"\n  dead in {dead.group}: {dead.topic} {dead.message_id}: {dead.reason}"
        return text


class _Lent:
    """The harness's broker as lent to a relay: stopping the relay leaves it connected."""

    def __init__(self, broker: FaultyBroker) -> None:
        self._broker = broker

    @property
    def connected(self) -> bool:
        return self._broker.connected

    async def connect(self) -> None:
        if not self._broker.connected:
            await self._broker.connect()

    async def close(self) -> None:
        """Nothing: the broker is the harness's, and consumers may use it next."""

    async def wait_connected(self, timeout: float | None = None) -> bool:
        return await self._broker.wait_connected(timeout)

    async def publish(self, envelopes: Sequence[Envelope]) -> list[PublishResult]:
        return await self._broker.publish(envelopes)

    async def declare_queue(
        self, queue: str, patterns: Sequence[str], *, exchange: str | None = None
    ) -> None:
        await self._broker.declare_queue(queue, patterns, exchange=exchange)

    def consume(self, queue: str, *, prefetch: int = 32) -> AsyncGenerator[Delivery, None]:
        return self._broker.consume(queue, prefetch=prefetch)


class OutboxHarness:
    """Runs consumers and the relay of a test on a ``FaultyBroker`` and ``engine``.

    ``engine``: a sync engine on the test's own database (SQLite file or
    PostgreSQL; see ``isolated_engine``); the framework's tables are created on
    ``start()`` if missing. ``broker``: default a new ``FaultyBroker``.
    ``idempotency``: switch idempotency mode on at once (see
    ``enable_idempotency_mode``); ``seed`` is the seed it uses (default random).
    ``concurrency``: handlers running at once per consumer (default: the
    consumer's own). ``fast_retries``: retries wait milliseconds instead of their
    configured delays. ``timeout``: seconds ``drain()`` and ``relay_pending()``
    wait before failing the test. Use ``async with OutboxHarness(engine) as h``
    or the pytest fixture ``outbox_harness``.
    """

    def __init__(
        self,
        engine: sa.Engine,
        *,
        broker: FaultyBroker | None = None,
        idempotency: bool = False,
        seed: int | None = None,
        concurrency: int | None = None,
        fast_retries: bool = True,
        timeout: float = 10.0,
    ) -> None:
        if not isinstance(engine, sa.Engine):
            raise ConfigurationError(
                f"OutboxHarness needs a sync sqlalchemy Engine, not {type(engine).__name__}"
            )
        if engine.dialect.name == "sqlite" and engine.url.database in (None, "", ":memory:"):
            raise ConfigurationError(
                "OutboxHarness needs a SQLite file, not an in-memory database: the relay "
                "and consumers open connections of their own"
            )
        if concurrency is not None and concurrency < 1:
            raise ConfigurationError(f"concurrency must be >= 1, got {concurrency}")
        self.engine = engine
        self.broker = broker or FaultyBroker()
        self.timeout = timeout
        self._url = engine.url.render_as_string(hide_password=False)
        self._fast = fast_retries
        self._concurrency = concurrency
        self._default_seed = seed
        self._seed: int | None = None
        self._rng: random.Random | None = None
        self._consumers: list[Consumer] = []
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()  # sync handlers run in the consumers' threads
        self._rolled_back: set[tuple[str, str]] = set()
        self._simulated = 0
        self._producer = Producer()
        self._started = False
        if idempotency:
            self.enable_idempotency_mode(seed)

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Create the framework's tables if missing, connect the broker (idempotent)."""
        if self._started:
            return
        await asyncio.to_thread(metadata.create_all, self.engine)
        if not self.broker.connected:
            await self.broker.connect()
        await self.broker.declare_queue(TAP_QUEUE, ["#"])
        self._started = True

    async def aclose(self) -> None:
        """Close the broker; the engine stays the caller's."""
        await self.broker.close()
        self._started = False

    async def __aenter__(self) -> OutboxHarness:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- idempotency mode ---------------------------------------------------------------

    @property
    def seed(self) -> int | None:
        """The idempotency mode's seed, or None while the mode is off."""
        return self._seed

    def enable_idempotency_mode(self, seed: int | None = None) -> int:
        """From the next ``drain()`` on, test every handler for idempotency; return the seed.

        Each message waiting for a consumer is delivered twice, in an order
        shuffled by ``seed`` (ordered handlers still get each key in order), and
        the first time a handler returns for a message its transaction is rolled
        back and the message retried, as when a worker dies before its commit.
        The database effects in the handler's session still happen once; an
        effect outside it (a call to another system, a write on another
        connection) happens twice, which ``assert_effects_once`` reports. Handlers
        get one extra attempt to make up for the rollback, and each message runs
        in a transaction of its own (no shared batches). The seed is printed,
        and in every failure the harness reports; pass it back (``seed=`` or
        ``--outbox-seed``) to replay the same order.
        """
        if seed is None:
            seed = self._default_seed
        if seed is None:
            seed = random.SystemRandom().randrange(2**32)
        self._seed = seed
        self._rng = random.Random(seed)  # noqa: S311  (a replayable shuffle, not a secret)
        print(f"outbox.testing: idempotency mode, seed {seed} (replay: --outbox-seed={seed})")
        return seed

    def assert_effects_once(
        self, effects: Iterable[Hashable], *, expected: Iterable[Hashable] | None = None
    ) -> None:
        """Assert that no effect in ``effects`` happened twice (and, given ``expected``, that
        exactly those happened).

        ``effects``: one entry per effect the handlers had, as the test recorded
        them (say, the order ids a fake mail service was asked to mail about).
        """
        counts = Counter(effects)
        problems: list[str] = []
        repeated = _sorted({effect: n for effect, n in counts.items() if n > 1})
        if repeated:
            problems.append(f"effects that happened more than once: {repeated!r}")
        if expected is not None:
            wanted = set(expected)
            missing = [e for e in wanted if e not in counts]
            extra = [e for e in counts if e not in wanted]
            if missing:
                problems.append(f"expected effects that did not happen: {missing!r}")
            if extra:
                problems.append(f"effects nobody expected: {extra!r}")
        if not problems:
            return
        hint = ""
        if repeated:
            hint = (
                "\nAn effect outside the handler's transaction (a call to another system, a "
                "write on another connection) runs again whenever the transaction rolls back "
                "and the message is retried. Record it in the handler's session instead (for "
                "example outbox.publish(session, ...) a message whose handler makes the call), "
                "or give the other system an idempotency key such as message.message_id."
            )
        seed = f"\nidempotency mode seed: {self._seed}" if self._seed is not None else ""
        raise AssertionError("\n".join(problems) + hint + seed)

    # -- consumers ----------------------------------------------------------------------

    async def add_consumer(self, consumer: Consumer) -> None:
        """Run ``consumer``'s handlers in ``drain()``, and declare its queues now.

        The harness runs a copy of it on its own broker and engine, with the same
        group, handlers and queue names; ``consumer`` itself is not changed or
        started, so a module-level consumer built for production can be given.
        """
        if any(c.group == consumer.group for c in self._consumers):
            raise ConfigurationError(f"a consumer of group {consumer.group!r} was added already")
        if not consumer.handlers:
            raise ConfigurationError(
                f"group {consumer.group!r} has no handlers; add @consumer.handler(...)"
            )
        await self.start()
        topology = self._copy(consumer).topology()
        await self.broker.declare_queue(topology.dead_queue, [])
        await self.broker.declare_queue(topology.queue, topology.patterns)
        if topology.ordered_queue is not None:
            await self.broker.declare_queue(topology.ordered_queue, topology.ordered_patterns)
        self._consumers.append(consumer)

    async def deliver(
        self,
        topic: str,
        payload: Any,
        *,
        key: str | None = None,
        headers: Mapping[str, HeaderValue] | None = None,
        message_id: str | None = None,
    ) -> Message:
        """Publish a message to the broker as the relay would, without an outbox row.

        It is checked and encoded as ``outbox.publish`` does, and published again
        until the broker confirms it (so the relay-side crash points apply).
        Returns the message; a consumer handles it in the next ``drain()``.
        """
        await self.start()
        row, message = self._producer.build_row(
            topic, payload, key=key, headers=headers, message_id=message_id
        )
        envelope = Envelope.from_row(row)
        reasons: list[str] = []
        for _ in range(_DELIVERY_ATTEMPTS):
            [result] = await self.broker.publish([envelope])
            if result.confirmed:
                return message
            reasons.append(f"{result.outcome}: {result.reason}")
        raise AssertionError(
            f"{topic} {message.message_id} was not confirmed in {_DELIVERY_ATTEMPTS} publishes: "
            + "; ".join(reasons)
        )

    # -- running ------------------------------------------------------------------------

    async def relay_pending(
        self, *, app: CheckbackSource | None = None, timeout: float | None = None
    ) -> list[Message]:
        """Run a ``relay.Relay`` until no outbox row is pending, then stop it.

        Returns the messages it published, once each, in publish order. ``app``
        answers the check-backs of half messages (an ``outbox.Outbox``). Fails
        the test, listing what is still pending, after ``timeout`` seconds.
        """
        return await self._relay(time.monotonic() + (timeout or self.timeout), app)

    async def drain(self, *, relay: bool = True, timeout: float | None = None) -> Outcomes:
        """Relay and handle everything, until nothing is left to do; return the outcomes.

        Repeats: relay pending outbox rows (unless ``relay=False``), run the
        consumers until their queues are empty, no handler is running and no retry
        is waiting, stop them; until a round leaves nothing new. Fails the test,
        saying what is stuck, after ``timeout`` seconds.
        """
        seconds = timeout or self.timeout
        deadline = time.monotonic() + seconds
        await self.start()
        while True:
            if relay:
                await self._relay(deadline, None)
            if self._idle():
                break
            await self._consume(deadline, seconds)
            if not relay:
                break
        return await self.outcomes()

    async def outcomes(self) -> Outcomes:
        """The outcomes so far (see ``Outcomes``)."""
        inbox = await asyncio.to_thread(self._inbox)
        dead_letters: list[DeadLetter] = []
        unhandled: list[str] = []
        sent = list({e.message_id: e for e in self.broker.published}.values())
        for consumer in self._consumers:
            dead = [
                _dead_letter(consumer.group, e) for e in self.broker.messages(consumer.dead_queue)
            ]
            dead_letters += dead
            settled = inbox.get(consumer.group, set()) | {d.message_id for d in dead}
            unhandled += [
                e.message_id
                for e in sent
                if consumer.handler_for(e.topic) is not None and e.message_id not in settled
            ]
        return Outcomes(
            handled=self._counts["processed"],
            duplicates=self._counts["duplicates"],
            retried=self._counts["retries"] - self._simulated,
            dead_letters=tuple(dead_letters),
            unhandled=tuple(unhandled),
            wire_duplicates={m: n for m, n in self.broker.publish_counts.items() if n > 1},
            crashes={p.name: p.fired for p in self.broker.crash_points},
            seed=self._seed,
        )

    # -- internals ----------------------------------------------------------------------

    def _queues(self) -> list[str]:
        queues: list[str] = []
        for consumer in self._consumers:
            queues.append(consumer.queue)
            if any(h.ordered for h in consumer.handlers):
                queues.append(consumer.ordered_queue)
        return queues

    def _idle(self) -> bool:
        # A delivery being handled is unacknowledged, so it still counts in its queue's
        # depth; a retry waiting out its delay is counted by the broker until it lands.
        return self.broker.delayed == 0 and all(
            self.broker.queue_depth(q) == 0 for q in self._queues()
        )

    async def _consume(self, deadline: float, seconds: float) -> None:
        if self._rng is not None:
            for consumer in self._consumers:
                self.broker.rearrange(
                    consumer.queue, twice_shuffled(self._rng, keep_key_order=False)
                )
                if any(h.ordered for h in consumer.handlers):
                    self.broker.rearrange(
                        consumer.ordered_queue, twice_shuffled(self._rng, keep_key_order=True)
                    )
        # A stopped Consumer cannot start again: each round runs fresh copies.
        copies = [self._copy(c) for c in self._consumers]
        started: list[Consumer] = []
        try:
            for copy in copies:
                await copy.start()
                started.append(copy)
            while not self._idle():
                if time.monotonic() > deadline:
                    raise AssertionError(self._stuck(seconds))
                await asyncio.sleep(_POLL)
        finally:
            for copy in started:
                await copy.stop()
                self._tally(copy)

    def _copy(self, consumer: Consumer) -> Consumer:
        """``consumer``'s group and handlers on the harness's broker and engine."""
        from consumer import Consumer

        cfg = consumer.config
        copy = Consumer(
            consumer.group,
            engine=self.engine,
            broker=self.broker,
            config=replace(
                cfg,
                metrics_port=None,
                receipts=False,
                retry_tiers=(FAST_RETRY,) if self._fast else cfg.retry_tiers,
                concurrency=self._concurrency or cfg.concurrency,
                # A handler failing inside a shared transaction makes the consumer rerun the
                # batch's messages one by one; idempotency mode runs each message alone from
                # the start, so that each rollback it simulates hits one message and is
                # counted as that message's retry.
                batch_size=1 if self._rng is not None else cfg.batch_size,
            ),
        )
        extra = 1 if self._rng is not None else 0  # the attempt the simulated rollback takes
        for spec in consumer.handlers:
            retry_delay, retry_max = spec.retry_delay, spec.retry_max
            if self._fast:
                retry_delay = min(retry_delay, FAST_RETRY)
                retry_max = max(retry_delay, min(retry_max, FAST_RETRY * 5))
            copy.handler(
                spec.pattern,
                ordered=spec.ordered,
                max_attempts=spec.max_attempts + extra,
                retry_delay=retry_delay,
                retry_max=retry_max,
                on_exhausted=spec.on_exhausted,
                django=spec.django_using is not None,
                using=spec.django_using or "default",
            )(self._wrap(consumer.group, spec))
        return copy

    def _wrap(self, group: str, spec: HandlerSpec) -> Callable[..., Any]:
        """The handler, rolled back on its first return per message in idempotency mode."""
        if self._rng is None:
            return spec.function
        from consumer import Retry

        function = spec.function

        def roll_back_first(message: Any) -> None:
            with self._lock:
                if (group, message.message_id) in self._rolled_back:
                    return
                self._rolled_back.add((group, message.message_id))
                self._simulated += 1
            raise Retry(delay=timedelta(0), reason=ROLLBACK_REASON)

        if spec.is_async:

            @functools.wraps(function)
            async def wrapped_async(message: Any, *args: Any) -> None:
                await function(message, *args)
                roll_back_first(message)

            return wrapped_async

        @functools.wraps(function)
        def wrapped(message: Any, *args: Any) -> None:
            function(message, *args)
            roll_back_first(message)

        return wrapped

    def _tally(self, copy: Consumer) -> None:
        registry = copy.metrics.registry
        for name in ("processed", "duplicates", "retries"):
            value = registry.get_sample_value(f"outbox_consumer_{name}_total")
            self._counts[name] += int(value or 0)

    async def _relay(self, deadline: float, app: CheckbackSource | None) -> list[Message]:
        from relay import Relay, RelayConfig

        await self.start()
        if not await asyncio.to_thread(self._pending):
            return []
        before = len(self.broker.published)
        relay = Relay(
            RelayConfig(
                database_url=self._url,
                relay_id="outbox-testing",
                keyless_workers=1,
                poll_min=timedelta(milliseconds=1),
                poll_max=timedelta(milliseconds=10),
                retry_base=timedelta(milliseconds=5),
                retry_max=timedelta(milliseconds=50),
                rebalance_interval=timedelta(milliseconds=100),
                check_interval=timedelta(milliseconds=50),
                shutdown_timeout=timedelta(seconds=5),
            ),
            broker=_Lent(self.broker),
            app=app,
        )
        await relay.start()
        try:
            while pending := await asyncio.to_thread(self._pending):
                if time.monotonic() > deadline:
                    raise AssertionError(_pending_report(pending, self._seed))
                await asyncio.sleep(_POLL)
        finally:
            await relay.stop()
        published = {e.message_id: e for e in self.broker.published[before:]}
        return [e.decode() for e in published.values()]

    def _pending(self) -> list[sa.Row[Any]]:
        t = outbox_table
        query = (
            sa.select(t.c.message_id, t.c.topic, t.c.attempts, t.c.last_error)
            .where(t.c.status == MessageStatus.PENDING.value)
            .order_by(t.c.id)
        )
        with self.engine.connect() as conn:
            return list(conn.execute(query))

    def _inbox(self) -> dict[str, set[str]]:
        groups = [c.group for c in self._consumers]
        if not groups:
            return {}
        t = inbox_table
        query = sa.select(t.c.consumer_group, t.c.message_id).where(t.c.consumer_group.in_(groups))
        seen: dict[str, set[str]] = {}
        with self.engine.connect() as conn:
            for group, message_id in conn.execute(query):
                seen.setdefault(group, set()).add(str(message_id))
        return seen

    def _stuck(self, seconds: float) -> str:
        lines = [f"the consumers did not finish within {seconds}s:"]
        for queue in self._queues():
            waiting = self.broker.messages(queue)
            topics = ", ".join(e.topic for e in waiting[:5]) + (" ..." if len(waiting) > 5 else "")
            lines.append(f"  queue {queue}: {len(waiting)} messages ({topics or 'empty'})")
        lines.append(f"  retries waiting out their delay: {self.broker.delayed}")
        lines.append(
            "  (a handler that does not return, an ordered handler holding its key with "
            "on_exhausted='hold', or handlers that keep publishing new messages)"
        )
        if self._seed is not None:
            lines.append(f"  idempotency mode seed: {self._seed}")
        return "\n".join(lines)


def _sorted(counts: dict[Hashable, int]) -> dict[Hashable, int]:
    """``counts`` in the order of its keys when they can be ordered, for a stable message."""
    try:
        return dict(sorted(counts.items()))
    except TypeError:
        return counts


def _dead_letter(group: str, envelope: Envelope) -> DeadLetter:
    headers = envelope.headers
    attempt = headers.get("x-outbox-attempt")
    return DeadLetter(
        group=group,
        message_id=envelope.message_id,
        topic=str(headers.get("x-outbox-topic") or envelope.topic),
        reason=str(headers.get("x-outbox-dead-reason") or ""),
        attempt=attempt if isinstance(attempt, int) else 1,
    )


def _pending_report(rows: list[sa.Row[Any]], seed: int | None) -> str:
    lines = [f"the relay did not publish {len(rows)} pending outbox rows in time:"]
    for row in rows[:10]:
        lines.append(
            f"  {row.topic} {row.message_id}: {row.attempts} attempts, last error: {row.last_error}"
        )
    if seed is not None:
        lines.append(f"  idempotency mode seed: {seed}")
    return "\n".join(lines)
