"""The framework's tables, defined once; ``outbox.metadata`` holds them for Alembic users.

PostgreSQL is the primary target and SQLite the embedded one. The Django app
(``outbox.django``) and the Alembic migrations in ``outbox/migrations`` create
exactly this schema; ``tests/integration/test_schema_parity.py`` proves it.
"""

from __future__ import annotations

import enum
import zlib

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

__all__ = [
    "SHARD_COUNT",
    "MessageStatus",
    "inbox_table",
    "metadata",
    "outbox_table",
    "receipt_table",
    "shard_of",
]

SHARD_COUNT = 256
"""Keyed messages are spread over this many shards (``crc32(key) % SHARD_COUNT``).

A relay owns whole shards, so all messages of one key go through one relay at a
time and keep their order; 256 leaves room to spread over many relays while
staying cheap to rebalance. Changing it would move keys between shards, so it is
part of the stored format.
"""


class MessageStatus(enum.StrEnum):
    """Where an outbox message is in its life (DESIGN §4)."""

    PREPARED = "prepared"  # half message: stored, waiting for commit / rollback / check-back
    PENDING = "pending"  # deliverable: the relay publishes it when next_attempt_at has come
    PUBLISHED = "published"  # the broker confirmed it
    DISCARDED = "discarded"  # rolled back (explicitly or by check-back); never published
    DEAD = "dead"  # gave up (attempts or checks exhausted); last_error says why


metadata = MetaData()

# bigint identity on PostgreSQL (as Django makes it); SQLite auto-increments only
# a column typed INTEGER.
_BigId = BigInteger().with_variant(Integer(), "sqlite")
# jsonb on PostgreSQL (as Django's JSONField makes it); plain JSON text elsewhere.
_Json = JSON().with_variant(JSONB(), "postgresql")
_STATUSES = ", ".join(f"'{s.value}'" for s in MessageStatus)

outbox_table = Table(
    "outbox_message",
    metadata,
    # Insert order. Not a commit order (a lower id can commit after a higher one), so
    # the relay claims by status, never by advancing a cursor over ids.
    Column("id", _BigId, Identity(), primary_key=True),
    Column("message_id", Uuid(), nullable=False),
    Column("topic", String(255), nullable=False),
    Column("key", String(255), nullable=True),
    # crc32(key) % SHARD_COUNT, NULL for keyless messages (nothing orders them).
    Column("shard", SmallInteger(), nullable=True),
    Column("status", String(16), nullable=False),
    # The encoded payload, sent as is: the relay never decodes or re-encodes it.
    Column("payload", LargeBinary(), nullable=False),
    Column("content_type", String(100), nullable=False),
    Column("headers", _Json, nullable=False),
    Column("attempts", Integer(), nullable=False),
    # pending: when the relay may (re)try; prepared: when it is checked back next.
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("last_error", Text(), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("published_at", DateTime(timezone=True), nullable=True),
    # A relay's claim on the row: who, and until when; an expired claim is void.
    Column("claimed_by", String(64), nullable=True),
    Column("claimed_until", DateTime(timezone=True), nullable=True),
    # Half messages: how often the producer was checked back, and where the local
    # transaction ran (xid from pg_current_xact_id() on the resource it names), so
    # the relay can ask PostgreSQL instead of the application.
    Column("checks", Integer(), nullable=False),
    Column("xid", BigInteger(), nullable=True),
    Column("xid_resource", String(255), nullable=True),
    UniqueConstraint("message_id", name="uq_outbox_message_message_id"),
    CheckConstraint(f"status IN ({_STATUSES})", name="ck_outbox_message_status"),
    # The claim of keyless messages reads only due pending rows in due order. A partial
    # index stays as small as the backlog however many published rows are kept for
    # retention, so the claim cost does not grow with history.
    Index(
        "ix_outbox_message_due",
        "next_attempt_at",
        postgresql_where=text("status = 'pending' AND key IS NULL"),
        sqlite_where=text("status = 'pending' AND key IS NULL"),
    ),
    # Keyed messages are taken per shard, oldest id first per key; (shard, id) lets a
    # relay read the heads of its shards without touching other relays' rows.
    Index(
        "ix_outbox_message_keyed",
        "shard",
        "id",
        postgresql_where=text("status = 'pending' AND key IS NOT NULL"),
        sqlite_where=text("status = 'pending' AND key IS NOT NULL"),
    ),
    # The check-back sweep reads prepared rows whose check time has come.
    Index(
        "ix_outbox_message_prepared",
        "next_attempt_at",
        postgresql_where=text("status = 'prepared'"),
        sqlite_where=text("status = 'prepared'"),
    ),
    # Retention purge deletes finished rows oldest first in small batches.
    Index(
        "ix_outbox_message_finished",
        "updated_at",
        postgresql_where=text("status IN ('published', 'discarded')"),
        sqlite_where=text("status IN ('published', 'discarded')"),
    ),
)

inbox_table = Table(
    "outbox_inbox",
    metadata,
    Column("id", _BigId, Identity(), primary_key=True),
    Column("consumer_group", String(255), nullable=False),
    Column("message_id", Uuid(), nullable=False),
    Column("topic", String(255), nullable=False),
    Column("processed_at", DateTime(timezone=True), nullable=False),
    # The dedupe itself: the handler's transaction inserts this row, and a second copy
    # of the message (even one processed at the same moment) fails on this constraint.
    UniqueConstraint("consumer_group", "message_id", name="uq_outbox_inbox_group_message"),
    # Retention purge of old inbox rows.
    Index("ix_outbox_inbox_processed_at", "processed_at"),
)

receipt_table = Table(
    "outbox_receipt",
    metadata,
    Column("id", _BigId, Identity(), primary_key=True),
    Column("message_id", Uuid(), nullable=False),
    Column("consumer_group", String(255), nullable=False),
    # consumed / dead / delivered / abandoned: what the group did with the message.
    Column("outcome", String(16), nullable=False),
    Column("detail", Text(), nullable=True),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    # Recording a receipt is idempotent: a redelivered receipt changes nothing.
    UniqueConstraint(
        "message_id", "consumer_group", "outcome", name="uq_outbox_receipt_message_group_outcome"
    ),
)


def shard_of(key: str) -> int:
    """Return the shard of an ordering key: stable across processes, versions and languages."""
    return zlib.crc32(key.encode()) % SHARD_COUNT
