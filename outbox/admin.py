"""Operator tools: where a message is, and what to do with dead ones. All their SQL lives here.

These run from ``outbox status`` and ``outbox dead ...`` (or from a runbook
script) against a live system, so they share the database with producers and
relays. Three rules follow from that:

* A change touches only rows whose status is ``dead`` at the moment of the
  change, re-checked in the UPDATE or DELETE itself: a message that a relay
  has just published, or that another operator has just replayed, is never
  moved back. Replaying a published message is impossible by construction.
* Bulk changes run in batches of ``BATCH_SIZE`` rows, each its own short
  transaction, so purging or replaying a large dead set holds no long
  transaction (which would stall the relays' claims and bloat the table).
* On PostgreSQL every time is the database's clock (``now()``), as the relay
  uses it; on SQLite it is this process's UTC clock, as the producer uses it.
"""

from __future__ import annotations

import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from outbox.durations import format_duration
from outbox.errors import ConfigurationError, DatabaseError
from outbox.ids import normalize_message_id
from outbox.logs import get_logger, redact_url
from outbox.tables import MessageStatus, outbox_table, receipt_table

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence

__all__ = [
    "BATCH_SIZE",
    "MAX_LIST_LIMIT",
    "DeadCount",
    "DeadMessage",
    "MessageStatusReport",
    "Receipt",
    "count_dead",
    "list_dead",
    "message_status",
    "purge_dead",
    "replay_dead",
]

BATCH_SIZE = 1000
"""Rows changed per transaction by ``replay_dead`` and ``purge_dead``."""

MAX_LIST_LIMIT = 10_000
"""The most rows ``list_dead`` returns per page."""

_t = outbox_table
_DEAD = MessageStatus.DEAD.value


def _is_unconfirmed(attempts: int, checks: int) -> bool:
    # The row keeps no "died while prepared" flag, but the counters tell: a half message
    # that died of unanswered check-backs was checked and never given to the broker,
    # while one that died publishing has attempts > 0. Keep in step with _UNCONFIRMED.
    return attempts == 0 and checks > 0


_UNCONFIRMED = sa.and_(_t.c.attempts == 0, _t.c.checks > 0)


@dataclass(frozen=True, slots=True, kw_only=True)
class Receipt:
    """What one consumer group did with a message (a row of ``outbox_receipt``)."""

    consumer_group: str
    outcome: str
    """``consumed``, ``dead``, ``delivered`` or ``abandoned``."""
    detail: str | None
    recorded_at: datetime
    """UTC."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageStatusReport:
    """Everything the outbox database knows about one message id.

    When the outbox row has been deleted (by the retention purge, or by
    ``purge_dead``) while receipts remain, ``status`` and the other row fields
    are None and ``in_outbox`` is False; ``receipts`` still lists what each
    consumer group did. Times are timezone-aware UTC on every database.
    """

    message_id: str
    status: MessageStatus | None
    topic: str | None = None
    key: str | None = None
    attempts: int | None = None
    """Publish attempts so far (reset to 0 by a replay)."""
    checks: int | None = None
    """Check-backs made while the message was prepared (reset to 0 by a replay)."""
    next_attempt_at: datetime | None = None
    """Pending: when the relay may (re)try; prepared: when it is checked back next."""
    last_error: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    published_at: datetime | None = None
    claimed_by: str | None = None
    claimed_until: datetime | None = None
    """A relay's claim on the row; void once this time has passed."""
    content_type: str | None = None
    headers: dict[str, Any] | None = None
    payload_bytes: int | None = None
    """Size of the encoded payload; the payload itself is never shown."""
    xid: int | None = None
    xid_resource: str | None = None
    receipts: tuple[Receipt, ...] = ()
    """Oldest first."""

    @property
    def in_outbox(self) -> bool:
        """Whether the outbox row still exists (False: purged, receipts only)."""
        return self.status is not None

    def to_dict(self) -> dict[str, Any]:
        """Return the report as JSON-ready values (times as ISO 8601 strings)."""
        out = {name: _jsonable(getattr(self, name)) for name in _REPORT_FIELDS}
        out["in_outbox"] = self.in_outbox
        out["receipts"] = [
            {
                "consumer_group": r.consumer_group,
                "outcome": r.outcome,
                "detail": r.detail,
                "recorded_at": r.recorded_at.isoformat(),
            }
            for r in self.receipts
        ]
        return out


_REPORT_FIELDS = [f for f in MessageStatusReport.__dataclass_fields__ if f != "receipts"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadMessage:
    """One dead message as ``list_dead`` shows it."""

    id: int
    """The row's insert-order id: pass the last one as ``before_id`` for the next page."""
    message_id: str
    topic: str
    key: str | None
    attempts: int
    checks: int
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    """When it became dead (or was last changed); UTC."""

    @property
    def unconfirmed(self) -> bool:
        """True for a half message that died of unanswered check-backs.

        Its local transaction was never confirmed: it may have rolled back, so
        replaying it could announce something that did not happen.
        """
        return _is_unconfirmed(self.attempts, self.checks)

    def to_dict(self) -> dict[str, Any]:
        """Return the message as JSON-ready values (times as ISO 8601 strings)."""
        out = {name: _jsonable(getattr(self, name)) for name in self.__dataclass_fields__}
        out["unconfirmed"] = self.unconfirmed
        return out


def message_status(engine: sa.Engine, message_id: str | uuid.UUID) -> MessageStatusReport | None:
    """Return what the outbox database knows about ``message_id``, or None if nothing.

    Reads the outbox row and the receipts in one transaction. Returns a report
    with ``status=None`` when only receipts remain (the row was purged), and
    None when neither exists. Raises ``ConfigurationError`` if ``message_id`` is
    not a UUID and ``DatabaseError`` if the database fails.
    """
    mid = _uuid(message_id)
    columns = [
        _t.c.status,
        _t.c.topic,
        _t.c.key,
        _t.c.attempts,
        _t.c.checks,
        _t.c.next_attempt_at,
        _t.c.last_error,
        _t.c.created_at,
        _t.c.updated_at,
        _t.c.published_at,
        _t.c.claimed_by,
        _t.c.claimed_until,
        _t.c.content_type,
        _t.c.headers,
        sa.func.length(_t.c.payload).label("payload_bytes"),
        _t.c.xid,
        _t.c.xid_resource,
    ]
    r = receipt_table
    with _database(engine) as conn:
        row = conn.execute(sa.select(*columns).where(_t.c.message_id == mid)).first()
        receipts = tuple(
            Receipt(
                consumer_group=x.consumer_group,
                outcome=x.outcome,
                detail=x.detail,
                recorded_at=_utc(x.recorded_at),
            )
            for x in conn.execute(
                sa.select(r.c.consumer_group, r.c.outcome, r.c.detail, r.c.recorded_at)
                .where(r.c.message_id == mid)
                .order_by(r.c.recorded_at, r.c.id)
            )
        )
    if row is None:
        if not receipts:
            return None
        return MessageStatusReport(message_id=str(mid), status=None, receipts=receipts)
    values = row._asdict()
    for name in ("next_attempt_at", "created_at", "updated_at", "published_at", "claimed_until"):
        if values[name] is not None:
            values[name] = _utc(values[name])
    values["status"] = MessageStatus(values["status"])
    return MessageStatusReport(message_id=str(mid), receipts=receipts, **values)


def list_dead(
    engine: sa.Engine,
    *,
    topic: str | None = None,
    limit: int = 100,
    before_id: int | None = None,
) -> list[DeadMessage]:
    """Return up to ``limit`` dead messages, newest (highest ``id``) first.

    ``topic`` keeps one topic only. Pagination is by keyset: pass the ``id`` of
    the last message of a page as ``before_id`` to get the next page, which is
    stable while rows are added or changed (no offset to drift). Raises
    ``ConfigurationError`` for a ``limit`` outside 1..``MAX_LIST_LIMIT``.
    """
    if not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_LIMIT:
        raise ConfigurationError(f"limit must be between 1 and {MAX_LIST_LIMIT}, got {limit!r}")
    # Walks the primary key backwards and filters on status. Dead rows are expected to
    # be few and recent; with many published rows retained and few dead ones, a
    # partial index on (id) WHERE status = 'dead' would make this a direct read.
    query = (
        sa.select(
            _t.c.id,
            _t.c.message_id,
            _t.c.topic,
            _t.c.key,
            _t.c.attempts,
            _t.c.checks,
            _t.c.last_error,
            _t.c.created_at,
            _t.c.updated_at,
        )
        .where(_t.c.status == _DEAD)
        .order_by(_t.c.id.desc())
        .limit(limit)
    )
    if topic is not None:
        query = query.where(_t.c.topic == topic)
    if before_id is not None:
        query = query.where(_t.c.id < before_id)
    with _database(engine) as conn:
        rows = conn.execute(query).all()
    return [
        DeadMessage(
            id=row.id,
            message_id=str(row.message_id),
            topic=row.topic,
            key=row.key,
            attempts=row.attempts,
            checks=row.checks,
            last_error=row.last_error,
            created_at=_utc(row.created_at),
            updated_at=_utc(row.updated_at),
        )
        for row in rows
    ]


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadCount:
    """How many dead messages a selector matches (``count_dead``)."""

    total: int
    unconfirmed: int
    """Of those, half messages that died of unanswered check-backs (see ``DeadMessage``)."""


def count_dead(
    engine: sa.Engine,
    *,
    message_ids: Iterable[str | uuid.UUID] | None = None,
    topic: str | None = None,
    older_than: timedelta | None = None,
    all: bool = False,  # shadows the builtin to match the CLI's --all
) -> DeadCount:
    """Count the dead messages that ``purge_dead`` with the same selector would delete.

    Also what ``replay_dead`` would replay when ``older_than`` is None; for
    showing an operator the scale of a bulk change before confirming it. The
    selector rules and errors are those of ``purge_dead``.
    """
    selector = _Selector.of("count", message_ids, topic, older_than, all)
    unconfirmed = sa.func.coalesce(sa.func.sum(sa.case((_UNCONFIRMED, 1), else_=0)), 0)
    total = unconfirmed_total = 0
    with _database(engine) as conn:
        chunks: list[tuple[uuid.UUID, ...] | None] = (
            [None]
            if selector.message_ids is None
            else [
                selector.message_ids[i : i + BATCH_SIZE]
                for i in range(0, len(selector.message_ids), BATCH_SIZE)
            ]
        )
        for chunk in chunks:
            query = sa.select(sa.func.count(), unconfirmed).where(
                _t.c.status == _DEAD, *selector.filters(conn)
            )
            if chunk is not None:
                query = query.where(_t.c.message_id.in_(chunk))
            n, u = conn.execute(query).one()
            total += n
            unconfirmed_total += u
    return DeadCount(total=total, unconfirmed=unconfirmed_total)


def replay_dead(
    engine: sa.Engine,
    *,
    message_ids: Iterable[str | uuid.UUID] | None = None,
    topic: str | None = None,
    all: bool = False,  # shadows the builtin to match the CLI's --all
) -> int:
    """Make dead messages pending again, to be published as soon as a relay sees them.

    Selects by ``message_ids``, ``topic`` (combined with AND when both are
    given) or ``all=True``; with none of them it raises ``ConfigurationError``
    and changes nothing. Only rows whose status is ``dead`` change; any other
    id given is left alone and not counted. Each replayed row gets
    ``attempts=0``, ``checks=0``, ``next_attempt_at=now``, no claim and no
    ``last_error`` (the old one is logged as ``dead.message_replayed``).
    Returns how many messages were replayed.

    A dead *prepared* message (a half message whose check-backs were never
    answered, ``DeadMessage.unconfirmed``) becomes pending too, that is
    deliverable, although its local transaction was never confirmed. Replay
    it only if you know that transaction committed; otherwise purge it.

    Works in batches of ``BATCH_SIZE`` rows, one transaction each; a message
    that dies while a topic or ``all`` replay runs may be left for the next run.
    """
    selector = _Selector.of("replay", message_ids, topic, None, all)
    log = get_logger("outbox.admin")

    def replay(conn: sa.Connection, rows: Sequence[Any]) -> int:
        now = _now(conn)
        changed = set(
            conn.execute(
                sa.update(_t)
                # The status check here, not only in the SELECT before, is what makes a
                # row that changed meanwhile (published, replayed by someone else) safe.
                .where(_t.c.id.in_([row.id for row in rows]), _t.c.status == _DEAD)
                .values(
                    status=MessageStatus.PENDING.value,
                    attempts=0,
                    checks=0,
                    next_attempt_at=now,
                    last_error=None,
                    claimed_by=None,
                    claimed_until=None,
                    updated_at=now,
                )
                .returning(_t.c.id)
            ).scalars()
        )
        for row in rows:
            if row.id in changed:
                log.info(
                    "dead.message_replayed",
                    message_id=str(row.message_id),
                    topic=row.topic,
                    key=row.key,
                    attempts=row.attempts,
                    checks=row.checks,
                    unconfirmed=_is_unconfirmed(row.attempts, row.checks),
                    last_error=row.last_error,
                )
        return len(changed)

    count = _in_batches(engine, selector, replay)
    log.info("dead.replayed", count=count, **selector.log_fields())
    return count


def purge_dead(
    engine: sa.Engine,
    *,
    message_ids: Iterable[str | uuid.UUID] | None = None,
    topic: str | None = None,
    older_than: timedelta | None = None,
    all: bool = False,  # shadows the builtin to match the CLI's --all
) -> int:
    """Delete dead messages for good; return how many were deleted.

    Selects by ``message_ids``, ``topic``, ``older_than`` (dead, that is last
    updated, longer ago than this) -- combined with AND when several are given
    -- or ``all=True``; with none of them it raises ``ConfigurationError`` and
    deletes nothing. Only rows whose status is ``dead`` are deleted; each is
    logged as ``dead.message_purged`` with its ``last_error``. This is also
    how to discard a dead half message whose transaction did not commit.
    Receipts are kept. Works in batches of ``BATCH_SIZE`` rows, one
    transaction each.
    """
    selector = _Selector.of("purge", message_ids, topic, older_than, all)
    log = get_logger("outbox.admin")

    def purge(conn: sa.Connection, rows: Sequence[Any]) -> int:
        deleted = set(
            conn.execute(
                sa.delete(_t)
                .where(_t.c.id.in_([row.id for row in rows]), _t.c.status == _DEAD)
                .returning(_t.c.id)
            ).scalars()
        )
        for row in rows:
            if row.id in deleted:
                log.info(
                    "dead.message_purged",
                    message_id=str(row.message_id),
                    topic=row.topic,
                    key=row.key,
                    last_error=row.last_error,
                )
        return len(deleted)

    count = _in_batches(engine, selector, purge)
    log.info("dead.purged", count=count, **selector.log_fields())
    return count


# --- selection and batching ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Selector:
    """Which dead rows an operator asked for; never empty unless ``all`` says so."""

    message_ids: tuple[uuid.UUID, ...] | None
    topic: str | None
    older_than: timedelta | None
    all: bool

    @classmethod
    def of(
        cls,
        action: str,
        message_ids: Iterable[str | uuid.UUID] | None,
        topic: str | None,
        older_than: timedelta | None,
        all: bool,
    ) -> _Selector:
        ids = None if message_ids is None else _uuids(message_ids)
        given = ids is not None or topic is not None or older_than is not None
        # Replaying by age is not offered: "replay everything that died a week ago" is
        # rarely what is meant, while purging by age is routine housekeeping.
        names = "message ids, a topic" + ("" if action == "replay" else " or an age (older_than)")
        if not given and not all:
            raise ConfigurationError(
                f"{action} needs a selector: give {names}, or all=True (--all) to {action} "
                "every dead message"
            )
        if given and all:
            raise ConfigurationError(
                f"all=True (--all) already selects every dead message; drop it to {action} "
                f"only the ones selected by {names}"
            )
        if topic is not None and not topic:
            raise ConfigurationError("topic must not be empty")
        if older_than is not None and older_than < timedelta(0):
            raise ConfigurationError(f"older_than must not be negative, got {older_than!r}")
        return cls(ids, topic, older_than, all)

    def filters(self, conn: sa.Connection) -> list[sa.ColumnElement[bool]]:
        """The conditions beyond ``status = 'dead'`` and the message ids."""
        out: list[sa.ColumnElement[bool]] = []
        if self.topic is not None:
            out.append(_t.c.topic == self.topic)
        if self.older_than is not None:
            if conn.dialect.name == "postgresql":
                cutoff: sa.ColumnElement[Any] = sa.func.now() - sa.literal(
                    self.older_than, sa.Interval()
                )
            else:
                cutoff = sa.literal(datetime.now(UTC) - self.older_than, _t.c.updated_at.type)
            out.append(_t.c.updated_at < cutoff)
        return out

    def log_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        if self.message_ids is not None:
            fields["selected_ids"] = len(self.message_ids)
        if self.topic is not None:
            fields["topic"] = self.topic
        if self.older_than is not None:
            fields["older_than"] = format_duration(self.older_than)
        if self.all:
            fields["all"] = True
        return fields


def _in_batches(
    engine: sa.Engine,
    selector: _Selector,
    act: Callable[[sa.Connection, Sequence[Any]], int],
) -> int:
    """Run ``act`` on the selected dead rows, ``BATCH_SIZE`` at a time; sum its counts.

    ``act`` gets the open transaction and the batch's rows (``id``, ``message_id``,
    ``topic``, ``key``, ``attempts``, ``checks``, ``last_error``); its changes commit
    with the batch. (Rows are typed Any: ``Row``'s type parameters differ between
    SQLAlchemy 2.0 and 2.1.)
    """
    columns = (
        _t.c.id,
        _t.c.message_id,
        _t.c.topic,
        _t.c.key,
        _t.c.attempts,
        _t.c.checks,
        _t.c.last_error,
    )
    total = 0
    with _translated(engine):
        if selector.message_ids is not None:
            # Ids go through the unique index on message_id, a chunk per transaction.
            for start in range(0, len(selector.message_ids), BATCH_SIZE):
                chunk = selector.message_ids[start : start + BATCH_SIZE]
                with engine.begin() as conn:
                    rows = conn.execute(
                        sa.select(*columns).where(
                            _t.c.status == _DEAD,
                            _t.c.message_id.in_(chunk),
                            *selector.filters(conn),
                        )
                    ).all()
                    if rows:
                        total += act(conn, rows)
            return total
        # A keyset cursor over id: each batch starts after the last one, so the whole
        # run reads the table once (not once per batch), and a row is visited at most
        # once, so a message that dies again after its replay is not replayed in a loop.
        # Rows are already dead, i.e. committed, so the "lower id commits later" caveat
        # of cursors over id only means a row dying meanwhile may wait for the next run.
        after: int | None = None
        while True:
            with engine.begin() as conn:
                query = (
                    sa.select(*columns)
                    .where(_t.c.status == _DEAD, *selector.filters(conn))
                    .order_by(_t.c.id)
                    .limit(BATCH_SIZE)
                )
                if after is not None:
                    query = query.where(_t.c.id > after)
                rows = conn.execute(query).all()
                if rows:
                    total += act(conn, rows)
            if len(rows) < BATCH_SIZE:
                return total
            after = rows[-1].id


# --- helpers ---------------------------------------------------------------------------------


@contextmanager
def _database(engine: sa.Engine) -> Iterator[sa.Connection]:
    """Yield a connection in a transaction; translate driver errors to ``DatabaseError``."""
    with _translated(engine), engine.begin() as conn:
        yield conn


@contextmanager
def _translated(engine: sa.Engine) -> Iterator[None]:
    """Turn driver errors raised inside into ``DatabaseError`` saying what to do."""
    try:
        yield
    except sa.exc.DBAPIError as e:
        text = str(e.orig).strip()
        missing = "does not exist" in text or "no such table" in text
        if missing and ("outbox_message" in text or "outbox_receipt" in text):
            raise DatabaseError(
                f"the outbox tables do not exist in {redact_url(engine.url)}; run "
                "`outbox db upgrade` first"
            ) from e
        raise DatabaseError(f"database {redact_url(engine.url)} failed: {text}") from e


def _now(conn: sa.Connection) -> sa.ColumnElement[datetime]:
    """Now, on the clock the relay compares ``next_attempt_at`` with (see module docstring)."""
    if conn.dialect.name == "postgresql":
        return sa.func.now()
    return sa.literal(datetime.now(UTC), _t.c.updated_at.type)


def _uuid(value: str | uuid.UUID) -> uuid.UUID:
    try:
        return uuid.UUID(normalize_message_id(value))
    except ValueError as e:
        raise ConfigurationError(str(e)) from None


def _uuids(values: Iterable[str | uuid.UUID]) -> tuple[uuid.UUID, ...]:
    if isinstance(values, str | uuid.UUID):
        # A lone id where a list belongs would otherwise be iterated character by character.
        raise ConfigurationError("message_ids must be a list of ids, not a single id")
    # dict.fromkeys: drop repeats, keep the order given.
    return tuple(dict.fromkeys(_uuid(v) for v in values))


def _utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything the framework writes there is UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _jsonable(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, MessageStatus):
        return value.value
    return value
