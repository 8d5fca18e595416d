"""The framework's tables as Django models, so ``manage.py migrate outbox`` creates them.

These mirror ``outbox/tables.py`` column for column, constraint for constraint and
index for index (same names, same partial predicates): the relay and the consumer
read them with SQLAlchemy whichever tool created them.
``tests/integration/test_schema_parity.py`` proves the two are identical on PostgreSQL.

Indexes and constraints are declared in ``Meta`` only, never with ``unique=True`` or
``db_index=True``: on PostgreSQL those add a second ``varchar_pattern_ops`` index for
``LIKE`` queries that the SQLAlchemy schema does not have and no query here needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import django
from django.db import models
from django.db.models import Q

from outbox.tables import MessageStatus, NotificationStatus

if TYPE_CHECKING:
    import uuid
    from datetime import datetime

__all__ = ["InboxEntry", "Notification", "NotificationAttempt", "OutboxMessage", "Receipt"]

# Each field is annotated with the types it takes and gives (Field[set, get]): without
# django-stubs' mypy plugin, which needs a settings module, mypy cannot infer them.

# In MessageStatus order, which is part of the CHECK constraint's text. Taken from the
# enum so that a new status makes `makemigrations --check` ask for a migration.
_STATUSES = [status.value for status in MessageStatus]
_NOTIFICATION_STATUSES = [status.value for status in NotificationStatus]


def _check_constraint(condition: Q, name: str) -> models.CheckConstraint:
    """Return a ``CheckConstraint`` on ``condition`` for the running Django version."""
    # Django 5.1 renamed ``check=`` to ``condition=`` and 6.0 drops ``check=``; 4.2 and
    # 5.0 know only ``check=``. A dict keeps one call that type-checks on every version.
    kwargs: dict[str, Any] = {"condition" if django.VERSION >= (5, 1) else "check": condition}
    return models.CheckConstraint(name=name, **kwargs)


class OutboxMessage(models.Model):
    """One outbox row (``outbox.outbox_table``): written by ``publish``, sent by the relay."""

    id: models.BigAutoField[int, int] = models.BigAutoField(primary_key=True)
    message_id: models.UUIDField[uuid.UUID, uuid.UUID] = models.UUIDField()
    topic: models.CharField[str, str] = models.CharField(max_length=255)
    key: models.CharField[str | None, str | None] = models.CharField(max_length=255, null=True)
    shard: models.SmallIntegerField[int | None, int | None] = models.SmallIntegerField(null=True)
    status: models.CharField[str, str] = models.CharField(max_length=16)
    payload: models.BinaryField[bytes, bytes | memoryview] = models.BinaryField()
    content_type: models.CharField[str, str] = models.CharField(max_length=100)
    headers: models.JSONField[Any, Any] = models.JSONField()
    attempts: models.IntegerField[int, int] = models.IntegerField()
    next_attempt_at: models.DateTimeField[datetime, datetime] = models.DateTimeField()
    last_error: models.TextField[str | None, str | None] = models.TextField(null=True)
    created_at: models.DateTimeField[datetime, datetime] = models.DateTimeField()
    updated_at: models.DateTimeField[datetime, datetime] = models.DateTimeField()
    published_at: models.DateTimeField[datetime | None, datetime | None] = models.DateTimeField(
        null=True
    )
    claimed_by: models.CharField[str | None, str | None] = models.CharField(
        max_length=64, null=True
    )
    claimed_until: models.DateTimeField[datetime | None, datetime | None] = models.DateTimeField(
        null=True
    )
    checks: models.IntegerField[int, int] = models.IntegerField()
    xid: models.BigIntegerField[int | None, int | None] = models.BigIntegerField(null=True)
    xid_resource: models.CharField[str | None, str | None] = models.CharField(
        max_length=255, null=True
    )

    class Meta:
        db_table = "outbox_message"
        constraints = [
            models.UniqueConstraint(fields=["message_id"], name="uq_outbox_message_message_id"),
            _check_constraint(Q(status__in=_STATUSES), "ck_outbox_message_status"),
        ]
        # Why each index exists is written next to it in outbox/tables.py. Conditions are
        # built with & rather than Q(a=..., b=...), which sorts its keywords: the predicate
        # must keep the column order of tables.py to be the same index.
        indexes = [
            models.Index(
                fields=["next_attempt_at"],
                name="ix_outbox_message_due",
                condition=Q(status="pending") & Q(key__isnull=True),
            ),
            models.Index(
                fields=["shard", "id"],
                name="ix_outbox_message_keyed",
                condition=Q(status="pending") & Q(key__isnull=False),
            ),
            models.Index(
                fields=["next_attempt_at"],
                name="ix_outbox_message_prepared",
                condition=Q(status="prepared"),
            ),
            models.Index(
                fields=["updated_at"],
                name="ix_outbox_message_finished",
                condition=Q(status__in=["published", "discarded"]),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.topic} {self.message_id} ({self.status})"


class InboxEntry(models.Model):
    """One handled message of one consumer group (``outbox.inbox_table``): the dedupe record."""

    id: models.BigAutoField[int, int] = models.BigAutoField(primary_key=True)
    consumer_group: models.CharField[str, str] = models.CharField(max_length=255)
    message_id: models.UUIDField[uuid.UUID, uuid.UUID] = models.UUIDField()
    topic: models.CharField[str, str] = models.CharField(max_length=255)
    processed_at: models.DateTimeField[datetime, datetime] = models.DateTimeField()

    class Meta:
        db_table = "outbox_inbox"
        verbose_name_plural = "inbox entries"
        constraints = [
            models.UniqueConstraint(
                fields=["consumer_group", "message_id"], name="uq_outbox_inbox_group_message"
            ),
        ]
        indexes = [models.Index(fields=["processed_at"], name="ix_outbox_inbox_processed_at")]

    def __str__(self) -> str:
        return f"{self.consumer_group} {self.message_id}"


class Receipt(models.Model):
    """What a consumer group did with a message (``outbox.receipt_table``)."""

    id: models.BigAutoField[int, int] = models.BigAutoField(primary_key=True)
    message_id: models.UUIDField[uuid.UUID, uuid.UUID] = models.UUIDField()
    consumer_group: models.CharField[str, str] = models.CharField(max_length=255)
    outcome: models.CharField[str, str] = models.CharField(max_length=16)
    detail: models.TextField[str | None, str | None] = models.TextField(null=True)
    recorded_at: models.DateTimeField[datetime, datetime] = models.DateTimeField()

    class Meta:
        db_table = "outbox_receipt"
        constraints = [
            models.UniqueConstraint(
                fields=["message_id", "consumer_group", "outcome"],
                name="uq_outbox_receipt_message_group_outcome",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.message_id} {self.consumer_group} {self.outcome}"


class Notification(models.Model):
    """One message to call one subscription's endpoint with (``outbox.notification_table``)."""

    id: models.BigAutoField[int, int] = models.BigAutoField(primary_key=True)
    message_id: models.UUIDField[uuid.UUID, uuid.UUID] = models.UUIDField()
    subscription: models.CharField[str, str] = models.CharField(max_length=100)
    topic: models.CharField[str, str] = models.CharField(max_length=255)
    key: models.CharField[str | None, str | None] = models.CharField(max_length=255, null=True)
    payload: models.JSONField[Any, Any] = models.JSONField()
    message_created_at: models.DateTimeField[datetime, datetime] = models.DateTimeField()
    status: models.CharField[str, str] = models.CharField(max_length=16)
    attempts: models.IntegerField[int, int] = models.IntegerField()
    max_attempts: models.IntegerField[int, int] = models.IntegerField()
    next_attempt_at: models.DateTimeField[datetime, datetime] = models.DateTimeField()
    claimed_by: models.CharField[str | None, str | None] = models.CharField(
        max_length=64, null=True
    )
    claimed_until: models.DateTimeField[datetime | None, datetime | None] = models.DateTimeField(
        null=True
    )
    last_status_code: models.SmallIntegerField[int | None, int | None] = models.SmallIntegerField(
        null=True
    )
    last_error: models.TextField[str | None, str | None] = models.TextField(null=True)
    created_at: models.DateTimeField[datetime, datetime] = models.DateTimeField()
    updated_at: models.DateTimeField[datetime, datetime] = models.DateTimeField()
    delivered_at: models.DateTimeField[datetime | None, datetime | None] = models.DateTimeField(
        null=True
    )
    abandoned_at: models.DateTimeField[datetime | None, datetime | None] = models.DateTimeField(
        null=True
    )

    class Meta:
        db_table = "outbox_notification"
        constraints = [
            models.UniqueConstraint(
                fields=["message_id", "subscription"],
                name="uq_outbox_notification_message_subscription",
            ),
            _check_constraint(
                Q(status__in=_NOTIFICATION_STATUSES), "ck_outbox_notification_status"
            ),
        ]
        indexes = [
            models.Index(
                fields=["subscription", "next_attempt_at"],
                name="ix_outbox_notification_due",
                condition=Q(status="pending"),
            ),
            models.Index(fields=["created_at"], name="ix_outbox_notification_created"),
        ]

    def __str__(self) -> str:
        return f"{self.subscription} {self.message_id} ({self.status})"


class NotificationAttempt(models.Model):
    """One HTTP call of a notification (``outbox.notification_attempt_table``).

    ``notification_id`` is a plain column, not a ``ForeignKey``: the SQLAlchemy schema
    has no constraint there (see ``outbox/tables.py``).
    """

    id: models.BigAutoField[int, int] = models.BigAutoField(primary_key=True)
    notification_id: models.BigIntegerField[int, int] = models.BigIntegerField()
    attempt: models.IntegerField[int, int] = models.IntegerField()
    started_at: models.DateTimeField[datetime, datetime] = models.DateTimeField()
    duration_ms: models.IntegerField[int, int] = models.IntegerField()
    status_code: models.SmallIntegerField[int | None, int | None] = models.SmallIntegerField(
        null=True
    )
    error: models.TextField[str | None, str | None] = models.TextField(null=True)

    class Meta:
        db_table = "outbox_notification_attempt"
        indexes = [
            models.Index(
                fields=["notification_id", "attempt"], name="ix_outbox_notification_attempt"
            )
        ]

    def __str__(self) -> str:
        return f"notification {self.notification_id} attempt {self.attempt}"
