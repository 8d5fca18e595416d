"""Times in SQL: the database's clock on PostgreSQL, the application's on SQLite.

On PostgreSQL a deadline is ``now() + :interval``, so hosts whose clocks
disagree still agree on when a row is due. SQLite has no interval arithmetic
the framework can rely on; there the application computes the times and binds
them (``params``), which is fine for its single process.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import bindparam, func

__all__ = ["DatabaseClock"]


class DatabaseClock:
    """Builds ``now`` / ``now ± :duration`` expressions and the parameters they need."""

    def __init__(self, postgres: bool) -> None:
        self.postgres = postgres

    def now(self) -> sa.ColumnElement[Any]:
        """``now()`` on PostgreSQL; the bound ``:now`` on SQLite."""
        if self.postgres:
            return func.now()
        return bindparam("now", type_=sa.DateTime(timezone=True))

    def later(self, name: str) -> sa.ColumnElement[Any]:
        """``now() + :name`` on PostgreSQL; a precomputed ``:name_at`` on SQLite."""
        if self.postgres:
            return func.now() + bindparam(name, type_=sa.Interval())
        return bindparam(f"{name}_at", type_=sa.DateTime(timezone=True))

    def earlier(self, name: str) -> sa.ColumnElement[Any]:
        """``now() - :name`` on PostgreSQL; a precomputed ``:name_before`` on SQLite."""
        if self.postgres:
            return func.now() - bindparam(name, type_=sa.Interval())
        return bindparam(f"{name}_before", type_=sa.DateTime(timezone=True))

    def params(self, **durations: timedelta) -> dict[str, Any]:
        """The parameters of a statement using ``now``, ``later`` and ``earlier`` of these."""
        if self.postgres:
            return dict(durations)
        now = datetime.now(UTC)
        params: dict[str, Any] = {"now": now}
        for name, value in durations.items():
            params[f"{name}_at"] = now + value
            params[f"{name}_before"] = now - value
        return params
