"""A small shop service: the producer code and the consumer that docs/testing.md tests."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import httpx
import sqlalchemy as sa

import outbox
from consumer import Consumer

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from consumer import IncomingMessage

metadata = sa.MetaData()
orders = sa.Table(
    "orders",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("customer", sa.String(50), nullable=False),
    sa.Column("total_cents", sa.Integer, nullable=False),
)
invoices = sa.Table(
    "invoices",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("order_id", sa.Integer, nullable=False),
    sa.Column("total_cents", sa.Integer, nullable=False),
)


def place_order(session: Session, *, order_id: int, customer: str, total_cents: int) -> None:
    """Store an order and announce it, in the caller's transaction."""
    session.execute(orders.insert().values(id=order_id, customer=customer, total_cents=total_cents))
    outbox.publish(
        session,
        "orders.created",
        {"order_id": order_id, "total_cents": total_cents},
        key=f"customer-{customer}",
    )


class Warehouse:
    """The warehouse service's API: a repeated Idempotency-Key is the same reservation."""

    def __init__(self, url: str) -> None:
        self.url = url

    def reserve(self, order_id: int, *, idempotency_key: str) -> None:
        response = httpx.post(
            f"{self.url}/reservations",
            json={"order_id": order_id},
            headers={"Idempotency-Key": idempotency_key},
            timeout=5,
        )
        response.raise_for_status()


warehouse = Warehouse(os.environ.get("WAREHOUSE_URL", "http://warehouse.internal"))
billing = Consumer("billing", database_url=os.environ.get("SHOP_DATABASE_URL", "sqlite:///shop.db"))


@billing.handler("orders.created")
def invoice_order(message: IncomingMessage, session: Session) -> None:
    """Invoice the order in the handler's transaction, and reserve its goods."""
    order = message.payload
    session.execute(
        invoices.insert().values(order_id=order["order_id"], total_cents=order["total_cents"])
    )
    # The call cannot join the transaction: if the transaction rolls back after it, the
    # message is handled again and the call repeated. The message id as idempotency key
    # makes the warehouse take the repeat for the same reservation.
    warehouse.reserve(order["order_id"], idempotency_key=message.message_id)
