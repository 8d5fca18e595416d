"""Django, configured once per test process, with the outbox app migrated on real databases.

Django's settings are process-wide, so every test module that needs Django imports
``fixture_django_db`` from here and asks for the ``django_db`` fixture. Database
``default`` is PostgreSQL with its ``search_path`` on a schema of its own (``SCHEMA``),
and ``sqlite`` is a SQLite file, the embedded target. Both are migrated with
``migrate outbox``; the schema and the file are removed after the last test that
used them.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import django
import pytest
import sqlalchemy as sa
from django.conf import settings
from django.core.management import call_command
from django.db import connections

SCHEMA = f"dj_{uuid.uuid4().hex[:12]}"
"""The PostgreSQL schema that Django's ``default`` database works in."""

ALIASES = ("default", "sqlite")
"""The Django databases that hold the outbox tables: PostgreSQL and SQLite."""

BUSINESS_TABLE = "t_business"
"""A stand-in for the application's own rows, written in the same transaction as publish."""

# Each test module that imports the fixture gets its own session-scoped instance of it;
# the count makes the first one set up and the last one tear down.
_users = 0
_sqlite_dir: Path | None = None


def _configure(pg_url: str) -> None:
    global _sqlite_dir
    url = sa.make_url(pg_url)
    _sqlite_dir = Path(tempfile.mkdtemp(prefix="outbox-django-"))
    settings.configure(
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": url.database,
                "USER": url.username or "",
                "PASSWORD": url.password or "",
                "HOST": url.host or "",
                "PORT": str(url.port or ""),
                "OPTIONS": {"options": f"-c search_path={SCHEMA}"},
            },
            "sqlite": {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": str(_sqlite_dir / "outbox.db"),
            },
        },
        INSTALLED_APPS=["outbox.django"],
        USE_TZ=True,
    )
    django.setup()


@pytest.fixture(scope="session", name="django_db")
def fixture_django_db(pg_url: str) -> Iterator[str]:
    """Django with the outbox app migrated on every alias; yields the PostgreSQL schema."""
    global _users
    if _users == 0:
        admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{SCHEMA}"'))
        admin.dispose()
        if not settings.configured:
            _configure(pg_url)
        for alias in ALIASES:
            call_command("migrate", "outbox", database=alias, verbosity=0)
            with connections[alias].cursor() as cursor:
                cursor.execute(
                    f"CREATE TABLE {BUSINESS_TABLE} (id integer PRIMARY KEY, note text NOT NULL)"
                )
    _users += 1
    yield SCHEMA
    _users -= 1
    if _users == 0:
        connections.close_all()
        admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{SCHEMA}" CASCADE'))
        admin.dispose()
        if _sqlite_dir is not None:
            shutil.rmtree(_sqlite_dir, ignore_errors=True)
