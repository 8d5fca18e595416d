"""The relay: publishes committed outbox rows to the broker, and never loses one.

Each round claims (keyless) or reads (keyed, per owned shard) a batch, publishes
it with publisher confirms as one pipelined window, then records the outcome.
Rows are marked published only after the broker confirmed them (invariant 1);
a relay killed in between leaves its rows pending, and they are published again
(at-least-once; consumers dedupe through the inbox).

Keyed messages keep their order: a round publishes them in waves, the n-th
message of every key in wave n, so a later message of a key is sent only after
the earlier one was confirmed, and a key whose message failed sits out the rest
of the round and then waits for its backoff, holding back nothing but itself.
Two keyed rounds overlap, never on the same key.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from collections import deque
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from outbox.broker import PublishOutcome, PublishResult
from outbox.engines import make_async_engine
from outbox.envelope import WireFormat
from outbox.errors import BrokerError, DatabaseError
from outbox.health import HealthServer, database_reachable
from outbox.jobs import Jobs
from outbox.logs import get_logger
from outbox.tables import SHARD_COUNT, outbox_table
from outbox.tasks import finish_or_cancel
from relay.checkbacks import CheckbackSweep
from relay.config import RelayConfig, UnroutablePolicy
from relay.metrics import RelayMetrics
from relay.receipts import ReceiptRecorder, carries_receipts
from relay.shards import ShardOwner
from relay.store import Failure, RelayStore, Row

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from sqlalchemy.ext.asyncio import AsyncEngine

    from outbox.broker import Broker
    from relay.checkbacks import CheckbackSource

__all__ = ["Relay"]

_ALL_SHARDS = tuple(range(SHARD_COUNT))
_DB_ERRORS = (sa.exc.DBAPIError, sa.exc.InterfaceError, OSError, DatabaseError)


class Relay:
    """One relay process's work; several may run against one outbox database.

    ``async with Relay(config) as relay: ...`` or ``await relay.run()`` (which also
    stops cleanly on SIGTERM and SIGINT). Give ``broker`` (say, an
    ``InMemoryBroker``) or ``engine`` to use those instead of the configured URLs.
    ``app`` (an ``outbox.Outbox``) supplies the check-backs of half messages.
    """

    def __init__(
        self,
        config: RelayConfig,
        *,
        broker: Broker | None = None,
        engine: AsyncEngine | None = None,
        metrics: RelayMetrics | None = None,
        app: CheckbackSource | None = None,
    ) -> None:
        config.validate()
        self._app = app
        self._sweep: CheckbackSweep | None = None
        self.config = config
        self.metrics = metrics or RelayMetrics()
        self._broker = broker
        self._engine = engine
        self._owns_engine = engine is None
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._jobs: Jobs | None = None
        self._health: HealthServer | None = None
        self._shards: ShardOwner | None = None
        self._next_rebalance = 0.0
        self._store: RelayStore | None = None
        self._log = get_logger("outbox.relay").bind(relay_id=config.relay_id)
        self._totals = {"published": 0, "retried": 0, "dead": 0}

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def broker(self) -> Broker:
        """The broker in use (after ``start``)."""
        if self._broker is None:
            raise RuntimeError("the relay is not started")
        return self._broker

    @property
    def health_port(self) -> int | None:
        """The port ``/metrics`` and ``/healthz`` are served on, once started."""
        return self._health.port if self._health is not None else None

    async def start(self) -> None:
        """Connect, check the schema, and start the publishing loops and maintenance jobs."""
        cfg = self.config
        if self._engine is None:
            self._engine = make_async_engine(
                cfg.database_url, pool_size=cfg.keyless_workers + 4, pool_pre_ping=True
            )
        engine = self._engine
        await self._check_schema(engine)
        if self._broker is None:
            from outbox.rabbitmq import RabbitMQBroker

            self._broker = RabbitMQBroker(
                cfg.amqp_url,
                wire=WireFormat(exchange=cfg.exchange),
                confirm_timeout=cfg.confirm_timeout,
                connection_name=f"outbox-relay {cfg.relay_id}",
            )
        await self._broker.connect()
        self._store = RelayStore(engine, cfg.relay_id)
        if self._store.postgres:
            self._shards = ShardOwner(engine, cfg.lock_namespace)
        self._sweep = CheckbackSweep(self._store, cfg, self.metrics, self._app)
        await self._sweep.start()
        self._log.info("relay.started", **cfg.public())

        for worker in range(cfg.keyless_workers):
            self._spawn(f"keyless-{worker}", self._keyless_loop)
        self._spawn("keyed", self._keyed_loop)
        self._spawn("checkbacks", self._checkback_loop)
        self._spawn("progress", self._progress_loop)
        if carries_receipts(self._broker):
            receipts = ReceiptRecorder(
                self._broker,
                engine,
                exchange=cfg.exchange,
                metrics=self.metrics,
                stopping=self._stopping,
            )
            self._spawn("receipts", receipts.run)
        self._jobs = Jobs()
        self._jobs.every(cfg.maintenance_interval.total_seconds(), self._maintain, "maintenance")
        self._jobs.every(cfg.gauge_interval.total_seconds(), self._refresh_gauges, "gauges")
        self._jobs.start()
        if cfg.metrics_port is not None:
            self._health = HealthServer(self.metrics.render, self._health_checks, cfg.metrics_port)
            await self._health.start()
            self._log.info("relay.http", port=self._health.port, paths=["/metrics", "/healthz"])

    async def stop(self) -> None:
        """Stop claiming, let in-flight rounds finish (within ``shutdown_timeout``), clean up."""
        if self._stopping.is_set() and not self._tasks:
            return
        self._stopping.set()
        if self._tasks:
            timeout = self.config.shutdown_timeout.total_seconds()
            late = await finish_or_cancel(self._tasks, timeout)
            if late:
                self._log.warning("relay.stop_timeout", unfinished=len(late))
            self._tasks.clear()
        if self._jobs is not None:
            await self._jobs.stop(self.config.shutdown_timeout.total_seconds())
        if self._health is not None:
            await self._health.close()
        released = 0
        if self._store is not None:
            with contextlib.suppress(*_DB_ERRORS):
                released = await self._store.release_claims()
        if self._shards is not None:
            await self._shards.close()
        if self._sweep is not None:
            await self._sweep.close()
        if self._broker is not None:
            await self._broker.close()
        if self._engine is not None and self._owns_engine:
            await self._engine.dispose()
        self._log.info("relay.stopped", released_claims=released, **self._totals)

    async def run(self) -> None:
        """Start, publish until SIGTERM or SIGINT (or ``stop()``), then stop cleanly."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            await self.start()
            await self._stopping.wait()
        finally:
            await self.stop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _on_signal(self, sig: signal.Signals) -> None:
        self._log.info("relay.stopping", signal=sig.name)
        self._stopping.set()

    def _spawn(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        async def supervised() -> None:
            delay = 0.1
            while not self._stopping.is_set():
                try:
                    await loop()
                    return
                except _DB_ERRORS as e:
                    self._log.warning("relay.database_error", loop=name, error=_short(e))
                except BrokerError as e:
                    self._log.warning("relay.broker_error", loop=name, error=_short(e))
                except Exception:
                    self._log.exception("relay.loop_crashed", loop=name)
                await self._sleep(delay)
                delay = min(delay * 2, 5.0)

        self._tasks.append(asyncio.create_task(supervised(), name=f"relay-{name}"))

    async def _check_schema(self, engine: AsyncEngine) -> None:
        try:
            async with engine.connect() as conn:
                await conn.execute(sa.select(outbox_table.c.id).limit(0))
        except sa.exc.DBAPIError as e:
            text = str(e.orig)
            if "outbox_message" in text and ("does not exist" in text or "no such table" in text):
                raise DatabaseError(
                    "the outbox tables do not exist in this database; run `outbox db upgrade`"
                ) from e
            raise DatabaseError(f"cannot reach the outbox database: {_short(e)}") from e

    # -- publishing loops ---------------------------------------------------------------

    async def _keyless_loop(self) -> None:
        cfg, store = self.config, self._require_store()
        idle = cfg.poll_min.total_seconds()
        while not self._stopping.is_set():
            if not await self._broker_ready():
                continue
            rows = await store.claim_keyless(cfg.batch_size, cfg.lease)
            if not rows:
                await self._sleep(idle)
                idle = min(idle * 2, cfg.poll_max.total_seconds())
                continue
            idle = cfg.poll_min.total_seconds()
            reclaimed = sum(1 for r in rows if r.reclaimed)
            if reclaimed:
                self.metrics.reclaimed.inc(reclaimed)
            published, failures = await self._publish(rows)
            await self._settle(published, failures)

    async def _keyed_loop(self) -> None:
        """Read and publish keyed rounds, two at a time.

        The next round is read and published while the previous one still waits for
        confirms or is being settled. Its read leaves out every key of the round in
        flight (``held``): a key is in one round at a time and is read again only once
        that round's outcome is committed, and within a round ``_publish_keyed`` sends
        its messages one wave after another. So per key nothing changes; rounds of
        different keys overlap.
        """
        cfg = self.config
        idle = cfg.poll_min.total_seconds()
        held: set[str] = set()
        in_flight: asyncio.Task[None] | None = None
        try:
            while not self._stopping.is_set():
                if not await self._broker_ready():
                    continue
                if in_flight is not None and self._rebalance_due():
                    # Shards are given up only with nothing of theirs unsettled.
                    await in_flight
                    in_flight = None
                rows = await self._read_keyed(held, in_flight)
                if rows is None:
                    continue
                if not rows:
                    if in_flight is not None:
                        # Maybe only keys of the round in flight have messages left.
                        await in_flight
                        in_flight = None
                    else:
                        await self._sleep(idle)
                        idle = min(idle * 2, cfg.poll_max.total_seconds())
                    continue
                idle = cfg.poll_min.total_seconds()
                keys = {row.envelope.key or "" for row in rows}
                held |= keys
                started = asyncio.create_task(self._keyed_round(rows, keys, held))
                try:
                    if in_flight is not None:
                        await in_flight
                finally:
                    in_flight = started
        except BaseException:
            if in_flight is not None:
                if _cancelling():
                    in_flight.cancel()  # stop() ran out of time: the round goes with the loop
                await asyncio.wait([in_flight])  # its own error, if any, is second to this one
            raise
        if in_flight is not None:
            await in_flight

    def _rebalance_due(self) -> bool:
        owner = self._shards
        return owner is not None and (
            owner.conn is None or time.monotonic() >= self._next_rebalance
        )

    async def _read_keyed(
        self, held: set[str], in_flight: asyncio.Task[None] | None
    ) -> list[Row] | None:
        """The rows of the next keyed round; None when this relay owns no shard (after a pause)."""
        cfg, store, owner = self.config, self._require_store(), self._shards
        if owner is None:
            async with store.engine.connect() as conn:
                return await store.fetch_keyed(
                    conn, _ALL_SHARDS, cfg.batch_size, cfg.key_lookahead, held
                )
        try:
            if owner.conn is None:
                await owner.open()
                self._log.info("relay.joined", slot=owner.slot)
                self._next_rebalance = 0.0
            if time.monotonic() >= self._next_rebalance:
                await self._rebalance(owner)
                self._next_rebalance = time.monotonic() + cfg.rebalance_interval.total_seconds()
            if not owner.owned or owner.conn is None:
                await self._sleep(cfg.rebalance_interval.total_seconds())
                return None
            return await store.fetch_keyed(
                owner.conn, owner.owned, cfg.batch_size, cfg.key_lookahead, held
            )
        except _DB_ERRORS as e:
            if owner.owned:
                # The session holding the locks is gone or failing: another relay may
                # own these shards now. Publish nothing more from them until re-taken.
                self._log.warning("relay.shards_lost", shards=len(owner.owned), error=_short(e))
            if in_flight is not None:
                # Settle the round in flight while the locks may still be held.
                await asyncio.wait([in_flight])
            await owner.close()
            self.metrics.shards.set(0)
            raise

    async def _keyed_round(self, rows: list[Row], keys: set[str], held: set[str]) -> None:
        try:
            await self._publish_keyed(rows)
        finally:
            held.difference_update(keys)

    async def _checkback_loop(self) -> None:
        sweep = self._sweep
        assert sweep is not None
        while not self._stopping.is_set():
            if await sweep.sweep_once() == 0:
                await self._sleep(self.config.check_interval.total_seconds())

    async def _rebalance(self, owner: ShardOwner) -> None:
        taken, given = await owner.rebalance()
        self.metrics.shards.set(len(owner.owned))
        if taken or given:
            self._log.info(
                "relay.shards_changed",
                taken=len(taken),
                given=len(given),
                owned=len(owner.owned),
                relays=owner.members,
            )

    async def _publish_keyed(self, rows: list[Row]) -> None:
        """Publish in waves: the n-th message of each key only after its (n-1)-th is confirmed."""
        keys: dict[str, deque[Row]] = {}
        for row in rows:  # rows come in id order, so each deque is in outbox order
            keys.setdefault(row.envelope.key or "", deque()).append(row)
        published: list[Row] = []
        failures: list[Failure] = []
        while keys:
            wave = [queue.popleft() for queue in keys.values()]
            ok, failed = await self._publish(wave)
            published += ok
            failures += failed
            stopped = {f.row.envelope.key for f in failed}
            keys = {k: q for k, q in keys.items() if q and k not in stopped}
        await self._settle(published, failures)

    async def _publish(self, rows: list[Row]) -> tuple[list[Row], list[Failure]]:
        """Publish one window; sort rows into published and failed by the broker's answers."""
        started = time.perf_counter()
        try:
            results = await self.broker.publish([row.envelope for row in rows])
        except BrokerError as e:
            reason = _short(e)
            results = [
                PublishResult(r.envelope.message_id, PublishOutcome.FAILED, reason) for r in rows
            ]
        self.metrics.publish_latency.observe(time.perf_counter() - started)
        published: list[Row] = []
        failures: list[Failure] = []
        for row, result in zip(rows, results, strict=True):
            if result.outcome is PublishOutcome.CONFIRMED:
                published.append(row)
            elif result.outcome is PublishOutcome.RETURNED:
                policy = self.config.unroutable_policy(row.envelope.topic)
                error = (
                    f"unroutable: no queue is bound for {row.envelope.topic!r} ({result.reason})"
                )
                if policy is UnroutablePolicy.DROP:
                    published.append(row)
                    self.metrics.dropped.inc()
                    self._log.info("relay.unroutable_dropped", **_ids(row))
                elif policy is UnroutablePolicy.DEAD:
                    failures.append(Failure(row, error, None))
                else:
                    failures.append(self._retry_or_die(row, error))
            else:
                failures.append(self._retry_or_die(row, f"{result.outcome}: {result.reason}"))
        return published, failures

    def _retry_or_die(self, row: Row, error: str) -> Failure:
        if row.attempts >= self.config.max_attempts:
            return Failure(row, f"{error} (gave up after {row.attempts} attempts)", None)
        return Failure(row, error, self._backoff(row.attempts))

    def _backoff(self, attempt: int) -> timedelta:
        """Exponential from ``retry_base``, capped at ``retry_max``, with jitter in [50%, 100%]."""
        base = self.config.retry_base.total_seconds() * 2 ** min(attempt - 1, 30)
        capped = min(base, self.config.retry_max.total_seconds())
        return timedelta(seconds=capped * (0.5 + random.random() / 2))  # noqa: S311

    async def _settle(self, published: list[Row], failures: list[Failure]) -> None:
        """Record a round's outcome; keep trying while the database is unreachable."""
        store = self._require_store()
        delay = 0.05
        deadline: float | None = None
        while True:
            try:
                await store.settle(published, failures)
                break
            except _DB_ERRORS as e:
                if self._stopping.is_set():
                    deadline = (
                        deadline or time.monotonic() + self.config.shutdown_timeout.total_seconds()
                    )
                    if time.monotonic() > deadline:
                        # Nothing is lost: the rows stay pending and are published again.
                        self._log.error(
                            "relay.settle_abandoned", rows=len(published) + len(failures)
                        )
                        return
                self._log.warning("relay.settle_retry", error=_short(e), rows=len(published))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        now = time.time()
        for row in published:
            self.metrics.commit_to_confirm.observe(
                max(0.0, now - row.envelope.created_at.timestamp())
            )
        self.metrics.published.inc(len(published))
        self._totals["published"] += len(published)
        for f in failures:
            if f.retry_in is None:
                self.metrics.dead.inc()
                self._totals["dead"] += 1
                self._log.error("relay.dead", attempts=f.row.attempts, error=f.error, **_ids(f.row))
            else:
                reason = f.error.split(":", 1)[0]
                self.metrics.retried.labels(reason=reason).inc()
                self._totals["retried"] += 1
                self._log.warning(
                    "relay.retry",
                    attempts=f.row.attempts,
                    retry_in=round(f.retry_in.total_seconds(), 3),
                    error=f.error,
                    **_ids(f.row),
                )
        if published:
            self._log.debug("relay.published", count=len(published))

    # -- maintenance --------------------------------------------------------------------

    async def _maintain(self) -> None:
        store = self._require_store()
        try:
            cfg = self.config
            purged = receipts = 0
            for _ in range(100):  # at most 100 batches a run; the next run continues
                n = await store.purge(cfg.retention, cfg.purge_batch)
                purged += n
                if n < cfg.purge_batch or self._stopping.is_set():
                    break
            for _ in range(100):
                n = await store.purge_receipts(cfg.receipt_retention, cfg.purge_batch)
                receipts += n
                if n < cfg.purge_batch or self._stopping.is_set():
                    break
            expired = await store.clear_expired_claims()
        except _DB_ERRORS as e:
            self._log.warning("relay.maintenance_failed", error=_short(e))
            return
        if purged:
            self._log.info(
                "relay.purged", rows=purged, retention_s=self.config.retention.total_seconds()
            )
        if receipts:
            self._log.info(
                "relay.receipts_purged",
                rows=receipts,
                retention_s=self.config.receipt_retention.total_seconds(),
            )
        if expired:
            self._log.warning("relay.leases_expired", rows=expired)

    async def _refresh_gauges(self) -> None:
        try:
            pending, oldest = await self._require_store().gauges()
        except _DB_ERRORS as e:
            self._log.warning("relay.gauges_failed", error=_short(e))
            return
        self.metrics.pending.set(pending)
        self.metrics.oldest_age.set(oldest)

    async def _progress_loop(self) -> None:
        last = dict(self._totals)
        while not self._stopping.is_set():
            await self._sleep(10.0)
            if self._totals != last:
                self._log.info("relay.progress", **self._totals)
                last = dict(self._totals)

    async def _health_checks(self) -> dict[str, bool]:
        database = await database_reachable(self._store.engine if self._store else None)
        return {"database": database, "broker": self._broker is not None and self._broker.connected}

    # -- helpers ------------------------------------------------------------------------

    async def _broker_ready(self) -> bool:
        """Wait while the broker is reconnecting, so an outage does not burn attempts."""
        if self.broker.connected:
            return True
        self._log.info("relay.broker_waiting")
        await self.broker.wait_connected(timeout=1.0)
        return self.broker.connected and not self._stopping.is_set()

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once when the relay is asked to stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    def _require_store(self) -> RelayStore:
        if self._store is None:
            raise RuntimeError("the relay is not started")
        return self._store


def _cancelling() -> bool:
    """True if the current task was asked to stop."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _ids(row: Row) -> dict[str, Any]:
    e = row.envelope
    return {"message_id": e.message_id, "topic": e.topic, "key": e.key}


def _short(error: BaseException) -> str:
    orig = getattr(error, "orig", None)
    text = str(orig if orig is not None else error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]
