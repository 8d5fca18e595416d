"""The wire format (DESIGN §3), in one place for the relay, the consumer and any test double.

On RabbitMQ a message is published to the durable topic exchange ``outbox``
(configurable) with:

- routing key: the topic; delivery mode 2 (persistent);
- ``message_id``: the outbox message id (a UUID); ``content_type``: the codec's
  (``application/json`` by default); ``timestamp``: when the producer wrote it;
- body: the encoded payload, byte for byte as stored in the outbox;
- headers: the producer's headers unchanged (so a W3C ``traceparent`` or
  ``tracestate`` header travels as is), ``x-outbox-key`` when the message has a key,
  and, unless turned off, the CloudEvents AMQP binding attributes
  (``cloudEvents:specversion``, ``cloudEvents:id``, ``cloudEvents:type``,
  ``cloudEvents:source``, ``cloudEvents:time``).

Any AMQP client can consume this; nothing framework-specific is needed to read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from outbox.codec import JSON, Codec
from outbox.errors import ConfigurationError, InvalidMessageError, MalformedMessageError
from outbox.ids import normalize_message_id
from outbox.message import HeaderValue, Message
from outbox.topics import validate_topic

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "DEFAULT_EXCHANGE",
    "KEY_HEADER",
    "TRACEPARENT_HEADER",
    "Envelope",
    "WireFormat",
]

DEFAULT_EXCHANGE = "outbox"
KEY_HEADER = "x-outbox-key"
TRACEPARENT_HEADER = "traceparent"
_CE_PREFIX = "cloudEvents:"
_PERSISTENT = 2
_HEADER_TYPES = (str, int, float, bool, type(None))


def _text(name: str, value: str | bytes) -> str:
    if isinstance(value, str):
        return value
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise MalformedMessageError(f"header {name!r} is not UTF-8 text") from None


def _created_at(ce_time: object, timestamp: datetime | None) -> datetime:
    """The producer's time: CloudEvents ``time`` keeps microseconds, AMQP ``timestamp`` seconds."""
    created: datetime | None = None
    if isinstance(ce_time, str | bytes):
        try:
            created = datetime.fromisoformat(
                ce_time.decode() if isinstance(ce_time, bytes) else ce_time
            )
        except (ValueError, UnicodeDecodeError):
            created = None
    created = created or timestamp or datetime.now(UTC)
    return created if created.tzinfo else created.replace(tzinfo=UTC)


@dataclass(frozen=True, kw_only=True, slots=True)
class WireFormat:
    """Settings of the wire format shared by the relay and consumers."""

    exchange: str = DEFAULT_EXCHANGE
    """The durable topic exchange messages are published to."""
    cloudevents: bool = True
    """Add the CloudEvents AMQP binding headers (``cloudEvents:*``)."""
    source: str = "outbox"
    """The CloudEvents ``source`` attribute: which service produced the message."""

    def validate(self) -> None:
        """Raise ``ConfigurationError`` if a value is unusable."""
        if not self.exchange or len(self.exchange) > 127:
            raise ConfigurationError("exchange must be a name of 1 to 127 characters")
        if not self.source:
            raise ConfigurationError("source must not be empty (CloudEvents requires it)")


@dataclass(frozen=True, kw_only=True, slots=True)
class Envelope:
    """A message as it travels: built by the relay from an outbox row, read back by consumers."""

    message_id: str
    topic: str
    key: str | None
    body: bytes
    content_type: str
    headers: Mapping[str, HeaderValue] = field(default_factory=dict)
    created_at: datetime

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Envelope:
        """Build the envelope of an outbox row (a mapping of ``outbox_message`` columns)."""
        created = row["created_at"]
        if created.tzinfo is None:  # SQLite returns naive datetimes; they are stored in UTC
            created = created.replace(tzinfo=UTC)
        return cls(
            message_id=str(row["message_id"]),
            topic=row["topic"],
            key=row["key"],
            body=bytes(row["payload"]),
            content_type=row["content_type"],
            headers=row["headers"] or {},
            created_at=created,
        )

    def amqp_headers(self, wire: WireFormat) -> dict[str, HeaderValue]:
        """Return the AMQP headers table of this message."""
        headers: dict[str, HeaderValue] = dict(self.headers)
        if self.key is not None:
            headers[KEY_HEADER] = self.key
        if wire.cloudevents:
            headers[_CE_PREFIX + "specversion"] = "1.0"
            headers[_CE_PREFIX + "id"] = self.message_id
            headers[_CE_PREFIX + "type"] = self.topic
            headers[_CE_PREFIX + "source"] = wire.source
            headers[_CE_PREFIX + "time"] = self.created_at.isoformat()
        return headers

    def amqp_properties(self, wire: WireFormat) -> dict[str, Any]:
        """Return the basic properties to publish with (names as aio-pika's ``Message`` takes)."""
        return {
            "message_id": self.message_id,
            "content_type": self.content_type,
            "delivery_mode": _PERSISTENT,
            "timestamp": self.created_at,
            "headers": self.amqp_headers(wire),
        }

    @classmethod
    def from_amqp(
        cls,
        *,
        body: bytes,
        routing_key: str | None,
        message_id: str | None,
        content_type: str | None,
        headers: Mapping[str, Any] | None,
        timestamp: datetime | None,
    ) -> Envelope:
        """Read an envelope from a received AMQP message.

        Raises ``MalformedMessageError`` saying what is missing or wrong, so the
        consumer can dead-letter the message with that reason.
        """
        if not message_id:
            raise MalformedMessageError("no message_id property: not an outbox message")
        try:
            mid = normalize_message_id(message_id)
        except ValueError as e:
            raise MalformedMessageError(str(e)) from None
        try:
            topic = validate_topic(routing_key)
        except ValueError as e:
            raise MalformedMessageError(f"routing key: {e}") from None
        if not content_type:
            raise MalformedMessageError("no content_type property: cannot choose a codec")
        app_headers: dict[str, HeaderValue] = {}
        key: str | None = None
        raw = dict(headers or {})
        for name, value in raw.items():
            if name == KEY_HEADER:
                if not isinstance(value, str | bytes):
                    raise MalformedMessageError(f"{KEY_HEADER} header is not a string")
                key = _text(name, value)
            elif name.startswith(_CE_PREFIX):
                continue
            elif isinstance(value, bytes):
                app_headers[name] = _text(name, value)
            elif isinstance(value, _HEADER_TYPES):
                app_headers[name] = value
            # Anything else is broker bookkeeping (x-death is a list of tables), not ours.
        return cls(
            message_id=mid,
            topic=topic,
            key=key,
            body=body,
            content_type=content_type,
            headers=app_headers,
            created_at=_created_at(raw.get(_CE_PREFIX + "time"), timestamp),
        )

    def decode(self, codecs: Mapping[str, Codec] | None = None) -> Message:
        """Decode the body with the codec registered for its content type (JSON by default).

        Raises ``MalformedMessageError`` for an unknown content type or a body the
        codec cannot read.
        """
        return Message(
            message_id=self.message_id,
            topic=self.topic,
            key=self.key,
            payload=self.payload(codecs),
            headers=self.headers,
            created_at=self.created_at,
        )

    def payload(self, codecs: Mapping[str, Codec] | None = None) -> Any:
        """The decoded body alone (``decode``'s ``Message.payload``); raises as it does."""
        registry = codecs if codecs is not None else {JSON.content_type: JSON}
        # MIME types are case-insensitive, and parameters (charset) do not pick the codec.
        codec = registry.get(self.content_type.split(";", 1)[0].strip().lower())
        if codec is None:
            raise MalformedMessageError(
                f"no codec for content type {self.content_type!r}; known: {sorted(registry)}"
            )
        try:
            return codec.decode(self.body)
        except InvalidMessageError as e:
            raise MalformedMessageError(str(e)) from e
