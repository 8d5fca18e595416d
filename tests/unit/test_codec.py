"""The JSON codec is strict and says what to do; any object with the Codec shape can replace it."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import uuid
from typing import Any

import pytest

import outbox
from outbox.codec import JSON, Codec, JsonCodec
from outbox.errors import ConfigurationError, InvalidMessageError, OutboxError


@pytest.mark.parametrize(
    "payload",
    [
        {"id": 7, "items": [1, 2.5, None, True, False], "note": "plain"},
        {"nested": {"deeper": {"list": [[], {}, ""]}}},
        [1, "two", 3.0],
        "just a string",
        42,
        None,
        {"name": "Zoë", "city": "東京", "emoji": "🚀", "quote": '"\\'},
    ],
    ids=["object", "nested", "list", "str", "int", "null", "unicode"],
)
def test_json_payload_survives_a_round_trip(payload: Any) -> None:
    assert JSON.decode(JSON.encode(payload)) == payload


def test_json_encodes_unicode_as_utf8_bytes_not_escapes() -> None:
    body = JSON.encode({"city": "東京", "emoji": "🚀"})
    assert isinstance(body, bytes)
    assert "東京".encode() in body
    assert "🚀".encode() in body
    assert b"\\u" not in body


def test_json_uses_compact_separators() -> None:
    assert JSON.encode({"a": 1, "b": [1, 2]}) == b'{"a":1,"b":[1,2]}'


def test_json_content_type_is_application_json() -> None:
    assert JSON.content_type == "application/json"
    assert JsonCodec().content_type == "application/json"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_json_refuses_nan_and_infinity(value: float) -> None:
    with pytest.raises(InvalidMessageError, match="not JSON-serialisable") as info:
        JSON.encode({"amount": value})
    assert isinstance(info.value, OutboxError)


@pytest.mark.parametrize(
    "payload",
    [
        {"at": dt.datetime(2024, 1, 2, tzinfo=dt.UTC)},
        {"amount": decimal.Decimal("1.10")},
        {"id": uuid.uuid4()},
        {"tags": {"a", "b"}},
        {"raw": b"bytes"},
        {("tuple", "key"): 1},
        object(),
    ],
    ids=["datetime", "decimal", "uuid", "set", "bytes", "tuple-key", "object"],
)
def test_json_refuses_values_it_cannot_represent_and_says_what_to_do(payload: Any) -> None:
    with pytest.raises(InvalidMessageError) as info:
        JSON.encode(payload)
    text = str(info.value)
    assert "not JSON-serialisable" in text
    assert "convert" in text  # the two ways out: convert the value ...
    assert "codec" in text  # ... or give the producer a codec that knows it
    assert isinstance(info.value.__cause__, TypeError | ValueError)


def test_json_refuses_a_circular_payload() -> None:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    with pytest.raises(InvalidMessageError):
        JSON.encode(loop)


def test_json_refuses_a_lone_surrogate_that_has_no_utf8_form() -> None:
    with pytest.raises(InvalidMessageError):
        JSON.encode({"broken": "\ud800"})


@pytest.mark.parametrize(
    "body",
    [b"\xff\xfe\xfa", b'{"a": "\xc3"}', b"", b"{", b"{'a': 1}", b"undefined", b'{"a":1}x'],
    ids=["bad-utf8", "truncated-utf8", "empty", "unclosed", "single-quotes", "word", "trailing"],
)
def test_json_decode_of_a_bad_body_raises_invalid_message_error(body: bytes) -> None:
    with pytest.raises(InvalidMessageError, match="not valid UTF-8 JSON"):
        JSON.decode(body)


def test_json_decode_reads_utf8() -> None:
    assert JSON.decode('{"city":"東京"}'.encode()) == {"city": "東京"}


# --- custom codecs --------------------------------------------------------------------------


class TextCodec:
    """A codec that is not JSON: UTF-8 text."""

    content_type = "text/plain; charset=utf-8"

    def encode(self, payload: Any) -> bytes:
        if not isinstance(payload, str):
            raise InvalidMessageError("TextCodec encodes str only")
        return payload.encode()

    def decode(self, body: bytes) -> Any:
        return body.decode()


class NotACodec:
    content_type = "application/octet-stream"


def test_custom_codec_satisfies_the_codec_protocol() -> None:
    assert isinstance(TextCodec(), Codec)
    assert isinstance(JSON, Codec)


def test_object_without_encode_and_decode_is_not_a_codec() -> None:
    assert not isinstance(NotACodec(), Codec)


def test_producer_accepts_a_custom_codec_and_encodes_with_it() -> None:
    producer = outbox.Producer(outbox.ProducerConfig(codec=TextCodec()))
    row, message = producer.build_row("notes.added", "hello, wörld")
    assert row["payload"] == "hello, wörld".encode()
    assert row["content_type"] == "text/plain; charset=utf-8"
    assert message.payload == "hello, wörld"


def test_producer_config_with_a_non_codec_fails_validation() -> None:
    config = outbox.ProducerConfig(codec=NotACodec())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"encode\(\) and decode\(\)"):
        config.validate()


def test_producer_refuses_a_non_codec_before_any_publish() -> None:
    with pytest.raises(ConfigurationError):
        outbox.Producer(outbox.ProducerConfig(codec=NotACodec()))  # type: ignore[arg-type]


def test_json_encoding_matches_the_standard_library() -> None:
    payload = {"b": [1, {"c": "δ"}], "a": None}
    expected = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    assert JSON.encode(payload) == expected
