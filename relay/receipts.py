"""The relay's receipts loop: take consumers' receipts off RabbitMQ and record them.

Consumers send a receipt after each outcome (``outbox.receipts`` has the wire
format) to ``<exchange>.receipts``; every relay binds the one shared queue
``<exchange>.receipts.relay`` to it with ``#`` and consumes it, so several
relays share the work as competing consumers. Deliveries are gathered into a
batch, inserted in one transaction (idempotent: a receipt recorded twice is one
row), and acknowledged only after that transaction committed: a relay killed in
between leaves them unacknowledged and RabbitMQ hands them to another relay.

A receipt that cannot be read is acknowledged and logged, never retried:
telling the operator is all that can be done with it, and retrying it would
only block the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from outbox.errors import MalformedMessageError
from outbox.logs import get_logger
from outbox.receipts import decode_receipts, receipts_exchange, receipts_queue, record_receipts

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from outbox.broker import Broker, Delivery
    from outbox.receipts import Receipt
    from relay.metrics import RelayMetrics

__all__ = ["ReceiptRecorder", "carries_receipts"]

_log = get_logger("outbox.relay.receipts")


def carries_receipts(broker: Broker) -> bool:
    """Tell whether receipts can arrive through ``broker``: only RabbitMQ carries them.

    Consumers send receipts over AMQP; with an in-memory broker nobody does, and
    a receipts loop would only wait.
    """
    from outbox.rabbitmq import RabbitMQBroker

    return isinstance(broker, RabbitMQBroker)


class ReceiptRecorder:
    """Consumes the receipts of ``exchange`` and records them in the outbox database.

    ``run()`` returns when ``stopping`` is set (after recording what it holds) or
    the broker is closed, and raises ``BrokerError`` or a database error for the
    relay's supervisor to log and restart it; deliveries it held are then
    requeued. Parameters: ``batch_size`` receipts per transaction at most,
    ``linger`` seconds to wait for more before a short batch is written.
    """

    def __init__(
        self,
        broker: Broker,
        engine: AsyncEngine,
        *,
        exchange: str,
        metrics: RelayMetrics,
        stopping: asyncio.Event,
        batch_size: int = 500,
        linger: float = 0.02,
    ) -> None:
        self._broker = broker
        self._engine = engine
        self._exchange = receipts_exchange(exchange)
        self._queue = receipts_queue(exchange)
        self._metrics = metrics
        self._stopping = stopping
        self._batch_size = batch_size
        self._linger = linger

    async def run(self) -> None:
        """Declare the receipts exchange and queue, then record receipts until stopped."""
        await self._broker.declare_queue(self._queue, ["#"], exchange=self._exchange)
        arrived: asyncio.Queue[Delivery] = asyncio.Queue()
        # A pump task feeds deliveries into ``arrived`` so that a short batch can be
        # written after ``linger`` without waiting on the broker's generator (which cannot
        # be given a timeout without being closed).
        pump = asyncio.create_task(self._pump(arrived), name="relay-receipts-pump")
        held: list[Delivery] = []
        try:
            while not self._stopping.is_set():
                first = await self._next(arrived, pump)
                if first is None:
                    break
                held = [first]
                await self._gather(arrived, held)
                await self._record(held)
                held = []
            # Stopping: nothing more comes once the pump is stopped; write what arrived.
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
            held = _drain(arrived)
            await self._record(held)
            held = []
        finally:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
            # An error or a cancel left these unrecorded: give them back for another try.
            for delivery in held + _drain(arrived):
                with contextlib.suppress(Exception):
                    await delivery.nack(requeue=True)

    async def _pump(self, arrived: asyncio.Queue[Delivery]) -> None:
        # Twice a batch in flight: the next batch arrives while one is being written.
        prefetch = min(2 * self._batch_size, 65535)
        async with contextlib.aclosing(
            self._broker.consume(self._queue, prefetch=prefetch)
        ) as deliveries:
            async for delivery in deliveries:
                arrived.put_nowait(delivery)  # bounded by the prefetch window

    async def _next(
        self, arrived: asyncio.Queue[Delivery], pump: asyncio.Task[None]
    ) -> Delivery | None:
        """The next delivery; None once stopping or the broker is closed. Re-raises the pump's
        error (say, the queue was deleted)."""
        if not arrived.empty():
            return arrived.get_nowait()
        getter = asyncio.ensure_future(arrived.get())
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({getter, stop, pump}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            getter.cancel()  # a no-op when it is done; a cancelled get() leaves the item queued
        if getter.done() and not getter.cancelled():
            return getter.result()
        if pump.done() and not pump.cancelled() and (error := pump.exception()) is not None:
            raise error
        return None

    async def _gather(self, arrived: asyncio.Queue[Delivery], batch: list[Delivery]) -> None:
        """Add what arrives within ``linger`` seconds to ``batch``, up to ``batch_size``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._linger
        while len(batch) < self._batch_size:
            if not arrived.empty():
                batch.append(arrived.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0 or self._stopping.is_set():
                return
            try:
                async with asyncio.timeout(remaining):
                    batch.append(await arrived.get())
            except TimeoutError:
                return

    async def _record(self, batch: list[Delivery]) -> None:
        """Insert the batch's receipts, then ack every delivery (unreadable ones included)."""
        if not batch:
            return
        receipts: list[Receipt] = []
        malformed = 0
        for delivery in batch:
            envelope = delivery.envelope
            try:
                receipts.extend(decode_receipts(envelope.body, envelope.content_type))
            except MalformedMessageError as e:
                malformed += 1
                _log.warning(
                    "relay.receipt_malformed",
                    receipt_id=envelope.message_id,
                    group=envelope.topic,
                    reason=str(e)[:300],
                )
        # Raises on a database error: the caller requeues the whole batch, nothing is acked.
        await record_receipts(self._engine, receipts)
        for delivery in batch:
            # A failed ack (channel lost) means the receipt comes again; recording it twice is
            # harmless, so the loop goes on.
            with contextlib.suppress(Exception):
                await delivery.ack()
        for receipt in receipts:
            self._metrics.receipts.labels(outcome=receipt.outcome).inc()
        if malformed:
            self._metrics.receipts.labels(outcome="malformed").inc(malformed)
        _log.debug("relay.receipts_recorded", count=len(receipts), malformed=malformed)


def _drain(arrived: asyncio.Queue[Delivery]) -> list[Delivery]:
    items: list[Delivery] = []
    while not arrived.empty():
        items.append(arrived.get_nowait())
    return items
