"""Django migrations of the ``outbox`` app; they create the schema of ``outbox/tables.py``."""
