"""A batch's one-row INSERTs go out as multi-row INSERTs, with nothing lost or reordered.

The consumer runs on the in-memory broker against a real PostgreSQL schema. A
``FOR EACH STATEMENT`` trigger counts the INSERT statements PostgreSQL received.
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

metadata = sa.MetaData()
orders = sa.Table(
    "co_orders",
    metadata,
    sa.Column("message_id", sa.String(36), primary_key=True),
    sa.Column("payload", sa.String(100)),
)
lines = sa.Table(
    "co_lines",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("order_id", sa.ForeignKey("co_orders.message_id"), nullable=False),
    sa.Column("seen_before", sa.Integer, nullable=False),
)
statements = sa.Table("co_statements", metadata, sa.Column("n", sa.Integer))

ADD_ORDER = sa.text("INSERT INTO co_orders (message_id, payload) VALUES (:id, :p)")

COUNT_STATEMENTS = [
    "CREATE FUNCTION co_count() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN INSERT INTO co_statements VALUES (1); RETURN NULL; END $$",
    "CREATE TRIGGER co_orders_statements AFTER INSERT ON co_orders "
    "FOR EACH STATEMENT EXECUTE FUNCTION co_count()",
]


@pytest.fixture
def db(pg_engine: sa.Engine) -> sa.Engine:
    metadata.create_all(pg_engine)
    with pg_engine.begin() as conn:
        for ddl in COUNT_STATEMENTS:
            conn.execute(sa.text(ddl))
    return pg_engine


def count(engine: sa.Engine, table: sa.Table) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def payloads(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.execute(sa.select(orders.c.payload)).scalars())


def consumer_on(memory: InMemoryBroker, db: sa.Engine, **config: Any) -> Consumer:
    settings = ConsumerConfig(retry_tiers=(timedelta(milliseconds=20),), **config)
    return Consumer("coalesced", engine=db, broker=memory, config=settings)


def add_order(message: IncomingMessage, session: Any) -> Any:
    return session.execute(
        orders.insert().values(message_id=message.message_id, payload=message.payload)
    )


@pytest.mark.parametrize("coalesce", [True, False], ids=["coalesced", "one_by_one"])
async def test_a_batch_of_one_row_inserts_commits_every_row_in_fewer_statements(
    memory: InMemoryBroker, db: sa.Engine, coalesce: bool
) -> None:
    consumer = consumer_on(memory, db, coalesce_inserts=coalesce)
    rowcounts: list[int] = []

    @consumer.handler("orders.*")
    def handle(message: IncomingMessage, session: Any) -> None:
        # text(): SQLAlchemy reports the driver's rowcount for it (a Core insert() says -1).
        result = session.execute(ADD_ORDER, {"id": message.message_id, "p": message.payload})
        rowcounts.append(result.rowcount)

    sent = [f"p{i:02d}" for i in range(40)]
    await consumer.start()
    try:
        await memory.publish([make_envelope("orders.created", p) for p in sent])
        await wait_for(lambda: count(db, inbox_table) == len(sent))
    finally:
        await consumer.stop()
    assert payloads(db) == sent
    assert rowcounts == [1] * len(sent)
    batches = consumer.metrics.batch_size._sum.get()
    assert batches == len(sent)  # every message went through a batch
    inserts = count(db, statements)
    print(f"{len(sent)} one-row INSERTs reached PostgreSQL as {inserts} statement(s)")
    if coalesce:
        assert inserts < len(sent) / 4
    else:
        assert inserts == len(sent)


async def test_named_repeated_and_positional_parameters_keep_their_values_when_coalesced(
    memory: InMemoryBroker, db: sa.Engine
) -> None:
    consumer = consumer_on(memory, db)
    repeated = sa.text(
        "INSERT INTO co_orders (message_id, payload) "
        "VALUES (right(:id, 30) || '-r', :p || '/' || :id)"
    )

    @consumer.handler("orders.*")
    def handle(message: IncomingMessage, session: Any) -> None:
        # Runs of ten messages run the same INSERT: each run can go out as one statement.
        kind = message.payload[0]
        if kind == "a":
            add_order(message, session)
        elif kind == "r":
            session.execute(repeated, {"id": message.message_id, "p": message.payload})
        else:
            cursor = session.connection().connection.driver_connection.cursor()
            cursor.execute(
                "INSERT INTO co_orders (message_id, payload) VALUES (%s, upper(%s))",
                (message.message_id[-30:] + "-p", message.payload),
            )

    sent = [make_envelope("orders.created", f"{k}{i:02d}") for k in "arp" for i in range(10)]
    await consumer.start()
    try:
        await memory.publish(sent)
        await wait_for(lambda: count(db, inbox_table) == len(sent))
    finally:
        await consumer.stop()
    with db.connect() as conn:
        rows = dict(conn.execute(sa.select(orders.c.message_id, orders.c.payload)).all())
    expected: dict[str, str] = {}
    for e in sent:
        mid, p = str(e.message_id), str(e.payload())
        expected[mid if p[0] == "a" else f"{mid[-30:]}-{p[0]}"] = {
            "a": p,
            "r": f"{p}/{mid}",
            "p": p.upper(),
        }[p[0]]
    assert rows == expected
    assert count(db, statements) < len(sent) / 3
    assert consumer.metrics.batch_fallbacks._value.get() == 0


async def test_a_query_sees_the_rows_written_before_it_and_order_is_kept(
    memory: InMemoryBroker, db: sa.Engine
) -> None:
    consumer = consumer_on(memory, db)

    @consumer.handler("orders.*")
    def handle(message: IncomingMessage, session: Any) -> None:
        add_order(message, session)
        # A query: what was held back goes first, so it sees the order row (and the
        # foreign key of the line below is satisfied).
        before = session.execute(sa.select(sa.func.count()).select_from(orders)).scalar_one()
        session.execute(lines.insert().values(order_id=message.message_id, seen_before=before))

    sent = [f"q{i:02d}" for i in range(20)]
    await consumer.start()
    try:
        await memory.publish([make_envelope("orders.created", p) for p in sent])
        await wait_for(lambda: count(db, lines) == len(sent))
    finally:
        await consumer.stop()
    with db.connect() as conn:
        seen = list(conn.execute(sa.select(lines.c.seen_before).order_by(lines.c.id)).scalars())
    assert seen == sorted(set(seen))  # each saw its own row and those written before it
    assert seen[-1] == len(sent)
    assert consumer.metrics.batch_fallbacks._value.get() == 0


async def test_a_held_back_insert_that_fails_reruns_the_batch_and_fails_in_its_handler(
    memory: InMemoryBroker, db: sa.Engine
) -> None:
    consumer = consumer_on(memory, db)
    errors: list[str] = []

    @consumer.handler("orders.*", max_attempts=1)
    def handle(message: IncomingMessage, session: Any) -> None:
        if message.payload == "clash":
            # The same key twice: the second INSERT fails, in the handler when alone.
            try:
                add_order(message, session)
                add_order(message, session)
            except sa.exc.IntegrityError as e:
                errors.append(type(e.orig).__name__)
                raise
        else:
            add_order(message, session)

    sent = ["a", "b", "clash", "c"]
    await consumer.start()
    try:
        await memory.publish([make_envelope("orders.created", p) for p in sent])
        await wait_for(lambda: memory.queue_depth(consumer.dead_queue) == 1)
        await wait_for(lambda: count(db, inbox_table) == 3)
    finally:
        await consumer.stop()
    assert payloads(db) == ["a", "b", "c"]  # each once
    assert consumer.metrics.batch_fallbacks._value.get() == 1
    assert errors == ["UniqueViolation"]  # raised where the handler ran it, on the rerun
    [dead] = memory.messages(consumer.dead_queue)
    assert "IntegrityError" in str(dead.headers["x-outbox-dead-reason"])


async def test_a_send_that_fails_fails_the_batch_even_if_a_handler_swallows_it(
    memory: InMemoryBroker, db: sa.Engine
) -> None:
    consumer = consumer_on(memory, db)

    class Unadaptable:
        """A value psycopg cannot send: the error comes before PostgreSQL sees anything."""

    @consumer.handler("orders.*", max_attempts=1)
    def handle(message: IncomingMessage, session: Any) -> None:
        value = Unadaptable() if message.payload == "odd" else message.payload
        session.execute(ADD_ORDER, {"id": message.message_id, "p": value})
        # A query sends what is held; a handler that swallows what that raises must
        # not make the batch commit without the rows that were held.
        with contextlib.suppress(Exception):
            session.execute(sa.text("SELECT 1"))

    await consumer.start()
    try:
        await memory.publish([make_envelope("orders.created", p) for p in ["a", "odd", "b"]])
        await wait_for(lambda: count(db, inbox_table) == 2)
        await wait_for(lambda: memory.queue_depth(consumer.dead_queue) == 1)
    finally:
        await consumer.stop()
    assert payloads(db) == ["a", "b"]
    assert consumer.metrics.batch_fallbacks._value.get() == 1


async def test_async_handlers_inserts_are_coalesced_and_a_failure_reruns_them_alone(
    memory: InMemoryBroker, db: sa.Engine
) -> None:
    consumer = consumer_on(memory, db)
    rowcounts: list[int] = []
    seen: list[int] = []

    @consumer.handler("orders.*", max_attempts=1)
    async def handle(message: IncomingMessage, session: Any) -> None:
        result = await session.execute(ADD_ORDER, {"id": message.message_id, "p": message.payload})
        rowcounts.append(result.rowcount)
        if message.payload == "clash":
            await session.execute(ADD_ORDER, {"id": message.message_id, "p": "again"})
        if message.payload == "r29":  # a query sends what is held first, so it sees it all
            query = sa.select(sa.func.count()).select_from(orders)
            seen.append((await session.execute(query)).scalar_one())

    sent = [f"r{i:02d}" for i in range(30)]
    await consumer.start()
    try:
        await memory.publish([make_envelope("orders.created", p) for p in sent])
        await wait_for(lambda: count(db, inbox_table) == len(sent))
        await memory.publish([make_envelope("orders.created", p) for p in ["s", "clash", "t"]])
        await wait_for(lambda: memory.queue_depth(consumer.dead_queue) == 1)
        await wait_for(lambda: count(db, inbox_table) == len(sent) + 2)
    finally:
        await consumer.stop()
    assert payloads(db) == sorted([*sent, "s", "t"])
    assert set(rowcounts) == {1}
    assert seen == [len(sent)]
    assert consumer.metrics.batch_fallbacks._value.get() == 1
    inserts = count(db, statements)
    print(f"{len(sent) + 2} rows reached PostgreSQL in {inserts} INSERT statement(s)")
    assert inserts < len(sent) / 2
