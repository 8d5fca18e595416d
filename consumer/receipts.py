"""Receipts a consumer group sends after each outcome, so ``outbox status`` shows who did what.

Receipts are **best-effort telemetry**, never part of the exactly-once guarantee
(that is the inbox row's job alone). They are queued in memory and published in
the background, so handling a message never waits for them and never fails
because of them. The price: a receipt can be lost, and that is accepted:

- the worker is killed before the queued receipts went out (at most
  ``flush_interval`` worth, plus whatever the broker had not confirmed);
- RabbitMQ is unreachable or slow for longer than ``publish_timeout``, or the
  in-memory queue is full (``capacity``) because it has been for a while;
- no relay has declared the receipts queue yet (the broker returns them);
- a message committed but not acked before a crash comes back as a duplicate,
  and duplicates send no receipt.

Every lost receipt is counted in ``outbox_consumer_receipts_dropped{reason}`` and
reported by a warning (at most one per ``warn_every``, with the counts since the
last one). The wire format lives in ``outbox.receipts``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import aio_pika
import aiormq
from aiormq.abc import DeliveredMessage

from outbox.ids import new_message_id, normalize_message_id
from outbox.logs import get_logger
from outbox.receipts import (
    CONTENT_TYPE,
    Receipt,
    consumed_receipt_texts,
    join_receipt_texts,
    receipt_text,
    receipts_exchange,
)

if TYPE_CHECKING:
    from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange

    from consumer.metrics import ConsumerMetrics
    from outbox.receipts import Outcome

__all__ = ["ReceiptPublisher"]


class ReceiptPublisher:
    """Queues a group's receipts and publishes them in batches on a confirm channel.

    ``send()`` never blocks and never raises. ``start()`` declares the receipts
    exchange and starts the background task; ``aclose()`` sends what is queued
    (within its timeout) and stops. Batches go out every ``flush_interval`` or
    every ``batch_size`` receipts, whichever comes first.
    """

    def __init__(
        self,
        group: str,
        exchange: str,
        metrics: ConsumerMetrics,
        *,
        capacity: int = 10_000,
        batch_size: int = 200,
        flush_interval: timedelta = timedelta(milliseconds=100),
        publish_timeout: timedelta = timedelta(seconds=5),
        warn_every: timedelta = timedelta(seconds=10),
    ) -> None:
        self._group = group
        self._exchange_name = receipts_exchange(exchange)
        self._metrics = metrics
        self._batch_size = batch_size
        self._flush_interval = flush_interval.total_seconds()
        self._publish_timeout = publish_timeout.total_seconds()
        self._warn_every = warn_every.total_seconds()
        self._capacity = capacity
        self._pending: deque[str] = deque()  # each receipt's JSON object text
        self._queued = asyncio.Event()  # something is pending
        self._full = asyncio.Event()  # a whole batch is pending: send it without waiting
        self._exchange: AbstractExchange | None = None
        self._task: asyncio.Task[None] | None = None
        self._off: str | None = None  # why receipts are not sent: "stopped" or "failed"
        self._closing = asyncio.Event()
        self._unreported: Counter[str] = Counter()
        self._last_warning = -float("inf")
        self._log = get_logger("outbox.consumer").bind(group=group, exchange=self._exchange_name)

    async def start(self, connection: AbstractConnection, channel: AbstractChannel) -> None:
        """Declare the receipts exchange and start publishing on ``channel`` (confirm mode).

        The exchange is declared on a channel of its own, so that a refusal (it
        exists with another type) cannot close ``channel``, which the consumer also
        dead-letters on. If it fails, receipts are off (an error is logged, each
        receipt counted as dropped) and the consumer runs on.
        """
        try:
            async with asyncio.timeout(self._publish_timeout):
                declaring = await connection.channel()
                try:
                    await declaring.declare_exchange(
                        self._exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
                    )
                finally:
                    with contextlib.suppress(Exception):
                        await declaring.close()
        except Exception as e:
            self._off = "failed"
            self._log.error("consumer.receipts_off", error=f"{type(e).__name__}: {e}"[:300])
            return
        self._exchange = await channel.get_exchange(self._exchange_name, ensure=False)
        self._task = asyncio.create_task(self._run(), name=f"outbox-receipts-{self._group}")

    def send(
        self,
        message_id: str | None,
        outcome: Outcome,
        detail: str | None = None,
        *,
        group: str | None = None,
    ) -> None:
        """Queue the receipt of ``message_id``; never blocks, never raises.

        ``group`` names the receiver in the receipt instead of the consumer group
        (the notify service reports each subscription as ``<group>:<name>``).

        A message id that is not a UUID (a malformed message) has no outbox row
        to report on, so it sends nothing.
        """
        try:
            if self._off is not None:
                self._drop(self._off)
                return
            try:
                mid = normalize_message_id(message_id)
            except ValueError:
                return
            receipt = Receipt(
                message_id=mid,
                group=group or self._group,
                outcome=outcome,
                detail=detail,
                at=datetime.now(UTC),
            )
            self._enqueue([receipt_text(receipt)])
        except Exception as e:  # telemetry must never fail the message it reports on
            self._log.warning("consumer.receipt_error", error=f"{type(e).__name__}: {e}"[:300])

    def send_consumed(self, message_ids: list[str]) -> None:
        """Queue a ``consumed`` receipt for each id (canonical UUID text, as envelopes carry).

        The worker's path for a settled batch: one clock reading, no id parsing.
        Never blocks, never raises.
        """
        if not message_ids:
            return
        try:
            if self._off is not None:
                self._drop(self._off, len(message_ids))
                return
            self._enqueue(consumed_receipt_texts(message_ids, self._group, datetime.now(UTC)))
        except Exception as e:  # telemetry must never fail the message it reports on
            self._log.warning("consumer.receipt_error", error=f"{type(e).__name__}: {e}"[:300])

    def _enqueue(self, receipts: list[str]) -> None:
        room = self._capacity - len(self._pending)
        if room < len(receipts):
            self._drop("full", len(receipts) - max(room, 0))
            receipts = receipts[: max(room, 0)]
        if not receipts:
            return
        self._pending.extend(receipts)
        if not self._queued.is_set():
            self._queued.set()
        if len(self._pending) >= self._batch_size and not self._full.is_set():
            self._full.set()

    async def aclose(self, timeout: timedelta = timedelta(seconds=5)) -> None:
        """Send what is queued (for at most ``timeout``), then stop; later receipts are dropped."""
        if self._off is None:
            self._off = "stopped"
        self._closing.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout.total_seconds())
            except TimeoutError:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        left = len(self._pending)
        self._pending.clear()
        if left:
            self._drop("stopped", left)

    # -- background ---------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                if self._closing.is_set():
                    return  # closing and nothing left
                continue
            try:
                await self._publish(batch)
            except Exception as e:  # keep the task alive whatever the driver does
                self._drop("failed", len(batch))
                self._log.warning(
                    "consumer.receipts_publish_error", error=f"{type(e).__name__}: {e}"[:300]
                )

    async def _next_batch(self) -> list[str]:
        """Wait for a receipt, then for ``flush_interval`` or a full batch (not when closing)."""
        pending = self._pending
        if not pending:
            if self._closing.is_set():
                return []
            closing = asyncio.ensure_future(self._closing.wait())
            queued = asyncio.ensure_future(self._queued.wait())
            try:
                await asyncio.wait({queued, closing}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                closing.cancel()
                queued.cancel()
        if pending and len(pending) < self._batch_size and not self._closing.is_set():
            full = asyncio.ensure_future(self._full.wait())
            closing = asyncio.ensure_future(self._closing.wait())
            try:
                await asyncio.wait(
                    {full, closing},
                    timeout=self._flush_interval,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                full.cancel()
                closing.cancel()
        batch = [pending.popleft() for _ in range(min(self._batch_size, len(pending)))]
        if len(pending) < self._batch_size:
            self._full.clear()
        if not pending:
            self._queued.clear()
        return batch

    async def _publish(self, batch: list[str]) -> None:
        """Publish the batch as one message (a JSON array) and count it sent or dropped."""
        assert self._exchange is not None
        message = aio_pika.Message(
            join_receipt_texts(batch),
            content_type=CONTENT_TYPE,
            message_id=new_message_id(),
            timestamp=datetime.now(UTC),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            async with asyncio.timeout(self._publish_timeout):
                answer: object = await self._exchange.publish(
                    message, routing_key=self._group, mandatory=True
                )
        except Exception:
            self._drop("failed", len(batch))
            return
        if isinstance(answer, DeliveredMessage):
            self._drop("unroutable", len(batch))  # returned: no relay bound the receipts queue yet
        elif answer is None or isinstance(answer, aiormq.spec.Basic.Ack):
            self._metrics.receipts_sent.inc(len(batch))
        else:
            self._drop("failed", len(batch))

    def _drop(self, reason: str, count: int = 1) -> None:
        self._metrics.receipts_dropped.labels(reason=reason).inc(count)
        self._unreported[reason] += count
        now = time.monotonic()
        # One warning per interval, however many receipts go: a broker outage would
        # otherwise log a line per message.
        if now - self._last_warning >= self._warn_every:
            self._last_warning = now
            self._log.warning(
                "consumer.receipts_dropped",
                dropped=dict(self._unreported),
                note="receipts are best-effort; message handling is not affected",
            )
            self._unreported.clear()
