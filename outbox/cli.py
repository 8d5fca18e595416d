"""The ``outbox`` command. Every option can also come from the environment (shown in --help).

Commands of the relay and consumer packages are loaded lazily, so ``outbox db``
works without importing them.
"""

from __future__ import annotations

import sys

import click

from outbox import migrate
from outbox.engines import make_engine
from outbox.errors import OutboxError
from outbox.logs import configure_logging, get_logger, redact_url

__all__ = ["main"]

database_url_option = click.option(
    "--database-url",
    envvar="OUTBOX_DATABASE_URL",
    required=True,
    show_envvar=True,
    help="The outbox database, e.g. postgresql://app@db/app or sqlite:///outbox.db.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    envvar="OUTBOX_LOG_LEVEL",
    show_envvar=True,
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@click.option(
    "--log-format",
    envvar="OUTBOX_LOG_FORMAT",
    show_envvar=True,
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "json", "console"]),
    help="auto: JSON lines unless stderr is a terminal.",
)
@click.version_option(package_name="outbox-relay-inbox", prog_name="outbox")
def cli(log_level: str, log_format: str) -> None:
    """Reliable messaging between services that each own a database."""
    configure_logging(log_level, json=None if log_format == "auto" else log_format == "json")


@cli.group()
def db() -> None:
    """Create, migrate and inspect the framework's tables."""


@db.command()
@database_url_option
@click.option("--revision", default="head", show_default=True, help="Migrate up to this one.")
def upgrade(database_url: str, revision: str) -> None:
    """Create or migrate the tables; safe to run again and from several processes at once."""
    log = get_logger("outbox.db")
    engine = make_engine(database_url)
    try:
        applied = migrate.upgrade(engine, revision)
        now = migrate.current(engine)
    finally:
        engine.dispose()
    log.info(
        "db.upgraded" if applied else "db.up_to_date",
        database=redact_url(engine.url),
        applied=applied,
        revision=now,
    )


@db.command()
@database_url_option
@click.argument("revision", default="head")
def stamp(database_url: str, revision: str) -> None:
    """Record REVISION as applied without running it (for tables made another way)."""
    engine = make_engine(database_url)
    try:
        migrate.stamp(engine, revision)
    finally:
        engine.dispose()
    get_logger("outbox.db").info("db.stamped", database=redact_url(engine.url), revision=revision)


@db.command()
@database_url_option
def current(database_url: str) -> None:
    """Print the revision the database is at (nothing if never migrated) and the newest one."""
    engine = make_engine(database_url)
    try:
        rev = migrate.current(engine)
    finally:
        engine.dispose()
    click.echo(f"current: {rev or '(none)'}\nhead:    {migrate.head()}")


@db.command()
def history() -> None:
    """List the migrations this release ships, oldest first."""
    for revision, doc in migrate.history():
        click.echo(f"{revision}  {doc.splitlines()[0] if doc else ''}")


@db.command()
@click.option(
    "--dialect",
    type=click.Choice(["postgresql", "sqlite"]),
    default="postgresql",
    show_default=True,
)
@click.option("--from", "start", default=None, help="Print only the SQL after this revision.")
@click.option("--revision", default="head", show_default=True)
def sql(dialect: str, start: str | None, revision: str) -> None:
    """Print the DDL that `db upgrade` runs, for review; touches no database."""
    click.echo(migrate.sql(dialect, revision, start=start), nl=False)


def main() -> None:
    """Run the CLI; framework errors are printed as one line, without a traceback."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except OutboxError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
