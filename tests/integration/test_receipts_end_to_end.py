"""Receipts end to end on real RabbitMQ and PostgreSQL: a consumer group's outcome flows back
through the relay into ``outbox_receipt``, so ``outbox status`` shows when a message was
published and which groups consumed or dead-lettered it, and when.

Each test has an exchange, consumer groups and a receipts queue of its own (all named
after ``unique_name``) and a PostgreSQL schema of its own; teardown deletes them.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import outbox
from consumer import Consumer, ConsumerConfig, IncomingMessage, Reject
from outbox import admin
from outbox.envelope import Envelope, WireFormat
from outbox.receipts import Receipt, encode_receipt, receipts_exchange, receipts_queue
from outbox.tables import receipt_table
from relay import Relay, RelayConfig

pytestmark = pytest.mark.integration

# Longer than a consumer's receipt flush (100 ms) plus the relay's linger and insert, so a
# receipt that was going to be recorded has been by then.
SETTLE = 1.0


class World:
    """An exchange of its own with consumer groups on it, a relay, and the outbox database."""

    def __init__(self, engine: sa.Engine, url: str, amqp_url: str, name: str) -> None:
        self.engine = engine
        self.amqp_url = amqp_url
        self.name = name
        self.consumer_config = ConsumerConfig(
            exchange=name,
            queue_prefix=name,
            queue_type="classic",
            retry_tiers=(timedelta(milliseconds=100), timedelta(milliseconds=300)),
            inbox_retention=timedelta(days=30),
            shutdown_timeout=timedelta(seconds=5),
        )
        self.relay_config = RelayConfig(
            database_url=url,
            amqp_url=amqp_url,
            exchange=name,
            poll_max=timedelta(milliseconds=20),
            retry_base=timedelta(milliseconds=50),
            retry_max=timedelta(milliseconds=200),
            confirm_timeout=timedelta(seconds=5),
            shutdown_timeout=timedelta(seconds=5),
        )
        self.url = url
        self.consumers: list[Consumer] = []
        self.relay: Relay | None = None

    def consumer(self, group: str, **config: Any) -> Consumer:
        c = Consumer(
            group,
            database_url=self.url,
            amqp_url=self.amqp_url,
            config=replace(self.consumer_config, **config),
        )
        self.consumers.append(c)
        return c

    async def start_relay(self) -> Relay:
        """Start the relay and wait until its receipts queue is bound, so none is returned."""
        self.relay = Relay(self.relay_config)
        await self.relay.start()
        deadline = time.monotonic() + 15
        while not await self.queue_exists(receipts_queue(self.name)):
            assert time.monotonic() < deadline, "the relay did not declare its receipts queue"
            await asyncio.sleep(0.05)
        return self.relay

    def produce(self, topic: str, payload: Any) -> str:
        with Session(self.engine) as s, s.begin():
            return outbox.publish(s, topic, payload).message_id

    def status(self, message_id: str) -> admin.MessageStatusReport:
        report = admin.message_status(self.engine, message_id)
        assert report is not None
        return report

    def receipts(self, message_id: str) -> list[tuple[str, str, str | None]]:
        report = admin.message_status(self.engine, message_id)
        if report is None:
            return []
        return [(r.consumer_group, r.outcome, r.detail) for r in report.receipts]

    def receipt_rows(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.scalar(sa.select(sa.func.count()).select_from(receipt_table)) or 0)

    async def publish_raw(self, exchange: str, routing_key: str, body: bytes, **props: Any) -> None:
        connection = await aio_pika.connect(self.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            target = await channel.get_exchange(exchange)
            await target.publish(aio_pika.Message(body, **props), routing_key=routing_key)

    async def send_copy(self, message_id: str, topic: str, payload: Any) -> None:
        """A wire duplicate of an outbox message, as a relay that published twice would send."""
        envelope = Envelope(
            message_id=message_id,
            topic=topic,
            key=None,
            body=json.dumps(payload).encode(),
            content_type="application/json",
            created_at=datetime.now(UTC),
        )
        await self.publish_raw(
            self.name,
            topic,
            envelope.body,
            **envelope.amqp_properties(WireFormat(exchange=self.name)),
        )

    async def send_receipt_raw(self, body: bytes, **props: Any) -> None:
        await self.publish_raw(receipts_exchange(self.name), "billing", body, **props)

    async def queue_exists(self, queue: str) -> bool:
        return await self.queue_depth(queue) is not None

    async def queue_depth(self, queue: str) -> int | None:
        """Ready messages in ``queue``, or None if it does not exist."""
        connection = await aio_pika.connect(self.amqp_url)
        async with connection:
            channel = await connection.channel()
            try:
                declared = await channel.declare_queue(queue, passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                return None
            return declared.declaration_result.message_count

    async def cleanup(self) -> None:
        for c in self.consumers:
            await c.stop()
        if self.relay is not None:
            await self.relay.stop()
        connection = await aio_pika.connect(self.amqp_url)
        async with connection:
            channel = await connection.channel()
            names = [receipts_queue(self.name)]
            for c in self.consumers:
                names += [c.queue, c.ordered_queue, c.dead_queue]
                names += [c.retry_queue(t) for t in self.consumer_config.retry_tiers]
            for name in names:
                await channel.queue_delete(name)
            await channel.exchange_delete(self.name)
            await channel.exchange_delete(receipts_exchange(self.name))


@pytest.fixture
async def world(
    pg_engine: sa.Engine, pg_schema_url: str, amqp_url: str, unique_name: str
) -> AsyncIterator[World]:
    w = World(pg_engine, pg_schema_url, amqp_url, unique_name)
    yield w
    await w.cleanup()


async def wait_for(predicate: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def value(metric: Any, **labels: str) -> float:
    result: float = (metric.labels(**labels) if labels else metric)._value.get()
    return result


async def test_status_shows_when_a_message_was_published_and_which_groups_consumed_it(
    world: World,
) -> None:
    billing, shipping = world.consumer("billing"), world.consumer("shipping")

    @billing.handler("orders.*")
    def bill(message: IncomingMessage, session: Session) -> None:
        pass

    @shipping.handler("orders.created")
    def ship(message: IncomingMessage, session: Session) -> None:
        pass

    await billing.start()
    await shipping.start()
    relay = await world.start_relay()
    before = datetime.now(UTC)

    mid = world.produce("orders.created", {"order": 7})

    await wait_for(lambda: len(world.receipts(mid)) == 2)
    report = world.status(mid)
    assert report.status is outbox.MessageStatus.PUBLISHED
    assert report.published_at is not None
    assert sorted((r.consumer_group, r.outcome, r.detail) for r in report.receipts) == [
        ("billing", "consumed", None),
        ("shipping", "consumed", None),
    ]
    for r in report.receipts:  # when each group consumed it, by its clock
        assert before - timedelta(seconds=1) <= r.recorded_at <= datetime.now(UTC)
    # the metric is counted just after the insert commits
    await wait_for(lambda: value(relay.metrics.receipts, outcome="consumed") == 2)


async def test_a_dead_lettered_message_shows_a_dead_receipt_with_the_reason(world: World) -> None:
    billing = world.consumer("billing")

    @billing.handler("orders.created")
    def refuse(message: IncomingMessage, session: Session) -> None:
        raise Reject("x")

    await billing.start()
    relay = await world.start_relay()

    mid = world.produce("orders.created", {"order": 8})

    await wait_for(lambda: world.receipts(mid) == [("billing", "dead", "rejected: x")])
    assert world.status(mid).status is outbox.MessageStatus.PUBLISHED
    await wait_for(lambda: value(relay.metrics.receipts, outcome="dead") == 1)


async def test_a_duplicate_delivery_sends_no_second_receipt(world: World) -> None:
    billing = world.consumer("billing")

    @billing.handler("orders.created")
    def bill(message: IncomingMessage, session: Session) -> None:
        pass

    await billing.start()
    await world.start_relay()
    mid = world.produce("orders.created", {"order": 9})
    await wait_for(lambda: world.receipts(mid) == [("billing", "consumed", None)])

    await world.send_copy(mid, "orders.created", {"order": 9})
    await wait_for(lambda: value(billing.metrics.duplicates) == 1)
    await asyncio.sleep(SETTLE)

    assert world.receipts(mid) == [("billing", "consumed", None)]
    assert world.receipt_rows() == 1
    assert value(billing.metrics.receipts_sent) == 1


async def test_a_receipt_delivered_twice_is_recorded_once(world: World) -> None:
    relay = await world.start_relay()
    mid = str(uuid.uuid4())
    body = encode_receipt(
        Receipt(message_id=mid, group="billing", outcome="consumed", at=datetime.now(UTC))
    )
    props = {"content_type": "application/json", "delivery_mode": 2}

    await world.send_receipt_raw(body, message_id=str(uuid.uuid4()), **props)
    await world.send_receipt_raw(body, message_id=str(uuid.uuid4()), **props)

    await wait_for(lambda: value(relay.metrics.receipts, outcome="consumed") == 2)
    assert world.receipts(mid) == [("billing", "consumed", None)]
    assert world.receipt_rows() == 1


async def test_a_malformed_receipt_is_acked_and_ignored_and_recording_goes_on(
    world: World,
) -> None:
    relay = await world.start_relay()
    props = {"content_type": "application/json", "delivery_mode": 2}
    good = str(uuid.uuid4())

    # Unreadable body: the relay acks it and logs why.
    await world.send_receipt_raw(b"{not json", message_id=str(uuid.uuid4()), **props)
    # Not even an envelope (no content type): rejected by the broker adapter, logged.
    await world.send_receipt_raw(b"{}", message_id=str(uuid.uuid4()), delivery_mode=2)
    await world.send_receipt_raw(
        encode_receipt(
            Receipt(message_id=good, group="billing", outcome="consumed", at=datetime.now(UTC))
        ),
        message_id=str(uuid.uuid4()),
        **props,
    )

    await wait_for(lambda: world.receipts(good) == [("billing", "consumed", None)])
    assert value(relay.metrics.receipts, outcome="malformed") == 1
    assert world.receipt_rows() == 1
    await relay.stop()  # anything left unacknowledged would now be back in the queue
    assert await world.queue_depth(receipts_queue(world.name)) == 0


async def test_receipts_sent_while_no_relay_listens_are_counted_as_dropped(world: World) -> None:
    billing = world.consumer("billing")

    @billing.handler("orders.created")
    def bill(message: IncomingMessage, session: Session) -> None:
        pass

    await billing.start()  # no relay yet: nothing is bound to the receipts exchange
    await world.send_copy(str(uuid.uuid4()), "orders.created", {})

    await wait_for(lambda: value(billing.metrics.receipts_dropped, reason="unroutable") == 1)
    assert value(billing.metrics.processed) == 1
    assert value(billing.metrics.receipts_sent) == 0


async def test_a_group_with_receipts_off_sends_none(world: World) -> None:
    billing = world.consumer("billing", receipts=False)

    @billing.handler("orders.created")
    def bill(message: IncomingMessage, session: Session) -> None:
        pass

    await billing.start()
    await world.start_relay()
    mid = world.produce("orders.created", {})

    await wait_for(lambda: world.status(mid).status is outbox.MessageStatus.PUBLISHED)
    await wait_for(lambda: value(billing.metrics.processed) == 1)
    await asyncio.sleep(SETTLE)
    assert world.receipts(mid) == []
