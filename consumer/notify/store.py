"""All SQL of the notify service, with why each statement looks the way it does.

- **Recording** happens in the consumer handler's transaction, next to the inbox
  row: a notification exists exactly when the message was consumed.
  ``ON CONFLICT DO NOTHING`` on ``(message_id, subscription)`` also keeps a replay
  that outlived its inbox row from notifying twice.
- **Claiming** takes one subscription's due rows with ``FOR UPDATE SKIP LOCKED``
  (several processes share the work without waiting for each other) and moves
  ``next_attempt_at`` one lease ahead. That takes the rows out of everybody's
  due range at once, and brings them back by themselves when the claiming
  process dies before settling them: that is the lease, nothing has to
  "recover" it. A claim asks for at most the endpoint's free call slots, so a
  backlog waits in the table rather than in memory with its lease running.
- **Settling** is one transaction: the attempt row, and the notification's new
  state, written only while the claim is still ours (``claimed_by``).

PostgreSQL gets the database clock (``now()``) in every comparison, so processes
on hosts with skewed clocks agree; SQLite (one process) gets this process's clock
as a parameter, and has no ``SKIP LOCKED`` (a plain ``UPDATE`` claims there).
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import bindparam, func
from sqlalchemy.dialects import postgresql, sqlite

from outbox.dbclock import DatabaseClock
from outbox.errors import DatabaseError
from outbox.tables import NotificationStatus, notification_attempt_table, notification_table

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

    from consumer.message import IncomingMessage
    from consumer.notify.config import Subscription

__all__ = [
    "AttemptResult",
    "AttemptView",
    "Claimed",
    "NotificationView",
    "NotifyStore",
    "RetryOutcome",
    "record_notifications",
]

t = notification_table
a = notification_attempt_table
_PENDING = NotificationStatus.PENDING.value
_DELIVERED = NotificationStatus.DELIVERED.value
_ABANDONED = NotificationStatus.ABANDONED.value
_MAX_ERROR = 2000  # characters of an error kept in the database

_CLAIMED_COLUMNS = (
    t.c.id,
    t.c.message_id,
    t.c.subscription,
    t.c.topic,
    t.c.key,
    t.c.payload,
    t.c.message_created_at,
    t.c.attempts,
    t.c.max_attempts,
)


@dataclass(frozen=True, slots=True)
class Claimed:
    """A notification this process claimed and is about to call the endpoint for."""

    id: int
    message_id: str
    subscription: str
    topic: str
    key: str | None
    payload: Any
    message_created_at: datetime
    attempt: int
    """The number of the attempt being made (attempts recorded so far + 1)."""
    max_attempts: int
    reclaimed: bool = False
    """An earlier claim lapsed unsettled: that process may have called already."""


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """What one call gave: an HTTP status, or an error without one."""

    started_at: datetime
    duration_ms: int
    status_code: int | None
    error: str | None

    @property
    def succeeded(self) -> bool:
        """True for a 2xx answer."""
        return self.status_code is not None and 200 <= self.status_code < 300


@dataclass(frozen=True, slots=True)
class AttemptView:
    """One recorded call, as the query API shows it."""

    attempt: int
    started_at: datetime
    duration_ms: int
    status_code: int | None
    error: str | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "attempt": self.attempt,
            "started_at": self.started_at.isoformat(),
            "duration_ms": self.duration_ms,
            "status_code": self.status_code,
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class NotificationView:
    """A notification as the query API shows it; ``history`` only where asked for."""

    id: int
    message_id: str
    subscription: str
    topic: str
    key: str | None
    payload: Any
    message_created_at: datetime
    status: str
    attempts: int
    max_attempts: int
    next_attempt_at: datetime | None
    """Pending only: when the next attempt is due (or the current claim lapses)."""
    claimed_until: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    delivered_at: datetime | None
    abandoned_at: datetime | None
    history: tuple[AttemptView, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        data: dict[str, Any] = {
            "id": self.id,
            "message_id": self.message_id,
            "subscription": self.subscription,
            "topic": self.topic,
            "key": self.key,
            "payload": self.payload,
            "timestamp": self.message_created_at.isoformat(),
            "status": self.status,
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "next_attempt_at": _iso(self.next_attempt_at),
            "claimed_until": _iso(self.claimed_until),
            "last_status_code": self.last_status_code,
            "last_error": self.last_error,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "delivered_at": _iso(self.delivered_at),
            "abandoned_at": _iso(self.abandoned_at),
        }
        if self.history is not None:
            data["history"] = [h.to_dict() for h in self.history]
        return data


class RetryOutcome(enum.StrEnum):
    """What a manual retry did."""

    DUE = "due"
    """The notification is pending and due now, with a fresh schedule."""
    NOT_FOUND = "not_found"
    DELIVERED = "delivered"
    """Already delivered: nothing to retry."""
    IN_FLIGHT = "in_flight"
    """A call is being made right now; its outcome decides what happens next."""
    UNKNOWN_SUBSCRIPTION = "unknown_subscription"
    """The subscription is no longer configured: there is no endpoint to call."""


# -- recording, in the consumer handler's transaction -----------------------------------

_INSERTS: dict[str, Any] = {}


def _insert(dialect: str) -> Any:
    stmt = _INSERTS.get(dialect)
    if stmt is None:
        module: Any = postgresql if dialect == "postgresql" else sqlite
        stmt = module.insert(t).on_conflict_do_nothing(
            index_elements=["message_id", "subscription"]
        )
        if dialect == "postgresql":
            stmt = stmt.values(
                created_at=func.now(),
                updated_at=func.now(),
                next_attempt_at=func.now() + bindparam("first_delay", type_=sa.Interval()),
            )
        _INSERTS[dialect] = stmt
    return stmt


async def record_notifications(
    conn: AsyncConnection, message: IncomingMessage, subscriptions: Sequence[Subscription]
) -> None:
    """Add one pending notification of ``message`` per subscription, on ``conn``'s transaction.

    Commits nothing: the caller's transaction (the one holding the inbox row)
    does. A notification that exists already is left as it is.
    """
    if not subscriptions:
        return
    postgres = conn.dialect.name == "postgresql"
    now = datetime.now(UTC)
    rows = []
    for sub in subscriptions:
        row: dict[str, Any] = {
            "message_id": uuid.UUID(message.message_id),
            "subscription": sub.name,
            "topic": message.topic,
            "key": message.key,
            "payload": message.payload,
            "message_created_at": message.created_at,
            "status": _PENDING,
            "attempts": 0,
            "max_attempts": len(sub.schedule),
        }
        if postgres:
            row["first_delay"] = sub.schedule[0]
        else:
            row.update(created_at=now, updated_at=now, next_attempt_at=now + sub.schedule[0])
        rows.append(row)
    await conn.execute(_insert(conn.dialect.name), rows)


# -- the dispatcher's and the query API's statements ------------------------------------


class NotifyStore:
    """The dispatcher's claims and settlements, and the query API's reads and retries."""

    def __init__(self, engine: AsyncEngine, worker_id: str) -> None:
        self.engine = engine
        self.worker_id = worker_id
        self.postgres = engine.dialect.name == "postgresql"
        self._clock = DatabaseClock(self.postgres)
        now = self._clock.now()
        due = t.c.status == _PENDING, t.c.next_attempt_at <= now

        claimable = (
            # claimed_by is still set only if an earlier claim lapsed unsettled.
            sa.select(t.c.id, t.c.claimed_by.is_not(None).label("reclaimed"))
            .where(t.c.subscription == bindparam("sub_name"), *due)
            .order_by(t.c.next_attempt_at)
            .limit(bindparam("limit"))
            # Two processes never claim the same row, and neither waits for the other.
            .with_for_update(skip_locked=True)
            .subquery("claimable")
        )
        claim = sa.update(t).values(
            next_attempt_at=self._clock.later("lease"),
            claimed_by=self.worker_id,
            claimed_until=self._clock.later("lease"),
        )
        if self.postgres:
            self._claim = claim.where(t.c.id == claimable.c.id).returning(
                *_CLAIMED_COLUMNS, claimable.c.reclaimed
            )
        else:
            # SQLite's RETURNING sees only the updated table; its one process never finds
            # another's lapsed claim anyway.
            self._claim = claim.where(t.c.id.in_(sa.select(claimable.c.id))).returning(
                *_CLAIMED_COLUMNS
            )

        postponable = (
            sa.select(t.c.id)
            .where(t.c.subscription == bindparam("sub_name"), *due)
            .limit(bindparam("limit"))
            .with_for_update(skip_locked=True)
        )
        # Moves due rows past the breaker's cooldown without counting an attempt; it also
        # takes them out of every process's due range, so none calls the endpoint meanwhile.
        self._postpone = (
            sa.update(t)
            .where(t.c.id.in_(postponable.scalar_subquery()))
            .values(next_attempt_at=self._clock.later("delay"), updated_at=now)
        )

        ours = sa.and_(
            t.c.id == bindparam("row_id"),
            t.c.status == _PENDING,
            t.c.claimed_by == self.worker_id,
        )
        settled = {
            "attempts": bindparam("attempt"),
            "last_status_code": bindparam("status_code"),
            "last_error": bindparam("error"),
            "updated_at": now,
            "claimed_by": None,
            "claimed_until": None,
        }
        self._delivered = (
            sa.update(t).where(ours).values(status=_DELIVERED, delivered_at=now, **settled)
        )
        self._again = (
            sa.update(t).where(ours).values(next_attempt_at=self._clock.later("delay"), **settled)
        )
        self._abandoned = (
            sa.update(t).where(ours).values(status=_ABANDONED, abandoned_at=now, **settled)
        )
        self._attempt = sa.insert(a)
        self._pending = (
            sa.select(t.c.subscription, func.count())
            .where(t.c.status == _PENDING)
            .group_by(t.c.subscription)
        )
        self._finished = (
            sa.select(t.c.id)
            .where(
                t.c.status.in_([_DELIVERED, _ABANDONED]),
                t.c.created_at < self._clock.earlier("retention"),
            )
            .order_by(t.c.created_at)
            .limit(bindparam("limit"))
        )

    # -- time ---------------------------------------------------------------------------

    # -- the dispatcher -----------------------------------------------------------------

    async def check_schema(self) -> None:
        """Raise ``DatabaseError`` saying what to do if the tables are missing or unreachable."""
        try:
            async with self.engine.connect() as conn:
                await conn.execute(sa.select(t.c.id).limit(0))
                await conn.execute(sa.select(a.c.id).limit(0))
        except sa.exc.DBAPIError as e:
            text = str(e.orig)
            if "does not exist" in text or "no such table" in text:
                raise DatabaseError(
                    "the notification tables do not exist in this database; run "
                    "`outbox db upgrade` (or migrate the Django app `outbox`)"
                ) from None
            raise DatabaseError(
                f"cannot reach the database: {type(e.orig).__name__}: {text.strip()[:300]}"
            ) from None

    async def claim(self, subscription: str, limit: int, lease: timedelta) -> list[Claimed]:
        """Claim up to ``limit`` due notifications of ``subscription`` for ``lease``; commit."""
        params = {"sub_name": subscription, "limit": limit, **self._clock.params(lease=lease)}
        async with self.engine.begin() as conn:
            result = await conn.execute(self._claim, params)
            rows = [
                Claimed(
                    id=r.id,
                    message_id=str(r.message_id),
                    subscription=r.subscription,
                    topic=r.topic,
                    key=r.key,
                    payload=r.payload,
                    message_created_at=_aware(r.message_created_at),
                    attempt=r.attempts + 1,
                    max_attempts=r.max_attempts,
                    reclaimed=bool(getattr(r, "reclaimed", False)),
                )
                for r in result
            ]
        rows.sort(key=lambda r: r.id)  # RETURNING has no order; call in arrival order
        return rows

    async def postpone(self, subscription: str, delay: timedelta, limit: int = 1000) -> int:
        """Move up to ``limit`` due notifications of ``subscription`` ``delay`` ahead."""
        params = {"sub_name": subscription, "limit": limit, **self._clock.params(delay=delay)}
        async with self.engine.begin() as conn:
            return (await conn.execute(self._postpone, params)).rowcount

    async def settle(
        self,
        row: Claimed,
        result: AttemptResult,
        *,
        status: NotificationStatus,
        delay: timedelta | None = None,
        reason: str | None = None,
    ) -> bool:
        """Record the attempt and the notification's new state in one transaction.

        ``status`` pending needs ``delay`` (when to try again). ``reason`` replaces
        the attempt's error as ``last_error`` (why it was abandoned). Returns False
        if the claim was no longer ours (it lapsed and another process took the
        row): the attempt is recorded all the same, the state is left to the other.
        """
        params: dict[str, Any] = {
            "row_id": row.id,
            "attempt": row.attempt,
            "status_code": result.status_code,
            "error": _cut(reason or result.error),
        }
        if status is NotificationStatus.PENDING:
            assert delay is not None
            statement, params = self._again, {**params, **self._clock.params(delay=delay)}
        elif status is NotificationStatus.DELIVERED:
            statement, params = self._delivered, {**params, **self._clock.params()}
        else:
            statement, params = self._abandoned, {**params, **self._clock.params()}
        async with self.engine.begin() as conn:
            ours = (await conn.execute(statement, params)).rowcount == 1
            await conn.execute(
                self._attempt,
                {
                    "notification_id": row.id,
                    "attempt": row.attempt,
                    "started_at": result.started_at,
                    "duration_ms": result.duration_ms,
                    "status_code": result.status_code,
                    "error": _cut(result.error),
                },
            )
        return ours

    async def pending_counts(self) -> dict[str, int]:
        """Pending notifications per subscription."""
        async with self.engine.connect() as conn:
            return {s: int(n) for s, n in await conn.execute(self._pending)}

    async def purge(self, retention: timedelta, batch: int = 1000) -> int:
        """Delete delivered and abandoned notifications created before ``retention`` ago,
        with their attempts, in batches; return how many notifications went."""
        total = 0
        while True:
            async with self.engine.begin() as conn:
                params = {"limit": batch, **self._clock.params(retention=retention)}
                ids = list((await conn.execute(self._finished, params)).scalars())
                if ids:
                    await conn.execute(sa.delete(a).where(a.c.notification_id.in_(ids)))
                    await conn.execute(sa.delete(t).where(t.c.id.in_(ids)))
            total += len(ids)
            if len(ids) < batch:
                return total

    # -- the query API ------------------------------------------------------------------

    async def of_message(
        self, message_id: str, subscription: str | None = None
    ) -> list[NotificationView]:
        """Every notification of ``message_id`` (of ``subscription`` only, if given),
        each with its attempts in order."""
        query = sa.select(t).where(t.c.message_id == uuid.UUID(message_id)).order_by(t.c.id)
        if subscription is not None:
            query = query.where(t.c.subscription == subscription)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
            ids = [r.id for r in rows]
            history: dict[int, list[AttemptView]] = {i: [] for i in ids}
            if ids:
                attempts = await conn.execute(
                    sa.select(a)
                    .where(a.c.notification_id.in_(ids))
                    .order_by(a.c.notification_id, a.c.attempt, a.c.id)
                )
                for r in attempts:
                    history[r.notification_id].append(
                        AttemptView(
                            attempt=r.attempt,
                            started_at=_aware(r.started_at),
                            duration_ms=r.duration_ms,
                            status_code=r.status_code,
                            error=r.error,
                        )
                    )
        return [_view(r._mapping, tuple(history[r.id])) for r in rows]

    async def search(
        self,
        *,
        subscription: str | None = None,
        status: NotificationStatus | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        after_id: int | None = None,
        limit: int = 100,
    ) -> list[NotificationView]:
        """Notifications matching every filter given, oldest id first, at most ``limit``.

        ``since``/``until`` bound ``created_at`` (since inclusive, until exclusive);
        ``after_id`` pages on: pass the last id of the page before.
        """
        query = sa.select(t).order_by(t.c.id).limit(limit)
        if subscription is not None:
            query = query.where(t.c.subscription == subscription)
        if status is not None:
            query = query.where(t.c.status == status.value)
        if since is not None:
            query = query.where(t.c.created_at >= since)
        if until is not None:
            query = query.where(t.c.created_at < until)
        if after_id is not None:
            query = query.where(t.c.id > after_id)
        async with self.engine.connect() as conn:
            return [_view(r._mapping) for r in await conn.execute(query)]

    async def retry(
        self, notification_id: int, *, schedules: Mapping[str, int], scope: str | None = None
    ) -> tuple[RetryOutcome, NotificationView | None]:
        """Make a pending or abandoned notification due now with a fresh round of attempts.

        ``schedules`` maps each configured subscription to its schedule's length
        (the attempts the new round allows). ``scope``: act only on that
        subscription's notifications (others read as not found).
        """
        async with self.engine.begin() as conn:
            # FOR UPDATE: a claim skips the row (SKIP LOCKED) until this decision commits,
            # and a settlement of a call in flight waits for it.
            found = (
                await conn.execute(
                    sa.select(t, self._clock.now().label("now"))
                    .where(t.c.id == notification_id)
                    .with_for_update(),
                    self._clock.params(),
                )
            ).first()
            if found is None or (scope is not None and found.subscription != scope):
                return RetryOutcome.NOT_FOUND, None
            view = _view(found._mapping)
            if found.status == _DELIVERED:
                return RetryOutcome.DELIVERED, view
            if found.claimed_until is not None and _aware(found.claimed_until) > _aware(found.now):
                return RetryOutcome.IN_FLIGHT, view
            length = schedules.get(found.subscription)
            if length is None:
                return RetryOutcome.UNKNOWN_SUBSCRIPTION, view
            now = self._clock.now()
            await conn.execute(
                sa.update(t)
                .where(t.c.id == notification_id)
                .values(
                    status=_PENDING,
                    max_attempts=t.c.attempts + length,
                    next_attempt_at=now,
                    abandoned_at=None,
                    claimed_by=None,
                    claimed_until=None,
                    updated_at=now,
                ),
                self._clock.params(),
            )
            updated = (await conn.execute(sa.select(t).where(t.c.id == notification_id))).one()
        return RetryOutcome.DUE, _view(updated._mapping)


def _view(
    row: Mapping[Any, Any], history: tuple[AttemptView, ...] | None = None
) -> NotificationView:
    pending = row["status"] == _PENDING
    return NotificationView(
        id=row["id"],
        message_id=str(row["message_id"]),
        subscription=row["subscription"],
        topic=row["topic"],
        key=row["key"],
        payload=row["payload"],
        message_created_at=_aware(row["message_created_at"]),
        status=row["status"],
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        next_attempt_at=_aware(row["next_attempt_at"]) if pending else None,
        claimed_until=_maybe_aware(row["claimed_until"]),
        last_status_code=row["last_status_code"],
        last_error=row["last_error"],
        created_at=_aware(row["created_at"]),
        updated_at=_aware(row["updated_at"]),
        delivered_at=_maybe_aware(row["delivered_at"]),
        abandoned_at=_maybe_aware(row["abandoned_at"]),
        history=history,
    )


def _aware(value: datetime) -> datetime:
    """SQLite returns naive datetimes; they are stored in UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _maybe_aware(value: datetime | None) -> datetime | None:
    return None if value is None else _aware(value)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _cut(text: str | None) -> str | None:
    return None if text is None else text[:_MAX_ERROR]
