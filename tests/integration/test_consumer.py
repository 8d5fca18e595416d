"""The consumer against real RabbitMQ and PostgreSQL: exactly one effect per message and group,
retries with backoff, dead letters with their reason, per-key order, bad input survived.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from consumer import Consumer, ConsumerConfig, IncomingMessage, Reject, Retry
from outbox.envelope import Envelope, WireFormat

pytestmark = pytest.mark.integration


class World:
    """A consumer group of its own, an exchange to publish to, and an effects table."""

    def __init__(self, engine: sa.Engine, url: str, amqp_url: str, name: str) -> None:
        self.engine = engine
        self.url = url
        self.amqp_url = amqp_url
        self.name = name
        self.config = ConsumerConfig(
            exchange=name,
            queue_prefix=name,
            queue_type="classic",
            retry_tiers=(timedelta(milliseconds=100), timedelta(milliseconds=300)),
            inbox_retention=timedelta(days=30),
            shutdown_timeout=timedelta(seconds=5),
        )
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE effect (seq bigserial, message_id text, note text)"))
        self.consumers: list[Consumer] = []

    def consumer(self, group: str = "billing") -> Consumer:
        c = Consumer(group, database_url=self.url, amqp_url=self.amqp_url, config=self.config)
        self.consumers.append(c)
        return c

    async def send(
        self, topic: str, payload: Any, *, key: str | None = None, message_id: str | None = None
    ) -> str:
        envelope = Envelope(
            message_id=message_id or str(uuid.uuid4()),
            topic=topic,
            key=key,
            body=json.dumps(payload).encode(),
            content_type="application/json",
            created_at=datetime.now(UTC),
        )
        await self.send_raw(
            envelope.body, topic, **envelope.amqp_properties(WireFormat(exchange=self.name))
        )
        return envelope.message_id

    async def send_raw(self, body: bytes, routing_key: str, **properties: Any) -> None:
        connection = await aio_pika.connect(self.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(self.name)
            await exchange.publish(aio_pika.Message(body, **properties), routing_key=routing_key)

    def effects(self) -> list[tuple[str, str]]:
        with self.engine.connect() as conn:
            return [
                (r.message_id, r.note)
                for r in conn.execute(sa.text("SELECT message_id, note FROM effect ORDER BY seq"))
            ]

    async def dead_letters(self, consumer: Consumer) -> list[aio_pika.abc.AbstractIncomingMessage]:
        connection = await aio_pika.connect(self.amqp_url)
        found = []
        async with connection:
            channel = await connection.channel()
            queue = await channel.get_queue(consumer.dead_queue)
            while (message := await queue.get(fail=False)) is not None:
                await message.ack()
                found.append(message)
        return found

    async def cleanup(self) -> None:
        connection = await aio_pika.connect(self.amqp_url)
        async with connection:
            channel = await connection.channel()
            for c in self.consumers:
                names = [
                    c.queue,
                    c.ordered_queue,
                    c.dead_queue,
                    *(c.retry_queue(t) for t in self.config.retry_tiers),
                ]
                for name in names:
                    await channel.queue_delete(name)
            await channel.exchange_delete(self.name)


@pytest.fixture
async def world(
    pg_engine: sa.Engine, pg_schema_url: str, amqp_url: str, unique_name: str
) -> AsyncIterator[World]:
    w = World(pg_engine, pg_schema_url, amqp_url, unique_name)
    yield w
    for c in w.consumers:
        await c.stop()
    await w.cleanup()


async def wait_for(predicate: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def record(session: Session, message: IncomingMessage, note: str = "") -> None:
    session.execute(
        sa.text("INSERT INTO effect (message_id, note) VALUES (:id, :note)"),
        {"id": message.message_id, "note": note},
    )


async def test_each_message_has_one_effect_even_when_delivered_twice(world: World) -> None:
    consumer = world.consumer()

    @consumer.handler("orders.created")
    def handle(message: IncomingMessage, session: Session) -> None:
        record(session, message, json.dumps(message.payload))

    await consumer.start()
    first = await world.send("orders.created", {"n": 1})
    await world.send("orders.created", {"n": 1}, message_id=first)  # a wire duplicate
    second = await world.send("orders.created", {"n": 2})

    await wait_for(
        lambda: consumer.metrics.duplicates._value.get() == 1 and len(world.effects()) == 2
    )
    assert sorted(world.effects()) == sorted([(first, '{"n": 1}'), (second, '{"n": 2}')])


async def test_two_copies_handled_at_the_same_moment_have_one_effect(world: World) -> None:
    consumer = world.consumer()
    entered = asyncio.Event()

    @consumer.handler("orders.created")
    def handle(message: IncomingMessage, session: Session) -> None:
        record(session, message)
        time.sleep(0.3)  # both copies are in their transactions at once

    await consumer.start()
    mid = str(uuid.uuid4())
    await asyncio.gather(*(world.send("orders.created", {}, message_id=mid) for _ in range(2)))

    await wait_for(lambda: consumer.metrics.duplicates._value.get() == 1)
    assert world.effects() == [(mid, "")]
    del entered


async def test_groups_are_independent(world: World) -> None:
    billing, shipping = world.consumer("billing"), world.consumer("shipping")

    @billing.handler("orders.*")
    def bill(message: IncomingMessage, session: Session) -> None:
        record(session, message, "billing")

    @shipping.handler("orders.created")
    def ship(message: IncomingMessage, session: Session) -> None:
        record(session, message, "shipping")

    await billing.start()
    await shipping.start()
    mid = await world.send("orders.created", {})

    await wait_for(lambda: len(world.effects()) == 2)
    assert sorted(world.effects()) == [(mid, "billing"), (mid, "shipping")]


async def test_a_failing_handler_is_retried_with_its_writes_rolled_back(world: World) -> None:
    consumer = world.consumer()
    attempts: list[int] = []

    @consumer.handler("orders.created", max_attempts=5, retry_delay=timedelta(milliseconds=50))
    def handle(message: IncomingMessage, session: Session) -> None:
        attempts.append(message.attempt)
        record(session, message, f"attempt {message.attempt}")
        if message.attempt < 3:
            raise ConnectionError("warehouse API down")

    await consumer.start()
    mid = await world.send("orders.created", {})

    await wait_for(lambda: len(world.effects()) == 1)
    assert attempts == [1, 2, 3]
    assert world.effects() == [(mid, "attempt 3")]  # the failed attempts' writes rolled back


async def test_always_failing_is_dead_lettered_after_exactly_max_attempts(world: World) -> None:
    consumer = world.consumer()
    calls: list[int] = []

    @consumer.handler("orders.created", max_attempts=3, retry_delay=timedelta(milliseconds=50))
    def handle(message: IncomingMessage, session: Session) -> None:
        calls.append(message.attempt)
        raise ValueError("bad order")

    await consumer.start()
    mid = await world.send("orders.created", {"n": 1}, key="o-1")
    await wait_for(lambda: consumer.metrics.dead._value.get() == 1)

    [dead] = await world.dead_letters(consumer)
    assert calls == [1, 2, 3]
    assert dead.message_id == mid
    assert dead.headers["x-outbox-attempt"] == 3
    assert dead.headers["x-outbox-topic"] == "orders.created"
    assert "failed 3 times; last error: ValueError: bad order" in str(
        dead.headers["x-outbox-dead-reason"]
    )
    assert dead.headers["x-outbox-key"] == "o-1"
    assert json.loads(dead.body) == {"n": 1}
    assert world.effects() == []


async def test_reject_dead_letters_at_once_and_retry_asks_again(world: World) -> None:
    consumer = world.consumer()
    calls: list[tuple[str, int]] = []

    @consumer.handler("orders.*", max_attempts=5)
    def handle(message: IncomingMessage, session: Session) -> None:
        calls.append((message.topic, message.attempt))
        if message.topic == "orders.fraud":
            raise Reject("fraud suspected")
        if message.attempt == 1:
            raise Retry(delay=timedelta(milliseconds=10), reason="stock not synced yet")
        record(session, message)

    await consumer.start()
    await world.send("orders.fraud", {})
    ok = await world.send("orders.created", {})

    await wait_for(lambda: len(world.effects()) == 1 and consumer.metrics.dead._value.get() == 1)
    [dead] = await world.dead_letters(consumer)
    assert dead.headers["x-outbox-dead-reason"] == "rejected: fraud suspected"
    assert sorted(calls) == [("orders.created", 1), ("orders.created", 2), ("orders.fraud", 1)]
    assert world.effects() == [(ok, "")]


async def test_malformed_messages_are_dead_lettered_and_the_worker_goes_on(world: World) -> None:
    consumer = world.consumer()

    @consumer.handler("orders.created")
    def handle(message: IncomingMessage, session: Session) -> None:
        record(session, message)

    await consumer.start()
    await world.send_raw(
        b"{not json",
        "orders.created",
        message_id=str(uuid.uuid4()),
        content_type="application/json",
    )
    await world.send_raw(
        b"{}", "orders.created", message_id="not-a-uuid", content_type="application/json"
    )
    await world.send_raw(b"{}", "orders.created", message_id=str(uuid.uuid4()))  # no content type
    good = await world.send("orders.created", {})

    await wait_for(
        lambda: world.effects() == [(good, "")] and consumer.metrics.dead._value.get() == 3
    )
    reasons = sorted(
        str(m.headers["x-outbox-dead-reason"]) for m in await world.dead_letters(consumer)
    )
    assert all(r.startswith("malformed: ") for r in reasons)
    assert any("not valid UTF-8 JSON" in r for r in reasons)


async def test_async_handlers_get_an_async_session(world: World) -> None:
    consumer = world.consumer()

    @consumer.handler("orders.created")
    async def handle(message: IncomingMessage, session: AsyncSession) -> None:
        await session.execute(
            sa.text("INSERT INTO effect (message_id, note) VALUES (:id, 'async')"),
            {"id": message.message_id},
        )

    await consumer.start()
    mid = await world.send("orders.created", {})
    await wait_for(lambda: world.effects() == [(mid, "async")])


async def test_ordered_handler_keeps_per_key_order_while_a_failing_key_retries_in_place(
    world: World,
) -> None:
    consumer = world.consumer()
    failed_once: set[str] = set()

    @consumer.handler("ledger.*", ordered=True, retry_delay=timedelta(milliseconds=100))
    def handle(message: IncomingMessage, session: Session) -> None:
        n = message.payload["n"]
        if message.key == "k0" and n == 3 and message.message_id not in failed_once:
            failed_once.add(message.message_id)
            raise ConnectionError("transient")
        record(session, message, f"{message.key}:{n}")

    await consumer.start()
    for n in range(10):
        for k in range(4):
            await world.send("ledger.entry", {"n": n}, key=f"k{k}")

    await wait_for(lambda: len(world.effects()) == 40)
    per_key: dict[str, list[int]] = {}
    for _, note in world.effects():
        key, n = note.split(":")
        per_key.setdefault(key, []).append(int(n))
    assert all(order == list(range(10)) for order in per_key.values()), per_key


async def test_a_deleted_queue_is_declared_again_and_consumed(world: World) -> None:
    consumer = world.consumer()

    @consumer.handler("orders.created")
    def handle(message: IncomingMessage, session: Session) -> None:
        record(session, message)

    await consumer.start()
    first = await world.send("orders.created", {"n": 1})
    await wait_for(lambda: len(world.effects()) == 1)
    connection = await aio_pika.connect(world.amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(consumer.queue)  # the broker cancels the worker's consumer
    # The worker declares the queue and its bindings again, and consumes from it; until
    # the binding is back, a message published goes nowhere, so publish until one arrives.
    deadline = time.monotonic() + 20
    while True:
        again = await world.send("orders.created", {"n": 2})
        with contextlib.suppress(AssertionError):
            await wait_for(lambda sent=again: (sent, "") in world.effects(), timeout=1)
            break
        assert time.monotonic() < deadline, "the worker did not consume the queue again"
    assert (first, "") in world.effects()
    # Acks on the same channel stay right after the cancel: a wrong one would close the
    # channel, and its deliveries would come back as duplicates.
    more = [await world.send("orders.created", {"n": i}) for i in range(100)]
    await wait_for(lambda: {m for m, _ in world.effects()} >= set(more))
    await asyncio.sleep(0.5)
    assert consumer.metrics.duplicates._value.get() == 0


async def test_a_backlog_is_acked_in_batches_and_nothing_comes_back(world: World) -> None:
    declaring = world.consumer()
    declaring.handler("orders.created")(lambda message, session: None)
    await declaring.start()  # declares the queues, so the backlog can wait in them
    await declaring.stop()
    sent = [await world.send("orders.created", {"n": i}) for i in range(300)]
    consumer = world.consumer()
    consumer.configure(prefetch=64, batch_size=16)

    @consumer.handler("orders.created")
    def handle(message: IncomingMessage, session: Session) -> None:
        record(session, message)

    await consumer.start()
    await wait_for(lambda: len(world.effects()) == 300)
    await consumer.stop()  # sends the acks still waiting, then closes
    connection = await aio_pika.connect(world.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(consumer.queue, passive=True)
        assert queue.declaration_result.message_count == 0  # every ack reached the broker
    assert sorted(m for m, _ in world.effects()) == sorted(sent)
    assert consumer.metrics.duplicates._value.get() == 0
    samples = consumer.metrics.batch_size.collect()[0].samples
    batches = next(s.value for s in samples if s.name.endswith("_count"))
    assert next(s.value for s in samples if s.name.endswith("_sum")) == 300
    assert batches < 300 / 4  # a backlog is handled many messages per transaction


async def test_a_delivery_waiting_for_a_handler_slot_at_stop_is_given_back(world: World) -> None:
    world.config = dataclasses.replace(world.config, batch_size=1, concurrency=1)
    consumer = world.consumer()
    started = asyncio.Event()
    handled: list[str] = []

    @consumer.handler("orders.*")
    async def slow(message: IncomingMessage, session: AsyncSession) -> None:
        handled.append(message.message_id)
        started.set()
        await asyncio.sleep(0.3)  # ends while stop() waits; the next one waits for the slot

    await consumer.start()
    first = await world.send("orders.created", {})
    await asyncio.wait_for(started.wait(), 10)
    second = await world.send("orders.created", {})
    await asyncio.sleep(0.1)  # delivered, waiting for the one slot
    await consumer.stop()
    assert handled == [first]  # the second got its slot only once stopping had begun

    again = world.consumer()
    again.handler("orders.*")(slow)
    await again.start()
    try:
        await wait_for(lambda: second in handled)  # it was given back, not lost
    finally:
        await again.stop()
