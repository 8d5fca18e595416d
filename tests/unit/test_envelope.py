"""The wire format: what the relay sends is what any AMQP client, and our consumer, reads back."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from outbox.codec import JSON
from outbox.envelope import KEY_HEADER, Envelope, WireFormat
from outbox.errors import ConfigurationError, MalformedMessageError

MESSAGE_ID = "0190f3c4-8a4b-7c2d-9e1f-123456789abc"
CREATED = datetime(2024, 5, 17, 12, 30, 45, 123456, tzinfo=UTC)
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def make_envelope(**changes: Any) -> Envelope:
    fields: dict[str, Any] = {
        "message_id": MESSAGE_ID,
        "topic": "orders.created",
        "key": "customer-42",
        "body": b'{"id":7}',
        "content_type": "application/json",
        "headers": {"traceparent": TRACEPARENT, "tenant": "eu", "attempt": 1},
        "created_at": CREATED,
    }
    fields.update(changes)
    return Envelope(**fields)


def received(**changes: Any) -> dict[str, Any]:
    """Arguments of ``Envelope.from_amqp`` for a well-formed message, with ``changes``."""
    kwargs: dict[str, Any] = {
        "body": b'{"id":7}',
        "routing_key": "orders.created",
        "message_id": MESSAGE_ID,
        "content_type": "application/json",
        "headers": {KEY_HEADER: "customer-42"},
        "timestamp": CREATED,
    }
    kwargs.update(changes)
    return kwargs


# --- from_row -------------------------------------------------------------------------------


def row(**changes: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "message_id": uuid.UUID(MESSAGE_ID),
        "topic": "orders.created",
        "key": "customer-42",
        "payload": memoryview(b'{"id":7}'),
        "content_type": "application/json",
        "headers": {"traceparent": TRACEPARENT},
        "created_at": CREATED,
        "status": "pending",  # other columns are ignored
        "attempts": 0,
    }
    values.update(changes)
    return values


def test_from_row_builds_the_envelope_of_an_outbox_row() -> None:
    envelope = Envelope.from_row(row())
    assert envelope == Envelope(
        message_id=MESSAGE_ID,
        topic="orders.created",
        key="customer-42",
        body=b'{"id":7}',
        content_type="application/json",
        headers={"traceparent": TRACEPARENT},
        created_at=CREATED,
    )
    assert type(envelope.body) is bytes


def test_from_row_reads_a_naive_datetime_as_utc() -> None:
    envelope = Envelope.from_row(row(created_at=CREATED.replace(tzinfo=None)))
    assert envelope.created_at == CREATED
    assert envelope.created_at.tzinfo is UTC


def test_from_row_keeps_an_aware_datetime_as_it_is() -> None:
    plus_two = CREATED.astimezone(timezone(timedelta(hours=2)))
    assert Envelope.from_row(row(created_at=plus_two)).created_at == CREATED


def test_from_row_treats_null_headers_as_none() -> None:
    assert Envelope.from_row(row(headers=None, key=None)).headers == {}


# --- amqp_properties ------------------------------------------------------------------------


def test_amqp_properties_carry_id_content_type_persistence_and_time() -> None:
    props = make_envelope().amqp_properties(WireFormat())
    assert props["message_id"] == MESSAGE_ID
    assert props["content_type"] == "application/json"
    assert props["delivery_mode"] == 2
    assert props["timestamp"] == CREATED


def test_key_travels_in_the_x_outbox_key_header() -> None:
    headers = make_envelope().amqp_properties(WireFormat())["headers"]
    assert headers[KEY_HEADER] == "customer-42"
    assert KEY_HEADER == "x-outbox-key"


def test_no_key_header_when_the_message_has_no_key() -> None:
    headers = make_envelope(key=None).amqp_properties(WireFormat())["headers"]
    assert KEY_HEADER not in headers


def test_producer_headers_pass_through_unchanged() -> None:
    headers = make_envelope().amqp_properties(WireFormat(cloudevents=False))["headers"]
    assert headers == {
        "traceparent": TRACEPARENT,
        "tenant": "eu",
        "attempt": 1,
        KEY_HEADER: "customer-42",
    }


def test_cloudevents_headers_are_added_when_enabled() -> None:
    headers = make_envelope().amqp_properties(WireFormat(source="shop"))["headers"]
    assert headers["cloudEvents:specversion"] == "1.0"
    assert headers["cloudEvents:id"] == MESSAGE_ID
    assert headers["cloudEvents:type"] == "orders.created"
    assert headers["cloudEvents:source"] == "shop"
    assert datetime.fromisoformat(str(headers["cloudEvents:time"])) == CREATED


def test_cloudevents_headers_are_absent_when_disabled() -> None:
    headers = make_envelope().amqp_properties(WireFormat(cloudevents=False))["headers"]
    assert not [name for name in headers if name.startswith("cloudEvents:")]


def test_amqp_properties_do_not_change_the_envelope_headers() -> None:
    envelope = make_envelope()
    envelope.amqp_properties(WireFormat())
    assert envelope.headers == {"traceparent": TRACEPARENT, "tenant": "eu", "attempt": 1}


# --- round trip -----------------------------------------------------------------------------


@pytest.mark.parametrize("cloudevents", [True, False])
@pytest.mark.parametrize("key", ["customer-42", None])
def test_amqp_properties_read_back_give_the_same_envelope(
    cloudevents: bool, key: str | None
) -> None:
    sent = make_envelope(key=key)
    props = sent.amqp_properties(WireFormat(cloudevents=cloudevents))
    back = Envelope.from_amqp(
        body=sent.body,
        routing_key=sent.topic,
        message_id=props["message_id"],
        content_type=props["content_type"],
        headers=props["headers"],
        timestamp=props["timestamp"],
    )
    assert back == sent


def test_bytes_header_values_are_decoded_to_str_on_receipt() -> None:
    # Some AMQP clients hand string header values over as bytes.
    envelope = Envelope.from_amqp(
        **received(headers={KEY_HEADER: b"customer-42", "traceparent": TRACEPARENT.encode()})
    )
    assert envelope.key == "customer-42"
    assert envelope.headers == {"traceparent": TRACEPARENT}


def test_received_message_id_is_normalized() -> None:
    envelope = Envelope.from_amqp(**received(message_id=MESSAGE_ID.upper()))
    assert envelope.message_id == MESSAGE_ID


def test_received_naive_timestamp_is_read_as_utc() -> None:
    envelope = Envelope.from_amqp(**received(timestamp=CREATED.replace(tzinfo=None)))
    assert envelope.created_at == CREATED


def test_received_message_without_timestamp_gets_the_receive_time() -> None:
    before = datetime.now(UTC)
    envelope = Envelope.from_amqp(**received(timestamp=None))
    assert before <= envelope.created_at <= datetime.now(UTC)


# --- malformed messages ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"message_id": None}, "no message_id"),
        ({"message_id": ""}, "no message_id"),
        ({"message_id": "order-7"}, "not a UUID"),
        ({"routing_key": None}, "routing key"),
        ({"routing_key": ""}, "routing key"),
        ({"routing_key": "orders..created"}, "routing key"),
        ({"routing_key": "orders.*"}, "routing key"),
        ({"content_type": None}, "no content_type"),
        ({"content_type": ""}, "no content_type"),
        ({"headers": {KEY_HEADER: 42}}, "x-outbox-key header is not a string"),
        ({"headers": {KEY_HEADER: None}}, "x-outbox-key header is not a string"),
    ],
    ids=[
        "no-id",
        "empty-id",
        "non-uuid-id",
        "no-routing-key",
        "empty-routing-key",
        "empty-word",
        "wildcard",
        "no-content-type",
        "empty-content-type",
        "int-key",
        "null-key",
    ],
)
def test_malformed_message_is_refused_with_the_reason(changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(MalformedMessageError, match=reason):
        Envelope.from_amqp(**received(**changes))


@pytest.mark.parametrize(
    "headers",
    [{KEY_HEADER: b"\xff\xfe"}, {"traceparent": b"\xff\xfe"}],
    ids=["key-header", "app-header"],
)
def test_header_that_is_not_utf8_makes_a_malformed_message(headers: dict[str, Any]) -> None:
    # A consumer dead-letters MalformedMessageError with its reason (DESIGN §5.5); any
    # other exception escaping from_amqp would bypass that path.
    with pytest.raises(MalformedMessageError):
        Envelope.from_amqp(**received(headers=headers))


# --- decode ---------------------------------------------------------------------------------


def test_decode_gives_the_message_with_the_json_payload() -> None:
    message = make_envelope().decode()
    assert message.message_id == MESSAGE_ID
    assert message.topic == "orders.created"
    assert message.key == "customer-42"
    assert message.payload == {"id": 7}
    assert message.headers == {"traceparent": TRACEPARENT, "tenant": "eu", "attempt": 1}
    assert message.created_at == CREATED


def test_decode_ignores_content_type_parameters() -> None:
    envelope = make_envelope(content_type="application/json; charset=utf-8")
    assert envelope.decode().payload == {"id": 7}


def test_decode_with_an_unknown_content_type_is_malformed_and_lists_the_known_ones() -> None:
    with pytest.raises(MalformedMessageError, match=r"text/csv.*application/json"):
        make_envelope(content_type="text/csv").decode()


def test_decode_uses_the_codec_registered_for_the_content_type() -> None:
    class Upper:
        content_type = "text/x-upper"

        def encode(self, payload: Any) -> bytes:
            return str(payload).upper().encode()

        def decode(self, body: bytes) -> Any:
            return body.decode().lower()

    envelope = make_envelope(content_type="text/x-upper", body=b"HELLO")
    assert envelope.decode({"text/x-upper": Upper()}).payload == "hello"
    with pytest.raises(MalformedMessageError):
        make_envelope().decode({"text/x-upper": Upper()})  # JSON is not registered there


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe", b""])
def test_decode_of_a_body_that_is_not_json_is_malformed(body: bytes) -> None:
    with pytest.raises(MalformedMessageError, match="not valid UTF-8 JSON"):
        make_envelope(body=body).decode({JSON.content_type: JSON})


# --- WireFormat -----------------------------------------------------------------------------


def test_default_wire_format_is_valid() -> None:
    WireFormat().validate()
    assert WireFormat().exchange == "outbox"


@pytest.mark.parametrize(
    ("wire", "field"),
    [
        (WireFormat(exchange=""), "exchange"),
        (WireFormat(exchange="x" * 128), "exchange"),
        (WireFormat(source=""), "source"),
    ],
)
def test_wire_format_with_an_empty_name_fails_validation(wire: WireFormat, field: str) -> None:
    with pytest.raises(ConfigurationError, match=field):
        wire.validate()
