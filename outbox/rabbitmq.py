"""The ``Broker`` on RabbitMQ through aio-pika: the relay publishes with it, consumers read with it.

One robust connection (aio-pika reconnects it and restores channels, the
exchange and consumers) carries:

- a publishing channel in confirm mode. ``publish`` pipelines a whole batch on
  it, straight on the aiormq channel under aio-pika's robust one (taken anew for
  each batch, so it follows reconnects), with one deadline for the batch, and
  maps each broker answer to a ``PublishResult``: ``Basic.Ack`` is
  ``CONFIRMED``, a mandatory message that came back is ``RETURNED``, a
  ``Basic.Nack`` is ``NACKED``, and anything else (timeout, lost connection) is
  ``FAILED``. Nothing is ``CONFIRMED`` without the broker's ack.
- one channel per ``consume`` call, with its own prefetch window.
- short-lived channels for ``declare_queue`` and queue checks, so a broker error
  there (a queue declared with other arguments) cannot close the other two.

While the connection is down, ``connected`` is False, ``publish`` raises
``BrokerError`` and ``wait_connected`` lets the relay pause instead of burning
attempts. Credentials never appear in errors or logs: URLs go through
``redact_url`` and driver messages are scrubbed of the password.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from typing import TYPE_CHECKING, Final, Literal, cast

import aio_pika
import aiormq
from aio_pika.exceptions import (
    AMQPError,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
    DeliveryError,
)
from aiormq.abc import DeliveredMessage
from yarl import URL

from outbox.broker import PublishOutcome, PublishResult
from outbox.envelope import Envelope, WireFormat
from outbox.errors import BrokerError, ConfigurationError, MalformedMessageError
from outbox.logs import get_logger, redact_url
from outbox.topics import validate_pattern

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterator, Sequence

    from aio_pika.abc import (
        AbstractIncomingMessage,
        AbstractRobustChannel,
        AbstractRobustConnection,
        AbstractRobustExchange,
        AbstractRobustQueue,
    )

__all__ = ["RabbitMQBroker", "RabbitMQDelivery"]

_log = get_logger("outbox.rabbitmq")

_QUEUE_TYPES: Final = ("quorum", "classic")
_MAX_NAME_BYTES: Final = 255  # AMQP short strings: exchange and queue names, routing keys
_MAX_PREFETCH: Final = 65535  # basic.qos prefetch-count is a 16-bit field
_MAX_REASON: Final = 200
# Errors the driver raises when the connection or a channel is gone or refuses an operation.
_DRIVER_ERRORS: Final = (AMQPError, ConnectionError, OSError, RuntimeError, TimeoutError)


class _Stop:
    """Put in a consumer's buffer by ``close()``: the generator ends."""


_STOP: Final = _Stop()


class RabbitMQDelivery:
    """A delivery from a RabbitMQ queue; settle it once with ``ack`` or ``nack``.

    Settling a second time, or after the channel it came on was closed (by
    ``close()`` or a lost connection, after which the broker redelivers the
    message), raises ``BrokerError``: the caller must not believe an ack it
    could not send.
    """

    __slots__ = ("_envelope", "_message", "_settled", "_subscription")

    def __init__(
        self, message: AbstractIncomingMessage, envelope: Envelope, subscription: _Subscription
    ) -> None:
        self._message = message
        self._envelope = envelope
        self._subscription = subscription
        self._settled = False

    @property
    def envelope(self) -> Envelope:
        """The message as sent."""
        return self._envelope

    @property
    def redelivered(self) -> bool:
        """True if RabbitMQ delivered this message before (to this or another consumer)."""
        return bool(self._message.redelivered)

    async def ack(self) -> None:
        """Tell RabbitMQ the message is done with; it will not be delivered again."""
        await self._settle(None)

    async def nack(self, *, requeue: bool) -> None:
        """Requeue the message (``requeue=True``) or drop it to the queue's dead-letter exchange."""
        await self._settle(requeue)

    async def _settle(self, requeue: bool | None) -> None:
        """Ack (``requeue=None``) or nack the message, exactly once."""
        if self._settled:
            raise BrokerError(
                f"delivery of {self._envelope.message_id} was already acked or nacked"
            )
        # Marked before the await so that two concurrent settles cannot both go out.
        self._settled = True
        try:
            if requeue is None:
                await self._message.ack()
            else:
                await self._message.nack(requeue=requeue)
        except _DRIVER_ERRORS as e:
            raise BrokerError(
                f"could not settle delivery of {self._envelope.message_id}: its channel is "
                f"closed ({_describe(e)}); RabbitMQ will deliver the message again"
            ) from e
        finally:
            await self._subscription.settled(self)


class _Subscription:
    """One ``consume`` call: its channel, buffer, and deliveries the caller has not settled."""

    def __init__(self, queue: str, channel: AbstractRobustChannel, seconds: float) -> None:
        self.queue = queue
        self.channel = channel
        self.seconds = seconds  # bound on each broker round trip while finishing
        self.buffer: asyncio.Queue[AbstractIncomingMessage | _Stop | BrokerError] = asyncio.Queue()
        self.outstanding: set[RabbitMQDelivery] = set()
        self.finished = False  # the generator ended: no more deliveries are taken
        self.consumer_tag: str | None = None
        self._closed = False

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        if self.finished:
            # Arrived after the generator ended: give it straight back to the queue.
            with contextlib.suppress(*_DRIVER_ERRORS):
                await message.nack(requeue=True)
            return
        self.buffer.put_nowait(message)

    def on_consumer_cancel(self, frame: aiormq.spec.Basic.Cancel) -> None:
        # RabbitMQ cancels a consumer when its queue is deleted; waiting on would hang forever.
        if frame.consumer_tag == self.consumer_tag:
            self.buffer.put_nowait(
                BrokerError(
                    f"RabbitMQ cancelled the consumer of queue {self.queue!r}: the queue was "
                    "deleted or became unavailable"
                )
            )

    async def watch_cancel(self, *_: object) -> None:
        # The callback lives on the underlying channel, which is new after every reopen.
        with contextlib.suppress(*_DRIVER_ERRORS):
            underlay = await self.channel.get_underlay_channel()
            underlay.on_consumer_cancel_callbacks.add(self.on_consumer_cancel)

    async def on_reopen(self, *_: object) -> None:
        # Deliveries of the previous underlying channel are void (the broker requeued them).
        self.outstanding.clear()
        await self.watch_cancel()
        if self.finished:
            await self.close()

    async def settled(self, delivery: RabbitMQDelivery) -> None:
        self.outstanding.discard(delivery)
        if self.finished and not self.outstanding:
            await self.close()

    async def finish(self, queue: AbstractRobustQueue | None) -> None:
        """Stop taking deliveries; close the channel once the caller settled what it holds."""
        self.finished = True
        if not self.outstanding or self.channel.is_closed:
            # Closing the channel returns buffered, unacknowledged messages to the queue.
            # A channel already closed (connection lost or closed) voided every delivery.
            await self.close()
            return
        # Deliveries the caller still holds must stay settleable, so the channel stays
        # open: stop the consumer and give back what was received but not yielded.
        with contextlib.suppress(*_DRIVER_ERRORS):
            async with asyncio.timeout(self.seconds):
                if queue is not None and self.consumer_tag is not None:
                    await queue.cancel(self.consumer_tag)
                while not self.buffer.empty():
                    item = self.buffer.get_nowait()
                    if not isinstance(item, _Stop | BrokerError):
                        await item.nack(requeue=True)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.channel.is_initialized:
            return
        # Bounded: closing a channel of a connection that is down waits for it otherwise.
        with contextlib.suppress(*_DRIVER_ERRORS):
            async with asyncio.timeout(self.seconds):
                await self.channel.close()


class _Session:
    """What one ``connect()`` opened; replaced as a whole by the next one."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        channel: AbstractRobustChannel,
        exchange: AbstractRobustExchange,
    ) -> None:
        self.connection = connection
        self.channel = channel
        self.exchange = exchange
        self.closing = asyncio.Event()
        self.subscriptions: set[_Subscription] = set()


class RabbitMQBroker:
    """A ``Broker`` on RabbitMQ (see the module docstring for channels and outcomes).

    Parameters:
        url: ``amqp://user:password@host:port/vhost`` (``amqps://`` for TLS). aio-pika
            query parameters (``heartbeat``...) are honoured.
        wire: the exchange and header settings shared with every other side.
        confirm_timeout: how long a publish may wait for the broker's confirm before
            it ends ``FAILED``; also bounds connecting, declaring and closing.
        queue_type: the ``x-queue-type`` of queues ``declare_queue`` creates. Quorum
            queues are replicated and are RabbitMQ's recommendation for durable work.
        connection_name: shown in the RabbitMQ management UI and ``rabbitmqctl``.
        reconnect_interval: pause between reconnection attempts after an outage.

    Nothing is done before ``connect()``; arguments are checked here and a bad one
    raises ``ConfigurationError``.
    """

    def __init__(
        self,
        url: str,
        *,
        wire: WireFormat = WireFormat(),  # noqa: B008 (frozen, so one shared default is safe)
        confirm_timeout: timedelta = timedelta(seconds=15),
        queue_type: Literal["quorum", "classic"] = "quorum",
        connection_name: str = "outbox",
        reconnect_interval: timedelta = timedelta(seconds=1),
    ) -> None:
        self._url = _check_url(url)
        self._safe_url = redact_url(url)
        self._password = URL(url).password or ""
        if not isinstance(wire, WireFormat):
            raise ConfigurationError(f"wire must be a WireFormat, not {type(wire).__name__}")
        wire.validate()
        self._wire = wire
        self._confirm_timeout = _positive_seconds("confirm_timeout", confirm_timeout)
        self._reconnect_interval = _positive_seconds("reconnect_interval", reconnect_interval)
        if queue_type not in _QUEUE_TYPES:
            raise ConfigurationError(
                f"queue_type must be 'quorum' or 'classic', not {queue_type!r}"
            )
        self._queue_type = queue_type
        if not isinstance(connection_name, str) or not connection_name:
            raise ConfigurationError("connection_name must be a non-empty str")
        self._connection_name = connection_name
        self._session: _Session | None = None
        self._lifecycle = asyncio.Lock()
        # message_id -> future done when the window that publishes it has ended. aiormq
        # matches a returned message to its publish by message_id, so two publishes of one
        # id in flight at once could swap outcomes and report a returned message CONFIRMED;
        # a window holding an id that is in flight waits for the earlier one.
        self._in_flight: dict[str, asyncio.Future[None]] = {}

    def __repr__(self) -> str:
        return f"<RabbitMQBroker {self._safe_url} exchange={self._wire.exchange!r}>"

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True when the connection and the publishing channel are usable right now.

        False before ``connect()``, after ``close()`` and while the robust connection
        is reconnecting after an outage.
        """
        session = self._session
        if session is None or session.closing.is_set():
            return False
        connection = session.connection
        return (
            not connection.is_closed
            and connection.connected.is_set()
            and not session.channel.is_closed
        )

    async def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait until ``connected`` (at most ``timeout`` seconds); return whether it is.

        Returns False at once when ``connect()`` was never called or ``close()`` was,
        since then nothing will reconnect.
        """
        # A timeout argument rather than the caller's asyncio.timeout: "not yet" is an
        # answer here (the relay keeps waiting and reports the outage), not an error.
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not self.connected:
            session = self._session
            if session is None or session.closing.is_set():
                return False
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            ready = asyncio.ensure_future(session.channel.ready())
            stopped = asyncio.ensure_future(session.closing.wait())
            try:
                done, _ = await asyncio.wait(
                    {ready, stopped}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                ready.cancel()
                stopped.cancel()
            if ready in done and not self.connected:
                # The channel reported ready a moment before the connection state caught
                # up; a short pause keeps this from spinning.
                await asyncio.sleep(0.01)
        return True

    async def connect(self) -> None:
        """Connect, open the publishing channel and declare the exchange (durable topic).

        Does nothing when already connected; safe to call again after ``close()``.
        Raises ``BrokerError`` (URL redacted) when RabbitMQ cannot be reached or
        refuses, for example because the exchange exists with another type.
        """
        async with self._lifecycle:
            if self._session is not None:
                return
            connection: AbstractRobustConnection | None = None
            try:
                async with asyncio.timeout(self._confirm_timeout):
                    connection = await aio_pika.connect_robust(
                        self._url,
                        client_properties={"connection_name": self._connection_name},
                        timeout=self._confirm_timeout,
                        reconnect_interval=self._reconnect_interval,
                    )
                    channel = connection.channel(publisher_confirms=True, on_return_raises=False)
                    await channel.initialize()
                    exchange = await channel.declare_exchange(
                        self._wire.exchange, aio_pika.ExchangeType.TOPIC, durable=True
                    )
            except ChannelPreconditionFailed as e:
                await _close_quietly(connection)
                raise BrokerError(
                    f"exchange {self._wire.exchange!r} exists on {self._safe_url} with other "
                    f"settings ({self._scrub(e)}); it must be a durable topic exchange"
                ) from None
            except Exception as e:
                await _close_quietly(connection)
                raise BrokerError(
                    f"cannot connect to RabbitMQ at {self._safe_url}: {self._scrub(e)}"
                ) from None
            session = _Session(connection, channel, exchange)
            connection.close_callbacks.add(self._on_connection_lost)
            connection.reconnect_callbacks.add(self._on_reconnected)
            self._session = session
            _log.info("broker connected", url=self._safe_url, exchange=self._wire.exchange)

    async def close(self) -> None:
        """Close the connection: consumers end, in-flight publishes end ``FAILED``.

        Unacknowledged deliveries go back to their queues and can no longer be settled.
        """
        async with self._lifecycle:
            session, self._session = self._session, None
            if session is None:
                return
            session.closing.set()
            for subscription in session.subscriptions:
                subscription.buffer.put_nowait(_STOP)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._confirm_timeout):
                    await session.connection.close()

    def _on_connection_lost(self, _sender: object, error: BaseException | None) -> None:
        if self._session is not None and not self._session.closing.is_set():
            _log.warning(
                "broker connection lost; reconnecting",
                url=self._safe_url,
                reason=self._scrub(error) if error else None,
            )

    def _on_reconnected(self, _sender: object) -> None:
        _log.info("broker connection restored", url=self._safe_url)

    # --- publishing -----------------------------------------------------------------------

    async def publish(self, envelopes: Sequence[Envelope]) -> list[PublishResult]:
        """Publish a batch with publisher confirms; one result per envelope, in input order.

        All messages of the batch are in flight at once (one confirm window), each
        ``mandatory`` to the exchange with its topic as routing key, and the batch
        has one deadline (``confirm_timeout``): what is not answered by then ends
        ``FAILED``. Raises ``BrokerError`` if not connected at call time; the caller
        should then ``wait_connected()``. See the module docstring for the outcomes.
        """
        session = self._session
        if session is None or not self.connected:
            raise BrokerError(
                f"not connected to RabbitMQ at {self._safe_url}; call connect() "
                "or wait_connected() first"
            )
        if not envelopes:
            return []
        deadline = asyncio.get_running_loop().time() + self._confirm_timeout
        ids = [envelope.message_id for envelope in envelopes]
        if len(set(ids)) == len(ids):
            return await self._publish_window(session, envelopes, ids, deadline)
        # The same id more than once in a batch: its n-th copy goes out in the n-th window,
        # after the earlier copies were answered (see ``_in_flight``).
        copies: dict[str, int] = {}
        windows: list[list[int]] = []
        for index, message_id in enumerate(ids):
            nth = copies.get(message_id, 0)
            copies[message_id] = nth + 1
            if nth == len(windows):
                windows.append([])
            windows[nth].append(index)
        results: list[PublishResult | None] = [None] * len(envelopes)
        for window in windows:
            answered = await self._publish_window(
                session, [envelopes[i] for i in window], [ids[i] for i in window], deadline
            )
            for index, result in zip(window, answered, strict=True):
                results[index] = result
        return [result for result in results if result is not None]

    async def _publish_window(
        self, session: _Session, envelopes: Sequence[Envelope], ids: list[str], deadline: float
    ) -> list[PublishResult]:
        """Publish envelopes of distinct ids at once on the channel under aio-pika.

        Straight on aiormq (``basic_publish`` with prepared properties) rather than
        through ``aio_pika.Message`` and ``Exchange.publish``: the same frames for a
        good deal less CPU per message, which is what bounds the relay. ``wait=False``
        leaves out aiormq's wait for the socket write of each message, which would hold
        the channel lock from one message to the next; the confirm is awaited anyway.
        """
        try:
            properties = [self._properties(envelope) for envelope in envelopes]
        except Exception:
            return await self._publish_buildable(session, envelopes, ids, deadline)
        loop = asyncio.get_running_loop()
        in_flight = self._in_flight
        try:
            async with asyncio.timeout_at(deadline):
                # Taken per window: the robust channel has a new one after each reconnect.
                # It is an aiormq.Channel (aio-pika casts it so too), whose basic_publish
                # takes ``wait``; the abstract one does not say so.
                channel = cast("aiormq.Channel", await session.channel.get_underlay_channel())
                # No await between the last check and the registration below, so no other
                # window can take one of these ids in between.
                while earlier := {in_flight[i] for i in ids if i in in_flight}:
                    await asyncio.wait(earlier)
                    channel = cast("aiormq.Channel", await session.channel.get_underlay_channel())
        except TimeoutError:
            return self._failed(envelopes, f"no confirm within {self._confirm_timeout:g}s")
        except _DRIVER_ERRORS as e:
            return self._failed(envelopes, self._scrub(e))
        except asyncio.CancelledError:
            if _cancelling():
                raise
            return self._failed(envelopes, "connection closed before the confirm")

        ended: asyncio.Future[None] = loop.create_future()
        for message_id in ids:
            in_flight[message_id] = ended
        exchange = self._wire.exchange
        send = channel.basic_publish
        tasks = [
            loop.create_task(
                send(
                    envelope.body,
                    exchange=exchange,
                    routing_key=envelope.topic,
                    properties=props,
                    mandatory=True,
                    wait=False,
                )
            )
            for envelope, props in zip(envelopes, properties, strict=True)
        ]
        gathered = asyncio.gather(*tasks, return_exceptions=True)
        gathered.add_done_callback(lambda _: self._window_ended(ids, ended))
        stopped = [False] * len(tasks)
        try:
            await asyncio.wait((gathered,), timeout=max(0.0, deadline - loop.time()))
            if not gathered.done():
                for index, task in enumerate(tasks):
                    stopped[index] = task.cancel()
                await gathered
        except BaseException:
            # This call was cancelled: its publishes must not outlive it.
            for task in tasks:
                task.cancel()
            raise
        return [
            PublishResult(
                envelope.message_id,
                PublishOutcome.FAILED,
                f"no confirm within {self._confirm_timeout:g}s",
            )
            if timed_out
            else self._result(envelope, answer)
            for envelope, answer, timed_out in zip(
                envelopes, gathered.result(), stopped, strict=True
            )
        ]

    async def _publish_buildable(
        self, session: _Session, envelopes: Sequence[Envelope], ids: list[str], deadline: float
    ) -> list[PublishResult]:
        """Fail the envelopes whose properties cannot be built; publish the others."""
        results: list[PublishResult | None] = []
        good: list[int] = []
        for index, envelope in enumerate(envelopes):
            try:
                self._properties(envelope)
            except Exception as e:
                # A row the wire format cannot carry (say, headers that are not a table):
                # it fails alone, so it is retried and then parked dead like any other.
                reason = f"cannot build its AMQP properties: {self._scrub(e)}"
                results.append(PublishResult(envelope.message_id, PublishOutcome.FAILED, reason))
            else:
                results.append(None)
                good.append(index)
        if good:
            answered = await self._publish_window(
                session, [envelopes[i] for i in good], [ids[i] for i in good], deadline
            )
            for index, result in zip(good, answered, strict=True):
                results[index] = result
        return [result for result in results if result is not None]

    def _properties(self, envelope: Envelope) -> aiormq.spec.Basic.Properties:
        # priority 0 as aio_pika.Message always sent it, so the frames stay as they were.
        return aiormq.spec.Basic.Properties(**envelope.amqp_properties(self._wire), priority=0)

    def _window_ended(self, ids: list[str], ended: asyncio.Future[None]) -> None:
        in_flight = self._in_flight
        for message_id in ids:
            if in_flight.get(message_id) is ended:
                del in_flight[message_id]
        ended.set_result(None)

    @staticmethod
    def _failed(envelopes: Sequence[Envelope], reason: str) -> list[PublishResult]:
        return [PublishResult(e.message_id, PublishOutcome.FAILED, reason) for e in envelopes]

    def _result(self, envelope: Envelope, answer: object) -> PublishResult:
        message_id = envelope.message_id
        if isinstance(answer, aiormq.spec.Basic.Ack):
            return PublishResult(message_id, PublishOutcome.CONFIRMED)
        if isinstance(answer, DeliveredMessage):
            # The channel does not raise on returns (on_return_raises=False): the returned
            # message itself is the answer.
            frame = answer.delivery
            reason = frame.reply_text if isinstance(frame, aiormq.spec.Basic.Return) else None
            return PublishResult(message_id, PublishOutcome.RETURNED, reason or "returned")
        if isinstance(answer, DeliveryError):
            kind = type(answer.frame).__name__ if answer.frame is not None else "Nack"
            return PublishResult(message_id, PublishOutcome.NACKED, f"broker answered Basic.{kind}")
        if isinstance(answer, asyncio.CancelledError):
            # aiormq cancels pending confirms when the connection closes under them.
            return PublishResult(
                message_id, PublishOutcome.FAILED, "connection closed before the confirm"
            )
        if isinstance(answer, TimeoutError):
            return PublishResult(
                message_id,
                PublishOutcome.FAILED,
                f"no confirm within {self._confirm_timeout:g}s",
            )
        if isinstance(answer, BaseException):
            return PublishResult(message_id, PublishOutcome.FAILED, self._scrub(answer))
        return PublishResult(
            message_id, PublishOutcome.FAILED, f"unexpected answer {type(answer).__name__}"
        )

    # --- queues ---------------------------------------------------------------------------

    async def declare_queue(
        self, queue: str, patterns: Sequence[str], *, exchange: str | None = None
    ) -> None:
        """Declare durable ``queue`` (``x-queue-type`` per config) bound by each pattern.

        Every pattern is checked before anything is declared (``ConfigurationError``).
        Idempotent: declaring again adds bindings and keeps messages. A queue that
        exists with other arguments raises ``BrokerError`` saying so.

        ``exchange``: bind on that exchange instead of the wire format's, declaring
        it first as a durable topic exchange (``BrokerError`` if it exists otherwise).
        ``publish`` never sends there; the relay consumes receipts this way.
        """
        for pattern in patterns:
            try:
                validate_pattern(pattern)
            except ValueError as e:
                raise ConfigurationError(str(e)) from None
        _check_queue_name(queue)
        if exchange is not None:
            _check_exchange_name(exchange)
        target = self._wire.exchange if exchange is None else exchange
        session = self._require_session()
        declaring_exchange = False
        try:
            async with self._one_shot_channel(session) as channel:
                if target != self._wire.exchange:
                    # connect() declared only the wire format's exchange.
                    declaring_exchange = True
                    await channel.exchange_declare(
                        target, exchange_type="topic", durable=True, timeout=self._confirm_timeout
                    )
                    declaring_exchange = False
                await channel.queue_declare(
                    queue,
                    durable=True,
                    arguments={"x-queue-type": self._queue_type},
                    timeout=self._confirm_timeout,
                )
                for pattern in dict.fromkeys(patterns):
                    await channel.queue_bind(queue, target, pattern, timeout=self._confirm_timeout)
        except ChannelPreconditionFailed as e:
            if declaring_exchange:
                raise BrokerError(
                    f"exchange {target!r} exists with other settings ({self._scrub(e)}); "
                    "it must be a durable topic exchange"
                ) from None
            raise BrokerError(
                f"queue {queue!r} already exists with other arguments ({self._scrub(e)}); "
                f"delete it, or configure queue_type to match it (now {self._queue_type!r})"
            ) from None
        except _DRIVER_ERRORS as e:
            raise BrokerError(f"cannot declare queue {queue!r}: {self._scrub(e)}") from None
        except asyncio.CancelledError:
            if _cancelling():
                raise
            # aiormq cancels the RPCs in flight when the connection closes under them.
            raise BrokerError(
                f"cannot declare queue {queue!r}: the connection closed meanwhile"
            ) from None

    async def consume(
        self, queue: str, *, prefetch: int = 32
    ) -> AsyncGenerator[RabbitMQDelivery, None]:
        """Yield deliveries from ``queue``, at most ``prefetch`` unacknowledged at a time.

        Runs on a channel of its own. Survives a lost connection (aio-pika restores
        the consumer; deliveries from before it can no longer be settled and come
        again). Ends when ``close()`` is called. A message that is not an outbox
        envelope is logged and nacked without requeue (to the queue's dead-letter
        exchange, if it has one), and consuming goes on. Raises ``BrokerError`` if the
        queue does not exist or is deleted while consuming.

        Once the generator is closed no more deliveries are taken; its channel stays
        open until every delivery it yielded is settled, then closes.
        """
        if not isinstance(prefetch, int) or not 1 <= prefetch <= _MAX_PREFETCH:
            raise ConfigurationError(f"prefetch must be between 1 and {_MAX_PREFETCH}")
        _check_queue_name(queue)
        session = self._require_session()
        channel = session.connection.channel(publisher_confirms=False)
        subscription = _Subscription(queue, channel, self._confirm_timeout)
        amqp_queue: AbstractRobustQueue | None = None
        session.subscriptions.add(subscription)
        try:
            try:
                await self._check_queue_exists(session, queue)
                async with asyncio.timeout(self._confirm_timeout):
                    await channel.initialize()
                    await channel.set_qos(prefetch_count=prefetch)
                    await subscription.watch_cancel()
                    channel.reopen_callbacks.add(subscription.on_reopen)
                    amqp_queue = await channel.declare_queue(queue, passive=True)
                    subscription.consumer_tag = await amqp_queue.consume(
                        subscription.on_message, no_ack=False
                    )
            except (Exception, asyncio.CancelledError) as e:
                # aiormq fails the RPCs in flight when the connection closes, with
                # CancelledError among others: only a cancel of this task is one.
                if session.closing.is_set() and not _cancelling():
                    return  # close() came first: end quietly, as documented
                if not isinstance(e, Exception):
                    raise
                if isinstance(e, BrokerError):
                    raise
                raise BrokerError(f"cannot consume from {queue!r}: {self._scrub(e)}") from None
            while not session.closing.is_set():
                item = await subscription.buffer.get()
                if isinstance(item, _Stop):
                    break
                if isinstance(item, BrokerError):
                    raise item
                if _is_stale(item):
                    continue  # its channel died; the broker redelivers it on the new one
                envelope = await self._envelope_or_reject(queue, item)
                if envelope is None:
                    continue
                delivery = RabbitMQDelivery(item, envelope, subscription)
                subscription.outstanding.add(delivery)
                yield delivery
        finally:
            session.subscriptions.discard(subscription)
            await subscription.finish(amqp_queue)

    async def _envelope_or_reject(
        self, queue: str, message: AbstractIncomingMessage
    ) -> Envelope | None:
        try:
            return Envelope.from_amqp(
                body=message.body,
                routing_key=message.routing_key,
                message_id=message.message_id,
                content_type=message.content_type,
                headers=message.headers,
                timestamp=message.timestamp,
            )
        except MalformedMessageError as e:
            reason = str(e)
        # Invariant 5: a malformed message must not stop the worker; the queue's
        # dead-letter exchange (if any) keeps it, the log says why.
        _log.warning(
            "malformed message rejected",
            queue=queue,
            message_id=message.message_id,
            topic=message.routing_key,
            reason=reason,
        )
        with contextlib.suppress(*_DRIVER_ERRORS):
            await message.nack(requeue=False)
        return None

    async def _check_queue_exists(self, session: _Session, queue: str) -> None:
        # A passive declare on the consumer's robust channel would close it with 404 and
        # set aio-pika restoring it; a throwaway channel keeps that failure contained.
        try:
            async with self._one_shot_channel(session) as channel:
                await channel.queue_declare(queue, passive=True, timeout=self._confirm_timeout)
        except ChannelNotFoundEntity:
            raise BrokerError(f"queue {queue!r} does not exist; declare_queue() it first") from None
        except _DRIVER_ERRORS as e:
            raise BrokerError(f"cannot check queue {queue!r}: {self._scrub(e)}") from None

    @contextlib.asynccontextmanager
    async def _one_shot_channel(
        self, session: _Session
    ) -> AsyncIterator[aiormq.abc.AbstractChannel]:
        transport = session.connection.transport
        if transport is None or not self.connected:
            raise BrokerError(f"not connected to RabbitMQ at {self._safe_url}")
        channel = await transport.connection.channel(
            publisher_confirms=False, timeout=self._confirm_timeout
        )
        try:
            yield channel
        finally:
            if not channel.is_closed:
                with contextlib.suppress(*_DRIVER_ERRORS):
                    await channel.close()

    # --- helpers --------------------------------------------------------------------------

    def _require_session(self) -> _Session:
        session = self._session
        if session is None:
            raise BrokerError("the RabbitMQ broker is not connected; call connect() first")
        return session

    def _scrub(self, error: object) -> str:
        """A short description of ``error`` without the URL's password."""
        return _describe(error, self._url, self._password)


def _describe(error: object, url: str = "", password: str = "") -> str:
    text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
    if isinstance(error, BaseException) and not str(error):
        text = type(error).__name__
    if url:
        text = text.replace(url, redact_url(url))
    if password:
        text = text.replace(password, "***")
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 1] + "…"


def _cancelling() -> bool:
    """True if the current task was asked to stop (not just handed a driver's CancelledError)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _is_stale(message: AbstractIncomingMessage) -> bool:
    try:
        message.channel  # noqa: B018 (aio-pika raises here when the channel is closed)
    except AMQPError:
        return True
    return False


async def _close_quietly(connection: AbstractRobustConnection | None) -> None:
    if connection is not None:
        with contextlib.suppress(Exception):
            await connection.close()


def _check_url(url: object) -> str:
    if not isinstance(url, str) or not url:
        raise ConfigurationError("url must be an AMQP URL like amqp://user:password@host:5672/")
    try:
        parsed = URL(url)
    except ValueError:
        raise ConfigurationError(f"url {redact_url(url)} is not a valid URL") from None
    if parsed.scheme not in ("amqp", "amqps") or not parsed.host:
        raise ConfigurationError(
            f"url {redact_url(url)} must look like amqp://user:password@host:5672/vhost "
            "(or amqps:// for TLS)"
        )
    return url


def _positive_seconds(name: str, value: object) -> float:
    if not isinstance(value, timedelta) or value <= timedelta(0):
        raise ConfigurationError(f"{name} must be a positive timedelta, not {value!r}")
    return value.total_seconds()


def _check_exchange_name(exchange: object) -> None:
    if not isinstance(exchange, str) or not exchange or len(exchange.encode()) > _MAX_NAME_BYTES:
        raise ConfigurationError(f"exchange name must be a str of 1 to {_MAX_NAME_BYTES} bytes")


def _check_queue_name(queue: object) -> None:
    if not isinstance(queue, str) or not queue or len(queue.encode()) > _MAX_NAME_BYTES:
        raise ConfigurationError(f"queue name must be a str of 1 to {_MAX_NAME_BYTES} bytes")
