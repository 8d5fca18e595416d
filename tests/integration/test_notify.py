"""The notify service against real PostgreSQL, RabbitMQ and a partner's HTTP endpoint.

Each test runs the service in this process with a consumer group, exchange and
schema of its own, and a partner endpoint (``notify_support.Partner``) that
answers as the test scripts it and checks every call's signature.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from notify_support import (
    TOKEN,
    Partner,
    delete_topology,
    environment,
    free_port,
    send,
    write_config,
)
from sqlalchemy.orm import Session
from waiting import wait_for

import outbox
from consumer.notify import NotifyService, load_config
from outbox.tables import notification_table, receipt_table
from relay import Relay, RelayConfig

pytestmark = pytest.mark.integration

PARTNER_TOKEN = "partner-token-0123456789abcdef"


class World:
    """Starts notify services on the test's schema and exchange, and asks their API."""

    def __init__(
        self, engine: sa.Engine, url: str, amqp_url: str, name: str, tmp: Path, partner: Partner
    ) -> None:
        self.engine, self.url, self.amqp_url, self.name = engine, url, amqp_url, name
        self.tmp, self.partner = tmp, partner
        self.services: list[NotifyService] = []

    def subscription(self, **overrides: Any) -> dict[str, Any]:
        return {
            "name": "partner",
            "topics": ["payments.*"],
            "url": self.partner.url,
            "schedule": ["0s", "200ms", "200ms"],
            "timeout": "1s",
            **overrides,
        }

    async def start(
        self, subscriptions: list[dict[str, Any]] | None = None, **service: Any
    ) -> NotifyService:
        path = write_config(
            self.tmp / f"notify{len(self.services)}.toml",
            name=self.name,
            subscriptions=subscriptions or [self.subscription()],
            **service,
        )
        env = {**environment(), "PARTNER_TOKEN": PARTNER_TOKEN}
        notify = NotifyService(
            load_config(path, env), database_url=self.url, amqp_url=self.amqp_url
        )
        self.services.append(notify)
        await notify.start()
        return notify

    async def send(self, topic: str = "payments.captured", payload: Any = None, **kw: Any) -> str:
        return await send(self.amqp_url, self.name, topic, payload or {"amount": 5}, **kw)

    async def api(
        self, method: str, path: str, token: str | None = TOKEN, **kw: Any
    ) -> httpx.Response:
        api = self.services[0].api
        assert api is not None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.port}") as client:
            return await client.request(method, path, headers=headers, **kw)

    async def show(self, message_id: str) -> list[dict[str, Any]]:
        response = await self.api("GET", f"/notifications/{message_id}")
        assert response.status_code == 200, response.text
        notifications: list[dict[str, Any]] = response.json()["notifications"]
        return notifications

    def status(self, message_id: str) -> list[tuple[str, str, int]]:
        t = notification_table
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(t.c.subscription, t.c.status, t.c.attempts)
                .where(t.c.message_id == sa.cast(message_id, sa.Uuid()))
                .order_by(t.c.subscription)
            )
            return [tuple(r) for r in rows]  # type: ignore[misc]

    def settled(self, message_id: str, status: str, subscriptions: int = 1) -> Callable[[], bool]:
        def check() -> bool:
            found = self.status(message_id)
            return len(found) == subscriptions and all(s == status for _, s, _ in found)

        return check


@pytest.fixture
def partner() -> Iterator[Partner]:
    p = Partner()
    yield p
    p.close()


@pytest.fixture
async def world(
    pg_engine: sa.Engine,
    pg_schema_url: str,
    amqp_url: str,
    unique_name: str,
    tmp_path: Path,
    partner: Partner,
) -> AsyncIterator[World]:
    w = World(pg_engine, pg_schema_url, amqp_url, unique_name, tmp_path, partner)
    yield w
    for service in w.services:
        await service.stop()
    await delete_topology(amqp_url, unique_name)


def receipts(engine: sa.Engine, message_id: str) -> list[tuple[str, str]]:
    """(group, outcome) of the receipts the relay recorded for the message, but consumed ones."""
    t = receipt_table
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(t.c.consumer_group, t.c.outcome).where(
                t.c.message_id == sa.cast(message_id, sa.Uuid()), t.c.outcome != "consumed"
            )
        )
        return [tuple(r) for r in rows]  # type: ignore[misc]


def failing_first(times: int, status: int = 503) -> Callable[[str, int], int]:
    """An endpoint that fails ``times`` calls of each message, then answers 200."""
    seen: dict[str, int] = {}

    def answer(message_id: str, attempt: int) -> int:
        seen[message_id] = seen.get(message_id, 0) + 1
        return status if seen[message_id] <= times else 200

    return answer


async def test_a_committed_message_reaches_the_partner_signed_through_relay_and_consumer(
    world: World, pg_engine: sa.Engine, pg_schema_url: str, amqp_url: str, unique_name: str
) -> None:
    await world.start()
    with Session(pg_engine) as session, session.begin():
        message = outbox.publish(session, "payments.captured", {"amount": 42}, key="order-7")
    relay = RelayConfig(
        database_url=pg_schema_url,
        amqp_url=amqp_url,
        exchange=unique_name,
        poll_max=timedelta(milliseconds=20),
        shutdown_timeout=timedelta(seconds=3),
    )

    async with Relay(relay):
        await wait_for(world.settled(message.message_id, "delivered"))
        # The outcome comes back as a receipt, filed per subscription, for `outbox status`.
        await wait_for(lambda: bool(receipts(pg_engine, message.message_id)))

    [(group, outcome)] = receipts(pg_engine, message.message_id)
    assert outcome == "delivered"
    assert group.endswith(":partner")
    [call] = world.partner.calls
    assert call.signature_valid
    assert call.body == {
        "message_id": message.message_id,
        "topic": "payments.captured",
        "key": "order-7",
        "payload": {"amount": 42},
        "timestamp": message.created_at.isoformat(),
    }
    assert call.headers["x-outbox-message-id"] == message.message_id
    assert call.headers["x-outbox-topic"] == "payments.captured"
    assert call.headers["x-outbox-attempt"] == "1"
    assert call.headers["x-outbox-signature"].startswith("v1=")


async def test_a_partner_failing_twice_gets_it_at_the_third_attempt_on_schedule(
    world: World,
) -> None:
    world.partner.answer = failing_first(2)
    await world.start([world.subscription(schedule=["0s", "300ms", "500ms", "300ms"])])

    mid = await world.send()
    await wait_for(world.settled(mid, "delivered"))

    calls = world.partner.calls_of(mid)
    assert [(c.attempt, c.answer) for c in calls] == [(1, 503), (2, 503), (3, 200)]
    assert all(c.signature_valid for c in calls)
    # Each wait is at least the schedule's delay before that attempt.
    assert calls[1].at - calls[0].at >= 0.3
    assert calls[2].at - calls[1].at >= 0.5
    [notification] = await world.show(mid)
    assert notification["status"] == "delivered"
    assert notification["attempts"] == 3
    assert notification["delivered_at"] is not None
    history = notification["history"]
    assert [(h["attempt"], h["status_code"]) for h in history] == [(1, 503), (2, 503), (3, 200)]
    assert history[0]["error"] == "HTTP 503: partner says no"
    assert history[2]["error"] is None
    assert all(h["duration_ms"] >= 0 and h["started_at"] for h in history)


async def test_an_always_failing_partner_is_abandoned_after_the_schedule_then_retried_by_hand(
    world: World,
) -> None:
    world.partner.answer = lambda message_id, attempt: 200 if attempt > 3 else 500
    await world.start([world.subscription(schedule=["0s", "100ms", "100ms"])])

    mid = await world.send()
    await wait_for(world.settled(mid, "abandoned"))

    [notification] = await world.show(mid)
    assert notification["attempts"] == 3
    assert notification["last_status_code"] == 500
    assert "gave up after attempt 3" in notification["last_error"]
    assert "HTTP 500" in notification["last_error"]
    assert len(world.partner.calls_of(mid)) == 3

    retried = await world.api("POST", f"/notifications/{notification['id']}/retry")
    assert retried.status_code == 200, retried.text
    assert retried.json()["notification"]["max_attempts"] == 6
    await wait_for(world.settled(mid, "delivered"))
    assert [c.attempt for c in world.partner.calls_of(mid)] == [1, 2, 3, 4]
    again = await world.api("POST", f"/notifications/{notification['id']}/retry")
    assert again.status_code == 409
    assert "delivered" in again.json()["error"]


async def test_410_gone_abandons_at_once(world: World) -> None:
    world.partner.answer = lambda message_id, attempt: 410
    await world.start()

    mid = await world.send()
    await wait_for(world.settled(mid, "abandoned"))

    [notification] = await world.show(mid)
    assert notification["attempts"] == 1
    assert notification["last_status_code"] == 410
    assert "410 Gone" in notification["last_error"]
    assert len(world.partner.calls_of(mid)) == 1


async def test_timeouts_and_unreachable_endpoints_are_retried_per_subscription(
    world: World,
) -> None:
    world.partner.slow = lambda message_id, attempt: attempt == 1
    world.partner.hang = 0.6
    dead_end = f"http://127.0.0.1:{free_port()}/hooks"
    await world.start(
        [
            world.subscription(timeout="300ms"),
            world.subscription(name="unreachable", url=dead_end, schedule=["0s", "50ms"]),
        ]
    )

    mid = await world.send()
    await wait_for(lambda: [s for _, s, _ in world.status(mid)] == ["delivered", "abandoned"])

    by_name = {n["subscription"]: n for n in await world.show(mid)}
    partner, unreachable = by_name["partner"], by_name["unreachable"]
    assert partner["status"] == "delivered"
    assert [h["status_code"] for h in partner["history"]] == [None, 200]
    assert partner["history"][0]["error"] == "timed out after 300ms"
    assert unreachable["status"] == "abandoned"
    assert [h["status_code"] for h in unreachable["history"]] == [None, None]
    assert "ConnectError" in unreachable["last_error"]


async def test_the_api_needs_the_token_and_a_partner_token_sees_its_own_only(
    world: World,
) -> None:
    await world.start(
        [
            world.subscription(token_env="PARTNER_TOKEN"),
            world.subscription(name="audit", topics=["payments.#"]),
        ]
    )
    mid = await world.send()
    await wait_for(world.settled(mid, "delivered", subscriptions=2))

    for token in (None, "wrong-token-0123456789abcdef"):
        refused = await world.api("GET", f"/notifications/{mid}", token=token)
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert "error" in refused.json()
    assert (await world.api("GET", "/notifications", token=None)).status_code == 401
    assert (await world.api("POST", "/notifications/1/retry", token=None)).status_code == 401

    everything = await world.api("GET", f"/notifications/{mid}")
    assert sorted(n["subscription"] for n in everything.json()["notifications"]) == [
        "audit",
        "partner",
    ]
    own = await world.api("GET", f"/notifications/{mid}", token=PARTNER_TOKEN)
    assert [n["subscription"] for n in own.json()["notifications"]] == ["partner"]
    listed = await world.api("GET", "/notifications", token=PARTNER_TOKEN)
    assert [n["subscription"] for n in listed.json()["notifications"]] == ["partner"]
    other = await world.api(
        "GET", "/notifications", token=PARTNER_TOKEN, params={"subscription": "audit"}
    )
    assert other.status_code == 403


async def test_the_list_filters_and_pages(world: World) -> None:
    world.partner.answer = lambda message_id, attempt: 200 if message_id in ok else 410
    ok: set[str] = set()
    await world.start()
    ok.add(await world.send())
    gone = await world.send()
    ok.add(await world.send())
    for mid in [*ok, gone]:
        await wait_for(world.settled(mid, "delivered" if mid in ok else "abandoned"))

    async def ids(**params: Any) -> list[str]:
        response = await world.api("GET", "/notifications", params=params)
        assert response.status_code == 200, response.text
        return [n["message_id"] for n in response.json()["notifications"]]

    assert await ids(status="abandoned") == [gone]
    assert set(await ids(status="delivered", subscription="partner")) == ok
    assert await ids(since="2999-01-01T00:00:00Z") == []
    assert len(await ids(until="2999-01-01T00:00:00Z")) == 3
    first = await world.api("GET", "/notifications", params={"limit": 2})
    page = first.json()
    assert len(page["notifications"]) == 2
    assert len(await ids(after=page["next_after"])) == 1
    for bad in ({"status": "lost"}, {"since": "yesterday"}, {"since": "2026-01-01T00:00:00"}):
        response = await world.api("GET", "/notifications", params=bad)
        assert response.status_code == 400
        assert response.json()["error"]
    missing = await world.api("GET", "/notifications/0190a1b2-0000-7000-8000-000000000000")
    assert missing.status_code == 404
    assert (await world.api("GET", "/notifications/not-a-uuid")).status_code == 400


async def test_an_open_breaker_postpones_calls_without_counting_attempts(world: World) -> None:
    down = True
    world.partner.answer = lambda message_id, attempt: 503 if down else 200
    await world.start(
        [
            world.subscription(
                schedule=["0s", *["50ms"] * 9],
                breaker_threshold=2,
                breaker_cooldown="1s",
                concurrency=1,
            )
        ]
    )
    mids = [await world.send() for _ in range(4)]

    await wait_for(lambda: len(world.partner.calls) >= 2)
    service = world.services[0]
    await wait_for(lambda: service.metrics.postponed.labels("partner")._value.get() >= 1)
    calls_when_opened = len(world.partner.calls)
    down = False
    for mid in mids:
        await wait_for(world.settled(mid, "delivered"))

    # While open: no call at all; the probe after the cooldown closed the breaker, and
    # the postponed notifications went out without an attempt counted for the wait.
    assert calls_when_opened == 2
    assert len(world.partner.calls) == 2 + len(mids)
    attempts = [n["attempts"] for mid in mids for n in await world.show(mid)]
    assert sum(attempts) == len(world.partner.calls)
    assert service.metrics.delivered.labels("partner")._value.get() == 4


async def test_a_wire_duplicate_is_notified_once(world: World) -> None:
    await world.start()
    mid = await world.send()
    await world.send(message_id=mid)
    await wait_for(world.settled(mid, "delivered"))
    await wait_for(lambda: world.services[0].consumer.metrics.duplicates._value.get() == 1)

    assert len(world.partner.calls_of(mid)) == 1


async def test_the_service_runs_on_sqlite(
    amqp_url: str, unique_name: str, tmp_path: Path, partner: Partner
) -> None:
    url = f"sqlite:///{tmp_path / 'notify.db'}"
    engine = sa.create_engine(url)
    outbox.metadata.create_all(engine)
    config = load_config(
        write_config(
            tmp_path / "notify.toml",
            name=unique_name,
            subscriptions=[
                {
                    "name": "partner",
                    "topics": ["payments.*"],
                    "url": partner.url,
                    "schedule": ["0s", "100ms"],
                }
            ],
        ),
        environment(),
    )
    partner.answer = failing_first(1)
    service = NotifyService(
        replace(config, poll_interval=timedelta(milliseconds=50)),
        database_url=url,
        amqp_url=amqp_url,
    )
    try:
        async with service:
            mid = await send(amqp_url, unique_name, "payments.captured", {"n": 1})

            def delivered() -> bool:
                with engine.connect() as conn:
                    return (
                        conn.execute(sa.select(notification_table.c.status)).scalar() == "delivered"
                    )

            await wait_for(delivered)
    finally:
        engine.dispose()
        await delete_topology(amqp_url, unique_name)
    assert [c.answer for c in partner.calls_of(mid)] == [503, 200]
