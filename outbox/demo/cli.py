"""``outbox demo``."""

from __future__ import annotations

import click

from outbox.errors import OutboxError
from outbox.logs import configure_logging

__all__ = ["demo"]


@click.command()
@click.option(
    "--database-url",
    envvar="OUTBOX_DEMO_DATABASE_URL",
    help="Run on this PostgreSQL database (in a schema outbox_demo, dropped and made anew) "
    "instead of a temporary SQLite file.",
)
@click.option(
    "--amqp-url",
    envvar="OUTBOX_DEMO_AMQP_URL",
    help="Run on this RabbitMQ (exchange outbox.demo, queues outbox-demo.*) instead of the "
    "in-memory broker.",
)
@click.option(
    "--pace",
    type=click.FloatRange(min=0),
    default=0.6,
    show_default=True,
    help="Seconds to pause after each step, to read along; 0 runs flat out.",
)
@click.option(
    "--logs/--no-logs",
    default=False,
    help="Also show the components' own log lines (to stderr); off by default, for a clean story.",
)
def demo(database_url: str | None, amqp_url: str | None, pace: float, logs: bool) -> None:
    """Run the whole framework in this process and tell what it does.

    Producers commit orders with their events, the relay publishes them, a
    consumer handles them exactly once (a duplicate, a retry, a dead letter),
    a half message is resolved by check-back, and a partner is notified over
    HTTP. No services needed; --database-url and --amqp-url run it for real.
    """
    from outbox.demo import run_demo

    # Failures the story stages (a handler failing on purpose) log warnings and errors.
    configure_logging("INFO" if logs else "CRITICAL")
    try:
        run_demo(database_url, amqp_url, pace=pace)
    except OutboxError as e:
        raise click.ClickException(str(e)) from None
