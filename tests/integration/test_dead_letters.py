"""A consumer group's dead-letter queue against real RabbitMQ: listing takes nothing away,
replay moves exactly what was asked to the group's queue with a fresh attempt count and only
after the broker confirmed it, purge deletes exactly what was asked, and a message a failing
handler dead-lettered is handled once after the fix and a replay.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import pytest
import sqlalchemy as sa
import structlog
from click.testing import CliRunner, Result
from sqlalchemy.orm import Session

from consumer import Consumer, ConsumerConfig, IncomingMessage
from consumer.deadletters import (
    DeadLetter,
    count_dead_letters,
    dead_letter_queue,
    list_dead_letters,
    main_queue,
    purge_dead_letters,
    replay_dead_letters,
)
from outbox.cli import cli
from outbox.envelope import Envelope, WireFormat
from outbox.errors import BrokerError, ConfigurationError

pytestmark = pytest.mark.integration

GROUP = "billing"


@dataclass
class Queues:
    """A group's main and dead-letter queue of its own, on a prefix no other test uses."""

    amqp_url: str
    prefix: str

    @property
    def dead(self) -> str:
        return dead_letter_queue(GROUP, self.prefix)

    @property
    def main(self) -> str:
        return main_queue(GROUP, self.prefix)

    async def declare(self, queue_type: str = "classic", **dead_arguments: Any) -> None:
        async with await aio_pika.connect(self.amqp_url) as connection:
            channel = await connection.channel()
            arguments = {"x-queue-type": queue_type}
            await channel.declare_queue(self.main, durable=True, arguments=arguments)
            await channel.declare_queue(
                self.dead, durable=True, arguments={**arguments, **dead_arguments}
            )

    async def dead_letter(
        self,
        topic: str = "orders.created",
        *,
        reason: str = "failed 5 times; last error: ValueError: bad order",
        attempt: int = 5,
        key: str | None = "order-7",
        payload: Any = None,
        message_id: str | None = None,
    ) -> str:
        """Put a dead-lettered copy on the dead-letter queue, headers as Consumer writes them."""
        mid = message_id or str(uuid.uuid4())
        headers: dict[str, Any] = {
            "x-outbox-dead-reason": reason,
            "x-outbox-attempt": attempt,
            "x-outbox-topic": topic,
            "x-outbox-group": GROUP,
            "x-outbox-dead-at": "2024-05-01T12:00:00+00:00",
            "x-outbox-last-error": "ValueError: bad order",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        }
        if key is not None:
            headers["x-outbox-key"] = key
        async with await aio_pika.connect(self.amqp_url) as connection:
            channel = await connection.channel(publisher_confirms=True)
            await channel.default_exchange.publish(
                aio_pika.Message(
                    json.dumps(payload if payload is not None else {"order": 7}).encode(),
                    headers=headers,
                    content_type="application/json",
                    message_id=mid,
                    timestamp=datetime(2024, 5, 1, 11, 59, tzinfo=UTC),
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=self.dead,
            )
        return mid

    async def count(self, queue: str) -> int:
        return await count_dead_letters(self.amqp_url, queue)

    async def take_all(self, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Consume (ack) everything in ``queue``: for the final look of a test."""
        taken = []
        async with await aio_pika.connect(self.amqp_url) as connection:
            channel = await connection.channel()
            declared = await channel.get_queue(queue)
            while (message := await declared.get(fail=False)) is not None:
                await message.ack()
                taken.append(message)
        return taken

    async def delete(self, *names: str) -> None:
        async with await aio_pika.connect(self.amqp_url) as connection:
            channel = await connection.channel()
            for name in names:
                await channel.queue_delete(name)


@pytest.fixture
async def queues(amqp_url: str, unique_name: str) -> AsyncIterator[Queues]:
    q = Queues(amqp_url, unique_name)
    yield q
    await q.delete(q.main, q.dead)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """The CLI configures logging onto CliRunner's stream; undo it so later tests log safely."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


async def run(queues: Queues, *args: str, input: str | None = None) -> Result:
    """``outbox --log-format json ARGS`` (in a thread: the command runs its own event loop)."""
    return await asyncio.to_thread(
        CliRunner().invoke,
        cli,
        ["--log-format", "json", *args],
        env={
            "OUTBOX_AMQP_URL": queues.amqp_url,
            "OUTBOX_QUEUE_PREFIX": queues.prefix,
            "OUTBOX_DATABASE_URL": None,
        },
        input=input,
    )


# --- names ------------------------------------------------------------------------------------


def test_queue_names_are_the_consumers() -> None:
    consumer = Consumer(
        "billing", engine=sa.create_engine("sqlite://"), config=ConsumerConfig(queue_prefix="app")
    )
    assert dead_letter_queue("billing", "app") == consumer.dead_queue == "app.billing.dead"
    assert main_queue("billing", "app") == consumer.queue == "app.billing"
    assert dead_letter_queue("billing") == "outbox.billing.dead"
    with pytest.raises(ConfigurationError):
        dead_letter_queue("bad group")
    with pytest.raises(ConfigurationError):
        main_queue("billing", prefix="")


# --- list -------------------------------------------------------------------------------------


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_list_shows_why_each_died_and_takes_nothing_away(
    queues: Queues, queue_type: str
) -> None:
    await queues.declare(queue_type)
    first = await queues.dead_letter(
        reason="failed 3 times; last error: KeyError: 'sku'", attempt=3
    )
    second = await queues.dead_letter("payments.captured", reason="rejected: fraud", key=None)
    third = await queues.dead_letter(reason="malformed: body is not JSON", attempt=1)

    listed = await list_dead_letters(queues.amqp_url, queues.dead)
    again = await list_dead_letters(queues.amqp_url, queues.dead)

    assert listed[0] == DeadLetter(
        message_id=first,
        topic="orders.created",
        key="order-7",
        reason="failed 3 times; last error: KeyError: 'sku'",
        attempts=3,
        group=GROUP,
        dead_at=datetime(2024, 5, 1, 12, tzinfo=UTC),
        size=len(b'{"order": 7}'),
    )
    assert (listed[1].topic, listed[1].key, listed[1].reason) == (
        "payments.captured",
        None,
        "rejected: fraud",
    )
    assert [d.message_id for d in listed] == [first, second, third]
    assert again == listed  # same messages, same order: nothing was taken
    assert await queues.count(queues.dead) == 3


async def test_list_returns_the_head_of_the_queue_up_to_the_limit(queues: Queues) -> None:
    await queues.declare()
    ids = [await queues.dead_letter() for _ in range(5)]

    head = await list_dead_letters(queues.amqp_url, queues.dead, limit=2)

    assert [d.message_id for d in head] == ids[:2]
    assert await queues.count(queues.dead) == 5


async def test_listing_a_quorum_queue_again_and_again_never_reaches_its_delivery_limit(
    queues: Queues,
) -> None:
    # Given a quorum dead-letter queue that drops a message returned more than twice
    # (RabbitMQ 4.0 sets 20 by default) and has no dead-letter exchange to catch it,
    await queues.declare("quorum", **{"x-delivery-limit": 2})
    ids = [await queues.dead_letter() for _ in range(3)]

    # when an operator lists it many times,
    for _ in range(6):
        listed = await list_dead_letters(queues.amqp_url, queues.dead)
        assert sorted(d.message_id or "" for d in listed) == sorted(ids)

    # then every message is still there, exactly once.
    taken = await queues.take_all(queues.dead)
    assert sorted(m.message_id or "" for m in taken) == sorted(ids)
    assert all(m.body == b'{"order": 7}' for m in taken)
    assert all(m.headers["x-outbox-dead-reason"] for m in taken)


async def test_a_message_another_client_holds_is_not_listed_and_not_lost(queues: Queues) -> None:
    await queues.declare()
    held, free = await queues.dead_letter(), await queues.dead_letter()
    async with await aio_pika.connect(queues.amqp_url) as other:
        channel = await other.channel()
        declared = await channel.get_queue(queues.dead)
        taken = await declared.get()  # unacknowledged: held by this other client
        assert taken.message_id == held

        listed = await list_dead_letters(queues.amqp_url, queues.dead)

        assert [d.message_id for d in listed] == [free]
    # the other client went away without acking: the message is back
    assert await queues.count(queues.dead) == 2


async def test_listing_an_empty_queue_returns_nothing(queues: Queues) -> None:
    await queues.declare()
    assert await list_dead_letters(queues.amqp_url, queues.dead) == []


async def test_a_missing_queue_is_a_broker_error_naming_it_without_the_password(
    queues: Queues,
) -> None:
    with pytest.raises(BrokerError, match=f"no queue '{queues.dead}'") as caught:
        await list_dead_letters(queues.amqp_url, queues.dead)
    assert ":guest@" not in str(caught.value)
    assert "guest:***@" in str(caught.value)


async def test_an_unreachable_broker_is_a_broker_error_without_the_password() -> None:
    with pytest.raises(BrokerError, match="cannot connect") as caught:
        await list_dead_letters("amqp://guest:s3cret@127.0.0.1:1/", "outbox.billing.dead")
    assert "s3cret" not in str(caught.value)


# --- replay -----------------------------------------------------------------------------------


async def test_replay_by_id_moves_exactly_that_one_with_a_fresh_attempt_count(
    queues: Queues,
) -> None:
    await queues.declare()
    before = await queues.dead_letter()
    chosen = await queues.dead_letter("payments.captured", key="pay-1", payload={"amount": 5})
    after = await queues.dead_letter()

    count = await replay_dead_letters(
        queues.amqp_url, queues.dead, queues.main, message_ids={chosen.upper()}
    )

    assert count == 1
    [replayed] = await queues.take_all(queues.main)
    assert replayed.message_id == chosen
    assert json.loads(replayed.body) == {"amount": 5}
    assert replayed.content_type == "application/json"
    assert replayed.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert replayed.timestamp == datetime(2024, 5, 1, 11, 59, tzinfo=UTC)
    assert replayed.headers == {
        "x-outbox-attempt": 1,
        "x-outbox-topic": "payments.captured",  # the consumer routes by it
        "x-outbox-key": "pay-1",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    }
    left = await list_dead_letters(queues.amqp_url, queues.dead)
    assert [d.message_id for d in left] == [before, after]


async def test_replay_without_ids_moves_every_one_in_order(queues: Queues) -> None:
    await queues.declare()
    ids = [await queues.dead_letter() for _ in range(5)]

    count = await replay_dead_letters(queues.amqp_url, queues.dead, queues.main)

    assert count == 5
    assert await queues.count(queues.dead) == 0
    assert [m.message_id for m in await queues.take_all(queues.main)] == ids


async def test_replay_with_a_limit_moves_only_the_head(queues: Queues) -> None:
    await queues.declare()
    ids = [await queues.dead_letter() for _ in range(4)]

    count = await replay_dead_letters(queues.amqp_url, queues.dead, queues.main, limit=3)

    assert count == 3
    assert [m.message_id for m in await queues.take_all(queues.main)] == ids[:3]
    assert [d.message_id for d in await list_dead_letters(queues.amqp_url, queues.dead)] == [ids[3]]


async def test_replay_of_an_unknown_id_moves_nothing(queues: Queues) -> None:
    await queues.declare()
    mid = await queues.dead_letter()

    count = await replay_dead_letters(
        queues.amqp_url, queues.dead, queues.main, message_ids=[str(uuid.uuid4())]
    )

    assert count == 0
    assert await queues.count(queues.main) == 0
    assert [d.message_id for d in await list_dead_letters(queues.amqp_url, queues.dead)] == [mid]


async def test_replay_into_a_missing_main_queue_fails_and_keeps_every_dead_letter(
    queues: Queues,
) -> None:
    await queues.declare()
    await queues.dead_letter()
    await queues.delete(queues.main)

    with pytest.raises(BrokerError, match=f"no queue '{queues.main}'"):
        await replay_dead_letters(queues.amqp_url, queues.dead, queues.main)

    assert await queues.count(queues.dead) == 1


async def test_replay_refuses_a_single_string_where_ids_belong(queues: Queues) -> None:
    with pytest.raises(ConfigurationError, match="collection of ids"):
        await replay_dead_letters(
            queues.amqp_url, queues.dead, queues.main, message_ids=str(uuid.uuid4())
        )


async def test_a_malformed_message_without_a_uuid_id_can_be_replayed_by_that_id(
    queues: Queues,
) -> None:
    await queues.declare()
    await queues.dead_letter(message_id="order-7-retry", reason="malformed: id is not a UUID")

    count = await replay_dead_letters(
        queues.amqp_url, queues.dead, queues.main, message_ids=["order-7-retry"]
    )

    assert count == 1
    assert [m.message_id for m in await queues.take_all(queues.main)] == ["order-7-retry"]


# --- purge ------------------------------------------------------------------------------------


async def test_purge_by_id_deletes_exactly_those(queues: Queues) -> None:
    await queues.declare()
    keep = await queues.dead_letter()
    drop = await queues.dead_letter()

    count = await purge_dead_letters(queues.amqp_url, queues.dead, message_ids=[drop])

    assert count == 1
    assert [d.message_id for d in await list_dead_letters(queues.amqp_url, queues.dead)] == [keep]
    assert await queues.count(queues.main) == 0


async def test_purge_all_empties_the_queue(queues: Queues) -> None:
    await queues.declare("quorum")
    for _ in range(3):
        await queues.dead_letter()

    assert await purge_dead_letters(queues.amqp_url, queues.dead, all=True) == 3
    assert await queues.count(queues.dead) == 0


async def test_purge_needs_exactly_one_selector(queues: Queues) -> None:
    await queues.declare()
    await queues.dead_letter()

    with pytest.raises(ConfigurationError, match="say which"):
        await purge_dead_letters(queues.amqp_url, queues.dead)
    with pytest.raises(ConfigurationError, match="not both"):
        await purge_dead_letters(queues.amqp_url, queues.dead, message_ids=[], all=True)
    assert await purge_dead_letters(queues.amqp_url, queues.dead, message_ids=[]) == 0
    assert await queues.count(queues.dead) == 1


# --- CLI --------------------------------------------------------------------------------------


async def test_cli_dead_list_with_group_text_and_json(queues: Queues) -> None:
    await queues.declare()
    first = await queues.dead_letter(reason="failed 5 times; last error: ValueError: bad\nmore")
    second = await queues.dead_letter("payments.captured", key=None, attempt=1)

    text = await run(queues, "dead", "list", "--group", GROUP)
    page = await run(queues, "dead", "list", "--group", GROUP, "--json", "--limit", "1")

    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert lines[0].split() == ["MESSAGE", "ID", "TOPIC", "KEY", "ATTEMPTS", "DIED", "REASON"]
    assert lines[1].split()[:4] == [first, "orders.created", "order-7", "5"]
    assert lines[1].endswith("failed 5 times; last error: ValueError: bad")  # first line only
    assert lines[2].split()[:4] == [second, "payments.captured", "-", "1"]
    assert page.exit_code == 0, page.output
    data = json.loads(page.stdout)
    assert (data["queue"], data["ready"]) == (queues.dead, 2)
    assert [d["message_id"] for d in data["dead_letters"]] == [first]
    assert data["dead_letters"][0]["dead_at"] == "2024-05-01T12:00:00+00:00"
    assert await queues.count(queues.dead) == 2


async def test_cli_dead_list_with_group_says_when_the_queue_is_empty(queues: Queues) -> None:
    await queues.declare()
    result = await run(queues, "dead", "list", "--group", GROUP)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"no dead letters in {queues.dead}\n"


async def test_cli_replay_by_id_needs_no_prompt_and_reports_ids_not_found(queues: Queues) -> None:
    await queues.declare()
    chosen, other = await queues.dead_letter(), await queues.dead_letter()
    missing = str(uuid.uuid4())

    result = await run(queues, "dead", "replay", "--group", GROUP, chosen, missing)

    assert result.exit_code == 0, result.output
    assert f"replayed 1 dead letter(s) from {queues.dead} to {queues.main}" in result.stdout
    assert f"1 of the 2 given id(s) were not in {queues.dead}" in result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    [moved] = [e for e in events if e["event"] == "deadletter.message_replayed"]
    assert (moved["message_id"], moved["topic"]) == (chosen, "orders.created")
    assert [m.message_id for m in await queues.take_all(queues.main)] == [chosen]
    assert [m.message_id for m in await queues.take_all(queues.dead)] == [other]


async def test_cli_replay_all_declined_at_the_prompt_moves_nothing(queues: Queues) -> None:
    await queues.declare()
    await queues.dead_letter()
    await queues.dead_letter()

    result = await run(queues, "dead", "replay", "--group", GROUP, "--all", input="n\n")

    assert result.exit_code != 0  # Abort: `outbox` itself exits 130
    assert f"Replay 2 dead letter(s) from {queues.dead} to {queues.main}?" in result.stdout
    assert await queues.count(queues.dead) == 2
    assert await queues.count(queues.main) == 0


async def test_cli_replay_all_confirmed_moves_every_one(queues: Queues) -> None:
    await queues.declare()
    ids = [await queues.dead_letter() for _ in range(3)]

    result = await run(queues, "dead", "replay", "--group", GROUP, "--all", input="y\n")

    assert result.exit_code == 0, result.output
    assert "replayed 3 dead letter(s)" in result.stdout
    assert [m.message_id for m in await queues.take_all(queues.main)] == ids


async def test_cli_purge_by_id_and_all_with_yes(queues: Queues) -> None:
    await queues.declare()
    drop, keep = await queues.dead_letter(), await queues.dead_letter()

    by_id = await run(queues, "dead", "purge", "--group", GROUP, drop)
    remaining = await queues.count(queues.dead)
    every = await run(queues, "dead", "purge", "--group", GROUP, "--all", "--yes")

    assert by_id.exit_code == 0, by_id.output
    assert f"purged 1 dead letter(s) from {queues.dead}" in by_id.stdout
    assert remaining == 1
    assert every.exit_code == 0, every.output
    assert f"purged 1 dead letter(s) from {queues.dead}" in every.stdout
    assert await queues.count(queues.dead) == 0
    del keep


async def test_cli_purge_all_declined_at_the_prompt_deletes_nothing(queues: Queues) -> None:
    await queues.declare()
    await queues.dead_letter()

    result = await run(queues, "dead", "purge", "--group", GROUP, "--all", input="n\n")

    assert result.exit_code != 0
    assert f"Delete 1 dead letter(s) from {queues.dead} for good?" in result.stdout
    assert await queues.count(queues.dead) == 1


async def test_cli_with_group_on_an_empty_queue_asks_nothing(queues: Queues) -> None:
    await queues.declare()
    result = await run(queues, "dead", "purge", "--group", GROUP, "--all")
    assert result.exit_code == 0, result.output
    assert f"no dead letters in {queues.dead}; nothing to purge" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["dead", "replay", "--group", GROUP], "say which dead letters to replay"),
        (["dead", "purge", "--group", GROUP], "say which dead letters to purge"),
        (["dead", "purge", "--group", GROUP, "--all", str(uuid.uuid4())], "--all selects every"),
        (["dead", "replay", "--group", GROUP, "--topic", "x", "--all"], "--topic applies to"),
        (["dead", "purge", "--group", GROUP, "--older-than", "1d"], "--older-than applies to"),
        (["dead", "list", "--group", GROUP, "--before-id", "5"], "--before-id applies to"),
        (["dead", "list", "--group", "no good"], "Invalid value for '--group'"),
        (["dead", "list", "--amqp-url", "amqp://h/", "--database-url", "sqlite://"], "only with"),
        (["dead", "list"], "Missing option '--database-url'"),
    ],
)
async def test_cli_refuses_bad_usage_with_exit_2_and_changes_nothing(
    queues: Queues, args: list[str], message: str
) -> None:
    await queues.declare()
    await queues.dead_letter()

    result = await run(queues, *args)

    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert await queues.count(queues.dead) == 1


async def test_cli_group_without_a_broker_url_is_refused(queues: Queues) -> None:
    result = await asyncio.to_thread(
        CliRunner().invoke, cli, ["dead", "list", "--group", GROUP], env={"OUTBOX_AMQP_URL": None}
    )
    assert result.exit_code == 2
    assert "--group needs the broker" in result.stderr


# --- end to end: a real consumer dead-letters, the operator fixes and replays -----------------


async def wait_for(predicate: Callable[[], Any], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_a_dead_lettered_message_is_handled_once_after_the_fix_and_a_replay(
    pg_engine: sa.Engine, pg_schema_url: str, amqp_url: str, unique_name: str
) -> None:
    # Given a consumer whose handler fails (a bug) and gives up after one attempt,
    config = ConsumerConfig(
        exchange=unique_name,
        queue_prefix=unique_name,
        queue_type="classic",
        retry_tiers=(timedelta(milliseconds=100),),
        inbox_retention=timedelta(days=30),
        shutdown_timeout=timedelta(seconds=5),
    )
    consumer = Consumer(GROUP, database_url=pg_schema_url, amqp_url=amqp_url, config=config)
    with pg_engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE effect (message_id text, attempt int)"))
    fixed = False

    @consumer.handler("orders.created", max_attempts=1)
    def handle(message: IncomingMessage, session: Session) -> None:
        if not fixed:
            raise LookupError("no price for sku 7")
        session.execute(
            sa.text("INSERT INTO effect VALUES (:id, :attempt)"),
            {"id": message.message_id, "attempt": message.attempt},
        )

    def effects() -> list[tuple[str, int]]:
        with pg_engine.connect() as conn:
            return [
                (r.message_id, r.attempt) for r in conn.execute(sa.text("SELECT * FROM effect"))
            ]

    queues = Queues(amqp_url, unique_name)
    await consumer.start()
    try:
        envelope = Envelope(
            message_id=str(uuid.uuid4()),
            topic="orders.created",
            key="order-7",
            body=b'{"order": 7}',
            content_type="application/json",
            created_at=datetime.now(UTC),
        )
        async with await aio_pika.connect(amqp_url) as connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(unique_name)
            await exchange.publish(
                aio_pika.Message(
                    envelope.body,
                    **envelope.amqp_properties(WireFormat(exchange=unique_name)),
                ),
                routing_key=envelope.topic,
            )
        await wait_for(lambda: consumer.metrics.dead._value.get() == 1)
        [dead] = await list_dead_letters(amqp_url, consumer.dead_queue)
        assert dead.message_id == envelope.message_id
        assert dead.reason == "failed 1 times; last error: LookupError: no price for sku 7"

        # when the bug is fixed and the operator replays the message,
        fixed = True
        replayed = await replay_dead_letters(
            amqp_url, dead_letter_queue(GROUP, unique_name), main_queue(GROUP, unique_name)
        )

        # then the handler takes it with a fresh attempt count, and its effect exists once.
        assert replayed == 1
        await wait_for(lambda: effects() == [(envelope.message_id, 1)])
        await asyncio.sleep(0.5)  # a second effect, if any, would show up by now
        assert effects() == [(envelope.message_id, 1)]
        assert consumer.metrics.dead._value.get() == 1
        assert await queues.count(consumer.dead_queue) == 0
    finally:
        await consumer.stop()
        await queues.delete(
            consumer.queue,
            consumer.dead_queue,
            *(consumer.retry_queue(t) for t in config.retry_tiers),
        )
        async with await aio_pika.connect(amqp_url) as connection:
            channel = await connection.channel()
            await channel.exchange_delete(unique_name)
