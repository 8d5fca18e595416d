"""A handler that swallows a database error on PostgreSQL: its message is not acked as done.

PostgreSQL answers ``COMMIT`` in a transaction that an error has aborted with a
silent ``ROLLBACK``. Were the consumer to commit and ack, the message would be
gone with nothing it wrote, not even its inbox row, committed. These tests run
the consumer on the in-memory broker against a real PostgreSQL schema.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from broker_contract import make_envelope
from waiting import wait_for

from consumer import Consumer, ConsumerConfig, IncomingMessage
from outbox.memory_broker import InMemoryBroker
from outbox.tables import inbox_table

pytestmark = pytest.mark.integration

FAST = ConsumerConfig(retry_tiers=(timedelta(milliseconds=20),))

effects = sa.Table(
    "guarded_effects",
    sa.MetaData(),
    sa.Column("message_id", sa.String(36), primary_key=True),
    sa.Column("payload", sa.String(100)),
)

BROKEN = sa.text("SELECT 1 / 0")


@pytest.fixture
def db(pg_engine: sa.Engine) -> sa.Engine:
    effects.metadata.create_all(pg_engine)
    return pg_engine


def rows(engine: sa.Engine, table: sa.Table) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def payloads(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.execute(sa.select(effects.c.payload)).scalars())


def insert_effect(message: IncomingMessage) -> Any:
    return effects.insert().values(message_id=message.message_id, payload=message.payload)


@pytest.mark.parametrize("batch_size", [1, 64], ids=["alone", "batched"])
async def test_a_swallowed_database_error_fails_the_message_instead_of_losing_it(
    memory: InMemoryBroker, db: sa.Engine, batch_size: int
) -> None:
    config = ConsumerConfig(batch_size=batch_size, retry_tiers=FAST.retry_tiers)
    consumer = Consumer("guarded", engine=db, broker=memory, config=config)

    @consumer.handler("orders.*", max_attempts=2, retry_delay=timedelta(milliseconds=10))
    def handle(message: IncomingMessage, session: Any) -> None:
        session.execute(insert_effect(message))
        if message.payload == "swallow":
            # The mistake under test: the transaction is aborted all the same.
            with contextlib.suppress(sa.exc.DataError):
                session.execute(BROKEN)

    await consumer.start()
    try:
        sent = ["a", "swallow", "b"]
        await memory.publish([make_envelope("orders.created", p) for p in sent])
        await wait_for(lambda: memory.queue_depth(consumer.dead_queue) == 1)
        await wait_for(lambda: payloads(db) == ["a", "b"])
    finally:
        await consumer.stop()
    [dead] = memory.messages(consumer.dead_queue)
    reason = str(dead.headers["x-outbox-dead-reason"])
    assert "failed 2 times" in reason
    assert "TransactionAbortedError" in reason
    assert "begin_nested()" in reason  # says what to do
    assert rows(db, inbox_table) == 2  # the neighbours committed once; the failed one did not
    assert consumer.metrics.processed._value.get() == 2


async def test_an_async_handler_that_swallows_a_database_error_is_failed_too(
    memory: InMemoryBroker, db: sa.Engine
) -> None:
    consumer = Consumer("guarded", engine=db, broker=memory, config=FAST)

    @consumer.handler("orders.*", max_attempts=1)
    async def handle(message: IncomingMessage, session: Any) -> None:
        await session.execute(insert_effect(message))
        if message.payload == "swallow":
            with contextlib.suppress(sa.exc.DataError):
                await session.execute(BROKEN)

    await consumer.start()
    try:
        await memory.publish([make_envelope("orders.created", p) for p in ["a", "swallow"]])
        await wait_for(lambda: memory.queue_depth(consumer.dead_queue) == 1)
        await wait_for(lambda: payloads(db) == ["a"])
    finally:
        await consumer.stop()
    [dead] = memory.messages(consumer.dead_queue)
    assert "TransactionAbortedError" in str(dead.headers["x-outbox-dead-reason"])
    assert rows(db, inbox_table) == 1


async def test_a_savepoint_around_the_failing_statement_keeps_the_rest(
    memory: InMemoryBroker, db: sa.Engine
) -> None:
    consumer = Consumer("guarded", engine=db, broker=memory, config=FAST)

    @consumer.handler("orders.*", max_attempts=1)
    def handle(message: IncomingMessage, session: Any) -> None:
        session.execute(insert_effect(message))
        try:
            with session.begin_nested():  # what the error message advises
                session.execute(BROKEN)
        except sa.exc.DataError:
            pass

    await consumer.start()
    try:
        await memory.publish([make_envelope("orders.created", p) for p in ["a", "b"]])
        await wait_for(lambda: payloads(db) == ["a", "b"])
        await wait_for(lambda: rows(db, inbox_table) == 2)
    finally:
        await consumer.stop()
    assert memory.queue_depth(consumer.dead_queue) == 0
