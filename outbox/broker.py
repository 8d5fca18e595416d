"""The narrow interface between the framework and a message broker.

The relay needs ``publish`` (and ``declare_queue`` and ``consume`` for receipts);
consumers need ``declare_queue`` and ``consume``.
RabbitMQ implements it for production and ``InMemoryBroker`` for unit tests and
the embedded demo; one contract test suite runs against both.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Sequence

    from outbox.envelope import Envelope

__all__ = ["Broker", "Delivery", "PublishOutcome", "PublishResult"]


class PublishOutcome(enum.StrEnum):
    """What the broker said about one published message."""

    CONFIRMED = "confirmed"  # the broker took responsibility for it (publisher confirm ack)
    RETURNED = "returned"  # no queue was bound for the topic (mandatory publish came back)
    NACKED = "nacked"  # the broker refused it (publisher confirm nack)
    FAILED = "failed"  # no answer: connection lost or confirm timed out; state unknown


@dataclass(frozen=True, slots=True)
class PublishResult:
    """The outcome of publishing one envelope, with the broker's reason when not confirmed."""

    message_id: str
    outcome: PublishOutcome
    reason: str | None = None

    @property
    def confirmed(self) -> bool:
        """True when the broker confirmed the message."""
        return self.outcome is PublishOutcome.CONFIRMED


class Delivery(Protocol):
    """One message taken from a queue, to be acknowledged exactly once."""

    @property
    def envelope(self) -> Envelope:
        """The message as sent."""
        ...

    @property
    def redelivered(self) -> bool:
        """True if the broker delivered this message before (to this or another consumer)."""
        ...

    async def ack(self) -> None:
        """Tell the broker the message is done with; it will not be delivered again."""
        ...

    async def nack(self, *, requeue: bool) -> None:
        """Give the message back (``requeue=True``) or drop it to the queue's dead letters."""
        ...


class Broker(Protocol):
    """What the framework needs of a broker."""

    async def connect(self) -> None:
        """Open connections and declare the exchange; safe to call again after ``close``."""
        ...

    async def close(self) -> None:
        """Close connections; in-flight publishes end as ``FAILED``."""
        ...

    @property
    def connected(self) -> bool:
        """True while the broker can be used (False while reconnecting)."""
        ...

    async def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait until ``connected`` (at most ``timeout`` seconds); return whether it is."""
        ...

    async def publish(self, envelopes: Sequence[Envelope]) -> list[PublishResult]:
        """Publish a batch with publisher confirms; return one result per envelope, in order.

        Must not return ``CONFIRMED`` for a message the broker has not confirmed:
        the relay marks rows published on that word alone.
        """
        ...

    async def declare_queue(
        self, queue: str, patterns: Sequence[str], *, exchange: str | None = None
    ) -> None:
        """Declare a durable queue bound to the exchange by each topic pattern (idempotent).

        ``exchange``: bind on that durable topic exchange instead (declared if
        missing), which ``publish`` never sends to; the relay takes receipts so.
        """
        ...

    def consume(self, queue: str, *, prefetch: int = 32) -> AsyncGenerator[Delivery, None]:
        """Yield deliveries from ``queue`` until the broker is closed; close it when done.

        Use ``async with contextlib.aclosing(broker.consume(q)) as deliveries:`` so
        the generator is closed even when the loop is left early.
        """
        ...
