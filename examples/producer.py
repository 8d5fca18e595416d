"""A producer on the embedded default (SQLite and the in-memory broker), start to finish.

Run: ``python examples/producer.py [DATABASE_URL]`` (default: a SQLite file in a
temporary folder). It creates the tables, places an order whose event commits
with it, tries one whose transaction fails (its event never exists), then shows
what the outbox holds and the AMQP message the relay sends for it, routed
through the in-memory broker to a queue and decoded as a consumer would.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

import outbox
from outbox import migrate
from outbox.envelope import Envelope, WireFormat
from outbox.memory_broker import InMemoryBroker

shop = sa.MetaData()
orders = sa.Table(
    "orders",
    shop,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("customer", sa.String(50), nullable=False),
    sa.Column("total_cents", sa.Integer, nullable=False),
)


def place_order(engine: sa.Engine, order_id: int, customer: str, total_cents: int) -> None:
    """The business transaction: the order row and its event commit together or not at all."""
    with Session(engine) as session, session.begin():
        session.execute(
            orders.insert().values(id=order_id, customer=customer, total_cents=total_cents)
        )
        if total_cents <= 0:
            raise ValueError(f"order {order_id}: a total must be positive")
        outbox.publish(
            session,
            "orders.created",
            {"order_id": order_id, "customer": customer, "total_cents": total_cents},
            key=f"customer-{customer}",
            headers={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
        )


async def show_delivery(engine: sa.Engine) -> None:
    """Send the pending rows through the in-memory broker and read them back from a queue."""
    broker = InMemoryBroker()
    await broker.connect()
    await broker.declare_queue("billing.orders", ["orders.*"])
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(outbox.outbox_table).where(outbox.outbox_table.c.status == "pending")
        ).mappings()
        envelopes = [Envelope.from_row(row) for row in rows]
    wire = WireFormat()
    for envelope in envelopes:
        print(f"\nAMQP message to exchange {wire.exchange!r}, routing key {envelope.topic!r}:")
        for name, value in envelope.amqp_properties(wire).items():
            print(f"  {name}: {value}")
        print(f"  body: {envelope.body.decode()}")
    results = await broker.publish(envelopes)
    print("\nbroker answers:", ", ".join(f"{r.message_id[:8]}… {r.outcome}" for r in results))
    deliveries = broker.consume("billing.orders")
    delivery = await anext(deliveries)
    message = delivery.envelope.decode()
    print(
        f"queue billing.orders received {message.topic} key={message.key} payload={message.payload}"
    )
    await delivery.ack()
    await deliveries.aclose()
    await broker.close()


def main() -> None:
    url = sys.argv[1] if len(sys.argv) > 1 else f"sqlite:///{Path(tempfile.mkdtemp()) / 'shop.db'}"
    engine = sa.create_engine(url)
    print(f"database: {url}")
    print("tables created:", migrate.upgrade(engine) or "already up to date")
    shop.create_all(engine)

    place_order(engine, 1, "ada", 4200)
    try:
        place_order(engine, 2, "bob", 0)
    except ValueError as e:
        print(f"rolled back: {e}")

    with engine.connect() as conn:
        print("orders:", conn.execute(sa.select(orders.c.id, orders.c.customer)).all())
        outbox_rows = conn.execute(
            sa.select(
                outbox.outbox_table.c.message_id,
                outbox.outbox_table.c.topic,
                outbox.outbox_table.c.status,
            )
        ).all()
        print("outbox:", [(str(m), t, s) for m, t, s in outbox_rows])
    asyncio.run(show_delivery(engine))
    engine.dispose()


if __name__ == "__main__":
    main()
