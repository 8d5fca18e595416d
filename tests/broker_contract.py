"""The contract every ``outbox.broker.Broker`` keeps, as tests any implementation can inherit.

Subclass ``BrokerContract`` in a ``test_*.py`` module and give it a ``broker``
fixture that yields a connected broker (and closes it afterwards)::

    class TestInMemoryBroker(BrokerContract):
        @pytest.fixture
        async def broker(self):
            broker = InMemoryBroker()
            await broker.connect()
            yield broker
            await broker.close()

Every queue and topic a test uses starts with the ``prefix`` fixture, so tests
never share state even on one shared RabbitMQ exchange; bind only patterns that
start with the prefix (never a bare ``#``). Timeouts are class attributes a slow
broker can raise. This module's name does not start with ``test_``, so pytest
collects its tests only through subclasses.
"""

from __future__ import annotations

import asyncio
import uuid
from contextlib import aclosing
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pytest

from outbox.broker import PublishOutcome
from outbox.codec import JSON
from outbox.envelope import Envelope
from outbox.errors import BrokerError, OutboxError
from outbox.ids import new_message_id

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from outbox.broker import Broker, Delivery

__all__ = ["BrokerContract", "make_envelope"]


def make_envelope(
    topic: str,
    payload: Any = None,
    *,
    key: str | None = None,
    headers: dict[str, Any] | None = None,
) -> Envelope:
    """An envelope as the relay would build it: fresh id, JSON body, created now."""
    return Envelope(
        message_id=new_message_id(),
        topic=topic,
        key=key,
        body=JSON.encode(payload),
        content_type=JSON.content_type,
        headers=headers or {},
        created_at=datetime.now(UTC),
    )


class BrokerContract:
    """Broker-independent guarantees; subclasses provide the ``broker`` fixture."""

    delivery_timeout: float = 5.0
    """How long a delivery that must come may take."""
    silence: float = 0.3
    """How long to wait to be convinced that nothing more is coming."""

    @pytest.fixture
    def prefix(self) -> str:
        """A word no other test uses, to start every topic and queue name with."""
        return f"t{uuid.uuid4().hex[:12]}"

    # --- helpers ----------------------------------------------------------------------------

    async def receive(self, deliveries: AsyncIterator[Delivery]) -> Delivery:
        """The next delivery; fail the test if none comes within ``delivery_timeout``."""
        try:
            return await asyncio.wait_for(anext(deliveries), self.delivery_timeout)
        except TimeoutError:
            pytest.fail(f"no delivery within {self.delivery_timeout}s")

    async def assert_nothing_arrives(self, deliveries: AsyncIterator[Delivery]) -> None:
        """Fail if a delivery comes within ``silence``. Ends ``deliveries``: call it last."""
        waiting = asyncio.ensure_future(anext(deliveries))
        done, _ = await asyncio.wait({waiting}, timeout=self.silence)
        if done:
            error = waiting.exception()
            if error is not None:
                pytest.fail(f"consume ended while waiting: {error!r}")
            pytest.fail(f"unexpected delivery: {waiting.result().envelope!r}")
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)

    @staticmethod
    def bodies(deliveries: list[Delivery]) -> list[Any]:
        return [JSON.decode(d.envelope.body) for d in deliveries]

    # --- publishing -------------------------------------------------------------------------

    async def test_message_to_a_bound_topic_is_confirmed_and_delivered_once(
        self, broker: Broker, prefix: str
    ) -> None:
        await broker.declare_queue(f"{prefix}.q", [f"{prefix}.orders.created"])
        envelope = make_envelope(f"{prefix}.orders.created", {"id": 7})

        results = await broker.publish([envelope])

        assert [(r.message_id, r.outcome) for r in results] == [
            (envelope.message_id, PublishOutcome.CONFIRMED)
        ]
        assert results[0].confirmed
        async with aclosing(broker.consume(f"{prefix}.q")) as deliveries:
            delivery = await self.receive(deliveries)
            assert delivery.envelope.message_id == envelope.message_id
            assert delivery.redelivered is False
            await delivery.ack()
            await self.assert_nothing_arrives(deliveries)

    async def test_delivered_envelope_keeps_id_topic_key_body_and_headers(
        self, broker: Broker, prefix: str
    ) -> None:
        await broker.declare_queue(f"{prefix}.q", [f"{prefix}.orders.created"])
        sent = make_envelope(
            f"{prefix}.orders.created",
            {"city": "東京"},
            key="customer-42",
            headers={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
        )
        await broker.publish([sent])
        async with aclosing(broker.consume(f"{prefix}.q")) as deliveries:
            got = (await self.receive(deliveries)).envelope
        # created_at is left out: AMQP timestamps have whole seconds only.
        assert (got.message_id, got.topic, got.key, got.body, got.content_type) == (
            sent.message_id,
            sent.topic,
            sent.key,
            sent.body,
            sent.content_type,
        )
        assert dict(got.headers) == dict(sent.headers)

    async def test_unroutable_message_comes_back_returned(
        self, broker: Broker, prefix: str
    ) -> None:
        await broker.declare_queue(f"{prefix}.q", [f"{prefix}.orders.created"])
        envelope = make_envelope(f"{prefix}.payments.captured")

        results = await broker.publish([envelope])

        assert [(r.message_id, r.outcome) for r in results] == [
            (envelope.message_id, PublishOutcome.RETURNED)
        ]
        assert not results[0].confirmed

    async def test_results_of_a_mixed_batch_come_in_input_order(
        self, broker: Broker, prefix: str
    ) -> None:
        await broker.declare_queue(f"{prefix}.q", [f"{prefix}.routed"])
        batch = [
            make_envelope(f"{prefix}.routed", 0),
            make_envelope(f"{prefix}.nowhere", 1),
            make_envelope(f"{prefix}.nowhere", 2),
            make_envelope(f"{prefix}.routed", 3),
            make_envelope(f"{prefix}.nowhere", 4),
            make_envelope(f"{prefix}.routed", 5),
        ]

        results = await broker.publish(batch)

        assert [r.message_id for r in results] == [e.message_id for e in batch]
        assert [r.outcome for r in results] == [
            PublishOutcome.CONFIRMED,
            PublishOutcome.RETURNED,
            PublishOutcome.RETURNED,
            PublishOutcome.CONFIRMED,
            PublishOutcome.RETURNED,
            PublishOutcome.CONFIRMED,
        ]

    async def test_one_message_id_twice_in_a_batch_keeps_each_copy_its_outcome(
        self, broker: Broker, prefix: str
    ) -> None:
        await broker.declare_queue(f"{prefix}.q", [f"{prefix}.routed"])
        routed = make_envelope(f"{prefix}.routed")
        lost = replace(routed, topic=f"{prefix}.nowhere")

        results = await broker.publish([lost, routed, lost])

        assert [(r.message_id, r.outcome) for r in results] == [
            (routed.message_id, PublishOutcome.RETURNED),
            (routed.message_id, PublishOutcome.CONFIRMED),
            (routed.message_id, PublishOutcome.RETURNED),
        ]

    async def test_one_message_id_in_two_concurrent_batches_keeps_each_its_outcome(
        self, broker: Broker, prefix: str
    ) -> None:
        # A relay may publish a row again while its earlier publish is still in flight
        # (an expired lease); a returned copy must not be reported as the confirmed one.
        await broker.declare_queue(f"{prefix}.q", [f"{prefix}.routed"])
        routed = make_envelope(f"{prefix}.routed")
        lost = replace(routed, topic=f"{prefix}.nowhere")
        others = [make_envelope(f"{prefix}.routed") for _ in range(20)]

        first, second = await asyncio.gather(
            broker.publish([lost]), broker.publish([*others[:10], routed, *others[10:]])
        )

        assert [(r.message_id, r.outcome) for r in first] == [
            (routed.message_id, PublishOutcome.RETURNED)
        ]
        assert [r.outcome for r in second] == [PublishOutcome.CONFIRMED] * 21

    async def test_empty_batch_gives_no_results(self, broker: Broker) -> None:
        assert await broker.publish([]) == []

    # --- routing ----------------------------------------------------------------------------

    async def test_star_pattern_routes_exactly_one_word(self, broker: Broker, prefix: str) -> None:
        await broker.declare_queue(f"{prefix}.q", [f"{prefix}.orders.*"])
        results = await broker.publish(
            [
                make_envelope(f"{prefix}.orders.created"),
                make_envelope(f"{prefix}.orders"),
                make_envelope(f"{prefix}.orders.created.eu"),
            ]
        )
        assert [r.outcome for r in results] == [
            PublishOutcome.CONFIRMED,
            PublishOutcome.RETURNED,
            PublishOutcome.RETURNED,
        ]

    async def test_hash_pattern_routes_zero_or_more_words(
        self, broker: Broker, prefix: str
    ) -> None:
        await broker.declare_queue(f"{prefix}.q", [f"{prefix}.orders.#", f"{prefix}.#.refunded"])
        results = await broker.publish(
            [
                make_envelope(f"{prefix}.orders"),
                make_envelope(f"{prefix}.orders.created"),
                make_envelope(f"{prefix}.orders.created.eu.west"),
                make_envelope(f"{prefix}.refunded"),
                make_envelope(f"{prefix}.payments.card.refunded"),
                make_envelope(f"{prefix}.payments.captured"),
            ]
        )
        assert [r.outcome for r in results] == [PublishOutcome.CONFIRMED] * 5 + [
            PublishOutcome.RETURNED
        ]

    async def test_message_matching_two_queues_is_delivered_to_each(
        self, broker: Broker, prefix: str
    ) -> None:
        await broker.declare_queue(f"{prefix}.billing", [f"{prefix}.orders.*"])
        await broker.declare_queue(f"{prefix}.shipping", [f"{prefix}.#.created"])
        await broker.declare_queue(f"{prefix}.audit", [f"{prefix}.payments.#"])
        envelope = make_envelope(f"{prefix}.orders.created")

        results = await broker.publish([envelope])

        assert results[0].outcome is PublishOutcome.CONFIRMED
        for queue in ("billing", "shipping"):
            async with aclosing(broker.consume(f"{prefix}.{queue}")) as deliveries:
                delivery = await self.receive(deliveries)
                assert delivery.envelope.message_id == envelope.message_id
                await delivery.ack()
        async with aclosing(broker.consume(f"{prefix}.audit")) as deliveries:
            await self.assert_nothing_arrives(deliveries)

    # --- consuming --------------------------------------------------------------------------

    async def test_consume_yields_deliveries_in_publish_order(
        self, broker: Broker, prefix: str
    ) -> None:
        await broker.declare_queue(f"{prefix}.q", [f"{prefix}.#"])
        await broker.publish([make_envelope(f"{prefix}.seq", n) for n in range(5)])
        await broker.publish([make_envelope(f"{prefix}.seq", n) for n in range(5, 10)])

        async with aclosing(broker.consume(f"{prefix}.q", prefetch=4)) as deliveries:
            got = []
            for _ in range(10):
                delivery = await self.receive(deliveries)
                got.append(delivery)
                await delivery.ack()

        assert self.bodies(got) == list(range(10))

    async def test_nack_with_requeue_redelivers_flagged_redelivered(
        self, broker: Broker, prefix: str
    ) -> None:
        await broker.declare_queue(f"{prefix}.q", [f"{prefix}.orders.created"])
        envelope = make_envelope(f"{prefix}.orders.created")
        await broker.publish([envelope])

        async with aclosing(broker.consume(f"{prefix}.q")) as deliveries:
            first = await self.receive(deliveries)
            await first.nack(requeue=True)
            second = await self.receive(deliveries)
            await second.ack()

        assert first.redelivered is False
        assert second.redelivered is True
        assert second.envelope.message_id == envelope.message_id

    async def test_nack_without_requeue_is_not_redelivered(
        self, broker: Broker, prefix: str
    ) -> None:
        await broker.declare_queue(f"{prefix}.q", [f"{prefix}.orders.created"])
        await broker.publish([make_envelope(f"{prefix}.orders.created")])

        async with aclosing(broker.consume(f"{prefix}.q")) as deliveries:
            await (await self.receive(deliveries)).nack(requeue=False)
            await self.assert_nothing_arrives(deliveries)

    async def test_unacked_delivery_is_redelivered_after_reconnect(
        self, broker: Broker, prefix: str
    ) -> None:
        # Given a delivery taken but not acknowledged
        await broker.declare_queue(f"{prefix}.q", [f"{prefix}.orders.created"])
        envelope = make_envelope(f"{prefix}.orders.created")
        await broker.publish([envelope])
        async with aclosing(broker.consume(f"{prefix}.q")) as deliveries:
            taken = await self.receive(deliveries)
            # When the connection is lost
            await broker.close()
        await broker.connect()
        # Then the message comes again, flagged as redelivered
        async with aclosing(broker.consume(f"{prefix}.q")) as deliveries:
            again = await self.receive(deliveries)
            await again.ack()
        assert again.envelope.message_id == taken.envelope.message_id
        assert again.redelivered is True

    async def test_unacked_deliveries_come_back_in_publish_order_after_reconnect(
        self, broker: Broker, prefix: str
    ) -> None:
        # RabbitMQ puts requeued messages back at their original position; ordered
        # consumers (DESIGN §5.3) rely on a reconnect not shuffling a key's messages.
        await broker.declare_queue(f"{prefix}.q", [f"{prefix}.seq"])
        await broker.publish([make_envelope(f"{prefix}.seq", n) for n in range(6)])
        async with aclosing(broker.consume(f"{prefix}.q", prefetch=10)) as deliveries:
            for _ in range(4):
                await self.receive(deliveries)
            await broker.close()
        await broker.connect()

        async with aclosing(broker.consume(f"{prefix}.q", prefetch=10)) as deliveries:
            again = [await self.receive(deliveries) for _ in range(6)]
            for delivery in again:
                await delivery.ack()

        assert self.bodies(again) == list(range(6))
        assert all(d.redelivered for d in again[:4])

    async def test_acked_delivery_is_not_redelivered_after_reconnect(
        self, broker: Broker, prefix: str
    ) -> None:
        await broker.declare_queue(f"{prefix}.q", [f"{prefix}.orders.created"])
        await broker.publish([make_envelope(f"{prefix}.orders.created")])
        async with aclosing(broker.consume(f"{prefix}.q")) as deliveries:
            await (await self.receive(deliveries)).ack()
        await broker.close()
        await broker.connect()
        async with aclosing(broker.consume(f"{prefix}.q")) as deliveries:
            await self.assert_nothing_arrives(deliveries)

    async def test_settling_a_delivery_from_before_a_reconnect_raises_broker_error(
        self, broker: Broker, prefix: str
    ) -> None:
        # The ack could not reach the broker; the caller must not believe it did.
        await broker.declare_queue(f"{prefix}.q", [f"{prefix}.orders.created"])
        await broker.publish([make_envelope(f"{prefix}.orders.created")])
        async with aclosing(broker.consume(f"{prefix}.q")) as deliveries:
            stale = await self.receive(deliveries)
            await broker.close()
        await broker.connect()
        with pytest.raises(BrokerError):
            await stale.ack()

    async def test_consume_ends_when_the_broker_is_closed(
        self, broker: Broker, prefix: str
    ) -> None:
        await broker.declare_queue(f"{prefix}.q", [f"{prefix}.orders.created"])
        async with aclosing(broker.consume(f"{prefix}.q")) as deliveries:
            waiting = asyncio.ensure_future(anext(deliveries))
            await asyncio.sleep(0)  # let the consumer start waiting
            await broker.close()
            with pytest.raises(StopAsyncIteration):
                await asyncio.wait_for(waiting, self.delivery_timeout)

    async def test_consuming_an_undeclared_queue_raises_broker_error(
        self, broker: Broker, prefix: str
    ) -> None:
        async with aclosing(broker.consume(f"{prefix}.missing")) as deliveries:
            with pytest.raises(BrokerError):
                await asyncio.wait_for(anext(deliveries), self.delivery_timeout)

    @pytest.mark.parametrize(
        ("first", "second"), [("ack", "ack"), ("ack", "nack"), ("nack", "ack"), ("nack", "nack")]
    )
    async def test_settling_a_delivery_twice_raises_broker_error(
        self, broker: Broker, prefix: str, first: str, second: str
    ) -> None:
        await broker.declare_queue(f"{prefix}.q", [f"{prefix}.orders.created"])
        await broker.publish([make_envelope(f"{prefix}.orders.created")])

        async def settle(delivery: Delivery, how: str) -> None:
            if how == "ack":
                await delivery.ack()
            else:
                await delivery.nack(requeue=False)

        async with aclosing(broker.consume(f"{prefix}.q")) as deliveries:
            delivery = await self.receive(deliveries)
            await settle(delivery, first)
            with pytest.raises(BrokerError) as info:
                await settle(delivery, second)
        assert isinstance(info.value, OutboxError)

    # --- declaring --------------------------------------------------------------------------

    async def test_declaring_a_queue_again_binds_nothing_twice(
        self, broker: Broker, prefix: str
    ) -> None:
        await broker.declare_queue(f"{prefix}.q", [f"{prefix}.orders.*"])
        await broker.declare_queue(f"{prefix}.q", [f"{prefix}.orders.*"])
        await broker.publish([make_envelope(f"{prefix}.orders.created")])

        async with aclosing(broker.consume(f"{prefix}.q")) as deliveries:
            await (await self.receive(deliveries)).ack()
            await self.assert_nothing_arrives(deliveries)

    async def test_declaring_a_queue_again_keeps_its_messages_and_adds_patterns(
        self, broker: Broker, prefix: str
    ) -> None:
        await broker.declare_queue(f"{prefix}.q", [f"{prefix}.orders.*"])
        kept = make_envelope(f"{prefix}.orders.created")
        await broker.publish([kept])
        await broker.declare_queue(f"{prefix}.q", [f"{prefix}.orders.*", f"{prefix}.payments.*"])
        added = make_envelope(f"{prefix}.payments.captured")
        assert (await broker.publish([added]))[0].outcome is PublishOutcome.CONFIRMED

        async with aclosing(broker.consume(f"{prefix}.q")) as deliveries:
            got = [await self.receive(deliveries) for _ in range(2)]
            for delivery in got:
                await delivery.ack()
        assert [d.envelope.message_id for d in got] == [kept.message_id, added.message_id]

    @pytest.mark.parametrize("bad", ["orders..created", "orders*"])
    async def test_declare_queue_rejects_a_malformed_pattern_and_binds_nothing(
        self, broker: Broker, prefix: str, bad: str
    ) -> None:
        with pytest.raises(OutboxError, match="pattern"):
            await broker.declare_queue(f"{prefix}.q", [f"{prefix}.orders.*", bad])
        results = await broker.publish([make_envelope(f"{prefix}.orders.created")])
        assert results[0].outcome is PublishOutcome.RETURNED
