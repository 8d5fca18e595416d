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
@click.option("--exchange", envvar="OUTBOX_EXCHANGE", show_envvar=True)
@click.option("--queue-prefix", envvar="OUTBOX_QUEUE_PREFIX", show_envvar=True)
@click.option(
    "--queue-type",
    envvar="OUTBOX_QUEUE_TYPE",
    show_envvar=True,
    type=click.Choice(["quorum", "classic"]),
)
@click.option(
    "--batch-size",
    envvar="OUTBOX_CONSUMER_BATCH_SIZE",
    show_envvar=True,
    type=click.IntRange(1, 1000),
    help="Messages of unordered SQLAlchemy handlers per shared transaction; 1: one each.",
)
@click.option(
    "--coalesce-inserts/--no-coalesce-inserts",
    envvar="OUTBOX_COALESCE_INSERTS",
    show_envvar=True,
    default=None,
    help="Send a batch's one-row INSERTs as one multi-row INSERT (default: on).",
)
@click.option(
    "--retry-tiers",
    envvar="OUTBOX_RETRY_TIERS",
    show_envvar=True,
    help="Delay queues, comma-separated and increasing, e.g. 1s,5s,30s,2m,10m,1h.",
)
@click.option("--inbox-retention", envvar="OUTBOX_INBOX_RETENTION", show_envvar=True, type=DURATION)
@click.option("--replay-window", envvar="OUTBOX_REPLAY_WINDOW", show_envvar=True, type=DURATION)
@click.option(
    "--receipts/--no-receipts",
    envvar="OUTBOX_RECEIPTS",
    show_envvar=True,
    default=None,
    help="Send a receipt per outcome for `outbox status` (default: on).",
)
def consume(target: str, **options: Any) -> None:
    """Run the handlers of TARGET (module:object, a consumer.Consumer) until SIGTERM or SIGINT."""
    obj = import_object(target)
    if not isinstance(obj, Consumer):
        raise click.BadParameter(f"{target} is a {type(obj).__name__}, not a consumer.Consumer")
    overrides = {k: v for k, v in options.items() if v is not None}
    if "retry_tiers" in overrides:
        overrides["retry_tiers"] = _tiers(overrides["retry_tiers"])
    try:
        obj.configure(**overrides)
    except (ConfigurationError, TypeError) as e:
        raise click.UsageError(str(e)) from None
    obj.run()


def _tiers(text: str) -> tuple[Any, ...]:
    try:
        return tuple(DURATION.convert(part.strip(), None, None) for part in text.split(","))
    except click.BadParameter as e:
        raise click.BadParameter(e.message, param_hint="--retry-tiers") from None
