"""The relay under fire: real relay processes, real PostgreSQL, real RabbitMQ.

Each test commits messages, runs one or more ``outbox relay`` processes, injects a
fault (kill -9, broker connections closed, broker restarted, database sessions
terminated, SIGTERM), then drains the queue and checks: lost = 0, per-key order
kept (first occurrences), every row published. Wire duplicates are allowed by
design (at-least-once) and printed.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import sqlalchemy as sa
from fault_support import declare, delete, drain, rabbitmqctl, start_relay
from sqlalchemy.orm import Session

import outbox

KEYS = 20


@dataclass
class Stage:
    """One test's world: its schema, exchange, queue and relay processes."""

    engine: sa.Engine
    database_url: str
    amqp_url: str
    exchange: str
    queue: str
    logs: Path
    relays: list[subprocess.Popen[bytes]] = field(default_factory=list)
    committed: list[tuple[str, str | None, int]] = field(default_factory=list)

    def produce(self, count: int, *, per_tx: int = 50) -> None:
        start = len(self.committed)
        for first in range(start, start + count, per_tx):
            with Session(self.engine) as s, s.begin():
                batch = []
                for i in range(first, min(first + per_tx, start + count)):
                    key = f"k{i % KEYS}" if i % 4 else None
                    m = outbox.publish(s, "fault.test", {"i": i}, key=key)
                    batch.append((m.message_id, key, i))
            self.committed.extend(batch)

    def start_relay(self, name: str) -> subprocess.Popen[bytes]:
        proc = start_relay(
            database_url=self.database_url,
            amqp_url=self.amqp_url,
            exchange=self.exchange,
            name=name,
            log_dir=self.logs,
        )
        self.relays.append(proc)
        return proc

    def published(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(
                sa.text("SELECT count(*) FROM outbox_message WHERE status = 'published'")
            ).scalar_one()

    def wait_published(self, at_least: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while self.published() < at_least:
            for proc in self.relays:
                assert proc.poll() in (None, -9, 0), f"a relay exited with {proc.returncode}"
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"only {self.published()} of {at_least} published; logs in {self.logs}"
                )
            time.sleep(0.1)

    def stop_all(self) -> None:
        for proc in self.relays:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.relays:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def check(self, title: str) -> None:
        """Drain the queue and assert lost = 0 and per-key order; print duplicates."""
        received = asyncio.run(drain(self.amqp_url, self.queue))
        ids = [mid for mid, _ in received]
        expected = {mid for mid, _, _ in self.committed}
        lost = expected - set(ids)
        unknown = set(ids) - expected
        duplicates = len(ids) - len(set(ids))
        first_seen: dict[str, list[int]] = defaultdict(list)
        seen: set[str] = set()
        for mid, body in received:
            if mid in seen:
                continue
            seen.add(mid)
            if body.get("key") is not None:
                first_seen[body["key"]].append(body["i"])
        out_of_order = [k for k, order in first_seen.items() if order != sorted(order)]
        print(
            f"\n[{title}] committed={len(expected)} received={len(ids)} "
            f"lost={len(lost)} wire_duplicates={duplicates} out_of_order_keys={out_of_order}"
        )
        assert not lost, f"{len(lost)} committed messages never reached the queue"
        assert not unknown
        assert out_of_order == []
        with self.engine.connect() as conn:
            states = dict(
                conn.execute(
                    sa.text("SELECT status, count(*) FROM outbox_message GROUP BY status")
                ).all()
            )
        assert states == {"published": len(expected)}


@pytest.fixture
def stage(
    pg_engine: sa.Engine, pg_schema_url: str, amqp_url: str, unique_name: str, tmp_path: Path
) -> Iterator[Stage]:
    url = sa.make_url(pg_schema_url).update_query_dict({"application_name": unique_name[:60]})
    s = Stage(
        engine=pg_engine,
        database_url=url.render_as_string(hide_password=False),
        amqp_url=amqp_url,
        exchange=unique_name,
        queue=f"{unique_name}.all",
        logs=tmp_path,
    )
    asyncio.run(declare(amqp_url, s.exchange, s.queue))
    yield s
    s.stop_all()
    rabbitmqctl("start_app")  # in case a test failed with the app stopped
    rabbitmqctl("await_startup")
    asyncio.run(delete(amqp_url, s.exchange, s.queue))


def run_with_fault(
    stage: Stage, title: str, fault: Callable[[], None], *, total: int = 3000
) -> None:
    stage.produce(total)
    stage.start_relay("relay-a")
    stage.wait_published(total // 5)
    fault()
    stage.wait_published(total)
    stage.stop_all()
    stage.check(title)


def test_relay_killed_with_sigkill_mid_stream_loses_nothing(stage: Stage) -> None:
    def kill_and_restart() -> None:
        victim = stage.relays[0]
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        stage.start_relay("relay-b")

    run_with_fault(stage, "kill -9 relay", kill_and_restart)


def test_broker_closing_all_connections_loses_nothing(stage: Stage) -> None:
    run_with_fault(
        stage, "close_all_connections", lambda: rabbitmqctl("close_all_connections", "fault test")
    )


def test_broker_restart_mid_stream_loses_nothing(stage: Stage) -> None:
    def restart() -> None:
        rabbitmqctl("stop_app")
        time.sleep(1)
        rabbitmqctl("start_app")
        rabbitmqctl("await_startup")

    run_with_fault(stage, "stop_app/start_app", restart)


def test_database_sessions_terminated_mid_stream_loses_nothing(stage: Stage) -> None:
    app = sa.make_url(stage.database_url).query["application_name"]

    def terminate() -> None:
        with stage.engine.connect() as conn:
            killed = conn.execute(
                sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = :app"
                ),
                {"app": app},
            ).scalar_one()
        assert killed >= 1

    run_with_fault(stage, "pg_terminate_backend", terminate)


def test_three_relays_publish_concurrent_production_in_key_order(stage: Stage) -> None:
    for name in ("relay-a", "relay-b", "relay-c"):
        stage.start_relay(name)
    for _ in range(6):
        stage.produce(500)
        time.sleep(0.3)
    stage.wait_published(3000)
    stage.stop_all()
    stage.check("three relays")


def test_sigterm_stops_the_relay_cleanly_and_promptly(stage: Stage) -> None:
    stage.produce(2000)
    relay = stage.start_relay("relay-a")
    stage.wait_published(300)
    started = time.monotonic()
    relay.send_signal(signal.SIGTERM)
    assert relay.wait(timeout=25) == 0
    print(f"\n[SIGTERM] exited 0 after {time.monotonic() - started:.2f} s")
    with stage.engine.connect() as conn:
        claimed = conn.execute(
            sa.text("SELECT count(*) FROM outbox_message WHERE claimed_by IS NOT NULL")
        ).scalar_one()
    assert claimed == 0  # in-flight claims were settled or released, not left to expire
    stage.start_relay("relay-b")
    stage.wait_published(2000)
    stage.stop_all()
    stage.check("SIGTERM")
