"""Consumer throughput against raw aio-pika consumers measured in the same run.

Everything runs against the real PostgreSQL and RabbitMQ, in a schema, an exchange
and a queue prefix of its own, removed at the end. Before every measurement N
messages (about 200-byte JSON payloads, fresh message ids, the relay's wire format:
``Envelope(...).amqp_properties(WireFormat(...))``) are published with confirms to
the group's queue (``<prefix>.bench``, declared as the ``Consumer`` declares it,
quorum by default), and ``effect`` and ``outbox_inbox`` are emptied. Each
measurement then consumes the queue until every message is acknowledged, and
checks that ``effect`` holds one row per message:

(a)  **raw ack**: an aio-pika consumer (same prefetch) that only acks;
(b)  **raw + INSERT**: the same consumer handing each message to a pool of
     ``concurrency`` threads (an ``asyncio.Semaphore`` of ``concurrency`` slots and a
     task per message, as the framework does) that ``json.loads`` the body and run
     ``INSERT INTO effect`` and ``COMMIT`` on a psycopg connection of their own (opened
     beforehand), then ack: the database cost a hand-written consumer cannot avoid;
(c)  **Consumer**: the framework's ``Consumer`` (in this process, inbox dedupe on,
     default options: receipts on when this version has them) with one sync handler
     doing the same INSERT through its session, at each ``--settings`` pair of
     ``ConsumerConfig(prefetch=, concurrency=)``; with receipts, once more without;
     once with an ``async def`` handler (AsyncSession, no threads; N/2 messages); and
     once with a handler that writes nothing (the framework's own cost: inbox rows,
     commit, acks, receipts).

With ``--processes K``, (a) and (c) at the first setting run once more in K worker
processes of this script sharing the queue (the way a group scales across cores):
the rate runs from the first worker's first delivery to the last worker's last ack,
``me`` is the workers' CPU over that time, and the Consumer's figure is also given
against the raw consumer in as many processes.

Then (unless ``--no-ladder``, with N/2 messages each) raw variants take (c) apart,
each adding one thing: the thread handoff of a no-op; a SQLAlchemy ``Session`` +
INSERT + commit; plus the framework's inbox INSERT. And a **batch prototype** (here,
not in ``consumer/``): W workers each take what the prefetch window holds (up to a
maximum), run the batch in one transaction with one COMMIT, then ack: with a
SAVEPOINT per message (inbox row + handler); without SAVEPOINTs; and with one
multi-row inbox INSERT for the batch (the last two optimistic: a failure reruns the
batch one transaction per message).

Unit costs (one thread, no broker) give each step of the handler path in
microseconds, and (``--profile``, on unless ``--quick`` or ``--no-profile``) the
Consumer runs once more under ``py-spy`` (``pip install py-spy``; this process
sampled with and without ``--gil``), the samples grouped by where they are.

Rates are taken from the first delivery seen to the last ack (connecting and
declaring excluded in every arm). CPU of this process, this run's PostgreSQL
backends and RabbitMQ (shared) is read from /proc around each measurement and shown
per message, with the CPU the rest of the machine used meanwhile (other load).

    python benchmarks/consumer.py [--messages 20000] [--quick] [--rounds 1]
        [--settings 256/16,128/16] [--batch 256/4/64] [--queue-type quorum|classic]
        [--no-ladder] [--no-variants] [--no-units] [--no-profile] [--keep-profile DIR]
        [--processes 2]
        [--database-url URL] [--amqp-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import queue as queue_module
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter as Tally
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from datetime import UTC, datetime, timedelta
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import aio_pika
import psycopg
import sqlalchemy as sa
from sqlalchemy import text
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from aio_pika.abc import AbstractIncomingMessage

# Run as a script from a checkout: the project's packages come before this folder
# (which holds a ``consumer.py`` of its own).
ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(Path(__file__).resolve())
sys.path.insert(0, str(ROOT))

from report import Figure, write_json  # noqa: E402  (benchmarks/, next to this script)

import outbox  # noqa: E402
from consumer import Consumer, ConsumerConfig, IncomingMessage  # noqa: E402
from consumer.inbox import inbox_insert, inbox_row  # noqa: E402
from outbox.codec import JSON  # noqa: E402
from outbox.engines import make_engine  # noqa: E402
from outbox.envelope import Envelope, WireFormat  # noqa: E402
from outbox.logs import configure_logging, redact_url  # noqa: E402
from outbox.tables import inbox_table  # noqa: E402

DEFAULT_DB = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672/"
APP = "bench_consumer"
GROUP = "bench"
TOPIC = "bench.created"
POLL = 0.005
INSERT_EFFECT = text("INSERT INTO effect (message_id, amount) VALUES (:id, :amount)")
INSERT_EFFECT_PG = "INSERT INTO effect (message_id, amount) VALUES (%s, %s)"


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
    ticks = [int(x) for x in first[1:9]]
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


def context_switches() -> dict[int, int]:
    """Voluntary + involuntary context switches of each thread of this process so far."""
    counts: dict[int, int] = {}
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError, ValueError):
            total = 0
            for line in (task / "status").read_text().splitlines():
                if line.endswith("ctxt_switches:") or "ctxt_switches:" in line:
                    total += int(line.split(":", 1)[1])
            counts[int(task.name)] = total
    return counts


def main_thread_cpu() -> float:
    """CPU seconds of this process's main thread (the event loop's) so far."""
    fields = Path(f"/proc/self/task/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def cpu_of(pids: Sequence[int]) -> dict[int, float]:
    values = {pid: process_cpu(pid) for pid in pids}
    return {pid: v for pid, v in values.items() if v is not None}


@dataclass
class CpuShare:
    """CPU seconds used during one measurement."""

    wall: float
    me: float  # this process (consumer, baseline and poller)
    pg: float  # the PostgreSQL backends of this run's connections (application_name)
    pg_all: float  # every PostgreSQL process (other users' too, WAL writer, ...)
    rabbit: float  # the whole broker (shared with anyone else using it)
    machine: float  # everything, all cores
    switches: int = 0  # context switches of this process's threads
    loop: float = 0.0  # of ``me``: the main thread, which runs the event loop
    loop_switches: int = 0

    def pct(self, value: float) -> float:
        return value / self.wall * 100 if self.wall > 0 else 0.0

    @property
    def other(self) -> float:
        """CPU the machine spent outside this process, PostgreSQL and RabbitMQ (noise)."""
        return max(0.0, self.machine - self.me - self.pg_all - self.rabbit)


class CpuMeter:
    """Reads /proc before and after a measurement; ``stage`` finds this run's backends."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage

    def start(self) -> CpuMeter:
        self._pg0 = cpu_of(pids_named("postgres"))
        self._rabbit0 = cpu_of(pids_named("beam.smp"))
        t = os.times()
        self._me0 = t.user + t.system
        self._machine0 = machine_busy()
        self._switches0 = context_switches()
        self._loop0 = main_thread_cpu()
        self._t0 = time.perf_counter()
        return self

    def stop(self) -> CpuShare:
        wall = time.perf_counter() - self._t0
        loop = main_thread_cpu() - self._loop0
        counts = context_switches()
        switches = sum(v - self._switches0.get(tid, 0) for tid, v in counts.items())
        pid = os.getpid()
        loop_switches = counts.get(pid, 0) - self._switches0.get(pid, 0)
        t = os.times()
        machine = machine_busy()
        pg1 = cpu_of(pids_named("postgres"))
        rabbit1 = cpu_of(pids_named("beam.smp"))

        mine = self.stage.backends()

        def delta(now: dict[int, float], before: dict[int, float], only: Any = None) -> float:
            return sum(v - before.get(p, 0.0) for p, v in now.items() if only is None or p in only)

        return CpuShare(
            wall=wall,
            me=t.user + t.system - self._me0,
            pg=delta(pg1, self._pg0, mine),
            pg_all=delta(pg1, self._pg0),
            rabbit=delta(rabbit1, self._rabbit0),
            machine=machine[0] - self._machine0[0],
            switches=switches,
            loop=loop,
            loop_switches=loop_switches,
        )


# --------------------------------------------------------------------------- the stage


def payload(i: int) -> dict[str, Any]:
    """About 200 bytes of JSON."""
    return {
        "order_id": 1_000_000 + i,
        "customer_id": 50_000 + i % 977,
        "amount": 100 + i % 9_900,
        "currency": "EUR",
        "items": [{"sku": f"SKU-{i % 9973:05d}", "qty": 1 + i % 3, "price": 1999}],
        "shipping": {"country": "DE", "zip": f"{10000 + i % 89999}", "express": i % 2 == 0},
        "note": "leave at the door",
    }


@dataclass
class Stage:
    """This run's schema, exchange and queue prefix (all named ``name``)."""

    base_url: str
    amqp_url: str
    name: str
    queue_type: Literal["quorum", "classic"]
    admin: sa.Engine = field(init=False)
    engine: sa.Engine = field(init=False)
    publisher: aio_pika.abc.AbstractRobustConnection | None = None
    declared: list[str] = field(default_factory=list)
    receipts: tuple[str, str] | None = field(init=False)
    """(exchange, queue) of consumer receipts, when this version of the Consumer sends them."""

    def __post_init__(self) -> None:
        self.receipts = None
        if "receipts" in {f.name for f in dataclass_fields(ConsumerConfig)}:
            try:
                from outbox.receipts import receipts_exchange, receipts_queue
            except ImportError:
                pass
            else:
                self.receipts = (receipts_exchange(self.name), receipts_queue(self.name))
        self.admin = make_engine(
            sa.make_url(self.base_url).update_query_dict({"application_name": f"{APP}_admin"}),
            pool_size=2,
        )
        self.engine = make_engine(self.url("setup"), pool_size=2)

    def url(self, role: str) -> str:
        """A URL working in the schema, its connections named ``bench_consumer_<role>``."""
        url = sa.make_url(self.base_url).update_query_dict(
            {"options": f"-csearch_path={self.name}", "application_name": f"{APP}_{role}"}
        )
        return url.render_as_string(hide_password=False)

    def conninfo(self, role: str) -> str:
        """The same as a libpq URL, for raw psycopg."""
        return sa.make_url(self.url(role)).set(drivername="postgresql").render_as_string(False)

    @property
    def queue(self) -> str:
        return f"{self.name}.{GROUP}"

    def config(self, prefetch: int, concurrency: int, receipts: bool = True) -> ConsumerConfig:
        extra: dict[str, Any] = {} if receipts else {"receipts": False}
        return ConsumerConfig(
            exchange=self.name,
            queue_prefix=self.name,
            queue_type=self.queue_type,
            prefetch=prefetch,
            concurrency=concurrency,
            shutdown_timeout=timedelta(seconds=10),
            **extra,
        )

    # -- database

    def create_schema(self) -> None:
        with self.admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {self.name} CASCADE"))
            conn.execute(text(f"CREATE SCHEMA {self.name}"))
        with self.engine.begin() as conn:
            outbox.metadata.create_all(conn)
            conn.execute(text("CREATE TABLE effect (id bigserial, message_id text, amount int)"))

    def truncate(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(text("TRUNCATE effect, outbox_inbox"))

    def counts(self) -> tuple[int, int, int]:
        """(effect rows, distinct message ids in effect, inbox rows)."""
        with self.engine.connect() as conn:
            row = conn.execute(
                text(
                    "SELECT (SELECT count(*) FROM effect), "
                    "(SELECT count(DISTINCT message_id) FROM effect), "
                    "(SELECT count(*) FROM outbox_inbox)"
                )
            ).one()
        return int(row[0]), int(row[1]), int(row[2])

    def backends(self) -> set[int]:
        """PostgreSQL backends of this run's arms (not the admin connections)."""
        with self.admin.connect() as conn:
            return {
                int(pid)
                for (pid,) in conn.execute(
                    text(
                        "SELECT pid FROM pg_stat_activity WHERE application_name LIKE :a "
                        "AND application_name NOT IN (:admin, :setup)"
                    ),
                    {"a": f"{APP}_%", "admin": f"{APP}_admin", "setup": f"{APP}_setup"},
                )
            }

    def drop_schema(self) -> None:
        self.engine.dispose()
        with self.admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {self.name} CASCADE"))
        self.admin.dispose()

    # -- broker

    async def open(self) -> None:
        self.publisher = await aio_pika.connect_robust(
            self.amqp_url, client_properties={"connection_name": f"{APP} publisher"}
        )
        channel = await self.publisher.channel()
        exchange = await channel.declare_exchange(
            self.name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        # As the Consumer declares it, so that its own declaration is a no-op.
        queue = await channel.declare_queue(
            self.queue, durable=True, arguments={"x-queue-type": self.queue_type}
        )
        await queue.bind(exchange, TOPIC)
        self.declared.append(self.queue)
        if self.receipts is not None:
            # As a relay would (it records them), so that receipts are routed, not returned.
            receipts = await channel.declare_exchange(
                self.receipts[0], aio_pika.ExchangeType.TOPIC, durable=True
            )
            rq = await channel.declare_queue(
                self.receipts[1], durable=True, arguments={"x-queue-type": self.queue_type}
            )
            await rq.bind(receipts, "#")
            self.declared.append(self.receipts[1])
        await channel.close()

    async def publish(self, n: int, window: int = 1000) -> list[str]:
        """Publish ``n`` fresh messages with confirms; return their ids."""
        assert self.publisher is not None
        wire = WireFormat(exchange=self.name)
        messages = []
        ids = []
        now = datetime.now(UTC)
        for i in range(n):
            envelope = Envelope(
                message_id=str(uuid.uuid4()),
                topic=TOPIC,
                key=None,
                body=json.dumps(payload(i), separators=(",", ":")).encode(),
                content_type="application/json",
                created_at=now,
            )
            ids.append(envelope.message_id)
            messages.append(aio_pika.Message(envelope.body, **envelope.amqp_properties(wire)))
        channel = await self.publisher.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(self.name)
        for start in range(0, n, window):
            await asyncio.gather(
                *(
                    exchange.publish(m, routing_key=TOPIC, mandatory=True)
                    for m in messages[start : start + window]
                )
            )
        await channel.close()
        return ids

    async def queue_depth(self) -> int:
        assert self.publisher is not None
        channel = await self.publisher.channel()
        try:
            q = await channel.declare_queue(self.queue, passive=True)
            return int(q.declaration_result.message_count or 0)
        finally:
            await channel.close()

    async def purge(self, name: str | None = None) -> None:
        assert self.publisher is not None
        channel = await self.publisher.channel()
        q = await channel.get_queue(name or self.queue)
        await q.purge()
        await channel.close()

    async def cleanup(self, consumer_queues: Sequence[str]) -> None:
        connection = await aio_pika.connect(self.amqp_url)
        async with connection:
            channel = await connection.channel()
            for name in dict.fromkeys([*self.declared, *consumer_queues]):
                with contextlib.suppress(Exception):
                    await channel.queue_delete(name)
            for exchange in (self.name, *(self.receipts or ())[:1]):
                with contextlib.suppress(Exception):
                    await channel.exchange_delete(exchange)
        if self.publisher is not None:
            await self.publisher.close()


# --------------------------------------------------------------------------- results


@dataclass
class Result:
    label: str
    n: int
    seconds: float
    cpu: CpuShare
    note: str = ""
    problems: list[str] = field(default_factory=list)
    batches: float | None = None  # mean batch size (batch prototype)

    @property
    def rate(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else 0.0

    def us(self, cpu_seconds: float) -> float:
        return cpu_seconds / max(self.n, 1) * 1e6


# --------------------------------------------------------------------------- the arms


class Timer:
    """First delivery seen and the moment the n-th message was settled."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.count = 0
        self.first: float | None = None
        self.done = asyncio.Event()
        self.end = 0.0

    def seen(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    def settled(self) -> None:
        self.count += 1
        if self.count >= self.n:
            self.end = time.perf_counter()
            self.done.set()


Work: TypeAlias = "Callable[[bytes, str], None]"
"""A sync unit of work on one message (body, message id), run in the thread pool."""


def psycopg_work(stage: Stage, concurrency: int) -> tuple[Work, Callable[[], None]]:
    """(b): INSERT + COMMIT on a raw psycopg connection per thread (opened beforehand)."""
    pool: queue_module.SimpleQueue[psycopg.Connection[Any]] = queue_module.SimpleQueue()
    opened = [psycopg.connect(stage.conninfo("raw")) for _ in range(concurrency)]
    for conn in opened:
        pool.put(conn)

    def work(body: bytes, message_id: str) -> None:
        amount = json.loads(body)["amount"]
        conn = pool.get()
        try:
            conn.execute(INSERT_EFFECT_PG, (message_id, amount))
            conn.commit()
        finally:
            pool.put(conn)

    def close() -> None:
        for conn in opened:
            conn.close()

    return work, close


def warm(engine: sa.Engine, connections: int) -> None:
    """Open ``connections`` pooled connections before the clock starts."""
    held = [engine.connect() for _ in range(connections)]
    for conn in held:
        conn.close()


def session_work(stage: Stage, concurrency: int, inbox: bool) -> tuple[Work, Callable[[], None]]:
    """SQLAlchemy Session + INSERT + commit, optionally with the framework's inbox INSERT first.

    The engine is built as the Consumer builds its own (pool_size=concurrency).
    """
    engine = make_engine(stage.url("raw"), pool_size=concurrency, max_overflow=4)
    warm(engine, concurrency)

    def work(body: bytes, message_id: str) -> None:
        amount = json.loads(body)["amount"]
        with Session(engine) as session, session.begin():
            if inbox:
                conn = session.connection()
                row = inbox_row(GROUP, uuid.UUID(message_id), TOPIC)
                if conn.execute(inbox_insert(conn.dialect.name), row).first() is None:
                    return
            session.execute(INSERT_EFFECT, {"id": message_id, "amount": amount})

    return work, engine.dispose


async def run_raw(
    stage: Stage,
    label: str,
    n: int,
    prefetch: int,
    concurrency: int,
    make: Callable[[], tuple[Work | None, Callable[[], None]]],
    timeout: float,
) -> Result:
    """A raw aio-pika consumer: ack only (work None), or work in a thread pool, then ack."""
    await stage.publish(n)
    work, close = make()
    connection = await aio_pika.connect(
        stage.amqp_url, client_properties={"connection_name": f"{APP} {label}"}
    )
    threads = ThreadPoolExecutor(concurrency, thread_name_prefix="raw")
    slots = asyncio.Semaphore(concurrency)
    timer = Timer(n)
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    problems: list[str] = []
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        q = await channel.get_queue(stage.queue)

        async def handle(message: AbstractIncomingMessage) -> None:
            try:
                assert work is not None
                await loop.run_in_executor(threads, work, message.body, message.message_id or "")
                await message.ack()
                timer.settled()
            except Exception as e:
                problems.append(f"{type(e).__name__}: {e}")
                await message.nack(requeue=True)
            finally:
                slots.release()

        async def on_message(message: AbstractIncomingMessage) -> None:
            timer.seen()
            if work is None:
                await message.ack()
                timer.settled()
                return
            # As the Consumer does: wait for a slot, then run the work in a task.
            await slots.acquire()
            task = asyncio.create_task(handle(message))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        meter = CpuMeter(stage).start()
        tag = await q.consume(on_message)
        try:
            await asyncio.wait_for(timer.done.wait(), timeout)
        except TimeoutError:
            problems.append(f"only {timer.count}/{n} settled after {timeout:g}s")
            timer.end = time.perf_counter()
        cpu = meter.stop()
        await q.cancel(tag)
    finally:
        await connection.close()
        threads.shutdown(wait=True)
        close()
    return finish(stage, label, n, timer, cpu, problems)


def finish(
    stage: Stage, label: str, n: int, timer: Timer, cpu: CpuShare, problems: list[str]
) -> Result:
    seconds = timer.end - (timer.first or timer.end)
    # CPU was read over consume start .. end; scale it to the measured window.
    return Result(label, min(timer.count, n), seconds, cpu, problems=problems)


async def run_consumer(
    stage: Stage,
    label: str,
    n: int,
    prefetch: int,
    concurrency: int,
    timeout: float,
    consumers: list[Consumer],
    profile: Callable[[], Awaitable[Callable[[], Awaitable[None]]]] | None = None,
    receipts: bool = True,
    asynchronous: bool = False,
    effect: bool = True,
) -> Result:
    """(c): the framework's Consumer, started in this process, one INSERT per message.

    ``asynchronous``: an ``async def`` handler (the Consumer gives it an AsyncSession on
    its own async engine, psycopg's async mode; no thread pool). ``effect=False``: the
    handler writes nothing, which leaves the framework's own cost (inbox, commit, ack).
    """
    await stage.publish(n)
    # The engine the Consumer would make itself (same pool), passed in so that it is warmed
    # before the clock starts like the baselines' and disposed after (Consumer.stop() does
    # not dispose a sync engine).
    engine = make_engine(stage.url("consumer"), pool_size=concurrency, max_overflow=4)
    warm(engine, concurrency)
    consumer = Consumer(
        GROUP,
        engine=engine,
        amqp_url=stage.amqp_url,
        config=stage.config(prefetch, concurrency, receipts),
    )
    consumers.append(consumer)
    timer = Timer(n)

    if asynchronous:

        @consumer.handler(TOPIC)
        async def on_created_async(message: IncomingMessage, session: AsyncSession) -> None:
            timer.seen()
            await session.execute(
                INSERT_EFFECT, {"id": message.message_id, "amount": message.payload["amount"]}
            )

    else:

        @consumer.handler(TOPIC)
        def on_created(message: IncomingMessage, session: Session) -> None:
            timer.seen()
            if effect:
                session.execute(
                    INSERT_EFFECT, {"id": message.message_id, "amount": message.payload["amount"]}
                )

    problems: list[str] = []
    stop_profile = await profile() if profile is not None else None
    metrics = consumer.metrics
    try:
        meter = CpuMeter(stage).start()
        await consumer.start()
        deadline = time.perf_counter() + timeout
        while True:
            settled = metrics.processed._value.get() + metrics.duplicates._value.get()
            if settled >= n or time.perf_counter() > deadline:
                timer.count = int(settled)
                timer.end = time.perf_counter()
                if settled < n:
                    problems.append(f"only {settled:.0f}/{n} settled after {timeout:g}s")
                break
            await asyncio.sleep(POLL)
        cpu = meter.stop()
    finally:
        if stop_profile is not None:
            await stop_profile()
        await consumer.stop()
        consumers.remove(consumer)
        engine.dispose()
    extra = {
        "duplicates": metrics.duplicates._value.get(),
        "retries": metrics.retries._value.get(),
        "dead": metrics.dead._value.get(),
    }
    problems += [f"{k}={v:.0f}" for k, v in extra.items() if v]
    batches = metric_sample(metrics, "outbox_consumer_batch_messages_count")
    if batches:
        mean = metric_sample(metrics, "outbox_consumer_batch_messages_sum") / batches
    result = finish(stage, label, n, timer, cpu, problems)
    if batches:
        result.batches = mean
    if receipts and stage.receipts is not None:
        sent = metric_sum(metrics, "outbox_consumer_receipts_sent")
        dropped = metric_by_label(metrics, "outbox_consumer_receipts_dropped")
        why = ", ".join(f"{k} {v:.0f}" for k, v in sorted(dropped.items()) if v)
        result.note = (
            f"receipts sent {sent:.0f}, dropped {sum(dropped.values()):.0f}"
            + (f" ({why})" if why else "")
            + " (counted after stop, which flushes for up to 5 s)"
        )
    return result


def metric_by_label(metrics: Any, name: str) -> dict[str, float]:
    """A counter's values by the value of its (first) label."""
    values: dict[str, float] = {}
    for family in metrics.registry.collect():
        if family.name == name:
            for sample in family.samples:
                if sample.name == f"{name}_total":
                    key = next(iter(sample.labels.values()), "")
                    values[key] = values.get(key, 0.0) + sample.value
    return values


def metric_sum(metrics: Any, name: str) -> float:
    """A counter's value summed over its labels (0 when this version has no such metric)."""
    total = 0.0
    for family in metrics.registry.collect():
        if family.name == name:
            total += sum(s.value for s in family.samples if s.name == f"{name}_total")
    return total


def metric_sample(metrics: Any, sample: str) -> float:
    """One sample of the registry by its full name (a histogram's ``_sum``, ``_count``)."""
    return sum(
        s.value for family in metrics.registry.collect() for s in family.samples if s.name == sample
    )


# --------------------------------------------------------------------------- worker processes


def processes_label(kind: str, k: int, prefetch: int, concurrency: int) -> str:
    if kind == "raw":
        return f"{RAW} x{k} processes"
    return f"(c) Consumer {prefetch}/{concurrency} x{k} processes"


async def run_processes(
    stage: Stage,
    kind: Literal["raw", "consumer"],
    k: int,
    n: int,
    prefetch: int,
    concurrency: int,
    timeout: float,
) -> Result:
    """``k`` worker processes of this script (``--worker``) share the queue.

    Each worker reports when it saw its first delivery and settled its last, and the
    CPU it used in between; the rate runs from the earliest first to the latest last.
    PostgreSQL's and RabbitMQ's CPU is read around the whole arm (start-up included).
    """
    label = processes_label(kind, k, prefetch, concurrency)
    await stage.publish(n)
    folder = Path(tempfile.mkdtemp(prefix="outbox-bench-workers-"))
    meter = CpuMeter(stage).start()
    workers = []
    for i in range(k):
        workers.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                SCRIPT,
                "--worker",
                kind,
                "--stage",
                stage.name,
                "--queue-type",
                stage.queue_type,
                "--settings",
                f"{prefetch}/{concurrency}",
                "--database-url",
                stage.base_url,
                "--amqp-url",
                stage.amqp_url,
                "--report",
                str(folder / f"{i}.json"),
            )
        )
    problems: list[str] = []
    deadline = time.perf_counter() + timeout + 10  # + the workers' start-up
    while True:
        if kind == "consumer":
            done = (await asyncio.to_thread(stage.counts))[0] >= n
        else:
            done = await stage.queue_depth() == 0
        if done or time.perf_counter() > deadline:
            if not done:
                problems.append(f"not done after {timeout + 10:g}s")
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # the last acks of a raw worker (ready 0 is not acked)
    cpu = meter.stop()
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    for worker in workers:
        await worker.wait()
    reports = await asyncio.to_thread(read_reports, folder)
    if len(reports) != k:
        problems.append(f"{k - len(reports)} workers sent no report")
    firsts = [r["first"] for r in reports if r["first"] is not None]
    seconds = max(r["last"] for r in reports) - min(firsts) if firsts else 0.0
    count = sum(r["count"] for r in reports)
    if count < n:
        problems.append(f"only {count}/{n} settled")
    cpu.me = sum(r["cpu"] for r in reports)
    cpu.switches = cpu.loop_switches = 0
    cpu.loop = 0.0
    note = "workers: " + ", ".join(f"{r['count']} msgs" for r in reports)
    return Result(label, min(count, n), seconds, cpu, note=note, problems=problems)


def read_reports(folder: Path) -> list[dict[str, Any]]:
    """The workers' reports, and the folder removed."""
    reports = [json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))]
    shutil.rmtree(folder, ignore_errors=True)
    return reports


async def run_worker(args: argparse.Namespace) -> None:
    """One worker process of ``run_processes``: consume until SIGTERM, then report."""
    configure_logging("WARNING")
    stage = Stage(args.database_url, args.amqp_url, args.stage, args.queue_type)
    prefetch, concurrency = parse_pairs(args.settings, 2)[0]
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    state: dict[str, Any] = {"first": None, "last": None, "count": 0, "cpu0": None}

    def seen() -> None:
        if state["first"] is None:
            state["first"] = time.time()
            t = os.times()
            state["cpu0"] = t.user + t.system

    if args.worker == "raw":
        connection = await aio_pika.connect(stage.amqp_url)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.get_queue(stage.queue)

        async def on_message(message: AbstractIncomingMessage) -> None:
            seen()
            await message.ack()
            state["count"] += 1
            state["last"] = time.time()

        await queue.consume(on_message)
        await stopping.wait()
        t = os.times()
        await connection.close()
    else:
        consumer = Consumer(
            GROUP,
            database_url=stage.url(f"worker{os.getpid()}"),
            amqp_url=stage.amqp_url,
            config=stage.config(prefetch, concurrency),
        )

        @consumer.handler(TOPIC)
        def on_created(message: IncomingMessage, session: Session) -> None:
            seen()
            session.execute(
                INSERT_EFFECT, {"id": message.message_id, "amount": message.payload["amount"]}
            )

        await consumer.start()
        metrics = consumer.metrics
        while not stopping.is_set():
            settled = int(metrics.processed._value.get() + metrics.duplicates._value.get())
            if settled != state["count"]:
                state["count"], state["last"] = settled, time.time()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), POLL)
        t = os.times()
        await consumer.stop()
    cpu0 = state["cpu0"] if state["cpu0"] is not None else t.user + t.system
    report = {
        "first": state["first"],
        "last": state["last"] or time.time(),
        "count": state["count"],
        "cpu": t.user + t.system - cpu0,
    }
    await asyncio.to_thread(Path(args.report).write_text, json.dumps(report))
    stage.engine.dispose()
    stage.admin.dispose()


# --------------------------------------------------------------------------- batch prototype


def parse(raw: AbstractIncomingMessage) -> IncomingMessage:
    """What ``Consumer._parse`` does for a well-formed message (same public pieces)."""
    headers = dict(raw.headers or {})
    topic = headers.get("x-outbox-topic") or raw.routing_key
    envelope = Envelope.from_amqp(
        body=raw.body,
        routing_key=str(topic),
        message_id=raw.message_id,
        content_type=raw.content_type,
        headers=headers,
        timestamp=raw.timestamp,
    )
    decoded = envelope.decode({JSON.content_type: JSON})
    return IncomingMessage(
        message_id=decoded.message_id,
        topic=decoded.topic,
        key=decoded.key,
        payload=decoded.payload,
        headers={k: v for k, v in decoded.headers.items() if not k.startswith("x-outbox-")},
        created_at=decoded.created_at,
        attempt=1,
        redelivered=bool(raw.redelivered),
    )


BatchMode = Literal["savepoint", "plain", "bulk"]

BULK_INBOX = (
    postgresql.insert(inbox_table)
    .on_conflict_do_nothing(index_elements=["consumer_group", "message_id"])
    .returning(inbox_table.c.message_id)
)
"""One multi-row inbox INSERT for a whole batch: returns the ids that were new."""


def one_by_one(
    engine: sa.Engine,
    messages: list[IncomingMessage],
    handler: Callable[[IncomingMessage, Session], None],
) -> list[str]:
    """The fallback: one transaction per message, as ``Consumer._execute_sync`` does."""
    outcomes = []
    for m in messages:
        try:
            with Session(engine) as session, session.begin():
                conn = session.connection()
                row = inbox_row(GROUP, uuid.UUID(m.message_id), m.topic)
                if conn.execute(inbox_insert(conn.dialect.name), row).first() is None:
                    outcomes.append("duplicate")
                    continue
                handler(m, session)
            outcomes.append("done")
        except Exception:
            outcomes.append("failed")
    return outcomes


def run_batch_sync(
    engine: sa.Engine,
    messages: list[IncomingMessage],
    handler: Callable[[IncomingMessage, Session], None],
    mode: BatchMode,
) -> list[str]:
    """One transaction and one COMMIT for the whole batch; the acks follow the commit.

    ``savepoint``: per message a SAVEPOINT holding its inbox row and handler, so a
    failing handler loses only its own work (2 more round trips per message).
    ``plain``: the inbox INSERT per message, no SAVEPOINTs; ``bulk``: one multi-row
    inbox INSERT for the batch, then the handlers. Both are optimistic: if a handler
    (or the commit) fails, the whole batch is rolled back and run again one
    transaction per message, which also isolates the failing one.
    """
    outcomes: list[str] = []
    if mode != "savepoint":
        try:
            with Session(engine) as session, session.begin():
                conn = session.connection()
                if mode == "bulk":
                    rows = [inbox_row(GROUP, uuid.UUID(m.message_id), m.topic) for m in messages]
                    new = {r[0] for r in conn.execute(BULK_INBOX, rows)}
                    for m in messages:
                        if uuid.UUID(m.message_id) not in new:
                            outcomes.append("duplicate")
                            continue
                        handler(m, session)
                        outcomes.append("done")
                else:
                    stmt = inbox_insert(conn.dialect.name)
                    for m in messages:
                        row = inbox_row(GROUP, uuid.UUID(m.message_id), m.topic)
                        if conn.execute(stmt, row).first() is None:
                            outcomes.append("duplicate")
                            continue
                        handler(m, session)
                        outcomes.append("done")
            return outcomes
        except Exception:
            return one_by_one(engine, messages, handler)
    with Session(engine) as session, session.begin():
        conn = session.connection()
        stmt = inbox_insert(conn.dialect.name)
        for m in messages:
            row = inbox_row(GROUP, uuid.UUID(m.message_id), m.topic)
            try:
                with session.begin_nested():
                    # A connection taken before begin_nested() would run outside the SAVEPOINT
                    # (it is emitted lazily, on the session's next use of a connection).
                    if session.connection().execute(stmt, row).first() is None:
                        outcomes.append("duplicate")
                        continue
                    handler(m, session)
                outcomes.append("done")
            except Exception:
                outcomes.append("failed")  # retried / dead-lettered on its own
    return outcomes


async def run_batched(
    stage: Stage,
    label: str,
    n: int,
    prefetch: int,
    workers: int,
    max_batch: int,
    mode: BatchMode,
    timeout: float,
) -> Result:
    """Prototype: W workers each take what is buffered (up to max_batch), one tx per batch."""
    await stage.publish(n)
    engine = make_engine(stage.url("batch"), pool_size=workers, max_overflow=4)
    warm(engine, workers)
    threads = ThreadPoolExecutor(workers, thread_name_prefix="batch")
    connection = await aio_pika.connect(
        stage.amqp_url, client_properties={"connection_name": f"{APP} {label}"}
    )
    timer = Timer(n)
    inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    problems: list[str] = []
    sizes: list[int] = []

    def handler(message: IncomingMessage, session: Session) -> None:
        session.execute(
            INSERT_EFFECT, {"id": message.message_id, "amount": message.payload["amount"]}
        )

    async def worker() -> None:
        while True:
            batch = [await inbox.get()]
            while len(batch) < max_batch and not inbox.empty():
                batch.append(inbox.get_nowait())
            sizes.append(len(batch))
            try:
                parsed = [parse(raw) for raw in batch]
                outcomes = await loop.run_in_executor(
                    threads, run_batch_sync, engine, parsed, handler, mode
                )
            except Exception as e:
                problems.append(f"{type(e).__name__}: {e}")
                for raw in batch:
                    await raw.nack(requeue=True)
                continue
            for raw, outcome in zip(batch, outcomes, strict=True):
                if outcome == "failed":
                    await raw.nack(requeue=True)
                    continue
                await raw.ack()
                timer.settled()

    async def on_message(message: AbstractIncomingMessage) -> None:
        timer.seen()
        inbox.put_nowait(message)

    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        q = await channel.get_queue(stage.queue)
        meter = CpuMeter(stage).start()
        tag = await q.consume(on_message)
        try:
            await asyncio.wait_for(timer.done.wait(), timeout)
        except TimeoutError:
            problems.append(f"only {timer.count}/{n} settled after {timeout:g}s")
            timer.end = time.perf_counter()
        cpu = meter.stop()
        await q.cancel(tag)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await connection.close()
        threads.shutdown(wait=True)
        engine.dispose()
    result = finish(stage, label, n, timer, cpu, problems)
    result.batches = sum(sizes) / len(sizes) if sizes else None
    return result


# --------------------------------------------------------------------------- unit costs


@dataclass
class Cost:
    label: str
    wall_us: float
    cpu_us: float  # CPU of the measuring thread (or the process, for the handoff)


class FakeDelivery:
    """What ``parse`` reads of an aio-pika delivery."""

    def __init__(self, body: bytes, properties: dict[str, Any]) -> None:
        self.body = body
        self.headers = properties["headers"]
        self.routing_key = TOPIC
        self.message_id = properties["message_id"]
        self.content_type = properties["content_type"]
        self.timestamp = properties["timestamp"]
        self.redelivered = False


def unit_costs(stage: Stage, iterations: int) -> list[Cost]:
    """One thread, one connection, no broker: what each step of the handler path costs.

    Statement costs are measured inside one open transaction (no COMMIT in them);
    COMMIT is measured on its own after a one-row INSERT.
    """
    engine = make_engine(stage.url("unit"), pool_size=2)
    warm(engine, 1)
    costs: list[Cost] = []

    def measure(label: str, op: Callable[[int], None], per: int = 1) -> None:
        for i in range(min(50, iterations)):
            op(-1 - i)
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        for i in range(iterations):
            op(i)
        wall, cpu = time.perf_counter() - wall0, time.thread_time() - cpu0
        costs.append(Cost(label, wall / iterations / per * 1e6, cpu / iterations / per * 1e6))

    def mid(i: int) -> uuid.UUID:
        return uuid.uuid4()

    # The parse of a delivery (Consumer._parse's work).
    wire = WireFormat(exchange=stage.name)
    envelope = Envelope(
        message_id=str(uuid.uuid4()),
        topic=TOPIC,
        key=None,
        body=json.dumps(payload(1), separators=(",", ":")).encode(),
        content_type="application/json",
        created_at=datetime.now(UTC),
    )
    fake: Any = FakeDelivery(envelope.body, envelope.amqp_properties(wire))
    measure("parse: Envelope.from_amqp + decode + IncomingMessage", lambda i: _ignore(parse(fake)))

    with psycopg.connect(stage.conninfo("unit")) as raw:

        def insert_commit(i: int) -> None:
            raw.execute(INSERT_EFFECT_PG, (str(i), 1))
            raw.commit()

        measure("psycopg: INSERT + COMMIT (what (b) does)", insert_commit)
        commit_wall = commit_cpu = 0.0

        def commit_only(i: int) -> None:
            nonlocal commit_wall, commit_cpu
            raw.execute(INSERT_EFFECT_PG, (str(i), 1))
            w, c = time.perf_counter(), time.thread_time()
            raw.commit()
            commit_wall += time.perf_counter() - w
            commit_cpu += time.thread_time() - c

        for i in range(iterations):
            commit_only(i)
        costs.append(
            Cost(
                "psycopg: COMMIT alone (WAL flush; group commit helps under concurrency)",
                commit_wall / iterations * 1e6,
                commit_cpu / iterations * 1e6,
            )
        )
        with raw.transaction():
            measure("psycopg: INSERT in an open transaction", lambda i: _ignore(
                raw.execute(INSERT_EFFECT_PG, (str(i), 1))
            ))  # fmt: skip

    def session_cycle(i: int) -> None:
        with Session(engine) as session, session.begin():
            session.connection()

    measure("Session() + begin + connection() + commit + close, no SQL", session_cycle)

    def session_insert(i: int) -> None:
        with Session(engine) as session, session.begin():
            session.execute(INSERT_EFFECT, {"id": str(i), "amount": 1})

    def framework_tx(i: int) -> None:
        with Session(engine) as session, session.begin():
            conn = session.connection()
            row = inbox_row(GROUP, uuid.uuid4(), TOPIC)
            if conn.execute(inbox_insert(conn.dialect.name), row).first() is not None:
                session.execute(INSERT_EFFECT, {"id": str(i), "amount": 1})

    measure("Session + INSERT + COMMIT (a whole transaction)", session_insert)
    measure("Session + inbox INSERT + INSERT + COMMIT (the Consumer's transaction)", framework_tx)

    with Session(engine) as session, session.begin():
        conn = session.connection()
        stmt = inbox_insert(conn.dialect.name)
        measure(
            "inbox INSERT ON CONFLICT RETURNING (.first()), open tx",
            lambda i: _ignore(conn.execute(stmt, inbox_row(GROUP, mid(i), TOPIC)).first()),
        )
        raw_sql = (
            "INSERT INTO outbox_inbox (consumer_group, message_id, topic, processed_at) "
            "VALUES (%s, %s, %s, %s) ON CONFLICT (consumer_group, message_id) DO NOTHING "
            "RETURNING id"
        )
        measure(
            "  the same via conn.exec_driver_sql(SQL string)",
            lambda i: _ignore(
                conn.exec_driver_sql(raw_sql, (GROUP, mid(i), TOPIC, datetime.now(UTC))).first()
            ),
        )
        driver: Any = conn.connection.driver_connection
        measure(
            "  the same on the psycopg connection underneath",
            lambda i: _ignore(
                driver.execute(raw_sql, (GROUP, mid(i), TOPIC, datetime.now(UTC))).fetchone()
            ),
        )
        measure(
            "session.execute(text INSERT into effect), open tx",
            lambda i: _ignore(session.execute(INSERT_EFFECT, {"id": str(i), "amount": 1})),
        )

        def savepoint(i: int) -> None:
            with session.begin_nested():
                session.connection().exec_driver_sql("SELECT 1")

        measure("  (SELECT 1 via exec_driver_sql, to subtract)", lambda i: _ignore(
            session.connection().exec_driver_sql("SELECT 1")
        ))  # fmt: skip
        select_one = costs[-1]
        measure("begin_nested(): SAVEPOINT + RELEASE (+ SELECT 1)", savepoint)
        costs[-1] = Cost(
            "begin_nested(): SAVEPOINT + RELEASE",
            costs[-1].wall_us - select_one.wall_us,
            costs[-1].cpu_us - select_one.cpu_us,
        )
        costs.remove(select_one)
        rows = 64

        def bulk(i: int) -> None:
            batch = [inbox_row(GROUP, uuid.uuid4(), TOPIC) for _ in range(rows)]
            _ignore(list(conn.execute(BULK_INBOX, batch)))

        measure(f"bulk inbox INSERT, {rows} rows per statement, per row", bulk, per=rows)
        session.rollback()
    engine.dispose()
    return costs


def _ignore(value: object) -> None:
    return None


async def handoff_cost(iterations: int) -> Cost:
    """One ``run_in_executor`` round trip of a no-op (process CPU: both threads)."""
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(4) as pool:
        for _ in range(50):
            await loop.run_in_executor(pool, _ignore, None)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(iterations):
            await loop.run_in_executor(pool, _ignore, None)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return Cost(
        "thread handoff: await run_in_executor(no-op), one at a time",
        wall / iterations * 1e6,
        cpu / iterations * 1e6,
    )


# --------------------------------------------------------------------------- profiling


WORKER_MARKS = ("_worker (", "_WorkItem.run", "_execute_sync", "_execute_batch_sync", "on_created")
HANDOFF_MARKS = (
    "run_in_executor",
    "ThreadPoolExecutor.submit",
    "call_soon_threadsafe",
    "_chain_future",
    "_copy_future_state",
    "_call_set_state",
    "_set_state",
    "wrap_future",
)


def classify(frames: list[str]) -> str:
    """The part of the consumer one py-spy sample (frames, root first) belongs to.

    Keyword based, so that the partial stacks ``--nonblocking`` sometimes reads
    still land in the right place.
    """
    joined = ";".join(frames)

    def has(*marks: str) -> bool:
        return any(m in joined for m in marks)

    if has(*WORKER_MARKS):
        if has("on_created"):
            return "worker: handler's INSERT into effect (session.execute)"
        if has("_execute_batch_sync"):
            below = joined.split("_execute_batch_sync", 1)[1]
            if "inbox_insert_batch" in below:
                return "worker: inbox INSERT of the batch"
            if "commit" in below or "TransactionalContext.__exit__" in below:
                return "worker: COMMIT (session.begin() exit)"
            if "Session." in below:
                return "worker: Session() + begin() creation / close"
            return "worker: batch transaction, other lines"
        for frame in reversed(frames):
            if "_execute_sync" in frame:
                line = frame.rsplit(":", 1)[-1].rstrip(")")
                what = EXECUTE_LINES.get(line, "Consumer._execute_sync, other lines")
                if what == "session":
                    below = joined.split("_execute_sync", 1)[1]
                    if "commit" in below:
                        return "worker: COMMIT (session.begin() exit)"
                    if "close" in below or "_close" in below or "reset" in below:
                        return "worker: Session close / connection return to pool"
                    return "worker: Session() + begin() creation"
                return f"worker: {what}"
        if has("set_result", "set_exception", "call_soon_threadsafe"):
            return "worker: future completion (wakes the loop)"
        return "worker: thread pool wait / wake-up (_worker, queue get)"
    if has("psycopg/", "sqlalchemy/"):
        # Only the worker threads use the database during a run: a stack the sampler cut.
        return "worker: SQLAlchemy / psycopg (stack cut short by the sampler)"
    if has("_parse"):
        return "loop: envelope parse + IncomingMessage (Consumer._parse)"
    if has("consumer/receipts.py", "ReceiptPublisher"):
        return "loop: receipts (queue + batched publish)"
    if has(*HANDOFF_MARKS):
        return "loop: thread handoff (submit / result back to loop)"
    if has("aio_pika", "aiormq", "pamqp"):
        return "loop: aio-pika / aiormq / pamqp (deliveries, acks, frames)"
    if has("prometheus_client"):
        return "loop: metrics (prometheus)"
    if has("structlog"):
        return "loop: logging (structlog)"
    if has("tracing.py", "consume_span", "contextvars", "opentelemetry"):
        return "loop: tracing span / context copy"
    if has("_handle_unordered", "_on_message", "_settle", "Consumer._execute"):
        return "loop: consumer tasks (semaphore, create_task, settle)"
    if has("run_consumer"):
        return "loop: benchmark poller"
    if has("asyncio/"):
        return "loop: asyncio event loop (epoll, callbacks)"
    return "other"


EXECUTE_LINES: dict[str, str] = {}


def _execute_lines() -> dict[str, str]:
    """Map the lines of ``Consumer._execute_sync`` to what they do (for ``classify``)."""
    import inspect

    lines, first = inspect.getsourcelines(Consumer._execute_sync)
    names: dict[str, str] = {}
    for offset, source in enumerate(lines):
        number = str(first + offset)
        if "with Session" in source:
            names[number] = "session"
        elif "session.connection()" in source:
            names[number] = "connection checkout (session.connection())"
        elif "inbox_row" in source:
            names[number] = "inbox row values (uuid, datetime)"
        elif "inbox_insert" in source:
            names[number] = "inbox INSERT ... ON CONFLICT DO NOTHING RETURNING"
        elif "spec.function" in source:
            names[number] = "handler's INSERT into effect (session.execute)"
    return names


def read_collapsed(path: Path) -> list[tuple[list[str], int]]:
    samples: list[tuple[list[str], int]] = []
    if not path.exists():
        return samples
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples.append((stack.split(";"), int(count)))
    return samples


def summarize_profile(path: Path, title: str, top: int = 12) -> list[str]:
    samples = read_collapsed(path)
    total = sum(c for _, c in samples)
    out = [f"  {title}: {total} samples"]
    if not total:
        return [*out, "    (no samples: py-spy failed?)"]
    buckets: Tally[str] = Tally()
    leaves: Tally[str] = Tally()
    for stack, count in samples:
        # py-spy's raw format may prefix process/thread pseudo-frames; keep real frames.
        frames = [f for f in stack if "(" in f and ".py" in f]
        buckets[classify(frames)] += count
        if frames:
            leaves[_short(frames[-1])] += count
    for name, count in sorted(buckets.items(), key=lambda kv: -kv[1]):
        out.append(f"    {count / total * 100:5.1f}%  {name}")
    sides = {
        side: sum(c for name, c in buckets.items() if name.startswith(side))
        for side in ("loop", "worker")
    }
    out.append(
        f"    = event-loop thread {sides['loop'] / total * 100:.0f}%, "
        f"worker threads {sides['worker'] / total * 100:.0f}%"
    )
    out.append("    top leaf functions:")
    for name, count in leaves.most_common(top):
        out.append(f"    {count / total * 100:5.1f}%  {name}")
    return out


def _short(frame: str) -> str:
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    marker = "site-packages/"
    if marker in where:
        where = where.split(marker, 1)[1]
    elif str(ROOT) in where:
        where = where.split(str(ROOT) + "/", 1)[1]
    else:
        where = where.rsplit("/", 2)[-1] if "/" in where else where
    return f"{name} ({where})"


def report_profile(directory: Path, keep: Path | None) -> None:
    for path, title in (
        ("gil.txt", "samples of the thread holding the GIL (interpreter CPU)"),
        ("active.txt", "samples of every active thread (on CPU or runnable)"),
    ):
        for line in summarize_profile(directory / path, title):
            print(line)
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        for f in directory.iterdir():
            shutil.copy(f, keep / f.name)
        print(f"  py-spy's collapsed stacks copied to {keep}")


def py_spy_path() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    if local.exists():
        return str(local)
    return shutil.which("py-spy")


def make_profiler(
    directory: Path, rate: int
) -> Callable[[], Awaitable[Callable[[], Awaitable[None]]]] | None:
    """Start two py-spy recorders on this process (all active threads; GIL holder only)."""
    exe = py_spy_path()
    if exe is None:
        return None

    async def start() -> Callable[[], Awaitable[None]]:
        procs = []
        for name, extra in (("active", []), ("gil", ["--gil"])):
            out = directory / f"{name}.txt"
            procs.append(
                subprocess.Popen(  # noqa: ASYNC220 - returns at once
                    [
                        exe,
                        "record",
                        "--pid",
                        str(os.getpid()),
                        "--rate",
                        str(rate),
                        "--format",
                        "raw",
                        "--nonblocking",
                        "--output",
                        str(out),
                        *extra,
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
            )
        await asyncio.sleep(0.5)  # let py-spy attach before the clock starts

        async def stop() -> None:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
            for proc in procs:
                try:
                    await asyncio.to_thread(proc.wait, 15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                if proc.returncode not in (0, None) and proc.stderr is not None:
                    err = proc.stderr.read().decode(errors="replace").strip()
                    if err:
                        print(f"    py-spy: {err[-300:]}", flush=True)

        return stop

    return start


# --------------------------------------------------------------------------- report


def machine_info(stage: Stage, server: dict[str, Any]) -> list[str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().splitlines()[0].split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    with stage.admin.connect() as conn:
        pg = conn.execute(text("SHOW server_version")).scalar_one()
        sync = conn.execute(text("SHOW synchronous_commit")).scalar_one()
        fsync = conn.execute(text("SHOW fsync")).scalar_one()
    versions = ", ".join(
        f"{d} {dist_version(d)}" for d in ("aio-pika", "aiormq", "SQLAlchemy", "psycopg")
    )
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    rabbit = server.get("version", b"?")
    rabbit = rabbit.decode() if isinstance(rabbit, bytes) else str(rabbit)
    return [
        f"machine: {platform.node()} {platform.system()} {platform.release()} "
        f"{platform.machine()}, {os.cpu_count()} CPUs ({cpu}), {mem} RAM, load {load}",
        f"python {platform.python_version()}; {versions}",
        f"PostgreSQL {pg} (synchronous_commit={sync}, fsync={fsync}); RabbitMQ {rabbit}; "
        f"queue type {stage.queue_type}",
    ]


def show(results: Sequence[Result], raw: Result | None, db: Result | None) -> list[str]:
    head = (
        f"  {'arm':<44} {'msg/s':>6} {'/(a)':>5} {'/(b)':>5} {'me':>5} {'pg':>5} {'mq':>5}"
        f" {'cs':>4} {'other':>6}"
    )
    lines = [head]
    for r in results:
        ra = f"{r.rate / raw.rate:5.2f}" if raw and raw.rate else "    -"
        rb = f"{r.rate / db.rate:5.2f}" if db and db.rate else "    -"
        lines.append(
            f"  {r.label:<44} {r.rate:6.0f} {ra} {rb} {r.us(r.cpu.me):5.0f} "
            f"{r.us(r.cpu.pg):5.0f} {r.us(r.cpu.rabbit):5.0f} {r.cpu.switches / max(r.n, 1):4.1f}"
            f" {r.cpu.pct(r.cpu.other):5.0f}%"
        )
        if r.note:
            lines.append(f"  {'':<44} {r.note}")
        if r.batches is not None:
            lines.append(f"  {'':<44} mean batch {r.batches:.1f} messages")
        if r.label.startswith("(c)") and r.cpu.loop:
            lines.append(
                f"  {'':<44} me: event-loop thread {r.us(r.cpu.loop):.0f} µs "
                f"({r.cpu.loop_switches / max(r.n, 1):.1f} cs), other threads "
                f"{r.us(r.cpu.me - r.cpu.loop):.0f} µs "
                f"({(r.cpu.switches - r.cpu.loop_switches) / max(r.n, 1):.1f} cs) per message"
            )
        for p in r.problems:
            lines.append(f"  {'':<44} ! {p}")
    return lines


RAW = "(a) raw consume + ack"
DB = "(b) raw + psycopg INSERT + COMMIT"
NOTHING = "handler writes nothing"


def figures(summary: Sequence[Result], raw: Result, db: Result) -> list[Figure]:
    """The figures benchmarks/run reports: every Consumer arm against (a), the first against (b),
    and the Consumer in worker processes also against as many raw ones."""
    found: list[Figure] = []
    raw_processes = next((r for r in summary if r.label.startswith(f"{RAW} x")), None)
    for index, result in enumerate(r for r in summary if r.label.startswith("(c)")):
        if raw_processes is not None and result.label.endswith(" processes"):
            found.append(
                against(result, "raw aio-pika consume + ack, as many processes", raw_processes.rate)
            )
        found.append(
            against(
                result,
                "raw aio-pika consume + ack",
                raw.rate,
                target=0.7 if index == 0 else None,
                note="; ".join(result.problems),
            )
        )
        if index == 0:
            found.append(
                against(result, "raw consume + psycopg INSERT + COMMIT per message", db.rate)
            )
    return found


def against(result: Result, baseline_name: str, baseline: float, **extra: Any) -> Figure:
    """A Consumer arm's rate as a figure against ``baseline``."""
    work = "inbox only" if result.label.endswith(NOTHING) else "inbox + one INSERT per message"
    return Figure(
        name=f"consumer: {result.label[4:]}, {work}",
        value=result.rate,
        unit="msg/s",
        baseline_name=baseline_name,
        baseline=baseline,
        **extra,
    )


def median(results: Sequence[Result], label: str) -> Result:
    """The round with the median rate (the lower one of two), its spread in ``note``."""
    rounds = sorted((r for r in results if r.label == label), key=lambda r: r.rate)
    middle = rounds[(len(rounds) - 1) // 2]
    if len(rounds) > 1:
        spread = f"rounds {' '.join(f'{r.rate:.0f}' for r in rounds)} msg/s"
        middle.note = f"{spread}; {middle.note}" if middle.note else spread
    middle.problems = [p for r in rounds for p in r.problems]
    return middle


LEGEND = (
    "  msg/s: first delivery to last ack.  me / pg / mq: CPU microseconds per message of this\n"
    "  process, this run's PostgreSQL backends, and RabbitMQ (shared).  cs: context switches of\n"
    "  this process's threads per message.  other: CPU the rest of the machine used meanwhile,\n"
    "  in % of one core (other users' load: noise)."
)


# --------------------------------------------------------------------------- main


def parse_pairs(value: str, size: int) -> list[tuple[int, ...]]:
    out = []
    for part in value.split(","):
        if part.strip():
            numbers = tuple(int(x) for x in part.strip().split("/"))
            if len(numbers) != size or min(numbers) < 1:
                raise SystemExit(f"bad setting {part!r}: want {size} positive numbers a/b...")
            out.append(numbers)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--database-url", default=os.environ.get("OUTBOX_BENCH_URL", DEFAULT_DB))
    parser.add_argument("--amqp-url", default=os.environ.get("OUTBOX_BENCH_AMQP_URL", DEFAULT_AMQP))
    parser.add_argument("--messages", type=int, default=20_000, help="per measurement (20000)")
    parser.add_argument(
        "--settings",
        default="256/16,128/16",
        help="Consumer prefetch/concurrency pairs; the first is also the baselines' (256/16,...)",
    )
    parser.add_argument(
        "--batch",
        default="256/4/64",
        help="batch prototype prefetch/workers/max-batch triples (256/4/64)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="run every arm R times; median")
    parser.add_argument("--queue-type", choices=("quorum", "classic"), default="quorum")
    parser.add_argument("--timeout", type=float, default=55.0, help="per measurement, seconds")
    parser.add_argument("--quick", action="store_true", help="2000 messages, no profile")
    parser.add_argument("--no-ladder", action="store_true", help="skip decomposition and batches")
    parser.add_argument(
        "--no-variants",
        action="store_true",
        help="skip the receipts=False, async def and handler-writes-nothing arms",
    )
    parser.add_argument("--no-units", action="store_true", help="skip the unit costs")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--profile", action="store_true", help="profile even with --quick")
    parser.add_argument("--profile-rate", type=int, default=100, help="py-spy samples/s (100)")
    parser.add_argument("--keep-profile", type=Path, help="copy py-spy's output to this folder")
    parser.add_argument("--json", help="also write the figures to this file (benchmarks/run)")
    parser.add_argument(
        "--processes",
        type=int,
        default=0,
        help="also run (a) and (c) at the first setting in this many worker processes (2+)",
    )
    # One worker process of --processes (internal).
    parser.add_argument("--worker", choices=("raw", "consumer"), help=argparse.SUPPRESS)
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.messages = min(args.messages, 2000)
    args.do_profile = args.profile or not (args.quick or args.no_profile)
    return args


async def run(args: argparse.Namespace) -> int:
    global EXECUTE_LINES
    configure_logging("WARNING")  # as `outbox consume` would, without the info lines
    name = f"{APP}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    stage = Stage(args.database_url, args.amqp_url, name, args.queue_type)
    settings = parse_pairs(args.settings, 2)
    batch_settings = parse_pairs(args.batch, 3)
    n = args.messages
    small = max(1, n // 2)  # the ladder and the batch prototype: rates, not totals
    prefetch, concurrency = settings[0]
    consumers: list[Consumer] = []
    results: list[Result] = []
    started = time.perf_counter()
    print(f"consumer benchmark: {n} messages per measurement", flush=True)
    print(f"database {redact_url(args.database_url)}  broker {redact_url(args.amqp_url)}")
    stage.create_schema()
    failed = False
    try:
        await stage.open()
        assert stage.publisher is not None
        transport: Any = stage.publisher.transport
        server = dict(getattr(transport.connection, "server_properties", None) or {})
        for line in machine_info(stage, server):
            print(line, flush=True)
        print(f"schema / exchange / queue prefix: {name}", flush=True)
        print(f"async handler, ladder and batch prototype: {small} messages each", flush=True)
        print(
            f"(a), (b) and the ladder use prefetch {prefetch} and {concurrency} threads; "
            f"receipts {'on (default)' if stage.receipts else 'not in this version'}",
            flush=True,
        )
        print(LEGEND, flush=True)

        async def measure(arm: Callable[[], Awaitable[Result]], effects: bool = True) -> Result:
            stage.truncate()
            t = time.perf_counter()
            result = await arm()
            depth = await stage.queue_depth()
            if depth:
                result.problems.append(f"{depth} messages left in the queue")
                await stage.purge()
            if stage.receipts is not None:
                await stage.purge(stage.receipts[1])
            rows, distinct, _ = stage.counts()
            expected = result.n if effects else 0
            if rows != expected or distinct != rows:
                result.problems.append(
                    f"effect rows {rows} (distinct {distinct}), expected {expected}"
                )
            results.append(result)
            lines = show([result], None, None)
            if len(results) == 1:
                print(lines[0], flush=True)
            for line in lines[1:]:
                print(f"{line}   [{time.perf_counter() - t:.0f}s]", flush=True)
            return result

        def no_work() -> tuple[Work | None, Callable[[], None]]:
            return None, lambda: None

        def noop_work() -> tuple[Work | None, Callable[[], None]]:
            return (lambda body, mid: None), lambda: None

        def raw_arm(label: str, make: Any, count: int = n) -> Callable[[], Awaitable[Result]]:
            return lambda: run_raw(stage, label, count, prefetch, concurrency, make, args.timeout)

        def consumer_arm(
            label: str,
            p: int,
            c: int,
            receipts: bool = True,
            asynchronous: bool = False,
            count: int = n,
            effect: bool = True,
        ) -> Callable[[], Awaitable[Result]]:
            return lambda: run_consumer(
                stage,
                label,
                count,
                p,
                c,
                args.timeout,
                consumers,
                receipts=receipts,
                asynchronous=asynchronous,
                effect=effect,
            )

        def batch_arm(
            label: str, bp: int, workers: int, max_batch: int, mode: BatchMode
        ) -> Callable[[], Awaitable[Result]]:
            return lambda: run_batched(
                stage, label, small, bp, workers, max_batch, mode, args.timeout
            )

        # (label, arm, expects one effect row per message)
        arms: list[tuple[str, Callable[[], Awaitable[Result]], bool]] = [
            (RAW, raw_arm(RAW, no_work), False),
            (DB, raw_arm(DB, lambda: psycopg_work(stage, concurrency)), True),
        ]
        for p, c in settings:
            label = f"(c) Consumer {p}/{c}"
            arms.append((label, consumer_arm(label, p, c), True))
        if stage.receipts is not None and not args.no_variants:
            label = f"(c) Consumer {prefetch}/{concurrency} receipts=False"
            arms.append((label, consumer_arm(label, prefetch, concurrency, False), True))
        if args.processes >= 2:
            for kind, effects in (("raw", False), ("consumer", True)):
                label = processes_label(kind, args.processes, prefetch, concurrency)
                arms.append(
                    (
                        label,
                        lambda kind=kind: run_processes(
                            stage, kind, args.processes, n, prefetch, concurrency, args.timeout
                        ),
                        effects,
                    )
                )
        if not args.no_variants:
            label = f"(c) Consumer {prefetch}/{concurrency} async def handler"
            arms.append(
                (label, consumer_arm(label, prefetch, concurrency, True, True, small), True)
            )
            label = f"(c) Consumer {prefetch}/{concurrency} {NOTHING}"
            arms.append((label, consumer_arm(label, prefetch, concurrency, effect=False), False))
        if not args.no_ladder:
            ladder = [
                ("ladder: (a) + thread handoff of a no-op", noop_work, False),
                (
                    "ladder: Session + INSERT + commit",
                    lambda: session_work(stage, concurrency, False),
                    True,
                ),
                (
                    "ladder: Session + inbox + INSERT + commit",
                    lambda: session_work(stage, concurrency, True),
                    True,
                ),
            ]
            for label, make, effects in ladder:
                arms.append((label, raw_arm(label, make, small), effects))
            modes: list[tuple[BatchMode, str]] = [
                ("savepoint", "SAVEPOINT/msg"),
                ("plain", "no SAVEPOINT"),
                ("bulk", "bulk inbox"),
            ]
            for index, (bp, workers, max_batch) in enumerate(batch_settings):
                for mode, what in modes if index == 0 else modes[:1]:
                    label = f"batch {bp}/{workers}x{max_batch} {what}"
                    arms.append((label, batch_arm(label, bp, workers, max_batch, mode), True))

        for round_ in range(args.rounds):
            if args.rounds > 1:
                print(f"round {round_ + 1}/{args.rounds}", flush=True)
            # Odd rounds run backwards, so that a drift in the machine's load evens out.
            for _, arm, effects in arms if round_ % 2 == 0 else arms[::-1]:
                await measure(arm, effects)

        summary = [median(results, label) for label, _, _ in arms]
        raw = summary[0]
        db = summary[1]
        print("", flush=True)
        what = "medians of rounds, " if args.rounds > 1 else ""
        print(f"summary ({what}ratios against (a) raw consume+ack and (b) raw + INSERT):")
        for line in show(summary, raw, db):
            print(line, flush=True)
        if args.json:
            write_json(args.json, "consumer", figures(summary, raw, db), messages=n)

        if not args.no_units:
            iterations = 300 if args.quick else 1000
            print(
                f"\nunit costs of the handler path (one thread, one connection, no broker, "
                f"{iterations} times each; us per operation):",
                flush=True,
            )
            stage.truncate()
            costs = [await handoff_cost(iterations)]
            costs += await asyncio.to_thread(unit_costs, stage, iterations)
            print(f"  {'operation':<72} {'wall':>6} {'CPU':>6}")
            for cost in costs:
                print(f"  {cost.label:<72} {cost.wall_us:6.0f} {cost.cpu_us:6.0f}")
            stage.truncate()

        if args.do_profile:
            if py_spy_path() is None:
                print("\nprofile: py-spy not found (pip install py-spy); skipped")
            else:
                with tempfile.TemporaryDirectory(prefix="bench_consumer_") as tmp:
                    directory = Path(tmp)
                    EXECUTE_LINES = _execute_lines()
                    print(
                        f"\nprofile: Consumer {prefetch}/{concurrency} under py-spy "
                        f"({args.profile_rate} Hz, --nonblocking; py-spy itself costs CPU)",
                        flush=True,
                    )
                    stage.truncate()
                    prof = await run_consumer(
                        stage, f"(c) Consumer {prefetch}/{concurrency} profiled",
                        min(n, 8000), prefetch,
                        concurrency, args.timeout, consumers,
                        profile=make_profiler(directory, args.profile_rate),
                    )  # fmt: skip
                    if stage.receipts is not None:
                        await stage.purge(stage.receipts[1])
                    for line in show([prof], raw, db)[1:]:
                        print(line)
                    report_profile(directory, args.keep_profile)
    except Exception:
        traceback.print_exc()
        failed = True
    finally:
        for running in consumers:  # left running by an error
            with contextlib.suppress(Exception):
                await running.stop()
        # What a Consumer of this stage declares (names only: this one never starts).
        names = Consumer(GROUP, database_url=stage.url("x"), config=stage.config(1, 1))
        queues = [
            names.queue,
            names.ordered_queue,
            names.dead_queue,
            *(names.retry_queue(t) for t in names.config.retry_tiers),
        ]
        await stage.cleanup(queues)
        stage.drop_schema()
    print(f"\ntotal {time.perf_counter() - started:.0f}s", flush=True)
    return 1 if failed or any(r.problems for r in results) else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threading.current_thread().name = "bench"
    if args.worker:
        asyncio.run(run_worker(args))
        return 0
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
