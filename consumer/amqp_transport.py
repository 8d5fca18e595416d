"""The consumer's transport on RabbitMQ (aio-pika, robust connection, confirmed copies).

Per group it declares:

- ``<prefix>.<group>``: the group's queue, bound to the exchange by every
  unordered handler's topic pattern;
- ``<prefix>.<group>.ordered``: for ordered handlers, a single-active-consumer
  queue: one worker process consumes it at a time, and another takes over when
  it dies;
- ``<prefix>.<group>.retry.<tier>``: delay queues (classic, message TTL) that
  dead-letter back into the group's queue when the delay has passed;
- ``<prefix>.<group>.dead``: the dead-letter queue, for an operator.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import aio_pika

from consumer.amqp_delivery import QueueConsumer
from consumer.receipts import ReceiptPublisher
from outbox.errors import ConfigurationError
from outbox.logs import get_logger, redact_url

if TYPE_CHECKING:
    from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection

    from consumer.metrics import ConsumerMetrics
    from consumer.transport import OnDelivery, Received, Topology

__all__ = ["AmqpTransport"]

CONFIRM_TIMEOUT = 15.0
"""Seconds to wait for the broker to confirm a retry or dead-letter copy."""


class AmqpTransport:
    """``Transport`` on RabbitMQ; see the module docstring for the queues it declares."""

    def __init__(self, url: str, *, name: str) -> None:
        self.url = url
        self._name = name
        self._connection: AbstractRobustConnection | None = None
        self._publisher: AbstractRobustChannel | None = None
        self._channels: dict[str, AbstractRobustChannel] = {}
        self._consuming: list[QueueConsumer] = []
        self._arguments: dict[str, dict[str, Any]] = {}
        self._topology: Topology | None = None
        self._log = get_logger("outbox.consumer")

    @property
    def connected(self) -> bool:
        """True while the robust connection is open."""
        return self._connection is not None and not self._connection.is_closed

    async def open(self) -> None:
        """Connect (robust: it reconnects by itself) and open the confirm channel for copies."""
        try:
            self._connection = await aio_pika.connect_robust(
                self.url, client_properties={"connection_name": self._name}
            )
        except Exception as e:
            raise ConfigurationError(
                f"cannot connect to RabbitMQ at {redact_url(self.url)}: {e}"
            ) from None
        self._publisher = await self._connection.channel(publisher_confirms=True)

    async def declare(self, topology: Topology) -> None:
        """Declare the exchange, queues and bindings; idempotent."""
        assert self._connection is not None
        self._topology = topology
        channel = await self._connection.channel()
        try:
            exchange = await channel.declare_exchange(
                topology.exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            durable = {"x-queue-type": topology.queue_type}
            await channel.declare_queue(topology.dead_queue, durable=True, arguments=durable)
            for name, delay in topology.retry_queues.items():
                await channel.declare_queue(
                    name,
                    durable=True,
                    arguments={
                        "x-queue-type": "classic",
                        "x-message-ttl": int(delay.total_seconds() * 1000),
                        # Expired retries go straight back to the group's queue, not through
                        # the topic exchange, so other groups never see them again.
                        "x-dead-letter-exchange": "",
                        "x-dead-letter-routing-key": topology.queue,
                    },
                )
            self._arguments[topology.queue] = durable
            main = await channel.declare_queue(topology.queue, durable=True, arguments=durable)
            for pattern in topology.patterns:
                await main.bind(exchange, pattern)
            if topology.ordered_queue is not None:
                single = {**durable, "x-single-active-consumer": True}
                self._arguments[topology.ordered_queue] = single
                ordered = await channel.declare_queue(
                    topology.ordered_queue, durable=True, arguments=single
                )
                for pattern in topology.ordered_patterns:
                    await ordered.bind(exchange, pattern)
        finally:
            await channel.close()

    async def consume(self, queue: str, prefetch: int, callback: OnDelivery) -> None:
        """Consume ``queue`` on a channel of its own, so each queue has its own prefetch window.

        The queue is declared again on that channel (same arguments, so a no-op on
        the broker): a robust channel declares it again after a reconnect, and the
        ``QueueConsumer`` (``consumer.amqp_delivery``) then consumes again.
        """
        assert self._connection is not None
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        await channel.declare_queue(queue, durable=True, arguments=self._arguments[queue])
        consumer = QueueConsumer(channel, queue, callback, self._declare_again)
        await consumer.start()
        self._channels[queue] = channel
        self._consuming.append(consumer)

    async def _declare_again(self) -> None:
        assert self._topology is not None
        await self.declare(self._topology)

    async def cancel(self) -> None:
        """Cancel every consumer; unacked deliveries stay with us until acked or closed."""
        for consumer in self._consuming:
            await consumer.cancel()

    async def send(self, raw: Received, queue: str, headers: dict[str, Any]) -> bool:
        """Publish a copy of ``raw`` to ``queue`` (default exchange) and wait for its confirm."""
        assert self._publisher is not None
        copy = aio_pika.Message(
            raw.body,
            headers=headers,
            content_type=raw.content_type,
            message_id=raw.message_id,
            timestamp=raw.timestamp,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            await self._publisher.default_exchange.publish(
                copy, routing_key=queue, timeout=CONFIRM_TIMEOUT
            )
        except Exception as e:
            self._log.warning("consumer.republish_failed", queue=queue, error=str(e)[:200])
            return False
        return True

    async def receipts(
        self, group: str, exchange: str, metrics: ConsumerMetrics
    ) -> ReceiptPublisher | None:
        """Receipts go out on the confirm channel of the copies."""
        assert self._connection is not None
        assert self._publisher is not None
        publisher = ReceiptPublisher(group, exchange, metrics)
        await publisher.start(self._connection, self._publisher)
        return publisher

    async def close(self) -> None:
        """Send the acks still waiting, then close: unacked deliveries go back to their queues."""
        for consumer in self._consuming:
            with contextlib.suppress(Exception):
                await consumer.drain()
        self._consuming.clear()
        if self._connection is not None:
            await self._connection.close()
