"""Producer overhead: business transactions per second with and without an outbox row.

Three variants of one business transaction, all through the same access path (a
SQLAlchemy ``Connection`` from one engine per client process, one connection held
per client, one ``with conn.begin():`` block per transaction):

(a) ``INSERT INTO orders ... RETURNING id``; COMMIT                 (no outbox row)
(b) (a) plus a hand-written minimal INSERT into ``raw_outbox``, a copy of
    ``outbox_message`` (same columns, constraints and indexes): the unavoidable
    cost of the row, without framework logic
(c) (a) plus ``outbox.publish(conn, "orders.created", payload, key=customer)``

(c)/(a) is what a user pays for the outbox; (c)/(b) is the framework's overhead
beyond the row itself. Clients are threads spread over one or more processes (on
a 2-core machine the GIL of one process can be the limit); by default both
layouts are tried on (a) and the faster one is used for all three variants.

Each measurement warms up first, tables are emptied before each one, and the
variants run in rotated order over several rounds; the median is reported. CPU per
committed transaction (client processes, and their PostgreSQL backends when the
server is local) is read from /proc around each measurement: once the cores are
saturated it predicts the ratios with less noise than the rates. A measurement is
repeated while other processes load the machine (--max-other-load). --breakdown
times one outbox row step by step (validation and encoding, the statement, the
RETURNING that SQLAlchemy adds) in a hot loop.

    python benchmarks/producer.py [--database-url URL] [--seconds N] [--clients 1,16]
                                  [--rounds 3] [--breakdown]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import threading
import time
import traceback
import uuid
import zlib
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import sqlalchemy
from sqlalchemy import create_engine, func, insert, text

if TYPE_CHECKING:
    from collections.abc import Callable
    from multiprocessing.connection import Connection as PipeEnd

    from sqlalchemy.engine import Connection, Engine

# Run as a script from a checkout: make the project importable without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from report import Figure, write_json

import outbox
from outbox.tables import SHARD_COUNT, outbox_table

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
VARIANTS = ("a", "b", "c")
LABELS = {
    "a": "orders only",
    "b": "orders + raw outbox INSERT",
    "c": "orders + outbox.publish",
}
TOPIC = "orders.created"

INSERT_ORDER = text(
    "INSERT INTO orders (customer, amount, created_at) "
    "VALUES (:customer, :amount, now()) RETURNING id"
)
# The least a hand-made outbox needs: the values that vary are bound, the constant
# ones are literals, the clock is the database's.
INSERT_RAW = text(
    "INSERT INTO raw_outbox (message_id, topic, key, shard, status, payload, content_type, "
    "headers, attempts, next_attempt_at, created_at, updated_at, checks) "
    "VALUES (:message_id, :topic, :key, :shard, 'pending', :payload, 'application/json', "
    "'{}', 0, now(), now(), now(), 0)"
)


# --------------------------------------------------------------------------- transactions


def _order_params(n: int) -> dict[str, Any]:
    return {"customer": f"customer-{n % 1000}", "amount": Decimal(n % 100_000) / 100}


def tx_orders(conn: Connection, n: int) -> None:
    """(a) The business transaction alone."""
    with conn.begin():
        conn.execute(INSERT_ORDER, _order_params(n)).scalar_one()


def tx_raw_outbox(conn: Connection, n: int) -> None:
    """(b) The business transaction plus a minimal hand-written outbox row."""
    params = _order_params(n)
    with conn.begin():
        order_id = conn.execute(INSERT_ORDER, params).scalar_one()
        customer = params["customer"]
        payload = {"order_id": order_id, "customer": customer, "amount": str(params["amount"])}
        conn.execute(
            INSERT_RAW,
            {
                "message_id": uuid.uuid4(),
                "topic": TOPIC,
                "key": customer,
                "shard": zlib.crc32(customer.encode()) % SHARD_COUNT,
                "payload": json.dumps(payload, separators=(",", ":")).encode(),
            },
        )


def tx_publish(conn: Connection, n: int) -> None:
    """(c) The business transaction plus ``outbox.publish``."""
    params = _order_params(n)
    with conn.begin():
        order_id = conn.execute(INSERT_ORDER, params).scalar_one()
        customer = params["customer"]
        payload = {"order_id": order_id, "customer": customer, "amount": str(params["amount"])}
        outbox.publish(conn, TOPIC, payload, key=customer)


TRANSACTIONS: dict[str, Callable[[Connection, int], None]] = {
    "a": tx_orders,
    "b": tx_raw_outbox,
    "c": tx_publish,
}


# --------------------------------------------------------------------------- database


def make_engine(url: str, schema: str, pool_size: int) -> Engine:
    """An engine whose connections work in ``schema`` (search_path), pooled for the clients."""
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,
        connect_args={"options": f"-c search_path={schema}"},
    )


def create_schema(admin: Engine, schema: str) -> None:
    with admin.begin() as conn:
        conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        conn.execute(text(f"CREATE SCHEMA {schema}"))
        conn.execute(text(f"SET LOCAL search_path TO {schema}"))
        conn.execute(
            text(
                "CREATE TABLE orders (id bigserial PRIMARY KEY, customer text NOT NULL, "
                "amount numeric(12, 2) NOT NULL, created_at timestamptz NOT NULL)"
            )
        )
        outbox.metadata.create_all(conn)
        conn.execute(text("CREATE TABLE raw_outbox (LIKE outbox_message INCLUDING ALL)"))


def drop_schema(admin: Engine, schema: str) -> None:
    with admin.begin() as conn:
        conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))


def reset_tables(admin: Engine, schema: str) -> None:
    """Empty the tables so that every measurement starts from the same size."""
    with admin.begin() as conn:
        conn.execute(
            text(f"TRUNCATE {schema}.orders, {schema}.outbox_message, {schema}.raw_outbox")
        )
    try:
        # Start each measurement right after a checkpoint, so that none lands in the
        # middle of one variant only (needs superuser or pg_checkpoint; skipped otherwise).
        with admin.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("CHECKPOINT"))
    except sqlalchemy.exc.DBAPIError:
        pass


def count_rows(admin: Engine, schema: str) -> dict[str, int]:
    with admin.connect() as conn:
        return {
            table: int(conn.execute(text(f"SELECT count(*) FROM {schema}.{table}")).scalar_one())
            for table in ("orders", "raw_outbox", "outbox_message")
        }


def check_rows(variant: str, rows: dict[str, int]) -> None:
    """Every committed business transaction wrote exactly its outbox row, no more."""
    expected = {
        "a": {"raw_outbox": 0, "outbox_message": 0},
        "b": {"raw_outbox": rows["orders"], "outbox_message": 0},
        "c": {"raw_outbox": 0, "outbox_message": rows["orders"]},
    }[variant]
    for table, n in expected.items():
        if rows[table] != n:
            raise RuntimeError(f"variant {variant}: {table} has {rows[table]} rows, expected {n}")


def server_info(admin: Engine) -> dict[str, str]:
    with admin.connect() as conn:
        info = {"version": str(conn.execute(text("SELECT version()")).scalar_one())}
        for name in (
            "synchronous_commit",
            "fsync",
            "wal_sync_method",
            "shared_buffers",
            "max_connections",
        ):
            info[name] = str(conn.execute(text(f"SHOW {name}")).scalar_one())
    return info


# --------------------------------------------------------------------------- CPU accounting

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) used so far by ``pid``, None when /proc cannot tell."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK


def machine_busy() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    ticks = [int(x) for x in first[1:9]]  # user nice system idle iowait irq softirq steal
    idle = ticks[3] + ticks[4]
    return (sum(ticks) - idle) / _TICK, sum(ticks) / _TICK


def backends_cpu(pids: list[int]) -> float | None:
    total = 0.0
    for pid in pids:
        cpu = process_cpu(pid)
        if cpu is None:
            return None  # the server is not on this machine (or not visible)
        total += cpu
    return total


# --------------------------------------------------------------------------- clients


@dataclass
class _Client:
    """One client: its connection, its next order number, what its last run did."""

    conn: Connection
    n: int
    done: int = 0
    error: str | None = None

    def run(self, tx: Callable[[Connection, int], None], start_at: float, end_at: float) -> None:
        self.done, self.error = 0, None
        try:
            while time.time() < end_at:
                tx(self.conn, self.n)
                self.n += 1
                if time.time() >= start_at:  # committed after the warm-up
                    self.done += 1
        except Exception:
            self.error = traceback.format_exc()


def _worker(pipe: PipeEnd, url: str, schema: str, threads: int, first_client: int) -> None:
    """One client process: ``threads`` clients, each holding its own connection."""
    try:
        engine = make_engine(url, schema, threads)
        clients = [
            _Client(engine.connect(), (first_client + i) * 10_000_000) for i in range(threads)
        ]
        pids = []
        for c in clients:
            pids.append(int(c.conn.execute(text("SELECT pg_backend_pid()")).scalar_one()))
            c.conn.rollback()
        pipe.send(("ready", pids))
    except Exception:
        pipe.send(("error", traceback.format_exc()))
        return
    while True:
        command = pipe.recv()
        if command[0] == "stop":
            break
        _, variant, start_at, end_at = command
        workers = [
            threading.Thread(target=c.run, args=(TRANSACTIONS[variant], start_at, end_at))
            for c in clients
        ]
        for w in workers:
            w.start()
        time.sleep(max(0.0, start_at - time.time()))
        cpu0 = time.process_time()
        for w in workers:
            w.join()
        cpu = time.process_time() - cpu0
        errors = [c.error for c in clients if c.error]
        if errors:
            pipe.send(("error", errors[0]))
        else:
            pipe.send(("ok", (sum(c.done for c in clients), cpu)))
    for c in clients:
        c.conn.close()
    engine.dispose()


@dataclass(frozen=True)
class Measurement:
    """One run of one variant: throughput, and the CPU it cost per transaction."""

    tx_per_s: float
    client_us: float  # CPU of the client processes per committed transaction
    server_us: float | None  # CPU of their PostgreSQL backends per transaction (local server)
    other_pct: float | None  # CPU used by everything else on the machine, % of all cores

    @property
    def total_us(self) -> float | None:
        return None if self.server_us is None else self.client_us + self.server_us


@dataclass
class Fleet:
    """``clients`` clients as threads spread evenly over ``processes`` processes."""

    url: str
    schema: str
    clients: int
    processes: int
    _pipes: list[PipeEnd] = field(default_factory=list)
    _procs: list[Any] = field(default_factory=list)
    _backends: list[int] = field(default_factory=list)

    @property
    def layout(self) -> str:
        per = self.clients // self.processes
        extra = self.clients % self.processes
        threads = f"{per}" if not extra else f"{per}-{per + 1}"
        return f"{self.processes} proc x {threads} thr"

    def start(self) -> Fleet:
        ctx = mp.get_context("spawn")
        first = 0
        for p in range(self.processes):
            threads = self.clients // self.processes + (p < self.clients % self.processes)
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker,
                args=(child, self.url, self.schema, threads, first),
                daemon=True,
            )
            proc.start()
            self._pipes.append(parent)
            self._procs.append(proc)
            first += threads
        for pipe in self._pipes:
            self._backends.extend(self._expect(pipe))
        return self

    def run(self, variant: str, warmup: float, seconds: float) -> Measurement:
        """Run ``variant`` on every client for ``seconds`` after ``warmup``."""
        start_at = time.time() + 0.2 + warmup  # 0.2 s for the command to reach every process
        end_at = start_at + seconds
        for pipe in self._pipes:
            pipe.send(("run", variant, start_at, end_at))
        time.sleep(max(0.0, start_at - time.time()))
        server0, machine0 = backends_cpu(self._backends), machine_busy()
        replies = [self._expect(pipe) for pipe in self._pipes]
        server1, machine1 = backends_cpu(self._backends), machine_busy()
        done = sum(r[0] for r in replies)
        client_cpu = sum(r[1] for r in replies)
        per_tx = 1e6 / max(done, 1)
        server_us = other = None
        if server0 is not None and server1 is not None:
            server_us = (server1 - server0) * per_tx
            if machine0 is not None and machine1 is not None:
                busy, total = machine1[0] - machine0[0], machine1[1] - machine0[1]
                ours = client_cpu + server1 - server0
                other = max(0.0, busy - ours) / total * 100 if total > 0 else None
        return Measurement(done / seconds, client_cpu * per_tx, server_us, other)

    def stop(self) -> None:
        for pipe in self._pipes:
            with contextlib.suppress(BrokenPipeError, OSError):
                pipe.send(("stop",))
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()

    @staticmethod
    def _expect(pipe: PipeEnd) -> Any:
        status, value = pipe.recv()
        if status == "error":
            raise RuntimeError(f"client process failed:\n{value}")
        return value


# --------------------------------------------------------------------------- driver


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


@dataclass
class Result:
    clients: int
    layout: str
    rounds: dict[str, list[Measurement]]
    layout_trials: dict[str, list[float]]

    def rate(self, variant: str) -> float:
        return statistics.median(m.tx_per_s for m in self.rounds[variant])

    def spread(self, variant: str) -> tuple[float, float]:
        rates = [m.tx_per_s for m in self.rounds[variant]]
        return min(rates), max(rates)

    def client_us(self, variant: str) -> float | None:
        return _median([m.client_us for m in self.rounds[variant]])

    def server_us(self, variant: str) -> float | None:
        return _median([m.server_us for m in self.rounds[variant]])

    def total_us(self, variant: str) -> float | None:
        return _median([m.total_us for m in self.rounds[variant]])

    def other_pct(self) -> float | None:
        return _median([m.other_pct for ms in self.rounds.values() for m in ms])


def measure(fleet: Fleet, admin: Engine, schema: str, variant: str, args: Any) -> Measurement:
    """Measure ``variant`` once; while other work loads the machine more than
    --max-other-load, measure again (up to --retries times) and keep the quietest attempt."""
    attempts: list[Measurement] = []
    while True:
        reset_tables(admin, schema)
        m = fleet.run(variant, args.warmup, args.seconds)
        check_rows(variant, count_rows(admin, schema))
        attempts.append(m)
        if m.other_pct is None or m.other_pct <= args.max_other_load:
            return m
        if len(attempts) > args.retries:
            return min(attempts, key=lambda x: x.other_pct or 0.0)
        print(f"    ({variant}) {_show(m)}: busy machine, measuring again", flush=True)


def _show(m: Measurement) -> str:
    parts = [f"{m.tx_per_s:8.0f} tx/s", f"client {m.client_us:5.0f} us/tx"]
    if m.server_us is not None:
        parts.append(f"server {m.server_us:5.0f} us/tx")
    if m.other_pct is not None:
        parts.append(f"other load {m.other_pct:4.1f}%")
    return "  ".join(parts)


def choose_layout(
    url: str, schema: str, clients: int, admin: Engine, args: Any
) -> tuple[Fleet, dict[str, list[float]]]:
    """Start the client layout that commits the most (a) transactions per second."""
    if args.processes:
        candidates = [min(int(p), clients) for p in args.processes.split(",")]
    else:
        candidates = [1, min(clients, 2 * (os.cpu_count() or 1))]
    candidates = sorted(set(candidates))
    fleets = [Fleet(url, schema, clients, p).start() for p in candidates]
    if len(fleets) == 1:
        return fleets[0], {}
    trials: dict[str, list[float]] = {f.layout: [] for f in fleets}
    for r in range(args.layout_rounds):
        order = fleets if r % 2 == 0 else fleets[::-1]
        for f in order:
            m = measure(f, admin, schema, "a", args)
            trials[f.layout].append(m.tx_per_s)
            print(f"  layout {f.layout:<18} (a) {_show(m)}", flush=True)
    best = max(fleets, key=lambda f: statistics.median(trials[f.layout]))
    for f in fleets:
        if f is not best:
            f.stop()
    return best, trials


def run_clients(url: str, schema: str, clients: int, admin: Engine, args: Any) -> Result:
    print(f"\n{clients} client(s):", flush=True)
    fleet, trials = choose_layout(url, schema, clients, admin, args)
    rounds: dict[str, list[Measurement]] = {v: [] for v in VARIANTS}
    try:
        for r in range(args.rounds):
            # Rotate the order (abc, bca, cab, ...) so that no variant always runs first.
            k = r % len(VARIANTS)
            for variant in VARIANTS[k:] + VARIANTS[:k]:
                m = measure(fleet, admin, schema, variant, args)
                rounds[variant].append(m)
                print(f"  round {r + 1} {fleet.layout:<18} ({variant}) {_show(m)}", flush=True)
    finally:
        fleet.stop()
    return Result(clients, fleet.layout, rounds, trials)


# --------------------------------------------------------------------------- breakdown

# publish's statement as the producer builds it on PostgreSQL: a Core INSERT of the
# row from build_row() (SQLAlchemy adds RETURNING id for inserted_primary_key)...
CORE_INSERT = insert(outbox_table).values(next_attempt_at=func.now())
# ...the same without RETURNING...
CORE_INSERT_INLINE = CORE_INSERT.inline()
# ...and the same row sent as a text() statement, with no Core compilation step.
TEXT_INSERT = text(
    "INSERT INTO outbox_message (message_id, topic, key, shard, status, payload, content_type, "
    "headers, attempts, next_attempt_at, created_at, updated_at, checks) "
    "VALUES (:message_id, :topic, :key, :shard, :status, :payload, :content_type, "
    "CAST(:headers AS jsonb), :attempts, now(), :created_at, :updated_at, :checks)"
)


def breakdown(url: str, schema: str, calls: int, reps: int) -> None:
    """Client CPU of one outbox row, step by step, in a hot loop on one connection.

    No business row and no commit per row (a commit every 200 rows, asynchronous), so
    what is left is the Python work of building and sending the row.
    """
    producer = outbox.Producer()
    payload = {"order_id": 12345, "customer": "customer-7", "amount": "123.45"}
    key = "customer-7"

    def row() -> dict[str, Any]:
        return producer.build_row(TOPIC, payload, key=key)[0]

    engine = make_engine(url, schema, 1)
    with engine.connect() as conn:
        conn.execute(text("SET synchronous_commit = off"))
        conn.commit()

        def raw() -> None:
            conn.execute(
                INSERT_RAW,
                {
                    "message_id": uuid.uuid4(),
                    "topic": TOPIC,
                    "key": key,
                    "shard": zlib.crc32(key.encode()) % SHARD_COUNT,
                    "payload": json.dumps(payload, separators=(",", ":")).encode(),
                },
            )

        def as_text() -> None:
            values = row()
            values["headers"] = json.dumps(values["headers"])
            conn.execute(TEXT_INSERT, values)

        steps: dict[str, Callable[[], object]] = {
            "(b) raw text() INSERT, as in (b)": raw,
            "(c) outbox.publish(conn, ...)": lambda: outbox.publish(conn, TOPIC, payload, key=key),
            "build_row + Core INSERT (publish's statement)": lambda: conn.execute(
                CORE_INSERT, row()
            ),
            "build_row + Core INSERT .inline() (no RETURNING)": lambda: conn.execute(
                CORE_INSERT_INLINE, row()
            ),
            "build_row + text() INSERT of the same row": as_text,
            "build_row alone (validate, encode, uuid7)": row,
        }
        cpu: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(reps):
            for name, step in steps.items():
                for _ in range(300):  # warm the statement caches and psycopg's prepare
                    step()
                conn.commit()
                start = time.process_time()
                for i in range(calls):
                    step()
                    if i % 200 == 199:
                        conn.commit()
                cpu[name].append((time.process_time() - start) / calls * 1e6)
                conn.commit()
                conn.execute(text("TRUNCATE outbox_message, raw_outbox"))
                conn.commit()
    engine.dispose()
    print(f"\nclient CPU per outbox row, us (hot loop, {calls} calls, min / median of {reps}):")
    base = min(cpu["(b) raw text() INSERT, as in (b)"])
    for name, values in cpu.items():
        print(
            f"  {name:<50} {min(values):6.1f} / {statistics.median(values):6.1f}"
            f"   ({min(values) - base:+6.1f} vs raw)"
        )


def print_machine(info: dict[str, str]) -> None:
    cpus = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    before = machine_busy()
    time.sleep(1.0)
    after = machine_busy()
    print("machine:")
    print(f"  nproc               {usable} (cpu_count {cpus}) {model}")
    print(f"  load average        {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if before is not None and after is not None and after[1] > before[1]:
        busy = (after[0] - before[0]) / (after[1] - before[1]) * 100
        warn = "  <- not idle: other work will skew the figures" if busy > 10 else ""
        print(f"  CPU busy before run {busy:.0f}%{warn}")
    print(f"  PostgreSQL          {info['version']}")
    for name in ("synchronous_commit", "fsync", "wal_sync_method", "shared_buffers"):
        print(f"  {name:<19} {info[name]}")
    print(
        f"  Python {platform.python_version()}, SQLAlchemy {sqlalchemy.__version__}, "
        f"psycopg {psycopg.__version__}"
    )


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_table(results: list[Result], target: float) -> None:
    print("\nbusiness transactions per second (median of rounds; min-max in brackets):")
    header = (
        f"{'clients':>7}  {'layout':<16} {'(a) tx/s':>18} {'(b) tx/s':>18} {'(c) tx/s':>18}"
        f"  {'c/a':>5}  {'c/b':>5}"
    )
    print(header)
    print("-" * len(header))
    for res in results:
        cells = []
        for v in VARIANTS:
            lo, hi = res.spread(v)
            cells.append(f"{res.rate(v):>6.0f} [{lo:.0f}-{hi:.0f}]".rjust(18))
        a, b, c = (res.rate(v) for v in VARIANTS)
        print(f"{res.clients:>7}  {res.layout:<16} {' '.join(cells)}  {c / a:>5.3f}  {c / b:>5.3f}")

    print("\nCPU per committed transaction, us (median; client processes + their backends):")
    header = (
        f"{'clients':>7}  {'(a) cli+srv':>13} {'(b) cli+srv':>13} {'(c) cli+srv':>13}"
        f"  {'b/c total':>9}  {'other load':>10}"
    )
    print(header)
    print("-" * len(header))
    for res in results:
        cells = [
            f"{_fmt(res.client_us(v), '.0f')}+{_fmt(res.server_us(v), '.0f')}".rjust(13)
            for v in VARIANTS
        ]
        tb, tc = res.total_us("b"), res.total_us("c")
        cpu_ratio = None if tb is None or tc is None else tb / tc
        print(
            f"{res.clients:>7}  {' '.join(cells)}  {_fmt(cpu_ratio, '.3f'):>9}"
            f"  {_fmt(res.other_pct(), '.1f'):>9}%"
        )
    print()
    for v in VARIANTS:
        print(f"  ({v}) {LABELS[v]}")
    print(
        "  b/c total: CPU of (b) / CPU of (c) per transaction; when the cores are saturated "
        "it predicts (c)/(b) without the noise of other work on the machine"
    )
    print("  other load: CPU used by other processes during the runs, % of all cores")
    largest = max(results, key=lambda r: r.clients)
    ratio = largest.rate("c") / largest.rate("b")
    verdict = "meets" if ratio >= target else "MISSES"
    print(
        f"\n(c)/(b) at {largest.clients} clients = {ratio:.3f}: {verdict} the target "
        f">= {target:.2f}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--database-url", default=os.environ.get("OUTBOX_BENCH_URL", DEFAULT_URL))
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement (5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="before each measurement (1)")
    parser.add_argument("--clients", default="1,16", help="comma-separated client counts")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of a,b,c; median (3)")
    parser.add_argument(
        "--processes",
        default="",
        help="comma-separated process counts to try on (a), the fastest is used; "
        "default: 1 (all clients threads of one process) and 2 x nproc",
    )
    parser.add_argument("--layout-rounds", type=int, default=2, help="rounds per layout (2)")
    parser.add_argument(
        "--max-other-load",
        type=float,
        default=15.0,
        help="repeat a measurement when other processes used more than this %% of the CPU (15)",
    )
    parser.add_argument("--retries", type=int, default=3, help="repeats for --max-other-load")
    parser.add_argument("--target", type=float, default=0.95, help="(c)/(b) goal at max clients")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also time one outbox row step by step (client CPU, hot loop)",
    )
    parser.add_argument("--schema", default=f"bench_producer_{os.getpid()}")
    parser.add_argument("--json", help="also write the figures to this file (benchmarks/run)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    admin = create_engine(args.database_url, pool_size=2, max_overflow=0)
    print_machine(server_info(admin))
    print(
        f"\n{args.seconds:g} s per measurement after {args.warmup:g} s warm-up, "
        f"{args.rounds} rounds in rotated order, tables truncated before each; schema {args.schema}"
    )
    create_schema(admin, args.schema)
    try:
        results = [run_clients(args.database_url, args.schema, n, admin, args) for n in clients]
        if args.breakdown:
            breakdown(args.database_url, args.schema, calls=10_000, reps=7)
    finally:
        drop_schema(admin, args.schema)
        admin.dispose()
    print()
    for res in results:
        for layout, rates in res.layout_trials.items():
            rates_s = ", ".join(f"{x:.0f}" for x in rates)
            print(f"layout trial, {res.clients} clients, {layout}: (a) {rates_s} tx/s")
    if results:
        print_table(results, args.target)
    if args.json:
        write_json(
            args.json,
            "producer",
            [
                figure
                for res in results
                for figure in (
                    Figure(
                        name=f"producer: order + outbox.publish, {res.clients} client(s)",
                        value=res.rate("c"),
                        unit="tx/s",
                        baseline_name="order + hand-written outbox INSERT",
                        baseline=res.rate("b"),
                        target=args.target if res.clients == max(clients) else None,
                    ),
                    Figure(
                        name=f"producer: order + outbox.publish, {res.clients} client(s)",
                        value=res.rate("c"),
                        unit="tx/s",
                        baseline_name="order alone, no outbox row",
                        baseline=res.rate("a"),
                    ),
                )
            ],
            seconds=args.seconds,
            rounds=args.rounds,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
