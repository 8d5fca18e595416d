"""A broker in process memory, for unit tests and the embedded demo.

It follows RabbitMQ where the framework depends on it: topic routing with
``*`` and ``#``, mandatory publishing (a message no queue is bound for comes back
as ``RETURNED``), at-least-once delivery (an unacknowledged delivery is
redelivered with ``redelivered=True``). It can also misbehave on request
(``nack_next``, ``fail_next``) so tests can drive the error paths. Nothing
survives the process.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from outbox.broker import PublishOutcome, PublishResult
from outbox.errors import BrokerError
from outbox.topics import topic_matches, validate_pattern

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from outbox.envelope import Envelope

__all__ = ["InMemoryBroker", "MemoryDelivery"]


@dataclass(eq=False)
class MemoryDelivery:
    """A delivery from an ``InMemoryBroker`` queue."""

    envelope: Envelope
    redelivered: bool
    _queue: _Queue
    _settled: bool = False

    async def ack(self) -> None:
        """Remove the message from its queue for good."""
        self._settle()
        self._queue.unacked.discard(self)
        self._queue.wake()  # a prefetch slot is free again

    async def nack(self, *, requeue: bool) -> None:
        """Put the message back at the head of its queue, or move it to the dead letters."""
        self._settle()
        self._queue.unacked.discard(self)
        if requeue:
            self._queue.ready.appendleft((self.envelope, True))
            self._queue.wake()
        else:
            self._queue.dead_letters.append(self.envelope)

    def _settle(self) -> None:
        if self._settled:
            raise BrokerError(f"delivery of {self.envelope.message_id} was already acked or nacked")
        self._settled = True


@dataclass(eq=False)
class _Queue:
    patterns: list[str] = field(default_factory=list)
    ready: deque[tuple[Envelope, bool]] = field(default_factory=deque)
    unacked: set[MemoryDelivery] = field(default_factory=set)
    dead_letters: list[Envelope] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def wake(self) -> None:
        self.changed.set()


class InMemoryBroker:
    """An in-process ``Broker``; see the module docstring for what it mimics."""

    def __init__(self) -> None:
        self._queues: dict[str, _Queue] = {}
        self._scripted: deque[PublishOutcome] = deque()
        self._connected = False
        self.published: list[Envelope] = []
        """Every envelope the broker confirmed, in order (duplicates included)."""
        self.publish_counts: defaultdict[str, int] = defaultdict(int)
        """How often each message id was confirmed: above 1 is a wire duplicate."""

    async def connect(self) -> None:
        """Mark the broker reachable."""
        self._connected = True

    async def close(self) -> None:
        """Mark the broker unreachable; unacknowledged deliveries go back to their queues."""
        self._connected = False
        for queue in self._queues.values():
            for delivery in list(queue.unacked):
                delivery._settled = True
                queue.ready.appendleft((delivery.envelope, True))
            queue.unacked.clear()
            queue.wake()

    def nack_next(self, count: int = 1) -> None:
        """Make the next ``count`` published messages come back ``NACKED``."""
        self._scripted.extend([PublishOutcome.NACKED] * count)

    def fail_next(self, count: int = 1) -> None:
        """Make the next ``count`` published messages end ``FAILED`` (no confirm arrived)."""
        self._scripted.extend([PublishOutcome.FAILED] * count)

    async def publish(self, envelopes: Sequence[Envelope]) -> list[PublishResult]:
        """Route each envelope to the queues bound for its topic; see ``Broker.publish``."""
        if not self._connected:
            raise BrokerError("the in-memory broker is not connected; call connect() first")
        results: list[PublishResult] = []
        for envelope in envelopes:
            scripted = self._scripted.popleft() if self._scripted else None
            if scripted is not None:
                results.append(PublishResult(envelope.message_id, scripted, "scripted failure"))
                continue
            targets = [
                q
                for q in self._queues.values()
                if any(topic_matches(p, envelope.topic) for p in q.patterns)
            ]
            if not targets:
                results.append(
                    PublishResult(envelope.message_id, PublishOutcome.RETURNED, "NO_ROUTE")
                )
                continue
            for queue in targets:
                queue.ready.append((envelope, False))
                queue.wake()
            self.published.append(envelope)
            self.publish_counts[envelope.message_id] += 1
            results.append(PublishResult(envelope.message_id, PublishOutcome.CONFIRMED))
        return results

    async def declare_queue(self, queue: str, patterns: Sequence[str]) -> None:
        """Create ``queue`` if needed and bind it by each pattern."""
        for pattern in patterns:
            validate_pattern(pattern)
        q = self._queues.setdefault(queue, _Queue())
        q.patterns.extend(p for p in patterns if p not in q.patterns)

    async def consume(self, queue: str, *, prefetch: int = 32) -> AsyncIterator[MemoryDelivery]:
        """Yield deliveries from ``queue``, at most ``prefetch`` unacknowledged at a time."""
        if queue not in self._queues:
            raise BrokerError(f"queue {queue!r} does not exist; declare_queue() it first")
        q = self._queues[queue]
        while self._connected:
            if q.ready and len(q.unacked) < prefetch:
                envelope, redelivered = q.ready.popleft()
                delivery = MemoryDelivery(envelope, redelivered, q)
                q.unacked.add(delivery)
                yield delivery
                continue
            q.changed.clear()
            await q.changed.wait()

    def queue_depth(self, queue: str) -> int:
        """Messages ready or unacknowledged in ``queue``."""
        q = self._queues[queue]
        return len(q.ready) + len(q.unacked)

    def dead_letters(self, queue: str) -> list[Envelope]:
        """Messages nacked without requeue from ``queue``."""
        return list(self._queues[queue].dead_letters)
