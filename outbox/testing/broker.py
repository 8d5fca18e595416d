"""An in-memory broker with crash points a test can arm, and the shuffle of idempotency mode.

The crash points sit where the framework's guarantees are decided, and each is
simulated from the broker's side, so relay and consumer run unchanged:

- ``between_commit_and_publish``: the relay took a committed row but the message
  never reached the broker (the relay died before publishing, or the connection
  dropped). The publish ends ``FAILED`` and nothing is routed; the relay keeps the
  row pending and publishes it again later.
- ``between_publish_and_confirm``: the broker routed the message but the confirm
  never came back. The publish ends ``FAILED`` although the message is on its
  queues; the relay publishes it again, which makes a wire duplicate the
  consumer's inbox must absorb.
- ``between_commit_and_ack``: the consumer finished with a delivery (for a handled
  message: its transaction committed) but the ack was lost. The broker puts the
  message back, marked redelivered; the next copy finds its inbox row.

Each crash point fires at most once per message id, as a real crash hits one
attempt: an armed point for "every message" therefore delays each message once
instead of failing it forever.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from outbox.broker import PublishOutcome, PublishResult
from outbox.errors import MalformedMessageError
from outbox.memory_broker import InMemoryBroker

if TYPE_CHECKING:
    import random
    from collections.abc import Callable, Sequence

    from outbox.envelope import Envelope
    from outbox.message import Message

__all__ = ["CrashPoint", "FaultyBroker", "twice_shuffled"]


class CrashPoint:
    """A place where a test can make the system crash; see the module docstring.

    Disarmed until ``arm()``. ``fired`` counts how often it crashed and
    ``message_ids`` lists the messages it crashed, in order.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.message_ids: list[str] = []
        """The messages this point fired for, in order."""
        self._armed = False
        self._remaining: int | None = None
        self._when: Callable[[Message], bool] | None = None
        self._hit: set[str] = set()

    def __repr__(self) -> str:
        state = "armed" if self._armed else "disarmed"
        return f"<CrashPoint {self.name} {state}, fired {self.fired} times>"

    @property
    def armed(self) -> bool:
        """True while the point will fire for the next message it selects."""
        return self._armed

    @property
    def fired(self) -> int:
        """How often the point fired."""
        return len(self.message_ids)

    def arm(
        self, *, times: int | None = None, when: Callable[[Message], bool] | None = None
    ) -> CrashPoint:
        """Fire for every message from now on, or for the next ``times`` ones; return self.

        ``when`` narrows the choice to messages it returns True for; it gets the
        decoded ``outbox.Message`` (a message whose body cannot be decoded is not
        chosen). The point disarms itself after ``times`` firings.
        """
        if times is not None and (not isinstance(times, int) or times < 1):
            raise ValueError(f"times must be a positive int or None, got {times!r}")
        self._armed = True
        self._remaining = times
        self._when = when
        return self

    def disarm(self) -> None:
        """Fire no more (``fired`` and ``message_ids`` are kept)."""
        self._armed = False

    def take(self, envelope: Envelope) -> bool:
        """Decide whether the point fires for ``envelope`` now, and count it if so."""
        if not self._armed or envelope.message_id in self._hit:
            return False
        if self._when is not None:
            try:
                message = envelope.decode()
            except MalformedMessageError:
                return False
            if not self._when(message):
                return False
        self._hit.add(envelope.message_id)
        self.message_ids.append(envelope.message_id)
        if self._remaining is not None:
            self._remaining -= 1
            if self._remaining == 0:
                self._armed = False
        return True


class FaultyBroker(InMemoryBroker):
    """An ``InMemoryBroker`` with the three crash points of the module docstring.

    ``broker.between_publish_and_confirm.arm(times=1)`` makes the next confirmed
    publish come back ``FAILED``; with nothing armed it behaves exactly like
    ``InMemoryBroker``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.between_commit_and_publish = CrashPoint("between_commit_and_publish")
        """The message never reaches the broker; the relay publishes it again later."""
        self.between_publish_and_confirm = CrashPoint("between_publish_and_confirm")
        """The message is routed but its confirm is lost; the relay publishes it again."""
        self.between_commit_and_ack = CrashPoint("between_commit_and_ack")
        """The consumer's ack is lost; the broker delivers the message again."""

    @property
    def crash_points(self) -> tuple[CrashPoint, ...]:
        """All crash points, in the order a message meets them."""
        return (
            self.between_commit_and_publish,
            self.between_publish_and_confirm,
            self.between_commit_and_ack,
        )

    async def publish(self, envelopes: Sequence[Envelope]) -> list[PublishResult]:
        """Publish as ``InMemoryBroker`` does, except where a relay-side crash point fires."""
        if not self.connected:
            return await super().publish(envelopes)  # raises the usual BrokerError
        results: list[PublishResult] = []
        for envelope in envelopes:
            if self.between_commit_and_publish.take(envelope):
                results.append(
                    PublishResult(
                        envelope.message_id,
                        PublishOutcome.FAILED,
                        "crash point between_commit_and_publish: the message never reached "
                        "the broker",
                    )
                )
                continue
            [result] = await super().publish([envelope])
            # Only a confirm that would have come can be lost; a nack or return stays as is.
            if result.confirmed and self.between_publish_and_confirm.take(envelope):
                result = PublishResult(
                    envelope.message_id,
                    PublishOutcome.FAILED,
                    "crash point between_publish_and_confirm: the broker routed the message "
                    "but the confirm was lost",
                )
            results.append(result)
        return results

    def drops_ack(self, envelope: Envelope) -> bool:
        """Lose the ack when ``between_commit_and_ack`` fires for ``envelope``."""
        return self.between_commit_and_ack.take(envelope)


def twice_shuffled(
    rng: random.Random, *, keep_key_order: bool
) -> Callable[[list[Envelope]], list[Envelope]]:
    """An arrangement for ``InMemoryBroker.rearrange``: every message twice, in shuffled order.

    The first copies are shuffled; each second copy lands at a random place after
    its first. With ``keep_key_order`` (a queue of ordered handlers) the first
    copies of one key keep their relative order, since the framework promises
    that order there; keys and keyless messages are still interleaved at random.
    """

    def arrange(envelopes: list[Envelope]) -> list[Envelope]:
        slots = list(range(len(envelopes)))
        rng.shuffle(slots)
        if keep_key_order:
            by_key: dict[str, list[int]] = {}
            for i, envelope in enumerate(envelopes):
                if envelope.key is not None:
                    by_key.setdefault(envelope.key, []).append(i)
            for indices in by_key.values():
                # The key's messages take the same slots, handed out in their queue order.
                for i, slot in zip(indices, sorted(slots[i] for i in indices), strict=True):
                    slots[i] = slot
        order = sorted(range(len(envelopes)), key=slots.__getitem__)
        arranged: list[tuple[int, Envelope]] = [(i, envelopes[i]) for i in order]
        for i in order:
            first = next(p for p, (j, _) in enumerate(arranged) if j == i)
            arranged.insert(rng.randint(first + 1, len(arranged)), (i, envelopes[i]))
        return [envelope for _, envelope in arranged]

    return arrange
