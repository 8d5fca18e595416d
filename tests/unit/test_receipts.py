"""Receipts: one wire format both sides read alike, idempotent recording, best-effort sending.

The end-to-end path (consumer -> RabbitMQ -> relay -> ``outbox status``) is in
``tests/integration/test_receipts_end_to_end.py``; here: the codec, the SQL on SQLite, the
in-memory broker's exchange separation, and the consumer-side queue with a
stand-in channel.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import aio_pika
import aiormq
import pytest
import sqlalchemy as sa
from broker_contract import make_envelope
from sqlalchemy.ext.asyncio import AsyncEngine

from consumer.metrics import ConsumerMetrics
from consumer.receipts import ReceiptPublisher
from outbox import admin
from outbox.errors import MalformedMessageError
from outbox.memory_broker import InMemoryBroker
from outbox.receipts import (
    MAX_DETAIL,
    Receipt,
    consumed_receipt_texts,
    decode_receipt,
    decode_receipts,
    encode_receipt,
    encode_receipts,
    join_receipt_texts,
    receipt_text,
    receipts_exchange,
    receipts_queue,
    record_receipts,
)
from outbox.tables import receipt_table

MESSAGE_ID = "0190f3c4-8a4b-7c2d-9e1f-123456789abc"
AT = datetime(2024, 5, 17, 12, 30, 45, 123456, tzinfo=UTC)


def receipt(**changes: Any) -> Receipt:
    fields: dict[str, Any] = {
        "message_id": MESSAGE_ID,
        "group": "billing",
        "outcome": "consumed",
        "detail": None,
        "at": AT,
    }
    fields.update(changes)
    return Receipt(**fields)


@pytest.mark.parametrize("group", ["billing", 'odd "group" \\ name'])
def test_consumed_receipts_formatted_directly_read_back_as_encode_receipts_writes_them(
    group: str,
) -> None:
    ids = [str(uuid.uuid4()) for _ in range(3)]
    texts = consumed_receipt_texts(ids, group, AT)
    expected = [receipt(message_id=m, group=group) for m in ids]
    assert decode_receipts(join_receipt_texts(texts)) == expected
    assert json.loads(join_receipt_texts(texts)) == json.loads(encode_receipts(expected))
    dead = receipt(outcome="dead", detail="failed 5 times")
    assert decode_receipts(join_receipt_texts([*texts, receipt_text(dead)]))[-1] == dead


def body(**changes: Any) -> bytes:
    fields: dict[str, Any] = {
        "message_id": MESSAGE_ID,
        "group": "billing",
        "outcome": "dead",
        "detail": "rejected: no such customer",
        "at": AT.isoformat(),
    }
    fields.update(changes)
    return json.dumps({k: v for k, v in fields.items() if v is not ...}).encode()


def count(metric: Any, **labels: str) -> float:
    value: float = (metric.labels(**labels) if labels else metric)._value.get()
    return value


# --- wire format ----------------------------------------------------------------------------


def test_a_receipt_reads_back_as_it_was_sent() -> None:
    sent = receipt(outcome="dead", detail="rejected: no such customer")

    assert decode_receipt(encode_receipt(sent)) == sent


def test_the_body_is_the_documented_json_object() -> None:
    assert json.loads(encode_receipt(receipt())) == {
        "message_id": MESSAGE_ID,
        "group": "billing",
        "outcome": "consumed",
        "detail": None,
        "at": "2024-05-17T12:30:45.123456+00:00",
    }


def test_names_of_the_receipts_exchange_and_queue_follow_the_message_exchange() -> None:
    assert receipts_exchange("outbox") == "outbox.receipts"
    assert receipts_queue("outbox") == "outbox.receipts.relay"


def test_a_time_with_another_offset_comes_back_in_utc() -> None:
    at = datetime(2024, 5, 17, 14, 30, 45, tzinfo=timezone(timedelta(hours=2)))

    decoded = decode_receipt(body(at=at.isoformat()))

    assert decoded.at == at
    assert decoded.at.utcoffset() == timedelta(0)


def test_a_long_detail_is_cut_on_both_sides() -> None:
    long = "x" * (MAX_DETAIL + 50)

    assert len(json.loads(encode_receipt(receipt(detail=long)))["detail"]) == MAX_DETAIL
    assert decode_receipt(body(detail=long)).detail == "x" * MAX_DETAIL


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json", "not valid UTF-8 JSON"),
        (b"\xff\xfe", "not valid UTF-8 JSON"),
        (b'["a", "list"]', "JSON object"),
        (body(at=...), "lacks at"),
        (body(message_id=...), "lacks message_id"),
        (body(message_id="42"), "not a UUID"),
        (body(message_id=None), "not a UUID"),
        (body(group=""), "group"),
        (body(group=7), "group"),
        (body(outcome="duplicate"), "outcome"),
        (body(detail=["x"]), "detail"),
        (body(at="yesterday"), "not an ISO 8601 time"),
        (body(at="2024-05-17T12:30:45"), "no UTC offset"),
        (body(at=1715949045), "ISO 8601 string"),
        (b'{"message_id": NaN}', "not valid UTF-8 JSON"),
    ],
)
def test_a_malformed_body_is_refused_saying_why(raw: bytes, reason: str) -> None:
    with pytest.raises(MalformedMessageError, match=reason):
        decode_receipt(raw)


def test_a_body_of_another_content_type_is_refused() -> None:
    with pytest.raises(MalformedMessageError, match="content type"):
        decode_receipt(body(), "text/plain")
    assert decode_receipt(body(), "application/json; charset=utf-8").outcome == "dead"


# --- recording ------------------------------------------------------------------------------


async def test_recording_a_receipt_twice_keeps_one_row_and_the_first_time(
    sqlite_engine: sa.Engine, sqlite_async_engine: AsyncEngine
) -> None:
    first = receipt()
    again = receipt(at=AT + timedelta(minutes=5))
    dead = receipt(outcome="dead", detail="rejected: x")

    await record_receipts(sqlite_async_engine, [first, dead, again])  # a repeat in one batch
    await record_receipts(sqlite_async_engine, [again])  # and in a later one

    report = admin.message_status(sqlite_engine, MESSAGE_ID)
    assert report is not None
    assert report.status is None  # receipts only: no outbox row in this test
    assert [(r.consumer_group, r.outcome, r.detail, r.recorded_at) for r in report.receipts] == [
        ("billing", "consumed", None, AT),
        ("billing", "dead", "rejected: x", AT),
    ]
    with sqlite_engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(receipt_table)) == 2


async def test_recording_nothing_touches_nothing(sqlite_async_engine: AsyncEngine) -> None:
    await record_receipts(sqlite_async_engine, [])


# --- the in-memory broker keeps exchanges apart -----------------------------------------------


async def test_a_queue_bound_on_the_receipts_exchange_gets_no_outbox_messages() -> None:
    broker = InMemoryBroker()
    await broker.connect()
    await broker.declare_queue("receipts", ["#"], exchange="outbox.receipts")
    await broker.declare_queue("billing", ["orders.*"])

    results = await broker.publish([make_envelope("orders.created", {})])

    assert [r.confirmed for r in results] == [True]
    assert broker.queue_depth("receipts") == 0
    assert broker.queue_depth("billing") == 1
    async with aclosing(broker.consume("receipts")) as deliveries:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await anext(deliveries)
    await broker.close()


# --- sending: never blocks, never raises, counts what it loses -----------------------------------


class _Exchange:
    def __init__(self, fail: bool = False) -> None:
        self.published: list[tuple[aio_pika.abc.AbstractMessage, str, bool]] = []
        self.fail = fail

    async def publish(
        self, message: aio_pika.abc.AbstractMessage, routing_key: str, *, mandatory: bool
    ) -> object:
        if self.fail:
            raise ConnectionError("connection lost")
        self.published.append((message, routing_key, mandatory))
        return aiormq.spec.Basic.Ack()


class _Channel:
    """Stands in for both the consumer's confirm channel and the one the exchange is declared on."""

    def __init__(self, exchange: _Exchange, refuse: bool = False) -> None:
        self.exchange = exchange
        self.refuse = refuse
        self.declared: list[tuple[str, Any, bool]] = []

    async def channel(self) -> _Channel:
        return self

    async def declare_exchange(self, name: str, kind: Any, *, durable: bool) -> None:
        if self.refuse:
            raise aio_pika.exceptions.ChannelPreconditionFailed("inequivalent arg 'type'")
        self.declared.append((name, kind, durable))

    async def get_exchange(self, name: str, *, ensure: bool) -> _Exchange:
        return self.exchange

    async def close(self) -> None:
        pass


@pytest.fixture
def metrics() -> ConsumerMetrics:
    return ConsumerMetrics()


@pytest.fixture
async def sender(metrics: ConsumerMetrics) -> AsyncIterator[tuple[ReceiptPublisher, _Channel]]:
    channel = _Channel(_Exchange())
    publisher = ReceiptPublisher(
        "billing", "outbox", metrics, flush_interval=timedelta(milliseconds=10)
    )
    await publisher.start(channel, channel)  # type: ignore[arg-type]
    yield publisher, channel
    await publisher.aclose()


async def test_receipts_go_to_the_receipts_exchange_in_the_wire_format(
    sender: tuple[ReceiptPublisher, _Channel], metrics: ConsumerMetrics
) -> None:
    publisher, channel = sender
    mid = str(uuid.uuid4())

    publisher.send(mid, "consumed")
    publisher.send(mid.upper(), "dead", "rejected: x")
    await publisher.aclose()

    assert channel.declared == [("outbox.receipts", aio_pika.ExchangeType.TOPIC, True)]
    messages = channel.exchange.published
    # Both went out as one message: a batch is one JSON array on the wire.
    assert [(key, mandatory) for _, key, mandatory in messages] == [("billing", True)]
    first, second = decode_receipts(messages[0][0].body, messages[0][0].content_type)
    assert (first.message_id, first.group, first.outcome, first.detail) == (
        mid,
        "billing",
        "consumed",
        None,
    )
    assert (second.message_id, second.outcome, second.detail) == (mid, "dead", "rejected: x")
    message = messages[0][0]
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.message_id not in (None, mid)  # the receipt's own id
    uuid.UUID(str(message.message_id))
    assert count(metrics.receipts_sent) == 2


async def test_a_message_id_that_is_no_uuid_sends_nothing(
    sender: tuple[ReceiptPublisher, _Channel], metrics: ConsumerMetrics
) -> None:
    publisher, channel = sender

    publisher.send(None, "dead", "malformed: no message_id property")
    publisher.send("not-a-uuid", "dead", "malformed")
    await publisher.aclose()

    assert channel.exchange.published == []
    assert count(metrics.receipts_sent) == 0


async def test_a_full_queue_drops_receipts_without_blocking_or_raising(
    metrics: ConsumerMetrics,
) -> None:
    publisher = ReceiptPublisher("billing", "outbox", metrics, capacity=2)  # not started

    for _ in range(5):
        publisher.send(str(uuid.uuid4()), "consumed")

    assert count(metrics.receipts_dropped, reason="full") == 3
    await publisher.aclose()
    assert count(metrics.receipts_dropped, reason="stopped") == 2  # queued, never sent


async def test_a_settled_batch_sends_its_receipts_in_one_message_with_one_time(
    sender: tuple[ReceiptPublisher, _Channel], metrics: ConsumerMetrics
) -> None:
    publisher, channel = sender
    ids = [str(uuid.uuid4()) for _ in range(5)]

    publisher.send_consumed(ids)
    publisher.send_consumed([])  # a batch of duplicates only: nothing to report
    await publisher.aclose()

    [(message, routing_key, _)] = channel.exchange.published
    receipts = decode_receipts(message.body)
    assert [r.message_id for r in receipts] == ids
    assert {r.outcome for r in receipts} == {"consumed"}
    assert len({r.at for r in receipts}) == 1
    assert routing_key == "billing"
    assert count(metrics.receipts_sent) == 5


async def test_a_batch_larger_than_the_room_left_keeps_what_fits(metrics: ConsumerMetrics) -> None:
    publisher = ReceiptPublisher("billing", "outbox", metrics, capacity=3)  # not started

    publisher.send_consumed([str(uuid.uuid4()) for _ in range(5)])

    assert count(metrics.receipts_dropped, reason="full") == 2
    await publisher.aclose()
    assert count(metrics.receipts_dropped, reason="stopped") == 3


async def test_failed_publishes_are_counted_and_sending_goes_on(metrics: ConsumerMetrics) -> None:
    exchange = _Exchange(fail=True)
    channel = _Channel(exchange)
    publisher = ReceiptPublisher(
        "billing", "outbox", metrics, flush_interval=timedelta(milliseconds=1)
    )
    await publisher.start(channel, channel)  # type: ignore[arg-type]

    publisher.send(str(uuid.uuid4()), "consumed")
    async with asyncio.timeout(5):
        while count(metrics.receipts_dropped, reason="failed") < 1:  # noqa: ASYNC110 (a metric)
            await asyncio.sleep(0.005)
    exchange.fail = False
    publisher.send(str(uuid.uuid4()), "consumed")
    await publisher.aclose()

    assert count(metrics.receipts_dropped, reason="failed") == 1
    assert count(metrics.receipts_sent) == 1


async def test_an_exchange_that_cannot_be_declared_turns_receipts_off_not_the_consumer(
    metrics: ConsumerMetrics,
) -> None:
    channel = _Channel(_Exchange(), refuse=True)
    publisher = ReceiptPublisher("billing", "outbox", metrics)

    await publisher.start(channel, channel)  # type: ignore[arg-type]
    publisher.send(str(uuid.uuid4()), "consumed")
    await publisher.aclose()

    assert channel.exchange.published == []
    assert count(metrics.receipts_dropped, reason="failed") == 1


async def test_receipts_sent_after_close_are_dropped(
    sender: tuple[ReceiptPublisher, _Channel], metrics: ConsumerMetrics
) -> None:
    publisher, channel = sender
    await publisher.aclose()

    publisher.send(str(uuid.uuid4()), "consumed")

    assert channel.exchange.published == []
    assert count(metrics.receipts_dropped, reason="stopped") == 1


def test_a_batch_body_is_an_array_checked_as_a_whole() -> None:
    sent = [receipt(), receipt(outcome="dead", detail="rejected: x")]
    assert decode_receipts(encode_receipts(sent)) == sent
    assert decode_receipts(encode_receipt(sent[0])) == [sent[0]]  # one object still reads
    bad = json.loads(encode_receipts(sent))
    bad[1]["outcome"] = "eaten"
    with pytest.raises(MalformedMessageError, match=r"receipt \[1\]: receipt outcome"):
        decode_receipts(json.dumps(bad).encode())
    for body in (b"[]", b"[1]", b'"x"'):
        with pytest.raises(MalformedMessageError):
            decode_receipts(body)
