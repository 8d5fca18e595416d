"""Logs are structured JSON lines for daemons, and URLs never carry a password into them."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
import structlog

from outbox.logs import configure_logging, get_logger, redact_url

# --- redact_url -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp://guest:guest@localhost:5672/", "amqp://guest:***@localhost:5672/"),
        ("amqps://app:s3cr%2Fet@mq.example.com/prod", "amqps://app:***@mq.example.com/prod"),
        (
            "postgresql+psycopg://billing:hunter2@db.internal:6432/billing?sslmode=require",
            "postgresql+psycopg://billing:***@db.internal:6432/billing?sslmode=require",
        ),
        ("postgresql://u:p@[::1]:5432/db", "postgresql://u:***@[::1]:5432/db"),
        ("postgresql://u:p@[2001:db8::7]/db", "postgresql://u:***@[2001:db8::7]/db"),
        ("amqp://:token@broker/", "amqp://:***@broker/"),
        ("amqp://u:p@ss:w@rd@broker/", "amqp://u:***@broker/"),  # unencoded '@' in the password
    ],
    ids=["amqp", "amqps", "postgresql-port-query", "ipv6", "ipv6-no-port", "no-user", "at-sign"],
)
def test_password_in_url_is_replaced_and_the_rest_kept(url: str, expected: str) -> None:
    assert redact_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "amqp://localhost/",
        "amqp://guest@localhost:5672/%2F",
        "postgresql+psycopg://postgres@127.0.0.1:5432/test",
        "sqlite:///var/lib/outbox.db",
        "postgresql://[::1]/db",
    ],
)
def test_url_without_password_is_unchanged(url: str) -> None:
    assert redact_url(url) == url


def test_sqlalchemy_url_object_is_redacted() -> None:
    url = sa.make_url("postgresql+psycopg://billing:hunter2@db.internal:6432/billing")
    assert redact_url(url) == "postgresql+psycopg://billing:***@db.internal:6432/billing"


def test_sqlalchemy_url_object_without_password_is_rendered() -> None:
    url = sa.make_url("sqlite:///outbox.db")
    assert redact_url(url) == "sqlite:///outbox.db"


def test_password_given_as_a_query_parameter_is_not_logged() -> None:
    # libpq and psycopg accept the password as a URI parameter, as in this example.
    redacted = redact_url("postgresql://billing@db.internal/billing?password=hunter2")
    assert "hunter2" not in redacted


def test_url_with_a_bad_port_is_still_redacted_instead_of_raising() -> None:
    # A mistyped URL is exactly what ends up in an error message; redacting must not fail there.
    redacted = redact_url("amqp://app:hunter2@broker:56720x/")
    assert "hunter2" not in redacted


# --- configure_logging ----------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put structlog and the standard-library logging back as they were."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_levels = {name: logging.getLogger(name).level for name in ("aiormq", "alembic")}
    yield
    structlog.reset_defaults()
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)
    for name, level in saved_levels.items():
        logging.getLogger(name).setLevel(level)


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.usefixtures("restore_logging")
def test_json_logging_writes_one_object_per_line_with_event_level_and_time() -> None:
    out = io.StringIO()
    configure_logging("INFO", json=True, stream=out)

    log = structlog.get_logger()
    log.info("message published", message_id="m-1", topic="orders.created")
    log.warning("broker slow", seconds=2.5)

    first, second = json_lines(out)
    assert first["event"] == "message published"
    assert first["level"] == "info"
    assert first["message_id"] == "m-1"
    assert first["topic"] == "orders.created"
    assert first["timestamp"].endswith("Z")  # ISO 8601 in UTC
    assert second["level"] == "warning"
    assert second["seconds"] == 2.5


@pytest.mark.usefixtures("restore_logging")
def test_standard_library_records_come_out_as_json_on_the_same_stream() -> None:
    out = io.StringIO()
    configure_logging("INFO", json=True, stream=out)

    structlog.get_logger().info("from structlog")
    logging.getLogger("x").warning("from %s", "logging")

    first, second = json_lines(out)
    assert first["event"] == "from structlog"
    assert second["event"] == "from logging"
    assert second["level"] == "warning"
    assert second["logger"] == "x"
    assert "timestamp" in second


@pytest.mark.usefixtures("restore_logging")
def test_records_below_the_level_are_dropped() -> None:
    out = io.StringIO()
    configure_logging("WARNING", json=True, stream=out)

    structlog.get_logger().info("too quiet")
    logging.getLogger("x").info("too quiet")
    structlog.get_logger().error("loud enough")

    assert [line["event"] for line in json_lines(out)] == ["loud enough"]


@pytest.mark.usefixtures("restore_logging")
def test_exception_is_rendered_into_the_json_line() -> None:
    out = io.StringIO()
    configure_logging("INFO", json=True, stream=out)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        structlog.get_logger().exception("publish failed")

    (line,) = json_lines(out)
    assert line["level"] == "error"
    assert "RuntimeError: boom" in line["exception"]


@pytest.mark.usefixtures("restore_logging")
def test_json_is_chosen_when_the_stream_is_not_a_terminal() -> None:
    out = io.StringIO()
    configure_logging(stream=out)
    structlog.get_logger().info("daemon line")
    assert json_lines(out)[0]["event"] == "daemon line"


@pytest.mark.usefixtures("restore_logging")
def test_get_logger_binds_the_component() -> None:
    out = io.StringIO()
    configure_logging(json=True, stream=out)
    get_logger("outbox.relay").info("claimed", count=3)
    assert json_lines(out)[0]["component"] == "outbox.relay"


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("level", ["LOUD", "", "5"])
def test_unknown_level_is_refused_with_value_error(level: str) -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging(level, json=True, stream=io.StringIO())
