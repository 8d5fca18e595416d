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
    "NotificationStatus",
    "inbox_table",
    "metadata",
    "notification_attempt_table",
    "notification_table",
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


class NotificationStatus(enum.StrEnum):
    """Where a notification of the notify service is (``consumer.notify``, DESIGN §1.4)."""

    PENDING = "pending"  # attempts remain: due at next_attempt_at
    DELIVERED = "delivered"  # the endpoint answered 2xx
    ABANDONED = "abandoned"  # attempts used up, or the endpoint answered 410 Gone


metadata = MetaData()

# bigint identity on PostgreSQL (as Django makes it); SQLite auto-increments only
# a column typed INTEGER.
_BigId = BigInteger().with_variant(Integer(), "sqlite")
# jsonb on PostgreSQL (as Django's JSONField makes it); plain JSON text elsewhere.
_Json = JSON().with_variant(JSONB(), "postgresql")
_STATUSES = ", ".join(f"'{s.value}'" for s in MessageStatus)
_NOTIFICATION_STATUSES = ", ".join(f"'{s.value}'" for s in NotificationStatus)

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

notification_table = Table(
    "outbox_notification",
    metadata,
    Column("id", _BigId, Identity(), primary_key=True),
    Column("message_id", Uuid(), nullable=False),
    Column("subscription", String(100), nullable=False),
    Column("topic", String(255), nullable=False),
    Column("key", String(255), nullable=True),
    # The decoded payload: the request body is built from it at each attempt.
    Column("payload", _Json, nullable=False),
    # When the producer wrote the message: the body's "timestamp".
    Column("message_created_at", DateTime(timezone=True), nullable=False),
    Column("status", String(16), nullable=False),
    # Attempts whose outcome was recorded; a call cut short by a crash is not counted.
    Column("attempts", Integer(), nullable=False),
    # The attempt after which a failure abandons the notification: the schedule's length,
    # raised by the schedule's length again on each manual retry.
    Column("max_attempts", Integer(), nullable=False),
    # pending: when the next attempt is due, or, while claimed, when the claim lapses.
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    # A notify process's claim on the row: who, and until when; an expired claim is void.
    Column("claimed_by", String(64), nullable=True),
    Column("claimed_until", DateTime(timezone=True), nullable=True),
    Column("last_status_code", SmallInteger(), nullable=True),
    Column("last_error", Text(), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("delivered_at", DateTime(timezone=True), nullable=True),
    Column("abandoned_at", DateTime(timezone=True), nullable=True),
    # One notification per message and subscription, even if the inbox row that guards
    # the consumer was purged before a replay; also serves look-ups by message id.
    UniqueConstraint(
        "message_id", "subscription", name="uq_outbox_notification_message_subscription"
    ),
    CheckConstraint(f"status IN ({_NOTIFICATION_STATUSES})", name="ck_outbox_notification_status"),
    # Each subscription's due rows in due order, and nothing else: the claim reads one
    # subscription at a time, so one endpoint's backlog is never scanned for another's,
    # and delivered or abandoned history does not grow the index.
    Index(
        "ix_outbox_notification_due",
        "subscription",
        "next_attempt_at",
        postgresql_where=text("status = 'pending'"),
        sqlite_where=text("status = 'pending'"),
    ),
    # The query API's since/until filter and the retention purge.
    Index("ix_outbox_notification_created", "created_at"),
)

notification_attempt_table = Table(
    "outbox_notification_attempt",
    metadata,
    Column("id", _BigId, Identity(), primary_key=True),
    # No foreign key: the purge deletes attempts with their notification, and a constraint
    # would need Django's deferred, hash-named twin to keep the two schemas identical.
    Column("notification_id", BigInteger(), nullable=False),
    Column("attempt", Integer(), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("duration_ms", Integer(), nullable=False),
    # NULL when no HTTP answer came (connection error, timeout).
    Column("status_code", SmallInteger(), nullable=True),
    Column("error", Text(), nullable=True),
    # A notification's attempts, in order.
    Index("ix_outbox_notification_attempt", "notification_id", "attempt"),
)


def shard_of(key: str) -> int:
    """Return the shard of an ordering key: stable across processes, versions and languages."""
    return zlib.crc32(key.encode()) % SHARD_COUNT
