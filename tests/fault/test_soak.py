"""Soak under fire: producers commit while relays, consumers, the broker and sessions fail.

Two relays and two consumer workers (an ordered group: one active, one standby)
run as real processes while this test commits thousands of keyed messages. A
seeded controller meanwhile, at random:

- kills a relay with -9 and starts it again;
- kills a consumer worker with -9 and starts it again;
- closes every RabbitMQ connection;
- restarts the RabbitMQ application (stop_app / start_app);
- terminates the relays' and workers' PostgreSQL sessions.

At the end: lost = 0, double effects = 0, every key's effects in commit order.
It prints the seed (``OUTBOX_SOAK_SEED=<n>`` replays the same fault schedule),
the faults, the time the pipeline took to make progress again after each, and
the duplicates seen on the wire (a tap queue bound to the exchange).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import pytest
import sqlalchemy as sa
from fault_support import declare, delete, drain, rabbitmqctl, start_relay
from sqlalchemy.orm import Session

import outbox

MESSAGES = int(os.environ.get("OUTBOX_SOAK_MESSAGES", "3000"))
KEYS = 40
PRODUCE_SECONDS = float(os.environ.get("OUTBOX_SOAK_SECONDS", "40"))
DRAIN_TIMEOUT = 180.0

APP = textwrap.dedent(
    '''
    """The soak's consumer group: an ordered handler that records each effect."""
    import os
    from datetime import timedelta

    import sqlalchemy as sa

    from consumer import Consumer, ConsumerConfig

    name = os.environ["SOAK_NAME"]
    consumer = Consumer(
        "soak",
        database_url=os.environ["OUTBOX_DATABASE_URL"],
        amqp_url=os.environ["OUTBOX_AMQP_URL"],
        config=ConsumerConfig(exchange=name, queue_prefix=name, prefetch=200, concurrency=8),
    )


    @consumer.handler(
        "soak.#", ordered=True, retry_delay=timedelta(milliseconds=200), max_attempts=1000
    )
    def apply(message, session):
        session.execute(
            sa.text("INSERT INTO soak_effect (message_id, key, n) VALUES (:id, :key, :n)"),
            {"id": message.message_id, "key": message.key, "n": message.payload["n"]},
        )
    '''
)


@dataclass
class Fault:
    kind: str
    at: float
    recovery: float | None = None


@dataclass
class Soak:
    engine: sa.Engine
    url: str
    amqp_url: str
    name: str
    tmp: Path
    relays: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    committed: list[tuple[str, str, int]] = field(default_factory=list)

    def scoped_url(self) -> str:
        """The subprocesses' URL: tagged so the controller can terminate their sessions."""
        url = sa.make_url(self.url).update_query_dict({"application_name": f"soak-{self.name}"})
        return url.render_as_string(hide_password=False)

    def start_relay(self, label: str) -> None:
        self.relays[label] = start_relay(
            database_url=self.scoped_url(),
            amqp_url=self.amqp_url,
            exchange=self.name,
            name=label,
            log_dir=self.tmp,
        )

    def start_worker(self, label: str) -> None:
        env = {
            **os.environ,
            "OUTBOX_DATABASE_URL": self.scoped_url(),
            "OUTBOX_AMQP_URL": self.amqp_url,
            "SOAK_NAME": self.name,
            "OUTBOX_LOG_FORMAT": "json",
        }
        log = (self.tmp / f"{label}.log").open("ab")
        self.workers[label] = subprocess.Popen(
            [sys.executable, "-m", "outbox", "consume", "soakapp:consumer"],
            env=env,
            cwd=self.tmp,
            stdout=log,
            stderr=log,
        )

    def wait_started(self, label: str, event: str, timeout: float = 60) -> None:
        log = self.tmp / f"{label}.log"
        deadline = time.monotonic() + timeout
        while f'"{event}"' not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline, f"{label} did not start; see {log}"
            time.sleep(0.1)

    def effects(self) -> list[tuple[str, str, int]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT message_id::text, key, n FROM soak_effect ORDER BY seq")
            )
            return [(m, k, n) for m, k, n in rows]

    def effect_count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM soak_effect")).scalar_one())

    def stop_all(self) -> None:
        procs = [*self.relays.values(), *self.workers.values()]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def produce(soak: Soak, stop: threading.Event) -> None:
    """Commit MESSAGES keyed messages, 1-4 per transaction, spread over PRODUCE_SECONDS."""
    counters: Counter[str] = Counter()
    started = time.monotonic()
    sent = 0
    rng = random.Random(0)  # the workload is fixed; only the faults vary with the seed
    while sent < MESSAGES and not stop.is_set():
        batch: list[tuple[str, str, int]] = []
        with Session(soak.engine) as session, session.begin():
            for _ in range(min(rng.randint(1, 4), MESSAGES - sent)):
                key = f"k{rng.randrange(KEYS)}"
                n = counters[key]
                message = outbox.publish(session, "soak.entry", {"n": n}, key=key)
                counters[key] += 1
                batch.append((message.message_id, key, n))
                sent += 1
        soak.committed.extend(batch)  # after the commit: these exist
        ahead = started + PRODUCE_SECONDS * sent / MESSAGES - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)


class Controller:
    """Injects a seeded random sequence of faults until told to stop."""

    def __init__(self, soak: Soak, seed: int) -> None:
        self.soak = soak
        self.rng = random.Random(seed)
        self.faults: list[Fault] = []
        self.stop = threading.Event()

    def run(self) -> None:
        actions: list[tuple[str, Callable[[], None]]] = [
            ("kill -9 relay", self.kill_relay),
            ("kill -9 consumer", self.kill_worker),
            ("close RabbitMQ connections", self.close_connections),
            ("restart RabbitMQ app", self.restart_broker),
            ("terminate PostgreSQL sessions", self.terminate_sessions),
        ]
        # Every kind at least once (even if the producer is done by then), then at random.
        order = list(actions)
        self.rng.shuffle(order)
        while True:
            if self.stop.wait(self.rng.uniform(1.5, 3.5)) and not order:
                return
            kind, action = order.pop() if order else self.rng.choice(actions)
            fault = Fault(kind, time.monotonic())
            before = self.soak.effect_count()
            action()
            fault.recovery = self.until_progress(before, fault.at)
            self.faults.append(fault)

    def until_progress(self, before: int, since: float, timeout: float = 60) -> float | None:
        """Seconds from the fault until the effect count grows again (None: no work left)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.soak.effect_count() > before:
                return time.monotonic() - since
            time.sleep(0.05)
        return None

    def kill_relay(self) -> None:
        label = self.rng.choice(sorted(self.soak.relays))
        self.soak.relays[label].send_signal(signal.SIGKILL)
        self.soak.relays[label].wait()
        time.sleep(self.rng.uniform(0.2, 1.5))
        self.soak.start_relay(label)

    def kill_worker(self) -> None:
        label = self.rng.choice(sorted(self.soak.workers))
        self.soak.workers[label].send_signal(signal.SIGKILL)
        self.soak.workers[label].wait()
        time.sleep(self.rng.uniform(0.2, 1.5))
        self.soak.start_worker(label)

    def close_connections(self) -> None:
        rabbitmqctl("close_all_connections", "soak fault")

    def restart_broker(self) -> None:
        rabbitmqctl("stop_app")
        time.sleep(self.rng.uniform(0.5, 2))
        rabbitmqctl("start_app")
        rabbitmqctl("await_startup")

    def terminate_sessions(self) -> None:
        with self.soak.engine.connect() as conn:
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = :app AND pid <> pg_backend_pid()"
                ),
                {"app": f"soak-{self.soak.name}"},
            )
            conn.commit()


async def _cleanup(amqp_url: str, name: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for suffix in (
            "",
            ".ordered",
            ".dead",
            *(f".retry.{s}ms" for s in (1000, 5000, 30000, 120000, 600000, 3600000)),
        ):
            await channel.queue_delete(f"{name}.soak{suffix}")


@pytest.fixture
def soak(
    pg_engine: sa.Engine, pg_schema_url: str, amqp_url: str, unique_name: str, tmp_path: Path
) -> Iterator[Soak]:
    with pg_engine.begin() as conn:
        conn.execute(
            sa.text("CREATE TABLE soak_effect (seq bigserial, message_id uuid, key text, n int)")
        )
    (tmp_path / "soakapp.py").write_text(APP)
    s = Soak(pg_engine, pg_schema_url, amqp_url, unique_name, tmp_path)
    yield s
    s.stop_all()
    rabbitmqctl("start_app")  # in case the test failed with the broker app stopped
    rabbitmqctl("await_startup")
    asyncio.run(_cleanup(amqp_url, unique_name))


def test_soak_loses_nothing_applies_once_and_keeps_key_order(
    soak: Soak, capsys: pytest.CaptureFixture[str]
) -> None:
    seed = int(os.environ.get("OUTBOX_SOAK_SEED", random.randrange(1_000_000)))

    def report(line: str) -> None:
        # Straight to the terminal, even when the test passes: the figures belong in the
        # CI log whatever the outcome.
        with capsys.disabled():
            print(line, flush=True)

    report(f"\n[soak] seed {seed} (OUTBOX_SOAK_SEED={seed} replays this fault schedule)")
    tap = f"{soak.name}.tap"
    asyncio.run(declare(soak.amqp_url, soak.name, tap))
    for label in ("worker-a", "worker-b"):
        soak.start_worker(label)
        soak.wait_started(label, "consumer.started")
    for label in ("relay-a", "relay-b"):
        soak.start_relay(label)
        soak.wait_started(label, "relay.started")

    controller = Controller(soak, seed)
    faults = threading.Thread(target=controller.run, name="faults")
    producer_stop = threading.Event()
    producer = threading.Thread(target=produce, args=(soak, producer_stop), name="producer")
    started = time.monotonic()
    faults.start()
    producer.start()
    producer.join(PRODUCE_SECONDS * 3)
    producer_stop.set()
    producer.join()
    controller.stop.set()
    faults.join()
    produced = time.monotonic() - started

    # The broker app is up again (every fault ends with it started): let the rest drain.
    expected = {m for m, _, _ in soak.committed}
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while {m for m, _, _ in soak.effects()} != expected and time.monotonic() < deadline:
        time.sleep(0.5)
    drained = time.monotonic() - started

    effects = soak.effects()
    applied = Counter(m for m, _, _ in effects)
    lost = expected - set(applied)
    doubled = {m: c for m, c in applied.items() if c > 1}
    per_key: defaultdict[str, list[int]] = defaultdict(list)
    for _, key, n in effects:
        per_key[key].append(n)
    out_of_order = {k: ns for k, ns in per_key.items() if ns != sorted(ns)}
    wire = Counter(m for m, _ in asyncio.run(drain(soak.amqp_url, tap)))
    asyncio.run(delete(soak.amqp_url, soak.name, tap))
    worker_logs = "".join((soak.tmp / f"{w}.log").read_text() for w in soak.workers)
    absorbed = worker_logs.count('"consumer.duplicate"')

    report(
        f"[soak] {len(soak.committed)} messages committed over {produced:.1f}s, "
        f"all applied after {drained:.1f}s; {len(controller.faults)} faults"
    )
    by_kind: defaultdict[str, list[float]] = defaultdict(list)
    for fault in controller.faults:
        if fault.recovery is not None:
            by_kind[fault.kind].append(fault.recovery)
    for fault in controller.faults:
        recovery = f"{fault.recovery:.2f}s" if fault.recovery is not None else "n/a"
        report(
            f"[soak]   +{fault.at - started:6.1f}s {fault.kind:30} progress again after {recovery}"
        )
    for kind, times in sorted(by_kind.items()):
        report(
            f"[soak] recovery {kind:30} n={len(times)} median {statistics.median(times):.2f}s "
            f"max {max(times):.2f}s"
        )
    report(
        f"[soak] lost {len(lost)}, double effects {len(doubled)}, keys out of order "
        f"{len(out_of_order)}; wire duplicates {sum(wire.values()) - len(wire)} "
        f"(tap queue), duplicates absorbed by the inbox {absorbed} (worker logs)"
    )
    assert len(soak.committed) == MESSAGES
    assert {f.kind for f in controller.faults} >= {
        "kill -9 relay",
        "kill -9 consumer",
        "close RabbitMQ connections",
        "restart RabbitMQ app",
        "terminate PostgreSQL sessions",
    }
    assert not lost, f"{len(lost)} committed messages never applied; logs in {soak.tmp}"
    assert not doubled, f"double effects: {list(doubled.items())[:5]}"
    assert not out_of_order, f"keys out of order: {list(out_of_order)[:5]}"
    assert set(wire) == expected  # the tap saw every message too (and maybe duplicates)
