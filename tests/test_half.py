"""Half messages: prepared rows are never published before their commit, and the relay
resolves those whose producer went quiet (check-back, or PostgreSQL's own answer).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session
from waiting import wait_for

import outbox
from outbox import AsyncOutbox, Outbox, OutboxError, Verdict
from outbox.errors import ConfigurationError, InvalidMessageError
from outbox.memory_broker import InMemoryBroker
from relay import Relay, RelayConfig

FAST = {
    "poll_min": timedelta(milliseconds=1),
    "poll_max": timedelta(milliseconds=20),
    "check_interval": timedelta(milliseconds=50),
    "check_retry_base": timedelta(milliseconds=50),
    "check_retry_max": timedelta(milliseconds=100),
    "check_timeout": timedelta(milliseconds=500),
    "shutdown_timeout": timedelta(seconds=5),
}
LATER = timedelta(hours=1)  # a check time that never comes during a test


@pytest.fixture
def ob(engine: sa.Engine) -> Outbox:
    return Outbox(engine, check_after=LATER)


def relay_for(
    engine: sa.Engine, broker: InMemoryBroker, app: Any = None, **overrides: Any
) -> Relay:
    url = engine.url.render_as_string(hide_password=False)
    return Relay(RelayConfig(database_url=url, **{**FAST, **overrides}), broker=broker, app=app)


def row(engine: sa.Engine, message_id: str) -> sa.Row[Any]:
    t = outbox.outbox_table
    with engine.connect() as conn:
        return conn.execute(
            sa.select(t.c.status, t.c.checks, t.c.last_error, t.c.xid).where(
                t.c.message_id == uuid.UUID(message_id)
            )
        ).one()


async def status_is(engine: sa.Engine, message_id: str, status: str) -> None:
    await wait_for(lambda: row(engine, message_id).status == status)


# -- the producer's side -------------------------------------------------------------


def test_prepared_row_is_committed_on_entry(engine: sa.Engine, ob: Outbox) -> None:
    with ob.prepare("payments.captured", {"id": 1}, key="p1") as half:
        # visible from any other connection already: a crash from here on is recoverable
        assert row(engine, half.message_id).status == "prepared"

    assert row(engine, half.message_id).status == "pending"


def test_an_exception_rolls_back_and_is_reraised(engine: sa.Engine, ob: Outbox) -> None:
    with (
        pytest.raises(RuntimeError, match="card declined"),
        ob.prepare("payments.captured", {}) as half,
    ):
        raise RuntimeError("card declined")

    assert row(engine, half.message_id).status == "discarded"


def test_commit_and_rollback_without_with(engine: sa.Engine, ob: Outbox) -> None:
    yes = ob.prepare("payments.captured", {"n": 1})
    no = ob.prepare("payments.captured", {"n": 2})
    yes.commit()
    yes.commit()  # idempotent
    no.rollback()
    no.rollback()

    assert row(engine, yes.message_id).status == "pending"
    assert row(engine, no.message_id).status == "discarded"
    with pytest.raises(OutboxError, match="already discarded"):
        no.commit()
    with pytest.raises(OutboxError, match="already pending"):
        yes.rollback()


def test_bad_input_stores_nothing(engine: sa.Engine, ob: Outbox) -> None:
    with pytest.raises(InvalidMessageError):
        ob.prepare("bad topic", {})
    with pytest.raises(InvalidMessageError):
        ob.prepare("t.ok", {"x": object()})
    with pytest.raises(ConfigurationError, match="check_after"):
        ob.prepare("t.ok", {}, check_after=timedelta(seconds=-1))
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM outbox_message")).scalar() == 0


def test_checkback_registration_by_topic_pattern_and_catch_all(ob: Outbox) -> None:
    @ob.checkback("payments.captured")
    def exact(message: outbox.Message) -> Verdict:
        return Verdict.COMMIT

    @ob.checkback("payments.*")
    def pattern(message: outbox.Message) -> Verdict:
        return Verdict.COMMIT

    @ob.checkback()
    def everything(message: outbox.Message) -> Verdict:
        return Verdict.UNKNOWN

    assert ob.checkback_for("payments.captured") is exact
    assert ob.checkback_for("payments.refunded") is pattern
    assert ob.checkback_for("orders.created") is everything
    with pytest.raises(ConfigurationError, match="already registered"):
        ob.checkback("payments.*")(pattern)
    with pytest.raises(ConfigurationError, match="malformed"):
        ob.checkback("payments..x")(pattern)


@pytest.mark.unit
def test_bind_needs_postgresql(sqlite_engine: sa.Engine) -> None:
    ob = Outbox(sqlite_engine)
    with sqlite_engine.begin() as conn, pytest.raises(ConfigurationError, match="PostgreSQL"):
        ob.prepare("t.x", {}, bind=conn)


async def test_async_outbox_prepares_commits_and_rolls_back(engine: sa.Engine) -> None:
    url = engine.url.render_as_string(hide_password=False)
    ob = AsyncOutbox(url, check_after=LATER)
    try:
        async with ob.prepare("payments.captured", {"n": 1}) as ok:
            assert await asyncio.to_thread(lambda: row(engine, ok.message_id).status) == "prepared"
        with pytest.raises(ValueError, match="nope"):
            async with ob.prepare("payments.captured", {"n": 2}) as failed:
                raise ValueError("nope")
        manual = await ob.prepare("payments.captured", {"n": 3})
        await manual.rollback()
    finally:
        await ob.dispose()

    states = await asyncio.to_thread(
        lambda: [
            row(engine, m).status for m in (ok.message_id, failed.message_id, manual.message_id)
        ]
    )
    assert states == ["pending", "discarded", "discarded"]


# -- the relay's side ----------------------------------------------------------------


async def test_a_prepared_message_is_never_published_before_its_commit(
    engine: sa.Engine, ob: Outbox, broker: InMemoryBroker
) -> None:
    half = ob.prepare("payments.captured", {"n": 1})

    async with relay_for(engine, broker, app=ob):
        await asyncio.sleep(0.5)
        assert broker.published == []
        await asyncio.to_thread(half.commit)
        await wait_for(lambda: len(broker.published) == 1)

    assert broker.published[0].message_id == half.message_id


@pytest.mark.parametrize(
    ("verdict", "status"), [(Verdict.COMMIT, "published"), (Verdict.ROLLBACK, "discarded")]
)
async def test_checkback_resolves_a_message_its_producer_left_prepared(
    engine: sa.Engine, ob: Outbox, broker: InMemoryBroker, verdict: Verdict, status: str
) -> None:
    asked: list[str] = []

    @ob.checkback("payments.*")
    def check(message: outbox.Message) -> Verdict:
        asked.append(message.message_id)
        assert message.payload == {"amount": 42}
        return verdict

    half = ob.prepare("payments.captured", {"amount": 42}, check_after=timedelta(0))
    # ... and the producer dies here, before commit() or rollback().

    async with relay_for(engine, broker, app=ob):
        await status_is(engine, half.message_id, status)

    assert asked == [half.message_id]
    assert len(broker.published) == (1 if verdict is Verdict.COMMIT else 0)


async def test_per_message_check_after_is_honoured(
    engine: sa.Engine, ob: Outbox, broker: InMemoryBroker
) -> None:
    @ob.checkback()
    def check(message: outbox.Message) -> Verdict:
        return Verdict.COMMIT

    # Timed from the prepare, which the check delay counts from (not from the relay's
    # start, which can itself take a good part of a second on a loaded machine).
    prepared = time.monotonic()
    soon = ob.prepare("payments.captured", {}, check_after=timedelta(seconds=1))
    late = ob.prepare("payments.captured", {})  # the outbox default: an hour

    async with relay_for(engine, broker, app=ob):
        await status_is(engine, soon.message_id, "published")
        assert 0.9 < time.monotonic() - prepared < 5
        assert row(engine, late.message_id).status == "prepared"


@pytest.mark.parametrize(
    "behaviour", ["unknown", "raises", "hangs", "no_checkback", "not_a_verdict"]
)
async def test_unanswered_checkbacks_end_dead_after_max_checks_with_the_reason(
    engine: sa.Engine, ob: Outbox, broker: InMemoryBroker, behaviour: str
) -> None:
    release = threading.Event()
    if behaviour != "no_checkback":

        @ob.checkback()
        def check(message: outbox.Message) -> Any:
            if behaviour == "raises":
                raise ConnectionError("payment API down")
            if behaviour == "hangs":
                release.wait(5)
            if behaviour == "not_a_verdict":
                return "maybe"
            return Verdict.UNKNOWN

    half = ob.prepare("payments.captured", {}, check_after=timedelta(0))
    with Session(engine) as s, s.begin():
        keyless = outbox.publish(s, "orders.created", {}).message_id

    try:
        async with relay_for(engine, broker, app=ob, max_checks=3) as relay:
            # publishing goes on while check-backs fail or hang
            await wait_for(lambda: keyless in broker.publish_counts)
            await status_is(engine, half.message_id, "dead")
            await wait_for(lambda: relay.metrics.prepared_dead._value.get() == 1)
    finally:
        release.set()

    dead = row(engine, half.message_id)
    assert dead.checks == 3
    expected = {
        "unknown": "answered UNKNOWN",
        "raises": "ConnectionError: payment API down",
        "hangs": "timed out",
        "no_checkback": "no check-back registered",
        "not_a_verdict": "returned 'maybe'",
    }[behaviour]
    assert expected in dead.last_error
    assert "gave up after 3 check-backs" in dead.last_error


async def test_async_checkback_is_awaited(
    engine: sa.Engine, ob: Outbox, broker: InMemoryBroker
) -> None:
    @ob.checkback("payments.*")
    async def check(message: outbox.Message) -> Verdict:
        await asyncio.sleep(0.01)
        return Verdict.COMMIT

    half = ob.prepare("payments.captured", {}, check_after=timedelta(0))
    async with relay_for(engine, broker, app=ob):
        await status_is(engine, half.message_id, "published")


# -- PostgreSQL answers by itself ----------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize(("local", "status"), [("commit", "published"), ("rollback", "discarded")])
async def test_postgresql_resolves_a_bound_half_message_without_application_code(
    pg_engine: sa.Engine, broker: InMemoryBroker, local: str, status: str
) -> None:
    ob = Outbox(pg_engine, check_after=timedelta(0))  # no check-back registered at all
    with pg_engine.connect() as conn:
        conn.begin()
        conn.execute(sa.text("CREATE TEMP TABLE payment (id int)"))
        half = ob.prepare("payments.captured", {"n": 1}, bind=conn)
        assert row(pg_engine, half.message_id).xid is not None
        getattr(conn, local)()
    # the producer never called half.commit(): the relay reads the outcome from PostgreSQL

    async with relay_for(pg_engine, broker, app=None):
        await status_is(pg_engine, half.message_id, status)

    assert row(pg_engine, half.message_id).checks == 0  # no check-back was needed


@pytest.mark.integration
async def test_a_bound_transaction_still_running_keeps_its_message_prepared(
    pg_engine: sa.Engine, broker: InMemoryBroker
) -> None:
    ob = Outbox(pg_engine, check_after=timedelta(0))
    with pg_engine.connect() as conn:
        conn.begin()
        with ob.prepare("payments.captured", {}, bind=conn) as half:
            pass  # leaving the block does not commit: the bound transaction decides

        async with relay_for(pg_engine, broker):
            await asyncio.sleep(0.5)
            assert row(pg_engine, half.message_id).status == "prepared"
            await asyncio.to_thread(conn.commit)
            await status_is(pg_engine, half.message_id, "published")
