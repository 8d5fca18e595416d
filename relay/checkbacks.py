"""The check-back sweep: resolving prepared (half) messages whose producer went quiet.

A prepared message whose check time has come is claimed (with a lease, like
keyless messages) and resolved:

1. If the producer recorded the id of its local PostgreSQL transaction and that
   transaction ran on the cluster this relay is connected to, PostgreSQL answers
   (``pg_xact_status``): committed -> deliverable, aborted -> discarded, in
   progress -> look again shortly (not counted as a check). No application code.
2. Otherwise (no xid, another cluster, or an xid too old to be remembered) the
   check-back registered for the topic is called (the ``--app``'s, or else the
   producer's endpoint from ``remote_checkbacks`` over signed HTTP), with a timeout
   and bounded concurrency: ``COMMIT`` -> deliverable, ``ROLLBACK`` -> discarded;
   ``UNKNOWN``, an exception or a timeout -> checked again with backoff.
3. After ``max_checks`` checks without an answer the message becomes ``dead``
   with the reason, an error log line and a metric. Never a silent drop.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import random
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

from outbox.codec import JSON, Codec
from outbox.errors import MalformedMessageError
from outbox.half import Verdict
from outbox.logs import get_logger
from relay.remote_checkback import RemoteCheckbacks
from relay.store import Check, Prepared

if TYPE_CHECKING:
    from collections.abc import Callable

    from relay.config import RelayConfig
    from relay.metrics import RelayMetrics
    from relay.store import RelayStore

__all__ = ["CheckbackSource", "CheckbackSweep"]


class CheckbackSource(Protocol):
    """What ``--app`` must provide for check-backs: an ``outbox.Outbox`` has it."""

    def checkback_for(self, topic: str) -> Callable[..., Any] | None:
        """Return the check-back for ``topic``, or None."""
        ...


class CheckbackSweep:
    """Resolves due prepared messages; one instance per relay."""

    def __init__(
        self,
        store: RelayStore,
        config: RelayConfig,
        metrics: RelayMetrics,
        app: CheckbackSource | None,
    ) -> None:
        self._store = store
        self._config = config
        self._metrics = metrics
        self._app = app
        self._cluster: str | None = None
        self._limit = asyncio.Semaphore(config.check_concurrency)
        # Sync check-backs run here: a hanging one holds a thread of this pool, never
        # the event loop, and the pool's size bounds how many can hang at once.
        self._threads = ThreadPoolExecutor(
            max_workers=config.check_concurrency, thread_name_prefix="outbox-checkback"
        )
        codec = getattr(getattr(getattr(app, "producer", None), "config", None), "codec", JSON)
        self._codecs: dict[str, Codec] = {JSON.content_type: JSON, codec.content_type: codec}
        self._remote = (
            RemoteCheckbacks(
                config.remote_checkbacks,
                secret=config.checkback_secret or "",
                timeout=config.check_timeout,
            )
            if config.remote_checkbacks
            else None
        )
        self._log = get_logger("outbox.relay").bind(relay_id=config.relay_id)

    async def start(self) -> None:
        """Learn which PostgreSQL cluster this relay can answer transaction ids for."""
        self._cluster = await self._store.cluster_id()

    async def close(self) -> None:
        """Stop the check-back threads (a hanging check-back is abandoned, not joined) and
        close the remote check-backs' HTTP client."""
        self._threads.shutdown(wait=False, cancel_futures=True)
        if self._remote is not None:
            await self._remote.close()

    async def sweep_once(self) -> int:
        """Resolve one batch of due prepared messages; return how many were looked at."""
        cfg = self._config
        lease = cfg.check_timeout * 2 + timedelta(seconds=5)
        rows = await self._store.claim_prepared(100, lease)
        if not rows:
            return 0
        xids = [r.xid for r in rows if r.xid is not None and r.xid_resource == self._cluster]
        states: dict[int, str | None] = {}
        if xids:
            try:
                states = await self._store.transaction_status(xids)
            except Exception as e:
                self._log.warning("relay.xid_status_failed", error=str(e)[:200])
        checks = await asyncio.gather(*(self._check(row, states) for row in rows))
        await self._store.record_checks(checks)
        for check in checks:
            self._report(check)
        return len(rows)

    async def _check(self, row: Prepared, states: dict[int, str | None]) -> Check:
        state = states.get(row.xid) if row.xid is not None else None
        if state == "committed":
            self._metrics.checks.labels(result="xid_committed").inc()
            return Check(row, "commit", row.checks)
        if state == "aborted":
            self._metrics.checks.labels(result="xid_aborted").inc()
            return Check(row, "rollback", row.checks, "the local transaction was rolled back")
        if state == "in progress":
            # A legitimate answer, so not counted: the local transaction is still running.
            self._metrics.checks.labels(result="xid_in_progress").inc()
            return Check(
                row,
                "recheck",
                row.checks,
                "local transaction in progress",
                self._config.check_interval,
            )
        verdict, error = await self._ask_application(row)
        checks = row.checks + 1
        if verdict is Verdict.COMMIT:
            return Check(row, "commit", checks)
        if verdict is Verdict.ROLLBACK:
            return Check(row, "rollback", checks, "rolled back by check-back")
        if checks >= self._config.max_checks:
            return Check(row, "dead", checks, f"{error} (gave up after {checks} check-backs)")
        return Check(row, "recheck", checks, error, self._backoff(checks))

    async def _ask_application(self, row: Prepared) -> tuple[Verdict, str]:
        topic = row.envelope.topic
        function = self._app.checkback_for(topic) if self._app is not None else None
        if function is None and self._remote is not None:
            # A local check-back wins (no network); a remote one runs like any async
            # check-back: the same limit, timeout, metrics and error mapping.
            url = self._remote.find(topic)
            if url is not None:
                function = functools.partial(self._remote.ask, url)
        if function is None:
            self._metrics.checks.labels(result="no_checkback").inc()
            return Verdict.UNKNOWN, (
                f"no check-back registered for topic {topic!r} (--app or --remote-checkback)"
            )
        try:
            message = row.envelope.decode(self._codecs)
        except MalformedMessageError as e:
            self._metrics.checks.labels(result="error").inc()
            return Verdict.UNKNOWN, f"cannot decode the payload for the check-back: {e}"
        timeout = self._config.check_timeout.total_seconds()
        try:
            async with self._limit:
                if inspect.iscoroutinefunction(function):
                    answer = await asyncio.wait_for(function(message), timeout)
                else:
                    loop = asyncio.get_running_loop()
                    call = loop.run_in_executor(self._threads, function, message)
                    answer = await asyncio.wait_for(call, timeout)
        except TimeoutError:
            self._metrics.checks.labels(result="timeout").inc()
            return Verdict.UNKNOWN, f"check-back timed out after {timeout:g} s"
        except Exception as e:
            self._metrics.checks.labels(result="error").inc()
            self._log.warning(
                "relay.checkback_failed",
                message_id=row.envelope.message_id,
                topic=topic,
                error=f"{type(e).__name__}: {e}"[:300],
            )
            return Verdict.UNKNOWN, f"check-back raised {type(e).__name__}: {e}"[:500]
        try:
            verdict = Verdict(answer)
        except ValueError:
            self._metrics.checks.labels(result="error").inc()
            return Verdict.UNKNOWN, f"check-back returned {answer!r}, not a Verdict"
        self._metrics.checks.labels(result=verdict.value).inc()
        return verdict, "check-back answered UNKNOWN"

    def _backoff(self, checks: int) -> timedelta:
        base = self._config.check_retry_base.total_seconds() * 2 ** min(checks - 1, 30)
        capped = min(base, self._config.check_retry_max.total_seconds())
        return timedelta(seconds=capped * (0.5 + random.random() / 2))  # noqa: S311

    def _report(self, check: Check) -> None:
        e = check.row.envelope
        ids = {"message_id": e.message_id, "topic": e.topic, "key": e.key}
        if check.outcome == "dead":
            self._metrics.prepared_dead.inc()
            self._log.error("relay.prepared_dead", checks=check.checks, error=check.error, **ids)
        elif check.outcome in ("commit", "rollback"):
            self._log.info(f"relay.prepared_{check.outcome}", checks=check.checks, **ids)
        elif check.error != "local transaction in progress":
            self._log.warning(
                "relay.prepared_unresolved", checks=check.checks, error=check.error, **ids
            )
