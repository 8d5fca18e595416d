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
from sqlalchemy.dialects.postgresql import ARRAY

from outbox.dbclock import DatabaseClock
from outbox.envelope import Envelope
from outbox.tables import MessageStatus, outbox_table, receipt_table

if TYPE_CHECKING:
    from collections.abc import Collection, Iterable, Sequence

    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

__all__ = ["Check", "Failure", "Prepared", "RelayStore", "Row"]

t = outbox_table
_PENDING = MessageStatus.PENDING.value
_PREPARED = MessageStatus.PREPARED.value

# The keyed read looks at _PREFIX_BATCHES batches' worth of pending keyed rows (the first
# ones by id of each shard, in equal parts), and at _PREFIX_GROWTH times more while that
# gives less than a batch and some shard had more.
_PREFIX_BATCHES = 2
_PREFIX_GROWTH = 8

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


def _status_is(*statuses: str) -> sa.ColumnElement[bool]:
    """``status`` is one of ``statuses``, written into the SQL text rather than bound.

    The partial indexes are defined on the status, and a generic plan (which PostgreSQL
    may switch a statement to once psycopg has prepared it, from its fifth run on)
    cannot use a partial index for a bound parameter: the keyed read went from 12 to
    100 ms that way, walking the primary key with a filter for each shard.
    """
    if len(statuses) == 1:
        return t.c.status == sa.literal_column(f"'{statuses[0]}'", sa.String())
    return t.c.status.in_([sa.literal_column(f"'{s}'", sa.String()) for s in statuses])


def _published_columns(postgres: bool) -> tuple[sa.ColumnElement[Any], ...]:
    """``_COLUMNS`` as the publishing reads take them, in that order (see ``_row``)."""
    if not postgres:
        return _COLUMNS
    # The id as text: the envelope wants the string, and psycopg would build a UUID object
    # first. Headers '{}' (most messages carry none) as NULL: nothing for psycopg to parse.
    # Together they halve the time psycopg takes per row (9.6 to 5.2 us here).
    return tuple(
        sa.cast(c, sa.Text()).label(c.name)
        if c is t.c.message_id
        else func.nullif(c, sa.literal_column("'{}'::jsonb"), type_=c.type).label(c.name)
        if c is t.c.headers
        else c
        for c in _COLUMNS
    )


class RelayStore:
    """The relay's reads and writes of ``outbox_message``, for PostgreSQL and SQLite."""

    def __init__(self, engine: AsyncEngine, relay_id: str) -> None:
        self.engine = engine
        self.relay_id = relay_id
        self.postgres = engine.dialect.name == "postgresql"
        self._clock = DatabaseClock(self.postgres)
        now = self._clock.now()
        columns = _published_columns(self.postgres)

        due = (
            # claimed_by is still set only if an earlier claim's lease ran out unsettled:
            # that relay may have published the row, so this claim may make a duplicate.
            sa.select(t.c.id, t.c.claimed_by.is_not(None).label("reclaimed"))
            .where(_status_is(_PENDING), t.c.key.is_(None), t.c.next_attempt_at <= now)
            .order_by(t.c.next_attempt_at)
            .limit(bindparam("limit"))
            # Two relays never claim the same row, and neither waits for the other.
            .with_for_update(skip_locked=True)
            .subquery("due")
        )
        claim = sa.update(t).values(
            next_attempt_at=self._clock.later("lease"),
            claimed_by=self.relay_id,
            claimed_until=self._clock.later("lease"),
            attempts=t.c.attempts + 1,
        )
        if self.postgres:
            self._claim = claim.where(t.c.id == due.c.id).returning(*columns, due.c.reclaimed)
        else:
            # SQLite's RETURNING sees only the updated table; one embedded relay there
            # never finds another relay's expired claim anyway.
            self._claim = claim.where(t.c.id.in_(sa.select(due.c.id))).returning(*columns)

        if self.postgres:
            # One array parameter each instead of an IN list that SQLAlchemy renders anew
            # (and psycopg binds value by value) on every round. The held keys as NOT IN a
            # subquery: a hash lookup per row, also in the generic plan PostgreSQL may use
            # once psycopg has prepared the statement (from its fifth run on); there,
            # ``key <> ALL(:held)`` compared each row with every held key in turn, and a
            # read took 30 ms instead of 8.
            not_held = t.c.key.not_in(
                sa.select(func.unnest(bindparam("held", type_=ARRAY(sa.String()))))
            )
            chosen = t.c.id == sa.any_(bindparam("ids", type_=ARRAY(sa.BigInteger())))
        else:
            not_held = t.c.key.not_in(bindparam("held", expanding=True))
            chosen = t.c.id.in_(bindparam("ids", expanding=True))

        # Keyed messages are read over a prefix of each shard: its first :part pending keyed
        # rows by id, narrow columns only, so the cost follows the batch and not the backlog
        # (numbering and sorting every pending keyed row with its payload took 174 ms at
        # 60,000 rows). A key lives in one shard, and every row of it below the last id
        # read from that shard is in the prefix, so a key's first row there is its head.
        # Within the prefix: the heads and the messages queued behind them (up to :lookahead
        # a key), only for keys whose head is due, so that a key in backoff holds back
        # itself alone; the first :limit of those by id. Keys in :held are in a round not
        # yet settled and are left out whole. ``fullest`` (the most rows any part gave, on
        # a row of its own when nothing is chosen) tells ``fetch_keyed`` whether a part was
        # cut short.
        pending_keyed = (_status_is(_PENDING), t.c.key.is_not(None), not_held)
        if self.postgres:
            # Shard by shard through ix_outbox_message_keyed (shard, id): neither published
            # history nor the planner's guess at the backlog's size changes what is read.
            owned = (
                func.unnest(bindparam("shards", type_=ARRAY(sa.SmallInteger())))
                .table_valued("shard")
                .render_derived(name="owned")
            )
            part = (
                sa.select(t.c.shard, t.c.id, t.c.key, t.c.next_attempt_at)
                .where(t.c.shard == owned.c.shard, *pending_keyed)
                .order_by(t.c.id)
                .limit(bindparam("part"))
                .lateral("part")
            )
            prefix = sa.select(*part.c).select_from(owned).join(part, sa.true()).cte("prefix")
            per_shard = (
                sa.select(func.count().label("n"))
                .select_from(prefix)
                .group_by(prefix.c.shard)
                .subquery("per_shard")
            )
            fullest = sa.select(func.coalesce(func.max(per_shard.c.n), 0).label("fullest"))
        else:
            # One process on SQLite: one prefix over all shards, in id order.
            prefix = (
                sa.select(t.c.shard, t.c.id, t.c.key, t.c.next_attempt_at)
                .where(t.c.shard.in_(bindparam("shards", expanding=True)), *pending_keyed)
                .order_by(t.c.id)
                .limit(bindparam("part"))
                .cte("prefix")
            )
            fullest = sa.select(func.count().label("fullest")).select_from(prefix)
        ranked = sa.select(
            prefix.c.id,
            func.row_number().over(partition_by=prefix.c.key, order_by=prefix.c.id).label("rn"),
            func.first_value(prefix.c.next_attempt_at)
            .over(partition_by=prefix.c.key, order_by=prefix.c.id)
            .label("head_due"),
        ).subquery("ranked")
        picked = (
            sa.select(ranked.c.id)
            .where(ranked.c.rn <= bindparam("lookahead"), ranked.c.head_due <= now)
            .order_by(ranked.c.id)
            .limit(bindparam("limit"))
            .subquery("picked")
        )
        if self.postgres:
            # One array of ids looked up through the primary key: as a join, the planner
            # (expecting few rows) hashed the whole table, payloads and history included.
            ids = sa.cast(
                sa.select(func.array_agg(picked.c.id)).scalar_subquery(), ARRAY(sa.BigInteger())
            )
            rows = sa.select(*columns).where(t.c.id == sa.any_(ids)).subquery("rows")
        else:
            rows = sa.select(*columns).where(t.c.id.in_(sa.select(picked.c.id))).subquery("rows")
        full = fullest.subquery("fullest")
        self._keyed = (
            sa.select(*rows.c, full.c.fullest)
            .select_from(full.outerjoin(rows, sa.true()))
            .order_by(rows.c.id)
        )

        self._published = (
            sa.update(t)
            .where(chosen, t.c.status == _PENDING)
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
                next_attempt_at=self._clock.later("delay"),
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
                _status_is(MessageStatus.PUBLISHED.value, MessageStatus.DISCARDED.value),
                t.c.updated_at < self._clock.earlier("retention"),
            )
            .order_by(t.c.updated_at)
            .limit(bindparam("limit"))
        )
        self._purge = sa.delete(t).where(t.c.id.in_(finished.scalar_subquery()))
        # Receipts are appended in about the order they are recorded, so the oldest
        # ids are the oldest receipts: look at the first ``limit`` by primary key only,
        # never scan the table for old ones (recorded_at has no index).
        r = receipt_table
        oldest = sa.select(r.c.id, r.c.recorded_at).order_by(r.c.id).limit(bindparam("limit"))
        first = oldest.subquery("oldest")
        expired = sa.select(first.c.id).where(
            first.c.recorded_at < self._clock.earlier("receipt_retention")
        )
        self._purge_receipts = sa.delete(r).where(r.c.id.in_(expired.scalar_subquery()))
        self._expired = (
            sa.update(t)
            .where(t.c.status == _PENDING, t.c.claimed_until < now)
            .values(claimed_by=None, claimed_until=None)
        )
        due_prepared = (
            sa.select(t.c.id)
            .where(_status_is(_PREPARED), t.c.next_attempt_at <= now)
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
                next_attempt_at=self._clock.later("lease"),
                claimed_by=self.relay_id,
                claimed_until=self._clock.later("lease"),
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
                next_attempt_at=self._clock.later("delay"),
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

    # -- reads --------------------------------------------------------------------------

    async def claim_keyless(self, limit: int, lease: timedelta) -> list[Row]:
        """Claim up to ``limit`` due keyless messages for ``lease``; commit the claim."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                self._claim, {"limit": limit, **self._clock.params(lease=lease)}
            )
            if self.postgres:
                rows = [_row(r, counted=True, reclaimed=r[-1]) for r in result]
            else:
                rows = [_row(r, counted=True) for r in result]
        rows.sort(key=lambda r: r.id)  # RETURNING has no order; publish in insert order
        return rows

    async def fetch_keyed(
        self,
        conn: AsyncConnection,
        shards: Sequence[int],
        limit: int,
        lookahead: int,
        held: Collection[str] = (),
    ) -> list[Row]:
        """Read due keyed messages of ``shards`` in id order, at most ``lookahead`` per key.

        Keys in ``held`` are skipped whole (their messages are in a round not yet
        settled). ``conn`` is the connection that holds the shards' advisory locks:
        reading through it proves the locks are still held at this moment.
        """
        shards = list(shards)
        if not shards:
            return []
        params = {
            "shards": shards,
            "held": list(held),
            "limit": limit,
            "lookahead": lookahead,
            **self._clock.params(),
        }
        prefix = limit * _PREFIX_BATCHES
        part = -(-prefix // len(shards)) if self.postgres else prefix
        while True:
            result = await conn.execute(self._keyed, {**params, "part": part})
            fullest = 0
            rows: list[Row] = []
            for r in result:
                fullest = r[-1]
                if r[0] is not None:  # None: the row that only carries ``fullest``
                    rows.append(_row(r, counted=False))
            # A part read to its end that gave less than a batch may be taken by keys in
            # backoff or at their lookahead; keys behind them must not wait for those.
            if len(rows) >= limit or fullest < part:
                return rows
            part *= _PREFIX_GROWTH

    async def claim_prepared(self, limit: int, lease: timedelta) -> list[Prepared]:
        """Claim up to ``limit`` prepared messages due for a check, for ``lease``."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                self._claim_prepared, {"limit": limit, **self._clock.params(lease=lease)}
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
            grouped.setdefault(c.outcome, []).append({**params, **self._clock.params(**durations)})
        async with self.engine.begin() as conn:
            for outcome, params_list in grouped.items():
                await conn.execute(statements[outcome], params_list)

    async def gauges(self) -> tuple[int, float]:
        """Return the number of pending messages and the age in seconds of the oldest one."""
        async with self.engine.connect() as conn:
            count, oldest = (await conn.execute(self._gauges, self._clock.params())).one()
            now = (await conn.execute(self._now, self._clock.params())).scalar_one()
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
                dead.append({**params, **self._clock.params()})
            else:
                retry.append({**params, **self._clock.params(delay=f.retry_in)})
        async with self.engine.begin() as conn:
            if ids:
                await conn.execute(self._published, {"ids": ids, **self._clock.params()})
            if retry:
                await conn.execute(self._retry, retry)
            if dead:
                await conn.execute(self._dead, dead)

    async def release_claims(self) -> int:
        """Make this relay's unsettled keyless claims due now (on a clean shutdown)."""
        async with self.engine.begin() as conn:
            return (await conn.execute(self._release, self._clock.params())).rowcount

    async def purge(self, retention: timedelta, batch: int) -> int:
        """Delete up to ``batch`` finished rows older than ``retention``; return how many."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                self._purge, {"limit": batch, **self._clock.params(retention=retention)}
            )
            return result.rowcount

    async def purge_receipts(self, retention: timedelta, batch: int) -> int:
        """Delete receipts recorded longer than ``retention`` ago, among the ``batch`` oldest."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                self._purge_receipts,
                {"limit": batch, **self._clock.params(receipt_retention=retention)},
            )
            return result.rowcount

    async def clear_expired_claims(self) -> int:
        """Forget claims whose lease ran out (their rows are due again already)."""
        async with self.engine.begin() as conn:
            return (await conn.execute(self._expired, self._clock.params())).rowcount


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _row(r: Sequence[Any], *, counted: bool, reclaimed: bool = False) -> Row:
    """Build a ``Row`` from the leading ``_COLUMNS`` of ``r``.

    ``counted``: the claim already added this attempt to ``attempts``. Unpacked by
    position and built directly: per row this runs on every publish, and going
    through ``r._mapping`` and ``Envelope.from_row`` took twice as long.
    """
    row_id, message_id, topic, key, payload, content_type, headers, created_at, attempts = r[:9]
    if created_at.tzinfo is None:  # SQLite returns naive datetimes; they are stored in UTC
        created_at = created_at.replace(tzinfo=UTC)
    return Row(
        id=row_id,
        attempts=attempts if counted else attempts + 1,
        envelope=Envelope(
            message_id=str(message_id),
            topic=topic,
            key=key,
            body=bytes(payload),
            content_type=content_type,
            headers=headers or {},
            created_at=created_at,
        ),
        reclaimed=bool(reclaimed),
    )
