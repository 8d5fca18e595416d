"""Half messages across process deaths: real producers killed with -9, a real relay.

A producer process prepares a message and is killed before it commits or rolls
back. The relay (a real ``outbox relay --app`` process) must then resolve it: by
the application's check-back, or, for a local transaction bound to PostgreSQL,
by asking PostgreSQL; and a consumer must see the message only if the local work
happened.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from fault_support import declare, delete, drain, start_relay

import outbox

APP = textwrap.dedent(
    '''
    """A shop whose payment service uses half messages (started by the tests)."""
    import os
    import sys
    import time
    import uuid
    from datetime import timedelta

    import sqlalchemy as sa

    from outbox import Outbox, Verdict

    engine = sa.create_engine(os.environ["OUTBOX_DATABASE_URL"])
    ob = Outbox(engine, check_after=timedelta(seconds=1))


    @ob.checkback("payments.*")
    def payment_exists(message):
        """COMMIT when the payment row exists: the local work happened."""
        with engine.connect() as conn:
            found = conn.execute(
                sa.text("SELECT count(*) FROM payment WHERE id = :id"),
                {"id": message.payload["payment_id"]},
            ).scalar_one()
        return Verdict.COMMIT if found else Verdict.ROLLBACK


    if __name__ == "__main__":
        mode = sys.argv[1]
        payment_id = str(uuid.uuid4())
        if mode in ("bound-commit", "bound-abort"):
            conn = engine.connect()
            conn.begin()
            conn.execute(sa.text("INSERT INTO payment VALUES (:id)"), {"id": payment_id})
            half = ob.prepare("payments.captured", {"payment_id": payment_id}, bind=conn)
            if mode == "bound-commit":
                conn.commit()  # local work committed; the half message never is
        else:
            half = ob.prepare("payments.captured", {"payment_id": payment_id})
            if mode == "local-done":
                with engine.begin() as c:
                    c.execute(sa.text("INSERT INTO payment VALUES (:id)"), {"id": payment_id})
        print(half.message_id, flush=True)
        time.sleep(600)  # killed with -9 here, before half.commit() / half.rollback()
    '''
)


class Shop:
    def __init__(self, engine: sa.Engine, url: str, amqp_url: str, name: str, tmp: Path) -> None:
        self.engine = engine
        self.url = url
        self.amqp_url = amqp_url
        self.exchange = name
        self.queue = f"{name}.payments"
        self.tmp = tmp
        self.relay: subprocess.Popen[bytes] | None = None
        (tmp / "shopapp.py").write_text(APP)
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE payment (id text PRIMARY KEY)"))

    def env(self) -> dict[str, str]:
        path = os.pathsep.join(filter(None, [str(self.tmp), os.environ.get("PYTHONPATH")]))
        return {**os.environ, "OUTBOX_DATABASE_URL": self.url, "PYTHONPATH": path}

    def producer_killed_after(self, mode: str) -> str:
        """Run the producer until it has prepared, then kill it with -9; return the id."""
        proc = subprocess.Popen(
            [sys.executable, str(self.tmp / "shopapp.py"), mode],
            env=self.env(),
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None
        message_id = proc.stdout.readline().decode().strip()
        assert uuid.UUID(message_id)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        return message_id

    def start_relay(self, *, app: bool) -> None:
        extra = {"OUTBOX_CHECK_INTERVAL": "100ms", "OUTBOX_CHECK_RETRY_BASE": "200ms"}
        if app:
            extra["OUTBOX_APP"] = "shopapp:ob"
        extra["PYTHONPATH"] = self.env()["PYTHONPATH"]
        self.relay = start_relay(
            database_url=self.url,
            amqp_url=self.amqp_url,
            exchange=self.exchange,
            name="relay",
            log_dir=self.tmp,
            extra_env=extra,
        )

    def status(self, message_id: str) -> str:
        with self.engine.connect() as conn:
            return conn.execute(
                sa.select(outbox.outbox_table.c.status).where(
                    outbox.outbox_table.c.message_id == uuid.UUID(message_id)
                )
            ).scalar_one()

    def wait_status(self, message_id: str, status: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.status(message_id) != status:
            assert self.relay is None or self.relay.poll() is None, f"relay died; see {self.tmp}"
            assert time.monotonic() < deadline, (
                f"{message_id} is {self.status(message_id)}, not {status}; logs in {self.tmp}"
            )
            time.sleep(0.1)

    def received(self) -> list[str]:
        return [mid for mid, _ in asyncio.run(drain(self.amqp_url, self.queue))]


@pytest.fixture
def shop(
    pg_engine: sa.Engine, pg_schema_url: str, amqp_url: str, unique_name: str, tmp_path: Path
) -> Iterator[Shop]:
    s = Shop(pg_engine, pg_schema_url, amqp_url, unique_name, tmp_path)
    asyncio.run(declare(amqp_url, s.exchange, s.queue))
    yield s
    if s.relay is not None and s.relay.poll() is None:
        s.relay.send_signal(signal.SIGTERM)
        s.relay.wait(timeout=30)
    asyncio.run(delete(amqp_url, s.exchange, s.queue))


@pytest.mark.parametrize(
    ("mode", "app", "outcome"),
    [
        ("local-done", True, "published"),  # check-back finds the payment: COMMIT
        ("local-missing", True, "discarded"),  # check-back finds none: ROLLBACK
        ("bound-commit", False, "published"),  # PostgreSQL says committed; no app needed
        ("bound-abort", False, "discarded"),  # the session died: PostgreSQL says aborted
    ],
)
def test_producer_killed_between_prepare_and_commit_is_resolved(
    shop: Shop, mode: str, app: bool, outcome: str
) -> None:
    message_id = shop.producer_killed_after(mode)
    assert shop.status(message_id) == "prepared"

    shop.start_relay(app=app)
    shop.wait_status(message_id, outcome)

    received = shop.received()
    print(f"\n[half {mode}] outcome={outcome} received={received.count(message_id)}")
    assert received == ([message_id] if outcome == "published" else [])


def test_a_prepared_message_is_never_visible_to_consumers(shop: Shop) -> None:
    ob = outbox.Outbox(shop.engine)  # default check time: far beyond this test
    half = ob.prepare("payments.captured", {"payment_id": "p-1"})
    shop.start_relay(app=True)
    time.sleep(1.5)

    assert shop.status(half.message_id) == "prepared"
    assert shop.received() == []
    half.commit()
    shop.wait_status(half.message_id, "published")
    assert shop.received() == [half.message_id]
