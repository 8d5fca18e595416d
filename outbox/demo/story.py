"""The story ``outbox demo`` tells, chapter by chapter, with every component for real.

The relay, the consumers and the notification service are the framework's own,
started in this process on SQLite and the in-memory broker (no services), or on
PostgreSQL and RabbitMQ when URLs are given. Only the crashes are staged.

The relay and consumer packages are imported when the story runs, not when
``outbox`` is: the core does not depend on them (DESIGN §2).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

import outbox
from outbox import migrate
from outbox.demo.partner import Partner
from outbox.demo.shop import invoices, orders, payment_exists, place_order, shop, take_payment
from outbox.engines import make_engine
from outbox.envelope import Envelope
from outbox.errors import ConfigurationError, OutboxError
from outbox.half import Verdict
from outbox.logs import redact_url
from outbox.memory_broker import InMemoryBroker
from outbox.tables import notification_table, outbox_table

if TYPE_CHECKING:
    from collections.abc import Callable

    from consumer import Consumer, IncomingMessage
    from consumer.notify.service import NotifyService
    from outbox.demo.narrator import Narrator
    from relay import Relay

__all__ = ["DemoError", "Summary", "run_story"]

EXCHANGE = "outbox.demo"
QUEUE_PREFIX = "outbox-demo"
PG_SCHEMA = "outbox_demo"
FAST_RETRIES = (timedelta(milliseconds=200), timedelta(milliseconds=500))
PARTNER_SECRET = "demo-partner-secret"  # noqa: S105 (a demo's shared secret, shown on purpose)
WAIT = 30.0
"""Seconds any chapter may take before the demo calls it broken."""


class DemoError(OutboxError):
    """A chapter did not reach its end in time: something is broken."""


@dataclass
class Summary:
    """What the run did, as the framework's own counters and tables report it."""

    published: int = 0
    handled: int = 0
    duplicates: int = 0
    retried: int = 0
    dead: int = 0
    checked_back: int = 0
    notified: int = 0
    notify_attempts: int = 0

    def rows(self) -> list[tuple[str, object]]:
        """The summary table's rows."""
        return [
            ("messages published by the relay", self.published),
            ("messages handled (one effect each)", self.handled),
            ("duplicates absorbed by the inbox", self.duplicates),
            ("handler retries", self.retried),
            ("dead-lettered", self.dead),
            ("half messages resolved by check-back", self.checked_back),
            ("partner notifications delivered", self.notified),
            ("partner calls made", self.notify_attempts),
        ]


async def run_story(
    narrator: Narrator, database_url: str | None = None, amqp_url: str | None = None
) -> Summary:
    """Tell the whole story; return the summary. Raises ``DemoError`` if a chapter stalls."""
    url, where = _database(database_url)
    narrator.title("outbox: reliable messaging between services, told in eight chapters")
    narrator.info(f"database: {where}")
    narrator.info("broker:   " + (redact_url(amqp_url) if amqp_url else "in-memory (this process)"))
    engine = make_engine(url)
    try:
        migrate.upgrade(engine)
        shop.create_all(engine)
        async with AsyncExitStack() as stack:
            return await _Story(narrator, engine, url, amqp_url, stack).run()
    finally:
        engine.dispose()


def _database(database_url: str | None) -> tuple[str, str]:
    """The URL to use and how to describe it; a PostgreSQL demo gets a fresh schema."""
    if database_url is None:
        path = Path(tempfile.mkdtemp(prefix="outbox-demo-")) / "demo.db"
        return f"sqlite:///{path}", f"SQLite file {path}"
    parsed = sa.make_url(database_url)
    if parsed.get_backend_name() == "sqlite":
        return database_url, f"SQLite {parsed.database}"
    if parsed.get_backend_name() != "postgresql":
        raise ConfigurationError("the demo runs on SQLite or PostgreSQL; give a postgresql:// URL")
    engine = make_engine(parsed)
    try:
        with engine.begin() as conn:
            # Its own schema: the demo never touches the tables of a real outbox.
            conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {PG_SCHEMA} CASCADE"))
            conn.execute(sa.text(f"CREATE SCHEMA {PG_SCHEMA}"))
    finally:
        engine.dispose()
    scoped = parsed.update_query_dict({"options": f"-csearch_path={PG_SCHEMA}"})
    return (
        scoped.render_as_string(hide_password=False),
        f"PostgreSQL {redact_url(database_url)}, schema {PG_SCHEMA}",
    )


class _Story:
    def __init__(
        self,
        narrator: Narrator,
        engine: sa.Engine,
        url: str,
        amqp_url: str | None,
        stack: AsyncExitStack,
    ) -> None:
        self.say = narrator
        self.engine = engine
        self.url = url
        self.amqp_url = amqp_url
        self.stack = stack
        self.broker = InMemoryBroker() if amqp_url is None else None
        self.summary = Summary()
        self.paid_attempts = 0

    async def run(self) -> Summary:
        billing = self._billing()
        ob = outbox.Outbox(self.engine, check_after=timedelta(seconds=1))

        @ob.checkback("payments.captured")
        def did_payment_happen(message: outbox.Message) -> Verdict:
            taken = payment_exists(self.engine, message.payload)
            verdict = Verdict.COMMIT if taken else Verdict.ROLLBACK
            self.say.event(
                "check-back",
                f"payment {message.payload['payment_id']}: "
                f"{'found, so COMMIT' if taken else 'not found, so ROLLBACK'}",
            )
            return verdict

        partner = Partner(
            PARTNER_SECRET,
            fail_first=1,
            on_call=lambda mid, attempt, status: self.say.event(
                "partner", f"POST attempt {attempt} for {_short(mid)}: answered {status}"
            ),
        )
        await partner.start()
        self.stack.push_async_callback(partner.close)
        notify = self._notify(partner)
        if self.amqp_url is not None:
            await self._clear_queues([billing, notify.consumer])
        else:
            assert self.broker is not None
            await self.broker.connect()
            self.stack.push_async_callback(self.broker.close)
        await notify.start()
        self.stack.push_async_callback(notify.stop)
        await billing.start()
        self.stack.push_async_callback(billing.stop)

        first = self._orders_commit_with_their_events()
        self._rollback_publishes_nothing()
        relay = await self._relay_publishes(ob)
        await self._consumer_absorbs_a_duplicate(billing, relay, first)
        await self._failing_handler_is_retried(billing)
        await self._dead_letter(billing)
        await self._half_messages(ob)
        await self._notification(partner)

        self.summary.published = self._count(outbox_table.c.status == "published")
        self.summary.handled = int(billing.metrics.processed._value.get())
        self.summary.duplicates = int(billing.metrics.duplicates._value.get())
        self.summary.retried = int(billing.metrics.retries._value.get())
        self.summary.dead = int(billing.metrics.dead._value.get())
        self.summary.notify_attempts = len(partner.calls)
        return self.summary

    # -- the cast -----------------------------------------------------------------------

    def _billing(self) -> Consumer:
        from consumer import Consumer, ConsumerConfig

        billing = Consumer(
            "billing",
            engine=self.engine,
            broker=self.broker,
            amqp_url=self.amqp_url or "amqp://unused/",
            config=ConsumerConfig(
                exchange=EXCHANGE, queue_prefix=QUEUE_PREFIX, retry_tiers=FAST_RETRIES
            ),
        )

        @billing.handler("orders.created")
        def invoice(message: IncomingMessage, session: Session) -> None:
            order = message.payload
            session.execute(
                invoices.insert().values(
                    order_id=order["order_id"], amount_cents=order["total_cents"]
                )
            )
            self.say.event(
                "billing", f"invoice for order {order['order_id']} ({order['total_cents']} cents)"
            )

        @billing.handler("orders.paid", retry_delay=timedelta(milliseconds=200))
        def book_payment(message: IncomingMessage, session: Session) -> None:
            self.paid_attempts += 1
            if message.attempt < 3:
                self.say.event("billing", f"attempt {message.attempt}: ledger unavailable, fails")
                raise RuntimeError("ledger unavailable")
            self.say.event("billing", f"attempt {message.attempt}: payment booked")

        @billing.handler(
            "orders.cancelled", max_attempts=3, retry_delay=timedelta(milliseconds=200)
        )
        def cancel(message: IncomingMessage, session: Session) -> None:
            self.say.event("billing", f"attempt {message.attempt}: order already shipped, fails")
            raise ValueError(f"order {message.payload['order_id']} has already shipped")

        return billing

    def _notify(self, partner: Partner) -> NotifyService:
        from consumer.notify.config import NotifyConfig, Subscription
        from consumer.notify.service import NotifyService

        config = NotifyConfig(
            subscriptions=(
                Subscription(
                    name="partner",
                    topics=("payments.*",),
                    url=partner.url,
                    secret=PARTNER_SECRET,
                    secret_env="(demo)",  # noqa: S106 (a label, not a secret)
                    schedule=(timedelta(0), timedelta(milliseconds=300), timedelta(seconds=1)),
                    timeout=timedelta(seconds=5),
                ),
            ),
            token=uuid.uuid4().hex,
            exchange=EXCHANGE,
            queue_prefix=QUEUE_PREFIX,
            api_port=0,
        )
        return NotifyService(
            config,
            engine=self.engine,
            amqp_url=self.amqp_url or "amqp://unused/",
            consumer_options={"broker": self.broker},
        )

    # -- the chapters -------------------------------------------------------------------

    def _orders_commit_with_their_events(self) -> str:
        self.say.chapter(
            "Orders and their events commit in one transaction",
            "outbox.publish() adds the event to the caller's transaction; nothing is sent yet.",
        )
        first = ""
        for order_id, customer, total in ((1, "ada", 4200), (2, "grace", 1999), (3, "alan", 750)):
            mid = place_order(self.engine, order_id, customer, total)
            first = first or mid
            self.say.step(f"order {order_id} for {customer}: committed with event {_short(mid)}")
        pending = self._count(outbox_table.c.status == "pending")
        self.say.shows(f"3 orders, {pending} pending outbox rows, written atomically")
        return first

    def _rollback_publishes_nothing(self) -> None:
        self.say.chapter(
            "A failed transaction publishes nothing",
            "The event is a row in the same transaction: a rollback takes it away too.",
        )
        try:
            place_order(self.engine, 4, "bob", 0)
        except ValueError as e:
            self.say.step(f"order 4 rolled back: {e}")
        with self.engine.connect() as conn:
            count = conn.execute(sa.select(sa.func.count()).select_from(orders)).scalar_one()
        rows = self._count(sa.true())
        self.say.shows(f"still {count} orders and {rows} outbox rows: no ghost event")

    async def _relay_publishes(self, ob: outbox.Outbox) -> Relay:
        from relay import Relay, RelayConfig

        self.say.chapter(
            "The relay publishes, with publisher confirms",
            "It claims pending rows, publishes them, and marks them published once confirmed.",
        )
        config = RelayConfig(
            database_url=self.url,
            amqp_url=self.amqp_url or RelayConfig.amqp_url,
            exchange=EXCHANGE,
            check_interval=timedelta(milliseconds=200),
        )
        relay = Relay(config, broker=self.broker, app=ob)
        await relay.start()
        self.stack.push_async_callback(relay.stop)
        await self._until(
            lambda: self._count(outbox_table.c.status == "published") == 3,
            "the relay to publish the 3 order events",
        )
        await self._until(lambda: self._rows(invoices) == 3, "billing to invoice the 3 orders")
        self.say.shows("3 events published and confirmed; billing made 3 invoices")
        return relay

    async def _consumer_absorbs_a_duplicate(
        self, billing: Consumer, relay: Relay, message_id: str
    ) -> None:
        self.say.chapter(
            "A duplicate is absorbed by the inbox",
            "The wire is at-least-once; the inbox row, in the handler's transaction, "
            "makes the effect exactly-once.",
        )

        def read_row() -> Envelope:
            with self.engine.connect() as conn:
                row = conn.execute(
                    sa.select(outbox_table).where(
                        outbox_table.c.message_id == uuid.UUID(message_id)
                    )
                ).one()
            return Envelope.from_row(row._mapping)

        await relay.broker.publish([await asyncio.to_thread(read_row)])
        self.say.step(f"event {_short(message_id)} sent to the broker a second time")
        await self._until(
            lambda: billing.metrics.duplicates._value.get() == 1, "billing to see the duplicate"
        )
        self.say.shows(f"acked without calling the handler: still {self._rows(invoices)} invoices")

    async def _failing_handler_is_retried(self, billing: Consumer) -> None:
        self.say.chapter(
            "A failing handler is retried with backoff",
            "An exception rolls the handler's transaction back; the message waits in a delay "
            "queue and comes again.",
        )
        await asyncio.to_thread(self._publish, "orders.paid", {"order_id": 1})
        await self._until(
            lambda: billing.metrics.processed._value.get() >= 4, "the payment to be booked"
        )
        self.say.shows(f"booked at attempt 3 after {self.paid_attempts - 1} failures")

    async def _dead_letter(self, billing: Consumer) -> None:
        self.say.chapter(
            "A message that keeps failing is dead-lettered",
            "After max_attempts it goes to the group's dead-letter queue with the reason, "
            "for an operator to inspect and replay.",
        )
        await asyncio.to_thread(self._publish, "orders.cancelled", {"order_id": 2})
        await self._until(lambda: billing.metrics.dead._value.get() >= 1, "the dead letter")
        self.say.shows(
            f"in {billing.dead_queue}: 'failed 3 times; last error: ValueError: "
            "order 2 has already shipped' (replay: outbox dead replay --group billing)"
        )

    async def _half_messages(self, ob: outbox.Outbox) -> None:
        self.say.chapter(
            "Half messages survive a producer crash",
            "Prepare, do the local work, commit: a producer that dies in between leaves a "
            "prepared message that the relay checks back.",
        )
        # Database work runs in threads from here on: a blocking SQLite write on the event
        # loop could wait for a lock that the relay, on this same loop, holds.
        taken = await asyncio.to_thread(
            take_payment, ob, self.engine, "pay-1", 1, 4200, crash="after_local_work"
        )
        self.say.step(
            f"payment pay-1 taken, then the producer dies before commit ({_short(taken)})"
        )
        lost = await asyncio.to_thread(
            take_payment, ob, self.engine, "pay-2", 3, 750, crash="before_local_work"
        )
        self.say.step(f"payment pay-2: the producer dies before taking it ({_short(lost)})")
        statuses: dict[str, str] = {}

        def resolved() -> bool:
            statuses.update(self._statuses([taken, lost]))
            return statuses.get(taken) == "published" and statuses.get(lost) == "discarded"

        await self._until(resolved, "the relay to check both half messages back")
        self.summary.checked_back = 2
        self.say.shows("pay-1 published (its payment exists); pay-2 discarded (it never happened)")

    async def _notification(self, partner: Partner) -> None:
        self.say.chapter(
            "A partner is notified over HTTP, best-effort",
            "The notify service records the message, POSTs it signed, retries on a schedule, "
            "and gives up after the last attempt.",
        )

        def delivered() -> int:
            with self.engine.connect() as conn:
                return int(
                    conn.execute(
                        sa.select(sa.func.count())
                        .select_from(notification_table)
                        .where(notification_table.c.status == "delivered")
                    ).scalar_one()
                )

        await self._until(lambda: delivered() == 1, "the partner to be notified")
        self.summary.notified = 1
        self.say.shows(
            f"delivered after {len(partner.calls)} calls; every call carried a valid signature"
        )

    # -- helpers ------------------------------------------------------------------------

    def _publish(self, topic: str, payload: dict[str, Any]) -> None:
        with Session(self.engine) as session, session.begin():
            message = outbox.publish(session, topic, payload, key=f"order-{payload['order_id']}")
        self.say.step(
            f"{topic} for order {payload['order_id']} committed ({_short(message.message_id)})"
        )

    def _count(self, where: Any) -> int:
        with self.engine.connect() as conn:
            query = sa.select(sa.func.count()).select_from(outbox_table).where(where)
            return int(conn.execute(query).scalar_one())

    def _rows(self, table: sa.Table) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())

    def _statuses(self, message_ids: list[str]) -> dict[str, str]:
        ids = [uuid.UUID(m) for m in message_ids]
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(outbox_table.c.message_id, outbox_table.c.status).where(
                    outbox_table.c.message_id.in_(ids)
                )
            ).all()
        return {str(mid): status for mid, status in rows}

    async def _until(self, condition: Callable[[], bool], what: str) -> None:
        """Wait for ``condition``, checked in a thread: a blocking SQLite read on the event
        loop could wait for a lock that the relay or a consumer on this loop holds."""
        deadline = time.monotonic() + WAIT
        while not await asyncio.to_thread(condition):
            if time.monotonic() > deadline:
                raise DemoError(f"waited {WAIT:g}s for {what}; run again with --logs")
            await asyncio.sleep(0.05)

    async def _clear_queues(self, consumers: list[Consumer]) -> None:
        """Delete the queues an earlier run left on RabbitMQ, so counts start from zero."""
        import aio_pika

        from outbox.receipts import receipts_queue

        names = [receipts_queue(EXCHANGE)]
        for consumer in consumers:
            topology = consumer.topology()
            names += [topology.queue, topology.dead_queue, *topology.retry_queues]
        assert self.amqp_url is not None
        connection = await aio_pika.connect(self.amqp_url)
        async with connection:
            channel = await connection.channel()
            for name in names:
                await channel.queue_delete(name)


def _short(message_id: str) -> str:
    """The end of a message id: UUIDv7s of one run share their leading timestamp digits."""
    return "…" + message_id[-12:]
