"""The Django migration creates the very schema that SQLAlchemy and Alembic create.

The relay and the consumer read the outbox tables with SQLAlchemy whichever tool
created them, and rely on their constraints and partial indexes, so the schemas
are compared as PostgreSQL itself reports them: column types from ``format_type``,
constraints from ``pg_get_constraintdef`` and indexes (with their predicates)
from ``pg_indexes``, all normalized by the server rather than by this test.
"""

from __future__ import annotations

import difflib
import pprint
import uuid
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa
from django_setup import fixture_django_db  # noqa: F401  (registers django_db)

import outbox

# Bookkeeping of the migration tools, and the stand-in business table of test_django.py.
IGNORED_TABLES = {"django_migrations", "outbox_alembic_version", "t_business"}
FRAMEWORK_TABLES = set(outbox.metadata.tables)

MakeSchema = Callable[[], tuple[str, sa.Engine]]

_COLUMNS = sa.text(
    """
    SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, a.attidentity,
           pg_get_expr(d.adbin, d.adrelid)
    FROM pg_attribute a
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE a.attrelid = CAST(:table AS regclass) AND a.attnum > 0 AND NOT a.attisdropped
    ORDER BY a.attnum
    """
)
_CONSTRAINTS = sa.text(
    """
    SELECT conname, contype, pg_get_constraintdef(oid)
    FROM pg_constraint
    WHERE conrelid = CAST(:table AS regclass)
    ORDER BY conname
    """
)
_INDEXES = sa.text(
    "SELECT indexname, indexdef FROM pg_indexes "
    "WHERE schemaname = :schema AND tablename = :name ORDER BY indexname"
)
# Sequences the table owns: 'i' behind an identity column, 'a' behind a serial one.
_SEQUENCES = sa.text(
    """
    SELECT s.sequencename, s.data_type, s.start_value, s.min_value, s.max_value,
           s.increment_by, s.cycle, s.cache_size
    FROM pg_depend d
    JOIN pg_class c ON c.oid = d.objid AND c.relkind = 'S'
    JOIN pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_sequences s ON s.schemaname = n.nspname AND s.sequencename = c.relname
    WHERE d.refobjid = CAST(:table AS regclass) AND d.deptype IN ('i', 'a')
    ORDER BY s.sequencename
    """
)
_TABLES = sa.text("SELECT tablename FROM pg_tables WHERE schemaname = :schema ORDER BY tablename")


def describe(conn: sa.Connection, schema: str) -> dict[str, list[str]]:
    """Describe every table of ``schema`` as lines that PostgreSQL normalized, for diffing."""
    description: dict[str, list[str]] = {}
    for (name,) in conn.execute(_TABLES, {"schema": schema}):
        if name in IGNORED_TABLES:
            continue
        table = f'"{schema}"."{name}"'
        lines = []
        # Column order is compared too: it is what SELECT * and the physical layout show.
        for column, type_, not_null, identity, default in conn.execute(_COLUMNS, {"table": table}):
            lines.append(
                f"column {column} {type_}{' NOT NULL' if not_null else ''}"
                f"{f' identity={identity}' if identity else ''}"
                f"{f' default {default}' if default is not None else ''}"
            )
        # Primary key, unique and check constraints, by name; the definition text is
        # the server's own rendering, so equivalent SQL spellings compare equal.
        for constraint, kind, definition in conn.execute(_CONSTRAINTS, {"table": table}):
            lines.append(f"constraint {constraint} ({kind}) {definition}")
        # Every index, including those behind the primary key and unique constraints, with
        # its columns, method, uniqueness and partial predicate. The definition names the
        # table with its schema (the schemas differ), so that qualifier is removed.
        for index, definition in conn.execute(_INDEXES, {"schema": schema, "name": name}):
            definition = definition.replace(f" ON {schema}.", " ON ").replace(
                f' ON "{schema}".', " ON "
            )
            lines.append(f"index {index}: {definition}")
        # The sequences behind the identity columns: their names, types and numbering.
        for sequence, *numbering in conn.execute(_SEQUENCES, {"table": table}):
            lines.append(f"sequence {sequence}: {' '.join(str(value) for value in numbering)}")
        description[name] = lines
    return description


def assert_same_schema(
    expected: dict[str, list[str]], actual: dict[str, list[str]], labels: tuple[str, str]
) -> None:
    """Fail with a unified diff of the two descriptions if they differ in anything."""
    if expected == actual:
        return
    diff = "\n".join(
        difflib.unified_diff(
            pprint.pformat(expected, width=120).splitlines(),
            pprint.pformat(actual, width=120).splitlines(),
            fromfile=labels[0],
            tofile=labels[1],
            lineterm="",
        )
    )
    raise AssertionError(f"the schemas differ ({labels[0]} vs {labels[1]}):\n{diff}")


@pytest.fixture
def admin(pg_url: str) -> Iterator[sa.Engine]:
    """An autocommit engine on the test database with the default search_path."""
    engine = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


@pytest.fixture
def make_schema(pg_url: str, admin: sa.Engine) -> Iterator[MakeSchema]:
    """Create empty schemas on demand; return (schema, engine on it); drop them after."""
    made: list[tuple[str, sa.Engine]] = []

    def make() -> tuple[str, sa.Engine]:
        name = f"p_{uuid.uuid4().hex[:12]}"
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{name}"'))
        engine = sa.create_engine(pg_url, connect_args={"options": f"-csearch_path={name}"})
        made.append((name, engine))
        return name, engine

    yield make
    for name, engine in made:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{name}" CASCADE'))


def test_the_django_schema_holds_the_framework_tables(admin: sa.Engine, django_db: str) -> None:
    # Guards the parity tests below against comparing two empty schemas.
    with admin.connect() as conn:
        django_schema = describe(conn, django_db)

    assert set(django_schema) == FRAMEWORK_TABLES
    for table in FRAMEWORK_TABLES:
        assert (
            f"sequence {table}_id_seq: bigint 1 1 9223372036854775807 1 False 1"
            in (django_schema[table])
        )
    assert any("ix_outbox_message_due" in line for line in django_schema["outbox_message"])


def test_the_django_migration_creates_the_schema_of_outbox_metadata(
    admin: sa.Engine, make_schema: MakeSchema, django_db: str
) -> None:
    schema, engine = make_schema()
    outbox.metadata.create_all(engine)

    with admin.connect() as conn:
        metadata_schema = describe(conn, schema)
        django_schema = describe(conn, django_db)

    assert_same_schema(metadata_schema, django_schema, ("outbox.metadata", "django migrate"))


def test_the_django_migration_creates_the_schema_of_the_alembic_migrations(
    admin: sa.Engine, make_schema: MakeSchema, django_db: str
) -> None:
    from outbox.migrate import upgrade

    schema, engine = make_schema()
    upgrade(engine)

    with admin.connect() as conn:
        alembic_schema = describe(conn, schema)
        django_schema = describe(conn, django_db)

    assert_same_schema(alembic_schema, django_schema, ("outbox db upgrade", "django migrate"))


def test_a_difference_in_a_partial_index_is_reported(
    admin: sa.Engine, make_schema: MakeSchema, django_db: str
) -> None:
    # Proves the comparison can fail, and that its message shows what differs.
    schema, engine = make_schema()
    outbox.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP INDEX ix_outbox_message_due"))
        conn.execute(
            sa.text(
                "CREATE INDEX ix_outbox_message_due ON outbox_message (next_attempt_at) "
                "WHERE status = 'pending'"
            )
        )

    with admin.connect() as conn:
        changed, django_schema = describe(conn, schema), describe(conn, django_db)

    with pytest.raises(AssertionError, match="ix_outbox_message_due") as caught:
        assert_same_schema(changed, django_schema, ("changed", "django migrate"))
    assert "key IS NULL" in str(caught.value)
