"""``capture_published``: what a block of code published, for assertions in producer tests.

It reads the outbox rows written during the block, through the caller's own
transaction when one is open, so a message added to a transaction that has not
committed yet is seen, and a transaction rolled back inside the block shows as
having published nothing::

    with capture_published(session) as published:
        place_order(session, order_id=7)
    published.assert_one("orders.created", payload={"order_id": 7}, key="customer-ada")
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar, overload

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from outbox.envelope import Envelope
from outbox.errors import MalformedMessageError
from outbox.message import Message
from outbox.tables import MessageStatus, outbox_table

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from types import TracebackType

    from outbox.message import HeaderValue

__all__ = ["Published", "capture_published"]

SyncTarget = sa.Engine | sa.Connection | Session
AsyncTarget = AsyncEngine | AsyncConnection | AsyncSession

_t = outbox_table
_COLUMNS = (
    _t.c.message_id,
    _t.c.topic,
    _t.c.key,
    _t.c.payload,
    _t.c.content_type,
    _t.c.headers,
    _t.c.created_at,
    _t.c.status,
)
# Rows that never become deliverable: a half message not committed yet, or rolled back.
_NOT_PUBLISHED = (MessageStatus.PREPARED.value, MessageStatus.DISCARDED.value)


class _Unset(enum.Enum):
    UNSET = "unset"


_UNSET = _Unset.UNSET
T = TypeVar("T")


class Published(Sequence[Message]):
    """The messages a block published, in the order it wrote them (filled when it ends).

    A sequence of ``outbox.Message``; ``prepared`` holds half messages written in
    the block and not yet committed.
    """

    def __init__(self) -> None:
        self._messages: list[Message] | None = None
        self._prepared: list[Message] = []

    def _fill(self, messages: list[Message], prepared: list[Message]) -> None:
        self._messages = messages
        self._prepared = prepared

    @property
    def messages(self) -> list[Message]:
        """The deliverable messages written in the block."""
        if self._messages is None:
            raise RuntimeError(
                "capture_published() fills its result when the with block ends; "
                "read it after the block"
            )
        return list(self._messages)

    @property
    def prepared(self) -> list[Message]:
        """Half messages written in the block that were neither committed nor rolled back."""
        self.messages  # noqa: B018  (the same "read it after the block" check)
        return list(self._prepared)

    @overload
    def __getitem__(self, index: int) -> Message: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Message]: ...
    def __getitem__(self, index: int | slice) -> Message | Sequence[Message]:
        return self.messages[index]

    def __len__(self) -> int:
        return len(self.messages)

    def __repr__(self) -> str:
        if self._messages is None:
            return "<Published (block still running)>"
        return f"<Published {self.topics}>"

    @property
    def topics(self) -> list[str]:
        """The topic of each message, in order."""
        return [m.topic for m in self.messages]

    def of(self, topic: str) -> list[Message]:
        """The messages of ``topic``."""
        return [m for m in self.messages if m.topic == topic]

    def assert_one(
        self,
        topic: str,
        *,
        payload: Any = _UNSET,
        key: str | _Unset | None = _UNSET,
        headers: Mapping[str, HeaderValue] | None = None,
    ) -> Message:
        """Assert that exactly one message of ``topic`` matches, and return it.

        ``payload`` and ``key`` must be equal when given (``unittest.mock.ANY``
        works inside a payload); ``headers`` must be among the message's headers.
        Other messages may have been published too.
        """
        matching = [m for m in self.of(topic) if _matches(m, payload, key, headers)]
        if len(matching) != 1:
            wanted = _describe_wanted(topic, payload, key, headers)
            found = "none" if not matching else f"{len(matching)}"
            raise AssertionError(
                f"expected one message {wanted}, found {found}.\n{self._listing()}"
            )
        return matching[0]

    def assert_none(self, topic: str | None = None) -> None:
        """Assert that nothing (of ``topic``, if given) was published."""
        unexpected = self.messages if topic is None else self.of(topic)
        if unexpected:
            what = "nothing" if topic is None else f"nothing on {topic!r}"
            raise AssertionError(f"expected {what} to be published.\n{self._listing()}")

    def _listing(self) -> str:
        if not self.messages:
            return "The block published nothing."
        lines = [f"The block published {len(self.messages)}:"]
        lines += [f"  {_describe(m)}" for m in self.messages]
        return "\n".join(lines)


def _matches(
    message: Message,
    payload: Any,
    key: str | _Unset | None,
    headers: Mapping[str, HeaderValue] | None,
) -> bool:
    if payload is not _UNSET and payload != message.payload:
        return False
    if key is not _UNSET and key != message.key:
        return False
    if headers:
        return all(
            name in message.headers and message.headers[name] == value
            for name, value in headers.items()
        )
    return True


def _describe_wanted(
    topic: str, payload: Any, key: str | _Unset | None, headers: Mapping[str, Any] | None
) -> str:
    parts = [f"on {topic!r}"]
    if key is not _UNSET:
        parts.append(f"key={key!r}")
    if payload is not _UNSET:
        parts.append(f"payload={payload!r}")
    if headers:
        parts.append(f"headers including {dict(headers)!r}")
    return " ".join(parts)


def _describe(message: Message) -> str:
    headers = f" headers={dict(message.headers)!r}" if message.headers else ""
    return f"{message.topic} key={message.key!r} payload={message.payload!r}{headers}"


class capture_published:  # lower case: it reads as a function, `with capture_published(s)`
    """Capture the outbox rows written through ``target`` while the block runs.

    ``target`` is an engine, connection or session, sync (``with``) or async
    (``async with``). Rows written through any session or connection of the same
    database during the block are captured; they are read through ``target``'s
    open transaction if it has one (so uncommitted rows of that transaction count),
    otherwise through a new connection (so only committed rows count). A message
    whose transaction rolled back inside the block is not in the result.
    """

    def __init__(self, target: SyncTarget | AsyncTarget) -> None:
        if not isinstance(target, SyncTarget | AsyncTarget):
            raise TypeError(
                "capture_published() takes a SQLAlchemy Engine, Connection or Session "
                f"(or their async forms), not {type(target).__name__}"
            )
        self._target = target
        self._published = Published()
        self._after = 0

    def __enter__(self) -> Published:
        target = self._sync_target()
        self._after = _read(target, _last_id)
        return self._published

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        rows = _read(self._sync_target(), lambda conn: _rows_after(conn, self._after))
        self._published._fill(*_split(rows))

    async def __aenter__(self) -> Published:
        target = self._async_target()
        self._after = await _aread(target, _last_id)
        return self._published

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        rows = await _aread(self._async_target(), lambda conn: _rows_after(conn, self._after))
        self._published._fill(*_split(rows))

    def _sync_target(self) -> SyncTarget:
        if isinstance(self._target, AsyncTarget):
            raise TypeError(
                f"use `async with capture_published(...)` for an {type(self._target).__name__}"
            )
        return self._target

    def _async_target(self) -> AsyncTarget:
        if not isinstance(self._target, AsyncTarget):
            raise TypeError(
                f"use `with capture_published(...)` for a {type(self._target).__name__}"
            )
        return self._target


def _last_id(conn: sa.Connection) -> int:
    return int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(_t.c.id), 0))).scalar_one())


def _rows_after(conn: sa.Connection, after: int) -> list[sa.RowMapping]:
    query = sa.select(*_COLUMNS).where(_t.c.id > after).order_by(_t.c.id)
    return list(conn.execute(query).mappings())


def _read(target: SyncTarget, read: Callable[[sa.Connection], T]) -> T:
    """Run ``read(connection)`` where the target's own transaction (if any) is visible.

    Reading never begins a transaction on the caller's session or connection: one
    that has none is read through a new connection of its engine instead.
    """
    if isinstance(target, Session):
        if target.in_transaction():
            return read(target.connection())
        target = target.get_bind()
    if isinstance(target, sa.Connection):
        if target.in_transaction():
            return read(target)
        target = target.engine
    with target.connect() as conn:
        return read(conn)


async def _aread(target: AsyncTarget, read: Callable[[sa.Connection], T]) -> T:
    """``_read`` for async targets: the read runs on the sync side of the connection."""
    if isinstance(target, AsyncSession):
        if target.in_transaction():
            conn = await target.connection()
            return await conn.run_sync(read)
        bind = target.bind
        if bind is None:
            raise TypeError("capture_published() needs an AsyncSession bound to one engine")
        target = bind
    if isinstance(target, AsyncConnection):
        if target.in_transaction():
            return await target.run_sync(read)
        target = target.engine
    async with target.connect() as conn:
        return await conn.run_sync(read)


def _split(rows: list[sa.RowMapping]) -> tuple[list[Message], list[Message]]:
    messages: list[Message] = []
    prepared: list[Message] = []
    for row in rows:
        if row["status"] == MessageStatus.PREPARED.value:
            prepared.append(_message(row))
        elif row["status"] not in _NOT_PUBLISHED:
            messages.append(_message(row))
    return messages, prepared


def _message(row: sa.RowMapping) -> Message:
    envelope = Envelope.from_row(row)
    try:
        return envelope.decode()
    except MalformedMessageError:
        # A codec the kit does not know: show the encoded bytes rather than fail the test.
        return Message(
            message_id=envelope.message_id,
            topic=envelope.topic,
            key=envelope.key,
            payload=envelope.body,
            headers=envelope.headers,
            created_at=envelope.created_at,
        )
