"""outbox: reliable messaging between services that each own a database.

Write business rows and outbox rows in one local transaction with ``publish``;
the relay (``outbox relay``) sends them to RabbitMQ, and consumers (``consumer``)
apply each message exactly once through an inbox table.
"""

from __future__ import annotations

from outbox.codec import JSON, Codec, JsonCodec
from outbox.errors import (
    ConfigurationError,
    DatabaseError,
    DuplicateMessageError,
    InvalidMessageError,
    OutboxError,
    TransactionAbortedError,
    TransactionRequiredError,
)
from outbox.half import AsyncHalfMessage, AsyncOutbox, HalfMessage, Outbox, Verdict
from outbox.message import HeaderValue, Message
from outbox.producer import Producer, ProducerConfig, publish
from outbox.tables import MessageStatus, inbox_table, metadata, outbox_table, receipt_table

__all__ = [
    "JSON",
    "AsyncHalfMessage",
    "AsyncOutbox",
    "Codec",
    "ConfigurationError",
    "DatabaseError",
    "DuplicateMessageError",
    "HalfMessage",
    "HeaderValue",
    "InvalidMessageError",
    "JsonCodec",
    "Message",
    "MessageStatus",
    "Outbox",
    "OutboxError",
    "Producer",
    "ProducerConfig",
    "TransactionAbortedError",
    "TransactionRequiredError",
    "Verdict",
    "inbox_table",
    "metadata",
    "outbox_table",
    "publish",
    "receipt_table",
]

__version__ = "0.1.0"
