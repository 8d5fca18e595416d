"""The shop's tests with the outbox test kit: the example of docs/testing.md."""

from __future__ import annotations

import pytest
import shop
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox.testing import OutboxHarness, capture_published


class FakeWarehouse:
    """Stands in for the warehouse service, keeping one reservation per idempotency key."""

    def __init__(self) -> None:
        self.reservations: dict[str, int] = {}

    def reserve(self, order_id: int, *, idempotency_key: str) -> None:
        self.reservations.setdefault(idempotency_key, order_id)


@pytest.fixture
def warehouse(monkeypatch: pytest.MonkeyPatch) -> FakeWarehouse:
    fake = FakeWarehouse()
    monkeypatch.setattr(shop, "warehouse", fake)
    return fake


@pytest.fixture
def db(outbox_engine: sa.Engine) -> sa.Engine:
    shop.metadata.create_all(outbox_engine)
    return outbox_engine


def invoiced_orders(db: sa.Engine) -> list[int]:
    with db.connect() as conn:
        return list(conn.execute(sa.select(shop.invoices.c.order_id)).scalars())


def test_placing_an_order_publishes_orders_created(db: sa.Engine) -> None:
    with Session(db) as session:
        with capture_published(session) as published:
            shop.place_order(session, order_id=7, customer="ada", total_cents=4200)
        # Seen before the commit: it is the session's own transaction that is read.
        published.assert_one(
            "orders.created", payload={"order_id": 7, "total_cents": 4200}, key="customer-ada"
        )


def test_an_order_whose_transaction_rolls_back_publishes_nothing(db: sa.Engine) -> None:
    with capture_published(db) as published, Session(db) as session:
        shop.place_order(session, order_id=7, customer="ada", total_cents=4200)
        session.rollback()
    published.assert_none()


@pytest.mark.asyncio
async def test_each_order_is_invoiced_and_reserved_once_however_it_is_delivered(
    outbox_harness: OutboxHarness, db: sa.Engine, warehouse: FakeWarehouse
) -> None:
    # Every message twice, shuffled, and each first handling rolled back.
    outbox_harness.enable_idempotency_mode()
    await outbox_harness.add_consumer(shop.billing)
    with Session(db) as session, session.begin():
        for order_id in range(1, 6):
            shop.place_order(session, order_id=order_id, customer="ada", total_cents=100)

    outcomes = await outbox_harness.drain()

    assert outcomes.handled == 5
    outbox_harness.assert_effects_once(invoiced_orders(db), expected=range(1, 6))
    outbox_harness.assert_effects_once(warehouse.reservations.values(), expected=range(1, 6))


@pytest.mark.asyncio
async def test_an_order_survives_a_lost_publisher_confirm(
    outbox_harness: OutboxHarness, db: sa.Engine, warehouse: FakeWarehouse
) -> None:
    await outbox_harness.add_consumer(shop.billing)
    outbox_harness.broker.between_publish_and_confirm.arm(times=1)
    with Session(db) as session, session.begin():
        shop.place_order(session, order_id=1, customer="ada", total_cents=4200)

    outcomes = await outbox_harness.drain()

    assert outcomes.crashes["between_publish_and_confirm"] == 1
    assert len(outcomes.wire_duplicates) == 1  # the relay published the order twice
    assert outcomes.duplicates == 1  # and the inbox absorbed the second copy
    assert outcomes.unhandled == ()
    assert invoiced_orders(db) == [1]
