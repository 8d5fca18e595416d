"""The producer API: ``publish`` adds an outbox row to the caller's transaction.

Guarantee (DESIGN §5.1): the row is written with the caller's business rows in
one local transaction, so it is committed exactly when they are; ``publish``
never commits, and everything that can be wrong with the arguments is found
before the INSERT is sent.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, overload

from sqlalchemy import Connection, func, insert
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session

from outbox.codec import JSON, Codec
from outbox.engines import plain_postgres
from outbox.errors import (
    ConfigurationError,
    DatabaseError,
    DuplicateMessageError,
    InvalidMessageError,
    TransactionRequiredError,
)
from outbox.ids import new_message_uuid
from outbox.message import Message
from outbox.tables import MessageStatus, outbox_table, shard_of
from outbox.tracing import inject_trace_headers
from outbox.validation import check_message

if TYPE_CHECKING:
    from collections.abc import Coroutine, Mapping

    from sqlalchemy import Insert

    from outbox.message import HeaderValue

__all__ = ["DEFAULT_MAX_PAYLOAD_BYTES", "Producer", "ProducerConfig", "publish"]

DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024
"""1 MiB: far below RabbitMQ's limit, and large enough for any event that is not a file."""

AnySession = Session | Connection | AsyncSession | AsyncConnection


@dataclass(frozen=True, kw_only=True, slots=True)
class ProducerConfig:
    """How a ``Producer`` encodes and checks messages."""

    codec: Codec = field(default=JSON)
    """Encodes payloads; JSON by default."""
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    """Encoded payloads larger than this are refused by ``publish``."""

    def validate(self) -> None:
        """Raise ``ConfigurationError`` if a value is unusable."""
        if not isinstance(self.codec, Codec):
            raise ConfigurationError(
                "codec must have content_type, encode() and decode() (see outbox.Codec)"
            )
        if not isinstance(self.max_payload_bytes, int) or self.max_payload_bytes <= 0:
            raise ConfigurationError(
                f"max_payload_bytes must be a positive int, got {self.max_payload_bytes!r}"
            )


class Producer:
    """Writes outbox rows; ``outbox.publish`` is the method of a default instance.

    Make your own to change the codec or the payload size limit::

        producer = Producer(ProducerConfig(max_payload_bytes=64 * 1024))
        producer.publish(session, "orders.created", {"id": 7})
    """

    def __init__(self, config: ProducerConfig | None = None) -> None:
        self.config = config or ProducerConfig()
        self.config.validate()
        self._statements: dict[str, Insert] = {}

    @overload
    def publish(
        self,
        session: Session | Connection,
        topic: str,
        payload: Any,
        *,
        key: str | None = None,
        headers: Mapping[str, HeaderValue] | None = None,
        message_id: str | uuid.UUID | None = None,
    ) -> Message: ...

    @overload
    def publish(
        self,
        session: AsyncSession | AsyncConnection,
        topic: str,
        payload: Any,
        *,
        key: str | None = None,
        headers: Mapping[str, HeaderValue] | None = None,
        message_id: str | uuid.UUID | None = None,
    ) -> Coroutine[Any, Any, Message]: ...

    def publish(
        self,
        session: AnySession,
        topic: str,
        payload: Any,
        *,
        key: str | None = None,
        headers: Mapping[str, HeaderValue] | None = None,
        message_id: str | uuid.UUID | None = None,
    ) -> Message | Coroutine[Any, Any, Message]:
        """Add a message to the transaction of ``session``; never commit.

        ``session`` is a SQLAlchemy ``Session`` or ``Connection`` (returns the
        ``Message``), or an ``AsyncSession`` or ``AsyncConnection`` (returns an
        awaitable: ``await publish(...)``). The message becomes deliverable when
        that transaction commits and is never sent if it rolls back.

        Raises ``InvalidMessageError`` for a bad topic, key, header or payload
        (nothing is written), ``DuplicateMessageError`` when an explicit
        ``message_id`` is already in the outbox (the transaction is rolled back),
        and ``TransactionRequiredError`` for a connection in autocommit mode.
        """
        row, message = self.build_row(
            topic, payload, key=key, headers=headers, message_id=message_id
        )
        if isinstance(session, AsyncSession | AsyncConnection):
            return self._publish_async(session, row, message)
        if isinstance(session, Session):
            conn = session.connection()
        elif isinstance(session, Connection):
            conn = session
        else:
            raise TypeError(
                "publish() needs a SQLAlchemy Session, Connection, AsyncSession or "
                f"AsyncConnection, not {type(session).__name__}; with Django use "
                "outbox.django.publish"
            )
        _require_transaction(conn)
        try:
            if plain_postgres(conn):
                conn.exec_driver_sql(_PG_INSERT, _pg_params(row))
            else:
                conn.execute(self._statement(conn.dialect.name), row)
        except DBAPIError as e:
            duplicate = _translate(e, message.message_id)
            if isinstance(duplicate, DuplicateMessageError):
                # SQLite would let the caller commit the rest of the transaction;
                # rolling it back makes both databases fail the unit of work.
                (session if isinstance(session, Session) else conn).rollback()
            raise duplicate from e
        return message

    async def _publish_async(
        self, session: AsyncSession | AsyncConnection, row: dict[str, Any], message: Message
    ) -> Message:
        conn = await session.connection() if isinstance(session, AsyncSession) else session
        assert conn.sync_connection is not None  # connection() above has started it
        _require_transaction(conn.sync_connection)
        try:
            if plain_postgres(conn.sync_connection):
                await conn.exec_driver_sql(_PG_INSERT, _pg_params(row))
            else:
                await conn.execute(self._statement(conn.dialect.name), row)
        except DBAPIError as e:
            duplicate = _translate(e, message.message_id)
            if isinstance(duplicate, DuplicateMessageError):
                await session.rollback()
            raise duplicate from e
        return message

    def build_row(
        self,
        topic: str,
        payload: Any,
        *,
        key: str | None = None,
        headers: Mapping[str, HeaderValue] | None = None,
        message_id: str | uuid.UUID | None = None,
        status: MessageStatus = MessageStatus.PENDING,
    ) -> tuple[dict[str, Any], Message]:
        """Validate and encode a message; return its outbox row values and the ``Message``.

        For integrations that insert the row themselves (Django, half messages).
        Raises ``InvalidMessageError`` as ``publish`` does.
        """
        topic, key, checked_headers, mid = check_message(topic, key, headers, message_id)
        inject_trace_headers(checked_headers)
        body = self.config.codec.encode(payload)
        if len(body) > self.config.max_payload_bytes:
            raise InvalidMessageError(
                f"payload is {len(body)} bytes encoded, over the limit of "
                f"{self.config.max_payload_bytes}; store large data elsewhere and publish a "
                "reference to it, or raise ProducerConfig.max_payload_bytes"
            )
        uid = uuid.UUID(mid) if mid is not None else new_message_uuid()
        now = datetime.now(UTC)
        row = {
            "message_id": uid,
            "topic": topic,
            "key": key,
            "shard": None if key is None else shard_of(key),
            "status": status.value,
            "payload": body,
            "content_type": self.config.codec.content_type,
            "headers": checked_headers,
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
            "updated_at": now,
            "checks": 0,
        }
        message = Message(
            message_id=mid or str(uid),
            topic=topic,
            key=key,
            payload=payload,
            headers=checked_headers,
            created_at=now,
        )
        return row, message

    def _statement(self, dialect: str) -> Insert:
        stmt = self._statements.get(dialect)
        if stmt is None:
            # inline(): no RETURNING of the new id, which publish never uses; the round
            # trip's extra result handling costs about a third of publish's own CPU.
            stmt = insert(outbox_table).inline()
            if dialect == "postgresql":
                # The relay compares next_attempt_at with the database clock; taking it
                # from the same clock means an application host whose clock runs ahead
                # cannot delay delivery.
                stmt = stmt.values(next_attempt_at=func.now())
            self._statements[dialect] = stmt
        return stmt


# The outbox row as one fixed SQL text, on PostgreSQL through a driver with named
# parameters (psycopg): the same row the Core statement writes (``_statement``), for
# about half of SQLAlchemy's per-statement CPU (compiling the 12 values from the
# cache and processing each bound value), which is most of publish's own cost.
_COLUMNS = (
    "message_id",
    "topic",
    "key",
    "shard",
    "status",
    "payload",
    "content_type",
    "headers",
    "attempts",
    "created_at",
    "updated_at",
    "checks",
)
_PG_INSERT = (
    f"INSERT INTO {outbox_table.name} ({', '.join(_COLUMNS)}, next_attempt_at) VALUES ("
    + ", ".join(f"%({c})s::jsonb" if c == "headers" else f"%({c})s" for c in _COLUMNS)
    + ", now())"
)


def _pg_params(row: dict[str, Any]) -> dict[str, Any]:
    params = {name: row[name] for name in _COLUMNS}
    params["headers"] = json.dumps(row["headers"], separators=(",", ":"))
    return params


def _require_transaction(conn: Connection) -> None:
    if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
        raise TransactionRequiredError(
            "publish() got a connection in AUTOCOMMIT mode, where the outbox row would "
            "commit on its own; use a connection with a transaction (engine.begin())"
        )


def _translate(error: DBAPIError, message_id: str) -> Exception:
    """Map a driver error from the outbox INSERT to the framework's error for it."""
    text = str(error.orig)
    if isinstance(error, IntegrityError) and (
        "uq_outbox_message_message_id" in text or "outbox_message.message_id" in text
    ):
        return DuplicateMessageError(message_id)
    if "outbox_message" in text and ("does not exist" in text or "no such table" in text):
        return DatabaseError(
            "the outbox tables do not exist in this database; run `outbox db upgrade` "
            "(or migrate the outbox Django app, or include outbox.metadata in your Alembic "
            "migrations)"
        )
    return DatabaseError(f"writing the outbox row failed: {error.orig}")


publish = Producer().publish
"""Add a message to the caller's transaction; never commit (see ``Producer.publish``)."""
