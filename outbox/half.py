"""Half messages and check-back: RocketMQ's transactional messages, rebuilt on the outbox.

For work that is not in the outbox database (another database, a payment API),
a producer first stores a *prepared* message (committed at once, never
published), does its work, then commits or rolls the message back::

    ob = Outbox(engine)
    with ob.prepare("payments.captured", {"id": 7}) as half:
        capture_payment()            # normal exit: deliverable; exception: rolled back

If the producer dies in between, the relay asks it back: a function registered
with ``@ob.checkback(topic)`` (loaded by ``outbox relay --app module:ob``) says
``Verdict.COMMIT``, ``ROLLBACK`` or ``UNKNOWN``. When the local transaction runs on
PostgreSQL, ``prepare(..., bind=connection)`` records its transaction id and the
relay answers by itself with ``pg_xact_status`` (see docs/half-messages.md).
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from outbox.engines import make_async_engine, make_engine
from outbox.errors import ConfigurationError, OutboxError, TransactionRequiredError
from outbox.message import HeaderValue, Message
from outbox.producer import Producer, _translate
from outbox.tables import MessageStatus, outbox_table
from outbox.topics import topic_matches, validate_pattern

if TYPE_CHECKING:
    from collections.abc import Generator, Mapping
    from types import TracebackType

__all__ = [
    "DEFAULT_CHECK_AFTER",
    "AsyncHalfMessage",
    "AsyncOutbox",
    "CheckBack",
    "HalfMessage",
    "Outbox",
    "Verdict",
]

DEFAULT_CHECK_AFTER = timedelta(seconds=30)
"""How old a prepared message gets before the relay checks it back."""

t = outbox_table
_PREPARED = MessageStatus.PREPARED.value


class Verdict(enum.StrEnum):
    """A check-back's answer about a prepared message."""

    COMMIT = "commit"  # the local work happened: deliver the message
    ROLLBACK = "rollback"  # it did not and never will: discard the message
    UNKNOWN = "unknown"  # cannot tell yet: ask again later


CheckBack = Callable[[Message], Verdict | Awaitable[Verdict]]
"""A check-back: sync or async, takes the ``Message``, returns a ``Verdict``."""

F = TypeVar("F", bound=Callable[..., Any])

_XID = sa.text(
    "SELECT pg_current_xact_id()::text::bigint AS xid, "
    "(SELECT system_identifier FROM pg_control_system())::text AS cluster"
)


class _Registry:
    """Check-backs by topic pattern; an exact topic beats a pattern, a pattern beats catch-all."""

    def __init__(self) -> None:
        self._patterns: list[tuple[str, Callable[..., Any]]] = []

    def register(self, pattern: str, function: Callable[..., Any]) -> None:
        try:
            validate_pattern(pattern)
        except ValueError as e:
            raise ConfigurationError(f"checkback: {e}") from None
        if any(p == pattern for p, _ in self._patterns):
            raise ConfigurationError(f"a check-back for {pattern!r} is already registered")
        self._patterns.append((pattern, function))

    def find(self, topic: str) -> Callable[..., Any] | None:
        exact = [f for p, f in self._patterns if p == topic]
        if exact:
            return exact[0]
        wild = [(p, f) for p, f in self._patterns if p != "#" and topic_matches(p, topic)]
        if wild:
            return wild[0][1]
        catch_all = [f for p, f in self._patterns if p == "#"]
        return catch_all[0] if catch_all else None

    def topics(self) -> list[str]:
        return [p for p, _ in self._patterns]


class _Base:
    """What the sync and async outboxes share: the producer and the check-back registry."""

    def __init__(self, producer: Producer | None, check_after: timedelta) -> None:
        if not isinstance(check_after, timedelta) or check_after < timedelta(0):
            raise ConfigurationError(f"check_after must be a timedelta >= 0, got {check_after!r}")
        self.producer = producer or Producer()
        self.check_after = check_after
        self._checkbacks = _Registry()

    def checkback(self, topic: str = "#") -> Callable[[F], F]:
        """Register the decorated function as the check-back for ``topic``.

        ``topic`` may be a RabbitMQ pattern (``payments.*``); without one the
        function answers for every topic that has no check-back of its own. The
        function gets the ``Message`` and returns a ``Verdict``; it may be async,
        and it runs in the relay with a timeout.
        """

        def register(function: F) -> F:
            if not callable(function):
                raise ConfigurationError("@checkback decorates a function")
            self._checkbacks.register(topic, function)
            return function

        return register

    def checkback_for(self, topic: str) -> Callable[..., Any] | None:
        """Return the check-back that answers for ``topic``, or None."""
        return self._checkbacks.find(topic)

    @property
    def checkback_topics(self) -> list[str]:
        """The topic patterns with a registered check-back."""
        return self._checkbacks.topics()

    def _row(
        self,
        topic: str,
        payload: Any,
        key: str | None,
        headers: Mapping[str, HeaderValue] | None,
        message_id: str | uuid.UUID | None,
        check_after: timedelta | None,
    ) -> tuple[dict[str, Any], Message]:
        delay = self.check_after if check_after is None else check_after
        if not isinstance(delay, timedelta) or delay < timedelta(0):
            raise ConfigurationError(f"check_after must be a timedelta >= 0, got {delay!r}")
        row, message = self.producer.build_row(
            topic,
            payload,
            key=key,
            headers=headers,
            message_id=message_id,
            status=MessageStatus.PREPARED,
        )
        row["next_attempt_at"] = row["created_at"] + delay
        return row, message


def _insert(
    row: dict[str, Any], dialect: str, delay: timedelta
) -> tuple[sa.Insert, dict[str, Any]]:
    stmt = sa.insert(t).inline()  # the new id is not needed: skip RETURNING
    if dialect == "postgresql":
        # The check time on the database clock, which the relay's sweep compares with.
        stmt = stmt.values(
            next_attempt_at=sa.func.now() + sa.bindparam("check_after", type_=sa.Interval())
        )
        row = {**row, "check_after": delay}
        row.pop("next_attempt_at")
    return stmt, row


def _outcome_error(message_id: str, wanted: str, found: str | None) -> OutboxError:
    if found is None:
        return OutboxError(f"half message {message_id} is not in the outbox (purged?)")
    return OutboxError(
        f"cannot {wanted} half message {message_id}: it is already {found}"
        + (" (a check-back decided it)" if found in ("discarded", "pending") else "")
    )


_COMMIT = (
    sa.update(t)
    .where(t.c.message_id == sa.bindparam("mid"), t.c.status == _PREPARED)
    .values(
        status=MessageStatus.PENDING.value,
        next_attempt_at=sa.bindparam("now"),
        updated_at=sa.bindparam("now"),
    )
)
_ROLLBACK = (
    sa.update(t)
    .where(t.c.message_id == sa.bindparam("mid"), t.c.status == _PREPARED)
    .values(
        status=MessageStatus.DISCARDED.value,
        updated_at=sa.bindparam("now"),
        last_error="rolled back by the producer",
    )
)
_STATUS = sa.select(t.c.status).where(t.c.message_id == sa.bindparam("mid"))

# The outcome each end of a half message accepts as already done (idempotent calls).
_DONE = {"commit": MessageStatus.PENDING.value, "rollback": MessageStatus.DISCARDED.value}


class HalfMessage:
    """A prepared message; ``commit()`` makes it deliverable, ``rollback()`` discards it.

    As a context manager: normal exit commits, an exception rolls back and is
    re-raised. With ``bind=`` the outcome follows the bound PostgreSQL
    transaction instead (the relay reads it), so leaving the block does nothing
    on success and rolls back on an exception.
    """

    def __init__(self, outbox: Outbox, message: Message, bound: bool) -> None:
        self._outbox = outbox
        self.message = message
        self.bound = bound
        """True when the relay resolves it from the bound transaction's id."""

    @property
    def message_id(self) -> str:
        """The message id, known as soon as the prepared row is committed."""
        return self.message.message_id

    def commit(self) -> None:
        """Make the message deliverable. Idempotent; raises ``OutboxError`` if it was discarded."""
        self._outbox._finish(self.message_id, "commit")

    def rollback(self) -> None:
        """Discard the message; it is never published. Raises ``OutboxError`` if already pending."""
        self._outbox._finish(self.message_id, "rollback")

    def __enter__(self) -> HalfMessage:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.rollback()
        elif not self.bound:
            self.commit()


class Outbox(_Base):
    """The outbox database, for half messages and their check-backs (sync).

    ``bind`` is a sync SQLAlchemy ``Engine`` or a URL. No I/O happens here.
    """

    def __init__(
        self,
        bind: sa.Engine | str,
        *,
        producer: Producer | None = None,
        check_after: timedelta = DEFAULT_CHECK_AFTER,
    ) -> None:
        super().__init__(producer, check_after)
        if isinstance(bind, AsyncEngine):
            raise ConfigurationError(
                "Outbox takes a sync engine; use AsyncOutbox for an AsyncEngine"
            )
        self._owns_engine = not isinstance(bind, sa.Engine)
        self.engine = bind if isinstance(bind, sa.Engine) else make_engine(bind)

    def prepare(
        self,
        topic: str,
        payload: Any,
        *,
        key: str | None = None,
        headers: Mapping[str, HeaderValue] | None = None,
        message_id: str | uuid.UUID | None = None,
        check_after: timedelta | None = None,
        bind: Session | sa.Connection | None = None,
    ) -> HalfMessage:
        """Store a prepared message and commit it; return the ``HalfMessage``.

        ``check_after`` overrides when the relay first checks it back.
        ``bind`` is the PostgreSQL ``Session`` or ``Connection`` whose open
        transaction does the local work: its transaction id is recorded, and
        the relay resolves the message from it (committed: deliver; aborted:
        discard) without calling any check-back. Raises ``InvalidMessageError``
        for bad arguments (nothing is stored).
        """
        row, message = self._row(topic, payload, key, headers, message_id, check_after)
        if bind is not None:
            row["xid"], row["xid_resource"] = _xid_of(bind)
        delay = self.check_after if check_after is None else check_after
        try:
            with self.engine.begin() as conn:
                stmt, params = _insert(row, conn.dialect.name, delay)
                conn.execute(stmt, params)
        except sa.exc.DBAPIError as e:
            raise _translate(e, message.message_id) from e
        return HalfMessage(self, message, bound=bind is not None)

    def _finish(self, message_id: str, wanted: str) -> None:
        stmt = _COMMIT if wanted == "commit" else _ROLLBACK
        params = {"mid": _uuid(message_id), "now": datetime.now(UTC)}
        with self.engine.begin() as conn:
            if conn.execute(stmt, params).rowcount == 1:
                return
            found = conn.execute(_STATUS, params).scalar_one_or_none()
        if found != _DONE[wanted]:
            raise _outcome_error(message_id, wanted, found)

    def dispose(self) -> None:
        """Close the engine if this object made it from a URL."""
        if self._owns_engine:
            self.engine.dispose()


class AsyncHalfMessage:
    """The async ``HalfMessage``: ``await half.commit()``, ``await half.rollback()``."""

    def __init__(self, outbox: AsyncOutbox, message: Message, bound: bool) -> None:
        self._outbox = outbox
        self.message = message
        self.bound = bound

    @property
    def message_id(self) -> str:
        """The message id."""
        return self.message.message_id

    async def commit(self) -> None:
        """Make the message deliverable (see ``HalfMessage.commit``)."""
        await self._outbox._finish(self.message_id, "commit")

    async def rollback(self) -> None:
        """Discard the message (see ``HalfMessage.rollback``)."""
        await self._outbox._finish(self.message_id, "rollback")


class _Preparing:
    """What ``AsyncOutbox.prepare`` returns: ``await`` it, or use it with ``async with``."""

    def __init__(self, outbox: AsyncOutbox, args: dict[str, Any]) -> None:
        self._outbox = outbox
        self._args = args
        self._half: AsyncHalfMessage | None = None

    def __await__(self) -> Generator[Any, None, AsyncHalfMessage]:
        return self._outbox._prepare(**self._args).__await__()

    async def __aenter__(self) -> AsyncHalfMessage:
        self._half = await self._outbox._prepare(**self._args)
        return self._half

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._half is not None
        if exc_type is not None:
            await self._half.rollback()
        elif not self._half.bound:
            await self._half.commit()


class AsyncOutbox(_Base):
    """The outbox database for asyncio code: ``async with ob.prepare(...) as half:``."""

    def __init__(
        self,
        bind: AsyncEngine | str,
        *,
        producer: Producer | None = None,
        check_after: timedelta = DEFAULT_CHECK_AFTER,
    ) -> None:
        super().__init__(producer, check_after)
        if isinstance(bind, sa.Engine):
            raise ConfigurationError("AsyncOutbox takes an AsyncEngine; use Outbox for a sync one")
        self._owns_engine = not isinstance(bind, AsyncEngine)
        self.engine = bind if isinstance(bind, AsyncEngine) else make_async_engine(bind)

    def prepare(
        self,
        topic: str,
        payload: Any,
        *,
        key: str | None = None,
        headers: Mapping[str, HeaderValue] | None = None,
        message_id: str | uuid.UUID | None = None,
        check_after: timedelta | None = None,
        bind: AsyncSession | AsyncConnection | None = None,
    ) -> _Preparing:
        """Store and commit a prepared message (see ``Outbox.prepare``)."""
        return _Preparing(
            self,
            {
                "topic": topic,
                "payload": payload,
                "key": key,
                "headers": headers,
                "message_id": message_id,
                "check_after": check_after,
                "bind": bind,
            },
        )

    async def _prepare(
        self,
        *,
        topic: str,
        payload: Any,
        key: str | None,
        headers: Mapping[str, HeaderValue] | None,
        message_id: str | uuid.UUID | None,
        check_after: timedelta | None,
        bind: AsyncSession | AsyncConnection | None,
    ) -> AsyncHalfMessage:
        row, message = self._row(topic, payload, key, headers, message_id, check_after)
        if bind is not None:
            conn = await bind.connection() if isinstance(bind, AsyncSession) else bind
            row["xid"], row["xid_resource"] = await conn.run_sync(_xid_of)
        delay = self.check_after if check_after is None else check_after
        try:
            async with self.engine.begin() as conn:
                stmt, params = _insert(row, conn.dialect.name, delay)
                await conn.execute(stmt, params)
        except sa.exc.DBAPIError as e:
            raise _translate(e, message.message_id) from e
        return AsyncHalfMessage(self, message, bound=bind is not None)

    async def _finish(self, message_id: str, wanted: str) -> None:
        stmt = _COMMIT if wanted == "commit" else _ROLLBACK
        params = {"mid": _uuid(message_id), "now": datetime.now(UTC)}
        async with self.engine.begin() as conn:
            if (await conn.execute(stmt, params)).rowcount == 1:
                return
            found = (await conn.execute(_STATUS, params)).scalar_one_or_none()
        if found != _DONE[wanted]:
            raise _outcome_error(message_id, wanted, found)

    async def dispose(self) -> None:
        """Close the engine if this object made it from a URL."""
        if self._owns_engine:
            await self.engine.dispose()


def _uuid(message_id: str) -> uuid.UUID:
    return uuid.UUID(message_id)


def _xid_of(bind: Session | sa.Connection) -> tuple[int, str]:
    """Return the id of the transaction open on ``bind`` and the cluster it runs on."""
    conn = bind.connection() if isinstance(bind, Session) else bind
    if conn.dialect.name != "postgresql":
        raise ConfigurationError(
            "prepare(bind=...) records a PostgreSQL transaction id; for another database "
            "leave bind out and register a check-back"
        )
    if (
        not conn.in_transaction()
        or conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT"
    ):
        raise TransactionRequiredError(
            "prepare(bind=...) needs the connection's transaction to be open (engine.begin())"
        )
    # pg_current_xact_id() gives the transaction an id now if it had none; xids are
    # cluster-wide, so the cluster's system identifier says where to ask about it.
    row = conn.execute(_XID).one()
    return int(row.xid), str(row.cluster)
