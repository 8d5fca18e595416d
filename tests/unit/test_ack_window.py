"""AckWindow: acks leave in as few frames as the order of deliveries allows, never wrong ones.

The channel here is a recorder of the frames the window writes (what RabbitMQ
would receive); the end-to-end behaviour on a real broker is covered by the
consumer's integration and fault tests.
"""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace
from typing import Any

import pytest

from consumer import amqp_delivery
from consumer.amqp_delivery import ACK_LINGER, AckWindow, Delivery, QueueConsumer


class RecordingChannel:
    """The part of an aiormq channel the window uses; remembers every frame."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, int, bool]] = []
        self.is_closed = False

    async def basic_ack(self, tag: int, *, multiple: bool = False, wait: bool = True) -> None:
        self.frames.append(("ack", tag, multiple))

    async def basic_nack(self, tag: int, *, requeue: bool = True, wait: bool = True) -> None:
        self.frames.append(("nack", tag, requeue))


def window_with(tags: range) -> tuple[AckWindow, RecordingChannel]:
    channel = RecordingChannel()
    window = AckWindow(channel)  # type: ignore[arg-type]
    for tag in tags:
        window.delivered(tag)
    return window, channel


def settled_by(frames: list[tuple[str, int, bool]]) -> dict[int, str]:
    """Replay frames as RabbitMQ does: what each tag ended as; fails on an unknown tag."""
    outstanding = set(range(1, 10_000))
    result: dict[int, str] = {}
    for kind, tag, flag in frames:
        assert tag in outstanding, f"{kind} of tag {tag}, which is not outstanding"
        covered = {t for t in outstanding if t <= tag} if kind == "ack" and flag else {tag}
        for t in covered:
            result[t] = kind
        outstanding -= covered
    return result


async def test_a_batch_acked_in_order_goes_out_as_one_multiple_ack() -> None:
    window, channel = window_with(range(1, 33))
    for tag in range(1, 33):
        window.ack(tag)
    await window.drain()
    assert channel.frames == [("ack", 32, True)]


async def test_an_ack_behind_a_busy_delivery_waits_then_goes_alone() -> None:
    window, channel = window_with(range(1, 5))
    window.ack(3)
    window.ack(4)
    await asyncio.sleep(0)
    assert channel.frames == []  # 1 and 2 are still being handled
    await asyncio.sleep(ACK_LINGER * 3)
    assert channel.frames == [("ack", 3, False), ("ack", 4, False)]
    window.ack(1)
    window.ack(2)
    await window.drain()
    assert settled_by(channel.frames) == {1: "ack", 2: "ack", 3: "ack", 4: "ack"}
    assert channel.frames[-1] == ("ack", 2, True)


async def test_when_the_older_delivery_finishes_in_time_all_go_in_one_frame() -> None:
    window, channel = window_with(range(1, 5))
    window.ack(3)
    window.ack(4)
    await asyncio.sleep(0)
    window.ack(1)
    window.ack(2)
    await window.drain()
    assert channel.frames == [("ack", 4, True)]


async def test_a_nack_is_never_covered_by_a_multiple_ack() -> None:
    window, channel = window_with(range(1, 6))
    window.ack(1)
    window.nack(2, requeue=True)
    for tag in (3, 4, 5):
        window.ack(tag)
    await window.drain()
    assert settled_by(channel.frames) == {1: "ack", 2: "nack", 3: "ack", 4: "ack", 5: "ack"}
    assert len(channel.frames) == 3  # ack 1, nack 2, ack up to 5


async def test_acks_of_a_closed_channel_are_dropped() -> None:
    window, channel = window_with(range(1, 4))
    channel.is_closed = True
    window.ack(1)
    await window.drain()
    assert channel.frames == []


async def test_any_order_of_settling_acks_every_ack_and_nacks_every_nack_exactly_once() -> None:
    rng = random.Random(20261121)
    for _ in range(25):
        count = rng.randint(1, 60)
        window, channel = window_with(range(1, count + 1))
        plan = {tag: rng.choice(["ack", "ack", "ack", "nack"]) for tag in range(1, count + 1)}
        order = list(plan)
        rng.shuffle(order)
        for tag in order:
            if plan[tag] == "ack":
                window.ack(tag)
            else:
                window.nack(tag, requeue=True)
            if rng.random() < 0.3:
                await asyncio.sleep(rng.choice([0, ACK_LINGER * 1.5]))
        await window.drain()
        assert settled_by(channel.frames) == plan


class FakeUnderlay(RecordingChannel):
    """An aiormq channel that hands out deliveries through the consumer it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.consumers: dict[str, Any] = {}
        self.on_consumer_cancel_callbacks: set[Any] = set()
        self.connection = None  # no aiormq connection: frames are read as aiormq reads them
        self.next_tag = 0

    async def basic_consume(self, queue: str, callback: Any) -> Any:
        tag = f"ctag{len(self.consumers)}"
        self.consumers[tag] = callback
        return SimpleNamespace(consumer_tag=tag)

    async def deliver(self) -> int:
        self.next_tag += 1
        message = SimpleNamespace(
            delivery_tag=self.next_tag,
            delivery=SimpleNamespace(delivery_tag=self.next_tag),
        )
        await list(self.consumers.values())[-1](message)
        return self.next_tag

    def cancel_by_broker(self) -> None:
        for callback in list(self.on_consumer_cancel_callbacks):
            callback(SimpleNamespace(consumer_tag=list(self.consumers)[-1]))


class FakeRobustChannel:
    def __init__(self, underlay: FakeUnderlay) -> None:
        self.underlay = underlay
        self.reopen_callbacks: set[Any] = set()

    async def get_underlay_channel(self) -> FakeUnderlay:
        return self.underlay


async def test_after_a_broker_cancel_the_same_channel_keeps_one_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(amqp_delivery, "_RECONSUME_DELAYS", (0.0,))
    underlay = FakeUnderlay()
    received: list[Delivery] = []

    async def on_delivery(delivery: Any) -> None:
        received.append(delivery)

    async def declare() -> None:
        return None

    consumer = QueueConsumer(
        FakeRobustChannel(underlay),  # type: ignore[arg-type]
        "outbox.billing",
        on_delivery,
        declare,
    )
    await consumer.start()
    await underlay.deliver()
    await underlay.deliver()  # tags 1 and 2: still being handled
    underlay.cancel_by_broker()  # the queue was deleted and declared again
    await wait_until(lambda: len(underlay.consumers) == 2)
    await underlay.deliver()
    await received[2].ack()  # tag 3 must not be acked as "everything up to 3"
    await asyncio.sleep(0)
    await received[0].ack()
    await received[1].nack(requeue=True)
    await consumer.drain()
    assert settled_by(underlay.frames) == {1: "ack", 2: "nack", 3: "ack"}


async def wait_until(predicate: Any, timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 (a plain condition, no event to wait on)
            await asyncio.sleep(0.001)
