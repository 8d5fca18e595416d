"""The consumer on the in-memory broker and SQLite: the same guarantees, no services."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from broker_contract import make_envelope
from waiting import wait_for

from consumer import Consumer, ConsumerConfig, IncomingMessage, Reject, Retry
from outbox.memory_broker import InMemoryBroker
from outbox.tables import inbox_table

FAST = ConsumerConfig(retry_tiers=(timedelta(milliseconds=20), timedelta(milliseconds=50)))

effects = sa.Table(
    "effects",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("message_id", sa.String(36)),
    sa.Column("value", sa.String(100)),
)


@pytest.fixture
def db(sqlite_engine: sa.Engine) -> sa.Engine:
    effects.metadata.create_all(sqlite_engine)
    return sqlite_engine


def count(engine: sa.Engine, table: sa.Table = effects) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def values(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(effects.c.value).order_by(effects.c.id)).scalars())


def record(message: IncomingMessage, session: Any) -> None:
    session.execute(
        effects.insert().values(message_id=message.message_id, value=str(message.payload))
    )


async def test_each_message_has_one_effect_even_when_delivered_twice(
    memory: InMemoryBroker, db: sa.Engine
) -> None:
    consumer = Consumer("billing", engine=db, broker=memory, config=FAST)
    consumer.handler("orders.*")(record)
    await consumer.start()
    try:
        first, second = make_envelope("orders.created", 1), make_envelope("orders.paid", 2)
        await memory.publish([first, second, first])  # the third is a wire duplicate
        await wait_for(lambda: consumer.metrics.duplicates._value.get() == 1)
        await wait_for(lambda: memory.queue_depth(consumer.queue) == 0)
    finally:
        await consumer.stop()
    assert sorted(values(db)) == ["1", "2"]
    assert count(db, inbox_table) == 2


async def test_failing_handler_is_retried_through_the_delay_queue_then_succeeds(
    memory: InMemoryBroker, db: sa.Engine
) -> None:
    attempts: list[int] = []
    consumer = Consumer("billing", engine=db, broker=memory, config=FAST)

    @consumer.handler("orders.created", retry_delay=timedelta(milliseconds=10))
    def flaky(message: IncomingMessage, session: Any) -> None:
        attempts.append(message.attempt)
        record(message, session)
        if message.attempt < 3:
            raise RuntimeError("not yet")

    await consumer.start()
    try:
        await memory.publish([make_envelope("orders.created", "x")])
        await wait_for(lambda: count(db) == 1)
    finally:
        await consumer.stop()
    assert attempts == [1, 2, 3]  # the rolled-back attempts left no effect
    assert values(db) == ["x"]


async def test_exhausted_and_rejected_messages_go_to_the_dead_letter_queue(
    memory: InMemoryBroker, db: sa.Engine
) -> None:
    consumer = Consumer("billing", engine=db, broker=memory, config=FAST)

    @consumer.handler("orders.broken", max_attempts=2, retry_delay=timedelta(milliseconds=10))
    def broken(message: IncomingMessage, session: Any) -> None:
        raise ValueError("bad order")

    @consumer.handler("orders.refused")
    def refused(message: IncomingMessage, session: Any) -> None:
        raise Reject("refused by policy")

    await consumer.start()
    try:
        await memory.publish([make_envelope("orders.broken"), make_envelope("orders.refused")])
        await wait_for(lambda: memory.queue_depth(consumer.dead_queue) == 2)
    finally:
        await consumer.stop()
    reasons = {
        str(e.headers["x-outbox-topic"]): str(e.headers["x-outbox-dead-reason"])
        for e in memory.messages(consumer.dead_queue)
    }
    assert "failed 2 times; last error: ValueError: bad order" in reasons["orders.broken"]
    assert reasons["orders.refused"] == "rejected: refused by policy"
    assert count(db, inbox_table) == 0  # nothing committed for them


async def test_ordered_handler_keeps_each_keys_order_across_retries(
    memory: InMemoryBroker, db: sa.Engine
) -> None:
    consumer = Consumer("billing", engine=db, broker=memory, config=FAST)
    failed_once: set[str] = set()

    @consumer.handler("accounts.*", ordered=True, retry_delay=timedelta(milliseconds=5))
    def apply(message: IncomingMessage, session: Any) -> None:
        if message.payload.endswith("-1") and message.payload not in failed_once:
            failed_once.add(message.payload)
            raise Retry("first try of the first message fails")
        record(message, session)

    await consumer.start()
    try:
        await memory.publish(
            [make_envelope("accounts.moved", f"{k}-{i}", key=k) for i in range(5) for k in "ab"]
        )
        await wait_for(lambda: count(db) == 10)
    finally:
        await consumer.stop()
    seen = values(db)
    for key in "ab":
        assert [v for v in seen if v.startswith(key)] == [f"{key}-{i}" for i in range(5)]


async def test_stop_gives_back_what_was_not_handled(memory: InMemoryBroker, db: sa.Engine) -> None:
    release = asyncio.Event()
    consumer = Consumer(
        "billing",
        engine=db,
        broker=memory,
        config=ConsumerConfig(concurrency=1, shutdown_timeout=timedelta(milliseconds=50)),
    )

    @consumer.handler("orders.created")
    async def slow(message: IncomingMessage, session: Any) -> None:
        await release.wait()

    await consumer.start()
    await memory.publish([make_envelope("orders.created", i) for i in range(3)])
    await wait_for(lambda: memory.queue_depth(consumer.queue) == 3)
    await asyncio.sleep(0.05)
    await consumer.stop()
    assert memory.queue_depth(consumer.queue) == 3  # still there for the next worker
    assert count(db, inbox_table) == 0


async def test_a_failure_in_a_shared_transaction_reruns_the_batch_one_message_at_a_time(
    memory: InMemoryBroker, db: sa.Engine
) -> None:
    calls: list[str] = []
    consumer = Consumer("billing", engine=db, broker=memory, config=FAST)

    @consumer.handler("orders.created", retry_delay=timedelta(milliseconds=10))
    def handle(message: IncomingMessage, session: Any) -> None:
        calls.append(message.payload)
        record(message, session)
        if message.payload == "bad" and message.attempt == 1:
            raise RuntimeError("poison")

    await consumer.start()
    try:
        payloads = ["a", "b", "bad", "c", "d"]
        await memory.publish([make_envelope("orders.created", p) for p in payloads])
        await wait_for(lambda: count(db) == 5)
    finally:
        await consumer.stop()
    assert sorted(values(db)) == sorted(payloads)  # every effect once
    assert consumer.metrics.batch_fallbacks._value.get() == 1
    # The shared transaction ran all five, the rerun each alone, then the retry of "bad".
    assert calls.count("a") == 2
    assert calls.count("bad") == 3


async def test_batch_size_one_gives_each_message_its_own_transaction(
    memory: InMemoryBroker, db: sa.Engine
) -> None:
    calls: list[str] = []
    config = ConsumerConfig(batch_size=1, retry_tiers=FAST.retry_tiers)
    consumer = Consumer("billing", engine=db, broker=memory, config=config)

    @consumer.handler("orders.created", retry_delay=timedelta(milliseconds=10))
    def handle(message: IncomingMessage, session: Any) -> None:
        calls.append(message.payload)
        record(message, session)
        if message.payload == "bad" and message.attempt == 1:
            raise RuntimeError("poison")

    await consumer.start()
    try:
        await memory.publish([make_envelope("orders.created", p) for p in ["a", "bad", "b"]])
        await wait_for(lambda: count(db) == 3)
    finally:
        await consumer.stop()
    assert sorted(calls) == ["a", "b", "bad", "bad"]  # the failure reran nothing else
    assert consumer.metrics.batch_fallbacks._value.get() == 0


async def test_async_handlers_share_transactions_and_a_failure_reruns_them_alone(
    memory: InMemoryBroker, db: sa.Engine
) -> None:
    calls: list[str] = []
    consumer = Consumer("billing", engine=db, broker=memory, config=FAST)

    @consumer.handler("orders.created", retry_delay=timedelta(milliseconds=10))
    async def handle(message: IncomingMessage, session: Any) -> None:
        calls.append(message.payload)
        await session.execute(
            effects.insert().values(message_id=message.message_id, value=message.payload)
        )
        if message.payload == "bad" and message.attempt == 1:
            raise RuntimeError("poison")

    await consumer.start()
    try:
        payloads = ["a", "b", "bad", "c", "d"]
        await memory.publish([make_envelope("orders.created", p) for p in payloads])
        await wait_for(lambda: count(db) == 5)
    finally:
        await consumer.stop()
    assert sorted(values(db)) == sorted(payloads)  # every effect once
    assert consumer.metrics.batch_fallbacks._value.get() == 1
    assert calls.count("a") == 2  # in the shared transaction, then alone
    assert calls.count("bad") == 3  # shared, alone, retried


async def test_a_batch_of_plain_and_async_handlers_commits_each_kind_once(
    memory: InMemoryBroker, db: sa.Engine
) -> None:
    consumer = Consumer("billing", engine=db, broker=memory, config=FAST)
    consumer.handler("orders.created")(record)

    @consumer.handler("orders.paid")
    async def paid(message: IncomingMessage, session: Any) -> None:
        await session.execute(
            effects.insert().values(message_id=message.message_id, value=str(message.payload))
        )

    await consumer.start()
    try:
        topics = ["orders.created", "orders.paid"] * 4
        first = [make_envelope(t, f"{t}-{i}") for i, t in enumerate(topics)]
        await memory.publish([*first, first[0], first[1]])  # two wire duplicates
        await wait_for(lambda: consumer.metrics.duplicates._value.get() == 2)
    finally:
        await consumer.stop()
    assert sorted(values(db)) == sorted(f"{t}-{i}" for i, t in enumerate(topics))
    assert count(db, inbox_table) == 8
    assert consumer.metrics.batch_fallbacks._value.get() == 0
