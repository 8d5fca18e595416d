"""Alembic migrations of the framework's tables (run them with ``outbox db upgrade``)."""
