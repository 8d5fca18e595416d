"""A producer on the embedded default (SQLite and the in-memory broker), start to finish.

Run: ``python examples/producer.py [DATABASE_URL]`` (default: a SQLite file in a
temporary folder). It creates the tables, places an order whose event commits
with it, tries one whose transaction fails (its event never exists), then shows
what the outbox holds, runs the relay, which publishes the committed message
through the in-memory broker to a bound queue, and reads it as a consumer would.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from contextlib import aclosing
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

import outbox
from outbox import migrate
from outbox.envelope import WireFormat
from outbox.logs import configure_logging
from outbox.memory_broker import InMemoryBroker
from relay import Relay, RelayConfig

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


async def relay_and_receive(url: str) -> None:
    """Run the relay on the embedded default and read what it sent from a bound queue."""
    broker = InMemoryBroker()
    await broker.connect()
    await broker.declare_queue("billing.orders", ["orders.*"])
    relay = Relay(RelayConfig(database_url=url), broker=broker)
    async with relay, aclosing(broker.consume("billing.orders")) as deliveries:
        delivery = await anext(deliveries)
        envelope = delivery.envelope
        wire = WireFormat()
        print(
            f"\nthe relay published to exchange {wire.exchange!r}, routing key {envelope.topic!r}:"
        )
        for name, value in envelope.amqp_properties(wire).items():
            print(f"  {name}: {value}")
        print(f"  body: {envelope.body.decode()}")
        message = envelope.decode()
        print(
            f"queue billing.orders received {message.topic} key={message.key} "
            f"payload={message.payload}"
        )
        await delivery.ack()
    await broker.close()


def main() -> None:
    configure_logging("WARNING")  # the relay's own log lines would drown the story
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
    engine.dispose()
    asyncio.run(relay_and_receive(url))
    with sa.create_engine(url).connect() as conn:
        print(
            "outbox after the relay:",
            conn.execute(sa.select(outbox.outbox_table.c.status)).scalars().all(),
        )


if __name__ == "__main__":
    main()
