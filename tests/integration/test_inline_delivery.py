"""Deliveries taken in the aiormq channel's reader (no task each), on a real RabbitMQ."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pytest
from waiting import wait_for

from consumer.amqp_delivery import QueueConsumer, read_inline
from consumer.amqp_frames import _frame_receiver, read_frames_fast
from consumer.transport import Received

pytestmark = pytest.mark.integration


async def test_deliveries_are_taken_inline_in_order_and_a_failing_callback_stops_nothing(
    amqp_url: str, unique_name: str
) -> None:
    connection = await aio_pika.connect_robust(amqp_url)
    taken: list[int] = []
    finished: list[int] = []

    async def finish(delivery: Received, n: int) -> None:
        await asyncio.sleep(0.01)
        finished.append(n)
        await delivery.ack()

    def take(delivery: Received) -> Awaitable[None] | None:
        n = int(delivery.body)
        taken.append(n)
        if n == 3:
            raise RuntimeError("a callback that fails")  # logged; the reader goes on
        if n % 2 == 0:
            return finish(delivery, n)  # the rest of the job runs as a task
        asyncio.get_running_loop().call_soon(asyncio.ensure_future, delivery.ack())
        return None

    async def declare() -> None:
        return None

    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=50)
        await channel.declare_queue(unique_name)
        consumer = QueueConsumer(channel, unique_name, take, declare)  # type: ignore[arg-type]
        await consumer.start()
        underlay = await channel.get_underlay_channel()
        # The installed aiormq has what the inline path needs (else it falls back, slower).
        assert getattr(underlay, "_outbox_inline", False)
        assert read_inline(underlay)  # idempotent

        publisher = await connection.channel()
        for n in range(20):
            await publisher.default_exchange.publish(
                aio_pika.Message(str(n).encode()), routing_key=unique_name
            )
        await wait_for(lambda: len(taken) == 20)
        await wait_for(lambda: len(finished) == 10)
        assert taken == list(range(20))  # in the order the channel delivered them
        assert sorted(finished) == list(range(0, 20, 2))
        assert not underlay.is_closed
        await consumer.cancel()
        await consumer.drain()
        await asyncio.sleep(0.2)
        declared = await publisher.declare_queue(unique_name, passive=True)
        # Nothing is left ready: every message was taken (3 is still unacked: its callback failed).
        assert declared.declaration_result.message_count == 0
    finally:
        cleanup = await connection.channel()
        await cleanup.queue_delete(unique_name)
        await connection.close()


async def test_the_consumers_connection_decodes_frames_fast_also_after_a_reconnect(
    amqp_url: str, unique_name: str
) -> None:
    connection = await aio_pika.connect_robust(amqp_url, reconnect_interval=0.2)
    received: list[Received] = []
    properties: dict[str, Any] = {
        "headers": {"x-key": "k", "n": 7, "nested": {"list": [1, "two", True]}},
        "content_type": "application/json",
        "content_encoding": "identity",
        "delivery_mode": aio_pika.DeliveryMode.PERSISTENT,
        "priority": 3,
        "correlation_id": "c-1",
        "reply_to": "nowhere",
        "expiration": 60,
        "message_id": "m-1",
        "timestamp": datetime(2026, 11, 21, 12, 30, tzinfo=UTC),
        "type": "orders.created",
        "app_id": "shop ✓",
    }
    # Larger than the negotiated frame_max (128 KiB): it comes in several body frames.
    big = bytes(range(256)) * 1200

    def take(delivery: Received) -> Awaitable[None] | None:
        received.append(delivery)
        return delivery.ack()

    async def declare() -> None:
        return None

    def receiver_of(underlay: Any) -> Any:
        return _frame_receiver(underlay.connection)

    try:
        channel = await connection.channel()
        await channel.declare_queue(unique_name)
        consumer = QueueConsumer(channel, unique_name, take, declare)  # type: ignore[arg-type]
        await consumer.start()
        underlay = await channel.get_underlay_channel()
        first = receiver_of(underlay)
        assert first is not None
        assert first._outbox_fast
        assert read_frames_fast(underlay.connection)  # idempotent

        publisher = await connection.channel()
        await publisher.default_exchange.publish(
            aio_pika.Message(b'{"n": 1}', **properties), routing_key=unique_name
        )
        await publisher.default_exchange.publish(aio_pika.Message(big), routing_key=unique_name)
        await wait_for(lambda: len(received) == 2)
        one, two = received
        assert one.body == b'{"n": 1}'
        assert two.body == big
        assert one.message_id == "m-1"
        assert one.content_type == "application/json"
        assert one.timestamp == properties["timestamp"]
        assert one.routing_key == unique_name
        assert one.headers == properties["headers"]

        # The socket drops: the robust connection reconnects, the consumer consumes again,
        # and the new connection's reader is the fast one too.
        first.reader._transport.abort()
        for _ in range(150):
            await asyncio.sleep(0.1)
            with contextlib.suppress(Exception):
                underlay = await channel.get_underlay_channel()
                if receiver_of(underlay) not in (None, first) and consumer._underlay is underlay:
                    break
        assert receiver_of(underlay)._outbox_fast
        publisher = await connection.channel()
        await publisher.default_exchange.publish(
            aio_pika.Message(b"after", message_id="m-2"), routing_key=unique_name
        )
        await wait_for(lambda: any(r.body == b"after" for r in received), 15)
        await consumer.cancel()
        await consumer.drain()
    finally:
        cleanup = await connection.channel()
        await cleanup.queue_delete(unique_name)
        await connection.close()
