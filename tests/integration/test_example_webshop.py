"""The web shop example on PostgreSQL: an order and its event commit together or not at all."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient

import outbox
from outbox.testing import capture_published

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

from webshop.app import create_app  # noqa: E402  (the example is not an installed package)

pytestmark = pytest.mark.integration


@pytest.fixture
def app(pg_schema_url: str) -> Iterator[Flask]:
    """The shop on an empty schema of its own, set up by its own ``init-db`` command."""
    app = create_app(pg_schema_url)
    result = app.test_cli_runner().invoke(args=["init-db"])
    assert result.exit_code == 0, result.output
    yield app
    app.extensions["webshop.engine"].dispose()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def db(pg_schema_url: str) -> Iterator[sa.Engine]:
    """A connection of its own: it sees only what the shop committed."""
    engine = sa.create_engine(pg_schema_url)
    yield engine
    engine.dispose()


def orders(db: sa.Engine) -> list[sa.Row[tuple[int, str, int, int]]]:
    with db.connect() as conn:
        return list(
            conn.execute(
                sa.text(
                    "SELECT id, customer, total_cents, xmin::text::bigint AS tx "
                    "FROM webshop_order ORDER BY id"
                )
            )
        )


def messages(db: sa.Engine) -> list[sa.Row[tuple[uuid.UUID, str, str, str, bytes, int]]]:
    with db.connect() as conn:
        return list(
            conn.execute(
                sa.text(
                    "SELECT message_id, topic, key, status, payload, xmin::text::bigint AS tx "
                    "FROM outbox_message ORDER BY id"
                )
            )
        )


def test_an_order_and_its_event_are_committed_in_one_transaction(
    client: FlaskClient, db: sa.Engine
) -> None:
    response = client.post("/orders", json={"customer": "ada", "total_cents": 4200})

    assert response.status_code == 201, response.get_json()
    order = response.get_json()
    assert response.headers["Location"] == f"/orders/{order['id']}"
    [row] = orders(db)
    [message] = messages(db)
    assert (row.id, row.customer, row.total_cents) == (order["id"], "ada", 4200)
    assert str(message.message_id) == order["message_id"]
    assert (message.topic, message.key, message.status) == (
        "orders.created",
        "customer-ada",
        outbox.MessageStatus.PENDING.value,
    )
    assert json.loads(bytes(message.payload)) == {
        "order_id": order["id"],
        "customer": "ada",
        "total_cents": 4200,
    }
    # xmin is the id of the transaction that wrote a row: one and the same for both.
    assert row.tx == message.tx
    assert client.get(f"/orders/{order['id']}").get_json() == order


def test_a_request_that_fails_after_writing_its_order_publishes_nothing(
    client: FlaskClient, db: sa.Engine
) -> None:
    # Given an order placed with an Idempotency-Key
    first = client.post(
        "/orders",
        json={"customer": "ada", "total_cents": 4200},
        headers={"Idempotency-Key": "checkout-17"},
    )
    assert first.status_code == 201

    # When a second request with the same key writes its order row, then fails to publish
    again = client.post(
        "/orders",
        json={"customer": "bob", "total_cents": 999},
        headers={"Idempotency-Key": "checkout-17"},
    )

    # Then neither its order nor a second message was committed
    assert again.status_code == 409
    assert again.get_json()["order"] == f"/orders/{first.get_json()['id']}"
    assert [r.customer for r in orders(db)] == ["ada"]
    assert [str(m.message_id) for m in messages(db)] == [first.get_json()["message_id"]]


def test_a_refused_request_writes_nothing(client: FlaskClient, db: sa.Engine) -> None:
    bad = client.post("/orders", json={"customer": "ada", "total_cents": -5})
    not_json = client.post("/orders", data="customer=ada", content_type="text/plain")

    assert (bad.status_code, not_json.status_code) == (400, 400)
    assert orders(db) == []
    assert messages(db) == []
    assert client.get("/orders/1").status_code == 404


def test_what_a_request_published_seen_through_the_test_kit(
    client: FlaskClient, db: sa.Engine
) -> None:
    """The way a user tests their own endpoint: ``outbox.testing.capture_published``."""
    with capture_published(db) as published:
        response = client.post("/orders", json={"customer": "ada", "total_cents": 4200})
    order = response.get_json()
    published.assert_one(
        "orders.created",
        payload={"order_id": order["id"], "customer": "ada", "total_cents": 4200},
        key="customer-ada",
    )

    with capture_published(db) as published:
        refused = client.post("/orders", json={"customer": "bob", "total_cents": -1})
    assert refused.status_code == 400
    published.assert_none()
