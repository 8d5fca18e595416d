"""The relay against real RabbitMQ: unroutable policy, nack then dead, replay of a dead message."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

import aio_pika
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import outbox
from outbox import admin
from relay import Relay, RelayConfig, UnroutablePolicy

pytestmark = pytest.mark.integration


@pytest.fixture
async def channel(amqp_url: str, unique_name: str) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        ch = await connection.channel()
        await ch.declare_exchange(unique_name, aio_pika.ExchangeType.TOPIC, durable=True)
        yield ch
        await ch.exchange_delete(unique_name)


def relay_config(
    pg_schema_url: str, amqp_url: str, exchange: str, **overrides: object
) -> RelayConfig:
    values: dict[str, object] = {
        "database_url": pg_schema_url,
        "amqp_url": amqp_url,
        "exchange": exchange,
        "poll_max": timedelta(milliseconds=20),
        "retry_base": timedelta(milliseconds=50),
        "retry_max": timedelta(milliseconds=200),
        "confirm_timeout": timedelta(seconds=5),
        **overrides,
    }
    return RelayConfig(**values)  # type: ignore[arg-type]


def status_of(engine: sa.Engine, message_id: str) -> tuple[str, int, str | None]:
    report = admin.message_status(engine, message_id)
    assert report is not None
    return report.status or "", report.attempts or 0, report.last_error


async def wait_for(predicate: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_unroutable_message_parked_dead_is_delivered_after_replay(
    pg_engine: sa.Engine,
    pg_schema_url: str,
    amqp_url: str,
    unique_name: str,
    channel: aio_pika.abc.AbstractChannel,
) -> None:
    with Session(pg_engine) as s, s.begin():
        mid = outbox.publish(s, "invoices.issued", {"n": 1}, key="customer-1").message_id
    config = relay_config(
        pg_schema_url, amqp_url, unique_name, unroutable={"invoices.*": UnroutablePolicy.DEAD}
    )

    async with Relay(config):
        await wait_for(lambda: status_of(pg_engine, mid)[0] == "dead")
        assert "unroutable" in str(status_of(pg_engine, mid)[2])

        queue = await channel.declare_queue(f"{unique_name}.invoices", auto_delete=True)
        await queue.bind(unique_name, "invoices.#")
        assert admin.replay_dead(pg_engine, message_ids=[mid]) == 1
        await wait_for(lambda: status_of(pg_engine, mid)[0] == "published")

    message = await queue.get(timeout=5)
    assert message.message_id == mid
    assert message.headers["x-outbox-key"] == "customer-1"
    await message.ack()


async def test_nacked_message_is_retried_then_parked_dead_with_the_reason(
    pg_engine: sa.Engine,
    pg_schema_url: str,
    amqp_url: str,
    unique_name: str,
    channel: aio_pika.abc.AbstractChannel,
) -> None:
    # A full queue that refuses new messages makes the broker nack them.
    queue = await channel.declare_queue(
        f"{unique_name}.full",
        auto_delete=True,
        arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
    )
    await queue.bind(unique_name, "#")
    with Session(pg_engine) as s, s.begin():
        mid = outbox.publish(s, "orders.created", {"n": 1}).message_id

    async with Relay(relay_config(pg_schema_url, amqp_url, unique_name, max_attempts=3)):
        await wait_for(lambda: status_of(pg_engine, mid)[0] == "dead")

    _status, attempts, error = status_of(pg_engine, mid)
    assert attempts == 3
    assert error is not None
    assert error.startswith("nacked")
    assert "gave up after 3 attempts" in error


async def test_returned_message_with_retry_policy_waits_for_its_consumer(
    pg_engine: sa.Engine,
    pg_schema_url: str,
    amqp_url: str,
    unique_name: str,
    channel: aio_pika.abc.AbstractChannel,
) -> None:
    with Session(pg_engine) as s, s.begin():
        mid = outbox.publish(s, "shipments.sent", {"n": 1}).message_id

    async with Relay(relay_config(pg_schema_url, amqp_url, unique_name)):
        await wait_for(lambda: status_of(pg_engine, mid)[1] >= 2)  # returned, retried
        assert status_of(pg_engine, mid)[0] == "pending"
        queue = await channel.declare_queue(f"{unique_name}.shipments", auto_delete=True)
        await queue.bind(unique_name, "shipments.*")  # the consumer deploys late
        await wait_for(lambda: status_of(pg_engine, mid)[0] == "published")

    message = await queue.get(timeout=5)
    assert message.message_id == mid
    await message.ack()
