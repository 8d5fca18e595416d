"""Logging: structlog configured once, and URLs made safe to print.

Processes the framework starts (relay, consumer, notify) call
``configure_logging`` at their edge; a library user who configures structlog
themselves is left alone. Payloads and credentials are never logged: events
carry ``message_id``, ``topic`` and ``key``, and URLs go through ``redact_url``.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import TextIO

import structlog

__all__ = ["configure_logging", "get_logger", "redact_url"]


def configure_logging(
    level: str | int = "INFO", *, json: bool | None = None, stream: TextIO | None = None
) -> None:
    """Send structlog and standard-library logs to ``stream`` (stderr) at ``level``.

    ``json=None`` picks JSON lines when the stream is not a terminal (a daemon
    under systemd or Kubernetes) and a readable console format when it is.
    Calling it again reconfigures; it is not meant for library code.
    """
    out = stream or sys.stderr
    as_json = not out.isatty() if json is None else json
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR")
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info if as_json else _keep,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=True,
    )
    # Standard-library records (SQLAlchemy, aio-pika, APScheduler) go through the same renderer.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info if as_json else _keep,
                renderer,
            ],
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # aiormq logs every reconnect attempt at INFO with the full URL; keep it quieter.
    logging.getLogger("aiormq").setLevel(max(numeric, logging.WARNING))
    # Alembic narrates every step at INFO; `outbox db upgrade` logs its own summary.
    logging.getLogger("alembic").setLevel(max(numeric, logging.WARNING))
    # APScheduler logs every job run at INFO; the jobs log what they did themselves.
    logging.getLogger("apscheduler").setLevel(max(numeric, logging.WARNING))


def _keep(
    logger: object, method: str, event: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    return event


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    """Return the structlog logger for a framework component (``outbox.relay``, ...)."""
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(component=name)
    return logger


def redact_url(url: object) -> str:
    """Return ``url`` as text with any password replaced by ``***``, safe for logs.

    Accepts strings and SQLAlchemy ``URL`` objects. Redacts the password of the
    user-info part and ``password=`` query parameters (libpq accepts both); the
    user name is kept, since it tells an operator which account is in use. Never
    raises, because the URLs it sees in error paths are often the malformed ones.
    """
    rendered = getattr(url, "render_as_string", None)
    if callable(rendered):
        return _redact_query(str(rendered(hide_password=True)))
    text = str(url)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return _redact_query(text)
    # The authority ends at the first '/', '?' or '#' after the last '@' of the user info.
    at = rest.rfind("@")
    if at != -1:
        userinfo, hostpart = rest[:at], rest[at + 1 :]
        user, colon, _password = userinfo.partition(":")
        if colon:
            rest = f"{user}:***@{hostpart}"
    return _redact_query(f"{scheme}://{rest}")


_QUERY_SECRET = re.compile(r"(?i)([?&](?:password|passwd|pass)=)[^&#]*")


def _redact_query(text: str) -> str:
    return _QUERY_SECRET.sub(r"\1***", text)
