"""consumer.amqp_frames decodes what pamqp decodes, to the same objects and values."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pamqp.frame
import pytest
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError
from pamqp import commands
from pamqp.body import ContentBody
from pamqp.exceptions import UnmarshalingException
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from consumer.amqp_frames import _fast_get_frame, read_frames_fast, unmarshal

PROPERTY_VALUES: dict[str, Any] = {
    "content_type": "application/json",
    "content_encoding": "gzip",
    "headers": {
        "x-key": "customer-7",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "n": 42,
        "big": 2**40,
        "neg": -3,
        "flag": True,
        "ratio": 0.5,
        "price": Decimal("12.50"),
        "when": datetime(2026, 11, 21, 12, 0, tzinfo=UTC),
        "nested": {"a": [1, "two", {"b": None}]},
        "ünïcode": "wert ✓",
    },
    "delivery_mode": 2,
    "priority": 0,
    "correlation_id": "corr-1",
    "reply_to": "amq.rabbitmq.reply-to",
    "expiration": "60000",
    "message_id": "0a2f6d0e-6c46-4f0b-8a6f-0d9a51d8a0b1",
    "timestamp": datetime(2026, 11, 21, 23, 31, 34, tzinfo=UTC),
    "message_type": "orders.created",
    "user_id": "guest",
    "app_id": "billing ✓",
}


def slots(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in type(obj).__slots__}


def assert_same(frame: bytes) -> Any:
    expected = pamqp.frame.unmarshal(frame)
    got = unmarshal(frame)
    assert got[:2] == expected[:2]
    assert type(got[2]) is type(expected[2])
    if isinstance(got[2], ContentHeader):
        assert (got[2].class_id, got[2].weight, got[2].body_size) == (
            expected[2].class_id,
            expected[2].weight,
            expected[2].body_size,
        )
        assert slots(got[2].properties) == slots(expected[2].properties)
    elif isinstance(got[2], ContentBody):
        assert got[2].value == expected[2].value
    elif type(got[2]).__slots__:
        assert slots(got[2]) == slots(expected[2])
    return got[2]


@pytest.mark.parametrize(
    ("consumer_tag", "tag", "redelivered", "exchange", "routing_key"),
    [
        ("ctag1.0123", 1, False, "outbox", "orders.created"),
        ("amq.ctag-ÄÖ✓", 2**63 - 1, True, "", "q"),
        ("t", 7, False, "x" * 127, "r" * 255),
        ("", 0, True, "", ""),
    ],
)
def test_deliver_method_frames(
    consumer_tag: str, tag: int, redelivered: bool, exchange: str, routing_key: str
) -> None:
    method = commands.Basic.Deliver(consumer_tag, tag, redelivered, exchange, routing_key)
    for channel in (1, 65535):
        got = assert_same(pamqp.frame.marshal(method, channel))
        assert got.delivery_tag == tag
        assert got.redelivered is redelivered


@pytest.mark.parametrize("size", [0, 1, 2, 3, 13])
def test_content_headers_with_any_set_of_properties(size: int) -> None:
    # Every property alone, every pair, ... (sampled above two), and all of them.
    names = list(PROPERTY_VALUES)
    combos = list(itertools.combinations(names, size)) if size < 3 else []
    if size >= 3:
        combos = [tuple(names[i:] + names[:i])[:size] for i in range(len(names))]
    for combo in combos:
        properties = commands.Basic.Properties(**{n: PROPERTY_VALUES[n] for n in combo})
        header = ContentHeader(weight=0, body_size=123456789, properties=properties)
        got = assert_same(pamqp.frame.marshal(header, 3))
        for name in combo:
            assert getattr(got.properties, name) == PROPERTY_VALUES[name]


def test_a_millisecond_timestamp_is_read_as_pamqp_reads_it() -> None:
    header = ContentHeader(body_size=1, properties=commands.Basic.Properties())
    frame = bytearray(pamqp.frame.marshal(header, 1))
    # Set the timestamp flag and append a value past 2106 (milliseconds).
    frame[19:21] = (0x0040).to_bytes(2, "big")
    ms = (1_795_000_000_123).to_bytes(8, "big")
    frame[3:7] = (int.from_bytes(frame[3:7], "big") + 8).to_bytes(4, "big")
    frame = frame[:-1] + ms + frame[-1:]
    got = assert_same(bytes(frame))
    assert got.properties.timestamp == datetime.fromtimestamp(1_795_000_000.123, tz=UTC)


@pytest.mark.parametrize("body", [b"{}", bytes(range(256)) * 600])
def test_body_frames(body: bytes) -> None:
    assert assert_same(pamqp.frame.marshal(ContentBody(body), 9)).value == body


@pytest.mark.parametrize(
    "frame",
    [
        commands.Basic.ConsumeOk("ctag"),
        commands.Basic.Ack(5, multiple=True),
        commands.Basic.Cancel("ctag"),
        commands.Channel.Close(406, "PRECONDITION_FAILED", 60, 40),
        commands.Basic.Return(312, "NO_ROUTE", "outbox", "a.b"),
    ],
)
def test_other_methods_are_pamqps(frame: Any) -> None:
    assert_same(pamqp.frame.marshal(frame, 1))


def test_heartbeats_and_other_content_classes_go_to_pamqp() -> None:
    assert isinstance(unmarshal(Heartbeat().marshal())[2], Heartbeat)
    header = bytearray(pamqp.frame.marshal(ContentHeader(body_size=1), 1))
    header[7:9] = (50).to_bytes(2, "big")  # not the basic class
    assert assert_same(bytes(header)).class_id == 50
    empty = pamqp.frame._marshal(3, 1, b"")  # RabbitMQ sends no body frame for no body
    with pytest.raises(UnmarshalingException, match="No frame size"):
        unmarshal(empty)


def test_malformed_frames_raise() -> None:
    good = pamqp.frame.marshal(commands.Basic.Deliver("ctag", 1, False, "ex", "rk"), 1)
    with pytest.raises(UnmarshalingException, match="Last byte"):
        unmarshal(good[:-1] + b"\x00")
    # A routing key whose length runs past the frame's end.
    cut = bytearray(good)
    cut[-4] = 200
    with pytest.raises(ValueError, match="past the end"):
        unmarshal(bytes(cut))
    with pytest.raises(UnmarshalingException):
        unmarshal(good[:-3])  # shorter than its size says


class Receiver:
    """The attributes of aiormq's FrameReceiver that the fast reader uses."""

    def __init__(self, data: bytes, eof: bool = True) -> None:
        self.reader = asyncio.StreamReader()
        self.reader.feed_data(data)
        if eof:
            self.reader.feed_eof()


async def test_get_frame_reads_frames_then_stops_at_end_of_stream() -> None:
    frames = [
        commands.Basic.Deliver("ctag", 1, False, "ex", "rk"),
        ContentHeader(body_size=2, properties=commands.Basic.Properties(message_id="m")),
        ContentBody(b"{}"),
    ]
    receiver = Receiver(b"".join(pamqp.frame.marshal(f, 1) for f in frames))
    get_frame = _fast_get_frame(receiver)
    got = [await get_frame() for _ in frames]
    assert [type(f) for _, _, f in got] == [type(f) for f in frames]
    assert got[1][2].properties.message_id == "m"
    with pytest.raises(StopAsyncIteration):
        await get_frame()
    assert not hasattr(receiver, "reader")  # as aiormq's: the receiver lets go of it


async def test_get_frame_on_a_cut_stream_or_a_bad_frame_raises_aiormqs_errors() -> None:
    frame = pamqp.frame.marshal(commands.Basic.Deliver("ctag", 1, False, "ex", "rk"), 1)
    with pytest.raises(AMQPConnectionError, match="unexpectedly closed"):
        await _fast_get_frame(Receiver(frame[:-5]))()
    with pytest.raises(InvalidFrameError):
        await _fast_get_frame(Receiver(frame[:-1] + b"\x01"))()


def test_read_frames_fast_leaves_an_unknown_connection_alone() -> None:
    class Elsewhere:
        _reader_task = None

    assert read_frames_fast(Elsewhere()) is False  # type: ignore[arg-type]


def test_a_header_string_that_is_not_utf8_stays_bytes_as_with_pamqp() -> None:
    properties = commands.Basic.Properties(headers={"k": "ab", "n": 1, "s": "ok"})
    frame = pamqp.frame.marshal(ContentHeader(body_size=1, properties=properties), 1)
    frame = frame.replace(b"S\x00\x00\x00\x02ab", b"S\x00\x00\x00\x02\xff\xfe", 1)
    got = assert_same(frame)
    assert got.properties.headers == {"k": b"\xff\xfe", "n": 1, "s": "ok"}


def test_a_header_table_longer_than_its_frame_raises() -> None:
    properties = commands.Basic.Properties(headers={"k": "v"})
    frame = bytearray(pamqp.frame.marshal(ContentHeader(body_size=1, properties=properties), 1))
    table = frame.index(b"\x01k") - 4  # the table's length precedes its first key
    frame[table : table + 4] = (1000).to_bytes(4, "big")
    with pytest.raises(ValueError, match="past the end"):
        unmarshal(bytes(frame))
