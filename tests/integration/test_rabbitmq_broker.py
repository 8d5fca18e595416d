"""RabbitMQBroker keeps the Broker contract on a real RabbitMQ and speaks the wire format.

Each test gets an exchange of its own (``WireFormat(exchange=unique_name)``) and a
connection named after it; teardown deletes every queue the test declared and the
exchange, over a separate aio-pika connection, so nothing is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import replace
from datetime import timedelta

import aio_pika
import pytest
import structlog
from broker_contract import BrokerContract, make_envelope
from yarl import URL

from outbox.broker import PublishOutcome, PublishResult
from outbox.codec import JSON
from outbox.envelope import KEY_HEADER, WireFormat
from outbox.errors import BrokerError, ConfigurationError
from outbox.rabbitmq import RabbitMQBroker


class _TrackedBroker(RabbitMQBroker):
    """Remembers the queues it declared, so the fixture can delete them afterwards."""

    def __init__(self, url: str, **kwargs: object) -> None:
        super().__init__(url, **kwargs)  # type: ignore[arg-type]
        self.declared: set[str] = set()

    async def declare_queue(self, queue: str, patterns: Sequence[str]) -> None:
        self.declared.add(queue)
        await super().declare_queue(queue, patterns)


async def _delete(amqp_url: str, exchange: str, queues: set[str]) -> None:
    connection = await aio_pika.connect(amqp_url)
    try:
        for queue in queues:
            channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.ChannelClosed):
                await channel.queue_delete(queue)  # fails if never created (declaration refused)
        channel = await connection.channel()
        await channel.exchange_delete(exchange)
    finally:
        await connection.close()


@pytest.fixture
async def cleanup(amqp_url: str, unique_name: str) -> AsyncIterator[set[str]]:
    """Queue names to delete after the test, with the test's exchange."""
    queues: set[str] = set()
    yield queues
    await _delete(amqp_url, unique_name, queues)


def _rabbitmqctl(*args: str) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=30, check=True
    )
    return done.stdout


def _connection_pids(name: str) -> list[str]:
    """The Erlang pids of the connections named ``name`` (this test's only)."""
    listing = _rabbitmqctl("list_connections", "pid", "client_properties", "--no-table-headers")
    marker = f'{{"connection_name","{name}"}}'
    pids = [line.split("\t", 1)[0] for line in listing.splitlines() if marker in line]
    assert pids, f"no connection named {name!r}"
    return pids


def _close_connections(pids: list[str]) -> None:
    """Have RabbitMQ close these connections, as ``close_all_connections`` does to all.

    Only this test's: other test runs may share the broker.
    """
    for pid in pids:
        _rabbitmqctl("close_connection", pid, "test: forced close")


async def _force_close_connection(name: str) -> None:
    pids = await asyncio.to_thread(_connection_pids, name)
    await asyncio.to_thread(_close_connections, pids)


async def _wait_until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` (a property with no event to wait on) until it holds; bounded."""
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def _get(queue: aio_pika.abc.AbstractQueue) -> aio_pika.abc.AbstractIncomingMessage:
    """The next message of ``queue`` by basic.get, which answers "empty" rather than waiting."""
    async with asyncio.timeout(5):
        while (message := await queue.get(fail=False)) is None:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    return message


class _CuttableProxy:
    """A TCP proxy to RabbitMQ: ``cut()`` drops its connections and refuses new ones.

    ``hold()`` keeps the connections open but stops passing on what RabbitMQ sends
    (confirms included) until ``release()``.
    """

    def __init__(self, amqp_url: str) -> None:
        self._target = URL(amqp_url)
        self._open = True
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    @property
    def url(self) -> str:
        return str(self._target.with_host("127.0.0.1").with_port(self._port))

    async def __aenter__(self) -> _CuttableProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        self.cut()
        self._server.close()
        await self._server.wait_closed()

    def cut(self) -> None:
        self._open = False
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self._open = True

    def hold(self) -> None:
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._open:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection(
            self._target.host, self._target.port or 5672
        )
        self._writers |= {writer, up_writer}
        await asyncio.gather(
            self._pipe(reader, up_writer),
            self._pipe(up_reader, writer, self._flowing),
            return_exceptions=True,
        )

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        flowing: asyncio.Event | None = None,
    ) -> None:
        try:
            while data := await reader.read(65536):
                if flowing is not None:
                    await flowing.wait()
                writer.write(data)
                await writer.drain()
        finally:
            writer.transport.abort()


def _broker(
    amqp_url: str,
    exchange: str,
    confirm_timeout: timedelta = timedelta(seconds=5),
    **kwargs: object,
) -> _TrackedBroker:
    return _TrackedBroker(
        amqp_url,
        wire=WireFormat(exchange=exchange),
        confirm_timeout=confirm_timeout,
        reconnect_interval=timedelta(seconds=0.2),
        connection_name=exchange,
        **kwargs,
    )


class TestRabbitMQBroker(BrokerContract):
    """The contract, on quorum queues (the default)."""

    delivery_timeout = 5.0
    silence = 0.3  # a delivery on a local broker takes about a millisecond

    @pytest.fixture
    async def broker(
        self, amqp_url: str, unique_name: str, cleanup: set[str]
    ) -> AsyncIterator[_TrackedBroker]:
        broker = _broker(amqp_url, unique_name)
        await broker.connect()
        yield broker
        await broker.close()
        cleanup |= broker.declared


class TestRabbitMQBrokerClassicQueues(TestRabbitMQBroker):
    """The contract again on classic queues, which store and requeue unlike quorum queues."""

    @pytest.fixture
    async def broker(
        self, amqp_url: str, unique_name: str, cleanup: set[str]
    ) -> AsyncIterator[_TrackedBroker]:
        broker = _broker(amqp_url, unique_name, queue_type="classic")
        await broker.connect()
        yield broker
        await broker.close()
        cleanup |= broker.declared


# --- RabbitMQ only ------------------------------------------------------------------------


@pytest.fixture
async def broker(
    amqp_url: str, unique_name: str, cleanup: set[str]
) -> AsyncIterator[_TrackedBroker]:
    broker = _broker(amqp_url, unique_name)
    await broker.connect()
    yield broker
    await broker.close()
    cleanup |= broker.declared


async def test_wire_format_is_what_a_plain_aio_pika_consumer_reads(
    broker: _TrackedBroker, amqp_url: str, unique_name: str
) -> None:
    await broker.declare_queue(f"{unique_name}.wire", ["orders.#"])
    sent = make_envelope(
        "orders.created",
        {"id": 7, "city": "東京"},
        key="customer-42",
        headers={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
    )
    assert (await broker.publish([sent]))[0].confirmed

    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(f"{unique_name}.wire")
        got = await _get(queue)
        await got.ack()
    finally:
        await connection.close()

    assert got.exchange == unique_name
    assert got.routing_key == "orders.created"
    assert got.message_id == sent.message_id
    assert got.content_type == "application/json"
    assert got.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert got.body == sent.body
    assert got.headers[KEY_HEADER] == "customer-42"
    assert got.headers["traceparent"] == sent.headers["traceparent"]
    assert got.headers["cloudEvents:id"] == sent.message_id
    assert got.headers["cloudEvents:type"] == "orders.created"
    assert got.timestamp is not None
    assert int(got.timestamp.timestamp()) == int(sent.created_at.timestamp())


async def test_a_message_a_queue_refuses_comes_back_nacked(
    broker: _TrackedBroker, amqp_url: str, unique_name: str, cleanup: set[str]
) -> None:
    # Given a queue that rejects publishes once full (and it is full at length 0)
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        full = await channel.declare_queue(
            f"{unique_name}.full",
            durable=True,
            arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
        )
        cleanup.add(full.name)
        await full.bind(unique_name, "orders.#")
    finally:
        await connection.close()

    results = await broker.publish([make_envelope("orders.created")])

    assert results[0].outcome is PublishOutcome.NACKED
    assert results[0].reason


async def test_publish_during_a_forced_close_never_confirms_unacked_and_recovers(
    broker: _TrackedBroker, unique_name: str
) -> None:
    await broker.declare_queue(f"{unique_name}.q", ["orders.#"])
    pids = await asyncio.to_thread(_connection_pids, unique_name)

    # When RabbitMQ closes the connection while batches are being published
    closing = asyncio.ensure_future(asyncio.to_thread(_close_connections, pids))
    results: list[PublishResult] = []
    refused = False
    async with asyncio.timeout(20):
        while not refused and all(r.confirmed for r in results):
            try:
                results += await broker.publish(
                    [make_envelope("orders.created", n) for n in range(500)]
                )
            except BrokerError:
                refused = True  # noticed between batches: nothing of that batch was sent
    await closing

    # Then the interruption shows as FAILED results (or a refused batch), never as
    # NACKED/RETURNED, and nothing unconfirmed is reported confirmed
    outcomes = Counter(r.outcome for r in results)
    assert refused or outcomes[PublishOutcome.FAILED] > 0
    assert set(outcomes) <= {PublishOutcome.CONFIRMED, PublishOutcome.FAILED}
    # And after the robust reconnect, publishing works again
    assert await broker.wait_connected(timeout=10)
    again = await broker.publish([make_envelope("orders.created", "after")])
    assert again[0].outcome is PublishOutcome.CONFIRMED
    # And every message reported confirmed really is in the queue
    confirmed = {r.message_id for r in results if r.confirmed}
    received: set[str] = set()
    async with aclosing(broker.consume(f"{unique_name}.q", prefetch=1000)) as deliveries:
        while True:
            delivery = await asyncio.wait_for(anext(deliveries), 5)
            await delivery.ack()
            if JSON.decode(delivery.envelope.body) == "after":
                break
            received.add(delivery.envelope.message_id)
    assert confirmed <= received


async def test_during_an_outage_publish_raises_broker_error_and_wait_connected_waits(
    amqp_url: str, unique_name: str, cleanup: set[str]
) -> None:
    # Given a broker that reaches RabbitMQ through a proxy the test can cut
    # (rabbitmqctl alone cannot hold an outage open: the reconnect takes milliseconds)
    async with _CuttableProxy(amqp_url) as proxy:
        broker = _broker(proxy.url, unique_name)
        await broker.connect()
        try:
            await broker.declare_queue(f"{unique_name}.q", ["orders.#"])
            cleanup |= broker.declared
            # When the network goes away
            proxy.cut()
            await _wait_until(lambda: not broker.connected)
            # Then publishing refuses up front, and waiting for the connection times out
            with pytest.raises(BrokerError, match="not connected"):
                await broker.publish([make_envelope("orders.created")])
            assert await broker.wait_connected(timeout=0.3) is False
            # And once it is back, the robust connection returns and publishing works
            proxy.restore()
            assert await broker.wait_connected(timeout=10)
            assert (await broker.publish([make_envelope("orders.created")]))[0].confirmed
        finally:
            await broker.close()


async def test_a_batch_without_confirms_fails_after_one_confirm_timeout_and_publishing_goes_on(
    amqp_url: str, unique_name: str, cleanup: set[str]
) -> None:
    # Given a broker whose confirms stop arriving (the connection itself stays up)
    async with _CuttableProxy(amqp_url) as proxy:
        broker = _broker(proxy.url, unique_name, confirm_timeout=timedelta(seconds=1))
        await broker.connect()
        try:
            await broker.declare_queue(f"{unique_name}.q", ["orders.#"])
            cleanup |= broker.declared
            proxy.hold()

            # When a batch is published
            started = time.monotonic()
            results = await broker.publish([make_envelope("orders.created", n) for n in range(200)])
            elapsed = time.monotonic() - started

            # Then the whole batch ends FAILED after one deadline, none reported confirmed
            assert {(r.outcome, r.reason) for r in results} == {
                (PublishOutcome.FAILED, "no confirm within 1s")
            }
            assert 0.9 < elapsed < 3
            # And once confirms flow again, the late ones are ignored and publishing works
            proxy.release()
            assert (await broker.publish([make_envelope("orders.created")]))[0].confirmed
        finally:
            await broker.close()


async def test_an_envelope_that_cannot_be_framed_fails_alone(
    broker: _TrackedBroker, unique_name: str
) -> None:
    # Given a batch with one envelope whose headers are not a table (a damaged row)
    await broker.declare_queue(f"{unique_name}.q", ["orders.#"])
    damaged = replace(make_envelope("orders.created"), headers=["not", "a", "table"])  # type: ignore[arg-type]
    batch = [make_envelope("orders.created", 1), damaged, make_envelope("orders.created", 2)]

    results = await broker.publish(batch)

    # Then it ends FAILED with the reason, and the others are confirmed
    assert [r.message_id for r in results] == [e.message_id for e in batch]
    assert [r.outcome for r in results] == [
        PublishOutcome.CONFIRMED,
        PublishOutcome.FAILED,
        PublishOutcome.CONFIRMED,
    ]
    assert "AMQP properties" in str(results[1].reason)


async def test_consumer_survives_a_forced_close_and_stale_deliveries_cannot_be_settled(
    broker: _TrackedBroker, unique_name: str
) -> None:
    # Given a delivery taken but not acknowledged
    await broker.declare_queue(f"{unique_name}.q", ["orders.#"])
    sent = make_envelope("orders.created")
    await broker.publish([sent])
    async with aclosing(broker.consume(f"{unique_name}.q")) as deliveries:
        taken = await asyncio.wait_for(anext(deliveries), 5)
        # When RabbitMQ closes the connection
        await _force_close_connection(unique_name)
        # Then the same generator gets the message again after the reconnect
        again = await asyncio.wait_for(anext(deliveries), 10)
        assert again.envelope.message_id == sent.message_id
        assert again.redelivered is True
        # and the delivery from the dead channel cannot be acknowledged
        with pytest.raises(BrokerError, match="deliver the message again"):
            await taken.ack()
        await again.ack()


async def test_malformed_messages_are_rejected_and_consuming_goes_on(
    broker: _TrackedBroker, amqp_url: str, unique_name: str, cleanup: set[str]
) -> None:
    # Given a queue with a dead-letter queue, holding two raw messages that are not
    # envelopes before a valid one (declared here: declare_queue has no dead-letter
    # arguments). aiormq fills in a random message_id when a publish has none, so a
    # message without one cannot be sent from Python; a bad id stands in for it.
    queue, dead = f"{unique_name}.q", f"{unique_name}.dead"
    cleanup |= {queue, dead}
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        dlq = await channel.declare_queue(dead, durable=True)
        q = await channel.declare_queue(
            queue,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": dead,
            },
        )
        await q.bind(unique_name, "orders.#")
        exchange = await channel.get_exchange(unique_name)
        await exchange.publish(aio_pika.Message(b"no content type"), "orders.created")
        await exchange.publish(
            aio_pika.Message(b"{}", message_id="not-a-uuid", content_type="application/json"),
            "orders.created",
        )
        valid = make_envelope("orders.created", 1)
        await broker.publish([valid])

        # When a consumer reads the queue
        with structlog.testing.capture_logs() as logs:
            async with aclosing(broker.consume(queue)) as deliveries:
                delivery = await asyncio.wait_for(anext(deliveries), 5)
                await delivery.ack()

        # Then it yields the valid message; the others went to the dead letters, logged
        assert delivery.envelope.message_id == valid.message_id
        rejected = [await _get(dlq) for _ in range(2)]
        for message in rejected:
            await message.ack()
        assert [m.body for m in rejected] == [b"no content type", b"{}"]
    finally:
        await connection.close()
    warnings = [e for e in logs if e["event"] == "malformed message rejected"]
    assert [w["log_level"] for w in warnings] == ["warning", "warning"]
    assert all(w["queue"] == queue for w in warnings)
    assert "content_type" in warnings[0]["reason"]
    assert warnings[1]["message_id"] == "not-a-uuid"


async def test_consume_ends_with_broker_error_when_the_queue_is_deleted(
    broker: _TrackedBroker, unique_name: str, amqp_url: str
) -> None:
    await broker.declare_queue(f"{unique_name}.doomed", ["orders.#"])
    await broker.publish([make_envelope("orders.created")])
    async with aclosing(broker.consume(f"{unique_name}.doomed")) as deliveries:
        await (await asyncio.wait_for(anext(deliveries), 5)).ack()  # the consumer is running
        connection = await aio_pika.connect(amqp_url)
        try:
            channel = await connection.channel()
            await channel.queue_delete(f"{unique_name}.doomed")
        finally:
            await connection.close()
        with pytest.raises(BrokerError, match="deleted"):
            await asyncio.wait_for(anext(deliveries), 5)


async def test_deliveries_stay_settleable_after_the_generator_is_closed(
    broker: _TrackedBroker,
    unique_name: str,
) -> None:
    # A worker stops taking messages on shutdown but finishes the ones in hand.
    await broker.declare_queue(f"{unique_name}.q", ["orders.#"])
    await broker.publish([make_envelope("orders.created", n) for n in range(3)])
    async with aclosing(broker.consume(f"{unique_name}.q", prefetch=3)) as deliveries:
        held = await asyncio.wait_for(anext(deliveries), 5)
    await held.ack()

    async with aclosing(broker.consume(f"{unique_name}.q")) as deliveries:
        rest = [await asyncio.wait_for(anext(deliveries), 5) for _ in range(2)]
        for delivery in rest:
            await delivery.ack()
    assert [JSON.decode(d.envelope.body) for d in rest] == [1, 2]


async def test_declaring_a_queue_with_another_queue_type_raises_broker_error(
    broker: _TrackedBroker, amqp_url: str, unique_name: str, cleanup: set[str]
) -> None:
    await broker.declare_queue(f"{unique_name}.q", ["orders.#"])
    classic = _broker(amqp_url, unique_name, queue_type="classic")
    await classic.connect()
    try:
        with pytest.raises(BrokerError, match="queue_type"):
            await classic.declare_queue(f"{unique_name}.q", ["orders.#"])
        assert classic.connected  # the failed declaration did not break the connection
    finally:
        await classic.close()


async def test_connect_refuses_an_exchange_of_another_type(
    amqp_url: str, unique_name: str, cleanup: set[str]
) -> None:
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        await channel.declare_exchange(unique_name, aio_pika.ExchangeType.DIRECT, durable=True)
    finally:
        await connection.close()
    broker = _broker(amqp_url, unique_name)
    with pytest.raises(BrokerError, match="durable topic exchange"):
        await broker.connect()
    assert not broker.connected


async def test_connect_error_does_not_show_the_password(unique_name: str) -> None:
    broker = RabbitMQBroker(
        "amqp://guest:s3cret-pw@127.0.0.1:1/", confirm_timeout=timedelta(seconds=2)
    )
    with pytest.raises(BrokerError) as info:
        await broker.connect()
    assert "s3cret-pw" not in str(info.value)
    assert "***" in str(info.value)
    assert not broker.connected
    assert await broker.wait_connected(timeout=0.1) is False


async def test_wrong_password_error_does_not_show_the_password(amqp_url: str) -> None:
    wrong = amqp_url.replace("guest:guest@", "guest:s3cret-pw@")
    broker = RabbitMQBroker(wrong, confirm_timeout=timedelta(seconds=5))
    with pytest.raises(BrokerError) as info:
        await broker.connect()
    assert "s3cret-pw" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"url": "http://host/"}, "amqp://"),
        ({"url": ""}, "url"),
        ({"confirm_timeout": timedelta(0)}, "confirm_timeout"),
        ({"queue_type": "stream"}, "queue_type"),
        ({"connection_name": ""}, "connection_name"),
        ({"wire": WireFormat(exchange="")}, "exchange"),
    ],
)
def test_constructor_rejects_bad_arguments_without_io(
    kwargs: dict[str, object], match: str
) -> None:
    arguments: dict[str, object] = {"url": "amqp://guest:guest@127.0.0.1:5672/", **kwargs}
    with pytest.raises(ConfigurationError, match=match):
        RabbitMQBroker(**arguments)  # type: ignore[arg-type]


async def test_bad_url_error_hides_the_password() -> None:
    with pytest.raises(ConfigurationError) as info:
        RabbitMQBroker("http://user:s3cret-pw@host/")
    assert "s3cret-pw" not in str(info.value)


async def test_publish_before_connect_raises_broker_error() -> None:
    broker = RabbitMQBroker("amqp://guest:guest@127.0.0.1:5672/")
    with pytest.raises(BrokerError, match="connect"):
        await broker.publish([make_envelope("orders.created")])
