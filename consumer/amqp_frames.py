"""A cheaper frame reader for the connection a consumer receives its deliveries on.

Every delivery is three frames (``basic.deliver``, content header, body), and
aiormq reads each through an ``asyncio.Lock``, a ``BytesIO`` and three
``readexactly`` calls, then pamqp decodes it with generic per-field machinery:
together about as much CPU as everything else the event loop does for a message.
``read_frames_fast`` gives the connection's frame receiver a ``get_frame`` that
reads a frame in two ``readexactly`` calls and decodes the three delivery frames
with code written for them (``unmarshal``). The result is the same pamqp objects
with the same values; every other frame, and any header this code does not cover
(a second property-flags word), goes to pamqp as before.
"""

from __future__ import annotations

import asyncio
import struct
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pamqp.frame
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError
from pamqp import commands
from pamqp.body import ContentBody
from pamqp.decode import embedded_value
from pamqp.exceptions import PAMQPException
from pamqp.header import ContentHeader

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    import aiormq.abc

__all__ = ["read_frames_fast", "unmarshal"]

_FRAME_HEADER = struct.Struct(">BHI")  # type, channel, payload size
_CONTENT_HEADER = struct.Struct(">HHQH")  # class, weight, body size, property flags
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_LONG_STRING = ord("S")
_FRAME_METHOD, _FRAME_HEADER_TYPE, _FRAME_BODY = 1, 2, 3
_FRAME_END = 0xCE
_DELIVER = commands.Basic.Deliver.index.to_bytes(4, "big")
_Deliver = commands.Basic.Deliver
_Properties = commands.Basic.Properties

# Basic.Properties flag bits, in wire order.
_CONTENT_TYPE, _CONTENT_ENCODING, _HEADERS, _DELIVERY_MODE = 0x8000, 0x4000, 0x2000, 0x1000
_PRIORITY, _CORRELATION_ID, _REPLY_TO, _EXPIRATION = 0x0800, 0x0400, 0x0200, 0x0100
_MESSAGE_ID, _TIMESTAMP, _TYPE, _USER_ID = 0x0080, 0x0040, 0x0020, 0x0010
_APP_ID, _CLUSTER_ID, _MORE_FLAGS = 0x0008, 0x0004, 0x0001

_STRINGS_BEFORE_TIMESTAMP = (
    (_CORRELATION_ID, "correlation_id"),
    (_REPLY_TO, "reply_to"),
    (_EXPIRATION, "expiration"),
    (_MESSAGE_ID, "message_id"),
)
_STRINGS_AFTER_TIMESTAMP = (
    (_TYPE, "message_type"),
    (_USER_ID, "user_id"),
    (_APP_ID, "app_id"),
    (_CLUSTER_ID, "cluster_id"),
)

_DECODE_ERRORS = (PAMQPException, ValueError, struct.error, IndexError, UnicodeDecodeError)


def unmarshal(frame: bytes) -> tuple[int, int, Any]:
    """Decode one whole frame (header to end octet) as ``pamqp.frame.unmarshal`` does.

    Returns (bytes used, channel, frame object). Raises ``ValueError`` (or pamqp's
    ``UnmarshalingException``) for a malformed frame.
    """
    kind, channel, size = _FRAME_HEADER.unpack_from(frame)
    if not size or len(frame) != size + 8 or frame[-1] != _FRAME_END:
        return pamqp.frame.unmarshal(frame)  # a heartbeat, or says what is wrong
    if kind == _FRAME_BODY:
        return size + 8, channel, ContentBody(frame[7:-1])
    if kind == _FRAME_METHOD and frame[7:11] == _DELIVER:
        return size + 8, channel, _deliver(frame, 11)
    if kind == _FRAME_HEADER_TYPE:
        header = _content_header(frame)
        if header is not None:
            return size + 8, channel, header
    return pamqp.frame.unmarshal(frame)


def _short_str(data: bytes, pos: int) -> tuple[int, str]:
    end = pos + 1 + data[pos]
    if end > len(data) - 1:
        raise ValueError("short string runs past the end of the frame")
    return end, data[pos + 1 : end].decode()


def _field_table(frame: bytes, pos: int) -> tuple[int, dict[str, Any]]:
    """The table at ``pos``: long strings read here, any other value by pamqp."""
    (length,) = _U32.unpack_from(frame, pos)
    pos += 4
    end = pos + length
    if end > len(frame) - 1:
        raise ValueError("field table runs past the end of the frame")
    table: dict[str, Any] = {}
    while pos < end:
        pos, key = _short_str(frame, pos)
        if frame[pos] == _LONG_STRING:
            (size,) = _U32.unpack_from(frame, pos + 1)
            start, pos = pos + 5, pos + 5 + size
            raw = frame[start:pos]
            try:
                table[key] = raw.decode()
            except UnicodeDecodeError:  # as pamqp: bytes that are not UTF-8 stay bytes
                table[key] = raw
        else:
            used, table[key] = embedded_value(frame[pos:end])
            pos += used
    if pos != end:
        raise ValueError("field table entries run past the table's end")
    return end, table


def _deliver(frame: bytes, pos: int) -> commands.Basic.Deliver:
    pos, consumer_tag = _short_str(frame, pos)
    (delivery_tag,) = _U64.unpack_from(frame, pos)
    redelivered = bool(frame[pos + 8] & 1)
    pos, exchange = _short_str(frame, pos + 9)
    pos, routing_key = _short_str(frame, pos)
    # Not through __init__: its validation is for frames we send, and costs a call.
    method = _Deliver.__new__(_Deliver)
    method.consumer_tag = consumer_tag
    method.delivery_tag = delivery_tag
    method.redelivered = redelivered
    method.exchange = exchange
    method.routing_key = routing_key
    return method


def _content_header(frame: bytes) -> ContentHeader | None:
    class_id, weight, body_size, flags = _CONTENT_HEADER.unpack_from(frame, 7)
    if flags & _MORE_FLAGS or class_id != _Properties.frame_id:
        return None
    pos = 21
    p = _Properties.__new__(_Properties)
    p.content_type = p.content_encoding = p.headers = p.delivery_mode = p.priority = None
    p.correlation_id = p.reply_to = p.expiration = p.message_id = p.timestamp = None
    p.message_type = p.user_id = p.app_id = None
    p.cluster_id = ""  # pamqp's default when the broker leaves it out
    if flags & _CONTENT_TYPE:
        pos, p.content_type = _short_str(frame, pos)
    if flags & _CONTENT_ENCODING:
        pos, p.content_encoding = _short_str(frame, pos)
    if flags & _HEADERS:
        pos, p.headers = _field_table(frame, pos)
    if flags & _DELIVERY_MODE:
        p.delivery_mode = frame[pos]
        pos += 1
    if flags & _PRIORITY:
        p.priority = frame[pos]
        pos += 1
    for flag, name in _STRINGS_BEFORE_TIMESTAMP:
        if flags & flag:
            pos, value = _short_str(frame, pos)
            setattr(p, name, value)
    if flags & _TIMESTAMP:
        (seconds,) = _U64.unpack_from(frame, pos)
        pos += 8
        # As pamqp: a value past the year 2106 is taken as milliseconds.
        p.timestamp = datetime.fromtimestamp(
            seconds / 1000.0 if seconds > 0xFFFFFFFF else seconds, tz=UTC
        )
    for flag, name in _STRINGS_AFTER_TIMESTAMP:
        if flags & flag:
            pos, value = _short_str(frame, pos)
            setattr(p, name, value)
    header = ContentHeader.__new__(ContentHeader)
    header.class_id = class_id
    header.weight = weight
    header.body_size = body_size
    header.properties = p
    return header


def read_frames_fast(connection: aiormq.abc.AbstractConnection) -> bool:
    """Have ``connection``'s reader use ``unmarshal``; True if it does (now or already).

    aiormq keeps the frame receiver only as a local of the connection's reader
    task, so it is found there; with an aiormq laid out otherwise nothing changes
    and the connection reads as before. Safe to call again (after a reconnect the
    robust connection has a new aiormq connection, and this installs on that one).
    """
    receiver = _frame_receiver(connection)
    if receiver is None:
        return False
    if getattr(receiver, "_outbox_fast", False):
        return True
    receiver.get_frame = _fast_get_frame(receiver)
    receiver._outbox_fast = True
    return True


def _frame_receiver(connection: Any) -> Any | None:
    task = getattr(connection, "_reader_task", None)
    if task is None or task.done():
        return None
    frame = getattr(task.get_coro(), "cr_frame", None)
    receiver = frame.f_locals.get("frame_receiver") if frame is not None else None
    if receiver is None or not callable(getattr(receiver, "get_frame", None)):
        return None
    if not isinstance(getattr(receiver, "reader", None), asyncio.StreamReader):
        return None
    return receiver


def _fast_get_frame(receiver: Any) -> Callable[[], Coroutine[Any, Any, tuple[int, int, Any]]]:
    async def get_frame() -> tuple[int, int, Any]:
        # The same contract as aiormq's FrameReceiver.get_frame once connected: the
        # reader task is the only caller, so its lock has nothing to guard.
        reader: asyncio.StreamReader = receiver.reader
        if reader.at_eof():
            del receiver.reader
            raise StopAsyncIteration
        try:
            head = await reader.readexactly(7)
            frame = head + await reader.readexactly(int.from_bytes(head[3:7], "big") + 1)
        except asyncio.IncompleteReadError as e:
            raise AMQPConnectionError(
                "Server connection unexpectedly closed. "
                f"Read {len(e.partial)} bytes but {e.expected} bytes expected"
            ) from e
        except OSError as e:
            raise AMQPConnectionError(f"Server communication error: {e!r}") from e
        try:
            return unmarshal(frame)
        except _DECODE_ERRORS as e:
            raise InvalidFrameError(str(e)) from e

    return get_frame
