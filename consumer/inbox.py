"""The inbox: the row that makes a handler's effects happen once per message and group.

The row is inserted first, in the handler's own transaction, with ``ON CONFLICT
DO NOTHING``: if another copy of the message was already handled (or is being
handled right now: the unique index makes the second insert wait for the first
transaction), nothing is inserted and the handler is not called. The handler's
writes and the inbox row then commit together, before the message is acked.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from outbox.engines import plain_postgres
from outbox.tables import inbox_table

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["inbox_insert", "inbox_insert_batch", "inbox_row", "purge_inbox"]

# A batch's rows as two arrays: one statement text whatever the batch size, so the
# driver prepares it once, and no per-row work in SQLAlchemy. The ids come back as
# text in the canonical form ``outbox.ids.normalize_message_id`` gives.
_PG_BATCH = (
    f"INSERT INTO {inbox_table.name} (consumer_group, message_id, topic, processed_at) "
    "SELECT %(group)s, m, t, %(at)s "
    "FROM unnest(%(ids)s::uuid[], %(topics)s::text[]) AS batch (m, t) "
    "ON CONFLICT (consumer_group, message_id) DO NOTHING "
    "RETURNING message_id::text"
)

_INSERTS: dict[tuple[str, bool], Any] = {}


def inbox_insert(dialect: str) -> Any:
    """The inbox INSERT for ``dialect`` (PostgreSQL or SQLite): returns the new row's id, or no
    row at all when this group has seen the message already."""
    return _insert(dialect, many=False)


def inbox_insert_batch(
    conn: sa.Connection, group: str, messages: Sequence[tuple[str, str]]
) -> set[str]:
    """Insert the inbox rows of ``messages`` (canonical message id, topic) in one statement.

    Returns the ids whose row is new: the others were handled before (or appear
    twice in ``messages``: only one copy is new).
    """
    if not messages:
        return set()
    now = datetime.now(UTC)
    if plain_postgres(conn):
        params = {
            "group": group,
            "at": now,
            "ids": _array_literal([mid for mid, _ in messages]),
            "topics": _array_literal([topic for _, topic in messages]),
        }
        return set(conn.exec_driver_sql(_PG_BATCH, params).scalars())
    rows = [
        {"consumer_group": group, "message_id": uuid.UUID(mid), "topic": topic, "processed_at": now}
        for mid, topic in messages
    ]
    insert = _insert(conn.dialect.name, many=True)
    return {str(mid) for mid in conn.execute(insert, rows).scalars()}


def _array_literal(values: list[str]) -> str:
    """``values`` as one PostgreSQL array literal (``{"a","b"}``), every element quoted.

    One text parameter that PostgreSQL casts, where psycopg would adapt a list element
    by element in Python.
    """
    if not values:
        return "{}"
    escaped = [v.replace("\\", "\\\\").replace('"', '\\"') for v in values]
    return '{"' + '","'.join(escaped) + '"}'


def _insert(dialect: str, *, many: bool) -> Any:
    stmt = _INSERTS.get((dialect, many))
    if stmt is None:
        module: Any = postgresql if dialect == "postgresql" else sqlite
        # RETURNING, not rowcount: drivers do not all report a row count for INSERT.
        stmt = (
            module.insert(inbox_table)
            .on_conflict_do_nothing(index_elements=["consumer_group", "message_id"])
            .returning(inbox_table.c.message_id if many else inbox_table.c.id)
        )
        _INSERTS[(dialect, many)] = stmt
    return stmt


def inbox_row(group: str, message_id: Any, topic: str) -> dict[str, Any]:
    """The values of one inbox row."""
    return {
        "consumer_group": group,
        "message_id": message_id,
        "topic": topic,
        "processed_at": datetime.now(UTC),
    }


async def purge_inbox(
    engine: AsyncEngine, group: str, older_than: timedelta, batch: int = 5000
) -> int:
    """Delete this group's inbox rows older than ``older_than``, in batches; return how many."""
    t = inbox_table
    cutoff = datetime.now(UTC) - older_than
    old = (
        sa.select(t.c.id)
        .where(t.c.consumer_group == group, t.c.processed_at < cutoff)
        .limit(batch)
        .scalar_subquery()
    )
    total = 0
    while True:
        async with engine.begin() as conn:
            deleted = (await conn.execute(sa.delete(t).where(t.c.id.in_(old)))).rowcount
        total += deleted
        if deleted < batch:
            return total
