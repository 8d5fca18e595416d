"""What the consumer needs of a broker: its queues, deliveries, and confirmed copies.

Two transports implement it: ``consumer.amqp_transport.AmqpTransport`` on
RabbitMQ (production) and ``consumer.memory_transport.MemoryTransport`` on the
in-process ``InMemoryBroker`` (tests, the embedded demo, ``outbox.testing``).
The consumer's logic (inbox, retries, dead letters, ordered lanes) is written
once against this interface.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

if TYPE_CHECKING:
    from collections.abc import Mapping
    from datetime import datetime, timedelta

    from consumer.metrics import ConsumerMetrics
    from consumer.receipts import ReceiptPublisher

__all__ = ["OnDelivery", "Received", "Topology", "Transport"]


class Received(Protocol):
    """One delivery, as the consumer reads it (aio-pika's incoming message fits as it is)."""

    @property
    def body(self) -> bytes: ...
    @property
    def headers(self) -> Mapping[str, Any] | None: ...
    @property
    def routing_key(self) -> str | None: ...
    @property
    def message_id(self) -> str | None: ...
    @property
    def content_type(self) -> str | None: ...
    @property
    def timestamp(self) -> datetime | None: ...
    @property
    def redelivered(self) -> bool | None: ...

    async def ack(self) -> None:
        """Done with it: the broker forgets it."""

    async def nack(self, *, requeue: bool = True) -> None:
        """Give it back to its queue (``requeue=True``)."""


OnDelivery: TypeAlias = Callable[[Received], Awaitable[None] | None]
"""What a transport calls with each delivery: None once taken, or an awaitable to finish."""


@dataclass(frozen=True, kw_only=True)
class Topology:
    """A group's queues and bindings, declared idempotently at start."""

    exchange: str
    queue_type: str
    queue: str
    """The main queue: unordered handlers' topics, retries coming back, replays."""
    dead_queue: str
    retry_queues: Mapping[str, timedelta] = field(default_factory=dict)
    """Delay queue name -> how long a message waits there before going back to ``queue``."""
    patterns: tuple[str, ...] = ()
    """Topic patterns bound to the main queue."""
    ordered_queue: str | None = None
    """The single-active-consumer queue of ordered handlers, if there are any."""
    ordered_patterns: tuple[str, ...] = ()


class Transport(Protocol):
    """The broker side of a ``Consumer``."""

    @property
    def connected(self) -> bool:
        """True while deliveries can flow (False while reconnecting)."""
        ...

    async def open(self) -> None:
        """Connect; raise ``ConfigurationError`` saying what is unreachable."""
        ...

    async def declare(self, topology: Topology) -> None:
        """Declare the group's queues and bindings (idempotent)."""
        ...

    async def consume(self, queue: str, prefetch: int, callback: OnDelivery) -> None:
        """Call ``callback`` for each delivery of ``queue``, ``prefetch`` unacked at most.

        The callback runs on the event loop and returns None when it has taken the
        delivery, or an awaitable that finishes the job (run as a task of its own,
        or awaited before the next delivery where the transport feeds one at a time).
        """
        ...

    async def cancel(self) -> None:
        """Stop taking new deliveries; those already taken may still be acked."""
        ...

    async def send(self, raw: Received, queue: str, headers: dict[str, Any]) -> bool:
        """Put a copy of ``raw`` with ``headers`` on ``queue``; True once the broker confirmed."""
        ...

    async def receipts(
        self, group: str, exchange: str, metrics: ConsumerMetrics
    ) -> ReceiptPublisher | None:
        """Start and return the group's receipt publisher, or None where receipts have no path."""
        ...

    async def close(self) -> None:
        """Disconnect; deliveries not acked go back to their queues."""
        ...
