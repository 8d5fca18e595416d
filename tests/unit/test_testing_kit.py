"""The test kit (``outbox.testing``) keeps its promises, on SQLite.

``KitBehaviour`` holds the tests that need a database; ``TestKitOnSQLite`` runs
them on a SQLite file, ``tests/integration/test_testing_kit_pg.py`` on a
PostgreSQL schema. The rest checks the parts that need none (crash point
selection, the shuffle), the plugin, and that the documented example passes.
"""

from __future__ import annotations

import ast
import asyncio
import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from unittest.mock import ANY

import pytest
import sqlalchemy as sa
from broker_contract import make_envelope
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import outbox
from consumer import Consumer, ConsumerConfig, IncomingMessage, Reject
from outbox.broker import PublishOutcome
from outbox.engines import make_async_engine
from outbox.errors import ConfigurationError
from outbox.testing import (
    FaultyBroker,
    OutboxHarness,
    capture_published,
    isolated_engine,
    twice_shuffled,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "test_kit_example"

effects = sa.Table(
    "kit_effects",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("message_id", sa.String(36), nullable=False),
    sa.Column("key", sa.String(50)),
    sa.Column("value", sa.Integer),
)


def effect_ids(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(effects.c.message_id)).scalars())


def effect_values(engine: sa.Engine, key: str) -> list[int]:
    with engine.connect() as conn:
        query = sa.select(effects.c.value).where(effects.c.key == key).order_by(effects.c.id)
        return list(conn.execute(query).scalars())


def record(message: IncomingMessage, session: Session) -> None:
    """The well-behaved handler: its only effect is a row in its own session."""
    session.execute(
        effects.insert().values(
            message_id=message.message_id, key=message.key, value=message.payload["i"]
        )
    )


def commit_orders(engine: sa.Engine, count: int, topic: str = "orders.created") -> list[str]:
    ids = []
    for i in range(count):
        with Session(engine) as session, session.begin():
            ids.append(outbox.publish(session, topic, {"i": i}).message_id)
    return ids


def statuses(engine: sa.Engine) -> Counter[str]:
    with engine.connect() as conn:
        return Counter(conn.execute(sa.select(outbox.outbox_table.c.status)).scalars())


class KitBehaviour:
    """The kit's guarantees on whatever database ``kit_engine`` gives (see the subclasses)."""

    @pytest.fixture
    def db(self, kit_engine: sa.Engine) -> sa.Engine:
        effects.metadata.create_all(kit_engine)
        return kit_engine

    @pytest.fixture
    async def harness(self, db: sa.Engine) -> AsyncIterator[OutboxHarness]:
        async with OutboxHarness(db, timeout=30) as harness:
            yield harness

    @pytest.fixture
    def billing(self) -> Consumer:
        # Built as a service would build it for production: the harness runs a copy of it.
        return Consumer("billing", database_url="postgresql://billing@db.invalid/billing")

    # -- idempotency mode ----------------------------------------------------------------

    async def test_a_handler_writing_only_in_its_session_passes_the_idempotency_mode(
        self, harness: OutboxHarness, billing: Consumer, db: sa.Engine
    ) -> None:
        calls: list[str] = []

        @billing.handler("orders.*")
        def on_order(message: IncomingMessage, session: Session) -> None:
            calls.append(message.message_id)
            record(message, session)

        harness.enable_idempotency_mode(seed=11)
        await harness.add_consumer(billing)
        sent = [(await harness.deliver("orders.created", {"i": i})).message_id for i in range(12)]

        outcomes = await harness.drain()

        harness.assert_effects_once(effect_ids(db), expected=sent)
        assert outcomes.handled == 12
        assert outcomes.unhandled == ()
        assert outcomes.retried == 0  # the mode's own rollbacks are not the handler's failures
        assert outcomes.duplicates >= 12  # every message came twice
        # Each handler ran twice: once rolled back, once committed; the second copy was
        # absorbed without a call.
        assert Counter(calls) == dict.fromkeys(sent, 2)

    async def test_an_effect_outside_the_handlers_transaction_is_caught(
        self, harness: OutboxHarness, billing: Consumer, db: sa.Engine
    ) -> None:
        mailed: list[int] = []

        @billing.handler("orders.created")
        def on_order(message: IncomingMessage, session: Session) -> None:
            record(message, session)
            mailed.append(message.payload["i"])  # a mail sent as the handler runs

        harness.enable_idempotency_mode(seed=5)
        await harness.add_consumer(billing)
        for i in range(3):
            await harness.deliver("orders.created", {"i": i})

        await harness.drain()

        harness.assert_effects_once(effect_ids(db))  # the database effects are fine
        with pytest.raises(AssertionError, match="more than once") as caught:
            harness.assert_effects_once(mailed, expected=range(3))
        assert "{0: 2, 1: 2, 2: 2}" in str(caught.value)
        assert "idempotency mode seed: 5" in str(caught.value)

    async def test_without_the_mode_the_same_handler_runs_once_per_message(
        self, harness: OutboxHarness, billing: Consumer
    ) -> None:
        mailed: list[int] = []

        @billing.handler("orders.created")
        def on_order(message: IncomingMessage, session: Session) -> None:
            record(message, session)
            mailed.append(message.payload["i"])

        await harness.add_consumer(billing)
        for i in range(3):
            await harness.deliver("orders.created", {"i": i})

        outcomes = await harness.drain()

        harness.assert_effects_once(mailed, expected=range(3))
        assert (outcomes.handled, outcomes.duplicates, outcomes.seed) == (3, 0, None)

    async def test_the_idempotency_mode_keeps_each_keys_order_for_ordered_handlers(
        self, harness: OutboxHarness, billing: Consumer, db: sa.Engine
    ) -> None:
        billing.handler("accounts.*", ordered=True)(record)
        harness.enable_idempotency_mode(seed=3)
        await harness.add_consumer(billing)
        for i in range(6):
            for key in ("a", "b"):
                await harness.deliver("accounts.moved", {"i": i}, key=key)

        outcomes = await harness.drain()

        assert outcomes.handled == 12
        assert effect_values(db, "a") == effect_values(db, "b") == list(range(6))

    async def test_an_async_handler_gets_the_idempotency_mode_too(
        self, harness: OutboxHarness, billing: Consumer
    ) -> None:
        calls: list[str] = []

        @billing.handler("orders.created")
        async def on_order(message: IncomingMessage, session: AsyncSession) -> None:
            calls.append(message.message_id)
            await session.execute(effects.insert().values(message_id=message.message_id, value=0))

        harness.enable_idempotency_mode(seed=1)
        await harness.add_consumer(billing)
        message = await harness.deliver("orders.created", {})

        outcomes = await harness.drain()

        assert outcomes.handled == 1
        assert calls == [message.message_id] * 2

    # -- crash points --------------------------------------------------------------------

    async def test_a_crash_between_commit_and_publish_loses_nothing(
        self, harness: OutboxHarness, billing: Consumer, db: sa.Engine
    ) -> None:
        billing.handler("orders.created")(record)
        await harness.add_consumer(billing)
        committed = commit_orders(db, 3)
        harness.broker.between_commit_and_publish.arm()

        outcomes = await harness.drain()

        assert outcomes.crashes["between_commit_and_publish"] == 3
        assert outcomes.unhandled == ()
        assert outcomes.wire_duplicates == {}  # the broker never saw the failed attempts
        harness.assert_effects_once(effect_ids(db), expected=committed)
        assert statuses(db) == {"published": 3}

    async def test_a_lost_confirm_makes_a_wire_duplicate_that_the_inbox_absorbs(
        self, harness: OutboxHarness, billing: Consumer, db: sa.Engine
    ) -> None:
        billing.handler("orders.created")(record)
        await harness.add_consumer(billing)
        first, second = commit_orders(db, 2)
        harness.broker.between_publish_and_confirm.arm(times=1)

        outcomes = await harness.drain()

        assert outcomes.crashes["between_publish_and_confirm"] == 1
        [duplicated] = harness.broker.between_publish_and_confirm.message_ids
        assert outcomes.wire_duplicates == {duplicated: 2}
        assert (outcomes.handled, outcomes.duplicates) == (2, 1)
        assert outcomes.unhandled == ()
        harness.assert_effects_once(effect_ids(db), expected=[first, second])

    async def test_a_lost_ack_redelivers_a_message_that_the_inbox_absorbs(
        self, harness: OutboxHarness, billing: Consumer, db: sa.Engine
    ) -> None:
        billing.handler("orders.created")(record)
        await harness.add_consumer(billing)
        harness.broker.between_commit_and_ack.arm(when=lambda m: m.payload["i"] == 1)
        sent = [(await harness.deliver("orders.created", {"i": i})).message_id for i in range(3)]

        outcomes = await harness.drain()

        assert harness.broker.between_commit_and_ack.message_ids == [sent[1]]
        assert (outcomes.handled, outcomes.duplicates) == (3, 1)
        assert outcomes.wire_duplicates == {}  # the broker kept its copy: not a new publish
        assert outcomes.unhandled == ()
        harness.assert_effects_once(effect_ids(db), expected=sent)

    async def test_crash_points_and_the_idempotency_mode_combine(
        self, harness: OutboxHarness, billing: Consumer, db: sa.Engine
    ) -> None:
        billing.handler("orders.created")(record)
        harness.enable_idempotency_mode(seed=8)
        await harness.add_consumer(billing)
        committed = commit_orders(db, 4)
        for point in harness.broker.crash_points:
            point.arm()

        outcomes = await harness.drain()

        assert all(n == 4 for n in outcomes.crashes.values()), outcomes
        assert outcomes.handled == 4
        assert outcomes.unhandled == ()
        harness.assert_effects_once(effect_ids(db), expected=committed)

    # -- outcomes and failures -----------------------------------------------------------

    async def test_outcomes_report_retries_and_dead_letters_with_their_reasons(
        self, harness: OutboxHarness, billing: Consumer
    ) -> None:
        @billing.handler("orders.broken", max_attempts=2, retry_delay=timedelta(seconds=30))
        def broken(message: IncomingMessage, session: Session) -> None:
            raise ValueError("bad order")

        @billing.handler("orders.refused")
        def refused(message: IncomingMessage, session: Session) -> None:
            raise Reject("refused by policy")

        await harness.add_consumer(billing)
        bad = await harness.deliver("orders.broken", {})
        no = await harness.deliver("orders.refused", {})

        outcomes = await harness.drain()  # a 30 s retry delay is compressed to milliseconds

        assert outcomes.retried == 1
        reasons = {d.message_id: d.reason for d in outcomes.dead_letters}
        assert reasons == {
            bad.message_id: "failed 2 times; last error: ValueError: bad order",
            no.message_id: "rejected: refused by policy",
        }
        assert {d.group for d in outcomes.dead_letters} == {"billing"}
        assert outcomes.unhandled == ()  # dead-lettered is settled, not lost
        assert "dead in billing: orders.broken" in str(outcomes)

    async def test_a_message_not_drained_yet_is_reported_unhandled(
        self, harness: OutboxHarness, billing: Consumer
    ) -> None:
        billing.handler("orders.created")(record)
        await harness.add_consumer(billing)
        message = await harness.deliver("orders.created", {"i": 0})

        assert (await harness.outcomes()).unhandled == (message.message_id,)
        assert (await harness.drain()).unhandled == ()

    async def test_drain_fails_the_test_saying_what_is_stuck(self, harness: OutboxHarness) -> None:
        release = asyncio.Event()
        stuck = Consumer(
            "stuck",
            database_url="sqlite:///unused.db",
            config=ConsumerConfig(shutdown_timeout=timedelta(milliseconds=50)),
        )

        @stuck.handler("orders.created")
        async def wait_forever(message: IncomingMessage, session: AsyncSession) -> None:
            await release.wait()

        await harness.add_consumer(stuck)
        await harness.deliver("orders.created", {})

        with pytest.raises(AssertionError, match=r"did not finish within 0.3s") as caught:
            await harness.drain(timeout=0.3)
        assert "queue outbox.stuck: 1 messages (orders.created)" in str(caught.value)

    async def test_drain_relays_what_handlers_publish_to_the_next_group(
        self, harness: OutboxHarness, billing: Consumer, db: sa.Engine
    ) -> None:
        @billing.handler("orders.created")
        def invoice(message: IncomingMessage, session: Session) -> None:
            outbox.publish(session, "invoices.created", {"i": message.payload["i"]})

        mailer = Consumer("mailer", engine=db)
        mailer.handler("invoices.created")(record)
        await harness.add_consumer(billing)
        await harness.add_consumer(mailer)
        commit_orders(db, 2)

        outcomes = await harness.drain()

        assert outcomes.handled == 4  # two orders, then two invoices
        assert len(effect_ids(db)) == 2  # the mailer recorded each invoice once
        assert statuses(db) == {"published": 4}

    async def test_relay_pending_publishes_committed_rows_only(
        self, harness: OutboxHarness, db: sa.Engine
    ) -> None:
        committed = commit_orders(db, 2)
        with Session(db) as session:
            outbox.publish(session, "orders.created", {"i": 99})
            session.rollback()

        published = await harness.relay_pending()

        assert sorted(m.message_id for m in published) == sorted(committed)
        assert await harness.relay_pending() == []  # nothing pending any more

    # -- capture_published ---------------------------------------------------------------

    def test_capture_sees_what_an_uncommitted_session_published(self, db: sa.Engine) -> None:
        with Session(db) as session:
            with capture_published(session) as published:
                outbox.publish(session, "orders.created", {"id": 7}, key="customer-ada")
            message = published.assert_one("orders.created", payload={"id": 7}, key="customer-ada")
            assert message.topic == "orders.created"
            assert session.in_transaction()  # still the caller's to commit or roll back

    def test_capture_through_the_engine_sees_committed_rows_and_not_rolled_back_ones(
        self, db: sa.Engine
    ) -> None:
        with capture_published(db) as published:
            with Session(db) as session, session.begin():
                outbox.publish(session, "orders.created", {"id": 1}, headers={"tenant": "t1"})
            with Session(db) as session:
                outbox.publish(session, "orders.created", {"id": 2})
                session.rollback()
        assert published.topics == ["orders.created"]
        published.assert_one("orders.created", payload={"id": 1}, headers={"tenant": "t1"})
        published.assert_none("orders.cancelled")

    def test_capture_of_a_rolled_back_transaction_reports_nothing(self, db: sa.Engine) -> None:
        with Session(db) as session:
            with capture_published(session) as published:
                outbox.publish(session, "orders.created", {"id": 7})
                session.rollback()
            assert not session.in_transaction()  # reading did not begin one
        published.assert_none()
        assert list(published) == []

    def test_capture_leaves_earlier_rows_out(self, db: sa.Engine) -> None:
        commit_orders(db, 2)
        with Session(db) as session, session.begin(), capture_published(session) as published:
            outbox.publish(session, "orders.paid", {"id": 3})
        assert published.topics == ["orders.paid"]

    def test_a_failed_assertion_lists_what_was_published(self, db: sa.Engine) -> None:
        with Session(db) as session, capture_published(session) as published:
            outbox.publish(session, "orders.created", {"id": 7, "total": 10}, key="k")
            outbox.publish(session, "orders.created", {"id": 8, "total": 10}, key="k")
        with pytest.raises(AssertionError) as caught:
            published.assert_one("orders.created", payload={"id": 9, "total": ANY})
        assert str(caught.value) == (
            "expected one message on 'orders.created' payload={'id': 9, 'total': <ANY>}, "
            "found none.\n"
            "The block published 2:\n"
            "  orders.created key='k' payload={'id': 7, 'total': 10}\n"
            "  orders.created key='k' payload={'id': 8, 'total': 10}"
        )
        with pytest.raises(AssertionError, match="found 2"):
            published.assert_one("orders.created", key="k")
        with pytest.raises(AssertionError, match=r"expected nothing on 'orders\.created'"):
            published.assert_none("orders.created")

    def test_the_result_is_read_after_the_block(self, db: sa.Engine) -> None:
        with capture_published(db) as published, pytest.raises(RuntimeError, match="after"):
            len(published)

    def test_half_messages_count_once_committed(self, db: sa.Engine) -> None:
        ob = outbox.Outbox(db)
        with capture_published(db) as published:
            with ob.prepare("payments.captured", {"id": 1}):
                pass
            with pytest.raises(ValueError, match="declined"), ob.prepare("payments.captured", {}):
                raise ValueError("declined")
        assert [m.payload for m in published] == [{"id": 1}]
        assert published.prepared == []

    async def test_capture_works_with_an_async_session(self, db: sa.Engine) -> None:
        engine = make_async_engine(db.url.render_as_string(hide_password=False))
        try:
            async with AsyncSession(engine) as session:
                async with capture_published(session) as published:
                    await outbox.publish(session, "orders.created", {"id": 1})
                published.assert_one("orders.created", payload={"id": 1})
                await session.rollback()
            async with capture_published(engine) as nothing:
                pass
            nothing.assert_none()
            with pytest.raises(TypeError, match="async with"), capture_published(engine):
                pass
        finally:
            await engine.dispose()


class TestKitOnSQLite(KitBehaviour):
    @pytest.fixture
    def kit_engine(self, tmp_path: Path) -> Iterator[sa.Engine]:
        with isolated_engine(directory=tmp_path) as engine:
            yield engine


# -- no database needed -----------------------------------------------------------------


async def test_a_crash_point_fires_for_the_next_n_chosen_messages_once_each() -> None:
    broker = FaultyBroker()
    await broker.connect()
    await broker.declare_queue("q", ["#"])
    point = broker.between_publish_and_confirm.arm(times=2, when=lambda m: m.payload != "skip")
    a, skip, b, c = (make_envelope("t", p) for p in ("a", "skip", "b", "c"))

    results = await broker.publish([a, skip, a, b, c])

    assert [r.outcome for r in results] == [
        PublishOutcome.FAILED,  # a: chosen
        PublishOutcome.CONFIRMED,  # skip: not chosen by `when`
        PublishOutcome.CONFIRMED,  # a again: a point crashes a message once
        PublishOutcome.FAILED,  # b: the second and last
        PublishOutcome.CONFIRMED,  # c: the point disarmed itself
    ]
    assert point.message_ids == [a.message_id, b.message_id]
    assert (point.fired, point.armed) == (2, False)
    assert broker.queue_depth("q") == 5  # a lost confirm still routed the message


async def test_a_crash_before_publish_routes_nothing_and_a_disarmed_point_nothing_at_all() -> None:
    broker = FaultyBroker()
    await broker.connect()
    await broker.declare_queue("q", ["#"])
    point = broker.between_commit_and_publish.arm()
    envelope = make_envelope("t")

    [lost] = await broker.publish([envelope])
    point.disarm()
    [sent] = await broker.publish([make_envelope("t")])

    assert lost.outcome is PublishOutcome.FAILED
    assert "never reached the broker" in str(lost.reason)
    assert sent.confirmed
    assert broker.queue_depth("q") == 1
    assert envelope.message_id not in broker.publish_counts


async def test_a_lost_ack_puts_the_message_back_as_redelivered() -> None:
    broker = FaultyBroker()
    await broker.connect()
    await broker.declare_queue("q", ["#"])
    broker.between_commit_and_ack.arm(times=1)
    await broker.publish([make_envelope("t", 1)])
    deliveries = broker.consume("q")

    first = await anext(deliveries)
    await first.ack()
    again = await anext(deliveries)
    await again.ack()
    await deliveries.aclose()

    assert again.envelope is first.envelope
    assert again.redelivered
    assert broker.queue_depth("q") == 0


def test_arming_takes_a_positive_count() -> None:
    with pytest.raises(ValueError, match="positive"):
        FaultyBroker().between_commit_and_ack.arm(times=0)


@pytest.mark.parametrize("seed", range(20))
def test_twice_shuffled_sends_each_message_twice_keeping_each_keys_order(seed: int) -> None:
    envelopes = [make_envelope("t", i, key=k) for i in range(5) for k in ("a", "b", None)]

    arranged = twice_shuffled(random.Random(seed), keep_key_order=True)(envelopes)

    assert Counter(e.message_id for e in arranged) == {e.message_id: 2 for e in envelopes}
    by_id = {e.message_id: e for e in envelopes}
    firsts = [by_id[m] for m in dict.fromkeys(e.message_id for e in arranged)]
    for key in ("a", "b"):
        assert [e for e in firsts if e.key == key] == [e for e in envelopes if e.key == key]
    assert twice_shuffled(random.Random(seed), keep_key_order=True)(envelopes) == arranged


def test_twice_shuffled_without_key_order_really_shuffles() -> None:
    envelopes = [make_envelope("t", i, key="same") for i in range(30)]
    arranged = twice_shuffled(random.Random(0), keep_key_order=False)(envelopes)
    firsts = list(dict.fromkeys(e.message_id for e in arranged))
    assert firsts != [e.message_id for e in envelopes]


def test_the_harness_refuses_an_in_memory_sqlite_database() -> None:
    with pytest.raises(ConfigurationError, match="SQLite file"):
        OutboxHarness(sa.create_engine("sqlite://"))
    with (
        pytest.raises(ConfigurationError, match="SQLite file"),
        isolated_engine("sqlite:///:memory:"),
    ):
        pass


def test_isolated_engine_gives_each_caller_a_database_of_its_own() -> None:
    with isolated_engine() as first, isolated_engine() as second:
        with Session(first) as session, session.begin():
            outbox.publish(session, "orders.created", {})
        with second.connect() as conn:
            rows = conn.execute(sa.select(sa.func.count()).select_from(outbox.outbox_table))
            assert rows.scalar_one() == 0
        path = Path(str(first.url.database))
        assert path.exists()
    assert not path.exists()  # the temporary folder went with it


# -- the plugin and the documented example ----------------------------------------------


def run_pytest(*args: str) -> subprocess.CompletedProcess[str]:
    """Run pytest as a user would, so the plugin comes in through its entry point."""
    env = {k: v for k, v in os.environ.items() if k != "OUTBOX_TEST_DATABASE_URL"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
        env=env,
    )


def test_the_documented_example_passes_with_the_seed_given_on_the_command_line() -> None:
    proc = run_pytest(str(EXAMPLE), "--outbox-seed=4242", "-s")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 passed in" in proc.stdout
    assert "idempotency mode, seed 4242" in proc.stdout


def test_the_example_in_the_docs_is_the_example_that_runs() -> None:
    doc = (ROOT / "docs" / "testing.md").read_text()
    for name in ("shop.py", "test_shop.py"):
        lines = (EXAMPLE / name).read_text().splitlines()
        docstring = ast.parse("\n".join(lines)).body[0]
        assert isinstance(docstring, ast.Expr)
        # The doc shows each file from the line after its module docstring.
        body = "\n".join(lines[docstring.end_lineno or 0 :]).strip()
        assert body in doc, f"docs/testing.md does not show {EXAMPLE.name}/{name} as it is"
