"""``outbox consume module:consumer``: run a consumer group's worker until SIGTERM."""

from __future__ import annotations

from typing import Any

import click

from consumer.consumer import Consumer
from outbox.cliutil import DURATION, import_object
from outbox.errors import ConfigurationError

__all__ = ["consume"]


@click.command()
@click.argument("target")
@click.option(
    "--database-url",
    envvar="OUTBOX_DATABASE_URL",
    show_envvar=True,
    default=None,
    help="Overrides the consumer's database_url.",
)
@click.option(
    "--amqp-url",
    envvar="OUTBOX_AMQP_URL",
    show_envvar=True,
    default=None,
    help="Overrides the consumer's amqp_url.",
)
@click.option(
    "--prefetch", envvar="OUTBOX_PREFETCH", show_envvar=True, type=click.IntRange(1, 65535)
)
@click.option(
    "--concurrency", envvar="OUTBOX_CONCURRENCY", show_envvar=True, type=click.IntRange(1, 1024)
)
@click.option(
    "--metrics-port", envvar="OUTBOX_METRICS_PORT", show_envvar=True, type=click.IntRange(0, 65535)
)
@click.option(
    "--shutdown-timeout", envvar="OUTBOX_SHUTDOWN_TIMEOUT", show_envvar=True, type=DURATION
)
def consume(target: str, **options: Any) -> None:
    """Run the handlers of TARGET (module:object, a consumer.Consumer) until SIGTERM or SIGINT."""
    obj = import_object(target)
    if not isinstance(obj, Consumer):
        raise click.BadParameter(f"{target} is a {type(obj).__name__}, not a consumer.Consumer")
    overrides = {k: v for k, v in options.items() if v is not None}
    try:
        obj.configure(**overrides)
    except (ConfigurationError, TypeError) as e:
        raise click.UsageError(str(e)) from None
    obj.run()
