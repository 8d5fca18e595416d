"""Remote check-back: a relay without the producer's code asks it back over signed HTTP.

The producer's ``CheckbackServer`` answers only requests signed with the shared
secret and fresh; its answers are signed too, and the relay's ``RemoteCheckbacks``
accepts nothing else. End to end, a prepared message whose producer went quiet
is committed or discarded by what the producer's endpoint says, and a relay with
the wrong secret decides nothing: the message stays prepared, checked again.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import structlog
from click.testing import CliRunner
from waiting import wait_for

import outbox
from outbox.checkback_server import (
    MAX_BODY,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    CheckbackServer,
    digest_of,
    encode_request,
    sign,
    signature_matches,
)
from outbox.errors import ConfigurationError, OutboxError
from outbox.memory_broker import InMemoryBroker
from relay import Relay, RelayConfig
from relay.cli import relay as relay_command
from relay.remote_checkback import RemoteCheckbacks

SECRET = "test-secret-0123456789abcdef"
TOPIC = "payments.captured"


def a_message(topic: str = TOPIC, **changes: Any) -> outbox.Message:
    fields: dict[str, Any] = {
        "message_id": "0190d1a4-6c1e-7b3a-8f00-000000000001",
        "topic": topic,
        "key": "order-7",
        "payload": {"amount": 700, "currency": "EUR", "card": "4111-secret"},
        "headers": {"traceparent": "00-abc-def-01", "attempt": 2},
        "created_at": datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC),
    }
    return outbox.Message(**{**fields, **changes})


@pytest.fixture
def producer(sqlite_engine: sa.Engine) -> outbox.Outbox:
    """A producer's Outbox whose check-backs answer what each test sets in ``answers``."""
    return outbox.Outbox(sqlite_engine)


@pytest.fixture
async def server(producer: outbox.Outbox) -> AsyncIterator[CheckbackServer]:
    async with CheckbackServer(producer, secret=SECRET, port=0) as s:
        yield s


async def post(
    url: str,
    body: bytes,
    *,
    secret: str = SECRET,
    skew: int = 0,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """POST ``body`` signed like the relay signs it; ``headers`` override the signed ones."""
    ts = str(int(time.time()) + skew)
    signed = {TIMESTAMP_HEADER: ts, SIGNATURE_HEADER: sign(secret, ts, body)}
    final = {k: v for k, v in {**signed, **(headers or {})}.items() if v}
    async with httpx.AsyncClient() as client:
        return await client.post(url, content=body, headers=final)


# -- the producer's endpoint --------------------------------------------------------------


async def test_a_signed_request_gets_the_sync_check_backs_verdict_run_off_the_loop(
    producer: outbox.Outbox, server: CheckbackServer
) -> None:
    seen: list[tuple[outbox.Message, str]] = []

    @producer.checkback("payments.*")
    def check(message: outbox.Message) -> outbox.Verdict:
        seen.append((message, threading.current_thread().name))
        return outbox.Verdict.ROLLBACK

    sent = a_message()
    response = await post(server.url, encode_request(sent))

    assert response.status_code == 200
    assert response.json() == {"verdict": "rollback"}
    [(received, thread)] = seen
    assert received == sent  # id, topic, key, decoded payload, headers, created_at
    assert thread != threading.main_thread().name  # a blocking check-back never stalls the loop


async def test_an_async_check_back_is_awaited(
    producer: outbox.Outbox, server: CheckbackServer
) -> None:
    @producer.checkback(TOPIC)
    async def check(message: outbox.Message) -> outbox.Verdict:
        await asyncio.sleep(0)
        return outbox.Verdict.COMMIT if message.payload["amount"] == 700 else outbox.Verdict.UNKNOWN

    response = await post(server.url, encode_request(a_message()))

    assert (response.status_code, response.json()) == (200, {"verdict": "commit"})


async def test_the_answer_is_signed_and_bound_to_its_request(
    producer: outbox.Outbox, server: CheckbackServer
) -> None:
    producer.checkback(TOPIC)(lambda m: outbox.Verdict.UNKNOWN)
    body = encode_request(a_message())
    ts = str(int(time.time()))
    request_signature = sign(SECRET, ts, body)

    response = await post(
        server.url, body, headers={TIMESTAMP_HEADER: ts, SIGNATURE_HEADER: request_signature}
    )

    answer_signature = response.headers[SIGNATURE_HEADER]
    assert signature_matches(
        SECRET, digest_of(request_signature), response.content, answer_signature
    )
    other_request = digest_of(sign(SECRET, ts, body + b" "))
    assert not signature_matches(SECRET, other_request, response.content, answer_signature)


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param({"secret": "another-secret-0123456789"}, id="wrong-secret"),
        pytest.param({"headers": {SIGNATURE_HEADER: ""}}, id="missing-signature"),
        pytest.param({"headers": {TIMESTAMP_HEADER: ""}}, id="missing-timestamp"),
        pytest.param({"headers": {SIGNATURE_HEADER: "v1=00ff"}}, id="garbage-signature"),
        pytest.param({"skew": -310}, id="stale-timestamp"),
        pytest.param({"skew": +310}, id="future-timestamp"),
        pytest.param({"headers": {TIMESTAMP_HEADER: "12.5"}}, id="non-integer-timestamp"),
    ],
)
async def test_an_unsigned_wrongly_signed_or_stale_request_gets_401_and_no_check_back(
    producer: outbox.Outbox, server: CheckbackServer, tamper: dict[str, Any]
) -> None:
    calls: list[outbox.Message] = []
    producer.checkback("#")(lambda m: calls.append(m) or outbox.Verdict.COMMIT)

    response = await post(server.url, encode_request(a_message()), **tamper)

    assert response.status_code == 401
    assert response.json()["verdict"] == "unknown"
    assert SIGNATURE_HEADER not in response.headers
    assert calls == []


async def test_a_body_changed_after_signing_gets_401(
    producer: outbox.Outbox, server: CheckbackServer
) -> None:
    producer.checkback("#")(lambda m: outbox.Verdict.COMMIT)
    ts = str(int(time.time()))
    signature = sign(SECRET, ts, encode_request(a_message()))
    forged = encode_request(a_message(payload={"amount": 1}))

    response = await post(
        server.url, forged, headers={TIMESTAMP_HEADER: ts, SIGNATURE_HEADER: signature}
    )

    assert response.status_code == 401


async def test_a_topic_without_a_check_back_gets_404(
    producer: outbox.Outbox, server: CheckbackServer
) -> None:
    producer.checkback("orders.*")(lambda m: outbox.Verdict.COMMIT)

    response = await post(server.url, encode_request(a_message()))

    assert response.status_code == 404
    assert response.json() == {"verdict": "unknown", "error": "no check-back for topic"}


async def test_a_raising_check_back_gets_500_and_is_logged_without_payload_or_secret(
    producer: outbox.Outbox,
) -> None:
    @producer.checkback(TOPIC)
    def check(message: outbox.Message) -> outbox.Verdict:
        raise RuntimeError("payments database is down")

    with structlog.testing.capture_logs() as logs:
        async with CheckbackServer(producer, secret=SECRET, port=0) as server:
            response = await post(server.url, encode_request(a_message()))

    assert response.status_code == 500
    assert response.json() == {
        "verdict": "unknown",
        "error": "check-back raised RuntimeError: payments database is down",
    }
    [failed] = [e for e in logs if e["event"] == "checkback_server.checkback_failed"]
    assert failed["message_id"] == a_message().message_id
    assert failed["topic"] == TOPIC
    assert "4111-secret" not in repr(logs)  # the payload's content
    assert SECRET not in repr(logs)


async def test_a_check_back_returning_a_non_verdict_gets_500(
    producer: outbox.Outbox, server: CheckbackServer
) -> None:
    producer.checkback(TOPIC)(lambda m: "maybe")

    response = await post(server.url, encode_request(a_message()))

    assert response.status_code == 500
    assert "not a Verdict" in response.json()["error"]


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[1, 2]", b'{"topic": "payments.captured"}', b"\xff\xfe"],
    ids=["not-json", "not-an-object", "missing-fields", "not-utf8"],
)
async def test_a_signed_but_malformed_body_gets_400(
    producer: outbox.Outbox, server: CheckbackServer, body: bytes
) -> None:
    producer.checkback("#")(lambda m: outbox.Verdict.COMMIT)

    response = await post(server.url, body)

    assert response.status_code == 400
    assert response.json()["verdict"] == "unknown"


async def test_wrong_path_wrong_method_and_oversized_body_are_refused(
    server: CheckbackServer,
) -> None:
    async with httpx.AsyncClient() as client:
        assert (await client.post(server.url + "x", content=b"{}")).status_code == 404
        assert (await client.get(server.url)).status_code == 405

    # Announce a body over the limit: the server answers before reading any of it.
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    head = f"POST /outbox/checkback HTTP/1.1\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n"
    writer.write(head.encode())
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 413")


def test_the_server_refuses_a_short_secret_and_does_no_io_before_start(
    producer: outbox.Outbox,
) -> None:
    with pytest.raises(ConfigurationError, match="at least 16 characters"):
        CheckbackServer(producer, secret="short")
    idle = CheckbackServer(producer, secret=SECRET, port=1)  # port 1 is never bound here
    with pytest.raises(RuntimeError, match="not started"):
        _ = idle.port


# -- the relay's client against the producer's endpoint ------------------------------------


def test_the_first_matching_pattern_names_the_endpoint() -> None:
    remote = RemoteCheckbacks(
        {"payments.refunded": "http://a/", "payments.*": "http://b/", "#": "http://c/"},
        secret=SECRET,
        timeout=timedelta(seconds=1),
    )
    assert remote.find("payments.refunded") == "http://a/"
    assert remote.find("payments.captured") == "http://b/"
    assert remote.find("orders.created") == "http://c/"
    assert RemoteCheckbacks({}, secret=SECRET, timeout=timedelta(1)).find("x") is None


@pytest.mark.parametrize("verdict", list(outbox.Verdict))
async def test_ask_returns_the_producers_verdict(
    producer: outbox.Outbox, server: CheckbackServer, verdict: outbox.Verdict
) -> None:
    producer.checkback("payments.*")(lambda m: verdict)
    remote = RemoteCheckbacks({"payments.*": server.url}, secret=SECRET, timeout=timedelta(5))
    try:
        assert await remote.ask(server.url, a_message()) is verdict
        assert await remote.ask(server.url, a_message()) is verdict  # the client is reused
    finally:
        await remote.close()


async def test_ask_with_another_secret_raises_saying_401(
    producer: outbox.Outbox, server: CheckbackServer
) -> None:
    producer.checkback("#")(lambda m: outbox.Verdict.COMMIT)
    remote = RemoteCheckbacks({}, secret="not-the-producers-secret", timeout=timedelta(5))
    try:
        with pytest.raises(OutboxError, match="HTTP 401: bad signature"):
            await remote.ask(server.url, a_message())
    finally:
        await remote.close()


async def test_ask_of_an_unreachable_endpoint_raises_with_the_url_redacted() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()  # nothing listens on this port any more
    url = f"http://ops:hunter2hunter2@127.0.0.1:{port}/outbox/checkback"
    remote = RemoteCheckbacks({}, secret=SECRET, timeout=timedelta(seconds=2))
    try:
        with pytest.raises(OutboxError, match="ConnectError") as raised:
            await remote.ask(url, a_message())
    finally:
        await remote.close()
    assert "hunter2hunter2" not in str(raised.value)
    assert f"ops:***@127.0.0.1:{port}" in str(raised.value)


async def test_an_unsigned_answer_is_not_believed() -> None:
    """A forged ``rollback`` would discard a committed message: only signed answers count."""

    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = b'{"verdict": "rollback"}'
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    fake = await asyncio.start_server(impostor, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{fake.sockets[0].getsockname()[1]}/outbox/checkback"
    remote = RemoteCheckbacks({}, secret=SECRET, timeout=timedelta(seconds=2))
    try:
        with pytest.raises(OutboxError, match="without a valid X-Outbox-Signature"):
            await remote.ask(url, a_message())
    finally:
        await remote.close()
        fake.close()
        await fake.wait_closed()


# -- configuration and the command line ----------------------------------------------------


def test_remote_check_backs_need_a_secret_valid_patterns_and_http_urls() -> None:
    def config(**kw: Any) -> RelayConfig:
        return RelayConfig(database_url="sqlite:///x.db", **kw)

    with pytest.raises(ConfigurationError, match="checkback_secret"):
        config(remote_checkbacks={"payments.*": "http://p/"}).validate()
    with pytest.raises(ConfigurationError, match="pattern"):
        config(remote_checkbacks={"payments..*": "http://p/"}, checkback_secret=SECRET).validate()
    with pytest.raises(ConfigurationError, match="http"):
        config(remote_checkbacks={"payments.*": "ftp://p/"}, checkback_secret=SECRET).validate()
    config(remote_checkbacks={"payments.*": "https://p/cb"}, checkback_secret=SECRET).validate()
    config().validate()  # no remote check-backs: no secret needed


def test_the_secret_and_url_passwords_never_show_in_logs_or_repr() -> None:
    cfg = RelayConfig(
        database_url="sqlite:///x.db",
        remote_checkbacks={"payments.*": "https://relay:pw-in-url@payments/cb"},
        checkback_secret=SECRET,
    )
    public = cfg.public()
    assert public["checkback_secret"] == "***"
    assert public["remote_checkbacks"] == {"payments.*": "https://relay:***@payments/cb"}
    assert SECRET not in repr(cfg)
    assert SECRET not in str(public)
    assert "pw-in-url" not in str(public)


def test_the_cli_reads_the_secret_from_the_named_environment_variable() -> None:
    runner = CliRunner()
    args = ["--database-url", "sqlite:///unused.db", "--remote-checkback", "payments.*=http://p/"]

    missing = runner.invoke(relay_command, args, env={"OUTBOX_CHECKBACK_SECRET": None})
    assert missing.exit_code == 2
    assert "$OUTBOX_CHECKBACK_SECRET" in missing.output

    malformed = runner.invoke(
        relay_command,
        ["--database-url", "sqlite:///unused.db"],
        env={"OUTBOX_REMOTE_CHECKBACK": "payments.*=http://p/ orders.*", "MY_SECRET": SECRET},
    )
    assert malformed.exit_code == 2
    assert "TOPIC_PATTERN=URL" in malformed.output

    too_short = runner.invoke(
        relay_command, [*args, "--checkback-secret-env", "MY_SECRET"], env={"MY_SECRET": "short"}
    )
    assert too_short.exit_code == 2
    assert "at least 16 characters" in too_short.output
    assert "short" not in too_short.output.replace("at least", "")


# -- end to end: a relay without the producer's code --------------------------------------

FAST = {
    "poll_min": timedelta(milliseconds=1),
    "poll_max": timedelta(milliseconds=20),
    "check_interval": timedelta(milliseconds=20),
    "check_retry_base": timedelta(milliseconds=30),
    "check_retry_max": timedelta(milliseconds=100),
    "max_checks": 1000,
    "check_timeout": timedelta(seconds=3),
    "shutdown_timeout": timedelta(seconds=5),
}


def remote_relay(engine: sa.Engine, broker: InMemoryBroker, url: str, secret: str) -> Relay:
    """A relay with no --app: only the producer's endpoint can answer its check-backs."""
    config = RelayConfig(
        database_url=engine.url.render_as_string(hide_password=False),
        remote_checkbacks={"payments.*": url},
        checkback_secret=secret,
        **FAST,
    )
    return Relay(config, broker=broker)


def row(engine: sa.Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        found = conn.execute(sa.text("SELECT status, checks, last_error FROM outbox_message"))
        return dict(found.mappings().one())


@pytest.mark.parametrize(
    ("verdict", "final"),
    [(outbox.Verdict.COMMIT, "published"), (outbox.Verdict.ROLLBACK, "discarded")],
)
async def test_a_quiet_producers_half_message_is_resolved_by_its_endpoint(
    engine: sa.Engine, broker: InMemoryBroker, verdict: outbox.Verdict, final: str
) -> None:
    # Given a producer that prepared a message and never committed or rolled it back
    ob = outbox.Outbox(engine)
    asked: list[str] = []

    @ob.checkback("payments.*")
    def check(message: outbox.Message) -> outbox.Verdict:
        asked.append(message.message_id)
        return verdict

    half = ob.prepare(TOPIC, {"amount": 700}, key="order-7", check_after=timedelta(0))

    # When a relay that runs none of its code asks its endpoint
    async with (
        CheckbackServer(ob, secret=SECRET, port=0) as server,
        remote_relay(engine, broker, server.url, SECRET) as relay,
    ):
        await wait_for(lambda: row(engine)["status"] == final)
        if final == "published":
            await wait_for(lambda: len(broker.published) == 1)

    # Then the producer's answer decides, exactly once
    assert asked == [half.message_id]
    assert relay.metrics.checks.labels(result=verdict.value)._value.get() == 1
    assert [e.message_id for e in broker.published] == (
        [half.message_id] if final == "published" else []
    )


async def test_a_relay_with_the_wrong_secret_decides_nothing_and_keeps_asking(
    engine: sa.Engine, broker: InMemoryBroker
) -> None:
    ob = outbox.Outbox(engine)
    ob.checkback("payments.*")(lambda m: outbox.Verdict.ROLLBACK)
    half = ob.prepare(TOPIC, {"amount": 700}, check_after=timedelta(0))

    async with (
        CheckbackServer(ob, secret=SECRET, port=0) as server,
        remote_relay(engine, broker, server.url, "a-secret-the-producer-never-saw") as relay,
    ):
        await wait_for(lambda: row(engine)["checks"] >= 3)
        errors = relay.metrics.checks.labels(result="error")._value.get()

    state = row(engine)
    assert state["status"] == "prepared"
    assert "401" in state["last_error"]
    assert errors >= 3
    assert broker.published == []
    half.rollback()  # the producer can still decide: nothing was decided for it


async def test_a_local_check_back_wins_over_a_remote_one(
    sqlite_engine: sa.Engine, broker: InMemoryBroker
) -> None:
    ob = outbox.Outbox(sqlite_engine)
    ob.checkback("payments.*")(lambda m: outbox.Verdict.ROLLBACK)
    ob.prepare(TOPIC, {"amount": 700}, check_after=timedelta(0))
    # Nothing listens at the remote URL: only the local check-back can answer.
    config = RelayConfig(
        database_url=sqlite_engine.url.render_as_string(hide_password=False),
        remote_checkbacks={"#": "http://127.0.0.1:9/outbox/checkback"},
        checkback_secret=SECRET,
        **FAST,
    )

    async with Relay(config, broker=broker, app=ob):
        await wait_for(lambda: row(sqlite_engine)["status"] == "discarded")
