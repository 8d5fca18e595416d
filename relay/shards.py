"""Ownership of keyed-message shards through PostgreSQL advisory locks.

Keyed messages are spread over ``SHARD_COUNT`` shards by ``crc32(key)``. A shard
is published by the one relay that holds its session-level advisory lock, so all
messages of a key go through one relay, in order. The locks live on a dedicated
connection in autocommit mode (it never holds a snapshot open, which would stop
vacuum), and PostgreSQL releases them the moment that session ends: a relay
killed with -9 or cut off by ``pg_terminate_backend`` hands its shards over
without anyone having to notice.

Rebalancing: each relay also holds one "member" lock; counting granted member
locks tells every relay how many peers are alive. Each relay aims at
``ceil(SHARD_COUNT / members)`` shards: it gives up extra shards between rounds
(after settling everything it published from them) and takes free ones.
"""

from __future__ import annotations

import math
import zlib
from typing import TYPE_CHECKING

import sqlalchemy as sa

from outbox.errors import DatabaseError
from outbox.tables import SHARD_COUNT

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

__all__ = ["ShardOwner"]

MAX_MEMBERS = 1024

_HELD = sa.text(
    "SELECT objid::int AS shard, pid = pg_backend_pid() AS mine FROM pg_locks "
    "WHERE locktype = 'advisory' AND classid = CAST(:ns AS oid) AND objsubid = 2 AND granted "
    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)
_MEMBERS = sa.text(
    "SELECT count(*) FROM pg_locks "
    "WHERE locktype = 'advisory' AND classid = CAST(:ns AS oid) AND objsubid = 2 AND granted "
    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)
# Tries each candidate in turn; the ones whose lock was free come back (and are now ours).
_TAKE = sa.text(
    "SELECT s FROM unnest(CAST(:shards AS int[])) AS s WHERE pg_try_advisory_lock(:ns, s)"
)
_GIVE = sa.text("SELECT pg_advisory_unlock(:ns, s) FROM unnest(CAST(:shards AS int[])) AS s")
_JOIN = sa.text("SELECT pg_try_advisory_lock(:ns, :slot)")


def _namespace(label: str) -> int:
    """A positive int4 for ``pg_advisory_lock(int4, int4)``'s first key."""
    return zlib.crc32(label.encode()) & 0x7FFFFFFF


class ShardOwner:
    """Takes and gives up shards so that live relays share them evenly."""

    def __init__(self, engine: AsyncEngine, namespace: str | None = None) -> None:
        self._engine = engine
        self._label = namespace
        self.conn: AsyncConnection | None = None
        """The connection holding the locks; read keyed rows through it."""
        self.owned: tuple[int, ...] = ()
        self.slot: int | None = None
        self.members = 0
        self._shard_ns = 0
        self._member_ns = 0

    async def open(self) -> None:
        """Connect and join the relay group (no shards yet: ``rebalance`` takes them)."""
        conn = await self._engine.connect()
        try:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            label = self._label
            if label is None:
                label = (await conn.execute(sa.text("SELECT current_schema()"))).scalar_one()
            self._shard_ns = _namespace(f"outbox.shards:{label}")
            self._member_ns = _namespace(f"outbox.relays:{label}")
            for slot in range(MAX_MEMBERS):
                got = await conn.execute(_JOIN, {"ns": self._member_ns, "slot": slot})
                if got.scalar_one():
                    self.slot = slot
                    break
            else:
                raise DatabaseError(f"more than {MAX_MEMBERS} relays on one outbox")
        except BaseException:
            await conn.close()
            raise
        self.conn = conn

    async def rebalance(self) -> tuple[list[int], list[int]]:
        """Move towards a fair share; return the shards taken and given up."""
        conn = self._require()
        members = (await conn.execute(_MEMBERS, {"ns": self._member_ns})).scalar_one()
        self.members = max(1, int(members))
        fair = math.ceil(SHARD_COUNT / self.members)
        held = (await conn.execute(_HELD, {"ns": self._shard_ns})).all()
        mine = sorted(r.shard for r in held if r.mine)
        taken: list[int] = []
        given: list[int] = []
        if len(mine) > fair:
            given = mine[fair:]
            await conn.execute(_GIVE, {"ns": self._shard_ns, "shards": given})
        elif len(mine) < fair:
            busy = {r.shard for r in held}
            # Start where this relay's slot points, so peers starting together do not all
            # race for the same shards.
            start = ((self.slot or 0) * fair) % SHARD_COUNT
            order = [(start + i) % SHARD_COUNT for i in range(SHARD_COUNT)]
            want = [s for s in order if s not in busy][: fair - len(mine)]
            if want:
                result = await conn.execute(_TAKE, {"ns": self._shard_ns, "shards": want})
                taken = sorted(r.s for r in result)
        self.owned = tuple(sorted(set(mine) - set(given) | set(taken)))
        return taken, given

    async def close(self) -> None:
        """Give up every shard and leave the group (closing the session releases the locks)."""
        conn, self.conn = self.conn, None
        self.owned = ()
        self.slot = None
        if conn is not None:
            try:
                await conn.close()
            except Exception:
                await conn.invalidate()

    def _require(self) -> AsyncConnection:
        if self.conn is None:
            raise DatabaseError("the shard connection is not open")
        return self.conn
