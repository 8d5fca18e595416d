"""Payload codecs: how a payload becomes the bytes stored in the outbox and sent on the wire.

The codec runs in ``publish``, inside the producer's transaction, so a payload
that cannot be encoded fails there and then, before anything is committed. The
relay never re-encodes: it sends the stored bytes with the stored content type.
"""

from __future__ import annotations

import json
from typing import Any, Protocol, runtime_checkable

from outbox.errors import InvalidMessageError

__all__ = ["JSON", "Codec", "JsonCodec"]


@runtime_checkable
class Codec(Protocol):
    """Turns payloads into bytes and back. Implementations must be thread-safe."""

    @property
    def content_type(self) -> str:
        """The MIME type sent as the AMQP ``content_type`` (for example ``application/json``)."""
        ...

    def encode(self, payload: Any) -> bytes:
        """Return the bytes of ``payload``; raise ``InvalidMessageError`` when it cannot."""
        ...

    def decode(self, body: bytes) -> Any:
        """Return the payload encoded in ``body``; raise ``InvalidMessageError`` when it cannot."""
        ...


class JsonCodec:
    """Strict JSON (RFC 8259) in UTF-8: no NaN or Infinity, which other languages reject."""

    content_type = "application/json"

    def __init__(self) -> None:
        # One encoder object: json.dumps would rebuild it on every call with non-default options.
        self._encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        self._decoder = json.JSONDecoder(parse_constant=_refuse_constant)

    def encode(self, payload: Any) -> bytes:
        try:
            return self._encoder.encode(payload).encode()
        except (TypeError, ValueError) as e:
            raise InvalidMessageError(
                f"payload is not JSON-serialisable ({e}); pass dicts, lists, str, int, float, "
                "bool or None (convert datetimes, Decimals and UUIDs to str first), or give the "
                "producer a codec that knows the type"
            ) from e

    def decode(self, body: bytes) -> Any:
        try:
            # Decode first: json.loads(bytes) would also guess UTF-16 and UTF-32.
            return self._decoder.decode(body.decode())
        except (UnicodeDecodeError, ValueError) as e:
            raise InvalidMessageError(f"body is not valid UTF-8 JSON: {e}") from e

    def __repr__(self) -> str:
        return "JsonCodec()"


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


JSON = JsonCodec()
"""The default codec."""
