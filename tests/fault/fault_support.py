"""What the fault tests share: queues they declare and drain, and rabbitmqctl."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import aio_pika


async def drain(amqp_url: str, queue_name: str) -> list[tuple[str, dict[str, object]]]:
    """Read every message in the queue: (message id, payload with its key)."""
    connection = await aio_pika.connect(amqp_url)
    received: list[tuple[str, dict[str, object]]] = []
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        queue = await channel.get_queue(queue_name)
        async with queue.iterator() as messages:
            while True:
                try:
                    message = await asyncio.wait_for(anext(messages), 2.0)
                except TimeoutError:
                    break
                body = json.loads(message.body)
                body["key"] = (message.headers or {}).get("x-outbox-key")
                received.append((str(message.message_id), body))
                await message.ack()
    return received


async def declare(amqp_url: str, exchange: str, queue: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        # Durable classic queue: it and its persistent messages survive a broker restart.
        q = await channel.declare_queue(queue, durable=True)
        await q.bind(ex, "#")


async def delete(amqp_url: str, exchange: str, queue: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(queue)
        await channel.exchange_delete(exchange)


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, timeout=120, capture_output=True)


def start_relay(
    *,
    database_url: str,
    amqp_url: str,
    exchange: str,
    name: str,
    log_dir: Path,
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``outbox relay`` as a real process, with settings for fast fault recovery."""
    env = {
        **os.environ,
        "OUTBOX_DATABASE_URL": database_url,
        "OUTBOX_AMQP_URL": amqp_url,
        "OUTBOX_EXCHANGE": exchange,
        "OUTBOX_RELAY_ID": name,
        "OUTBOX_LEASE": "4s",
        "OUTBOX_CONFIRM_TIMEOUT": "3s",
        "OUTBOX_RETRY_BASE": "100ms",
        "OUTBOX_RETRY_MAX": "1s",
        "OUTBOX_MAX_ATTEMPTS": "1000",
        "OUTBOX_BATCH_SIZE": "200",
        "OUTBOX_LOG_FORMAT": "json",
        **(extra_env or {}),
    }
    log = (log_dir / f"{name}.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "outbox", "relay"], env=env, stdout=log, stderr=log
    )
