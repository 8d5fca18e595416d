"""Receipts: what a consumer group did with a message, sent back so ``outbox status`` can tell.

The wire format, shared by the consumer that sends a receipt and the relay that
records it (DESIGN §1.6):

- exchange ``<exchange>.receipts``: a durable topic exchange of its own, next to
  the message exchange ``<exchange>``. Not the message exchange itself: a group
  bound there with ``#`` would then receive every receipt as a message.
- routing key: the consumer group; persistent delivery; AMQP ``message_id``: a
  fresh UUID (the receipt's own, not the message's); ``content_type``
  ``application/json``;
- body: one receipt ``{"message_id", "group", "outcome", "detail", "at"}``, ``at``
  an ISO 8601 time with its UTC offset (when the group reached the outcome, by its
  clock), or a JSON array of them: consumers send a batch as one message.

Relays read them from the shared queue ``<exchange>.receipts.relay`` (competing
consumers) and insert them into ``outbox_receipt``. Receipts are best-effort
telemetry: one can be lost (a consumer killed before sending it, no relay queue
yet), and none is ever part of the exactly-once guarantee, which the inbox alone
gives.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Literal, get_args

from sqlalchemy.dialects import postgresql, sqlite

from outbox.codec import JSON
from outbox.errors import InvalidMessageError, MalformedMessageError
from outbox.ids import normalize_message_id
from outbox.tables import receipt_table

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "CONTENT_TYPE",
    "EXCHANGE_SUFFIX",
    "MAX_DETAIL",
    "OUTCOMES",
    "QUEUE_SUFFIX",
    "Outcome",
    "Receipt",
    "consumed_receipt_texts",
    "decode_receipt",
    "decode_receipts",
    "encode_receipt",
    "encode_receipts",
    "join_receipt_texts",
    "receipt_text",
    "receipts_exchange",
    "receipts_queue",
    "record_receipts",
]

Outcome = Literal["consumed", "dead", "delivered", "abandoned"]
"""``consumed``: the handler's transaction committed; ``dead``: dead-lettered (detail: why);
``delivered`` / ``abandoned``: the notification service reached the endpoint or gave up."""
OUTCOMES: Final[tuple[Outcome, ...]] = get_args(Outcome)

EXCHANGE_SUFFIX: Final = ".receipts"
"""Receipts go to ``<exchange>.receipts``."""
QUEUE_SUFFIX: Final = ".receipts.relay"
"""Relays consume ``<exchange>.receipts.relay``."""
CONTENT_TYPE: Final = JSON.content_type
MAX_DETAIL: Final = 1000
"""Characters of ``detail`` kept; a dead-letter reason longer than that is cut."""
_MAX_GROUP: Final = 255  # outbox_receipt.consumer_group is VARCHAR(255)
_FIELDS: Final = ("message_id", "group", "outcome", "detail", "at")


def receipts_exchange(exchange: str) -> str:
    """The receipts exchange that goes with the message exchange ``exchange``."""
    return exchange + EXCHANGE_SUFFIX


def receipts_queue(exchange: str) -> str:
    """The queue relays take the receipts of ``exchange`` from."""
    return exchange + QUEUE_SUFFIX


@dataclass(frozen=True, slots=True, kw_only=True)
class Receipt:
    """One group's outcome for one message, as sent on the wire.

    (``outbox.admin.Receipt`` is the row ``outbox status`` reads back.)
    """

    message_id: str
    """The outbox message's id, canonical UUID text."""
    group: str
    outcome: Outcome
    detail: str | None = None
    at: datetime
    """When the group reached the outcome; timezone-aware."""


def encode_receipt(receipt: Receipt) -> bytes:
    """Return the JSON body of ``receipt`` (``detail`` cut to ``MAX_DETAIL`` characters)."""
    return JSON.encode(_fields(receipt))


def encode_receipts(receipts: Sequence[Receipt]) -> bytes:
    """Return the JSON body of a batch of receipts: an array, sent as one message."""
    return JSON.encode([_fields(r) for r in receipts])


def receipt_text(receipt: Receipt) -> str:
    """``receipt`` as the JSON object text that ``join_receipt_texts`` puts in a batch."""
    return encode_receipt(receipt).decode()


def consumed_receipt_texts(message_ids: Sequence[str], group: str, at: datetime) -> list[str]:
    """The ``consumed`` receipts of ``message_ids`` (canonical UUID text) as JSON object texts.

    The same objects ``encode_receipts`` writes, formatted directly: the worker
    sends one per message it handles, and a dict and an encoder pass per receipt
    cost more than the rest of the receipt path together. The ids are canonical
    UUIDs (hex digits and dashes) and the time an ISO 8601 string, so neither
    needs escaping; the group is JSON-encoded once.
    """
    head = '{"message_id":"'
    tail = f'","group":{JSON.encode(group).decode()},"outcome":"consumed","detail":null,'
    tail += f'"at":"{at.isoformat()}"}}'
    return [head + m + tail for m in message_ids]


def join_receipt_texts(texts: Sequence[str]) -> bytes:
    """The body of a batch of receipts from their JSON object texts: a JSON array."""
    return ("[" + ",".join(texts) + "]").encode()


def _fields(receipt: Receipt) -> dict[str, Any]:
    return {
        "message_id": receipt.message_id,
        "group": receipt.group,
        "outcome": receipt.outcome,
        "detail": receipt.detail[:MAX_DETAIL] if receipt.detail is not None else None,
        "at": receipt.at.isoformat(),
    }


def decode_receipt(body: bytes, content_type: str | None = CONTENT_TYPE) -> Receipt:
    """Read a receipt body; raise ``MalformedMessageError`` saying what is wrong.

    Checks every field, so that what reaches the database is a receipt and not
    whatever someone published to the exchange. ``at`` comes back in UTC.
    """
    data = _json(body, content_type)
    if not isinstance(data, dict):
        raise MalformedMessageError("a receipt body is a JSON object")
    return _receipt(data)


def decode_receipts(body: bytes, content_type: str | None = CONTENT_TYPE) -> list[Receipt]:
    """Read a body holding one receipt or an array of them; all are checked as one.

    Raises ``MalformedMessageError`` (saying which element is wrong) if any is not
    a receipt: a body is recorded whole or not at all.
    """
    data = _json(body, content_type)
    if isinstance(data, dict):
        return [_receipt(data)]
    if not isinstance(data, list) or not data:
        raise MalformedMessageError("a receipts body is a JSON object or a non-empty array")
    receipts: list[Receipt] = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise MalformedMessageError(f"receipt [{i}] is not a JSON object")
        try:
            receipts.append(_receipt(item))
        except MalformedMessageError as e:
            raise MalformedMessageError(f"receipt [{i}]: {e}") from None
    return receipts


def _json(body: bytes, content_type: str | None) -> Any:
    if (content_type or "").split(";", 1)[0].strip().lower() != CONTENT_TYPE:
        raise MalformedMessageError(f"content type {content_type!r} is not {CONTENT_TYPE}")
    try:
        return JSON.decode(body)
    except InvalidMessageError as e:
        raise MalformedMessageError(str(e)) from None


def _receipt(data: dict[str, Any]) -> Receipt:
    missing = [name for name in _FIELDS if name not in data]
    if missing:
        raise MalformedMessageError(f"receipt lacks {', '.join(missing)}")
    try:
        message_id = normalize_message_id(data["message_id"])
    except ValueError:
        raise MalformedMessageError("receipt message_id is not a UUID") from None
    group = data["group"]
    if not isinstance(group, str) or not group or len(group) > _MAX_GROUP:
        raise MalformedMessageError(f"receipt group must be a str of 1 to {_MAX_GROUP} characters")
    outcome = data["outcome"]
    if outcome not in OUTCOMES:
        raise MalformedMessageError(f"receipt outcome must be one of {list(OUTCOMES)}")
    detail = data["detail"]
    if detail is not None and not isinstance(detail, str):
        raise MalformedMessageError("receipt detail must be a str or null")
    return Receipt(
        message_id=message_id,
        group=group,
        outcome=outcome,
        detail=detail[:MAX_DETAIL] if detail is not None else None,
        at=_time(data["at"]),
    )


def _time(value: Any) -> datetime:
    if not isinstance(value, str):
        raise MalformedMessageError("receipt at must be an ISO 8601 string")
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise MalformedMessageError("receipt at is not an ISO 8601 time") from None
    if at.tzinfo is None:
        # A time without offset could be any zone's; guessing would misdate the receipt.
        raise MalformedMessageError("receipt at has no UTC offset")
    return at.astimezone(UTC)


_INSERTS: dict[str, Any] = {}


def _insert(dialect: str) -> Any:
    stmt = _INSERTS.get(dialect)
    if stmt is None:
        module: Any = postgresql if dialect == "postgresql" else sqlite
        # The unique (message_id, consumer_group, outcome) makes a redelivered receipt, or
        # one two relays took at once, a no-op instead of an error that would fail the batch.
        stmt = module.insert(receipt_table).on_conflict_do_nothing(
            index_elements=["message_id", "consumer_group", "outcome"]
        )
        _INSERTS[dialect] = stmt
    return stmt


async def record_receipts(engine: AsyncEngine, receipts: Sequence[Receipt]) -> None:
    """Insert ``receipts`` into ``outbox_receipt`` in one transaction, idempotently.

    A receipt already recorded (same message, group and outcome) is left as it
    was, first time kept. PostgreSQL and SQLite. Database errors propagate as
    SQLAlchemy raises them; nothing is committed then.
    """
    if not receipts:
        return
    rows = [
        {
            "message_id": uuid.UUID(r.message_id),
            "consumer_group": r.group,
            "outcome": r.outcome,
            "detail": r.detail,
            "recorded_at": r.at.astimezone(UTC),
        }
        for r in receipts
    ]
    async with engine.begin() as conn:
        # No rowcount: SQLAlchemy 2.1 reports -1 for an executemany INSERT on some drivers.
        await conn.execute(_insert(conn.dialect.name), rows)
