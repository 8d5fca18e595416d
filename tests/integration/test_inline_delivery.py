"""Deliveries taken in the aiormq channel's reader (no task each), on a real RabbitMQ."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import aio_pika
import pytest
from waiting import wait_for

from consumer.amqp_delivery import QueueConsumer, read_inline
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
