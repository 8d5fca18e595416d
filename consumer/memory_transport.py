"""The consumer's transport on the in-process ``InMemoryBroker``.

It declares the same queues as on RabbitMQ (``consumer.amqp_transport``); a delay
queue is played by the broker holding the copy for the delay and then putting it
on the group's queue. Receipts have no path here (the in-memory broker routes
only the main exchange), so a consumer on it sends none.

The broker belongs to the caller, often shared with a relay in the same process:
``close()`` gives back what this consumer took but leaves the broker connected.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from outbox.envelope import Envelope, WireFormat
from outbox.logs import get_logger

if TYPE_CHECKING:
    from collections.abc import Mapping
    from datetime import timedelta

    from consumer.metrics import ConsumerMetrics
    from consumer.receipts import ReceiptPublisher
    from consumer.transport import OnDelivery, Received, Topology
    from outbox.memory_broker import InMemoryBroker, MemoryDelivery

__all__ = ["MemoryTransport"]

_TOPIC = "x-outbox-topic"


class _Delivery:
    """A ``MemoryDelivery`` seen as a received AMQP message."""

    __slots__ = (
        "_delivery",
        "_outstanding",
        "body",
        "content_type",
        "headers",
        "message_id",
        "redelivered",
        "routing_key",
        "timestamp",
    )

    def __init__(
        self, delivery: MemoryDelivery, wire: WireFormat, outstanding: set[_Delivery]
    ) -> None:
        envelope = delivery.envelope
        self._delivery = delivery
        self._outstanding = outstanding
        self.body: bytes = envelope.body
        self.headers: Mapping[str, Any] | None = envelope.amqp_headers(wire)
        self.routing_key: str | None = envelope.topic
        self.message_id: str | None = envelope.message_id
        self.content_type: str | None = envelope.content_type
        self.timestamp: datetime | None = envelope.created_at
        self.redelivered: bool | None = delivery.redelivered

    async def ack(self) -> None:
        self._outstanding.discard(self)
        await self._delivery.ack()

    async def nack(self, *, requeue: bool = True) -> None:
        self._outstanding.discard(self)
        await self._delivery.nack(requeue=requeue)


class MemoryTransport:
    """``Transport`` on an ``InMemoryBroker``; see the module docstring."""

    def __init__(self, broker: InMemoryBroker) -> None:
        self.broker = broker
        self._wire = WireFormat()
        self._delays: dict[str, timedelta] = {}
        self._main = ""  # the group's queue, where delayed copies land
        self._tasks: list[asyncio.Task[None]] = []
        self._outstanding: set[_Delivery] = set()
        self._log = get_logger("outbox.consumer")

    @property
    def connected(self) -> bool:
        """True while the broker is connected."""
        return self.broker.connected

    async def open(self) -> None:
        """Connect the broker if nobody has yet."""
        if not self.broker.connected:
            await self.broker.connect()

    async def declare(self, topology: Topology) -> None:
        """Declare the group's queues; delay queues are kept as delays, not queues."""
        self._wire = WireFormat(exchange=topology.exchange)
        self._delays = dict(topology.retry_queues)
        await self.broker.declare_queue(topology.dead_queue, [])
        await self.broker.declare_queue(topology.queue, topology.patterns)
        if topology.ordered_queue is not None:
            await self.broker.declare_queue(topology.ordered_queue, topology.ordered_patterns)
        self._main = topology.queue

    async def consume(self, queue: str, prefetch: int, callback: OnDelivery) -> None:
        """Feed ``queue``'s deliveries to ``callback`` from a task of its own."""
        self._tasks.append(
            asyncio.create_task(self._feed(queue, prefetch, callback), name=f"consume {queue}")
        )

    async def _feed(self, queue: str, prefetch: int, callback: OnDelivery) -> None:
        try:
            async with contextlib.aclosing(self.broker.consume(queue, prefetch=prefetch)) as feed:
                async for delivery in feed:
                    received = _Delivery(delivery, self._wire, self._outstanding)
                    self._outstanding.add(received)
                    pending = callback(received)
                    if pending is not None:
                        await pending  # one at a time: the handler slots hold the feed back
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._log.error("consumer.consume_failed", queue=queue, error=str(e)[:300])

    async def cancel(self) -> None:
        """Stop feeding; deliveries already taken can still be acked."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()

    async def send(self, raw: Received, queue: str, headers: dict[str, Any]) -> bool:
        """Put a copy on ``queue``, or, for a delay queue, on the main queue after its delay."""
        topic = headers.get(_TOPIC) or raw.routing_key or ""
        copy = Envelope(
            message_id=raw.message_id or "",
            topic=str(topic),
            key=None,  # the key travels in the copied headers
            body=raw.body,
            content_type=raw.content_type or "",
            headers=headers,
            created_at=raw.timestamp or datetime.now(UTC),
        )
        delay = self._delays.get(queue)
        try:
            if delay is None:
                await self.broker.send_to_queue(queue, copy)
            else:
                await self.broker.send_to_queue(self._main, copy, delay=delay.total_seconds())
        except Exception as e:
            self._log.warning("consumer.republish_failed", queue=queue, error=str(e)[:200])
            return False
        return True

    async def receipts(
        self, group: str, exchange: str, metrics: ConsumerMetrics
    ) -> ReceiptPublisher | None:
        """No receipts on the in-memory broker."""
        return None

    async def close(self) -> None:
        """Give back every delivery not acked yet; the broker stays connected."""
        await self.cancel()
        for received in list(self._outstanding):
            with contextlib.suppress(Exception):
                await received.nack(requeue=True)
        self._outstanding.clear()
