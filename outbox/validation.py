"""Checks on what a producer passes to ``publish``: all of them run before any SQL."""

from __future__ import annotations

from typing import TYPE_CHECKING

from outbox.errors import InvalidMessageError
from outbox.ids import normalize_message_id
from outbox.topics import validate_topic

if TYPE_CHECKING:
    from collections.abc import Mapping

    from outbox.message import HeaderValue

__all__ = ["MAX_KEY_LENGTH", "RESERVED_HEADER_PREFIXES", "check_message"]

MAX_KEY_LENGTH = 255
RESERVED_HEADER_PREFIXES = ("x-outbox-", "cloudEvents:")
"""Header names the wire format sets itself; a producer may not set them."""

_HEADER_TYPES = (str, int, float, bool, type(None))


def check_message(
    topic: object,
    key: object,
    headers: object,
    message_id: object,
) -> tuple[str, str | None, dict[str, HeaderValue], str | None]:
    """Validate the non-payload arguments of ``publish``; return them normalized.

    Raises ``InvalidMessageError`` that names the argument and what to do.
    """
    try:
        validate_topic(topic)
    except ValueError as e:
        raise InvalidMessageError(str(e)) from None
    assert isinstance(topic, str)
    if key is not None:
        if not isinstance(key, str):
            raise InvalidMessageError(
                f"key must be a str or None, not {type(key).__name__}; convert ids with str()"
            )
        if not key or len(key) > MAX_KEY_LENGTH:
            raise InvalidMessageError(
                f"key must be 1 to {MAX_KEY_LENGTH} characters, got {len(key)}; "
                "use None for messages that need no ordering"
            )
    return topic, key, _check_headers(headers), _check_id(message_id)


def _check_headers(headers: object) -> dict[str, HeaderValue]:
    if headers is None:
        return {}
    if not isinstance(headers, dict):
        if not hasattr(headers, "items"):
            raise InvalidMessageError(
                f"headers must be a mapping of str to str/int/float/bool/None, "
                f"not {type(headers).__name__}"
            )
        headers = dict(headers.items())
    assert isinstance(headers, dict)
    checked: Mapping[str, HeaderValue] = headers
    for name, value in checked.items():
        if not isinstance(name, str) or not name:
            raise InvalidMessageError(f"header names must be non-empty str, got {name!r}")
        if name.startswith(RESERVED_HEADER_PREFIXES):
            raise InvalidMessageError(
                f"header {name!r} is reserved for the wire format; pick a name that does "
                f"not start with {' or '.join(RESERVED_HEADER_PREFIXES)}"
            )
        if not isinstance(value, _HEADER_TYPES):
            raise InvalidMessageError(
                f"header {name!r} has a {type(value).__name__} value; header values must be "
                "str, int, float, bool or None (put structured data in the payload)"
            )
    return dict(checked)


def _check_id(message_id: object) -> str | None:
    if message_id is None:
        return None
    try:
        return normalize_message_id(message_id)
    except ValueError as e:
        raise InvalidMessageError(f"{e}; pass a uuid.UUID or None for a fresh id") from None
