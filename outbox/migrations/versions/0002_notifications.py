"""Notification and notification attempt tables of the notify service.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "outbox_notification",
        sa.Column("id", _BigId, sa.Identity(), primary_key=True),
        sa.Column("message_id", sa.Uuid(), nullable=False),
        sa.Column("subscription", sa.String(100), nullable=False),
        sa.Column("topic", sa.String(255), nullable=False),
        sa.Column("key", sa.String(255), nullable=True),
        sa.Column("payload", _Json, nullable=False),
        sa.Column("message_created_at", _TZ, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", _TZ, nullable=False),
        sa.Column("claimed_by", sa.String(64), nullable=True),
        sa.Column("claimed_until", _TZ, nullable=True),
        sa.Column("last_status_code", sa.SmallInteger(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", _TZ, nullable=False),
        sa.Column("updated_at", _TZ, nullable=False),
        sa.Column("delivered_at", _TZ, nullable=True),
        sa.Column("abandoned_at", _TZ, nullable=True),
        sa.UniqueConstraint(
            "message_id", "subscription", name="uq_outbox_notification_message_subscription"
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'delivered', 'abandoned')",
            name="ck_outbox_notification_status",
        ),
    )
    op.create_index(
        "ix_outbox_notification_due",
        "outbox_notification",
        ["subscription", "next_attempt_at"],
        postgresql_where=sa.text("status = 'pending'"),
        sqlite_where=sa.text("status = 'pending'"),
    )
    op.create_index("ix_outbox_notification_created", "outbox_notification", ["created_at"])

    op.create_table(
        "outbox_notification_attempt",
        sa.Column("id", _BigId, sa.Identity(), primary_key=True),
        sa.Column("notification_id", sa.BigInteger(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("started_at", _TZ, nullable=False),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.Column("status_code", sa.SmallInteger(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
    )
    op.create_index(
        "ix_outbox_notification_attempt",
        "outbox_notification_attempt",
        ["notification_id", "attempt"],
    )


def downgrade() -> None:
    op.drop_table("outbox_notification_attempt")
    op.drop_table("outbox_notification")
