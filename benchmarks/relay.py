"""Relay throughput and latency, against raw publishers measured in the same run.

Everything runs against the real PostgreSQL and RabbitMQ, in a schema, an exchange
and a durable queue (bound with ``#``) of its own that are removed at the end; the
queue is purged after every measurement.

1. **Drain.** N pre-filled rows (about 200-byte JSON payloads; keyless, keyed over
   1000 keys, or half and half) drained by one relay, in this process
   (``async with Relay(config)``) and as ``python -m outbox relay`` in a subprocess:
   the time from the relay's start to every row ``published`` (the count is polled
   every 50 ms). In-process the clock starts before ``Relay.start()`` (connecting
   included) and, in a second column, when it returned; for the subprocess it starts
   at its ``relay.started`` log line (connected, loops starting; interpreter start-up
   and imports excluded). Baselines: the same messages (same body, properties and
   headers, built beforehand) published by raw aio-pika and raw aiormq on one
   confirm channel, ``asyncio.gather`` over windows of 500 (the relay's batch size),
   ``mandatory`` as the relay does, connection opened before the clock starts.
2. **Latency.** A producer process commits one message per transaction at a steady
   rate and records ``time.time()`` right after each commit returns (by message id);
   an aio-pika consumer in this process (its own connection, auto-ack) records the
   time each message arrives; the relay runs in a subprocess. Commit-to-received
   percentiles, the first second excluded, for the default poll settings and variants.
3. **Open snapshot.** Keyless messages with and without another session holding
   ``BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1 FROM outbox_message LIMIT 1``
   open for the whole arm, on one relay subprocess per arm: (a) N/2 pre-filled rows
   drained while a producer process commits N/2 more (100 rows per transaction,
   paced at 5000 msg/s); (b) N more rows committed at once and drained while the
   dead row versions of (a) are still there (the open snapshot keeps pruning, index
   cleanup and vacuum from removing them); (c) the latency of a steady 200 msg/s
   trickle for up to 10 s, same relay, same snapshot: every poll of an idle relay
   scans the dead entries of the due index. The claim statement's plan (``EXPLAIN
   (ANALYZE, BUFFERS)``, rolled back), idle and with a full batch due, closes each arm.

``--phases experiments`` (not run by default) drains in-process with earlier versions of
the relay's parts patched back in, interleaved with the relay as it is: the publishing
path through ``aio_pika.Message`` and ``Exchange.publish`` with a timeout per message,
and the keyed read that numbered and sorted every pending keyed row with its payload.
``--phases publish`` publishes the same keyless messages four ways (aio-pika, aiormq
``basic_publish`` with and without its wait for the write, and a prototype that writes a
whole window at once) and reports the publishing process's CPU per message.

CPU time of the relay process, its PostgreSQL backends, all PostgreSQL processes,
RabbitMQ and the whole machine is read from /proc around each measurement.

    python benchmarks/relay.py [--database-url URL] [--amqp-url URL] [--messages 20000]
                               [--latency-seconds 20] [--phases drain,latency,snapshot]
                               [--rounds 1] [--quick] [--verbose]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aio_pika
import aiormq
import psycopg
import sqlalchemy as sa
from sqlalchemy import text

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
    from multiprocessing.connection import Connection as PipeEnd

    from aio_pika.abc import AbstractIncomingMessage

# Run as a script from a checkout: the project's packages come before this folder
# (which holds a ``relay.py`` of its own).
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from report import Figure, write_json  # noqa: E402  (benchmarks/, next to this script)

import outbox  # noqa: E402
from outbox.engines import make_async_engine, make_engine  # noqa: E402
from outbox.envelope import Envelope, WireFormat  # noqa: E402
from outbox.logs import configure_logging  # noqa: E402
from outbox.producer import Producer  # noqa: E402
from outbox.tables import SHARD_COUNT, outbox_table  # noqa: E402
from relay.config import RelayConfig  # noqa: E402
from relay.relay import Relay  # noqa: E402
from relay.store import _PREFIX_BATCHES, RelayStore  # noqa: E402

DEFAULT_DB = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672/"
TOPIC = "bench.relay"
KEYS = 1000
WINDOW = 500  # raw publishers' confirm window: the relay's default batch size
POLL_EVERY = 0.05
APP = "bench_relay"  # application_name prefix of every connection this benchmark opens
PAYLOAD_BYTES = 200
T = TypeVar("T")
PRODUCE_RATE = 5000  # msg/s committed during the drain of phase 3 (a), 100 per transaction

COUNT_PUBLISHED = text("SELECT count(*) FROM outbox_message WHERE status = 'published'")
COUNT_BY_STATUS = text("SELECT status, count(*) FROM outbox_message GROUP BY status")


# --------------------------------------------------------------------------- CPU accounting

_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) used so far by ``pid``; None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()
    ticks = [int(x) for x in first[1:9]]  # user nice system idle iowait irq softirq steal
    idle = ticks[3] + ticks[4]
    return (sum(ticks) - idle) / _TICK, sum(ticks) / _TICK


def pids_named(comm: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == comm:
                    pids.append(int(entry.name))
    return pids


def cpu_of(pids: Sequence[int]) -> dict[int, float]:
    values = {pid: process_cpu(pid) for pid in pids}
    return {pid: v for pid, v in values.items() if v is not None}


@dataclass
class CpuShare:
    """CPU used during one measurement, in % of one core (the machine has nproc x 100%)."""

    wall: float
    relay: float  # the relay's process (in-process: this whole process, poller included)
    relay_pg: float  # the PostgreSQL backends of the relay's connections
    pg_all: float  # every PostgreSQL process (the relay's backends included)
    rabbit: float
    bench: float  # this process (unless it is the relay) and its producer process
    machine: float  # everything, all cores

    @property
    def other(self) -> float:
        """What the machine ran besides the relay, PostgreSQL, RabbitMQ and this process."""
        return max(0.0, self.machine - self.relay - self.pg_all - self.rabbit - self.bench)

    def per_message_us(self, value: float, messages: int) -> float:
        return value / 100 * self.wall / max(messages, 1) * 1e6

    def show(self) -> str:
        return (
            f"relay {self.relay:4.0f}%  relay's PG backends {self.relay_pg:4.0f}%  "
            f"PG all {self.pg_all:4.0f}%  RabbitMQ {self.rabbit:4.0f}%  bench {self.bench:4.0f}%  "
            f"other {self.other:4.0f}%  machine {self.machine:4.0f}% of {os.cpu_count()}00%"
        )


class CpuMeter:
    """Reads /proc before and after a measurement. ``relay_pid`` None: the relay is in here.

    ``helpers`` (a producer process) are counted with this process as ``bench``.
    """

    def __init__(
        self, admin: sa.Engine, relay_pid: int | None, helpers: Sequence[int] = ()
    ) -> None:
        self.admin = admin
        self.relay_pid = relay_pid
        self.helpers = tuple(helpers)
        self._helpers0: dict[int, float] = {}
        self._pg0: dict[int, float] = {}
        self._rabbit0: dict[int, float] = {}
        self._relay0 = 0.0
        self._self0 = 0.0
        self._machine0 = (0.0, 0.0)
        self._t0 = 0.0

    def _self_cpu(self) -> float:
        t = os.times()
        return t.user + t.system

    def start(self) -> CpuMeter:
        self._pg0 = cpu_of(pids_named("postgres"))
        self._rabbit0 = cpu_of(pids_named("beam.smp"))
        self._relay0 = (process_cpu(self.relay_pid) or 0.0) if self.relay_pid else 0.0
        self._self0 = self._self_cpu()
        self._helpers0 = cpu_of(self.helpers)
        self._machine0 = machine_busy()
        self._t0 = time.perf_counter()
        return self

    def stop(self) -> CpuShare:
        """Call while the relay still runs (its backends are found by application_name)."""
        wall = time.perf_counter() - self._t0
        machine = machine_busy()
        self_cpu = self._self_cpu() - self._self0
        pg1 = cpu_of(pids_named("postgres"))
        rabbit1 = cpu_of(pids_named("beam.smp"))
        helpers = sum(v - self._helpers0.get(p, v) for p, v in cpu_of(self.helpers).items())
        relay_cpu = (
            (process_cpu(self.relay_pid) or self._relay0) - self._relay0
            if self.relay_pid
            else self_cpu
        )
        with self.admin.connect() as conn:
            relay_backends = [
                int(pid)
                for (pid,) in conn.execute(
                    text("SELECT pid FROM pg_stat_activity WHERE application_name = :app"),
                    {"app": f"{APP}_relay"},
                )
            ]

        def delta(now: dict[int, float], before: dict[int, float], pids: Any = None) -> float:
            keys = now.keys() if pids is None else [p for p in pids if p in now]
            return sum(now[p] - before.get(p, 0.0) for p in keys)

        pct = 100 / wall
        return CpuShare(
            wall=wall,
            relay=relay_cpu * pct,
            relay_pg=delta(pg1, self._pg0, relay_backends) * pct,
            pg_all=delta(pg1, self._pg0) * pct,
            rabbit=delta(rabbit1, self._rabbit0) * pct,
            bench=(0.0 if self.relay_pid in (None, os.getpid()) else self_cpu * pct)
            + helpers * pct,
            machine=(machine[0] - self._machine0[0])
            / (machine[1] - self._machine0[1])
            * 100
            * (os.cpu_count() or 1),
        )


# --------------------------------------------------------------------------- the stage


def _url(base: str, schema: str, app: str) -> str:
    url = sa.make_url(base).update_query_dict(
        {"options": f"-csearch_path={schema}", "application_name": app}
    )
    return url.render_as_string(hide_password=False)


def libpq_url(url: str) -> str:
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@dataclass
class Stage:
    """This run's schema, exchange and queue, and the connections that look at them."""

    base_url: str
    amqp_url: str
    schema: str
    exchange: str
    queue: str
    admin: sa.Engine = field(init=False)
    engine: sa.Engine = field(init=False)

    def __post_init__(self) -> None:
        self.admin = make_engine(
            sa.make_url(self.base_url).update_query_dict({"application_name": f"{APP}_admin"}),
            pool_size=2,
        )
        self.engine = make_engine(self.url("bench"), pool_size=4)

    def url(self, role: str) -> str:
        """A URL working in the schema, its connections named ``bench_relay_<role>``."""
        return _url(self.base_url, self.schema, f"{APP}_{role}")

    @property
    def relay_url(self) -> str:
        return self.url("relay")

    def create(self) -> None:
        with self.admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE"))
            conn.execute(text(f"CREATE SCHEMA {self.schema}"))
        with self.engine.begin() as conn:
            outbox.metadata.create_all(conn)

    def drop(self) -> None:
        with self.admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE"))
        self.engine.dispose()
        self.admin.dispose()

    def truncate(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(text("TRUNCATE outbox_message"))

    def insert(self, rows: Sequence[dict[str, Any]], *, chunk: int = 2000) -> float:
        """Insert ``rows`` in one transaction; return when the commit returned (perf_counter)."""
        with self.engine.begin() as conn:
            for i in range(0, len(rows), chunk):
                conn.execute(sa.insert(outbox_table), list(rows[i : i + chunk]))
        return time.perf_counter()

    def analyze(self) -> None:
        with self.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(
                text("ANALYZE outbox_message")
            )

    def statuses(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return {str(s): int(n) for s, n in conn.execute(COUNT_BY_STATUS)}

    def wait_published(self, n: int, timeout: float, alive: Callable[[], None]) -> float:
        """Poll every 50 ms until ``n`` rows are published; return perf_counter at that poll."""
        deadline = time.perf_counter() + timeout
        with self.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            while True:
                if conn.execute(COUNT_PUBLISHED).scalar_one() >= n:
                    return time.perf_counter()
                alive()
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"not {n} published after {timeout:g}s: {self.statuses()}")
                time.sleep(POLL_EVERY)

    def table_stats(self) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = conn.execute(
                text(
                    "SELECT n_live_tup, n_dead_tup, autovacuum_count, autoanalyze_count, "
                    "pg_relation_size('outbox_message') AS heap, "
                    "pg_relation_size('ix_outbox_message_due') AS due_index "
                    "FROM pg_stat_user_tables WHERE relid = 'outbox_message'::regclass"
                )
            ).one()
            return dict(row._mapping)


async def broker_setup(stage: Stage) -> str:
    """Declare the exchange and the queue; return RabbitMQ's version."""
    connection = await aio_pika.connect(stage.amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            stage.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(stage.queue, durable=True)
        await queue.bind(exchange, "#")
        props = connection.transport.connection.server_properties if connection.transport else {}
        version = props.get("version", "?")
        return version.decode() if isinstance(version, bytes) else str(version)


def relay_made(exchange: str) -> tuple[list[str], list[str]]:
    """Queues and exchanges a relay declares for ``exchange`` besides it (receipts)."""
    try:
        from outbox.receipts import receipts_exchange, receipts_queue
    except ImportError:  # a checkout from before receipts
        return [], []
    return [receipts_queue(exchange)], [receipts_exchange(exchange)]


async def broker_teardown(stage: Stage) -> None:
    """Delete our queue and exchange and whatever the relays declared with them."""
    queues, exchanges = relay_made(stage.exchange)
    connection = await aio_pika.connect(stage.amqp_url)
    async with connection:
        for queue in [stage.queue, *queues]:
            channel = await connection.channel()  # one per delete: an error closes it
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await channel.queue_delete(queue)
        for exchange in [stage.exchange, *exchanges]:
            channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await channel.exchange_delete(exchange)


async def purge(stage: Stage) -> int:
    """Empty the queue; return how many messages it held."""
    connection = await aio_pika.connect(stage.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(stage.queue, durable=True, passive=True)
        depth = queue.declaration_result.message_count or 0
        await queue.purge()
        return depth


# --------------------------------------------------------------------------- messages

_PRODUCER = Producer()


def payload(i: int) -> dict[str, Any]:
    """A JSON payload of about ``PAYLOAD_BYTES`` bytes encoded."""
    body: dict[str, Any] = {
        "order_id": i,
        "customer": f"customer-{i % KEYS:04d}",
        "amount": f"{(i * 7919) % 100_000 / 100:.2f}",
        "currency": "EUR",
        "items": [{"sku": f"SKU-{i % 97:03d}", "qty": 1 + i % 3}],
        "sent_at": 0.0,
    }
    pad = PAYLOAD_BYTES - len(_PRODUCER.config.codec.encode(body)) - len(',"note":""')
    body["note"] = "x" * max(0, pad)
    return body


def key_of(i: int, variant: str) -> str | None:
    if variant == "keyless" or (variant == "mixed" and i % 2 == 0):
        return None
    return f"k{i % KEYS:04d}"


def make_rows(n: int, variant: str, first: int = 0) -> list[dict[str, Any]]:
    """Outbox rows as ``outbox.publish`` writes them (``Producer.build_row``)."""
    return [
        _PRODUCER.build_row(TOPIC, payload(i), key=key_of(i, variant))[0]
        for i in range(first, first + n)
    ]


def envelopes_of(rows: Sequence[dict[str, Any]]) -> list[Envelope]:
    return [
        Envelope(
            message_id=str(r["message_id"]),
            topic=r["topic"],
            key=r["key"],
            body=r["payload"],
            content_type=r["content_type"],
            headers=r["headers"],
            created_at=r["created_at"],
        )
        for r in rows
    ]


# --------------------------------------------------------------------------- relays


class RelayProcess:
    """``python -m outbox relay`` in a subprocess; ``start`` returns at its relay.started line."""

    def __init__(self, stage: Stage, env: dict[str, str] | None = None) -> None:
        self.stage = stage
        self.env = {
            **os.environ,
            "OUTBOX_DATABASE_URL": stage.relay_url,
            "OUTBOX_AMQP_URL": stage.amqp_url,
            "OUTBOX_EXCHANGE": stage.exchange,
            "OUTBOX_LOG_FORMAT": "json",
            "OUTBOX_LOG_LEVEL": "INFO",
            **(env or {}),
        }
        self.proc: subprocess.Popen[str] | None = None
        self.log: deque[str] = deque(maxlen=200)
        self._started = threading.Event()
        self.started_at = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if not self._started.is_set() and "relay.started" in line:
                self.started_at = time.perf_counter()
                self._started.set()
            self.log.append(line.rstrip())

    def start(self, timeout: float = 60) -> float:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "outbox", "relay"],
            env=self.env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not self._started.wait(0.05):
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the relay did not start:\n{self.tail()}")
        return self.started_at

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"the relay exited with {self.proc.returncode}:\n{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        return "\n".join(list(self.log)[-lines:])

    def problems(self) -> list[str]:
        """Log lines of retries, dead messages and errors (none expected)."""
        words = ('"warning"', '"error"', '"critical"')
        return [line for line in self.log if any(w in line for w in words)]

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Drain:
    """One relay drain: clock readings (perf_counter) and the CPU it took."""

    label: str
    messages: int
    start: float | None  # before the relay began connecting (in-process only)
    ready: float
    done: float
    cpu: CpuShare
    problems: list[str] = field(default_factory=list)

    @property
    def from_start(self) -> float | None:
        return None if self.start is None else self.messages / (self.done - self.start)

    @property
    def from_ready(self) -> float:
        return self.messages / (self.done - self.ready)


async def drain_in_process(stage: Stage, label: str, n: int, timeout: float) -> Drain:
    """Drain the table with a ``Relay`` on this event loop; poll the count every 50 ms."""
    config = RelayConfig(
        database_url=stage.relay_url, amqp_url=stage.amqp_url, exchange=stage.exchange
    )
    poller = make_async_engine(stage.url("poll"), pool_size=1)
    meter = CpuMeter(stage.admin, None).start()
    relay = Relay(config)
    start = time.perf_counter()
    await relay.start()
    ready = time.perf_counter()
    try:
        async with poller.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            while (await conn.execute(COUNT_PUBLISHED)).scalar_one() < n:
                if time.perf_counter() - start > timeout:
                    raise TimeoutError(f"in-process relay: not {n} published after {timeout:g}s")
                await asyncio.sleep(POLL_EVERY)
        done = time.perf_counter()
        cpu = await asyncio.to_thread(meter.stop)
    finally:
        await relay.stop()
        await poller.dispose()
    totals = relay._totals  # a benchmark may look
    problems = [f"{k}={v}" for k, v in totals.items() if k != "published" and v]
    return Drain(label, n, start, ready, done, cpu, problems)


def drain_subprocess(stage: Stage, label: str, n: int, timeout: float) -> Drain:
    relay = RelayProcess(stage)
    try:
        relay.start()
        meter = CpuMeter(stage.admin, relay.pid).start()
        ready = relay.started_at
        done = stage.wait_published(n, timeout, relay.check_alive)
        cpu = meter.stop()
    finally:
        relay.stop()
    return Drain(label, n, None, ready, done, cpu, relay.problems())


# --------------------------------------------------------------------------- raw publishers


@dataclass
class Raw:
    label: str
    messages: int
    seconds: float
    cpu: CpuShare

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


async def raw_aio_pika(stage: Stage, envelopes: Sequence[Envelope]) -> Raw:
    """Confirmed publishing with aio-pika: ``gather`` over windows of ``WINDOW``."""
    wire = WireFormat(exchange=stage.exchange)
    props = [(e.body, e.topic, e.amqp_properties(wire)) for e in envelopes]
    connection = await aio_pika.connect(stage.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=False)
        exchange = await channel.get_exchange(stage.exchange)
        meter = CpuMeter(stage.admin, os.getpid()).start()
        t0 = time.perf_counter()
        for i in range(0, len(props), WINDOW):
            answers = await asyncio.gather(
                *(
                    exchange.publish(aio_pika.Message(body, **p), topic, mandatory=True)
                    for body, topic, p in props[i : i + WINDOW]
                )
            )
            if not all(isinstance(a, aiormq.spec.Basic.Ack) for a in answers):
                raise RuntimeError("raw aio-pika: a message was not acked")
        seconds = time.perf_counter() - t0
        cpu = await asyncio.to_thread(meter.stop)
    return Raw("raw aio-pika", len(props), seconds, cpu)


Window = list[tuple[bytes, str, aiormq.spec.Basic.Properties]]


async def raw_aiormq(
    stage: Stage,
    envelopes: Sequence[Envelope],
    *,
    wait: bool = True,
    one_write: bool = False,
    label: str = "raw aiormq",
) -> Raw:
    """Confirmed publishing with aiormq (aio-pika's driver): ``gather`` over windows.

    ``wait=False``: ``basic_publish`` does not wait for each frame to be written (as the
    relay publishes). ``one_write``: the prototype of ``_publish_window_one_write``.
    """
    wire = WireFormat(exchange=stage.exchange)
    messages: Window = []
    for e in envelopes:
        p = e.amqp_properties(wire)
        properties = aiormq.spec.Basic.Properties(
            message_id=p["message_id"],
            content_type=p["content_type"],
            delivery_mode=p["delivery_mode"],
            timestamp=p["timestamp"],
            headers=p["headers"],
        )
        messages.append((e.body, e.topic, properties))
    connection = await aiormq.connect(stage.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        meter = CpuMeter(stage.admin, os.getpid()).start()
        t0 = time.perf_counter()
        for i in range(0, len(messages), WINDOW):
            window = messages[i : i + WINDOW]
            if one_write:
                answers = await _publish_window_one_write(channel, stage.exchange, window)
            else:
                answers = await asyncio.gather(
                    *(
                        channel.basic_publish(
                            body,
                            exchange=stage.exchange,
                            routing_key=topic,
                            properties=properties,
                            mandatory=True,
                            wait=wait,
                        )
                        for body, topic, properties in window
                    )
                )
            if not all(isinstance(a, aiormq.spec.Basic.Ack) for a in answers):
                raise RuntimeError(f"{label}: a message was not acked")
        seconds = time.perf_counter() - t0
        cpu = await asyncio.to_thread(meter.stop)
    finally:
        await connection.close()
    return Raw(label, len(messages), seconds, cpu)


async def _publish_window_one_write(
    channel: aiormq.abc.AbstractChannel, exchange: str, window: Window
) -> list[object]:
    """Prototype, not for production: the frames of a whole window in one write.

    It registers each confirm the way ``basic_publish`` does, in aiormq's internal
    state (``delivery_tag``, ``confirmations``, ``message_id_delivery_tag``, checked
    against aiormq 7.2; no clean-up of the message-id map, no bodies beyond one frame),
    which aiormq offers no API for.
    """
    from aiormq.abc import ChannelFrame
    from pamqp.body import ContentBody
    from pamqp.header import ContentHeader

    ch: Any = channel
    frames: list[Any] = []
    confirmations = []
    async with ch.lock:
        for body, topic, properties in window:
            ch.delivery_tag += 1
            confirmation = ch.create_future()
            ch.confirmations[ch.delivery_tag] = confirmation
            ch.message_id_delivery_tag[properties.message_id] = ch.delivery_tag
            confirmations.append(confirmation)
            frames += [
                aiormq.spec.Basic.Publish(exchange=exchange, routing_key=topic, mandatory=True),
                ContentHeader(properties=properties, body_size=len(body)),
                ContentBody(body),
            ]
        await ch.write_queue.put(ChannelFrame.marshall(channel_number=ch.number, frames=frames))
    return list(await asyncio.gather(*confirmations))


# --------------------------------------------------------------------------- producer process


def producer_main(
    pipe: PipeEnd, url: str, total: int, rate: float, per_tx: int, variant: str, first: int
) -> None:
    """Commit ``total`` messages, ``per_tx`` per transaction, paced at ``rate`` messages/s.

    One message per transaction goes through ``outbox.publish``; several are built
    beforehand (``Producer.build_row``) and inserted with one executemany, so that the
    producer stays ahead of the relay on a busy machine. Sends ("ready",) once
    connected, waits for ("go",), then sends ("done", elapsed, {message_id:
    time.time() right after its commit returned}).
    """
    try:
        engine = make_engine(url, pool_size=1)
        conn = engine.connect()
        conn.execute(text("SELECT 1"))
        conn.rollback()
        payloads = [(payload(i), key_of(i, variant)) for i in range(first, first + total)]
        rows = make_rows(total, variant, first) if per_tx > 1 else []
        pipe.send(("ready",))
        pipe.recv()
        committed: dict[str, float] = {}
        t0 = time.time()
        for k, i in enumerate(range(0, total, per_tx)):
            delay = t0 + k * per_tx / rate - time.time()
            if delay > 0:
                time.sleep(delay)
            ids = []
            with conn.begin():
                if rows:
                    conn.execute(sa.insert(outbox_table), rows[i : i + per_tx])
                    ids = [str(r["message_id"]) for r in rows[i : i + per_tx]]
                else:
                    for body, key in payloads[i : i + per_tx]:
                        ids.append(outbox.publish(conn, TOPIC, body, key=key).message_id)
            now = time.time()
            for mid in ids:
                committed[mid] = now
        elapsed = time.time() - t0
        conn.close()
        engine.dispose()
        pipe.send(("done", elapsed, committed))
    except Exception:
        pipe.send(("error", traceback.format_exc()))


class ProducerProcess:
    def __init__(
        self, stage: Stage, total: int, rate: float, per_tx: int, variant: str, first: int = 0
    ) -> None:
        ctx = mp.get_context("spawn")
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=producer_main,
            args=(child, stage.url("producer"), total, rate, per_tx, variant, first),
            daemon=True,
        )
        self.proc.start()
        self._expect("ready")

    def _expect(self, what: str) -> tuple[Any, ...]:
        message: tuple[Any, ...] = self.pipe.recv()
        if message[0] == "error":
            raise RuntimeError(f"producer failed:\n{message[1]}")
        if message[0] != what:
            raise RuntimeError(f"producer said {message!r}, expected {what!r}")
        return message

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def go(self) -> None:
        self.pipe.send(("go",))

    def result(self) -> tuple[float, dict[str, float]]:
        _, elapsed, committed = self._expect("done")
        self.proc.join(timeout=10)
        return elapsed, committed

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()


# --------------------------------------------------------------------------- disruptions


async def wait_broker(stage: Stage, timeout: float = 180) -> None:
    """Wait until RabbitMQ accepts connections again, then re-declare our exchange and queue."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await broker_setup(stage)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1.0)


async def steady(
    stage: Stage, label: str, measure: Callable[[], Awaitable[T]], tries: int = 4
) -> T:
    """Run ``measure``; run it again if it failed or the relay logged a retry or an error.

    Other work on a shared machine may restart RabbitMQ or close its connections in
    the middle of a measurement; such a figure says nothing about the relay.
    """
    for attempt in range(1, tries + 1):
        try:
            result = await measure()
        except Exception as e:
            if attempt == tries:
                raise
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
        else:
            problems: list[str] = getattr(result, "problems", [])
            if not problems or attempt == tries:
                return result
            reason = f"the relay logged {len(problems)} retries/errors: {problems[0][:160]}"
        print(f"    {label}: disturbed ({reason}); measuring again", flush=True)
        await asyncio.sleep(2.0)
        await wait_broker(stage)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- phase 1: drain


@dataclass
class DrainRow:
    variant: str
    in_process: list[Drain] = field(default_factory=list)
    subprocess: list[Drain] = field(default_factory=list)
    aio_pika: list[Raw] = field(default_factory=list)
    aiormq: list[Raw] = field(default_factory=list)


def _check_drained(stage: Stage, n: int, depth: int, label: str) -> None:
    statuses = stage.statuses()
    if statuses != {"published": n}:
        raise RuntimeError(f"{label}: expected {n} published, the table holds {statuses}")
    if depth != n:
        print(f"    note: {label}: the queue held {depth} messages for {n} rows", flush=True)


async def phase_drain(stage: Stage, n: int, rounds: int, timeout: float) -> list[DrainRow]:
    print(f"\n== 1. drain of {n} pre-filled rows, one relay ==", flush=True)
    results = []
    for variant in ("keyless", "keyed", "mixed"):
        row = DrainRow(variant)
        rows = make_rows(n, variant)
        envelopes = envelopes_of(rows)

        async def relay_drain(mode: str, label: str, rows: list[dict[str, Any]] = rows) -> Drain:
            await purge(stage)
            await asyncio.to_thread(stage.truncate)
            await asyncio.to_thread(stage.insert, rows)
            await asyncio.to_thread(stage.analyze)
            if mode == "in-process":
                d = await drain_in_process(stage, label, n, timeout)
            else:
                d = await asyncio.to_thread(drain_subprocess, stage, label, n, timeout)
            depth = await purge(stage)
            _check_drained(stage, n, depth, label)
            return d

        async def raw_publish(
            publish: Callable[[Stage, Sequence[Envelope]], Awaitable[Raw]],
            envelopes: list[Envelope] = envelopes,
        ) -> Raw:
            await purge(stage)
            raw = await publish(stage, envelopes)
            depth = await purge(stage)
            if depth != n:
                print(f"    note: {raw.label}: the queue held {depth} for {n}", flush=True)
            return raw

        for r in range(rounds):
            for step in ("aio-pika", "in-process", "subprocess", "aiormq"):
                if step in ("aio-pika", "aiormq"):
                    publish = raw_aio_pika if step == "aio-pika" else raw_aiormq
                    raw = await steady(
                        stage, f"{variant} raw {step}", partial(raw_publish, publish)
                    )
                    (row.aio_pika if step == "aio-pika" else row.aiormq).append(raw)
                    print(f"  [{r + 1}] {variant + ' ' + raw.label:<24} {raw.rate:6.0f} msg/s")
                    print(f"        cpu: {raw.cpu.show()}", flush=True)
                    continue
                label = f"{variant} relay {step}"
                d = await steady(stage, label, partial(relay_drain, step, label))
                (row.in_process if step == "in-process" else row.subprocess).append(d)
                start = f"{d.from_start:6.0f} msg/s from start, " if d.from_start else ""
                print(f"  [{r + 1}] {label:<24} {start}{d.from_ready:6.0f} msg/s from ready")
                print(f"        cpu: {d.cpu.show()}", flush=True)
        results.append(row)
    await asyncio.to_thread(stage.truncate)
    return results


def _med(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def other_load(row: DrainRow) -> float:
    """Mean CPU of other processes during a variant's measurements, % of one core."""
    shares = [d.cpu.other for d in (*row.in_process, *row.subprocess)]
    shares += [r.cpu.other for r in (*row.aio_pika, *row.aiormq)]
    return statistics.fmean(shares)


def print_drain(results: list[DrainRow], target: float) -> None:
    n = results[0].aio_pika[0].messages
    print(f"\ndrain of {n} rows, msg/s (median of rounds):")
    header = (
        f"{'variant':<8} {'in-proc start':>13} {'in-proc ready':>13} {'subproc':>8} "
        f"{'aio-pika':>9} {'aiormq':>8}  {'in-proc/aio-pika':>16} {'subproc/aio-pika':>16} "
        f"{'subproc/aiormq':>14}  {'other load':>10}"
    )
    print(header)
    print("-" * len(header))
    worst = None
    for row in results:
        ip_start = _med([d.from_start for d in row.in_process])
        ip_ready = _med([d.from_ready for d in row.in_process])
        sub = _med([d.from_ready for d in row.subprocess])
        pika = _med([r.rate for r in row.aio_pika])
        rmq = _med([r.rate for r in row.aiormq])
        if not (ip_start and ip_ready and sub and pika and rmq):
            raise RuntimeError(f"{row.variant}: a measurement is missing")
        print(
            f"{row.variant:<8} {ip_start:>13.0f} {ip_ready:>13.0f} {sub:>8.0f} {pika:>9.0f} "
            f"{rmq:>8.0f}  {ip_start / pika:>16.2f} {sub / pika:>16.2f} {sub / rmq:>14.2f}"
            f"  {other_load(row):>9.0f}%"
        )
        ratio = max(ip_start, sub) / pika
        worst = ratio if worst is None else min(worst, ratio)
    print("\nCPU per message, us (median; relay process / its PG backends / RabbitMQ):")
    for row in results:
        cells = []
        for label, ds in (("in-proc", row.in_process), ("subproc", row.subprocess)):
            d = ds[0]
            cells.append(
                f"{label} {d.cpu.per_message_us(d.cpu.relay, n):4.0f} / "
                f"{d.cpu.per_message_us(d.cpu.relay_pg, n):3.0f} / "
                f"{d.cpu.per_message_us(d.cpu.rabbit, n):3.0f}"
            )
        raw = row.aio_pika[0]
        cells.append(
            f"aio-pika {raw.cpu.per_message_us(raw.cpu.relay, n):4.0f} / - / "
            f"{raw.cpu.per_message_us(raw.cpu.rabbit, n):3.0f}"
        )
        print(f"  {row.variant:<8} " + "   ".join(cells))
    print("  other load: CPU of processes other than relay, PostgreSQL, RabbitMQ, this one")
    if worst is not None:
        verdict = "meets" if worst >= target else "MISSES"
        print(
            f"\nworst relay/raw aio-pika (best relay mode per variant) = {worst:.2f}: "
            f"{verdict} the target >= {target:.2f}"
        )


# --------------------------------------------------------------------------- phase 2: latency


@dataclass
class Latency:
    label: str
    sent: int
    received: int
    rate: float
    ms: list[float]
    cpu: CpuShare
    problems: list[str] = field(default_factory=list)

    def pct(self, q: float) -> float:
        ordered = sorted(self.ms)
        return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


async def measure_latency(
    stage: Stage, relay: RelayProcess, label: str, variant: str, seconds: float, rate: float
) -> Latency:
    """Produce at ``rate`` for ``seconds`` through the running ``relay``; time each message.

    A producer process commits one message per transaction; an aio-pika consumer on
    its own connection (auto-ack) records when each arrives.
    """
    total = round(seconds * rate)
    received: dict[str, float] = {}
    all_in = asyncio.Event()

    async def on_message(message: AbstractIncomingMessage) -> None:
        received[str(message.message_id)] = time.time()
        if len(received) >= total:
            all_in.set()

    await purge(stage)
    producer = await asyncio.to_thread(ProducerProcess, stage, total, rate, 1, variant, 0)
    connection = await aio_pika.connect(stage.amqp_url)
    try:
        async with connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=1000)
            queue = await channel.get_queue(stage.queue)
            await queue.consume(on_message, no_ack=True)
            meter = CpuMeter(stage.admin, relay.pid, [producer.pid]).start()
            producer.go()
            elapsed, committed = await asyncio.to_thread(producer.result)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_in.wait(), 15)
            cpu = await asyncio.to_thread(meter.stop)
    finally:
        producer.kill()
    skip = round(rate)  # the first second: connections and caches warming up
    order = sorted(committed.items(), key=lambda kv: kv[1])[skip:]
    ms = [(received[mid] - t) * 1000 for mid, t in order if mid in received]
    got = sum(1 for mid in committed if mid in received)
    return Latency(label, len(committed), got, len(committed) / elapsed, ms, cpu)


async def latency_run(
    stage: Stage, label: str, variant: str, env: dict[str, str], seconds: float, rate: float
) -> Latency:
    """One latency run on an empty table with a relay subprocess of its own."""
    await asyncio.to_thread(stage.truncate)
    relay = RelayProcess(stage, env)
    try:
        await asyncio.to_thread(relay.start)
        await asyncio.sleep(1.0)  # let the relay settle into idle polling
        result = await measure_latency(stage, relay, label, variant, seconds, rate)
    finally:
        await asyncio.to_thread(relay.stop)
    result.problems = relay.problems()
    if result.received < result.sent:
        lost = result.sent - result.received
        result.problems.append(f"{lost} committed messages not received within 15 s")
    return result


async def phase_latency(
    stage: Stage, seconds: float, rate: float, runs: Sequence[tuple[str, str, dict[str, str]]]
) -> list[Latency]:
    print(f"\n== 2. commit-to-received latency, {rate:g} msg/s for {seconds:g} s ==", flush=True)
    results = []
    for label, variant, env in runs:
        run = partial(latency_run, stage, label, variant, env, seconds, rate)
        result = await steady(stage, label, run)
        problems = result.problems
        results.append(result)
        print(
            f"  {label:<34} p50 {result.pct(50):6.2f}  p90 {result.pct(90):6.2f}  "
            f"p99 {result.pct(99):6.2f}  max {max(result.ms):7.2f} ms  ({result.received}/"
            f"{result.sent} received, {result.rate:.0f} msg/s committed)"
            f"{'  PROBLEMS: ' + problems[0] if problems else ''}",
            flush=True,
        )
        print(f"        cpu: {result.cpu.show()}", flush=True)
    await purge(stage)
    return results


def print_latency(results: list[Latency], p50_target: float, p99_target: float) -> None:
    print("\ncommit-to-received latency, ms (first second excluded):")
    header = (
        f"{'run':<34} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>8} {'mean':>7} "
        f"{'lost':>5} {'relay CPU':>9} {'+its PG':>8} {'other load':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.label:<34} {r.pct(50):>7.2f} {r.pct(90):>7.2f} {r.pct(99):>7.2f} "
            f"{max(r.ms):>8.2f} {statistics.fmean(r.ms):>7.2f} {r.sent - r.received:>5} "
            f"{r.cpu.relay:>8.1f}% {r.cpu.relay_pg:>7.1f}% {r.cpu.other:>9.0f}%"
        )
    for r in results:
        ok = r.pct(50) <= p50_target and r.pct(99) <= p99_target
        print(
            f"  {r.label}: {'meets' if ok else 'MISSES'} the target p50 <= {p50_target:g} ms, "
            f"p99 <= {p99_target:g} ms"
        )


# --------------------------------------------------------------------------- phase 3: snapshot


@dataclass
class SnapshotArm:
    label: str
    first: Drain  # pre-filled half plus the half produced during the drain
    second: Drain  # N committed at once, with the first drain's dead versions present
    latency: Latency  # then a steady trickle, same relay, same snapshot
    producer_rate: float
    stats: dict[str, Any]
    idle_plan: list[str]  # the claim when nothing is due: what every idle poll costs
    plan: list[str]  # the claim of a full batch
    holder_xmin: object = None

    @property
    def problems(self) -> list[str]:
        return self.first.problems + self.second.problems


def explain_claim(stage: Stage, fresh: Sequence[dict[str, Any]]) -> list[str]:
    """EXPLAIN (ANALYZE, BUFFERS) the relay's claim over ``fresh`` due rows, rolled back."""
    store = RelayStore(stage.engine, "bench-explain")  # type: ignore[arg-type]
    compiled = store._claim.compile(dialect=stage.engine.dialect)
    config = RelayConfig(database_url=stage.relay_url)
    params = {**compiled.params, "limit": config.batch_size, "lease": config.lease}
    with stage.engine.connect() as conn:
        if fresh:
            with conn.begin():
                conn.execute(sa.insert(outbox_table), list(fresh))
        with conn.begin() as tx:
            plan = [
                str(line)
                for (line,) in conn.exec_driver_sql(
                    f"EXPLAIN (ANALYZE, BUFFERS) {compiled.string}", params
                )
            ]
            tx.rollback()
    return plan


def open_snapshot(stage: Stage) -> psycopg.Connection[Any]:
    """Another session holding a REPEATABLE READ snapshot open (until ROLLBACK)."""
    holder = psycopg.connect(libpq_url(stage.url("snapshot")), autocommit=True)
    holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    holder.execute("SELECT 1 FROM outbox_message LIMIT 1")
    return holder


async def snapshot_arm(
    stage: Stage, label: str, n: int, hold: bool, timeout: float, seconds: float, rate: float
) -> SnapshotArm:
    """(a) drain N/2 pre-filled + N/2 produced meanwhile; (b) drain N more; (c) latency."""
    await asyncio.to_thread(stage.truncate)
    half = n // 2
    prefill = make_rows(half, "keyless")
    producer = await asyncio.to_thread(
        ProducerProcess, stage, n - half, PRODUCE_RATE, 100, "keyless", half
    )
    holder = await asyncio.to_thread(open_snapshot, stage) if hold else None
    relay = RelayProcess(stage)
    try:
        await asyncio.to_thread(stage.insert, prefill)
        await asyncio.to_thread(stage.analyze)
        ready = await asyncio.to_thread(relay.start)
        meter = CpuMeter(stage.admin, relay.pid, [producer.pid]).start()
        producer.go()
        done = await asyncio.to_thread(stage.wait_published, n, timeout, relay.check_alive)
        cpu = await asyncio.to_thread(meter.stop)
        elapsed, _ = await asyncio.to_thread(producer.result)
        first = Drain(f"{label} (a)", n, None, ready, done, cpu)

        second_rows = make_rows(n, "keyless", first=n)
        meter = CpuMeter(stage.admin, relay.pid).start()
        ready = await asyncio.to_thread(stage.insert, second_rows)
        done = await asyncio.to_thread(stage.wait_published, 2 * n, timeout, relay.check_alive)
        cpu = await asyncio.to_thread(meter.stop)
        second = Drain(f"{label} (b)", n, None, ready, done, cpu)

        latency = await measure_latency(stage, relay, f"{label} (c)", "keyless", seconds, rate)
        xmin = None
        if holder is not None:
            found = holder.execute(
                "SELECT backend_xmin FROM pg_stat_activity WHERE pid = pg_backend_pid()"
            ).fetchone()
            xmin = found[0] if found else None
        await asyncio.to_thread(relay.stop)
        second.problems = relay.problems()
        stats = await asyncio.to_thread(stage.table_stats)
        idle_plan = await asyncio.to_thread(explain_claim, stage, [])
        plan = await asyncio.to_thread(
            explain_claim, stage, make_rows(WINDOW, "keyless", first=3 * n)
        )
    finally:
        await asyncio.to_thread(relay.stop)
        producer.kill()
        if holder is not None:
            holder.execute("ROLLBACK")
            holder.close()
    return SnapshotArm(
        label, first, second, latency, (n - half) / elapsed, stats, idle_plan, plan, xmin
    )


async def phase_snapshot(
    stage: Stage, n: int, timeout: float, seconds: float, rate: float, verbose: bool
) -> list[SnapshotArm]:
    print(
        f"\n== 3. open snapshot: keyless drains of {n} rows, then {rate:g} msg/s for "
        f"{seconds:g} s, with and without a REPEATABLE READ transaction held open ==",
        flush=True,
    )
    arms = []
    for label, hold in (("no open snapshot", False), ("open REPEATABLE READ snapshot", True)):
        run = partial(snapshot_arm, stage, label, n, hold, timeout, seconds, rate)
        arm = await steady(stage, label, run)
        await purge(stage)
        arms.append(arm)
        for d in (arm.first, arm.second):
            print(f"  {d.label:<36} {d.from_ready:6.0f} msg/s", flush=True)
            print(f"        cpu: {d.cpu.show()}", flush=True)
        lat = arm.latency
        print(
            f"  {lat.label:<36} p50 {lat.pct(50):.2f}  p99 {lat.pct(99):.2f}  "
            f"max {max(lat.ms):.2f} ms  ({lat.received}/{lat.sent} received)"
        )
        print(f"        cpu: {lat.cpu.show()}", flush=True)
        print(f"        producer committed {arm.producer_rate:.0f} msg/s during (a)")
        if arm.holder_xmin is not None:
            print(f"        the open transaction held backend_xmin {arm.holder_xmin}")
        print(f"        table after (c): {arm.stats}")
        for title, plan in (("idle claim", arm.idle_plan), (f"{WINDOW}-row claim", arm.plan)):
            print(f"        {title}: {plan_summary(plan)}")
            if verbose:
                for line in plan:
                    print(f"            {line}")
    await asyncio.to_thread(stage.truncate)
    return arms


def plan_summary(plan: Sequence[str]) -> str:
    """The due-index scan of a claim plan (time, rows, buffers) and the execution time."""
    out = []
    for i, line in enumerate(plan):
        if "ix_outbox_message_due" in line and "actual time" in line:
            actual = line.split("(actual ", 1)[1].rstrip(")")
            buffers = plan[i + 1].strip() if i + 1 < len(plan) else ""
            if "Filter" in buffers or "Index Cond" in buffers:
                buffers = next((x.strip() for x in plan[i + 1 :] if "Buffers" in x), "")
            out.append(f"due-index scan {actual}, {buffers}")
        if line.startswith("Execution Time"):
            out.append(line)
    return "; ".join(out)


def arm_other(arm: SnapshotArm) -> float:
    return statistics.fmean(x.cpu.other for x in (arm.first, arm.second, arm.latency))


def print_snapshot(arms: list[SnapshotArm], n: int, target: float) -> None:
    base, held = arms
    print("\nopen snapshot, keyless, msg/s (drains) and ms (trickle):")
    header = (
        f"{'arm':<30} {'(a) +produce':>12} {'(b) 2nd drain':>13} {'(c) p50':>8} "
        f"{'(c) p99':>8} {'(c) PG CPU':>10} {'idle claim':>10} {'producer':>8} {'other':>6}"
    )
    print(header)
    print("-" * len(header))
    for arm in arms:
        idle = next((x for x in arm.idle_plan if x.startswith("Execution Time")), "")
        print(
            f"{arm.label:<30} {arm.first.from_ready:>12.0f} {arm.second.from_ready:>13.0f} "
            f"{arm.latency.pct(50):>8.2f} {arm.latency.pct(99):>8.2f} "
            f"{arm.latency.cpu.relay_pg:>9.0f}% {idle.split(':')[-1].strip():>10} "
            f"{arm.producer_rate:>8.0f} {arm_other(arm):>5.0f}%"
        )
    ra = held.first.from_ready / base.first.from_ready
    rb = held.second.from_ready / base.second.from_ready
    print(f"{'ratio held/none':<30} {ra:>12.2f} {rb:>13.2f}")
    verdict = "meets" if min(ra, rb) >= target else "MISSES"
    print(f"  worst drain ratio {min(ra, rb):.2f}: {verdict} the target >= {target:.2f}")
    print("  (c) PG CPU: the relay's PostgreSQL backends, % of one core, during the trickle")
    print("  idle claim: execution time of the claim with nothing due (what each idle poll costs)")
    print("  producer: msg/s it committed during (a); other: mean load of other processes")


# --------------------------------------------------------------------------- publishing paths


async def phase_publish(stage: Stage, n: int, rounds: int) -> list[tuple[str, list[Raw]]]:
    """The same keyless messages published four ways; CPU per message of this process."""
    print(f"\n== publishing paths: {n} messages, windows of {WINDOW}, one channel ==", flush=True)
    envelopes = envelopes_of(make_rows(n, "keyless"))
    paths: list[tuple[str, Callable[[Stage, Sequence[Envelope]], Awaitable[Raw]]]] = [
        ("aio_pika.Message + Exchange.publish", raw_aio_pika),
        ("aiormq basic_publish", partial(raw_aiormq, label="basic_publish")),
        ("aiormq basic_publish, wait=False", partial(raw_aiormq, wait=False, label="no wait")),
        ("one write per window (prototype)", partial(raw_aiormq, one_write=True, label="one")),
    ]
    results: dict[str, list[Raw]] = {label: [] for label, _ in paths}
    for r in range(rounds):
        for label, publish in paths:

            async def measure(
                publish: Callable[[Stage, Sequence[Envelope]], Awaitable[Raw]] = publish,
            ) -> Raw:
                await purge(stage)
                raw = await publish(stage, envelopes)
                depth = await purge(stage)
                if depth != n:
                    print(f"    note: {raw.label}: the queue held {depth} for {n}", flush=True)
                return raw

            raw = await steady(stage, label, measure)
            results[label].append(raw)
            us = raw.cpu.per_message_us(raw.cpu.relay, n)
            print(f"  [{r + 1}] {label:<36} {raw.rate:6.0f} msg/s  {us:4.0f} us/msg", flush=True)
    return list(results.items())


def print_publish(results: list[tuple[str, list[Raw]]]) -> None:
    print("\npublishing paths (medians; CPU us per message of the publishing process):")
    header = f"{'path':<36} {'msg/s':>6} {'CPU':>5} {'RabbitMQ':>8} {'other':>6}"
    print(header)
    print("-" * len(header))
    for label, raws in results:
        n = raws[0].messages
        rate = statistics.median(r.rate for r in raws)
        cpu = statistics.median(r.cpu.per_message_us(r.cpu.relay, n) for r in raws)
        rabbit = statistics.median(r.cpu.per_message_us(r.cpu.rabbit, n) for r in raws)
        other = statistics.fmean(r.cpu.other for r in raws)
        print(f"{label:<36} {rate:>6.0f} {cpu:>5.0f} {rabbit:>8.0f} {other:>5.0f}%")


# --------------------------------------------------------------------------- experiments
#
# The relay as it is against earlier versions of its publishing path and keyed read,
# patched into this process only; drains run in-process so that the patches apply.


async def _publish_window_aio_pika(
    self: Any, session: Any, envelopes: Sequence[Envelope], ids: list[str], deadline: float
) -> list[Any]:
    """The earlier publishing path: an ``aio_pika.Message`` and ``Exchange.publish`` per
    message, each under its own ``asyncio.timeout``, its id guarded by an ``Event``."""
    in_flight: dict[str, asyncio.Event] = {}

    async def one(envelope: Envelope) -> object:
        message = aio_pika.Message(envelope.body, **envelope.amqp_properties(self._wire))
        while (earlier := in_flight.get(envelope.message_id)) is not None:
            await earlier.wait()
        done = in_flight[envelope.message_id] = asyncio.Event()
        try:
            async with asyncio.timeout(self._confirm_timeout):
                return await session.exchange.publish(message, envelope.topic, mandatory=True)
        finally:
            del in_flight[envelope.message_id]
            done.set()

    answers = await asyncio.gather(*(one(e) for e in envelopes), return_exceptions=True)
    return [self._result(e, a) for e, a in zip(envelopes, answers, strict=True)]


# The earlier keyed read: every pending keyed row of the shards numbered per key and
# sorted with its payload on every round (``held`` added so that it fits today's loop).
KEYED_FULL = text(
    "SELECT id, message_id, topic, key, payload, content_type, headers, created_at, attempts"
    " FROM (SELECT *, row_number() OVER (PARTITION BY key ORDER BY id) AS rn,"
    "  first_value(next_attempt_at) OVER (PARTITION BY key ORDER BY id) AS head_due"
    "  FROM outbox_message WHERE status = 'pending' AND key IS NOT NULL"
    "  AND shard = ANY(:shards) AND key <> ALL(:held)) k"
    " WHERE rn <= :lookahead AND head_due <= now() ORDER BY id LIMIT :limit"
)


async def _fetch_keyed_full(
    self: Any,
    conn: Any,
    shards: Sequence[int],
    limit: int,
    lookahead: int,
    held: Collection[str] = (),
) -> list[Any]:
    from relay.store import _row

    params = {"shards": list(shards), "held": list(held), "limit": limit, "lookahead": lookahead}
    return [_row(r, counted=False) for r in await conn.execute(KEYED_FULL, params)]


@contextlib.contextmanager
def patched(owner: object, name: str, value: object) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


@dataclass
class Experiment:
    label: str
    drains: list[Drain] = field(default_factory=list)

    def show(self) -> str:
        n = self.drains[0].messages
        rate = statistics.median(d.from_ready for d in self.drains)
        relay = statistics.median(d.cpu.per_message_us(d.cpu.relay, n) for d in self.drains)
        pg = statistics.median(d.cpu.per_message_us(d.cpu.relay_pg, n) for d in self.drains)
        other = statistics.fmean(d.cpu.other for d in self.drains)
        return (
            f"{self.label:<46} {rate:>6.0f} {relay:>9.0f} {pg:>6.0f} {other:>5.0f}%"
            f"  ({len(self.drains)} drains)"
        )


async def phase_experiments(stage: Stage, n: int, rounds: int, timeout: float) -> list[Experiment]:
    from outbox.rabbitmq import RabbitMQBroker

    print(f"\n== experiments: earlier versions patched in-process, {rounds} rounds ==", flush=True)
    publish = (RabbitMQBroker, "_publish_window")
    read = (RelayStore, "fetch_keyed")
    arms: list[tuple[str, str, int, tuple[object, str], object]] = [
        (f"keyless {n}: relay as is", "keyless", n, publish, None),
        (f"keyless {n}: earlier publishing path", "keyless", n, publish, _publish_window_aio_pika),
        (f"keyed {n}: read as is", "keyed", n, read, None),
        (f"keyed {n}: earlier full read", "keyed", n, read, _fetch_keyed_full),
        (f"keyed {3 * n}: read as is", "keyed", 3 * n, read, None),
        (f"keyed {3 * n}: earlier full read", "keyed", 3 * n, read, _fetch_keyed_full),
    ]
    results = {label: Experiment(label) for label, *_ in arms}
    rows = {(v, size): make_rows(size, v) for _, v, size, *_ in arms}
    for r in range(rounds):
        for label, variant, size, (owner, name), value in arms if r % 2 == 0 else arms[::-1]:

            async def measure(
                label: str = label,
                key: tuple[str, int] = (variant, size),
                owner: object = owner,
                name: str = name,
                value: object = value,
            ) -> Drain:
                await purge(stage)
                await asyncio.to_thread(stage.truncate)
                await asyncio.to_thread(stage.insert, rows[key])
                await asyncio.to_thread(stage.analyze)
                with patched(owner, name, value or getattr(owner, name)):
                    d = await drain_in_process(stage, label, key[1], timeout)
                depth = await purge(stage)
                _check_drained(stage, key[1], depth, label)
                return d

            d = await steady(stage, label, measure)
            results[label].drains.append(d)
            print(f"  [{r + 1}] {label:<46} {d.from_ready:6.0f} msg/s", flush=True)
    for pending in (n, 3 * n):
        for line in await asyncio.to_thread(explain_keyed, stage, pending):
            print(f"  {line}", flush=True)
    await asyncio.to_thread(stage.truncate)
    return list(results.values())


def explain_keyed(stage: Stage, pending: int) -> list[str]:
    """Execution time of the keyed read as is and of the earlier full read, ``pending`` rows."""
    config = RelayConfig(database_url=stage.relay_url)
    params: dict[str, Any] = {
        "shards": list(range(SHARD_COUNT)),
        "held": [],
        "limit": config.batch_size,
        "lookahead": config.key_lookahead,
    }
    store = RelayStore(stage.engine, "bench-explain")  # type: ignore[arg-type]
    compiled = store._keyed.compile(dialect=stage.engine.dialect)
    full = KEYED_FULL.compile(dialect=stage.engine.dialect)
    # The first prefix the relay reads, rows per shard (it reads further only if that gives
    # too little).
    part = -(-config.batch_size * _PREFIX_BATCHES // SHARD_COUNT)
    statements = {
        "as is": (compiled.string, {**compiled.params, **params, "part": part}),
        "earlier full read": (full.string, params),
    }
    stage.truncate()
    stage.insert(make_rows(pending, "keyed"))
    stage.analyze()
    out = []
    with stage.engine.connect() as conn:
        for label, (sql, values) in statements.items():
            times, sorts = [], []
            for _ in range(3):
                plan = [str(x) for (x,) in conn.exec_driver_sql(f"EXPLAIN ANALYZE {sql}", values)]
                conn.rollback()
                times.append(float(plan[-1].split(":")[1].split()[0]))
                sorts = [x.strip() for x in plan if "Sort Method" in x]
            out.append(
                f"keyed read, {pending} pending keyed rows, {label}: "
                f"{statistics.median(times):.1f} ms (median of 3); {'; '.join(sorts)}"
            )
    stage.truncate()
    return out


def print_experiments(results: list[Experiment]) -> None:
    print("\nexperiments (in-process drains; medians; us per message):")
    header = f"{'arm':<46} {'msg/s':>6} {'relay CPU':>9} {'its PG':>6} {'other':>6}"
    print(header)
    print("-" * len(header))
    for e in results:
        print(e.show())


# --------------------------------------------------------------------------- main


def print_machine(stage: Stage, rabbit_version: str) -> None:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    before = machine_busy()
    time.sleep(1.0)
    after = machine_busy()
    busy = (after[0] - before[0]) / (after[1] - before[1]) * 100
    with stage.admin.connect() as conn:
        version = conn.execute(text("SELECT version()")).scalar_one()
        settings = {
            name: conn.execute(text(f"SHOW {name}")).scalar_one()
            for name in ("synchronous_commit", "shared_buffers", "autovacuum")
        }
    print("machine:")
    print(f"  nproc               {len(os.sched_getaffinity(0))} {model}")
    print(f"  load average        {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    warn = "  <- not idle: other work will skew the figures" if busy > 10 else ""
    print(f"  CPU busy before run {busy:.0f}%{warn}")
    print(f"  PostgreSQL          {version}")
    print(f"  PG settings         {settings}")
    print(f"  RabbitMQ            {rabbit_version}")
    print(
        f"  Python {platform.python_version()}, "
        + ", ".join(f"{d} {dist_version(d)}" for d in ("aio-pika", "aiormq", "SQLAlchemy"))
        + f", psycopg {psycopg.__version__}"
    )


# --------------------------------------------------------------------------- sweep and report


async def phase_sweep(
    stage: Stage, seconds: float, rates: Sequence[float]
) -> list[dict[str, float]]:
    """Latency percentiles at each offered load (keyless, default relay): the latency plot."""
    print(f"\n== latency sweep, {seconds:g} s per load: {', '.join(f'{r:g}' for r in rates)} ==")
    points = []
    for rate in rates:
        label = f"keyless at {rate:g} msg/s"
        run = partial(latency_run, stage, label, "keyless", {}, seconds, rate)
        result = await steady(stage, label, run)
        point = {
            "rate": rate,
            "committed_rate": result.rate,
            "p50": result.pct(50),
            "p90": result.pct(90),
            "p99": result.pct(99),
            "max": max(result.ms),
            "lost": float(result.sent - result.received),
        }
        points.append(point)
        print(
            f"  {label:<24} p50 {point['p50']:6.2f}  p90 {point['p90']:6.2f}  "
            f"p99 {point['p99']:6.2f}  max {point['max']:7.2f} ms",
            flush=True,
        )
    await purge(stage)
    return points


def figures_of(
    drains: list[DrainRow] | None,
    latencies: list[Latency] | None,
    arms: list[SnapshotArm] | None,
    n: int,
    rate: float,
) -> list[Figure]:
    """The figures benchmarks/run reports, with the targets of the relay's issue."""
    found: list[Figure] = []
    for row in drains or []:
        start = _med([d.from_start for d in row.in_process]) or 0.0
        sub = _med([d.from_ready for d in row.subprocess]) or 0.0
        found.append(
            Figure(
                name=f"relay drain of {n} rows, {row.variant} (best of in-process, subprocess)",
                value=max(start, sub),
                unit="msg/s",
                baseline_name="raw aio-pika confirmed publish",
                baseline=_med([r.rate for r in row.aio_pika]),
                target=0.85,
            )
        )
    for r in latencies or []:
        for q, target in ((50, 5.0), (99, 25.0)):
            found.append(
                Figure(
                    name=f"relay commit-to-consumer p{q}, {r.label}, {rate:g} msg/s",
                    value=r.pct(q),
                    unit="ms",
                    target=target,
                    lower_is_better=True,
                )
            )
    if arms:
        base, held = arms
        for what, a, b in (
            ("while producing", held.first, base.first),
            ("second drain", held.second, base.second),
        ):
            found.append(
                Figure(
                    name=f"relay drain with a snapshot held open, {what}",
                    value=a.from_ready,
                    unit="msg/s",
                    baseline_name="the same with no snapshot held",
                    baseline=b.from_ready,
                    target=0.8,
                )
            )
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--database-url", default=os.environ.get("OUTBOX_BENCH_URL", DEFAULT_DB))
    parser.add_argument("--amqp-url", default=os.environ.get("OUTBOX_BENCH_AMQP_URL", DEFAULT_AMQP))
    parser.add_argument("--messages", type=int, default=20_000, help="rows per drain (20000)")
    parser.add_argument("--latency-seconds", type=float, default=20.0, help="per run (20)")
    parser.add_argument("--rate", type=float, default=200.0, help="latency producer msg/s (200)")
    parser.add_argument("--rounds", type=int, default=1, help="drain rounds; median (1)")
    parser.add_argument(
        "--phases",
        default="drain,latency,snapshot",
        help=(
            "comma-separated; also: experiments (earlier versions against today's, ~4 min), "
            "publish (four ways to publish a confirm window, ~1 min)"
        ),
    )
    parser.add_argument("--timeout", type=float, default=180.0, help="per drain, seconds")
    parser.add_argument("--quick", action="store_true", help="2000 messages, 5 s latency runs")
    parser.add_argument("--verbose", action="store_true", help="print the claim plans in full")
    parser.add_argument("--schema", default=f"bench_relay_{os.getpid()}")
    parser.add_argument(
        "--sweep",
        default="50,200,500,1000",
        help="offered loads, msg/s, of the latency sweep (phase sweep; docs/latency.png)",
    )
    parser.add_argument("--json", help="also write the figures to this file (benchmarks/run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.messages = min(args.messages, 2000)
        args.latency_seconds = min(args.latency_seconds, 5.0)
        if args.sweep == parser.get_default("sweep"):
            args.sweep = "100,400"
    return args


async def run(args: argparse.Namespace) -> int:
    name = args.schema
    stage = Stage(args.database_url, args.amqp_url, name, name, f"{name}.all")
    phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    rabbit_version = await broker_setup(stage)
    try:
        print_machine(stage, rabbit_version)
        print(
            f"\nschema {stage.schema}, exchange {stage.exchange}, queue {stage.queue}; "
            f"{args.messages} messages of {len(_PRODUCER.config.codec.encode(payload(0)))} "
            f"bytes; relay defaults (batch_size 500, keyless_workers 2, poll 2-100 ms)",
            flush=True,
        )
        await asyncio.to_thread(stage.create)
        started = time.perf_counter()
        drains = latencies = arms = None
        if "drain" in phases:
            drains = await phase_drain(stage, args.messages, args.rounds, args.timeout)
        if "latency" in phases:
            runs = [
                ("keyless, default poll (2-100 ms)", "keyless", {}),
                ("keyless, poll_min 1 ms", "keyless", {"OUTBOX_POLL_MIN": "1ms"}),
                ("keyed, default poll (2-100 ms)", "keyed", {}),
            ]
            latencies = await phase_latency(stage, args.latency_seconds, args.rate, runs)
        if "snapshot" in phases:
            arms = await phase_snapshot(
                stage,
                args.messages,
                args.timeout,
                min(args.latency_seconds, 10.0),
                args.rate,
                args.verbose,
            )
        sweep = None
        if "sweep" in phases:
            rates = [float(r) for r in args.sweep.split(",") if r.strip()]
            sweep = await phase_sweep(stage, min(args.latency_seconds, 10.0), rates)
        publish_paths = None
        if "publish" in phases:
            publish_paths = await phase_publish(stage, args.messages, max(args.rounds, 2))
        experiments = None
        if "experiments" in phases:
            experiments = await phase_experiments(
                stage, args.messages, max(args.rounds, 2), args.timeout
            )
        print("\n" + "=" * 30 + " summary " + "=" * 30)
        if drains:
            print_drain(drains, 0.85)
        if latencies:
            print_latency(latencies, 5.0, 25.0)
        if arms:
            print_snapshot(arms, args.messages, 0.8)
        if publish_paths:
            print_publish(publish_paths)
        if experiments:
            print_experiments(experiments)
        if args.json:
            write_json(
                args.json,
                "relay",
                figures_of(drains, latencies, arms, args.messages, args.rate),
                messages=args.messages,
                latency_sweep=sweep,
            )
        print(f"\ntotal {time.perf_counter() - started:.0f} s")
    finally:
        with contextlib.suppress(Exception):
            await wait_broker(stage, timeout=60)
            await broker_teardown(stage)
        await asyncio.to_thread(stage.drop)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("WARNING", json=False)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
