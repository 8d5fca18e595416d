"""``outbox demo`` on the real services: the same story on PostgreSQL and RabbitMQ."""

from __future__ import annotations

import io

from demo_support import EXPECTED, summary_of

from outbox.demo import run_demo


def test_demo_tells_the_same_story_on_postgresql_and_rabbitmq(pg_url: str, amqp_url: str) -> None:
    out = io.StringIO()
    summary = run_demo(pg_url, amqp_url, pace=0, stream=out)
    text = out.getvalue()
    assert "schema outbox_demo" in text
    assert summary_of(text) == EXPECTED, text
    assert summary.published == EXPECTED["messages published by the relay"]


def test_demo_runs_again_from_a_clean_slate(pg_url: str, amqp_url: str) -> None:
    """A second run drops what the first left (schema, queues) and counts the same."""
    out = io.StringIO()
    run_demo(pg_url, amqp_url, pace=0, stream=out)
    assert summary_of(out.getvalue()) == EXPECTED
