"""A broker in process memory, for unit tests and the embedded demo.

It follows RabbitMQ where the framework depends on it: topic routing with
``*`` and ``#``, mandatory publishing (a message no queue is bound for comes back
as ``RETURNED``), at-least-once delivery (an unacknowledged delivery is
redelivered with ``redelivered=True``, back at its original place in the queue).
It can also misbehave on request (``nack_next``, ``fail_next``) so tests can
drive the error paths, and a subclass can lose acks (``drops_ack``), as
``outbox.testing.FaultyBroker`` does. Nothing survives the process.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from outbox.broker import PublishOutcome, PublishResult
from outbox.errors import BrokerError, ConfigurationError
from outbox.topics import topic_matches, validate_pattern

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Callable, Iterable, Sequence

    from outbox.envelope import Envelope

__all__ = ["InMemoryBroker", "MemoryDelivery"]


@dataclass(frozen=True, slots=True)
class _Entry:
    seq: int  # position in the queue: requeued messages go back where they were
    envelope: Envelope
    redelivered: bool


@dataclass(eq=False)
class MemoryDelivery:
    """A delivery from an ``InMemoryBroker`` queue."""

    _entry: _Entry
    _queue: _Queue
    _generation: int
    _settled: bool = False
    _broker: InMemoryBroker | None = field(default=None, repr=False)

    @property
    def envelope(self) -> Envelope:
        """The message as sent."""
        return self._entry.envelope

    @property
    def redelivered(self) -> bool:
        """True if this message was delivered before."""
        return self._entry.redelivered

    async def ack(self) -> None:
        """Remove the message from its queue for good (unless the broker loses the ack)."""
        self._settle()
        if self._broker is not None and self._broker.drops_ack(self.envelope):
            # The ack never arrived: the broker still holds the message and hands it out
            # again, as RabbitMQ does when the consumer's channel closes before its ack.
            self._queue.requeue(self._entry)
        self._queue.wake()  # a prefetch slot is free again

    async def nack(self, *, requeue: bool) -> None:
        """Put the message back at its place in the queue, or move it to the dead letters."""
        self._settle()
        if requeue:
            self._queue.requeue(self._entry)
        else:
            self._queue.dead_letters.append(self.envelope)
        self._queue.wake()

    def _settle(self) -> None:
        if self._settled:
            raise BrokerError(f"delivery of {self.envelope.message_id} was already acked or nacked")
        if self._generation != self._queue.generation:
            raise BrokerError(
                f"delivery of {self.envelope.message_id} belongs to a closed connection; "
                "the broker has requeued it"
            )
        self._settled = True
        self._queue.unacked.discard(self)


@dataclass(eq=False)
class _Queue:
    patterns: list[str] = field(default_factory=list)
    # Bindings on other exchanges, by exchange name: kept, but ``publish`` never routes there.
    elsewhere: dict[str, list[str]] = field(default_factory=dict)
    ready: deque[_Entry] = field(default_factory=deque)
    unacked: set[MemoryDelivery] = field(default_factory=set)
    dead_letters: list[Envelope] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    generation: int = 0

    def wake(self) -> None:
        self.changed.set()

    def requeue(self, entry: _Entry) -> None:
        # Requeued messages are few and near the head: a short scan finds their place.
        again = _Entry(entry.seq, entry.envelope, True)
        for i, queued in enumerate(self.ready):
            if queued.seq > entry.seq:
                self.ready.insert(i, again)
                return
        self.ready.append(again)


class InMemoryBroker:
    """An in-process ``Broker``; see the module docstring for what it mimics."""

    def __init__(self) -> None:
        self._queues: dict[str, _Queue] = {}
        self._scripted: deque[PublishOutcome] = deque()
        self._connected = False
        self._up = asyncio.Event()
        self._seq = itertools.count()
        self._delayed = 0
        self.published: list[Envelope] = []
        """Every envelope the broker confirmed, in order (duplicates included)."""
        self.publish_counts: defaultdict[str, int] = defaultdict(int)
        """How often each message id was confirmed: above 1 is a wire duplicate."""

    async def connect(self) -> None:
        """Mark the broker reachable."""
        self._connected = True
        self._up.set()

    @property
    def connected(self) -> bool:
        """True between ``connect()`` and ``close()``."""
        return self._connected

    async def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait for ``connect()`` (at most ``timeout`` seconds); return whether it happened."""
        if not self._connected:
            try:
                await asyncio.wait_for(self._up.wait(), timeout)
            except TimeoutError:
                return False
        return True

    async def close(self) -> None:
        """Mark the broker unreachable; unacknowledged deliveries go back to their queues."""
        self._connected = False
        self._up.clear()
        for queue in self._queues.values():
            queue.generation += 1  # deliveries and consumers of this connection are void
            for delivery in queue.unacked:
                queue.requeue(delivery._entry)
            queue.unacked.clear()
            queue.wake()

    @property
    def delayed(self) -> int:
        """Messages sent with a ``delay`` (``send_to_queue``) that have not reached their queue."""
        return self._delayed

    def drops_ack(self, envelope: Envelope) -> bool:
        """Tell whether the ack of a delivery of ``envelope`` is lost; never, here.

        A subclass that answers True simulates a consumer whose ack never reached
        the broker: the message goes back to its queue, marked redelivered, instead
        of being removed.
        """
        return False

    def nack_next(self, count: int = 1) -> None:
        """Make the next ``count`` published messages come back ``NACKED``."""
        self._scripted.extend([PublishOutcome.NACKED] * count)

    def fail_next(self, count: int = 1) -> None:
        """Make the next ``count`` published messages end ``FAILED`` (no confirm arrived)."""
        self._scripted.extend([PublishOutcome.FAILED] * count)

    async def publish(self, envelopes: Sequence[Envelope]) -> list[PublishResult]:
        """Route each envelope to the queues bound for its topic; see ``Broker.publish``."""
        self._require_connection()
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
            seq = next(self._seq)
            for queue in targets:
                queue.ready.append(_Entry(seq, envelope, False))
                queue.wake()
            self.published.append(envelope)
            self.publish_counts[envelope.message_id] += 1
            results.append(PublishResult(envelope.message_id, PublishOutcome.CONFIRMED))
        return results

    async def declare_queue(
        self, queue: str, patterns: Sequence[str], *, exchange: str | None = None
    ) -> None:
        """Create ``queue`` if needed and bind it by each pattern (all checked first).

        With ``exchange``, the bindings are on that other exchange: ``publish`` does
        not send there, so they route nothing to ``queue``, as on RabbitMQ.
        """
        for pattern in patterns:
            try:
                validate_pattern(pattern)
            except ValueError as e:
                raise ConfigurationError(str(e)) from None
        if exchange is not None and (not isinstance(exchange, str) or not exchange):
            raise ConfigurationError("exchange must be a non-empty str or None")
        q = self._queues.setdefault(queue, _Queue())
        bound = q.patterns if exchange is None else q.elsewhere.setdefault(exchange, [])
        bound.extend(p for p in dict.fromkeys(patterns) if p not in bound)

    async def consume(self, queue: str, *, prefetch: int = 32) -> AsyncGenerator[MemoryDelivery]:
        """Yield deliveries from ``queue``, at most ``prefetch`` unacknowledged at a time.

        Ends when the broker is closed; deliveries not acknowledged by then are requeued.
        """
        self._require_connection()
        q = self._queues.get(queue)
        if q is None:
            raise BrokerError(f"queue {queue!r} does not exist; declare_queue() it first")
        generation = q.generation
        while self._connected and q.generation == generation:
            if q.ready and len(q.unacked) < prefetch:
                entry = q.ready.popleft()
                delivery = MemoryDelivery(entry, q, generation, _broker=self)
                q.unacked.add(delivery)
                yield delivery
                continue
            q.changed.clear()
            await q.changed.wait()

    async def send_to_queue(self, queue: str, envelope: Envelope, *, delay: float = 0.0) -> None:
        """Put ``envelope`` straight on ``queue``, as RabbitMQ's default exchange does.

        With ``delay`` (seconds) it lands there only after that long, as a message
        does that waits out a delay queue's TTL; the broker keeps it meanwhile.
        """
        self._require_connection()
        if queue not in self._queues:
            raise BrokerError(f"queue {queue!r} does not exist; declare_queue() it first")
        if delay > 0:
            self._delayed += 1
            asyncio.get_running_loop().call_later(delay, self._land, queue, envelope)
            return
        self._enqueue(queue, envelope)

    def rearrange(
        self, queue: str, arrange: Callable[[list[Envelope]], Iterable[Envelope]]
    ) -> None:
        """Replace the ready messages of ``queue`` with ``arrange(them)``, in its order.

        ``arrange`` may reorder, repeat or leave out messages; unacknowledged
        deliveries are not touched. For tests that shuffle or duplicate what a
        consumer will receive.
        """
        q = self._queues[queue]
        ready = [entry.envelope for entry in q.ready]
        q.ready.clear()
        for envelope in arrange(ready):
            q.ready.append(_Entry(next(self._seq), envelope, False))
        q.wake()

    def messages(self, queue: str) -> list[Envelope]:
        """The messages in ``queue`` (ready ones in order, then unacknowledged ones)."""
        q = self._queues[queue]
        return [e.envelope for e in q.ready] + [d.envelope for d in q.unacked]

    def _land(self, queue: str, envelope: Envelope) -> None:
        self._delayed -= 1
        self._enqueue(queue, envelope)

    def _enqueue(self, queue: str, envelope: Envelope) -> None:
        q = self._queues[queue]
        q.ready.append(_Entry(next(self._seq), envelope, False))
        q.wake()

    def queue_depth(self, queue: str) -> int:
        """Messages ready or unacknowledged in ``queue``."""
        q = self._queues[queue]
        return len(q.ready) + len(q.unacked)

    def dead_letters(self, queue: str) -> list[Envelope]:
        """Messages nacked without requeue from ``queue``."""
        return list(self._queues[queue].dead_letters)

    def _require_connection(self) -> None:
        if not self._connected:
            raise BrokerError("the in-memory broker is not connected; call connect() first")
