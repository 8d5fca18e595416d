"""A small web shop: Flask and SQLAlchemy 2, publishing ``orders.created`` with each order.

``POST /orders`` writes the order row and its ``orders.created`` message in one
transaction, so the event exists exactly when the order does; the relay
(``outbox relay``) sends it to RabbitMQ afterwards. ``GET /orders/<id>`` reads an
order back. The database is ``OUTBOX_DATABASE_URL``, the same variable the
``outbox`` commands read. See README.md beside this file for the commands.
"""

from __future__ import annotations

import os
import uuid
from datetime import datetime  # noqa: TC003  (SQLAlchemy reads Mapped[...] at run time)
from typing import Any

import click
import sqlalchemy as sa
from flask import Flask, current_app, jsonify, request, url_for
from flask.cli import with_appcontext
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import outbox
from outbox import migrate
from outbox.engines import make_engine
from outbox.ids import new_message_uuid

# Order ids derived from a client's Idempotency-Key live in a namespace of their own.
IDEMPOTENCY_NAMESPACE = uuid.UUID("6f9e0c2a-54d1-4c3e-9a57-2b0c6a1d7e41")


class Base(DeclarativeBase):
    """The shop's own tables; the framework's are in ``outbox.metadata``."""


class Order(Base):
    """An order, and the id of the ``orders.created`` message that announced it."""

    __tablename__ = "webshop_order"

    id: Mapped[int] = mapped_column(sa.BigInteger, sa.Identity(), primary_key=True)
    customer: Mapped[str] = mapped_column(sa.String(100))
    total_cents: Mapped[int]
    # Not unique: the outbox's own unique message id is what refuses a repeated request.
    message_id: Mapped[uuid.UUID] = mapped_column(index=True)
    created_at: Mapped[datetime] = mapped_column(
        sa.DateTime(timezone=True), server_default=sa.func.now()
    )

    def to_dict(self) -> dict[str, Any]:
        """The order as the API returns it."""
        return {
            "id": self.id,
            "customer": self.customer,
            "total_cents": self.total_cents,
            "message_id": str(self.message_id),
            "created_at": self.created_at.isoformat(),
        }


def create_app(database_url: str | None = None) -> Flask:
    """Build the app on ``database_url`` (default: ``$OUTBOX_DATABASE_URL``); connects lazily."""
    url = database_url or os.environ.get("OUTBOX_DATABASE_URL")
    if not url:
        raise RuntimeError("set OUTBOX_DATABASE_URL, e.g. postgresql://app:app@127.0.0.1:5432/app")
    app = Flask(__name__)
    # make_engine accepts the URLs the outbox commands take (postgresql:// means psycopg 3).
    app.extensions["webshop.engine"] = make_engine(url)
    app.add_url_rule("/orders", view_func=place_order, methods=["POST"])
    app.add_url_rule("/orders/<int:order_id>", view_func=get_order, methods=["GET"])
    app.cli.add_command(init_db)
    return app


def engine() -> sa.Engine:
    """The current app's database engine."""
    bound: sa.Engine = current_app.extensions["webshop.engine"]
    return bound


@click.command("init-db")
@with_appcontext
def init_db() -> None:
    """Create the outbox tables (as `outbox db upgrade` does) and the shop's own."""
    applied = migrate.upgrade(engine())
    Base.metadata.create_all(engine())
    click.echo(f"outbox migrations applied: {applied or 'none, up to date'}; shop tables ready")


def place_order() -> tuple[Any, int] | tuple[Any, int, dict[str, str]]:
    """Create an order and its ``orders.created`` message in one transaction.

    Body: ``{"customer": "ada", "total_cents": 4200}``. An ``Idempotency-Key``
    header makes a retried request safe: the message id is derived from the key,
    so a second request with the same key is refused by the outbox (409) and
    its order row is rolled back with it.
    """
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return jsonify(error="send a JSON object"), 400
    customer = body.get("customer")
    total = body.get("total_cents")
    if not isinstance(customer, str) or not 1 <= len(customer) <= 100:
        return jsonify(error="customer must be a string of 1 to 100 characters"), 400
    if not isinstance(total, int) or isinstance(total, bool) or total <= 0:
        return jsonify(error="total_cents must be a positive integer"), 400
    key = request.headers.get("Idempotency-Key")
    # Without a key, a time-ordered UUIDv7 like the ones publish() makes by itself.
    message_id = uuid.uuid5(IDEMPOTENCY_NAMESPACE, key) if key else new_message_uuid()
    try:
        with Session(engine(), expire_on_commit=False) as session, session.begin():
            order = Order(customer=customer, total_cents=total, message_id=message_id)
            session.add(order)
            session.flush()  # the order row is written and has its id
            outbox.publish(
                session,
                "orders.created",
                {"order_id": order.id, "customer": customer, "total_cents": total},
                key=f"customer-{customer}",
                message_id=message_id,
            )
            # Leaving the block commits the order and its message together; any
            # exception above rolls back both, and nothing is ever published.
    except outbox.DuplicateMessageError:
        with Session(engine()) as session:
            first = session.scalars(
                sa.select(Order).where(Order.message_id == message_id).limit(1)
            ).first()
        detail: dict[str, Any] = {"error": f"Idempotency-Key {key!r} was used already"}
        if first is not None:
            detail["order"] = url_for("get_order", order_id=first.id)
        return jsonify(detail), 409
    location = url_for("get_order", order_id=order.id)
    return jsonify(order.to_dict()), 201, {"Location": location}


def get_order(order_id: int) -> tuple[Any, int]:
    """Return one order, or 404."""
    with Session(engine()) as session:
        order = session.get(Order, order_id)
        if order is None:
            return jsonify(error=f"no order {order_id}"), 404
        return jsonify(order.to_dict()), 200
