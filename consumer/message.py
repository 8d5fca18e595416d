"""The message a handler receives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping
    from datetime import datetime

    from outbox.message import HeaderValue

__all__ = ["IncomingMessage"]


@dataclass(frozen=True, slots=True, kw_only=True)
class IncomingMessage:
    """A message as a handler sees it."""

    message_id: str
    topic: str
    key: str | None
    payload: Any
    headers: Mapping[str, HeaderValue] = field(default_factory=dict)
    created_at: datetime
    attempt: int
    """1 on the first delivery to this group's handler, 2 on the first retry, and so on."""
    redelivered: bool = False
    """True when the broker delivered this copy before (a crash or a lost connection)."""
