"""Create and migrate the framework's tables with Alembic, apart from the application's history.

The framework keeps its own Alembic version table (``outbox_alembic_version``),
so ``outbox db upgrade`` never reads or writes the application's
``alembic_version``, and an application's Alembic setup can ignore the
framework's tables (or include ``outbox.metadata`` to manage them itself).
"""

from __future__ import annotations

import io
from contextlib import contextmanager
from typing import TYPE_CHECKING

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from outbox.engines import make_engine
from outbox.errors import DatabaseError
from outbox.logs import redact_url

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["VERSION_TABLE", "current", "head", "history", "sql", "upgrade"]

VERSION_TABLE = "outbox_alembic_version"
LOCK_ID = 0x6F7574626F78  # "outbox": serializes concurrent `db upgrade` runs on PostgreSQL


def _config(connection: sa.Connection | None = None, url: str | None = None) -> Config:
    cfg = Config(stdout=io.StringIO())
    cfg.set_main_option("script_location", "outbox:migrations")
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url)
    cfg.attributes["connection"] = connection
    return cfg


@contextmanager
def _engine(bind: sa.Engine | str) -> Iterator[sa.Engine]:
    """Yield an engine for ``bind`` (disposed after if made here); translate driver errors."""
    engine = bind if isinstance(bind, sa.Engine) else make_engine(bind)
    try:
        yield engine
    except sa.exc.DBAPIError as e:
        raise DatabaseError(
            f"database {redact_url(engine.url)} failed: {str(e.orig).strip()}"
        ) from e
    finally:
        if engine is not bind:
            engine.dispose()


def upgrade(bind: sa.Engine | str, revision: str = "head") -> list[str]:
    """Migrate the framework's tables to ``revision``; return the revisions applied.

    Idempotent: at the target revision it does nothing. On PostgreSQL an advisory
    lock lets several processes run it at once (say, every replica at start-up).
    Raises ``DatabaseError`` if the tables exist but were made without this
    command (for example by ``metadata.create_all``), since migrating them blindly
    could fail half-way.
    """
    with _engine(bind) as engine, engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": LOCK_ID})
        before = _current(conn)
        if before is None and sa.inspect(conn).has_table("outbox_message"):
            raise DatabaseError(
                "the outbox tables exist but have no outbox_alembic_version row, so "
                "their version is unknown; if they were made by metadata.create_all "
                "from this same release, run `outbox db stamp head` once, then "
                "`outbox db upgrade` works as usual"
            )
        command.upgrade(_config(conn), revision)
        return _applied(before, _current(conn))


def stamp(bind: sa.Engine | str, revision: str = "head") -> None:
    """Record ``revision`` as applied without running it (for tables made another way)."""
    with _engine(bind) as engine, engine.begin() as conn:
        command.stamp(_config(conn), revision)


def current(bind: sa.Engine | str) -> str | None:
    """Return the revision the database is at, or None if the tables were never migrated."""
    with _engine(bind) as engine, engine.connect() as conn:
        return _current(conn)


def head() -> str:
    """Return the newest revision this release ships."""
    heads = ScriptDirectory.from_config(_config()).get_heads()
    assert len(heads) == 1, f"the framework's migrations must have one head, found {heads}"
    return heads[0]


def history() -> Iterator[tuple[str, str]]:
    """Yield ``(revision, description)`` of every shipped migration, oldest first."""
    script = ScriptDirectory.from_config(_config())
    for rev in reversed(list(script.walk_revisions())):
        yield rev.revision, rev.doc or ""


def sql(dialect: str = "postgresql", revision: str = "head", start: str | None = None) -> str:
    """Return the DDL that ``upgrade`` would run on an empty database of ``dialect``.

    For teams that review SQL before it runs; ``start`` gives the SQL from that
    revision on instead of from scratch.
    """
    url = {"postgresql": "postgresql+psycopg://", "sqlite": "sqlite://"}.get(dialect)
    if url is None:
        raise ValueError(f"dialect must be 'postgresql' or 'sqlite', not {dialect!r}")
    cfg = _config(url=url)
    buffer = io.StringIO()
    cfg.output_buffer = buffer
    command.upgrade(cfg, f"{start}:{revision}" if start else revision, sql=True)
    return buffer.getvalue()


def _current(conn: sa.Connection) -> str | None:
    return MigrationContext.configure(
        conn, opts={"version_table": VERSION_TABLE}
    ).get_current_revision()


def _applied(before: str | None, after: str | None) -> list[str]:
    if before == after or after is None:
        return []
    script = ScriptDirectory.from_config(_config())
    return [r.revision for r in reversed(list(script.iterate_revisions(after, before or "base")))]
