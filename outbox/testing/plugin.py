"""The pytest plugin of the test kit, registered as the ``pytest11`` entry point ``outbox``.

Fixtures (all function-scoped, none autouse, all sync so that any async test
plugin can run the tests that use them):

- ``outbox_database_url``: the option ``--outbox-database-url``, else the variable
  ``OUTBOX_TEST_DATABASE_URL``, else None (SQLite);
- ``outbox_engine``: a sync engine with the framework's tables on a database of the
  test's own (``isolated_engine``: a SQLite file in ``tmp_path``, or a fresh
  PostgreSQL schema dropped afterwards);
- ``outbox_broker``: a ``FaultyBroker`` (connected by the harness on first use);
- ``outbox_harness``: an ``OutboxHarness`` on both, seeded by ``--outbox-seed``.

pytest loads the plugin in every run where ``outbox`` is installed: it only
adds options and fixtures, and the fixtures import the kit when first used.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    import sqlalchemy as sa

    from outbox.testing.broker import FaultyBroker
    from outbox.testing.harness import OutboxHarness

DATABASE_URL_VARIABLE = "OUTBOX_TEST_DATABASE_URL"


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add the kit's command-line options."""
    group = parser.getgroup("outbox", "outbox test kit")
    group.addoption(
        "--outbox-database-url",
        default=None,
        help=(
            "database for the outbox_* fixtures: a PostgreSQL URL (a fresh schema per test) "
            f"or a SQLite file; default ${DATABASE_URL_VARIABLE}, else a SQLite file per test"
        ),
    )
    group.addoption(
        "--outbox-seed",
        type=int,
        default=None,
        help="seed of the idempotency mode's shuffles (printed by a test that used one)",
    )


@pytest.fixture
def outbox_database_url(request: pytest.FixtureRequest) -> str | None:
    """The database the kit's fixtures use, or None for a SQLite file per test."""
    url = request.config.getoption("--outbox-database-url")
    return url or os.environ.get(DATABASE_URL_VARIABLE) or None


@pytest.fixture
def outbox_engine(outbox_database_url: str | None, tmp_path: Path) -> Iterator[sa.Engine]:
    """A sync engine with the framework's tables on a database of this test's own."""
    from outbox.testing.database import isolated_engine

    with isolated_engine(outbox_database_url, directory=tmp_path) as engine:
        yield engine


@pytest.fixture
def outbox_broker() -> FaultyBroker:
    """An in-memory broker with crash points; the harness connects it on first use."""
    from outbox.testing.broker import FaultyBroker

    return FaultyBroker()


@pytest.fixture
def outbox_harness(
    outbox_engine: sa.Engine, outbox_broker: FaultyBroker, request: pytest.FixtureRequest
) -> OutboxHarness:
    """An ``OutboxHarness`` on ``outbox_engine`` and ``outbox_broker``.

    It starts on first use (``add_consumer``, ``deliver``, ``drain``, ...); it
    holds nothing that needs closing once the test's event loop is gone.
    """
    from outbox.testing.harness import OutboxHarness

    return OutboxHarness(
        outbox_engine, broker=outbox_broker, seed=request.config.getoption("--outbox-seed")
    )
