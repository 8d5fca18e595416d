"""Message ids: UUID version 7, time-ordered so that new rows land at the right end of indexes."""

from __future__ import annotations

import os
import re
import threading
import time
import uuid

__all__ = ["new_message_id", "new_message_uuid", "normalize_message_id"]

_UUID_TEXT = re.compile(
    r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
)
# What str(uuid.UUID(...)) gives back: ids in this form are returned as they are.
_CANONICAL = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_lock = threading.Lock()
_last_ms = 0
_last_rand = 0


def new_message_id() -> str:
    """Return a new message id (see ``new_message_uuid``) as its canonical string."""
    return str(new_message_uuid())


def new_message_uuid() -> uuid.UUID:
    """Return a new UUIDv7 (RFC 9562).

    Ids made in this process are strictly increasing: within one millisecond the
    74 random bits are incremented instead of redrawn (RFC 9562 §6.2, method 2),
    which keeps B-tree inserts append-only even at high publish rates.
    """
    global _last_ms, _last_rand
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms > _last_ms:
            _last_ms = ms
            _last_rand = int.from_bytes(os.urandom(10)) & ((1 << 74) - 1)
            # Leave headroom so a burst within one millisecond cannot overflow.
            _last_rand >>= 1
        else:
            ms = _last_ms  # the clock stepped back or stood still: stay monotonic
            _last_rand += 1
        rand = _last_rand
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version 7
    value |= (rand >> 62) << 64  # rand_a: 12 bits
    value |= 0b10 << 62  # RFC 4122 variant
    value |= rand & ((1 << 62) - 1)  # rand_b: 62 bits
    return uuid.UUID(int=value)


def normalize_message_id(value: object) -> str:
    """Return ``value`` (a ``uuid.UUID`` or a UUID string) in canonical form.

    Raises ``ValueError`` with what was wrong; callers wrap it in their own error.
    """
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, str):
        if _CANONICAL.fullmatch(value) is not None:
            return value  # the form every outbox message id travels in
        # uuid.UUID() alone also takes braces, 'urn:uuid:' and stray '+' or '_' characters.
        if _UUID_TEXT.fullmatch(value) is None:
            raise ValueError(f"message_id {value!r} is not a UUID")
        return str(uuid.UUID(value))
    raise ValueError(f"message_id must be a uuid.UUID or a UUID string, not {type(value).__name__}")
