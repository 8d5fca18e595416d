"""The Django billing example, end to end: outbox row, relay, RabbitMQ, `outbox consume`, invoice.

The consumer runs as the example's README runs it (`outbox consume
billing.consumers:consumer` with the example on PYTHONPATH), in a process of its
own: its Django settings are not the test process's (tests/integration/django_setup.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import aio_pika
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import outbox
from consumer import Consumer, ConsumerConfig
from outbox.envelope import Envelope, WireFormat
from relay import Relay, RelayConfig

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "django_billing"
OUTBOX = str(Path(sys.executable).with_name("outbox"))
"""The `outbox` command installed next to this interpreter."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def shop_url(pg_url: str) -> Iterator[str]:
    """The producing service's database: a schema of its own with the outbox tables."""
    schema = f"shop_{os.urandom(6).hex()}"
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = sa.make_url(pg_url).update_query_dict({"options": f"-csearch_path={schema}"})
    engine = sa.create_engine(url)
    outbox.metadata.create_all(engine)
    engine.dispose()
    yield url.render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


class Billing:
    """The example's consumer process and what it can be asked."""

    def __init__(self, env: dict[str, str], metrics_port: int, log: IO[str]) -> None:
        self.metrics_port = metrics_port
        self.log = log
        self.process = subprocess.Popen(
            [OUTBOX, "consume", "billing.consumers:consumer"],
            cwd=EXAMPLE,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def get(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metric(self, name: str) -> float:
        """The value of an unlabelled metric on /metrics (0 before it was first counted)."""
        _, text = self.get("/metrics")
        for line in text.splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
        return 0.0

    async def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"the consumer exited:\n{self.output()}"
            try:
                if self.get("/healthz")[0] == 200:
                    return
            except OSError:
                pass  # not listening yet: /healthz is served once the queues are declared
            assert time.monotonic() < deadline, (
                f"the consumer never became healthy:\n{self.output()}"
            )
            await asyncio.sleep(0.2)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


@pytest.fixture
def billing(
    pg_schema_url: str, amqp_url: str, unique_name: str, tmp_path: Path
) -> Iterator[Billing]:
    """The billing database migrated by the example's manage.py, and its consumer running."""
    env = {
        **os.environ,
        "PYTHONPATH": str(EXAMPLE),
        "OUTBOX_DATABASE_URL": pg_schema_url,
        "OUTBOX_AMQP_URL": amqp_url,
        "OUTBOX_EXCHANGE": unique_name,
        "OUTBOX_QUEUE_PREFIX": unique_name,
        "OUTBOX_LOG_FORMAT": "console",
    }
    env.pop("DJANGO_SETTINGS_MODULE", None)
    migrate = subprocess.run(
        [sys.executable, "manage.py", "migrate", "--verbosity", "0"],
        cwd=EXAMPLE,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert migrate.returncode == 0, migrate.stderr
    port = free_port()
    with (tmp_path / "consumer.log").open("w+") as log:
        worker = Billing({**env, "OUTBOX_METRICS_PORT": str(port)}, port, log)
        try:
            yield worker
        finally:
            worker.stop()
    asyncio.run(delete_queues(amqp_url, unique_name))


async def delete_queues(amqp_url: str, name: str) -> None:
    # The group's queues as the example's consumer names them (nothing connects here).
    group = Consumer(
        "billing",
        database_url="sqlite://",
        config=ConsumerConfig(exchange=name, queue_prefix=name),
    )
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for queue in (
            group.queue,
            group.dead_queue,
            *(group.retry_queue(t) for t in group.config.retry_tiers),
        ):
            await channel.queue_delete(queue)
        await channel.exchange_delete(name)


def invoices(url: str) -> list[sa.Row[tuple[int, str, int, str]]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return list(
                conn.execute(
                    sa.text(
                        "SELECT order_id, customer, amount_cents, message_id::text "
                        "FROM billing_invoice ORDER BY id"
                    )
                )
            )
    finally:
        engine.dispose()


async def until(condition: Callable[[], bool], what: str, billing: Billing) -> None:
    deadline = time.monotonic() + 30
    while not await asyncio.to_thread(condition):
        assert billing.process.poll() is None, f"the consumer exited:\n{billing.output()}"
        assert time.monotonic() < deadline, f"{what} did not happen:\n{billing.output()}"
        await asyncio.sleep(0.1)


async def test_an_order_delivered_twice_makes_one_invoice(
    billing: Billing, shop_url: str, pg_schema_url: str, amqp_url: str, unique_name: str
) -> None:
    # Given the billing consumer running, and an order event committed in the shop's outbox
    await billing.wait_ready()
    shop = sa.create_engine(shop_url)
    with Session(shop) as session, session.begin():
        message = outbox.publish(
            session,
            "orders.created",
            {"order_id": 42, "customer": "ada", "total_cents": 4200},
            key="customer-ada",
        )

    # When the relay publishes it, and the same message reaches RabbitMQ a second time
    # (as after a relay that died between the broker's confirm and marking the row)
    config = RelayConfig(database_url=shop_url, amqp_url=amqp_url, exchange=unique_name)
    async with Relay(config):
        await until(lambda: len(invoices(pg_schema_url)) == 1, "the first invoice", billing)
    with shop.connect() as conn:
        row = conn.execute(
            sa.select(outbox.outbox_table).where(
                outbox.outbox_table.c.message_id == message.message_id
            )
        ).one()
    shop.dispose()
    assert row.status == outbox.MessageStatus.PUBLISHED.value
    envelope = Envelope.from_row(row._mapping)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(unique_name)
        properties = envelope.amqp_properties(WireFormat(exchange=unique_name))
        await exchange.publish(aio_pika.Message(envelope.body, **properties), "orders.created")

    # Then the copy was recognised by the inbox, and there is still one invoice
    await until(
        lambda: billing.metric("outbox_consumer_duplicates_total") == 1, "the duplicate", billing
    )
    assert billing.metric("outbox_consumer_processed_total") == 1
    assert [tuple(r) for r in invoices(pg_schema_url)] == [(42, "ada", 4200, message.message_id)]
    assert await asyncio.to_thread(billing.stop) == 0, billing.output()  # SIGTERM: clean stop
