"""The test kit on PostgreSQL: the tests of tests/unit/test_testing_kit.py on a schema of their own.

Relay and consumers run as on SQLite, but on PostgreSQL's concurrency: two
copies of a message really race for the inbox row, and the relay takes keyed
messages by shard locks.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from outbox.testing import isolated_engine

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

# A sibling test module: its KitBehaviour runs here on PostgreSQL.
from test_testing_kit import EXAMPLE, KitBehaviour, run_pytest


class TestKitOnPostgres(KitBehaviour):
    @pytest.fixture
    def kit_engine(self, pg_url: str) -> Iterator[sa.Engine]:
        with isolated_engine(pg_url) as engine:
            yield engine


def test_each_caller_gets_a_schema_of_its_own_dropped_afterwards(pg_url: str) -> None:
    with isolated_engine(pg_url) as engine, engine.connect() as conn:
        schema = conn.execute(sa.text("SELECT current_schema()")).scalar_one()
        tables = sa.inspect(conn).get_table_names(schema=schema)
        assert schema.startswith("outbox_test_")
        assert {"outbox_message", "outbox_inbox"} <= set(tables)
    admin = sa.create_engine(pg_url)
    try:
        with admin.connect() as conn:
            left = conn.execute(
                sa.text("SELECT count(*) FROM information_schema.schemata WHERE schema_name = :s"),
                {"s": schema},
            ).scalar_one()
    finally:
        admin.dispose()
    assert left == 0


def test_the_documented_example_passes_on_postgresql(pg_url: str) -> None:
    proc = run_pytest(str(EXAMPLE), f"--outbox-database-url={pg_url}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 passed in" in proc.stdout
