"""Consumers under fire: real worker processes killed with -9 at the worst moments.

- a worker killed after its handler's commit but before the ack: the broker
  redelivers, the inbox recognises the message, the effect stays single;
- an ordered group with two workers: killing the active one hands the queue to
  the other, and every key's effects stay in order.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import pytest
import sqlalchemy as sa
from fault_support import rabbitmqctl

from outbox.envelope import Envelope, WireFormat

APP = textwrap.dedent(
    '''
    """A consumer group started by the fault tests."""
    import os
    import signal
    from datetime import timedelta

    import sqlalchemy as sa
    from sqlalchemy import event

    from consumer import Consumer, ConsumerConfig

    name = os.environ["TEST_NAME"]
    consumer = Consumer(
        "ledger",
        database_url=os.environ["OUTBOX_DATABASE_URL"],
        amqp_url=os.environ["OUTBOX_AMQP_URL"],
        config=ConsumerConfig(exchange=name, queue_prefix=name, queue_type="classic"),
    )


    @consumer.handler("ledger.entry", ordered=os.environ.get("ORDERED") == "1")
    def entry(message, session):
        session.execute(
            sa.text("INSERT INTO effect (message_id, key, n, pid) VALUES (:id, :key, :n, :pid)"),
            {"id": message.message_id, "key": message.key, "n": message.payload["n"],
             "pid": os.getpid()},
        )
        if message.payload.get("crash_after_commit") and not message.redelivered:
            # Dies the moment the handler's transaction has committed: before the ack.
            event.listen(session, "after_commit", lambda s: os.kill(os.getpid(), signal.SIGKILL))
        if os.environ.get("SLOW"):
            import time
            time.sleep(float(os.environ["SLOW"]))
    '''
)


class Workers:
    def __init__(self, engine: sa.Engine, url: str, amqp_url: str, name: str, tmp: Path) -> None:
        self.engine, self.url, self.amqp_url, self.name, self.tmp = engine, url, amqp_url, name, tmp
        (tmp / "ledgerapp.py").write_text(APP)
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "CREATE TABLE effect (seq bigserial, message_id text, key text, n int, pid int)"
                )
            )
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, label: str, **env: str) -> subprocess.Popen[bytes]:
        full = {
            **os.environ,
            "OUTBOX_DATABASE_URL": self.url,
            "OUTBOX_AMQP_URL": self.amqp_url,
            "TEST_NAME": self.name,
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(self.tmp), os.environ.get("PYTHONPATH")])
            ),
            "OUTBOX_LOG_FORMAT": "json",
            **env,
        }
        log = (self.tmp / f"{label}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "outbox", "consume", "ledgerapp:consumer"],
            env=full,
            stdout=log,
            stderr=log,
        )
        self.procs.append(proc)
        # Wait until its queues are declared and bound, or the first messages find no queue.
        self.wait(lambda: '"consumer.started"' in (self.tmp / f"{label}.log").read_text(), 30)
        return proc

    async def send(self, n: int, key: str, **extra: object) -> str:
        envelope = Envelope(
            message_id=str(uuid.uuid4()),
            topic="ledger.entry",
            key=key,
            body=json.dumps({"n": n, **extra}).encode(),
            content_type="application/json",
            created_at=datetime.now(UTC),
        )
        connection = await aio_pika.connect(self.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.declare_exchange(
                self.name, aio_pika.ExchangeType.TOPIC, durable=True
            )
            props = envelope.amqp_properties(WireFormat(exchange=self.name))
            await exchange.publish(
                aio_pika.Message(envelope.body, **props), routing_key=envelope.topic
            )
        return envelope.message_id

    def effects(self) -> list[tuple[str, str, int, int]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT message_id, key, n, pid FROM effect ORDER BY seq"))
            return [tuple(r) for r in rows]  # type: ignore[misc]

    def wait(self, predicate: object, timeout: float = 40) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():  # type: ignore[operator]
            assert time.monotonic() < deadline, f"timed out; logs in {self.tmp}"
            time.sleep(0.1)

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


async def _cleanup(amqp_url: str, name: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for suffix in (
            "",
            ".ordered",
            ".dead",
            ".retry.1000ms",
            ".retry.5000ms",
            ".retry.30000ms",
            ".retry.120000ms",
            ".retry.600000ms",
            ".retry.3600000ms",
        ):
            await channel.queue_delete(f"{name}.ledger{suffix}")
        await channel.exchange_delete(name)


@pytest.fixture
def workers(
    pg_engine: sa.Engine, pg_schema_url: str, amqp_url: str, unique_name: str, tmp_path: Path
) -> Iterator[Workers]:
    w = Workers(pg_engine, pg_schema_url, amqp_url, unique_name, tmp_path)
    yield w
    w.stop_all()
    rabbitmqctl("start_app")  # in case a test failed with the broker app stopped
    rabbitmqctl("await_startup")
    asyncio.run(_cleanup(amqp_url, unique_name))


def test_worker_killed_after_commit_before_ack_still_has_one_effect(workers: Workers) -> None:
    first = workers.start("worker-1")
    mid = asyncio.run(workers.send(1, "k", crash_after_commit=True))

    assert first.wait(timeout=30) == -signal.SIGKILL  # died between commit and ack
    assert [e[0] for e in workers.effects()] == [mid]
    workers.start("worker-2")
    asyncio.run(workers.send(2, "k"))  # proof that worker-2 is consuming
    workers.wait(lambda: len(workers.effects()) == 2)
    time.sleep(0.5)

    effects = [e[0] for e in workers.effects()]
    print(f"\n[consumer kill -9 after commit] effects for the message: {effects.count(mid)}")
    assert effects.count(mid) == 1  # redelivered, recognised by the inbox, not applied again
    log = (workers.tmp / "worker-2.log").read_text()
    assert '"consumer.duplicate"' in log


def test_ordered_group_fails_over_to_the_other_worker_in_key_order(workers: Workers) -> None:
    active = workers.start("worker-a", ORDERED="1", SLOW="0.05")  # the single active consumer
    workers.start("worker-b", ORDERED="1", SLOW="0.05")  # waits as the standby

    async def send_all() -> None:
        for n in range(60):
            for k in range(5):
                await workers.send(n, f"key-{k}")

    asyncio.run(send_all())
    workers.wait(lambda: len(workers.effects()) >= 60)
    active.send_signal(signal.SIGKILL)
    workers.wait(lambda: len({e[0] for e in workers.effects()}) == 300)

    per_key: dict[str, list[int]] = {}
    seen: set[str] = set()
    for mid, key, n, _pid in workers.effects():
        assert mid not in seen, "a message had two effects"
        seen.add(mid)
        per_key.setdefault(key, []).append(n)
    pids = {pid for *_, pid in workers.effects()}
    print(f"\n[ordered failover] effects={len(seen)} workers_used={len(pids)}")
    assert len(pids) == 2  # the second worker took over
    assert all(order == list(range(60)) for order in per_key.values())


def test_broker_restart_mid_stream_loses_nothing_and_doubles_nothing(workers: Workers) -> None:
    workers.start("worker-1", SLOW="0.005")

    async def send_many(first: int, count: int) -> list[str]:
        return [await workers.send(n, f"key-{n % 7}") for n in range(first, first + count)]

    sent = asyncio.run(send_many(0, 300))
    workers.wait(lambda: len(workers.effects()) >= 50)
    rabbitmqctl("stop_app")
    time.sleep(1)
    rabbitmqctl("start_app")
    rabbitmqctl("await_startup")
    sent += asyncio.run(send_many(300, 100))
    workers.wait(lambda: len({e[0] for e in workers.effects()}) == len(sent), timeout=60)
    time.sleep(1)

    ids = [e[0] for e in workers.effects()]
    lost = len(set(sent) - set(ids))
    print(f"\n[consumer broker restart] sent={len(sent)} effects={len(ids)} lost={lost}")
    assert set(ids) == set(sent)  # nothing lost
    assert len(ids) == len(set(ids))  # nothing applied twice
