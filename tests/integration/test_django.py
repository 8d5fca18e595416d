"""outbox.django.publish joins the caller's transaction.atomic() and nothing else.

Runs on real PostgreSQL (database ``default``) and, where it says so, on SQLite too,
the embedded target whose failed statements do not abort the transaction by
themselves.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC
from typing import Any

import pytest
import sqlalchemy as sa
from django.core.management import call_command
from django.db import connections, transaction
from django.test.utils import CaptureQueriesContext, override_settings
from django_setup import BUSINESS_TABLE, fixture_django_db  # noqa: F401  (registers django_db)

import outbox
from outbox import (
    ConfigurationError,
    DatabaseError,
    DuplicateMessageError,
    InvalidMessageError,
    OutboxError,
    TransactionRequiredError,
)
from outbox.tables import shard_of

pytestmark = pytest.mark.usefixtures("django_db")


@pytest.fixture(params=["default", "sqlite"], ids=["postgresql", "sqlite"])
def alias(request: pytest.FixtureRequest) -> Iterator[str]:
    """A Django database alias with empty outbox and business tables."""
    name: str = request.param
    _empty(name)
    yield name
    _empty(name)


@pytest.fixture
def pg_alias() -> Iterator[str]:
    """The PostgreSQL alias alone, with empty tables."""
    _empty("default")
    yield "default"
    _empty("default")


def _empty(alias: str) -> None:
    with connections[alias].cursor() as cursor:
        cursor.execute("DELETE FROM outbox_message")
        cursor.execute(f"DELETE FROM {BUSINESS_TABLE}")


def _publish(alias: str, *args: Any, **kwargs: Any) -> outbox.Message:
    from outbox.django import publish

    return publish(*args, using=alias, **kwargs)


def _unit_of_work(
    alias: str, note: str, *args: Any, fail_with: Exception | None = None, **kwargs: Any
) -> outbox.Message:
    """Write a business row and publish in one atomic block, as an application does."""
    with transaction.atomic(using=alias):
        _write_business_row(alias, note)
        message = _publish(alias, *args, **kwargs)
        if fail_with is not None:
            raise fail_with
    return message


def _outbox_rows(alias: str) -> list[Any]:
    from outbox.django.models import OutboxMessage

    return list(OutboxMessage.objects.using(alias).order_by("id"))


def _write_business_row(alias: str, note: str) -> None:
    with connections[alias].cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {BUSINESS_TABLE} (id, note) VALUES "
            f"((SELECT COALESCE(MAX(id), 0) + 1 FROM {BUSINESS_TABLE}), %s)",
            [note],
        )


def _business_notes(alias: str) -> list[str]:
    with connections[alias].cursor() as cursor:
        cursor.execute(f"SELECT note FROM {BUSINESS_TABLE} ORDER BY id")
        return [note for (note,) in cursor.fetchall()]


def test_a_committed_atomic_block_holds_exactly_one_row_with_the_message(alias: str) -> None:
    payload = {"id": 7, "name": "Zoë", "lines": [1.5, None, True]}
    headers = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "n": 3}

    message = _unit_of_work(
        alias, "order 7", "orders.created", payload, key="order-7", headers=headers
    )

    [row] = _outbox_rows(alias)
    assert str(row.message_id) == message.message_id
    assert (row.topic, row.key, row.shard) == ("orders.created", "order-7", shard_of("order-7"))
    assert bytes(row.payload) == outbox.JSON.encode(payload)
    assert json.loads(bytes(row.payload)) == payload
    assert row.headers == headers
    assert (row.status, row.content_type, row.attempts, row.checks) == (
        "pending",
        "application/json",
        0,
        0,
    )
    assert row.created_at == message.created_at
    assert (row.published_at, row.claimed_by, row.claimed_until, row.xid) == (None,) * 4
    assert (message.topic, message.key, message.payload, message.headers) == (
        "orders.created",
        "order-7",
        payload,
        headers,
    )
    assert _business_notes(alias) == ["order 7"]


def test_publish_uses_the_default_database_when_using_is_omitted(pg_alias: str) -> None:
    from outbox.django import publish

    with transaction.atomic():
        message = publish("orders.created", {"id": 1})

    assert [str(row.message_id) for row in _outbox_rows(pg_alias)] == [message.message_id]


def test_next_attempt_at_comes_from_the_postgresql_clock(pg_alias: str) -> None:
    # The relay compares next_attempt_at with now() on the server; a producer clock that
    # runs ahead must not delay delivery.
    with transaction.atomic():
        _publish(pg_alias, "orders.created", {"id": 1})
        with connections[pg_alias].cursor() as cursor:
            cursor.execute("SELECT now()")
            (db_now,) = cursor.fetchone()

    [row] = _outbox_rows(pg_alias)
    assert row.next_attempt_at == db_now


def test_an_exception_in_the_atomic_block_leaves_no_row(alias: str) -> None:
    failure = RuntimeError("business logic failed")

    with pytest.raises(RuntimeError, match="business logic failed"):
        _unit_of_work(alias, "order 8", "orders.created", {"id": 8}, fail_with=failure)

    assert _outbox_rows(alias) == []
    assert _business_notes(alias) == []


def test_publish_outside_an_atomic_block_raises_and_writes_nothing(alias: str) -> None:
    with pytest.raises(TransactionRequiredError, match=r"transaction\.atomic") as caught:
        _publish(alias, "orders.created", {"id": 9})

    assert isinstance(caught.value, OutboxError)
    assert alias in str(caught.value)
    assert _outbox_rows(alias) == []


def test_an_atomic_block_on_another_database_does_not_count(pg_alias: str) -> None:
    with pytest.raises(TransactionRequiredError), transaction.atomic(using="sqlite"):
        _publish(pg_alias, "orders.created", {"id": 10})

    assert _outbox_rows(pg_alias) == []


class _Unserialisable:
    pass


BAD_INPUTS: list[tuple[str, dict[str, Any], str]] = [
    ("empty topic", {"topic": ""}, "must not be empty"),
    ("topic with a space", {"topic": "orders created"}, "malformed"),
    ("topic with an empty word", {"topic": "orders..created"}, "malformed"),
    ("wildcard topic", {"topic": "orders.*"}, "malformed"),
    ("topic not a str", {"topic": 42}, "must be a str"),
    ("object payload", {"payload": _Unserialisable()}, "not JSON-serialisable"),
    ("set payload", {"payload": {1, 2}}, "not JSON-serialisable"),
    ("NaN payload", {"payload": {"x": float("nan")}}, "not JSON-serialisable"),
    ("bytes payload", {"payload": b"raw"}, "not JSON-serialisable"),
    ("list header value", {"headers": {"tags": ["a"]}}, "header 'tags'"),
    ("dict header value", {"headers": {"meta": {"a": 1}}}, "header 'meta'"),
    ("non-str header name", {"headers": {1: "x"}}, "header names"),
    ("reserved header", {"headers": {"x-outbox-key": "k"}}, "reserved"),
    ("headers not a mapping", {"headers": ["a", "b"]}, "must be a mapping"),
    ("empty key", {"key": ""}, "key must be 1 to 255"),
    ("key not a str", {"key": 12}, "key must be a str"),
    ("message_id not a UUID", {"message_id": "order-12"}, "is not a UUID"),
    ("message_id of the wrong type", {"message_id": 12345}, "message_id must be"),
    ("payload over the default limit", {"payload": "x" * (1024 * 1024)}, "over the limit"),
]


@pytest.mark.parametrize(
    ("overrides", "match"), [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS]
)
def test_bad_input_raises_invalid_message_before_any_sql(
    alias: str, overrides: dict[str, Any], match: str
) -> None:
    arguments: dict[str, Any] = {"topic": "orders.created", "payload": {"id": 1}, **overrides}
    connection = connections[alias]

    with transaction.atomic(using=alias):
        _write_business_row(alias, "kept")
        with (
            CaptureQueriesContext(connection) as queries,
            pytest.raises(InvalidMessageError, match=match),
        ):
            _publish(alias, **arguments)
        assert queries.captured_queries == []

    # Nothing reached the database, so the block stays usable and commits the rest.
    assert _outbox_rows(alias) == []
    assert _business_notes(alias) == ["kept"]


def test_the_payload_limit_comes_from_the_outbox_setting(alias: str) -> None:
    with override_settings(OUTBOX={"MAX_PAYLOAD_BYTES": 64}):
        with transaction.atomic(using=alias):
            _publish(alias, "orders.created", "x" * 62)  # 64 bytes encoded, with quotes
        with pytest.raises(InvalidMessageError, match="65 bytes encoded, over the limit of 64"):
            _unit_of_work(alias, "too big", "orders.created", "x" * 63)

    assert len(_outbox_rows(alias)) == 1
    with transaction.atomic(using=alias):  # the default limit is back
        _publish(alias, "orders.created", "x" * 63)
    assert len(_outbox_rows(alias)) == 2


@pytest.mark.parametrize(
    "value",
    [{"MAX_PAYLOAD_BYTES": 0}, {"MAX_PAYLOAD_BYTES": "64"}, {"MAX_PAYLOAD": 64}, ["x"]],
    ids=["zero", "str", "unknown key", "not a dict"],
)
def test_a_bad_outbox_setting_raises_configuration_error(pg_alias: str, value: object) -> None:
    with (
        override_settings(OUTBOX=value),
        pytest.raises(ConfigurationError, match=r"OUTBOX|max_payload_bytes"),
    ):
        _unit_of_work(pg_alias, "any", "orders.created", {"id": 1})


def test_a_duplicate_message_id_fails_the_whole_atomic_block(alias: str) -> None:
    message_id = uuid.uuid4()
    with transaction.atomic(using=alias):
        _publish(alias, "orders.created", {"id": 1}, message_id=message_id)

    with pytest.raises(DuplicateMessageError) as caught:
        _unit_of_work(
            alias, "second attempt", "orders.created", {"id": 1}, message_id=str(message_id)
        )

    assert caught.value.message_id == str(message_id)
    assert isinstance(caught.value, OutboxError)
    assert [row.message_id for row in _outbox_rows(alias)] == [message_id]
    assert _business_notes(alias) == []


def test_a_caught_duplicate_still_rolls_the_block_back(alias: str) -> None:
    # On SQLite a failed INSERT leaves the transaction usable; publish marks the block for
    # rollback so that catching the error cannot commit business rows without their message.
    message_id = uuid.uuid4()
    with transaction.atomic(using=alias):
        _publish(alias, "orders.created", {"id": 1}, message_id=message_id)

    with transaction.atomic(using=alias):
        _write_business_row(alias, "second attempt")
        with pytest.raises(DuplicateMessageError):
            _publish(alias, "orders.created", {"id": 1}, message_id=message_id)
        with pytest.raises(transaction.TransactionManagementError):
            _write_business_row(alias, "after the error")

    assert _business_notes(alias) == []
    assert len(_outbox_rows(alias)) == 1


def test_a_savepoint_around_publish_confines_the_rollback_to_it(alias: str) -> None:
    # Django's own rule for IntegrityError: an inner atomic block is a savepoint, and a
    # caller who catches the error outside it keeps the outer block's writes.
    message_id = uuid.uuid4()
    with transaction.atomic(using=alias):
        _publish(alias, "orders.created", {"id": 1}, message_id=message_id)

    with transaction.atomic(using=alias):
        _write_business_row(alias, "outer")
        with pytest.raises(DuplicateMessageError):
            _unit_of_work(alias, "inner", "orders.created", {"id": 1}, message_id=message_id)

    assert _business_notes(alias) == ["outer"]
    assert len(_outbox_rows(alias)) == 1


def _publish_where_the_tables_are_missing(alias: str) -> None:
    with transaction.atomic(using=alias):
        with connections[alias].cursor() as cursor:
            # A schema that does not exist: nothing named outbox_message is visible.
            cursor.execute("SET LOCAL search_path TO outbox_no_such_schema")
        _publish(alias, "orders.created", {"id": 1})


def test_missing_tables_raise_a_database_error_that_says_to_migrate(pg_alias: str) -> None:
    with pytest.raises(DatabaseError, match=r"migrate outbox") as caught:
        _publish_where_the_tables_are_missing(pg_alias)

    assert isinstance(caught.value, OutboxError)
    assert _outbox_rows(pg_alias) == []


def test_a_row_written_by_django_reads_back_through_the_sqlalchemy_table(alias: str) -> None:
    # The relay reads the outbox with SQLAlchemy whichever framework wrote it.
    with transaction.atomic(using=alias):
        message = _publish(
            alias, "orders.created", {"id": 5}, key="k-5", headers={"a": "b", "ok": True}
        )
    settings_dict = connections[alias].settings_dict
    if alias == "sqlite":
        engine = sa.create_engine(f"sqlite:///{settings_dict['NAME']}")
    else:
        url = sa.URL.create(
            "postgresql+psycopg",
            username=settings_dict["USER"] or None,
            password=settings_dict["PASSWORD"] or None,
            host=settings_dict["HOST"] or None,
            port=int(settings_dict["PORT"]) if settings_dict["PORT"] else None,
            database=settings_dict["NAME"],
        )
        engine = sa.create_engine(url, connect_args=settings_dict["OPTIONS"])
    try:
        with engine.connect() as conn:
            row = conn.execute(sa.select(outbox.outbox_table)).one()
    finally:
        engine.dispose()

    assert row.message_id == uuid.UUID(message.message_id)
    assert (row.topic, row.key, row.shard, row.status) == (
        "orders.created",
        "k-5",
        shard_of("k-5"),
        "pending",
    )
    assert outbox.JSON.decode(row.payload) == {"id": 5}
    assert row.headers == {"a": "b", "ok": True}
    # SQLite keeps no time zone: Django and SQLAlchemy both store UTC wall-clock time there.
    created_at = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)
    assert created_at == message.created_at


def test_the_models_and_the_migration_agree() -> None:
    # makemigrations exits with status 1 when the models have changes no migration holds.
    call_command("makemigrations", "outbox", check=True, dry_run=True, verbosity=0)


def test_importing_outbox_does_not_import_django() -> None:
    code = "import sys, outbox; sys.exit('django' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
