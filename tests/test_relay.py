"""The relay's guarantees, with the in-memory broker, on SQLite and on PostgreSQL.

Invariant 1: every committed row is published at least once, a rolled-back one
never. Invariant 3: per key, publication follows outbox order, and a failing key
holds back only itself. Rows are marked published only after a confirm.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session
from waiting import wait_for

import outbox
from outbox.broker import PublishOutcome, PublishResult
from outbox.engines import make_async_engine
from outbox.errors import ConfigurationError
from outbox.memory_broker import InMemoryBroker
from outbox.tables import receipt_table
from relay import Relay, RelayConfig, UnroutablePolicy
from relay.store import RelayStore

if TYPE_CHECKING:
    from collections.abc import Sequence

    from outbox.envelope import Envelope

FAST = {
    "poll_min": timedelta(milliseconds=1),
    "poll_max": timedelta(milliseconds=20),
    "retry_base": timedelta(milliseconds=20),
    "retry_max": timedelta(milliseconds=100),
    "rebalance_interval": timedelta(milliseconds=200),
    "shutdown_timeout": timedelta(seconds=5),
}


def config_for(engine: sa.Engine, **overrides: Any) -> RelayConfig:
    url = engine.url.render_as_string(hide_password=False)
    return RelayConfig(database_url=url, **{**FAST, **overrides})


def produce(
    engine: sa.Engine,
    count: int,
    *,
    key: Callable[[int], str | None],
    topic: str = "orders.created",
    rollback_every: int = 0,
) -> list[str]:
    committed: list[str] = []
    for i in range(count):
        with Session(engine) as s:
            m = outbox.publish(s, topic, {"i": i}, key=key(i))
            if rollback_every and i % rollback_every == rollback_every - 1:
                s.rollback()
            else:
                s.commit()
                committed.append(m.message_id)
    return committed


def statuses(engine: sa.Engine) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT status, count(*) FROM outbox_message GROUP BY status"))
        return {status: n for status, n in rows}


def relay_for(engine: sa.Engine, broker: InMemoryBroker, **overrides: Any) -> Relay:
    return Relay(config_for(engine, **overrides), broker=broker)


async def test_every_committed_message_is_published_once_and_marked(
    engine: sa.Engine, broker: InMemoryBroker
) -> None:
    committed = produce(engine, 300, key=lambda i: f"k{i % 5}" if i % 2 else None, rollback_every=7)

    async with relay_for(engine, broker):
        await wait_for(lambda: statuses(engine).get("published", 0) == len(committed))

    assert sorted(broker.publish_counts) == sorted(committed)  # nothing lost, no rollback sent
    assert set(broker.publish_counts.values()) == {1}  # no duplicate in the normal path
    assert statuses(engine) == {"published": len(committed)}


async def test_messages_of_a_key_are_published_in_outbox_order(
    engine: sa.Engine, broker: InMemoryBroker
) -> None:
    produce(engine, 400, key=lambda i: f"customer-{i % 3}")

    async with relay_for(engine, broker, key_lookahead=7, batch_size=50):
        await wait_for(lambda: len(broker.published) == 400)

    seen: dict[str, list[int]] = defaultdict(list)
    for envelope in broker.published:
        assert envelope.key is not None
        seen[envelope.key].append(json.loads(envelope.body)["i"])
    for key, order in seen.items():
        assert order == sorted(order), key


async def test_a_nacked_message_is_retried_until_confirmed(
    engine: sa.Engine, broker: InMemoryBroker
) -> None:
    [mid] = produce(engine, 1, key=lambda i: None)
    broker.nack_next(2)

    async with relay_for(engine, broker):
        await wait_for(lambda: statuses(engine) == {"published": 1})

    with engine.connect() as conn:
        attempts, error = conn.execute(
            sa.text("SELECT attempts, last_error FROM outbox_message")
        ).one()
    assert attempts == 3
    assert "nacked" in error
    assert broker.publish_counts[mid] == 1


async def test_a_message_is_dead_after_max_attempts_with_the_reason(
    engine: sa.Engine, broker: InMemoryBroker
) -> None:
    produce(engine, 1, key=lambda i: "k")
    broker.fail_next(50)

    async with relay_for(engine, broker, max_attempts=3) as relay:
        await wait_for(lambda: statuses(engine) == {"dead": 1})
        await wait_for(lambda: relay.metrics.dead._value.get() == 1)

    with engine.connect() as conn:
        attempts, error = conn.execute(
            sa.text("SELECT attempts, last_error FROM outbox_message")
        ).one()
    assert attempts == 3
    assert "gave up after 3 attempts" in error
    assert broker.published == []


async def test_a_retrying_key_holds_back_only_itself(
    engine: sa.Engine, broker: InMemoryBroker
) -> None:
    produce(engine, 1, key=lambda i: "stuck")
    broker.nack_next(1)  # the head of "stuck" fails once, then waits 5 s for its retry
    slow_retry = {"retry_base": timedelta(seconds=5), "retry_max": timedelta(seconds=5)}

    async with relay_for(engine, broker, **slow_retry):
        await wait_for(lambda: statuses(engine) == {"pending": 1} and attempts(engine) == [1])
        await asyncio.to_thread(
            produce, engine, 9, key=lambda i: "stuck" if i < 3 else ("free" if i < 6 else None)
        )
        await wait_for(lambda: len(broker.published) == 6)  # 3 "free" + 3 keyless
        await asyncio.sleep(0.3)
        assert {e.key for e in broker.published} == {"free", None}

    assert statuses(engine) == {"pending": 4, "published": 6}


async def test_a_key_in_backoff_at_the_front_of_the_backlog_holds_back_only_itself(
    engine: sa.Engine, broker: InMemoryBroker
) -> None:
    # Given a key whose head failed and waits 5 s, with more of its messages queued than
    # a batch reads at once, and other keys' messages only behind them
    produce(engine, 1, key=lambda i: "stuck")
    broker.nack_next(1)
    slow_retry = {"retry_base": timedelta(seconds=5), "retry_max": timedelta(seconds=5)}

    async with relay_for(engine, broker, batch_size=2, **slow_retry):
        await wait_for(lambda: statuses(engine) == {"pending": 1} and attempts(engine) == [1])
        await asyncio.to_thread(produce, engine, 30, key=lambda i: "stuck" if i < 25 else "free")

        # Then the other key's messages go out while the stuck key waits
        await wait_for(lambda: len(broker.published) == 5)
        await asyncio.sleep(0.3)
        assert {e.key for e in broker.published} == {"free"}


async def test_a_key_with_a_long_queue_does_not_starve_the_keys_behind_it(
    engine: sa.Engine, broker: InMemoryBroker
) -> None:
    # Given one key with far more messages than a batch, then another key
    produce(engine, 60, key=lambda i: "busy" if i < 59 else "quiet")

    async with relay_for(engine, broker, batch_size=4, key_lookahead=2):
        await wait_for(lambda: len(broker.published) == 60)

    # Then the other key is published in the first rounds, not after the busy one drained
    assert [e.key for e in broker.published].index("quiet") < 8


class _FlakyBroker(InMemoryBroker):
    """Nacks a random tenth of the messages it is asked to publish."""

    def __init__(self) -> None:
        super().__init__()
        self._random = random.Random(7)

    async def publish(self, envelopes: Sequence[Envelope]) -> list[PublishResult]:
        results: list[PublishResult] = []
        for envelope in envelopes:
            if self._random.random() < 0.1:
                results.append(PublishResult(envelope.message_id, PublishOutcome.NACKED, "flaky"))
            else:
                results += await super().publish([envelope])
        return results


async def test_keys_keep_their_order_through_overlapping_rounds_and_random_nacks(
    engine: sa.Engine,
) -> None:
    # Given many keys, batches smaller than the backlog (so rounds overlap), and a broker
    # that refuses a tenth of the messages at random
    produce(engine, 600, key=lambda i: f"k{i % 40}")
    flaky = _FlakyBroker()
    await flaky.connect()
    await flaky.declare_queue("everything", ["#"])

    async with Relay(config_for(engine, batch_size=25, key_lookahead=3), broker=flaky):
        await wait_for(lambda: statuses(engine) == {"published": 600}, timeout=60)

    # Then per key, the broker took the messages in outbox order, each exactly once
    seen: dict[str, list[int]] = defaultdict(list)
    for envelope in flaky.published:
        seen[str(envelope.key)].append(json.loads(envelope.body)["i"])
    assert sum(len(order) for order in seen.values()) == 600
    for key, order in seen.items():
        assert order == sorted(set(order)), key


async def test_headers_and_ids_reach_the_broker_as_committed(
    engine: sa.Engine, broker: InMemoryBroker
) -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    with Session(engine) as s, s.begin():
        plain = outbox.publish(s, "orders.created", {"n": 1}, key="k")
        traced = outbox.publish(
            s, "orders.created", {"n": 2}, headers={"traceparent": traceparent, "n": 7}
        )

    async with relay_for(engine, broker):
        await wait_for(lambda: len(broker.published) == 2)

    got = {e.message_id: e for e in broker.published}
    assert dict(got[plain.message_id].headers) == {}
    assert got[plain.message_id].key == "k"
    assert dict(got[traced.message_id].headers) == {"traceparent": traceparent, "n": 7}
    assert got[traced.message_id].body == b'{"n":2}'


async def test_the_keyed_read_leaves_out_held_keys(engine: sa.Engine) -> None:
    produce(engine, 6, key=lambda i: ("a", "b", "c")[i % 3])
    async_engine = make_async_engine(config_for(engine).database_url)
    try:
        store = RelayStore(async_engine, "reader")
        async with async_engine.connect() as conn:
            rows = await store.fetch_keyed(conn, range(256), 10, 10, held={"b"})
    finally:
        await async_engine.dispose()

    assert [(r.envelope.key, json.loads(r.envelope.body)["i"]) for r in rows] == [
        ("a", 0),
        ("c", 2),
        ("a", 3),
        ("c", 5),
    ]


def attempts(engine: sa.Engine) -> list[int]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT attempts FROM outbox_message")).scalars())


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (UnroutablePolicy.RETRY, "pending"),
        (UnroutablePolicy.DEAD, "dead"),
        (UnroutablePolicy.DROP, "published"),
    ],
)
async def test_unroutable_messages_follow_the_topic_policy(
    engine: sa.Engine, broker: InMemoryBroker, policy: UnroutablePolicy, expected: str
) -> None:
    lonely = InMemoryBroker()  # no queue is bound: every message comes back
    await lonely.connect()
    produce(engine, 2, key=lambda i: None, topic="audit.logged")

    async with Relay(
        config_for(
            engine,
            unroutable={"audit.*": policy},
            retry_base=timedelta(seconds=5),
            retry_max=timedelta(seconds=5),
        ),
        broker=lonely,
    ):
        await wait_for(
            lambda: (
                statuses(engine).get(expected) == 2
                and (policy is UnroutablePolicy.DROP or None not in last_errors(engine))
            )
        )

    if policy is not UnroutablePolicy.DROP:
        assert all("unroutable" in str(e) for e in last_errors(engine))


def last_errors(engine: sa.Engine) -> list[str | None]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT last_error FROM outbox_message")).scalars())


async def test_an_expired_claim_of_a_dead_relay_is_published_again(
    engine: sa.Engine, broker: InMemoryBroker
) -> None:
    [mid] = produce(engine, 1, key=lambda i: None)
    # A relay that claimed the row and died before settling it:
    relay = relay_for(engine, broker)
    async_engine = relay_for(engine, broker)  # only for its config
    from outbox.engines import make_async_engine

    ae = make_async_engine(async_engine.config.database_url)
    dead = RelayStore(ae, "dead-relay")
    assert len(await dead.claim_keyless(10, timedelta(milliseconds=300))) == 1
    await ae.dispose()

    async with relay:
        await asyncio.sleep(0.1)
        assert broker.published == []  # the lease still holds
        await wait_for(lambda: statuses(engine) == {"published": 1})
        if engine.dialect.name == "postgresql":  # where several relays can meet
            await wait_for(lambda: relay.metrics.reclaimed._value.get() == 1)

    assert broker.publish_counts[mid] == 1


async def test_stop_is_prompt_and_leaves_nothing_claimed(
    engine: sa.Engine, broker: InMemoryBroker
) -> None:
    produce(engine, 50, key=lambda i: None)
    relay = relay_for(engine, broker)
    await relay.start()
    await wait_for(lambda: len(broker.published) == 50)
    started = time.monotonic()
    await relay.stop()

    assert time.monotonic() - started < 2
    with engine.connect() as conn:
        assert (
            conn.execute(
                sa.text("SELECT count(*) FROM outbox_message WHERE claimed_by IS NOT NULL")
            ).scalar()
            == 0
        )


async def test_published_rows_are_purged_after_the_retention(
    engine: sa.Engine, broker: InMemoryBroker
) -> None:
    produce(engine, 30, key=lambda i: None)

    async with relay_for(
        engine,
        broker,
        retention=timedelta(milliseconds=200),
        maintenance_interval=timedelta(milliseconds=300),
        purge_batch=7,
    ):
        await wait_for(lambda: len(broker.published) == 30)
        await wait_for(lambda: statuses(engine) == {}, timeout=10)


async def test_receipts_are_purged_after_their_own_longer_retention(
    engine: sa.Engine, broker: InMemoryBroker
) -> None:
    now = datetime.now(UTC)
    rows = [
        {
            "message_id": uuid.uuid4(),
            "consumer_group": "billing",
            "outcome": "consumed",
            "detail": None,
            "recorded_at": now - age,
        }
        for age in [timedelta(days=40)] * 10 + [timedelta(days=3)] * 5
    ]
    with engine.begin() as conn:
        conn.execute(receipt_table.insert(), rows)

    def receipts() -> int:
        with engine.connect() as conn:
            query = sa.select(sa.func.count()).select_from(receipt_table)
            return int(conn.execute(query).scalar_one())

    async with relay_for(
        engine,
        broker,
        retention=timedelta(days=1),  # receipts outlive their messages' rows
        receipt_retention=timedelta(days=30),
        maintenance_interval=timedelta(milliseconds=200),
        purge_batch=3,
    ):
        await wait_for(lambda: receipts() == 5, timeout=10)
        await asyncio.sleep(0.5)  # another maintenance run keeps the recent ones
    assert receipts() == 5


async def test_metrics_and_healthz_are_served(engine: sa.Engine, broker: InMemoryBroker) -> None:
    produce(engine, 5, key=lambda i: None)

    async with relay_for(
        engine, broker, metrics_port=0, gauge_interval=timedelta(milliseconds=100)
    ) as relay:
        await wait_for(lambda: len(broker.published) == 5)
        port = relay.health_port

        def get(path: str) -> tuple[int, str]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()

        status, body = await asyncio.to_thread(get, "/healthz")
        assert status == 200
        assert json.loads(body) == {"database": True, "broker": True}
        await wait_for(
            lambda: "outbox_relay_published_total 5.0" in relay.metrics.render().decode()
        )
        status, metrics = await asyncio.to_thread(get, "/metrics")
        assert status == 200
        assert "outbox_relay_published_total 5.0" in metrics
        assert "outbox_relay_publish_seconds_bucket" in metrics
        await broker.close()
        status, body = await asyncio.to_thread(get, "/healthz")
        assert status == 503
        assert json.loads(body)["broker"] is False


@pytest.mark.integration
async def test_two_relays_share_the_shards_and_publish_each_message_once(
    pg_engine: sa.Engine, broker: InMemoryBroker
) -> None:
    produce(pg_engine, 600, key=lambda i: f"k{i % 40}")
    first = relay_for(pg_engine, broker, relay_id="first")
    second = relay_for(pg_engine, broker, relay_id="second")

    async with first, second:
        await wait_for(lambda: len(broker.published) >= 600)
        await wait_for(
            lambda: (
                first._shards is not None
                and second._shards is not None
                and len(first._shards.owned) == len(second._shards.owned) == 128
            )
        )

    assert len(broker.publish_counts) == 600
    assert set(broker.publish_counts.values()) == {1}
    seen: dict[str, list[int]] = defaultdict(list)
    for envelope in broker.published:
        seen[str(envelope.key)].append(json.loads(envelope.body)["i"])
    assert all(order == sorted(order) for order in seen.values())


@pytest.mark.unit
@pytest.mark.parametrize(
    ("override", "says"),
    [
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"lease": timedelta(seconds=1)}, "lease must be longer than confirm_timeout"),
        ({"poll_min": timedelta(seconds=1), "poll_max": timedelta(milliseconds=1)}, "poll_max"),
        ({"unroutable": {"a..b": UnroutablePolicy.DROP}}, "unroutable"),
        ({"unroutable": {"a.*": "drop"}}, "must be one of"),
        ({"retention": timedelta(0)}, "retention must be a positive duration"),
        ({"database_url": ""}, "database_url is required"),
    ],
)
def test_bad_configuration_is_refused_before_anything_connects(
    override: dict[str, Any], says: str
) -> None:
    config = RelayConfig(**{"database_url": "sqlite://", **override})
    with pytest.raises(ConfigurationError, match=says):
        Relay(config)


@pytest.mark.unit
def test_unroutable_policy_is_chosen_by_the_first_matching_pattern() -> None:
    config = RelayConfig(
        database_url="sqlite://",
        unroutable={"audit.#": UnroutablePolicy.DROP, "#": UnroutablePolicy.DEAD},
    )
    assert config.unroutable_policy("audit.login.failed") is UnroutablePolicy.DROP
    assert config.unroutable_policy("orders.created") is UnroutablePolicy.DEAD
    assert RelayConfig(database_url="sqlite://").unroutable_policy("x") is UnroutablePolicy.RETRY
