"""The demo's little business: orders, invoices and payments, and what they publish."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

import outbox

if TYPE_CHECKING:
    from outbox.half import Outbox

__all__ = ["invoices", "orders", "payments", "place_order", "shop", "take_payment"]

shop = sa.MetaData()

orders = sa.Table(
    "demo_orders",
    shop,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("customer", sa.String(50), nullable=False),
    sa.Column("total_cents", sa.Integer, nullable=False),
)
invoices = sa.Table(
    "demo_invoices",
    shop,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("order_id", sa.Integer, nullable=False),
    sa.Column("amount_cents", sa.Integer, nullable=False),
)
payments = sa.Table(
    "demo_payments",
    shop,
    sa.Column("payment_id", sa.String(40), primary_key=True),
    sa.Column("order_id", sa.Integer, nullable=False),
    sa.Column("amount_cents", sa.Integer, nullable=False),
)


def place_order(engine: sa.Engine, order_id: int, customer: str, total_cents: int) -> str:
    """The business transaction: the order row and its event commit together, or neither.

    Returns the event's message id; raises ``ValueError`` (after rolling back) for a
    total that is not positive.
    """
    with Session(engine) as session, session.begin():
        session.execute(
            orders.insert().values(id=order_id, customer=customer, total_cents=total_cents)
        )
        message = outbox.publish(
            session,
            "orders.created",
            {"order_id": order_id, "customer": customer, "total_cents": total_cents},
            key=f"customer-{customer}",
        )
        if total_cents <= 0:
            raise ValueError(f"order {order_id}: a total must be positive")
    return message.message_id


def take_payment(
    ob: Outbox, engine: sa.Engine, payment_id: str, order_id: int, amount: int, *, crash: str
) -> str:
    """Capture a payment with a half message, and "crash" at ``crash``.

    The payment lives in a system the outbox cannot share a transaction with (in
    real life, a payment provider's API; here a table written in its own
    transaction). ``crash="after_local_work"``: the payment is taken, then the
    process dies before committing the half message; ``crash="before_local_work"``:
    it dies before taking the payment. Either way the half message stays prepared
    and the relay has to ask the check-back. Returns the message id.
    """
    half = ob.prepare(
        "payments.captured",
        {"payment_id": payment_id, "order_id": order_id, "amount_cents": amount},
        key=f"order-{order_id}",
    )
    if crash == "after_local_work":
        with engine.begin() as conn:
            conn.execute(
                payments.insert().values(
                    payment_id=payment_id, order_id=order_id, amount_cents=amount
                )
            )
    # No half.commit() and no half.rollback(): the producer "died" here.
    return half.message_id


def payment_exists(engine: sa.Engine, payload: Any) -> bool:
    """The check-back's question: did the payment of this message happen?"""
    with engine.connect() as conn:
        found = conn.execute(
            sa.select(payments.c.payment_id).where(payments.c.payment_id == payload["payment_id"])
        ).first()
    return found is not None
