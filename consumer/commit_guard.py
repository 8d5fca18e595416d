"""Never commit, and ack, a PostgreSQL transaction that a database error has aborted.

After an error, PostgreSQL refuses every statement of the transaction and answers
its ``COMMIT`` with a silent ``ROLLBACK``. A handler that catches a database error
and returns normally would therefore have its message acked as done while nothing
it wrote, not even the inbox row, was committed: the message's effect would be
lost without a trace. The consumer checks the connection before committing and
treats such a handler as failed instead, so the message is retried and, if it
keeps happening, dead-lettered with this error as its reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from outbox.errors import TransactionAbortedError

if TYPE_CHECKING:
    import sqlalchemy as sa

__all__ = ["raise_if_aborted", "raise_if_aborted_driver"]

_INERROR = 3
"""libpq's PQTRANS_INERROR, as psycopg 3 (an ``IntEnum``) and psycopg 2 (an int) report it."""

_ABORTED = (
    "a database error that the handler caught aborted its transaction; committing would "
    "roll back its writes and inbox row. Let the error propagate, or run the statement "
    "that may fail in {savepoint}."
)


def raise_if_aborted(connection: sa.Connection) -> None:
    """Raise ``TransactionAbortedError`` if ``connection`` (SQLAlchemy) is in a failed transaction.

    Other databases than PostgreSQL, and drivers that do not report the
    transaction status, are left alone.
    """
    if connection.dialect.name == "postgresql":
        _check(connection.connection.driver_connection, "session.begin_nested()")


def raise_if_aborted_driver(driver_connection: Any) -> None:
    """``raise_if_aborted`` for a DB-API connection (Django's ``connection.connection``)."""
    _check(driver_connection, "a nested transaction.atomic()")


def _check(driver_connection: Any, savepoint: str) -> None:
    # psycopg 3 (sync and async) and psycopg 2 report the status here; others do not.
    status = getattr(getattr(driver_connection, "info", None), "transaction_status", None)
    if status == _INERROR:
        raise TransactionAbortedError(_ABORTED.format(savepoint=savepoint))
