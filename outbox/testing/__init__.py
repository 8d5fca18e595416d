"""The test kit: run a service's handlers, relay and producers in its own tests.

- ``OutboxHarness`` runs the real relay and copies of the service's consumers on
  an in-memory broker and a test database (SQLite, or PostgreSQL), reports what
  happened (``Outcomes``), and has an idempotency mode: every message delivered
  twice, shuffled, with the first handling rolled back.
- ``FaultyBroker`` and its ``CrashPoint``s: a crash between commit and publish,
  between publish and confirm, or between a handler's commit and its ack.
- ``capture_published`` tells what a transaction published (``Published``).
- ``isolated_engine`` gives each test a database of its own.
- The pytest plugin (``outbox.testing.plugin``, loaded automatically) has the
  fixtures ``outbox_engine``, ``outbox_broker``, ``outbox_harness`` and the options
  ``--outbox-database-url`` and ``--outbox-seed``.

``outbox`` does not depend on ``relay`` or ``consumer``: the kit imports them only
inside the functions that run them. See docs/testing.md.
"""

from __future__ import annotations

from outbox.testing.broker import CrashPoint, FaultyBroker, twice_shuffled
from outbox.testing.capture import Published, capture_published
from outbox.testing.database import isolated_engine
from outbox.testing.harness import DeadLetter, OutboxHarness, Outcomes

__all__ = [
    "CrashPoint",
    "DeadLetter",
    "FaultyBroker",
    "OutboxHarness",
    "Outcomes",
    "Published",
    "capture_published",
    "isolated_engine",
    "twice_shuffled",
]
