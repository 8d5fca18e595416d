"""All SQL of the relay, with why each statement looks the way it does.

The relay never advances a cursor over ids: a lower id can commit after a higher
one (DESIGN §6), so every read selects by status and time instead.

- **Keyless messages** are claimed in batches with ``FOR UPDATE SKIP LOCKED``: the
  claim moves ``next_attempt_at`` one lease ahead, which takes the rows out of the
  due index for other relays at once and brings them back by themselves if this
  relay dies before settling them (that is the lease; nothing has to "recover" it).
- **Keyed messages** are read per shard by the one relay that holds the shard's
  advisory lock (see ``relay.shards``), so they need no claim: only the holder reads
  them, and its lock dies with its session.

PostgreSQL gets the database clock (``now()``) in every comparison so relays and
producers on hosts with skewed clocks agree; SQLite (the embedded default, one
process) gets the relay's clock as a parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import bindparam, func

from outbox.envelope import Envelope
from outbox.tables import MessageStatus, outbox_table

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

__all__ = ["Check", "Failure", "Prepared", "RelayStore", "Row"]

t = outbox_table
_PENDING = MessageStatus.PENDING.value
_PREPARED = MessageStatus.PREPARED.value

_COLUMNS = (
    t.c.id,
    t.c.message_id,
    t.c.topic,
    t.c.key,
    t.c.payload,
    t.c.content_type,
    t.c.headers,
    t.c.created_at,
    t.c.attempts,
)


@dataclass(frozen=True, slots=True)
class Row:
    """A message the relay is about to publish."""

    id: int
    attempts: int
    """Attempts including the one being made."""
    envelope: Envelope
    reclaimed: bool = False
    """Claimed again after an earlier claim expired unsettled: possibly a wire duplicate."""


@dataclass(frozen=True, slots=True)
class Failure:
    """A publish attempt that did not end in a confirm."""

    row: Row
    error: str
    retry_in: timedelta | None
    """None: give up, the message becomes ``dead``."""


@dataclass(frozen=True, slots=True)
class Prepared:
    """A prepared (half) message whose check time has come."""

    id: int
    checks: int
    """Check-backs made so far (not counting this one)."""
    xid: int | None
    xid_resource: str | None
    envelope: Envelope


@dataclass(frozen=True, slots=True)
class Check:
    """What one check of a prepared message decided."""

    row: Prepared
    outcome: str
    """``commit``, ``rollback``, ``recheck`` or ``dead``."""
    checks: int
    """The row's check count after this check."""
    error: str | None = None
    delay: timedelta | None = None
    """For ``recheck``: when to check again."""


class RelayStore:
    """The relay's reads and writes of ``outbox_message``, for PostgreSQL and SQLite."""

    def __init__(self, engine: AsyncEngine, relay_id: str) -> None:
        self.engine = engine
        self.relay_id = relay_id
        self.postgres = engine.dialect.name == "postgresql"
        now = func.now() if self.postgres else bindparam("now", type_=sa.DateTime(timezone=True))

        due = (
            # claimed_by is still set only if an earlier claim's lease ran out unsettled:
            # that relay may have published the row, so this claim may make a duplicate.
            sa.select(t.c.id, t.c.claimed_by.is_not(None).label("reclaimed"))
            .where(t.c.status == _PENDING, t.c.key.is_(None), t.c.next_attempt_at <= now)
            .order_by(t.c.next_attempt_at)
            .limit(bindparam("limit"))
            # Two relays never claim the same row, and neither waits for the other.
            .with_for_update(skip_locked=True)
            .subquery("due")
        )
        claim = sa.update(t).values(
            next_attempt_at=self._later("lease"),
            claimed_by=self.relay_id,
            claimed_until=self._later("lease"),
            attempts=t.c.attempts + 1,
        )
        if self.postgres:
            self._claim = claim.where(t.c.id == due.c.id).returning(*_COLUMNS, due.c.reclaimed)
        else:
            # SQLite's RETURNING sees only the updated table; one embedded relay there
            # never finds another relay's expired claim anyway.
            self._claim = claim.where(t.c.id.in_(sa.select(due.c.id))).returning(*_COLUMNS)

        # The heads of every key in the given shards plus the messages queued behind them,
        # but only for keys whose head is due: a key in backoff holds back itself alone.
        keyed = (
            sa.select(
                *_COLUMNS,
                func.row_number().over(partition_by=t.c.key, order_by=t.c.id).label("rn"),
                func.first_value(t.c.next_attempt_at)
                .over(partition_by=t.c.key, order_by=t.c.id)
                .label("head_due"),
            )
            .where(
                t.c.status == _PENDING,
                t.c.key.is_not(None),
                t.c.shard.in_(bindparam("shards", expanding=True)),
            )
            .subquery()
        )
        self._keyed = (
            sa.select(*(keyed.c[c.name] for c in _COLUMNS))
            .where(keyed.c.rn <= bindparam("lookahead"), keyed.c.head_due <= now)
            .order_by(keyed.c.id)
            .limit(bindparam("limit"))
        )

        self._published = (
            sa.update(t)
            .where(t.c.id.in_(bindparam("ids", expanding=True)), t.c.status == _PENDING)
            .values(
                status=MessageStatus.PUBLISHED.value,
                published_at=now,
                updated_at=now,
                claimed_by=None,
                claimed_until=None,
            )
        )
        self._retry = (
            sa.update(t)
            .where(t.c.id == bindparam("row_id"), t.c.status == _PENDING)
            .values(
                attempts=bindparam("attempt"),
                next_attempt_at=self._later("delay"),
                last_error=bindparam("error"),
                updated_at=now,
                claimed_by=None,
                claimed_until=None,
            )
        )
        self._dead = (
            sa.update(t)
            .where(t.c.id == bindparam("row_id"), t.c.status == _PENDING)
            .values(
                status=MessageStatus.DEAD.value,
                attempts=bindparam("attempt"),
                last_error=bindparam("error"),
                updated_at=now,
                claimed_by=None,
                claimed_until=None,
            )
        )
        self._release = (
            sa.update(t)
            .where(t.c.claimed_by == self.relay_id, t.c.status == _PENDING)
            .values(next_attempt_at=now, claimed_by=None, claimed_until=None)
        )
        finished = (
            sa.select(t.c.id)
            .where(
                t.c.status.in_([MessageStatus.PUBLISHED.value, MessageStatus.DISCARDED.value]),
                t.c.updated_at < self._earlier("retention"),
            )
            .order_by(t.c.updated_at)
            .limit(bindparam("limit"))
        )
        self._purge = sa.delete(t).where(t.c.id.in_(finished.scalar_subquery()))
        self._expired = (
            sa.update(t)
            .where(t.c.status == _PENDING, t.c.claimed_until < now)
            .values(claimed_by=None, claimed_until=None)
        )
        due_prepared = (
            sa.select(t.c.id)
            .where(t.c.status == _PREPARED, t.c.next_attempt_at <= now)
            .order_by(t.c.next_attempt_at)
            .limit(bindparam("limit"))
            .with_for_update(skip_locked=True)
        )
        # Same lease trick as for keyless messages: one relay checks a row at a time, and
        # a relay that dies mid-check leaves the row due again when the lease runs out.
        self._claim_prepared = (
            sa.update(t)
            .where(t.c.id.in_(due_prepared.scalar_subquery()))
            .values(
                next_attempt_at=self._later("lease"),
                claimed_by=self.relay_id,
                claimed_until=self._later("lease"),
            )
            .returning(*_COLUMNS, t.c.checks, t.c.xid, t.c.xid_resource)
        )
        settled = {"claimed_by": None, "claimed_until": None, "updated_at": now}
        prepared_row = sa.and_(t.c.id == bindparam("row_id"), t.c.status == _PREPARED)
        self._check_commit = (
            sa.update(t)
            .where(prepared_row)
            .values(status=_PENDING, next_attempt_at=now, checks=bindparam("checks"), **settled)
        )
        self._check_rollback = (
            sa.update(t)
            .where(prepared_row)
            .values(
                status=MessageStatus.DISCARDED.value,
                checks=bindparam("checks"),
                last_error=bindparam("error"),
                **settled,
            )
        )
        self._check_again = (
            sa.update(t)
            .where(prepared_row)
            .values(
                next_attempt_at=self._later("delay"),
                checks=bindparam("checks"),
                last_error=bindparam("error"),
                **settled,
            )
        )
        self._check_dead = (
            sa.update(t)
            .where(prepared_row)
            .values(
                status=MessageStatus.DEAD.value,
                checks=bindparam("checks"),
                last_error=bindparam("error"),
                **settled,
            )
        )
        self._gauges = sa.select(
            func.count(),
            func.min(t.c.created_at),
        ).where(t.c.status == _PENDING)
        self._now = sa.select(now)

    # -- time ---------------------------------------------------------------------------

    def _later(self, name: str) -> sa.ColumnElement[Any]:
        """``now() + :name`` on PostgreSQL; a precomputed ``:name_at`` on SQLite."""
        if self.postgres:
            return func.now() + bindparam(name, type_=sa.Interval())
        return bindparam(f"{name}_at", type_=sa.DateTime(timezone=True))

    def _earlier(self, name: str) -> sa.ColumnElement[Any]:
        if self.postgres:
            return func.now() - bindparam(name, type_=sa.Interval())
        return bindparam(f"{name}_before", type_=sa.DateTime(timezone=True))

    def _params(self, **durations: timedelta) -> dict[str, Any]:
        if self.postgres:
            return dict(durations)
        now = datetime.now(UTC)
        params: dict[str, Any] = {"now": now}
        for name, value in durations.items():
            params[f"{name}_at"] = now + value
            params[f"{name}_before"] = now - value
        return params

    # -- reads --------------------------------------------------------------------------

    async def claim_keyless(self, limit: int, lease: timedelta) -> list[Row]:
        """Claim up to ``limit`` due keyless messages for ``lease``; commit the claim."""
        async with self.engine.begin() as conn:
            result = await conn.execute(self._claim, {"limit": limit, **self._params(lease=lease)})
            rows = [_row(r, counted=True) for r in result]
        rows.sort(key=lambda r: r.id)  # RETURNING has no order; publish in insert order
        return rows

    async def fetch_keyed(
        self, conn: AsyncConnection, shards: Sequence[int], limit: int, lookahead: int
    ) -> list[Row]:
        """Read due keyed messages of ``shards`` in id order, at most ``lookahead`` per key.

        ``conn`` is the connection that holds the shards' advisory locks: reading
        through it proves the locks are still held at this moment.
        """
        result = await conn.execute(
            self._keyed,
            {"shards": list(shards), "limit": limit, "lookahead": lookahead, **self._params()},
        )
        return [_row(r, counted=False) for r in result]

    async def claim_prepared(self, limit: int, lease: timedelta) -> list[Prepared]:
        """Claim up to ``limit`` prepared messages due for a check, for ``lease``."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                self._claim_prepared, {"limit": limit, **self._params(lease=lease)}
            )
            return [
                Prepared(
                    id=r.id,
                    checks=r.checks,
                    xid=r.xid,
                    xid_resource=r.xid_resource,
                    envelope=Envelope.from_row(r._mapping),
                )
                for r in result
            ]

    async def cluster_id(self) -> str | None:
        """The PostgreSQL cluster's system identifier (None on SQLite): where our xids live."""
        if not self.postgres:
            return None
        async with self.engine.connect() as conn:
            value = await conn.execute(
                sa.text("SELECT system_identifier::text FROM pg_control_system()")
            )
            return str(value.scalar_one())

    async def transaction_status(self, xids: Sequence[int]) -> dict[int, str | None]:
        """Ask PostgreSQL whether each transaction committed, aborted or is still running.

        ``pg_xact_status`` answers NULL for a transaction too old to be remembered
        (its commit log was truncated); the caller then asks the application.
        """
        async with self.engine.connect() as conn:
            result = await conn.execute(
                sa.text(
                    "SELECT x, pg_xact_status(x::text::xid8) AS status "
                    "FROM unnest(CAST(:xids AS bigint[])) AS x"
                ),
                {"xids": list(xids)},
            )
            return {int(r.x): r.status for r in result}

    async def record_checks(self, checks: Iterable[Check]) -> None:
        """Apply the outcome of a sweep's checks in one transaction."""
        statements = {
            "commit": self._check_commit,
            "rollback": self._check_rollback,
            "recheck": self._check_again,
            "dead": self._check_dead,
        }
        grouped: dict[str, list[dict[str, Any]]] = {}
        for c in checks:
            params: dict[str, Any] = {"row_id": c.row.id, "checks": c.checks, "error": c.error}
            durations = {"delay": c.delay} if c.delay is not None else {}
            grouped.setdefault(c.outcome, []).append({**params, **self._params(**durations)})
        async with self.engine.begin() as conn:
            for outcome, params_list in grouped.items():
                await conn.execute(statements[outcome], params_list)

    async def gauges(self) -> tuple[int, float]:
        """Return the number of pending messages and the age in seconds of the oldest one."""
        async with self.engine.connect() as conn:
            count, oldest = (await conn.execute(self._gauges, self._params())).one()
            now = (await conn.execute(self._now, self._params())).scalar_one()
        if oldest is None:
            return int(count), 0.0
        return int(count), max(0.0, (_aware(now) - _aware(oldest)).total_seconds())

    # -- writes -------------------------------------------------------------------------

    async def settle(self, published: Iterable[Row], failures: Iterable[Failure]) -> None:
        """Record one round's outcome in one transaction: published, retried or dead."""
        ids = [row.id for row in published]
        retry: list[dict[str, Any]] = []
        dead: list[dict[str, Any]] = []
        for f in failures:
            params = {"row_id": f.row.id, "attempt": f.row.attempts, "error": f.error[:2000]}
            if f.retry_in is None:
                dead.append({**params, **self._params()})
            else:
                retry.append({**params, **self._params(delay=f.retry_in)})
        async with self.engine.begin() as conn:
            if ids:
                await conn.execute(self._published, {"ids": ids, **self._params()})
            if retry:
                await conn.execute(self._retry, retry)
            if dead:
                await conn.execute(self._dead, dead)

    async def release_claims(self) -> int:
        """Make this relay's unsettled keyless claims due now (on a clean shutdown)."""
        async with self.engine.begin() as conn:
            return (await conn.execute(self._release, self._params())).rowcount

    async def purge(self, retention: timedelta, batch: int) -> int:
        """Delete up to ``batch`` finished rows older than ``retention``; return how many."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                self._purge, {"limit": batch, **self._params(retention=retention)}
            )
            return result.rowcount

    async def clear_expired_claims(self) -> int:
        """Forget claims whose lease ran out (their rows are due again already)."""
        async with self.engine.begin() as conn:
            return (await conn.execute(self._expired, self._params())).rowcount


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _row(r: sa.Row[Any], *, counted: bool) -> Row:
    """Build a ``Row``; ``counted``: the claim already added this attempt to ``attempts``."""
    m = r._mapping
    return Row(
        id=m["id"],
        attempts=m["attempts"] if counted else m["attempts"] + 1,
        envelope=Envelope.from_row(m),
        reclaimed=bool(m.get("reclaimed", False)),
    )
