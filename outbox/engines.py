"""Turning the URLs users type into SQLAlchemy engines with the drivers the framework ships."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from outbox.errors import ConfigurationError
from outbox.logs import redact_url

__all__ = ["database_url", "make_async_engine", "make_engine", "plain_postgres"]

# Dialects that need no driver name: the framework ships psycopg 3 for PostgreSQL.
_SYNC_DRIVERS = {"postgres": "postgresql+psycopg", "postgresql": "postgresql+psycopg"}
_ASYNC_DRIVERS = {**_SYNC_DRIVERS, "sqlite": "sqlite+aiosqlite"}


def database_url(url: str | sa.URL, *, asynchronous: bool = False) -> sa.URL:
    """Parse ``url``, filling in the driver the framework uses when none is named.

    ``postgresql://`` (and ``postgres://``, as Heroku-style settings write it)
    becomes ``postgresql+psycopg://``; for async use ``sqlite://`` becomes
    ``sqlite+aiosqlite://``. Raises ``ConfigurationError`` for text that is not a
    database URL.
    """
    try:
        parsed = sa.make_url(url)
    except ArgumentError:
        raise ConfigurationError(
            f"{redact_url(url)!r} is not a database URL; use for example "
            "postgresql://user@host/db or sqlite:///outbox.db"
        ) from None
    drivers = _ASYNC_DRIVERS if asynchronous else _SYNC_DRIVERS
    if parsed.drivername in drivers:
        parsed = parsed.set(drivername=drivers[parsed.drivername])
    return parsed


def make_engine(url: str | sa.URL, **kwargs: object) -> sa.Engine:
    """Create a sync engine for ``url`` (see ``database_url``)."""
    parsed = database_url(url)
    try:
        return sa.create_engine(parsed, **kwargs)
    except (NoSuchModuleError, ImportError) as e:
        raise ConfigurationError(
            f"no driver for {redact_url(parsed)}: {e}; install it or name one that is"
        ) from e


def make_async_engine(url: str | sa.URL, **kwargs: object) -> AsyncEngine:
    """Create an async engine for ``url`` (see ``database_url``)."""
    parsed = database_url(url, asynchronous=True)
    try:
        return create_async_engine(parsed, **kwargs)
    except (NoSuchModuleError, ImportError) as e:
        raise ConfigurationError(
            f"no async driver for {redact_url(parsed)}: {e}; install it (for SQLite: "
            "pip install aiosqlite) or name one that is"
        ) from e


def plain_postgres(conn: sa.Connection) -> bool:
    """Whether ``conn`` takes a fixed PostgreSQL text through ``exec_driver_sql``.

    That is PostgreSQL with named driver parameters (psycopg's ``%(name)s``), and
    no ``schema_translate_map`` that the text, naming its tables as they are,
    would ignore. The framework's hot statements (the producer's outbox row, a
    consumer batch's inbox rows) take that path; anything else gets SQLAlchemy Core.
    """
    dialect = conn.dialect
    return (
        dialect.name == "postgresql"
        and dialect.paramstyle == "pyformat"
        and "schema_translate_map" not in conn.get_execution_options()
    )
