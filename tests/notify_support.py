"""What the notify tests share: a partner endpoint, a config file, a way to send messages.

Named like a test module so that it sits next to them; it holds no tests itself.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aio_pika

from consumer.config import DEFAULT_RETRY_TIERS
from consumer.notify import verify
from outbox.envelope import Envelope, WireFormat

SECRET = "partner-secret-0123456789abcdef"
TOKEN = "service-token-0123456789abcdef"


@dataclass
class Call:
    """One request the partner received, and what it answered."""

    message_id: str
    attempt: int
    at: float
    """time.time() when the request arrived."""
    body: dict[str, Any]
    headers: dict[str, str]
    signature_valid: bool
    answer: int = 0


@dataclass
class Partner:
    """A partner's HTTP endpoint in a thread: ``answer(message_id, attempt)`` says the status.

    ``hang`` (seconds) delays each answer for which ``slow(message_id, attempt)`` is true.
    """

    answer: Callable[[str, int], int] = lambda message_id, attempt: 200
    slow: Callable[[str, int], bool] = lambda message_id, attempt: False
    hang: float = 0.0
    calls: list[Call] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        partner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                call = Call(
                    message_id=headers["x-outbox-message-id"],
                    attempt=int(headers["x-outbox-attempt"]),
                    at=time.time(),
                    body=json.loads(raw),
                    headers=headers,
                    signature_valid=verify(
                        SECRET,
                        raw,
                        timestamp=headers.get("x-outbox-timestamp"),
                        signature=headers.get("x-outbox-signature"),
                    ),
                )
                if partner.slow(call.message_id, call.attempt):
                    time.sleep(partner.hang)
                call.answer = partner.answer(call.message_id, call.attempt)
                with partner.lock:
                    partner.calls.append(call)
                body = b'{"ok": true}' if call.answer < 300 else b"partner says no"
                try:
                    self.send_response(call.answer)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except ConnectionError:
                    pass  # the caller timed out and hung up

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks"

    def calls_of(self, message_id: str) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if c.message_id == message_id]

    def delivered(self, message_id: str) -> int:
        """How many calls of ``message_id`` the partner answered 2xx."""
        return sum(1 for c in self.calls_of(message_id) if 200 <= c.answer < 300)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(
    path: Path,
    *,
    name: str,
    subscriptions: list[dict[str, Any]],
    api_port: int = 0,
    **service: Any,
) -> Path:
    """Write a notify TOML file: exchange and queue prefix ``name``, classic queues."""
    settings = {
        "exchange": name,
        "queue_prefix": name,
        "queue_type": "classic",
        "api_port": api_port,
        "poll_interval": "50ms",
        "shutdown_timeout": "3s",
        **service,
    }
    lines = [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    for sub in subscriptions:
        lines.append("[[subscription]]")
        values = {"secret_env": "PARTNER_SECRET", **sub}
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def environment() -> dict[str, str]:
    return {"PARTNER_SECRET": SECRET, "OUTBOX_NOTIFY_TOKEN": TOKEN}


async def send(
    amqp_url: str,
    exchange: str,
    topic: str,
    payload: Any,
    *,
    key: str | None = None,
    message_id: str | None = None,
) -> str:
    """Publish one message as the relay would (declaring the exchange); return its id."""
    envelope = Envelope(
        message_id=message_id or str(uuid.uuid4()),
        topic=topic,
        key=key,
        body=json.dumps(payload).encode(),
        content_type="application/json",
        created_at=datetime.now(UTC),
    )
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        props = envelope.amqp_properties(WireFormat(exchange=exchange))
        await ex.publish(aio_pika.Message(envelope.body, **props), routing_key=topic)
    return envelope.message_id


async def delete_topology(amqp_url: str, name: str, group: str = "notify") -> None:
    """Remove the queues a notify consumer group declared, and the exchange."""
    queue = f"{name}.{group}"
    names = [
        queue,
        f"{queue}.dead",
        f"{queue}.ordered",
        *(f"{queue}.retry.{int(t / timedelta(milliseconds=1))}ms" for t in DEFAULT_RETRY_TIERS),
    ]
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for q in names:
            await channel.queue_delete(q)
        await channel.exchange_delete(name)
