"""A database of its own for each test: a SQLite file, or a fresh PostgreSQL schema."""

from __future__ import annotations

import tempfile
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa

from outbox.engines import database_url, make_engine
from outbox.errors import ConfigurationError
from outbox.logs import redact_url
from outbox.tables import metadata

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["isolated_engine"]


@contextmanager
def isolated_engine(
    url: str | sa.URL | None = None, *, directory: str | Path | None = None
) -> Iterator[sa.Engine]:
    """Yield a sync engine holding the framework's tables, on a database no other test sees.

    - ``url`` None: a new SQLite file in ``directory`` (default: a temporary folder
      removed afterwards).
    - a PostgreSQL URL: a new schema in that database, which every connection of the
      engine uses (``search_path`` in the URL, so engines the relay and consumers
      make from ``engine.url`` use it too); dropped with its contents afterwards.
    - a SQLite file URL: that file, as it is (the caller owns its isolation).
    """
    with ExitStack() as stack:
        if url is None:
            folder = directory or stack.enter_context(tempfile.TemporaryDirectory())
            engine_url = sa.URL.create("sqlite", database=str(Path(folder) / "outbox.db"))
        else:
            parsed = database_url(url)
            if parsed.get_backend_name() == "postgresql":
                engine_url = _schema_url(parsed, stack.enter_context(_schema(parsed)))
            elif parsed.get_backend_name() == "sqlite":
                if parsed.database in (None, "", ":memory:"):
                    raise ConfigurationError(
                        "the test kit needs a SQLite file, not an in-memory database: the "
                        "relay and consumers open connections of their own"
                    )
                engine_url = parsed
            else:
                raise ConfigurationError(
                    f"{redact_url(parsed)}: the test kit runs on PostgreSQL or SQLite"
                )
        engine = make_engine(engine_url)
        stack.callback(engine.dispose)
        metadata.create_all(engine)
        yield engine


@contextmanager
def _schema(url: sa.URL) -> Iterator[str]:
    """Create a schema with a fresh name; drop it (cascading) when done."""
    name = f"outbox_test_{uuid.uuid4().hex[:12]}"
    admin = make_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{name}"'))
        try:
            yield name
        finally:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP SCHEMA "{name}" CASCADE'))
    finally:
        admin.dispose()


def _schema_url(url: sa.URL, schema: str) -> sa.URL:
    """``url`` with every connection's ``search_path`` set to ``schema`` (libpq ``options``)."""
    options = url.query.get("options")
    existing = (options if isinstance(options, str) else " ".join(options or ())).strip()
    setting = f"-csearch_path={schema}"
    return url.update_query_dict({"options": f"{existing} {setting}".strip()})
