"""One-row INSERTs of a batch's handlers, sent as one multi-row INSERT (PostgreSQL + psycopg).

The usual handler writes a row: ``session.execute(insert(t).values(...))``. In a
batch of 64 messages that is 64 statements, and each one waits for an answer
that only says "INSERT 0 1": a round trip per message and, for plain handlers,
two handovers of the GIL between the handler thread and the event loop. Yet
nobody needs that answer before the batch commits. So while a batch's handlers
run, a statement of the form ``INSERT INTO t (...) VALUES (one row)``, with
nothing after the row (no ``ON CONFLICT``, no ``RETURNING``), is held back; it
returns no rows and reports ``rowcount`` 1. Consecutive held-back INSERTs of the
same statement then go out as one ``INSERT ... VALUES (...), (...), ...``:

- before any other statement runs on the connection (a query sees every row the
  handlers wrote before it, in order),
- when the handlers are done, before the batch commits.

A held-back INSERT that fails (a constraint, a bad value) therefore fails later,
at one of those points, but always before the commit: the batch is rolled back
and every message is handled again alone, without holding anything back (see
``Consumer._handle_batch``), so the failing handler sees its own error where it
ran the statement. What differs from running the statements one by one: a
``FOR EACH STATEMENT`` trigger fires once per multi-row INSERT, and SQLAlchemy's
``echo`` logs the statements as the handlers ran them. ``ConsumerConfig(
coalesce_inserts=False)`` turns this off.
"""

from __future__ import annotations

import contextlib
import functools
import re
import weakref
from typing import TYPE_CHECKING, Any

import psycopg

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = ["MAX_PARAMETERS", "coalesced_inserts", "coalesced_inserts_async", "row_insert"]

MAX_PARAMETERS = 30_000
"""Parameters per multi-row INSERT (PostgreSQL takes at most 65,535 per statement)."""

_INSERT_INTO = re.compile(r"\s*INSERT\s+INTO\s", re.IGNORECASE)
_VALUES = re.compile(r"\bVALUES\s*\(", re.IGNORECASE)
_SELECT = re.compile(r"\bSELECT\b", re.IGNORECASE)
_PLACEHOLDER = re.compile(r"%(?:\((\w+)\))?s")  # %s or %(name)s


@functools.lru_cache(maxsize=1024)
def row_insert(sql: str) -> tuple[str, str] | None:
    """Split ``INSERT INTO ... VALUES (row)`` into its head and its row; None for anything else.

    Only a statement that ends with its one row qualifies (no parameters before
    the row, no subquery in it, only ``%s`` or only ``%(name)s`` placeholders): it
    returns no rows and inserts exactly one, or fails. What this cannot be sure of
    is None, which only means the statement runs as usual.
    """
    if "%%" in sql or "$" in sql or not _INSERT_INTO.match(sql):
        return None
    values = _VALUES.search(sql)
    if values is None:
        return None
    start = values.end() - 1
    end = _closing_paren(sql, start)
    if end is None or sql[end + 1 :].strip() or "%" in sql[:start]:
        return None
    row = sql[start : end + 1]
    # A subquery would see the table as it was before the multi-row statement, not
    # with the rows held back before it: such a row runs alone. So does a row whose
    # placeholders the multi-row statement could not number (%b, %t, a stray %, or
    # named and positional ones mixed, which psycopg refuses anyway).
    names = _PLACEHOLDER.findall(row)
    if _SELECT.search(row) or row.count("%") != len(names) or len(set(map(bool, names))) > 1:
        return None
    return sql[:start], row


def _closing_paren(sql: str, start: int) -> int | None:
    """The index of the ``)`` that closes the ``(`` at ``start``; quoted text is skipped."""
    depth = 0
    i = start
    while i < len(sql):
        char = sql[i]
        if char in "'\"":
            i = sql.find(char, i + 1)  # a doubled quote scans as two quoted runs: the same
            if i < 0:
                return None
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


class _Held:
    """The INSERTs held back on one connection, in the order the handlers ran them."""

    def __init__(self, driver: Any) -> None:
        self._driver = driver
        self._rows: list[tuple[str, tuple[str, str], Any]] = []
        self.failure: BaseException | None = None
        """What made a send fail. Its rows are gone from the transaction, and an error
        raised before PostgreSQL saw them (a value psycopg cannot adapt) does not
        abort the transaction: were a handler to catch it, the batch must fail anyway."""

    def hold(self, query: Any, params: Any, options: dict[str, Any]) -> bool:
        """Hold back ``execute(query, params, **options)`` if it is a row INSERT; whether it was."""
        if options or not isinstance(query, str):
            return False
        split = row_insert(query)
        if split is None:
            return False
        # Parameters of the wrong kind run as usual, and meet psycopg's error there.
        parameters = _row_parts(split[1])[2]
        if isinstance(parameters, tuple):
            if not isinstance(params, dict):
                return False
        elif parameters:
            if not isinstance(params, list | tuple):
                return False
        elif params:
            return False
        self._rows.append((query, split, () if params is None else params))
        return True

    def send(self) -> None:
        """Run what is held (sync connection)."""
        statements = self._take()
        if not statements:
            return
        cursor = psycopg.RawCursor(self._driver)  # not a holding class: this must send
        try:
            for sql, params in statements:
                cursor.execute(sql, params)
        except BaseException as e:
            self.failure = self.failure or e
            raise
        finally:
            cursor.close()

    async def asend(self) -> None:
        """Run what is held (async connection)."""
        statements = self._take()
        if not statements:
            return
        cursor = psycopg.AsyncRawCursor(self._driver)
        try:
            for sql, params in statements:
                await cursor.execute(sql, params)
        except BaseException as e:
            self.failure = self.failure or e
            raise
        finally:
            await cursor.close()

    def _take(self) -> list[tuple[str, Any]]:
        """The held rows as statements, one per run of the same INSERT; nothing is held after."""
        rows, self._rows = self._rows, []
        statements: list[tuple[str, Any]] = []
        start = 0
        while start < len(rows):
            end = start + 1
            sql, (head, row), _ = rows[start]
            limit = max(1, MAX_PARAMETERS // max(1, _width(row)))
            while end < len(rows) and rows[end][0] == sql and end - start < limit:
                end += 1
            statements.append(_statement(head, row, [p for _, _, p in rows[start:end]]))
            start = end
        return statements


@functools.lru_cache(maxsize=1024)
def _row_parts(row: str) -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...] | int]:
    """``row`` cut at its placeholders, the parameter each one takes, and the parameters.

    The parameters are the names in order of first use (``%(name)s``; a name used
    twice is one parameter, as psycopg has it) or the number of ``%s``.
    """
    texts: list[str] = []
    slots: list[int] = []
    names: dict[str, int] = {}
    last = 0
    for match in _PLACEHOLDER.finditer(row):
        texts.append(row[last : match.start()])
        name = match.group(1)
        slots.append(names.setdefault(name, len(names)) if name else len(slots))
        last = match.end()
    texts.append(row[last:])
    return tuple(texts), tuple(slots), tuple(names) if names else len(slots)


def _width(row: str) -> int:
    """The number of parameters ``row`` takes."""
    parameters = _row_parts(row)[2]
    return parameters if isinstance(parameters, int) else len(parameters)


_CACHED_ROWS = 1024
"""Texts of up to this many rows are kept (256 of them): a batch's size repeats."""


@functools.lru_cache(maxsize=256)
def _native_sql(head: str, row: str, rows: int) -> str:
    """``head`` and ``rows`` copies of ``row``, its placeholders numbered $1, $2, ... on."""
    texts, slots, _ = _row_parts(row)
    width = _width(row)
    out = [head]
    for n in range(rows):
        if n:
            out.append(", ")
        base = n * width + 1
        for text, slot in zip(texts, slots, strict=False):
            out += (text, "$", str(base + slot))
        out.append(texts[-1])
    return "".join(out)


def _statement(head: str, row: str, params: list[Any]) -> tuple[str, list[Any]]:
    """One INSERT of every row in ``params``, in PostgreSQL's own placeholders ($n).

    Sent through psycopg's ``RawCursor``: the text is made once per number of rows,
    where psycopg would parse every multi-row text again (it caches only short ones).
    """
    parameters = _row_parts(row)[2]
    values: list[Any] = []
    if isinstance(parameters, int):
        for p in params:
            if len(p) != parameters:
                raise psycopg.ProgrammingError(
                    f"the query has {parameters} placeholders but {len(p)} parameters were passed"
                )
            values += p
    else:
        for p in params:
            try:
                values += [p[name] for name in parameters]
            except KeyError as e:
                raise psycopg.ProgrammingError(f"query parameter missing: {e.args[0]}") from None
    rows = len(params)
    build = _native_sql if rows <= _CACHED_ROWS else _native_sql.__wrapped__
    return build(head, row, rows), values


# The connections holding back, each with what it holds; the cursor classes below find
# their connection's here (psycopg creates a cursor with the connection and nothing else).
_HELD: weakref.WeakKeyDictionary[Any, _Held] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def _holding(driver: Any, cursor: type[Any], server_cursor: type[Any]) -> Iterator[_Held]:
    """Give ``driver`` the holding cursor classes for the block; its own ones after."""
    held = _HELD[driver] = _Held(driver)
    previous = driver.cursor_factory, driver.server_cursor_factory
    driver.cursor_factory, driver.server_cursor_factory = cursor, server_cursor
    try:
        yield held
    finally:
        driver.cursor_factory, driver.server_cursor_factory = previous
        del _HELD[driver]


@contextlib.contextmanager
def coalesced_inserts(connection: sa.Connection) -> Iterator[None]:
    """Hold back one-row INSERTs run on ``connection`` in the block; send them coalesced.

    Anything but psycopg 3's sync connection runs the block as it is. Leaving the block sends
    what is held (raising its error, if any); the transaction stays open.
    """
    driver = connection.connection.driver_connection
    if connection.dialect.driver != "psycopg" or driver is None:
        yield
        return
    with _holding(driver, _HoldingCursor, _SendingServerCursor) as held:
        yield
        held.send()
        if held.failure is not None:
            raise held.failure


@contextlib.asynccontextmanager
async def coalesced_inserts_async(connection: AsyncConnection) -> AsyncIterator[None]:
    """``coalesced_inserts`` for an ``AsyncConnection`` (``async def`` handlers' batches)."""
    driver = connection.sync_connection.connection.driver_connection  # type: ignore[union-attr]
    if connection.dialect.driver != "psycopg" or driver is None:
        yield
        return
    with _holding(driver, _HoldingAsyncCursor, _SendingAsyncServerCursor) as held:
        yield
        await held.asend()
        if held.failure is not None:
            raise held.failure


class _HoldingCursor(psycopg.Cursor[Any]):
    """Holds back row INSERTs; sends the held ones before anything else it runs."""

    _held_back = False

    def execute(self, query: Any, params: Any = None, **options: Any) -> Any:
        held = _HELD[self.connection]
        self._held_back = held.hold(query, params, options)
        if self._held_back:
            return self
        held.send()
        return super().execute(query, params, **options)

    def executemany(self, query: Any, params_seq: Any, **options: Any) -> None:
        self._held_back = False
        _HELD[self.connection].send()
        super().executemany(query, params_seq, **options)

    def copy(self, *args: Any, **kwargs: Any) -> Any:
        _HELD[self.connection].send()
        return super().copy(*args, **kwargs)

    def stream(self, *args: Any, **kwargs: Any) -> Any:
        _HELD[self.connection].send()
        return super().stream(*args, **kwargs)

    @property
    def rowcount(self) -> int:
        return 1 if self._held_back else super().rowcount


class _SendingServerCursor(psycopg.ServerCursor[Any]):
    """A server-side cursor that sends the held INSERTs before its query."""

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        _HELD[self.connection].send()
        return super().execute(*args, **kwargs)


class _HoldingAsyncCursor(psycopg.AsyncCursor[Any]):
    """``_HoldingCursor`` for psycopg's ``AsyncConnection``."""

    _held_back = False

    async def execute(self, query: Any, params: Any = None, **options: Any) -> Any:
        held = _HELD[self.connection]
        self._held_back = held.hold(query, params, options)
        if self._held_back:
            return self
        await held.asend()
        return await super().execute(query, params, **options)

    async def executemany(self, query: Any, params_seq: Any, **options: Any) -> None:
        self._held_back = False
        await _HELD[self.connection].asend()
        await super().executemany(query, params_seq, **options)

    @contextlib.asynccontextmanager
    async def copy(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        await _HELD[self.connection].asend()
        async with super().copy(*args, **kwargs) as copy:
            yield copy

    async def stream(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        await _HELD[self.connection].asend()
        async for row in super().stream(*args, **kwargs):
            yield row

    @property
    def rowcount(self) -> int:
        return 1 if self._held_back else super().rowcount


class _SendingAsyncServerCursor(psycopg.AsyncServerCursor[Any]):
    """``_SendingServerCursor`` for psycopg's ``AsyncConnection``."""

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        await _HELD[self.connection].asend()
        return await super().execute(*args, **kwargs)
