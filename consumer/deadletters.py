"""A consumer group's dead-letter queue, for operators: list, replay, purge.

``Consumer`` parks a message it gives up on in ``<prefix>.<group>.dead``: a copy
of the original (same ``message_id``, properties, body and ``x-outbox-key``)
with headers saying why (``x-outbox-dead-reason``), after how many attempts
(``x-outbox-attempt``), of which topic (``x-outbox-topic``), in which group
(``x-outbox-group``) and when (``x-outbox-dead-at``). The functions here work on
that queue over AMQP alone: no database, no running worker. ``outbox dead ...
--group G`` is their command line.

AMQP 0-9-1 has no way to read a queue without taking its messages, so looking
at dead letters means consuming them without acknowledging, then giving back in
one go every one that was not replayed or purged. What an operator can see of
that:

* RabbitMQ marks each message looked at as redelivered (the ``redelivered``
  flag; quorum queues also count it in ``x-delivery-count``).
* Classic queues put a given-back message back at its old place. Quorum queues
  without a delivery limit (RabbitMQ 3.x) put them at the back, in order: looking
  at the first N of a longer queue moves those N behind the rest.
* A quorum queue drops a message given back more often than its delivery limit
  (20 by default since RabbitMQ 4.0), and the dead-letter queue has no
  dead-letter exchange of its own to catch it. So a message that has been given
  back once already (``x-delivery-count`` >= 1) is not given back again but
  *renewed*: an identical copy goes to the tail of the queue with publisher
  confirms, then the old one is acknowledged. A crash between the two leaves
  two copies, never none.
* Only the messages ready when a call starts are looked at: dead letters that
  arrive meanwhile wait for the next call, and messages another client holds
  unacknowledged at that moment (a second operator command) are not seen.

Every change is confirm-then-ack: a replayed message is acknowledged in the
dead-letter queue only after the broker has confirmed its copy in the main
queue, so a crash or a lost connection can duplicate a message (the inbox makes
the second copy harmless) but cannot lose one.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import aio_pika
import aiormq

from consumer.config import ConsumerConfig, validate_group
from consumer.consumer import ATTEMPT, DEAD_REASON, LAST_ERROR, TOPIC
from outbox.errors import BrokerError, ConfigurationError, OutboxError
from outbox.ids import normalize_message_id
from outbox.logs import get_logger, redact_url

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterable

    from aio_pika.abc import (
        AbstractChannel,
        AbstractConnection,
        AbstractIncomingMessage,
        AbstractQueue,
    )
    from structlog.typing import FilteringBoundLogger

__all__ = [
    "DeadLetter",
    "count_dead_letters",
    "dead_letter_queue",
    "list_dead_letters",
    "main_queue",
    "purge_dead_letters",
    "replay_dead_letters",
]

# Written by Consumer._dead_letter next to the constants imported above.
GROUP = "x-outbox-group"
DEAD_AT = "x-outbox-dead-at"
KEY = "x-outbox-key"
# Set by quorum queues on a redelivery: how often the message was given back.
DELIVERY_COUNT = "x-delivery-count"

# Headers that describe the message's death, not the message: a replayed copy drops them.
_DEATH_HEADERS = frozenset({DEAD_REASON, GROUP, DEAD_AT, LAST_ERROR, DELIVERY_COUNT})

_TIMEOUT = 30.0
"""Seconds any single broker operation may take before the call fails."""
_IDLE = 5.0
"""Seconds to wait for the next delivery before concluding that another client holds the
rest of the messages counted at the start (they are then not looked at)."""
_MAX_PREFETCH = 65535  # basic.qos prefetch_count is a 16-bit field
_BATCH = 100
"""Replayed copies published before their confirms are awaited together."""


@dataclass(frozen=True, kw_only=True)
class DeadLetter:
    """One message in a dead-letter queue, as its headers describe it (never its payload)."""

    message_id: str | None
    """The original AMQP ``message_id`` (None if the message had none: it was malformed)."""
    topic: str
    """``x-outbox-topic``: the topic it was published under ('' if unknown)."""
    key: str | None
    """``x-outbox-key``, the ordering key, if any."""
    reason: str
    """``x-outbox-dead-reason``: why the consumer gave up ('' if absent)."""
    attempts: int
    """``x-outbox-attempt``: handler attempts made (0 if unknown)."""
    group: str | None
    """``x-outbox-group``: the consumer group that dead-lettered it."""
    dead_at: datetime | None
    """``x-outbox-dead-at``: when it was dead-lettered."""
    size: int
    """Body size in bytes."""

    def to_dict(self) -> dict[str, Any]:
        """Return the dead letter as JSON-ready values (``dead_at`` as ISO 8601)."""
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["dead_at"] = self.dead_at.isoformat() if self.dead_at else None
        return out


# --- names ------------------------------------------------------------------------------------


def main_queue(group: str, prefix: str = "outbox") -> str:
    """The group's main queue, ``<prefix>.<group>``: where a replayed message goes.

    Raises ``ConfigurationError`` for a group or prefix a ``Consumer`` would refuse.
    """
    validate_group(group)
    ConsumerConfig(queue_prefix=prefix).validate()
    return f"{prefix}.{group}"


def dead_letter_queue(group: str, prefix: str = "outbox") -> str:
    """The group's dead-letter queue, ``<prefix>.<group>.dead`` (as ``Consumer.dead_queue``)."""
    return f"{main_queue(group, prefix)}.dead"


# --- operations -------------------------------------------------------------------------------


async def count_dead_letters(amqp_url: str, queue: str) -> int:
    """Return how many messages ``queue`` holds ready (not counting any held unacknowledged).

    Raises ``BrokerError`` if the broker cannot be reached or the queue does not exist.
    """
    async with _connection(amqp_url) as connection:
        channel = await connection.channel()
        count = await _ready(channel, queue, amqp_url)
        await channel.close()
        return count


async def list_dead_letters(amqp_url: str, queue: str, limit: int = 100) -> list[DeadLetter]:
    """Return up to ``limit`` dead letters from the head of ``queue``, in queue order.

    Takes nothing away: every message looked at is given back (see the module
    docstring for what that does to its ``redelivered`` flag, its place in a
    quorum queue, and why one may be renewed). Raises ``ConfigurationError`` for
    ``limit`` < 1 and ``BrokerError`` if the broker fails or the queue does not
    exist.
    """
    if limit < 1:
        raise ConfigurationError(f"limit must be >= 1, got {limit}")
    async with _connection(amqp_url) as connection, _Look(connection, queue, amqp_url) as look:
        return [_describe(message) async for message in look.messages(limit)]


async def replay_dead_letters(
    amqp_url: str,
    queue: str,
    target_queue: str,
    *,
    message_ids: Iterable[str] | None = None,
    limit: int | None = None,
) -> int:
    """Move dead letters from ``queue`` back to ``target_queue`` (the group's main queue).

    Selects the messages whose ``message_id`` is in ``message_ids`` (UUIDs match
    in any case; every copy of an id goes), or every message when
    ``message_ids`` is None; ``limit`` caps how many messages from the head of
    the queue are examined. Returns how many were replayed.

    Each copy is published through the default exchange with publisher
    confirms and ``mandatory``, keeping the body, ``message_id``, the other
    properties and every header but the death's (``x-outbox-dead-reason``,
    ``-group``, ``-dead-at``, ``-last-error``, ``x-delivery-count``);
    ``x-outbox-topic`` stays (the consumer routes by it) and ``x-outbox-attempt``
    restarts at 1, so the handler gets its full ``max_attempts`` again. The dead
    copy is acknowledged only after its replayed copy is confirmed. A replayed
    message is handled by the group's unordered path: per-key order does not
    hold for it.

    Raises ``BrokerError`` if the broker fails, either queue does not exist, or
    a copy is refused; messages not replayed by then stay in ``queue``.
    """
    if target_queue == queue:
        raise ConfigurationError(f"replay into the queue it comes from ({queue!r}) does nothing")
    wanted = _wanted(message_ids)
    if limit is not None and limit < 1:
        raise ConfigurationError(f"limit must be >= 1, got {limit}")
    log = get_logger("outbox.deadletters").bind(queue=queue, target_queue=target_queue)
    replayed = 0
    async with _connection(amqp_url) as connection:
        # Before taking anything: a copy routed to a missing queue would be returned.
        check = await connection.channel()
        await _ready(check, target_queue, amqp_url)
        await check.close()
        async with _Look(connection, queue, amqp_url) as look:
            batch: list[AbstractIncomingMessage] = []
            async for message in look.messages(limit):
                if wanted is None or _canonical(message.message_id) in wanted:
                    batch.append(message)
                if len(batch) == _BATCH:
                    replayed += await _replay(look, batch, target_queue, log, replayed)
                    batch = []
            if batch:
                replayed += await _replay(look, batch, target_queue, log, replayed)
    log.info("deadletter.replayed", count=replayed, selected=_selected(wanted))
    return replayed


async def purge_dead_letters(
    amqp_url: str,
    queue: str,
    *,
    message_ids: Iterable[str] | None = None,
    all: bool = False,  # shadows the builtin to match the CLI's --all
) -> int:
    """Delete dead letters from ``queue`` for good; return how many were deleted.

    Selects by ``message_ids`` (every copy of each id) or ``all=True`` (a
    ``queue.purge``: every ready message; messages another client holds
    unacknowledged survive). Exactly one of the two is required, otherwise
    ``ConfigurationError`` and nothing is deleted. Each deleted message is
    logged as ``deadletter.message_purged`` with its reason. Raises
    ``BrokerError`` if the broker fails or the queue does not exist.
    """
    if all and message_ids is not None:
        raise ConfigurationError("purge: give message_ids or all=True, not both")
    if not all and message_ids is None:
        raise ConfigurationError("purge: say which dead letters: message_ids or all=True")
    log = get_logger("outbox.deadletters").bind(queue=queue)
    async with _connection(amqp_url) as connection:
        if all:
            channel = await connection.channel()
            declared = await _declare(channel, queue, amqp_url)
            purged = (await declared.purge(timeout=_TIMEOUT)).message_count or 0
            await channel.close()
            log.info("deadletter.purged", count=purged, selected="all")
            return purged
        wanted = _wanted(message_ids)
        assert wanted is not None
        purged = 0
        async with _Look(connection, queue, amqp_url) as look:
            async for message in look.messages(None):
                if _canonical(message.message_id) not in wanted:
                    continue
                await look.settle(message)
                purged += 1
                dead = _describe(message)
                log.info(
                    "deadletter.message_purged",
                    message_id=dead.message_id,
                    topic=dead.topic,
                    key=dead.key,
                    reason=dead.reason,
                )
    log.info("deadletter.purged", count=purged, selected=_selected(wanted))
    return purged


# --- looking at a queue -----------------------------------------------------------------------


class _Look:
    """Consume the messages ready in a queue without acknowledging them; give back the rest.

    Inside ``async with``, ``messages()`` yields deliveries in queue order and
    ``settle()`` acknowledges one for good (after its replay was confirmed, or to
    purge it). On a normal exit every unsettled message goes back to the queue
    in one ``basic.nack(multiple, requeue)`` -- except those a quorum queue has
    counted a return for already, which are renewed instead (module docstring).
    On an error exit the channel is closed, which returns them just the same.
    """

    def __init__(self, connection: AbstractConnection, queue: str, amqp_url: str) -> None:
        self._connection = connection
        self._name = queue
        self._url = amqp_url
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._ready = 0
        self._deliveries: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._unsettled: dict[int, AbstractIncomingMessage] = {}

    async def __aenter__(self) -> _Look:
        # One confirm channel for consuming and for renewing: a channel error then returns
        # every unacknowledged message at once, and a renewal is confirmed before its ack.
        self._channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        self._queue = await _declare(self._channel, self._name, self._url)
        self._ready = self._queue.declaration_result.message_count or 0
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        assert self._channel is not None
        try:
            if exc_type is None:
                await self._give_back()
        finally:
            # Closing returns whatever is still unacknowledged, including deliveries that
            # arrived after the consumer was cancelled: nothing taken is ever kept.
            with contextlib.suppress(Exception):
                await self._channel.close()

    async def messages(self, limit: int | None) -> AsyncIterator[AbstractIncomingMessage]:
        """Yield up to ``limit`` (None: all) of the messages that were ready at the start."""
        assert self._queue is not None
        assert self._channel is not None
        wanted = self._ready if limit is None else min(self._ready, limit)
        if wanted == 0:
            return
        # Every unsettled message stays in flight until the end, so the window must hold
        # them all; beyond 65535 unsettled ones the look ends early (after _IDLE).
        await self._channel.set_qos(prefetch_count=min(wanted, _MAX_PREFETCH), timeout=_TIMEOUT)
        self._tag = await self._queue.consume(self._deliveries.put, timeout=_TIMEOUT)
        for _ in range(wanted):
            try:
                message = await asyncio.wait_for(self._deliveries.get(), _IDLE)
            except TimeoutError:
                return  # the rest is held by another client (or was taken meanwhile)
            assert message.delivery_tag is not None
            self._unsettled[message.delivery_tag] = message
            yield message

    async def settle(self, message: AbstractIncomingMessage) -> None:
        """Acknowledge ``message``: it leaves the queue for good."""
        assert message.delivery_tag is not None
        await message.ack()
        del self._unsettled[message.delivery_tag]

    async def publish(self, message: aio_pika.Message, queue: str) -> None:
        """Publish ``message`` to ``queue`` and wait for the broker's confirm.

        Raises if the broker nacks it or cannot route it (``mandatory``: a queue
        deleted meanwhile must not swallow the copy silently).
        """
        assert self._channel is not None
        await self._channel.default_exchange.publish(
            message, routing_key=queue, mandatory=True, timeout=_TIMEOUT
        )

    async def _give_back(self) -> None:
        assert self._queue is not None
        if self._tag is not None:
            # No new deliveries: a message given back must not come round to us again.
            await self._queue.cancel(self._tag, timeout=_TIMEOUT)
        for tag in sorted(self._unsettled):
            message = self._unsettled[tag]
            count = (message.headers or {}).get(DELIVERY_COUNT)
            if isinstance(count, int) and count >= 1:
                await self._renew(message)
        if self._unsettled:
            last = self._unsettled[max(self._unsettled)]
            await last.nack(multiple=True, requeue=True)
            self._unsettled.clear()

    async def _renew(self, message: AbstractIncomingMessage) -> None:
        """Replace ``message`` by a fresh copy at the tail (its return count starts at 0)."""
        headers = {k: v for k, v in (message.headers or {}).items() if k != DELIVERY_COUNT}
        try:
            await self.publish(_copy(message, headers), self._name)
        except Exception as e:
            # Not renewed: it is given back as is, one return closer to the limit.
            get_logger("outbox.deadletters").warning(
                "deadletter.renew_failed",
                queue=self._name,
                message_id=message.message_id,
                error=f"{type(e).__name__}: {e}"[:200],
            )
            return
        await self.settle(message)


# --- helpers ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _connection(amqp_url: str) -> AsyncIterator[AbstractConnection]:
    """A plain (not robust) connection: a tool that retried silently could act twice."""
    where = redact_url(amqp_url)
    try:
        connection = await aio_pika.connect(
            amqp_url,
            timeout=_TIMEOUT,
            client_properties={"connection_name": "outbox dead-letter tool"},
        )
    except Exception as e:
        # from None: the driver's error may echo the URL it was given, password included.
        raise BrokerError(
            f"cannot connect to RabbitMQ at {where}: {type(e).__name__}: {e}"
        ) from None
    try:
        async with connection:
            yield connection
    except OutboxError:
        raise
    except TimeoutError as e:  # before OSError, of which it is a subclass
        raise BrokerError(
            f"RabbitMQ at {where} did not answer within {_TIMEOUT:.0f}s; nothing unconfirmed "
            "was acknowledged, so every message not yet moved is still in its queue"
        ) from e
    except (
        aiormq.exceptions.AMQPError,
        aiormq.exceptions.ChannelInvalidStateError,
        OSError,
    ) as e:
        raise BrokerError(f"RabbitMQ at {where} failed: {type(e).__name__}: {e}") from e


async def _declare(channel: AbstractChannel, queue: str, amqp_url: str) -> AbstractQueue:
    """The existing queue ``queue`` (passive declare: never creates one)."""
    try:
        return await channel.declare_queue(queue, passive=True, timeout=_TIMEOUT)
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise BrokerError(
            f"no queue {queue!r} on RabbitMQ at {redact_url(amqp_url)}: check the group and "
            "the queue prefix; the consumer declares its queues when it first starts"
        ) from None


async def _ready(channel: AbstractChannel, queue: str, amqp_url: str) -> int:
    declared = await _declare(channel, queue, amqp_url)
    return declared.declaration_result.message_count or 0


async def _replay(
    look: _Look,
    batch: list[AbstractIncomingMessage],
    target_queue: str,
    log: FilteringBoundLogger,
    done_before: int,
) -> int:
    """Publish ``batch`` to ``target_queue``; ack each dead copy whose copy was confirmed."""
    # Published together, confirmed together: one round trip per batch, not per message.
    results = await asyncio.gather(
        *(
            look.publish(_copy(message, _replayed_headers(message)), target_queue)
            for message in batch
        ),
        return_exceptions=True,
    )
    replayed = 0
    failure: tuple[AbstractIncomingMessage, BaseException] | None = None
    for message, result in zip(batch, results, strict=True):
        if isinstance(result, BaseException):
            failure = failure or (message, result)
            continue  # its dead copy stays: it is given back with the rest
        await look.settle(message)
        replayed += 1
        dead = _describe(message)
        log.info(
            "deadletter.message_replayed",
            message_id=dead.message_id,
            topic=dead.topic,
            key=dead.key,
            attempts=dead.attempts,
            reason=dead.reason,
        )
    if failure is not None:
        message, error = failure
        raise BrokerError(
            f"replaying {message.message_id} to {target_queue!r} failed "
            f"({type(error).__name__}: {error}); {done_before + replayed} replayed before it, "
            "the rest are still in the dead-letter queue"
        ) from error
    return replayed


def _replayed_headers(message: AbstractIncomingMessage) -> dict[str, Any]:
    headers = {k: v for k, v in (message.headers or {}).items() if k not in _DEATH_HEADERS}
    headers[ATTEMPT] = 1
    return headers


def _copy(message: AbstractIncomingMessage, headers: dict[str, Any]) -> aio_pika.Message:
    """The same message with ``headers``, persistent.

    ``user_id`` is left out because RabbitMQ refuses a publish whose ``user_id``
    is not the publishing connection's user, and ``expiration`` because a
    per-message TTL that ran while the message was dead would drop the copy.
    """
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
    )


def _describe(message: AbstractIncomingMessage) -> DeadLetter:
    headers = message.headers or {}
    attempts = headers.get(ATTEMPT)
    return DeadLetter(
        message_id=message.message_id,
        topic=_text(headers.get(TOPIC)) or "",
        key=_text(headers.get(KEY)),
        reason=_text(headers.get(DEAD_REASON)) or "",
        attempts=attempts if isinstance(attempts, int) and attempts >= 0 else 0,
        group=_text(headers.get(GROUP)),
        dead_at=_time(headers.get(DEAD_AT)),
        size=len(message.body),
    )


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return None if value is None else str(value)


def _time(value: object) -> datetime | None:
    text = _text(value)
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None  # written by someone else: show it as unknown rather than fail the listing


def _canonical(message_id: str | None) -> str | None:
    """A UUID in canonical form, so ids match in any case; anything else as it is.

    Dead-letter queues hold malformed messages too, whose id may be no UUID at all.
    """
    if message_id is None:
        return None
    try:
        return normalize_message_id(message_id)
    except ValueError:
        return message_id


def _wanted(message_ids: Iterable[str] | None) -> set[str | None] | None:
    if message_ids is None:
        return None
    if isinstance(message_ids, str):
        raise ConfigurationError("message_ids takes a collection of ids, not a single string")
    return {_canonical(m) for m in message_ids}


def _selected(wanted: set[str | None] | None) -> str:
    return "all" if wanted is None else f"{len(wanted)} id(s)"
