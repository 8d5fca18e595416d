"""Deliveries read straight off aiormq, and their acks coalesced per channel.

The worker consumes on the aiormq channel under aio-pika's robust channel rather
than through ``Queue.consume``: aio-pika wraps every delivery in an
``IncomingMessage`` and a task of its own, which costs about as much CPU as the
frames themselves. ``QueueConsumer`` follows the robust channel across
reconnects (it consumes again on every reopened channel) and across a consumer
the broker cancels (the queue was deleted: it declares the group's queues and
bindings again, then consumes). ``read_inline`` hands each delivery to the
consumer where the channel has read it, instead of in a task of aiormq's, and
the connection decodes frames with ``consumer.amqp_frames``.

Acks go through an ``AckWindow``: when the oldest unsettled deliveries of a
channel are all done, one ``basic.ack multiple=true`` settles them, instead of a
frame per message.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import TYPE_CHECKING, Any

from consumer.amqp_frames import read_frames_fast
from outbox.logs import get_logger

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine, Mapping
    from datetime import datetime

    import aiormq.abc
    from aio_pika.abc import AbstractRobustChannel

    from consumer.transport import OnDelivery

__all__ = ["ACK_LINGER", "AckWindow", "Delivery", "QueueConsumer", "read_inline"]

ACK_LINGER = 0.01
"""Seconds an ack waits for older deliveries to be done, so all go in one frame."""

_RECONSUME_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)

_log = get_logger("outbox.consumer")


class AckWindow:
    """The unsettled deliveries of one channel; acks leave in as few frames as order allows.

    Delivery tags count up by one per delivery on a channel, and ``basic.ack``
    with ``multiple=true`` settles every unsettled delivery up to the tag it
    names. So when the oldest unsettled deliveries are all acked, one frame
    naming the newest of them settles the lot. An ack that cannot join that
    prefix (an older delivery is still being handled) waits ``ACK_LINGER`` at
    most and then goes out alone, so a slow message does not hold the others'
    prefetch credit. Nacks go out at once, alone.

    Acks of a closed channel are dropped: the broker has put those deliveries
    back in their queue already, and the inbox absorbs their second handling.
    """

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        self.channel = channel
        self._order: deque[int] = deque()  # unsettled tags, oldest first
        self._ready: set[int] = set()  # acked by the consumer, frame not queued yet
        self._gone: set[int] = set()  # settled alone (nack, straggler ack), still in _order
        self._flush_pending = False
        self._linger: asyncio.TimerHandle | None = None
        # One writer, so frames reach the channel in the order they were decided: a
        # multiple ack must never overtake the single ack or nack of a tag it covers.
        self._frames: deque[tuple[bool, int, bool]] = deque()  # (ack?, tag, multiple/requeue)
        self._writer: asyncio.Task[None] | None = None

    def delivered(self, tag: int) -> None:
        """Register a delivery (in the order the channel delivers them)."""
        self._order.append(tag)

    def ack(self, tag: int) -> None:
        """Ack ``tag`` with the next frame this window sends (within this loop turn)."""
        self._ready.add(tag)
        if not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush)

    def nack(self, tag: int, *, requeue: bool) -> None:
        """Nack ``tag`` now, alone."""
        self._gone.add(tag)
        self._queue(False, tag, requeue)
        self._flush()

    async def drain(self) -> None:
        """Send every ack now and wait until the frames are written (before closing)."""
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        self._flush()
        self._ack_stragglers()
        if self._writer is not None:
            await asyncio.wait({self._writer})

    def _flush(self) -> None:
        self._flush_pending = False
        if self.channel.is_closed:
            self._forget()
            return
        order, ready, gone = self._order, self._ready, self._gone
        top = None
        while order:
            tag = order[0]
            if tag in ready:
                ready.remove(tag)
                top = tag
            elif tag in gone:
                gone.remove(tag)
            else:
                break
            order.popleft()
        if top is not None:
            self._queue(True, top, True)
        if ready and self._linger is None:
            self._linger = asyncio.get_running_loop().call_later(ACK_LINGER, self._linger_over)

    def _linger_over(self) -> None:
        self._linger = None
        self._flush()  # the older deliveries may be done by now
        self._ack_stragglers()

    def _ack_stragglers(self) -> None:
        if not self._ready or self.channel.is_closed:
            return
        tags = sorted(self._ready)
        self._ready.clear()
        self._gone.update(tags)
        for tag in tags:
            self._queue(True, tag, False)

    def _queue(self, ack: bool, tag: int, flag: bool) -> None:
        self._frames.append((ack, tag, flag))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write())

    async def _write(self) -> None:
        channel, frames = self.channel, self._frames
        try:
            while frames:
                ack, tag, flag = frames.popleft()
                if ack:
                    await channel.basic_ack(tag, multiple=flag, wait=False)
                else:
                    await channel.basic_nack(tag, requeue=flag, wait=False)
        except Exception as e:
            # The channel closed under us: the broker requeues what it did not get.
            frames.clear()
            _log.warning("consumer.ack_failed", error=f"{type(e).__name__}: {e}"[:200])
        finally:
            self._writer = None

    def _forget(self) -> None:
        self._order.clear()
        self._ready.clear()
        self._gone.clear()
        self._frames.clear()
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None


class Delivery:
    """One message as delivered by aiormq (a ``consumer.transport.Received``)."""

    __slots__ = ("_message", "_tag", "_window")

    def __init__(self, message: aiormq.abc.DeliveredMessage, window: AckWindow) -> None:
        self._message = message
        self._window = window
        tag = message.delivery_tag
        assert tag is not None  # a basic.deliver always carries one
        self._tag = tag
        window.delivered(tag)

    @property
    def body(self) -> bytes:
        return self._message.body

    @property
    def headers(self) -> Mapping[str, Any] | None:
        return self._message.header.properties.headers

    @property
    def routing_key(self) -> str | None:
        return self._message.routing_key

    @property
    def message_id(self) -> str | None:
        return self._message.header.properties.message_id

    @property
    def content_type(self) -> str | None:
        return self._message.header.properties.content_type

    @property
    def timestamp(self) -> datetime | None:
        return self._message.header.properties.timestamp

    @property
    def redelivered(self) -> bool | None:
        return self._message.redelivered

    async def ack(self) -> None:
        self._window.ack(self._tag)

    async def nack(self, *, requeue: bool = True) -> None:
        self._window.nack(self._tag, requeue=requeue)


def read_inline(channel: aiormq.abc.AbstractChannel) -> bool:
    """Hand ``channel``'s deliveries to our consumers in its reader, without a task each.

    aiormq runs every consumer callback in a task of its own, registered in the
    channel's future store: about a tenth of the event loop's time per message,
    for a callback that usually only buffers the delivery for the next batch. For
    a consumer registered with a ``deliver`` function that carries ``take`` (see
    ``QueueConsumer._consume``), ``take`` is called right where the channel has
    read the message; only what it returns, if anything, becomes a task. Other
    consumers keep aiormq's path. This replaces aiormq's ``_on_deliver_frame`` on
    this channel object and reads the content with its helpers; with an aiormq
    that lacks them every delivery takes aiormq's own path, which works the same,
    only slower. Returns whether the channel reads inline.
    """
    if getattr(channel, "_outbox_inline", False):
        return True
    read_header = getattr(channel, "_Channel__get_content_header", None)
    read_content = getattr(channel, "_read_content", None)
    delivered = getattr(channel, "_on_deliver_frame", None)
    consumers = getattr(channel, "consumers", None)
    if read_header is None or read_content is None or delivered is None or consumers is None:
        return False
    running: set[asyncio.Future[None]] = set()
    finished = _finished(running)

    async def on_deliver_frame(frame: Any) -> None:
        take = getattr(consumers.get(frame.consumer_tag), "take", None)
        if take is None:
            await delivered(frame)
            return
        message = await read_content(frame, await read_header())
        try:
            pending = take(message)
        except Exception:  # the reader must go on, as after a failed callback task
            _log.exception("consumer.delivery_failed", consumer_tag=frame.consumer_tag)
            return
        if pending is not None:
            task = asyncio.ensure_future(pending)
            running.add(task)
            task.add_done_callback(finished)

    channel._on_deliver_frame = on_deliver_frame  # type: ignore[attr-defined]
    channel._outbox_inline = True  # type: ignore[attr-defined]
    return True


def _finished(running: set[asyncio.Future[None]]) -> Callable[[asyncio.Future[None]], None]:
    def done(task: asyncio.Future[None]) -> None:
        running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.error("consumer.delivery_failed", error=repr(task.exception())[:300])

    return done


class QueueConsumer:
    """Consumes one queue on a robust channel, again after every reopen or broker cancel."""

    def __init__(
        self,
        channel: AbstractRobustChannel,
        queue: str,
        callback: OnDelivery,
        declare: Callable[[], Awaitable[None]],
    ) -> None:
        self._channel = channel
        self._queue = queue
        self._callback = callback
        self._declare = declare
        self._windows: list[AckWindow] = []
        self._tag: str | None = None
        self._underlay: aiormq.abc.AbstractChannel | None = None
        self._cancelled = False
        self._reconsuming: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Consume now, and again whenever the robust channel reopens."""
        self._channel.reopen_callbacks.add(self._on_reopen)
        await self._consume()

    async def cancel(self) -> None:
        """Stop taking deliveries; those taken can still be acked."""
        self._cancelled = True
        self._channel.reopen_callbacks.discard(self._on_reopen)
        if self._reconsuming is not None:
            self._reconsuming.cancel()
        underlay, tag = self._underlay, self._tag
        if underlay is not None and tag is not None and not underlay.is_closed:
            with contextlib.suppress(Exception):
                await underlay.basic_cancel(tag, timeout=5)

    async def drain(self) -> None:
        """Send the acks still waiting in the windows."""
        for window in self._windows:
            await window.drain()
        self._windows = [w for w in self._windows if not w.channel.is_closed]

    async def _consume(self) -> None:
        underlay = await self._channel.get_underlay_channel()
        self._windows = [w for w in self._windows if not w.channel.is_closed]
        # One window per channel: its delivery tags go on counting after a broker
        # cancel, and a second window's multiple ack would cover the first one's.
        window = next((w for w in self._windows if w.channel is underlay), None)
        if window is None:
            window = AckWindow(underlay)
            self._windows.append(window)

        def take(message: aiormq.abc.DeliveredMessage) -> Awaitable[None] | None:
            return self._callback(Delivery(message, window))

        async def deliver(message: aiormq.abc.DeliveredMessage) -> None:
            pending = take(message)
            if pending is not None:
                await pending

        deliver.take = take  # type: ignore[attr-defined]  # read_inline's marker
        read_inline(underlay)
        read_frames_fast(underlay.connection)
        underlay.on_consumer_cancel_callbacks.add(self._on_broker_cancel)
        self._underlay = underlay
        ok = await underlay.basic_consume(self._queue, deliver)
        self._tag = ok.consumer_tag

    def _on_reopen(self, *_: Any) -> Coroutine[Any, Any, None] | None:
        # aio-pika has declared the queue again on the new channel; consume on it.
        return None if self._cancelled else self._consume_after_reopen()

    async def _consume_after_reopen(self) -> None:
        try:
            await self._consume()
        except Exception as e:
            _log.warning("consumer.reconsume_failed", queue=self._queue, error=str(e)[:200])
            self._start_reconsuming()

    def _on_broker_cancel(self, frame: Any) -> None:
        if self._cancelled or getattr(frame, "consumer_tag", None) != self._tag:
            return
        _log.warning("consumer.cancelled_by_broker", queue=self._queue)
        self._start_reconsuming()

    def _start_reconsuming(self) -> None:
        if self._reconsuming is None or self._reconsuming.done():
            self._reconsuming = asyncio.create_task(self._reconsume())

    async def _reconsume(self) -> None:
        """Declare the queues again (one was deleted?) and consume, with backoff."""
        attempt = 0
        while not self._cancelled:
            await asyncio.sleep(_RECONSUME_DELAYS[min(attempt, len(_RECONSUME_DELAYS) - 1)])
            attempt += 1
            if self._cancelled:
                return
            try:
                await self._declare()
                await self._consume()
            except Exception as e:
                _log.warning("consumer.reconsume_failed", queue=self._queue, error=str(e)[:200])
                continue
            _log.info("consumer.reconsumed", queue=self._queue)
            return
