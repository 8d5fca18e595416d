"""Errors raised by the framework: one root, one subclass per thing a caller can act on."""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "ConfigurationError",
    "DatabaseError",
    "DuplicateMessageError",
    "InvalidMessageError",
    "MalformedMessageError",
    "OutboxError",
    "TransactionAbortedError",
    "TransactionRequiredError",
]


class OutboxError(Exception):
    """Root of every error the framework raises; catch this to catch them all."""


class InvalidMessageError(OutboxError, ValueError):
    """A message given to ``publish`` is malformed; nothing was written."""


class DuplicateMessageError(OutboxError):
    """An explicit ``message_id`` already exists in the outbox.

    The caller's transaction has been rolled back, so the business rows written
    with it are not committed either: retrying the whole unit of work with the
    same id is safe and publishes nothing twice.
    """

    def __init__(self, message_id: str) -> None:
        super().__init__(
            f"message_id {message_id} is already in the outbox; the transaction was rolled "
            "back. Reuse an id only to make a retried unit of work idempotent, or pass "
            "message_id=None to get a fresh one."
        )
        self.message_id = message_id


class TransactionRequiredError(OutboxError):
    """``publish`` was called where there is no transaction to join."""


class ConfigurationError(OutboxError, ValueError):
    """A configuration value is invalid; raised by ``validate()`` before any I/O."""


class DatabaseError(OutboxError):
    """The outbox database failed in a way the framework cannot handle itself."""


class TransactionAbortedError(DatabaseError):
    """A handler returned normally from a transaction that a database error had aborted.

    Committing it would silently roll everything back, the inbox row included, so
    the message is treated as failed instead: it is retried, then dead-lettered.
    """


class BrokerError(OutboxError):
    """The message broker refused an operation or could not be reached."""


class MalformedMessageError(OutboxError):
    """A received message is not a valid outbox envelope; it goes to the dead-letter queue."""
