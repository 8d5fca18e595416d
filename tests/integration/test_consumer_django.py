"""A consumer handler running with Django's ORM: inbox row and writes in one atomic block."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable
from datetime import timedelta

import pytest
import sqlalchemy as sa
from django_setup import BUSINESS_TABLE, fixture_django_db  # noqa: F401  (the fixture)
from test_consumer import World

from consumer import Consumer, IncomingMessage

pytestmark = pytest.mark.integration


async def wait_for(predicate: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def world_in(django_db: str, pg_url: str, amqp_url: str, unique_name: str) -> World:
    """A consumer ``World`` on the Django test database's schema."""
    url = sa.make_url(pg_url).update_query_dict({"options": f"-csearch_path={django_db}"})
    schema_url = url.render_as_string(hide_password=False)
    return World(sa.create_engine(schema_url), schema_url, amqp_url, unique_name)


async def test_django_handler_has_one_effect_and_rolls_back_on_failure(
    django_db: str, pg_url: str, amqp_url: str, unique_name: str
) -> None:
    from django.db import connection

    world = world_in(django_db, pg_url, amqp_url, unique_name)
    engine = world.engine
    consumer: Consumer = world.consumer("django_group")
    ids = itertools.count(1_000_000)
    failures: list[str] = []

    @consumer.handler("orders.*", django=True, retry_delay=timedelta(milliseconds=50))
    def handle(message: IncomingMessage) -> None:
        with connection.cursor() as cursor:  # Django's connection, inside the consumer's atomic()
            cursor.execute(
                f"INSERT INTO {BUSINESS_TABLE} VALUES (%s, %s)", [next(ids), message.message_id]
            )
        if message.topic == "orders.flaky" and message.attempt == 1:
            failures.append(message.message_id)
            raise ConnectionError("first attempt fails after writing")

    def notes() -> list[str]:
        with engine.connect() as conn:
            return list(
                conn.execute(
                    sa.text(f"SELECT note FROM {BUSINESS_TABLE} WHERE id >= 1000000")
                ).scalars()
            )

    try:
        await consumer.start()
        once = await world.send("orders.created", {})
        await world.send("orders.created", {}, message_id=once)  # a wire duplicate
        flaky = await world.send("orders.flaky", {})
        await wait_for(lambda: sorted(notes()) == sorted([once, flaky]))
        await wait_for(lambda: consumer.metrics.duplicates._value.get() == 1)
        assert failures == [flaky]  # its first attempt's write was rolled back with the inbox row
    finally:
        await consumer.stop()
        await world.cleanup()
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE effect"))
            conn.execute(sa.text(f"DELETE FROM {BUSINESS_TABLE} WHERE id >= 1000000"))
        engine.dispose()


async def test_django_handler_that_swallows_a_database_error_is_failed_not_acked(
    django_db: str, pg_url: str, amqp_url: str, unique_name: str
) -> None:
    from django.db import DatabaseError, connection

    world = world_in(django_db, pg_url, amqp_url, unique_name)
    engine = world.engine
    consumer: Consumer = world.consumer("django_guarded")

    @consumer.handler("orders.*", django=True, max_attempts=1)
    def handle(message: IncomingMessage) -> None:
        # PostgreSQL aborts the transaction all the same.
        with connection.cursor() as cursor, contextlib.suppress(DatabaseError):
            cursor.execute("SELECT 1 / 0")

    def inbox_rows() -> int:
        with engine.connect() as conn:
            query = "SELECT count(*) FROM outbox_inbox WHERE consumer_group = 'django_guarded'"
            return int(conn.execute(sa.text(query)).scalar_one())

    try:
        await consumer.start()
        await world.send("orders.created", {})
        await wait_for(lambda: consumer.metrics.dead._value.get() == 1)
        [dead] = await world.dead_letters(consumer)
        reason = str(dead.headers["x-outbox-dead-reason"])
        assert "TransactionAbortedError" in reason
        assert "transaction.atomic()" in reason
        assert inbox_rows() == 0
    finally:
        await consumer.stop()
        await world.cleanup()
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE IF EXISTS effect"))
        engine.dispose()
