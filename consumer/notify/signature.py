"""What a notification call looks like on the wire, and how its signature is made and checked.

Each call is ``POST <url>`` with a compact JSON body::

    {"message_id": "...", "topic": "...", "key": ... or null, "payload": ..., "timestamp": "..."}

(``timestamp``: when the producer wrote the message, ISO 8601 with offset) and the headers

- ``X-Outbox-Message-Id``: the message id, the receiver's idempotency key;
- ``X-Outbox-Topic``;
- ``X-Outbox-Attempt``: 1 for the first call, counting on across manual retries;
- ``X-Outbox-Timestamp``: unix seconds when this call was signed;
- ``X-Outbox-Signature``: ``v1=<hex HMAC-SHA256(secret, timestamp + "." + body)>``.

The scheme is the remote check-back's (``outbox.checkback_server``), so one
verifier serves both; receivers need only ``hmac`` and ``hashlib`` (docs/notify.md).
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from outbox.checkback_server import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign, signature_matches

if TYPE_CHECKING:
    from datetime import datetime

__all__ = [
    "ATTEMPT_HEADER",
    "MESSAGE_ID_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "TOPIC_HEADER",
    "encode_body",
    "request_headers",
    "sign",
    "verify",
]

MESSAGE_ID_HEADER = "X-Outbox-Message-Id"
TOPIC_HEADER = "X-Outbox-Topic"
ATTEMPT_HEADER = "X-Outbox-Attempt"

DEFAULT_TOLERANCE = timedelta(minutes=5)
"""How far a signed timestamp may be from the receiver's clock before ``verify`` refuses it."""


def encode_body(
    *, message_id: str, topic: str, key: str | None, payload: Any, timestamp: datetime
) -> bytes:
    """The request body of a notification: compact UTF-8 JSON of the five fields.

    Raises ``TypeError`` or ``ValueError`` for a payload that is not JSON (it came
    through the JSON codec, so only a hand-written row can hold one).
    """
    return json.dumps(
        {
            "message_id": message_id,
            "topic": topic,
            "key": key,
            "payload": payload,
            "timestamp": timestamp.isoformat(),
        },
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    ).encode()


def request_headers(
    *,
    secret: str,
    body: bytes,
    message_id: str,
    topic: str,
    attempt: int,
    now: float | None = None,
) -> dict[str, str]:
    """The headers of one call, signed now (or at unix time ``now``)."""
    timestamp = str(int(time.time() if now is None else now))
    return {
        "Content-Type": "application/json",
        MESSAGE_ID_HEADER: message_id,
        TOPIC_HEADER: topic,
        ATTEMPT_HEADER: str(attempt),
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: sign(secret, timestamp, body),
    }


def verify(
    secret: str,
    body: bytes,
    *,
    timestamp: str | None,
    signature: str | None,
    tolerance: timedelta = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> bool:
    """Tell whether a received call is genuine: a fresh timestamp and a valid signature.

    ``timestamp`` and ``signature`` are the ``X-Outbox-Timestamp`` and
    ``X-Outbox-Signature`` header values (None when absent), ``body`` the raw
    bytes as received (not re-encoded JSON). The comparison is constant-time; a
    timestamp further than ``tolerance`` from ``now`` (this host's clock) is
    refused, which bounds how long a captured call can be replayed.
    """
    if not timestamp or not timestamp.isdigit():
        return False
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > tolerance.total_seconds():
        return False
    return signature_matches(secret, timestamp, body, signature)
