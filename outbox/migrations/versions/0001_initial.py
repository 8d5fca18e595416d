"""Outbox, inbox and receipt tables.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_TZ = sa.DateTime(timezone=True)


def _partial(name: str, columns: list[str], where: str) -> None:
    op.create_index(
        name,
        "outbox_message",
        columns,
        postgresql_where=sa.text(where),
        sqlite_where=sa.text(where),
    )


def upgrade() -> None:
    op.create_table(
        "outbox_message",
        sa.Column("id", _BigId, sa.Identity(), primary_key=True),
        sa.Column("message_id", sa.Uuid(), nullable=False),
        sa.Column("topic", sa.String(255), nullable=False),
        sa.Column("key", sa.String(255), nullable=True),
        sa.Column("shard", sa.SmallInteger(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("content_type", sa.String(100), nullable=False),
        sa.Column("headers", _Json, nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", _TZ, nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", _TZ, nullable=False),
        sa.Column("updated_at", _TZ, nullable=False),
        sa.Column("published_at", _TZ, nullable=True),
        sa.Column("claimed_by", sa.String(64), nullable=True),
        sa.Column("claimed_until", _TZ, nullable=True),
        sa.Column("checks", sa.Integer(), nullable=False),
        sa.Column("xid", sa.BigInteger(), nullable=True),
        sa.Column("xid_resource", sa.String(255), nullable=True),
        sa.UniqueConstraint("message_id", name="uq_outbox_message_message_id"),
        sa.CheckConstraint(
            "status IN ('prepared', 'pending', 'published', 'discarded', 'dead')",
            name="ck_outbox_message_status",
        ),
    )
    _partial("ix_outbox_message_due", ["next_attempt_at"], "status = 'pending' AND key IS NULL")
    _partial("ix_outbox_message_keyed", ["shard", "id"], "status = 'pending' AND key IS NOT NULL")
    _partial("ix_outbox_message_prepared", ["next_attempt_at"], "status = 'prepared'")
    _partial("ix_outbox_message_finished", ["updated_at"], "status IN ('published', 'discarded')")

    op.create_table(
        "outbox_inbox",
        sa.Column("id", _BigId, sa.Identity(), primary_key=True),
        sa.Column("consumer_group", sa.String(255), nullable=False),
        sa.Column("message_id", sa.Uuid(), nullable=False),
        sa.Column("topic", sa.String(255), nullable=False),
        sa.Column("processed_at", _TZ, nullable=False),
        sa.UniqueConstraint("consumer_group", "message_id", name="uq_outbox_inbox_group_message"),
    )
    op.create_index("ix_outbox_inbox_processed_at", "outbox_inbox", ["processed_at"])

    op.create_table(
        "outbox_receipt",
        sa.Column("id", _BigId, sa.Identity(), primary_key=True),
        sa.Column("message_id", sa.Uuid(), nullable=False),
        sa.Column("consumer_group", sa.String(255), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("recorded_at", _TZ, nullable=False),
        sa.UniqueConstraint(
            "message_id",
            "consumer_group",
            "outcome",
            name="uq_outbox_receipt_message_group_outcome",
        ),
    )


def downgrade() -> None:
    op.drop_table("outbox_receipt")
    op.drop_table("outbox_inbox")
    op.drop_table("outbox_message")
