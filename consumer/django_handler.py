"""Running a handler with Django's ORM: the inbox row and the handler's writes in one
``transaction.atomic()`` on a Django database connection.

Selected per handler with ``@consumer.handler(topic, django=True)`` (and
``using=`` for another database alias). The handler takes ``(message)`` and
uses the ORM as usual; Django must be set up (``django.setup()``) before the
worker starts, and the ``outbox.django`` app migrated on that database.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from consumer.commit_guard import raise_if_aborted_driver

if TYPE_CHECKING:
    from consumer.config import HandlerSpec
    from consumer.message import IncomingMessage

__all__ = ["run_django_handler"]

_INSERT = (
    "INSERT INTO outbox_inbox (consumer_group, message_id, topic, processed_at) "
    "VALUES (%s, %s, %s, %s) ON CONFLICT (consumer_group, message_id) DO NOTHING RETURNING id"
)


def run_django_handler(group: str, spec: HandlerSpec, message: IncomingMessage) -> bool:
    """Handle ``message`` once; return False if this group had already handled it.

    Runs in a worker thread: Django connections are per thread, so stale ones are
    closed before and after, as Django does around each request.
    """
    # Imported here: the consumer works without Django, and models need the app registry.
    from django.db import close_old_connections, connections, transaction
    from django.db.models import Field

    from outbox.django.models import InboxEntry

    alias = spec.django_using or "default"
    close_old_connections()
    try:
        connection = connections[alias]
        field = InboxEntry._meta.get_field("message_id")
        when = InboxEntry._meta.get_field("processed_at")
        assert isinstance(field, Field)  # a column, not a relation
        assert isinstance(when, Field)
        with transaction.atomic(using=alias):
            with connection.cursor() as cursor:
                cursor.execute(
                    _INSERT,
                    [
                        group,
                        field.get_db_prep_save(uuid.UUID(message.message_id), connection),
                        message.topic,
                        when.get_db_prep_save(datetime.now(UTC), connection),
                    ],
                )
                if cursor.fetchone() is None:
                    return False
            spec.function(message)
            if connection.vendor == "postgresql":
                raise_if_aborted_driver(connection.connection)
        return True
    finally:
        close_old_connections()
