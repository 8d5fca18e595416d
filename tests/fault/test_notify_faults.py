"""The notify service as real processes: killed with -9 mid-retries, and two sharing the work.

- a service killed while notifications are being retried (some calls in flight)
  loses none: the restarted one resumes from the database, claims that lapsed
  come back, and no message is delivered twice;
- two services on one database and one consumer group split the notifications
  between them and call the endpoint once per message.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from notify_support import Partner, delete_topology, environment, send, write_config

from outbox.tables import notification_attempt_table, notification_table

pytestmark = pytest.mark.fault


class Services:
    """``outbox notify --config ...`` processes on the test's schema, exchange and partner."""

    def __init__(self, url: str, amqp_url: str, name: str, tmp: Path, partner: Partner) -> None:
        self.url, self.amqp_url, self.name, self.tmp = url, amqp_url, name, tmp
        self.partner = partner
        self.procs: list[subprocess.Popen[bytes]] = []

    def configure(self, **subscription: object) -> Path:
        return write_config(
            self.tmp / "notify.toml",
            name=self.name,
            subscriptions=[
                {
                    "name": "partner",
                    "topics": ["payments.*"],
                    "url": self.partner.url,
                    **subscription,
                }
            ],
            lease="2s",
        )

    def start(self, label: str, config: Path) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            **environment(),
            "OUTBOX_DATABASE_URL": self.url,
            "OUTBOX_AMQP_URL": self.amqp_url,
            "OUTBOX_LOG_FORMAT": "json",
        }
        log = (self.tmp / f"{label}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "outbox", "notify", "--config", str(config)],
            env=env,
            stdout=log,
            stderr=log,
        )
        self.procs.append(proc)
        return proc

    def log(self, label: str) -> str:
        return (self.tmp / f"{label}.log").read_text()

    def wait_started(self, *labels: str) -> None:
        def started() -> bool:
            for proc in self.procs:
                assert proc.poll() is None, f"a service exited: logs in {self.tmp}"
            return all('"notify.started"' in self.log(label) for label in labels)

        wait(started, 30, self.tmp)

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def wait(predicate: Callable[[], bool], timeout: float, tmp: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out; logs in {tmp}"
        time.sleep(0.05)


def statuses(engine: sa.Engine) -> dict[str, tuple[str, int]]:
    t = notification_table
    with engine.connect() as conn:
        rows = conn.execute(sa.select(t.c.message_id, t.c.status, t.c.attempts))
        return {str(r.message_id): (r.status, r.attempts) for r in rows}


def attempts_recorded(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(
            sa.select(sa.func.count()).select_from(notification_attempt_table)
        ).scalar_one()


@pytest.fixture
def partner() -> Iterator[Partner]:
    p = Partner()
    yield p
    p.close()


@pytest.fixture
def services(
    pg_engine: sa.Engine,
    pg_schema_url: str,
    amqp_url: str,
    unique_name: str,
    tmp_path: Path,
    partner: Partner,
) -> Iterator[Services]:
    s = Services(pg_schema_url, amqp_url, unique_name, tmp_path, partner)
    yield s
    s.stop_all()
    import asyncio

    asyncio.run(delete_topology(amqp_url, unique_name))


async def test_a_service_killed_during_retries_is_resumed_without_loss_or_double_delivery(
    services: Services, partner: Partner, pg_engine: sa.Engine
) -> None:
    # Given an endpoint that fails each message's first three calls, slowly enough that
    # calls are in flight at any moment
    seen: dict[str, int] = {}

    def answer(message_id: str, attempt: int) -> int:
        seen[message_id] = seen.get(message_id, 0) + 1
        return 503 if seen[message_id] <= 3 else 200

    partner.answer = answer
    partner.slow = lambda message_id, attempt: True
    partner.hang = 0.1
    config = services.configure(
        # A breaker that never opens here: every message fails three times on purpose.
        schedule=["0s", *["300ms"] * 5],
        timeout="500ms",
        breaker_threshold=1000,
    )
    first = services.start("first", config)
    services.wait_started("first")
    mids = [
        await send(services.amqp_url, services.name, "payments.captured", {"n": n})
        for n in range(12)
    ]

    # When the service is killed while the retries are going on
    wait(lambda: len(partner.calls) >= 18, 30, services.tmp)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    calls_before_kill = len(partner.calls)
    assert any(status == "pending" for status, _ in statuses(pg_engine).values())
    services.start("second", config)

    # Then the restarted service delivers every message, each exactly once
    wait(
        lambda: (
            len(statuses(pg_engine)) == len(mids)
            and all(status == "delivered" for status, _ in statuses(pg_engine).values())
        ),
        60,
        services.tmp,
    )
    assert len(partner.calls) > calls_before_kill
    for mid in mids:
        assert partner.delivered(mid) == 1, mid
        assert all(call.signature_valid for call in partner.calls_of(mid))
    # Every call the partner saw is a recorded attempt, but those the kill cut short
    # (at most one per call slot): their claims lapsed and the attempt was made again.
    final = statuses(pg_engine)
    unrecorded = {mid: len(partner.calls_of(mid)) - final[mid][1] for mid in mids}
    assert all(n >= 0 for n in unrecorded.values())
    assert sum(unrecorded.values()) <= 4  # the subscription's concurrency
    assert attempts_recorded(pg_engine) == sum(attempts for _, attempts in final.values())
    assert '"notify.delivered"' in services.log("second")


async def test_two_services_share_the_work_and_call_once_per_message(
    services: Services, partner: Partner, pg_engine: sa.Engine
) -> None:
    partner.slow = lambda message_id, attempt: True
    partner.hang = 0.05
    config = services.configure(schedule=["0s", "200ms", "200ms"], timeout="1s", concurrency=2)
    procs = [services.start("a", config), services.start("b", config)]
    services.wait_started("a", "b")

    mids = [
        await send(services.amqp_url, services.name, "payments.captured", {"n": n})
        for n in range(40)
    ]
    wait(
        lambda: sum(status == "delivered" for status, _ in statuses(pg_engine).values()) == 40,
        60,
        services.tmp,
    )

    assert sorted(call.message_id for call in partner.calls) == sorted(mids)
    delivered_by = {label: services.log(label).count('"notify.delivered"') for label in "ab"}
    assert sum(delivered_by.values()) == 40
    assert all(delivered_by.values()), delivered_by
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    assert [proc.wait(20) for proc in procs] == [0, 0]
