"""Alembic environment for the framework's own migrations (see ``outbox.migrate``)."""

from __future__ import annotations

from alembic import context

from outbox.migrate import VERSION_TABLE

config = context.config

if context.is_offline_mode():
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        literal_binds=True,
        version_table=VERSION_TABLE,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    # outbox.migrate hands over a connection already inside its transaction (and,
    # on PostgreSQL, holding the advisory lock), so the whole upgrade is one unit.
    context.configure(connection=config.attributes["connection"], version_table=VERSION_TABLE)
    with context.begin_transaction():
        context.run_migrations()
