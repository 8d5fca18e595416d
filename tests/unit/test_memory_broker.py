"""The in-memory broker keeps the Broker contract, and misbehaves on request for tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest
from broker_contract import BrokerContract, make_envelope

from outbox.broker import PublishOutcome, PublishResult
from outbox.codec import JSON
from outbox.errors import BrokerError
from outbox.memory_broker import InMemoryBroker


class TestInMemoryBroker(BrokerContract):
    delivery_timeout = 1.0
    silence = 0.05  # nothing in memory takes longer than a few loop iterations

    @pytest.fixture
    async def broker(self) -> AsyncIterator[InMemoryBroker]:
        broker = InMemoryBroker()
        await broker.connect()
        yield broker
        await broker.close()

    # --- scripted outcomes (memory only) ----------------------------------------------------

    async def test_nack_next_makes_the_next_messages_come_back_nacked(
        self, broker: InMemoryBroker
    ) -> None:
        await broker.declare_queue("q", ["orders.#"])
        batch = [make_envelope("orders.created", n) for n in range(3)]
        broker.nack_next(2)

        results = await broker.publish(batch)

        assert [r.outcome for r in results] == [
            PublishOutcome.NACKED,
            PublishOutcome.NACKED,
            PublishOutcome.CONFIRMED,
        ]
        assert results[0].reason == "scripted failure"
        assert broker.published == [batch[2]]  # a nacked message reaches no queue
        assert broker.queue_depth("q") == 1

    async def test_fail_next_makes_the_next_messages_end_failed(
        self, broker: InMemoryBroker
    ) -> None:
        await broker.declare_queue("q", ["orders.#"])
        broker.fail_next()

        results = await broker.publish([make_envelope("orders.created") for _ in range(2)])

        assert [r.outcome for r in results] == [PublishOutcome.FAILED, PublishOutcome.CONFIRMED]
        assert broker.queue_depth("q") == 1

    async def test_scripted_outcomes_apply_in_order_across_batches(
        self, broker: InMemoryBroker
    ) -> None:
        await broker.declare_queue("q", ["orders.#"])
        broker.nack_next(1)
        broker.fail_next(2)

        first = await broker.publish([make_envelope("orders.created")])
        second = await broker.publish([make_envelope("orders.created") for _ in range(3)])

        assert [r.outcome for r in first + second] == [
            PublishOutcome.NACKED,
            PublishOutcome.FAILED,
            PublishOutcome.FAILED,
            PublishOutcome.CONFIRMED,
        ]

    # --- prefetch, dead letters, bookkeeping (memory only) ----------------------------------

    async def test_prefetch_limits_unacked_deliveries_and_an_ack_frees_a_slot(
        self, broker: InMemoryBroker
    ) -> None:
        # Given three messages and a consumer with prefetch 2 holding two of them
        await broker.declare_queue("q", ["orders.#"])
        await broker.publish([make_envelope("orders.created", n) for n in range(3)])
        async with aclosing(broker.consume("q", prefetch=2)) as deliveries:
            first = await self.receive(deliveries)
            await self.receive(deliveries)
            # When it asks for a third, it waits
            third = asyncio.ensure_future(anext(deliveries))
            done, _ = await asyncio.wait({third}, timeout=self.silence)
            assert not done
            assert broker.queue_depth("q") == 3
            # Then an ack frees the slot and the third arrives
            await first.ack()
            delivery = await asyncio.wait_for(third, self.delivery_timeout)
            assert JSON.decode(delivery.envelope.body) == 2
            assert broker.queue_depth("q") == 2

    async def test_nack_with_requeue_frees_a_prefetch_slot_for_the_same_message(
        self, broker: InMemoryBroker
    ) -> None:
        await broker.declare_queue("q", ["orders.#"])
        await broker.publish([make_envelope("orders.created", n) for n in range(2)])
        async with aclosing(broker.consume("q", prefetch=1)) as deliveries:
            first = await self.receive(deliveries)
            await first.nack(requeue=True)
            again = await self.receive(deliveries)
        assert again.envelope is first.envelope
        assert again.redelivered is True

    async def test_nack_without_requeue_moves_the_message_to_dead_letters(
        self, broker: InMemoryBroker
    ) -> None:
        await broker.declare_queue("q", ["orders.#"])
        envelope = make_envelope("orders.created")
        await broker.publish([envelope])
        assert broker.dead_letters("q") == []

        async with aclosing(broker.consume("q")) as deliveries:
            await (await self.receive(deliveries)).nack(requeue=False)

        assert broker.dead_letters("q") == [envelope]
        assert broker.queue_depth("q") == 0

    async def test_dead_letters_returns_a_copy(self, broker: InMemoryBroker) -> None:
        await broker.declare_queue("q", ["orders.#"])
        broker.dead_letters("q").append(make_envelope("orders.created"))
        assert broker.dead_letters("q") == []

    async def test_published_and_publish_counts_record_confirmed_messages_only(
        self, broker: InMemoryBroker
    ) -> None:
        await broker.declare_queue("billing", ["orders.*"])
        await broker.declare_queue("audit", ["#.created"])
        routed = make_envelope("orders.created")
        unroutable = make_envelope("payments.captured")
        nacked = make_envelope("orders.created")

        await broker.publish([routed, unroutable])
        broker.nack_next()
        await broker.publish([nacked])
        await broker.publish([routed])  # the relay retried: a wire duplicate

        assert broker.published == [routed, routed]
        assert broker.publish_counts[routed.message_id] == 2  # once per publish, not per queue
        assert unroutable.message_id not in broker.publish_counts
        assert nacked.message_id not in broker.publish_counts

    async def test_queue_depth_counts_ready_and_unacked_messages(
        self, broker: InMemoryBroker
    ) -> None:
        await broker.declare_queue("q", ["orders.#"])
        assert broker.queue_depth("q") == 0
        await broker.publish([make_envelope("orders.created") for _ in range(3)])
        assert broker.queue_depth("q") == 3

        async with aclosing(broker.consume("q")) as deliveries:
            taken = await self.receive(deliveries)
            assert broker.queue_depth("q") == 3  # taken but not acked still counts
            await taken.ack()
            assert broker.queue_depth("q") == 2


async def test_publish_before_connect_raises_broker_error() -> None:
    broker = InMemoryBroker()
    await broker.declare_queue("q", ["orders.#"])
    with pytest.raises(BrokerError, match="connect"):
        await broker.publish([make_envelope("orders.created")])
    assert broker.published == []


async def test_publish_after_close_raises_broker_error() -> None:
    broker = InMemoryBroker()
    await broker.connect()
    await broker.declare_queue("q", ["orders.#"])
    await broker.close()
    with pytest.raises(BrokerError):
        await broker.publish([make_envelope("orders.created")])
    assert broker.queue_depth("q") == 0


@pytest.mark.parametrize(
    ("outcome", "confirmed"),
    [
        (PublishOutcome.CONFIRMED, True),
        (PublishOutcome.RETURNED, False),
        (PublishOutcome.NACKED, False),
        (PublishOutcome.FAILED, False),
    ],
)
def test_only_a_confirmed_result_counts_as_confirmed(
    outcome: PublishOutcome, confirmed: bool
) -> None:
    assert PublishResult("id", outcome).confirmed is confirmed
