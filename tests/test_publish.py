"""The producer guarantees, on PostgreSQL and on SQLite with every kind of SQLAlchemy handle.

Invariant 1 (DESIGN §5): the outbox row commits exactly when the caller's
transaction does. Invariant 5: bad input is refused by ``publish`` itself,
before any SQL, and costs the caller nothing already in the transaction.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

import outbox
from outbox import (
    DatabaseError,
    DuplicateMessageError,
    InvalidMessageError,
    OutboxError,
    Producer,
    ProducerConfig,
    TransactionRequiredError,
)
from outbox.tables import SHARD_COUNT, shard_of

business = sa.MetaData()
orders = sa.Table(
    "orders",
    business,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("customer", sa.String(50), nullable=False),
)


@dataclass
class Backend:
    name: str
    engine: sa.Engine
    async_engine: AsyncEngine

    def rows(self) -> list[sa.Row[Any]]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(outbox.outbox_table).order_by("id")))

    def orders(self) -> list[int]:
        with self.engine.connect() as conn:
            return [r.id for r in conn.execute(sa.select(orders.c.id).order_by("id"))]


@pytest.fixture(
    params=[
        pytest.param("sqlite", marks=pytest.mark.unit),
        pytest.param("postgresql", marks=pytest.mark.integration),
    ]
)
def backend(request: pytest.FixtureRequest) -> Backend:
    engine_fixture = "sqlite_engine" if request.param == "sqlite" else "pg_engine"
    async_fixture = "sqlite_async_engine" if request.param == "sqlite" else "pg_async_engine"
    engine: sa.Engine = request.getfixturevalue(engine_fixture)
    business.create_all(engine)
    return Backend(request.param, engine, request.getfixturevalue(async_fixture))


# Each way of holding a transaction, as a context manager factory that yields
# (handle, publish-callable, write-business-row-callable); the body of the
# `with` runs inside one transaction that commits on normal exit.
HANDLES = ["session", "connection", "async_session", "async_connection"]


async def _in_transaction(
    backend: Backend, kind: str, work: Callable[[Any], Any], *, fail: bool = False
) -> Any:
    """Run ``work(handle)`` in one transaction of ``kind``; raise ``fail`` to roll it back."""
    result: Any = None
    try:
        if kind == "session":
            with Session(backend.engine) as s, s.begin():
                result = work(s)
                if fail:
                    raise RuntimeError("business rule failed")
        elif kind == "connection":
            with backend.engine.begin() as c:
                result = work(c)
                if fail:
                    raise RuntimeError("business rule failed")
        elif kind == "async_session":
            async with AsyncSession(backend.async_engine) as s, s.begin():
                result = await work(s)
                if fail:
                    raise RuntimeError("business rule failed")
        else:
            async with backend.async_engine.begin() as c:
                result = await work(c)
                if fail:
                    raise RuntimeError("business rule failed")
    except RuntimeError as e:
        if str(e) != "business rule failed":
            raise
    return result


def _place_order(order_id: int, **publish_kwargs: Any) -> Callable[[Any], Any]:
    """Work that writes one business row and publishes its event in the same transaction."""
    kwargs = {"key": f"order-{order_id}", **publish_kwargs}

    def work(handle: Any) -> Any:
        if isinstance(handle, AsyncSession | sa.ext.asyncio.AsyncConnection):

            async def run() -> outbox.Message:
                await handle.execute(orders.insert().values(id=order_id, customer="ada"))
                return await outbox.publish(handle, "orders.created", {"id": order_id}, **kwargs)

            return run()
        handle.execute(orders.insert().values(id=order_id, customer="ada"))
        return outbox.publish(handle, "orders.created", {"id": order_id}, **kwargs)

    return work


@pytest.mark.parametrize("kind", HANDLES)
async def test_committed_transaction_holds_business_row_and_message(
    backend: Backend, kind: str
) -> None:
    message = await _in_transaction(backend, kind, _place_order(1, headers={"tenant": "t1"}))

    [row] = backend.rows()
    assert backend.orders() == [1]
    assert str(row.message_id) == message.message_id
    assert (row.topic, row.key, row.status) == ("orders.created", "order-1", "pending")
    assert json.loads(row.payload) == {"id": 1}
    assert row.content_type == "application/json"
    assert row.headers == {"tenant": "t1"}
    assert row.shard == shard_of("order-1")
    assert 0 <= row.shard < SHARD_COUNT
    assert row.attempts == 0
    assert row.checks == 0
    assert row.published_at is None
    assert message.payload == {"id": 1}
    assert message.key == "order-1"
    assert uuid.UUID(message.message_id).version == 7


def test_the_row_is_the_same_whichever_statement_writes_it(backend: Backend) -> None:
    # On PostgreSQL with psycopg publish sends one fixed SQL text; a connection with a
    # schema_translate_map (here an identity one) gets SQLAlchemy's Core INSERT instead.
    headers = {"tenant": "t1", "n": 3, "ok": True}
    with backend.engine.begin() as conn:
        outbox.publish(conn, "orders.created", {"id": 1}, key="k", headers=headers)
    translated = backend.engine.execution_options(schema_translate_map={None: None})
    with translated.begin() as conn:
        outbox.publish(conn, "orders.created", {"id": 1}, key="k", headers=headers)

    fast, core = backend.rows()
    differ = {"id", "message_id", "next_attempt_at", "created_at", "updated_at"}
    same = [c.name for c in outbox.outbox_table.columns if c.name not in differ]
    assert [getattr(fast, c) for c in same] == [getattr(core, c) for c in same]
    assert fast.headers == headers
    assert abs(fast.next_attempt_at - fast.created_at).total_seconds() < 5


@pytest.mark.parametrize("kind", HANDLES)
async def test_rolled_back_transaction_leaves_no_message(backend: Backend, kind: str) -> None:
    await _in_transaction(backend, kind, _place_order(1), fail=True)

    assert backend.orders() == []
    assert backend.rows() == []


def test_publish_never_commits(backend: Backend) -> None:
    with Session(backend.engine) as session:
        outbox.publish(session, "orders.created", {"id": 1})
        # closed without commit: the transaction publish joined ends in a rollback

    assert backend.rows() == []


def test_keyless_message_has_no_shard(backend: Backend) -> None:
    with Session(backend.engine) as s, s.begin():
        outbox.publish(s, "audit.logged", ["a", 1, None, True, 2.5, {"nested": "é"}])

    [row] = backend.rows()
    assert row.key is None
    assert row.shard is None
    assert json.loads(row.payload) == ["a", 1, None, True, 2.5, {"nested": "é"}]


@pytest.mark.parametrize("given", ["str", "uuid"])
def test_explicit_message_id_is_kept(backend: Backend, given: str) -> None:
    mid = uuid.uuid4()
    with Session(backend.engine) as s, s.begin():
        message = outbox.publish(s, "t.x", {}, message_id=str(mid) if given == "str" else mid)

    assert message.message_id == str(mid)
    assert [r.message_id for r in backend.rows()] == [mid]


BAD_INPUTS: list[tuple[str, dict[str, Any], str]] = [
    ("empty topic", {"topic": ""}, "must not be empty"),
    ("topic with space", {"topic": "orders created"}, "malformed"),
    ("topic with empty word", {"topic": "orders..created"}, "malformed"),
    ("wildcard topic", {"topic": "orders.*"}, "malformed"),
    ("topic not str", {"topic": 42}, "must be a str"),
    ("topic too long", {"topic": "a" * 256}, "longer than 255"),
    ("payload not JSON", {"payload": {"when": object()}}, "not JSON-serialisable"),
    ("payload with set", {"payload": {1, 2}}, "not JSON-serialisable"),
    ("payload NaN", {"payload": float("nan")}, "not JSON-serialisable"),
    ("header value list", {"headers": {"a": [1]}}, "header 'a' has a list value"),
    ("header name not str", {"headers": {1: "x"}}, "header names must be non-empty str"),
    ("header name empty", {"headers": {"": "x"}}, "header names must be non-empty str"),
    ("reserved header", {"headers": {"x-outbox-key": "k"}}, "reserved"),
    ("headers not mapping", {"headers": ["a"]}, "headers must be a mapping"),
    ("key not str", {"key": 7}, "key must be a str"),
    ("empty key", {"key": ""}, "key must be 1 to 255"),
    ("key too long", {"key": "k" * 256}, "key must be 1 to 255"),
    ("message_id not uuid", {"message_id": "order-1"}, "is not a UUID"),
    ("message_id wrong type", {"message_id": 12}, "must be a uuid.UUID"),
]


@pytest.mark.parametrize(("case", "override", "says"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_refused_before_any_sql_and_costs_the_transaction_nothing(
    backend: Backend, case: str, override: dict[str, Any], says: str
) -> None:
    args: dict[str, Any] = {"topic": "orders.created", "payload": {"id": 1}, **override}
    with Session(backend.engine) as s, s.begin():
        s.execute(orders.insert().values(id=1, customer="ada"))
        with pytest.raises(InvalidMessageError, match=says) as raised:
            outbox.publish(s, args.pop("topic"), args.pop("payload"), **args)
        # the caller may handle the error and go on: its transaction is intact

    assert isinstance(raised.value, OutboxError)
    assert backend.orders() == [1]
    assert backend.rows() == []


def test_payload_over_the_configured_limit_is_refused(backend: Backend) -> None:
    producer = Producer(ProducerConfig(max_payload_bytes=100))
    with Session(backend.engine) as s, s.begin():
        producer.publish(s, "t.small", "x" * 90)
        with pytest.raises(InvalidMessageError, match="over the limit of 100"):
            producer.publish(s, "t.big", "x" * 200)

    assert [r.topic for r in backend.rows()] == ["t.small"]


@pytest.mark.parametrize("kind", HANDLES)
async def test_duplicate_message_id_fails_the_whole_transaction(
    backend: Backend, kind: str
) -> None:
    mid = str(uuid.uuid4())
    await _in_transaction(backend, kind, _place_order(1, message_id=mid))

    with pytest.raises(DuplicateMessageError, match=mid) as raised:
        await _in_transaction(backend, kind, _place_order(2, message_id=mid))

    assert raised.value.message_id == mid
    assert backend.orders() == [1]  # order 2 was in the failed transaction
    assert len(backend.rows()) == 1


def test_duplicate_caught_by_the_caller_still_commits_nothing(backend: Backend) -> None:
    mid = uuid.uuid4()
    with Session(backend.engine) as s, s.begin():
        outbox.publish(s, "t.x", {}, message_id=mid)

    with Session(backend.engine) as s:
        s.execute(orders.insert().values(id=2, customer="bob"))
        with pytest.raises(DuplicateMessageError):
            outbox.publish(s, "t.x", {}, message_id=mid)
        s.commit()  # the caller ignores the error: still nothing of that unit of work lands

    assert backend.orders() == []
    assert len(backend.rows()) == 1


def test_autocommit_connection_is_refused(backend: Backend) -> None:
    autocommit = backend.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    with autocommit as conn, pytest.raises(TransactionRequiredError, match="AUTOCOMMIT"):
        outbox.publish(conn, "t.x", {})

    assert backend.rows() == []


def test_wrong_handle_type_is_refused(backend: Backend) -> None:
    with pytest.raises(TypeError, match="needs a SQLAlchemy Session"):
        outbox.publish(backend.engine, "t.x", {})  # type: ignore[call-overload]


def test_missing_tables_say_how_to_create_them(backend: Backend) -> None:
    outbox.metadata.drop_all(backend.engine)
    with Session(backend.engine) as s, pytest.raises(DatabaseError, match="outbox db upgrade"):
        outbox.publish(s, "t.x", {})


def test_concurrent_producers_lose_and_duplicate_nothing(backend: Backend) -> None:
    """16 producers, each committing most transactions and rolling some back."""
    producers, per_producer = 16, 25
    committed: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    start = threading.Barrier(producers)

    def produce(p: int) -> None:
        try:
            start.wait()
            for i in range(per_producer):
                order_id = p * 1000 + i
                with Session(backend.engine) as s:
                    s.execute(orders.insert().values(id=order_id, customer=f"c{p}"))
                    m = outbox.publish(s, "orders.created", {"id": order_id}, key=f"c{p}")
                    if i % 5 == 4:
                        s.rollback()
                        continue
                    s.commit()
                with lock:
                    committed.append(m.message_id)
        except BaseException as e:  # reported below: a thread's failure must fail the test
            errors.append(e)

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    stored = [str(r.message_id) for r in backend.rows()]
    expected = producers * per_producer * 4 // 5
    assert len(committed) == expected
    assert len(stored) == len(set(stored)) == expected  # nothing duplicated
    assert set(stored) == set(committed)  # nothing lost, nothing rolled back slipped in
    assert len(backend.orders()) == expected
