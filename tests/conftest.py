"""Shared fixtures: each test gets its own PostgreSQL schema, SQLite file and RabbitMQ names.

Services are real. When one is missing a test that needs it is skipped, except
with ``CI=true``, where it fails: a green CI run must mean the services were there.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import outbox
from outbox.logs import redact_url
from outbox.memory_broker import InMemoryBroker

# The broker contract suite lives in a plain module; let pytest explain its failed asserts.
pytest.register_assert_rewrite("broker_contract")

PG_URL = os.environ.get(
    "OUTBOX_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
AMQP_URL = os.environ.get("OUTBOX_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test after the folder it lives in: unit, integration or fault."""
    for item in items:
        parts = Path(str(item.fspath)).parts
        for kind in ("unit", "integration", "fault"):
            if kind in parts:
                item.add_marker(getattr(pytest.mark, kind))


def _service_missing(what: str, url: str, error: object) -> None:
    message = f"{what} is not reachable at {redact_url(url)}: {error}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: a missing service fails the run)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def pg_url() -> str:
    """The PostgreSQL server the integration tests use (a database, not a schema)."""
    engine = sa.create_engine(PG_URL, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as e:
        _service_missing("PostgreSQL", PG_URL, e.orig)
    finally:
        engine.dispose()
    return PG_URL


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """The RabbitMQ server the integration tests use."""
    parts = urlsplit(AMQP_URL)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), 5):
            pass
    except OSError as e:
        _service_missing("RabbitMQ", AMQP_URL, e)
    return AMQP_URL


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> Iterator[str]:
    """A name no other test uses: for queues, exchanges, consumer groups.

    Consumers and relays declare a receipts exchange and queue named after the
    exchange; they are removed after the test along with nothing else.
    """
    name = f"t_{request.node.name[:24]}_{uuid.uuid4().hex[:8]}".replace("[", "_").replace("]", "")
    yield name
    if "amqp_url" in request.fixturenames:
        asyncio.run(_delete_receipt_objects(AMQP_URL, name))


async def _delete_receipt_objects(amqp_url: str, name: str) -> None:
    import aio_pika

    try:
        connection = await aio_pika.connect(amqp_url)
    except Exception:  # the broker is gone: nothing to clean up there
        return
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(f"{name}.receipts.relay")
        await channel.exchange_delete(f"{name}.receipts")


@pytest.fixture
def pg_schema(pg_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL schema, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{name}"'))
    yield name
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{name}" CASCADE'))
    admin.dispose()


def schema_url_args(schema: str) -> dict[str, object]:
    """``connect_args`` that put every connection of an engine into ``schema``."""
    return {"options": f"-csearch_path={schema}"}


@pytest.fixture
def pg_schema_url(pg_url: str, pg_schema: str) -> str:
    """A URL whose connections work in the test's own schema (for subprocesses and configs)."""
    url = sa.make_url(pg_url).update_query_dict({"options": f"-csearch_path={pg_schema}"})
    return url.render_as_string(hide_password=False)


@pytest.fixture
def pg_empty_engine(pg_schema_url: str) -> Iterator[sa.Engine]:
    """A sync engine on an empty schema of its own."""
    engine = sa.create_engine(pg_schema_url, pool_size=20)
    yield engine
    engine.dispose()


@pytest.fixture
def pg_engine(pg_empty_engine: sa.Engine) -> sa.Engine:
    """A sync engine on a schema of its own holding the framework's tables."""
    outbox.metadata.create_all(pg_empty_engine)
    return pg_empty_engine


@pytest.fixture
async def pg_async_engine(pg_schema_url: str, pg_engine: sa.Engine) -> AsyncIterator[AsyncEngine]:
    """An async engine (psycopg) on the same schema as ``pg_engine``."""
    engine = create_async_engine(pg_schema_url, pool_size=20)
    yield engine
    await engine.dispose()


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[sa.Engine]:
    """A sync engine on a SQLite file of its own holding the framework's tables."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'outbox.db'}")
    outbox.metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
async def sqlite_async_engine(
    sqlite_engine: sa.Engine, tmp_path: Path
) -> AsyncIterator[AsyncEngine]:
    """An async engine (aiosqlite) on the same file as ``sqlite_engine``."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'outbox.db'}")
    yield engine
    await engine.dispose()


@pytest.fixture(
    params=[
        pytest.param("sqlite", marks=pytest.mark.unit),
        pytest.param("postgresql", marks=pytest.mark.integration),
    ]
)
def engine(request: pytest.FixtureRequest) -> sa.Engine:
    """The framework's tables on SQLite and, as a second run of the test, on PostgreSQL."""
    return request.getfixturevalue("sqlite_engine" if request.param == "sqlite" else "pg_engine")


@pytest.fixture
async def memory() -> AsyncIterator[InMemoryBroker]:
    """A connected in-memory broker with nothing declared (a consumer declares its queues)."""
    broker = InMemoryBroker()
    await broker.connect()
    yield broker
    await broker.close()


@pytest.fixture
async def broker() -> AsyncIterator[InMemoryBroker]:
    """A connected in-memory broker with one queue that takes every topic."""
    b = InMemoryBroker()
    await b.connect()
    await b.declare_queue("everything", ["#"])
    yield b
    await b.close()
