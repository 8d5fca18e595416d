"""``NotifyService``: consume the subscribed topics, record notifications, call the endpoints.

The path of a message::

    RabbitMQ ─▶ Consumer (group "notify") ─▶ handler: inbox row + one notification per
                                                      matching subscription (one transaction)
    outbox_notification ─▶ Dispatcher: claim due rows ─▶ signed POST ─▶ settle (one transaction)
    QueryAPI: GET /notifications/..., POST /notifications/{id}/retry

The consumer library gives the dedupe: a redelivered message finds its inbox
row and records nothing twice. Everything after that lives in the database, so
several processes share the work and a kill -9 loses nothing: a claimed
notification whose process died is due again when its lease lapses.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event

from consumer.config import ConsumerConfig
from consumer.consumer import Consumer
from consumer.notify.api import QueryAPI
from consumer.notify.dispatcher import Dispatcher
from consumer.notify.metrics import NotifyMetrics
from consumer.notify.store import NotifyStore, record_notifications
from outbox.engines import make_async_engine
from outbox.errors import ConfigurationError
from outbox.health import HealthServer, database_reachable, serve_until_signal
from outbox.logs import get_logger, redact_url

if TYPE_CHECKING:
    from collections.abc import Mapping
    from types import TracebackType

    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
    from sqlalchemy.orm import Session

    from consumer.message import IncomingMessage
    from consumer.notify.config import NotifyConfig
    from outbox.receipts import Outcome

__all__ = ["NotifyService"]


class NotifyService:
    """The best-effort notification service (DESIGN §1.4) of one process.

    ``database_url`` (or a sync ``engine``) and ``amqp_url`` are the consumer's;
    ``consumer_options`` are further keyword arguments for ``Consumer(...)``,
    which is built in one place (``_make_consumer``). Without a ``config`` among
    them, the consumer's configuration comes from ``config`` (exchange,
    queue_prefix, queue_type, shutdown_timeout). PostgreSQL lets several
    processes share the work; SQLite runs one. Nothing connects until
    ``start()``; ``serve()`` runs until SIGTERM or SIGINT.
    """

    def __init__(
        self,
        config: NotifyConfig,
        *,
        database_url: str | None = None,
        amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/",
        engine: sa.Engine | None = None,
        consumer_options: Mapping[str, Any] | None = None,
    ) -> None:
        config.validate()
        if database_url is None and engine is None:
            raise ConfigurationError("NotifyService needs database_url= or engine=")
        self.config = config
        self._database_url = database_url or engine.url.render_as_string(hide_password=False)  # type: ignore[union-attr]
        # Host and pid say which process holds a claim; the suffix keeps two services in
        # one process (tests, an embedded setup) from taking each other's claims for theirs.
        self.worker_id = f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.metrics = NotifyMetrics()
        self.consumer = self._make_consumer(amqp_url, engine, consumer_options or {})
        self._engine: AsyncEngine | None = None
        self.store: NotifyStore | None = None
        self.dispatcher: Dispatcher | None = None
        self.api: QueryAPI | None = None
        self._health: HealthServer | None = None
        self._stopping = asyncio.Event()
        self._log = get_logger("outbox.notify").bind(group=config.group)

    def _make_consumer(
        self, amqp_url: str, engine: sa.Engine | None, options: Mapping[str, Any]
    ) -> Consumer:
        """The consumer group that records notifications: one handler for every pattern."""
        extra = dict(options)
        consumer_config = extra.pop("config", None) or ConsumerConfig(
            exchange=self.config.exchange,
            queue_prefix=self.config.queue_prefix,
            queue_type=self.config.queue_type,
            shutdown_timeout=self.config.shutdown_timeout,
        )
        consumer = Consumer(
            self.config.group,
            database_url=None if engine is not None else self._database_url,
            amqp_url=amqp_url,
            engine=engine,
            config=consumer_config,
            **extra,
        )
        # One function under every pattern: whichever pattern routes a message here, the
        # handler records it for every subscription whose patterns match its topic.
        for pattern in self.config.topic_patterns:
            consumer.handler(pattern)(self._record)
        return consumer

    async def _record(self, message: IncomingMessage, session: AsyncSession) -> None:
        """The consumer handler: notifications in the transaction that holds the inbox row."""
        subscriptions = [s for s in self.config.subscriptions if s.matches(message.topic)]
        await record_notifications(await session.connection(), message, subscriptions)
        # Wake the dispatcher once the rows are committed; before, its claim would miss them.
        event.listen(session.sync_session, "after_commit", self._committed, once=True)

    def _receipt(self, message_id: str, outcome: Outcome, subscription: str) -> None:
        """File the outcome for ``outbox status`` as ``<group>:<subscription>``."""
        self.consumer.send_receipt(message_id, outcome, group=f"{self.config.group}:{subscription}")

    def _committed(self, session: Session) -> None:
        if self.dispatcher is not None:
            self.dispatcher.wake()

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the query API, start consuming, start calling; returns once all run."""
        self._engine = make_async_engine(self._database_url, pool_size=4, max_overflow=16)
        self.store = NotifyStore(self._engine, self.worker_id)
        self.dispatcher = Dispatcher(self.config, self.store, self.metrics, self._receipt)
        self.api = QueryAPI(self.store, self.config, on_retry=self.dispatcher.wake)
        # Schema and API port first: either failing stops the start before anything is
        # consumed.
        await self.store.check_schema()
        await self.api.start()
        await self.consumer.start()
        await self.dispatcher.start()
        if self.config.metrics_port is not None:
            self._health = HealthServer(self._render, self._health_checks, self.config.metrics_port)
            await self._health.start()
        self._log.info(
            "notify.started",
            worker=self.worker_id,
            api_port=self.api.port,
            database_url=redact_url(self._database_url),
            amqp_url=redact_url(self.consumer.amqp_url),
            **self.config.describe(),
        )

    async def stop(self) -> None:
        """Stop consuming and calling (calls in flight get ``shutdown_timeout``), then close."""
        self._stopping.set()
        stopping = [self.consumer.stop()]
        if self.dispatcher is not None:
            stopping.append(self.dispatcher.stop())
        await asyncio.gather(*stopping)
        if self.api is not None:
            await self.api.close()
        if self._health is not None:
            await self._health.close()
        if self._engine is not None:
            await self._engine.dispose()
        self._log.info("notify.stopped", worker=self.worker_id)

    async def serve(self) -> None:
        """Start, run until SIGTERM or SIGINT, then stop cleanly."""
        await serve_until_signal(
            self.start, self.stop, self._stopping, lambda: self._log.info("notify.stopping")
        )

    def run(self) -> None:
        """Run the service in this process until SIGTERM or SIGINT (blocking)."""
        asyncio.run(self.serve())

    async def __aenter__(self) -> NotifyService:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- health and metrics -------------------------------------------------------------

    def _render(self) -> bytes:
        # One scrape shows both halves of the service: the consumer's and the calls'.
        return self.metrics.render() + self.consumer.metrics.render()

    async def _health_checks(self) -> dict[str, bool]:
        running = self.dispatcher is not None and self.dispatcher.running
        return {"database": await database_reachable(self._engine), "dispatcher": running}
