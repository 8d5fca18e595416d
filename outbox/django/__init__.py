"""Django integration: ``publish`` adds an outbox row to the current ``transaction.atomic()``.

Add ``"outbox.django"`` to ``INSTALLED_APPS`` and run ``python manage.py migrate outbox``;
then, in the same block that writes the business rows::

    from django.db import transaction
    from outbox.django import publish

    with transaction.atomic():
        order.save()
        publish("orders.created", {"id": order.pk}, key=str(order.pk))

Guarantee (DESIGN §5.1): the row commits exactly when the block does and never on
its own. Optional settings: ``OUTBOX = {"MAX_PAYLOAD_BYTES": 65536}``.

``import outbox`` does not import this module, so the core works without Django.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.signals import setting_changed
from django.db import DEFAULT_DB_ALIAS, IntegrityError, connections, transaction
from django.db import DatabaseError as DjangoDatabaseError
from django.db.models import Field
from django.utils import timezone

from outbox.errors import (
    ConfigurationError,
    DatabaseError,
    DuplicateMessageError,
    TransactionRequiredError,
)
from outbox.producer import Producer, ProducerConfig

if TYPE_CHECKING:
    import uuid
    from collections.abc import Mapping

    from django.db.backends.base.base import BaseDatabaseWrapper

    from outbox.message import HeaderValue, Message

__all__ = ["publish"]

_SETTINGS_KEYS = frozenset({"MAX_PAYLOAD_BYTES"})

# Built on first use from settings.OUTBOX, and again after a test overrides that setting.
_producer: Producer | None = None
# (vendor, columns) -> the INSERT and the fields that adapt its parameters, built once.
_plans: dict[tuple[str, tuple[str, ...]], tuple[str, tuple[tuple[str, Field[Any, Any]], ...]]] = {}


def publish(
    topic: str,
    payload: Any,
    *,
    key: str | None = None,
    headers: Mapping[str, HeaderValue] | None = None,
    message_id: str | uuid.UUID | None = None,
    using: str | None = None,
) -> Message:
    """Add a message to the current ``transaction.atomic()`` block of database ``using``.

    The message becomes deliverable when the outermost block commits and is never
    sent if it rolls back; ``publish`` itself never commits. ``using`` is the
    database alias (default ``"default"``) whose transaction to join; the outbox
    tables must be migrated there.

    Raises ``TransactionRequiredError`` outside an atomic block and
    ``InvalidMessageError`` for a bad topic, key, header, payload or message id
    (both before any SQL; nothing is written). Raises ``DuplicateMessageError``
    when an explicit ``message_id`` is already in the outbox, and ``DatabaseError``
    when the INSERT fails otherwise. In both cases the innermost atomic block is
    marked for rollback, so the business rows written in it are not committed even
    if the error is caught; as everywhere in Django, a nested ``atomic()`` (a
    savepoint) around ``publish`` confines that rollback to itself.
    """
    alias = using or DEFAULT_DB_ALIAS
    connection = connections[alias]
    if not connection.in_atomic_block:
        raise TransactionRequiredError(
            f"outbox.django.publish() needs a transaction on database {alias!r}, where the "
            "outbox row commits with your business rows; wrap the call in "
            f"transaction.atomic(using={alias!r}) (or enable ATOMIC_REQUESTS)"
        )
    row, message = _get_producer().build_row(
        topic, payload, key=key, headers=headers, message_id=message_id
    )
    sql, params = _insert(connection, row)
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
    except transaction.TransactionManagementError:
        raise  # the block was already broken before this call; Django's message says so
    except DjangoDatabaseError as e:
        # PostgreSQL has aborted the transaction already; SQLite would let the caller
        # commit the rest of it without the message. Marking the block for rollback
        # makes both fail the unit of work, even if the caller catches this error.
        transaction.set_rollback(True, using=alias)
        raise _translate(e, message.message_id) from e
    return message


def _insert(connection: BaseDatabaseWrapper, row: dict[str, Any]) -> tuple[str, list[Any]]:
    """Return the INSERT for ``row`` and its parameters, adapted by the model's own fields.

    A cursor INSERT instead of ``OutboxMessage.objects.create()`` skips building a model
    instance and sending signals; the fields still adapt each value for the backend
    (jsonb on PostgreSQL, hex text for UUIDs on SQLite).
    """
    plan_key = (connection.vendor, tuple(row))
    plan = _plans.get(plan_key)
    if plan is None:
        plan = _plans[plan_key] = _plan(connection, plan_key[1])
    sql, fields = plan
    naive = not settings.USE_TZ
    params: list[Any] = []
    for column, field in fields:
        value = row[column]
        if naive and isinstance(value, datetime):
            # Without USE_TZ Django stores naive local times, and SQLite and MySQL refuse
            # aware ones; this is what Django itself would store for timezone.now().
            value = timezone.make_naive(value)
        params.append(field.get_db_prep_save(value, connection))
    return sql, params


def _plan(
    connection: BaseDatabaseWrapper, columns: tuple[str, ...]
) -> tuple[str, tuple[tuple[str, Field[Any, Any]], ...]]:
    """Build the INSERT of ``columns`` for this backend and the fields that adapt its values."""
    from outbox.django.models import OutboxMessage  # needs the app registry, ready by now

    meta = OutboxMessage._meta
    # The relay compares next_attempt_at with the database clock; taking it from the same
    # clock (as outbox.publish does) means an application host whose clock runs ahead
    # cannot delay delivery. Other backends have no common SQL for "now" with microseconds.
    db_clock = {"next_attempt_at"} if connection.vendor == "postgresql" else set()
    fields: list[tuple[str, Field[Any, Any]]] = []
    for column in columns:
        field = meta.get_field(column)
        assert isinstance(field, Field)  # a concrete column, never a relation
        if column not in db_clock:
            fields.append((column, field))
    quote = connection.ops.quote_name
    values = ["now()" if c in db_clock else "%s" for c in columns]
    sql = (
        f"INSERT INTO {quote(meta.db_table)} ({', '.join(quote(c) for c in columns)}) "
        f"VALUES ({', '.join(values)})"
    )
    return sql, tuple(fields)


def _translate(error: DjangoDatabaseError, message_id: str) -> Exception:
    """Map a database error from the outbox INSERT to the framework's error for it."""
    text = str(error)
    if isinstance(error, IntegrityError) and (
        "uq_outbox_message_message_id" in text or "outbox_message.message_id" in text
    ):
        return DuplicateMessageError(message_id)
    if "outbox_message" in text and ("does not exist" in text or "no such table" in text):
        return DatabaseError(
            "the outbox tables do not exist in this database; add 'outbox.django' to "
            "INSTALLED_APPS and run `python manage.py migrate outbox` (with --database for "
            "another alias)"
        )
    return DatabaseError(f"writing the outbox row failed: {error}")


def _get_producer() -> Producer:
    """Return the producer configured by ``settings.OUTBOX``, building it on first use."""
    global _producer
    producer = _producer
    if producer is None:
        # Two threads may both build one; either is right, and the last one is kept.
        producer = _producer = Producer(_config_from_settings())
    return producer


def _config_from_settings() -> ProducerConfig:
    """Read ``settings.OUTBOX``; raise ``ConfigurationError`` for anything unusable."""
    options = getattr(settings, "OUTBOX", None)
    if options is None:
        return ProducerConfig()
    if not isinstance(options, dict):
        raise ConfigurationError(
            f"settings.OUTBOX must be a dict, not {type(options).__name__}; "
            'for example OUTBOX = {"MAX_PAYLOAD_BYTES": 65536}'
        )
    unknown = sorted(set(options) - _SETTINGS_KEYS)
    if unknown:
        raise ConfigurationError(
            f"settings.OUTBOX has unknown keys {unknown}; known: {sorted(_SETTINGS_KEYS)}"
        )
    if "MAX_PAYLOAD_BYTES" in options:
        return ProducerConfig(max_payload_bytes=options["MAX_PAYLOAD_BYTES"])
    return ProducerConfig()  # Producer() validates either


def _reset_producer(*, setting: str, **kwargs: Any) -> None:
    """Forget the producer when ``settings.OUTBOX`` changes (``override_settings`` in tests)."""
    global _producer
    if setting == "OUTBOX":
        _producer = None


setting_changed.connect(_reset_producer)
