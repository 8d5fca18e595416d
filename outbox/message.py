"""The message as the framework hands it to users."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping
    from datetime import datetime

__all__ = ["HeaderValue", "Message"]

HeaderValue = str | int | float | bool | None
"""The header value types that every AMQP client and JSON agree on."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """One message: what ``publish`` wrote, what a check-back or a handler receives."""

    message_id: str
    """The message's UUID in canonical string form; unique in the outbox."""
    topic: str
    """Dot-separated topic; the AMQP routing key."""
    key: str | None
    """Ordering key: messages with the same key are published one after another, in the
    order their rows were written (docs/guarantees.md: what that means for transactions)."""
    payload: Any
    """The decoded payload."""
    headers: Mapping[str, HeaderValue] = field(default_factory=dict)
    """Application headers sent with the message."""
    created_at: datetime
    """When the producer wrote the message (UTC)."""
