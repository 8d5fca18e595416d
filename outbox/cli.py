"""The ``outbox`` command. Every option can also come from the environment (shown in --help).

Commands of the relay and consumer packages are loaded lazily, so ``outbox db``
works without importing them.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click

from outbox import admin, migrate
from outbox.cliutil import DURATION, LazyGroup
from outbox.durations import format_duration
from outbox.engines import make_engine
from outbox.errors import OutboxError
from outbox.ids import normalize_message_id
from outbox.logs import configure_logging, get_logger, redact_url
from outbox.tables import MessageStatus

if TYPE_CHECKING:
    from collections.abc import Iterator
    from datetime import datetime, timedelta

    import sqlalchemy as sa

__all__ = ["main"]

database_url_option = click.option(
    "--database-url",
    envvar="OUTBOX_DATABASE_URL",
    required=True,
    show_envvar=True,
    help="The outbox database, e.g. postgresql://app@db/app or sqlite:///outbox.db.",
)


@click.group(
    cls=LazyGroup,
    lazy={"relay": "relay.cli:relay", "consume": "consumer.cli:consume"},
    context_settings={"help_option_names": ["-h", "--help"]},
)
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


# --- operator tools: `outbox status`, `outbox dead ...` (SQL in outbox/admin.py) --------------


def _message_ids(
    ctx: click.Context, param: click.Parameter, value: str | tuple[str, ...]
) -> str | tuple[str, ...]:
    """Reject an id that is not a UUID before anything touches the database."""
    values = (value,) if isinstance(value, str) else value
    try:
        # dict.fromkeys: a repeated id is one message, and counts once in the summary.
        ids = tuple(dict.fromkeys(normalize_message_id(v) for v in values))
    except ValueError as e:
        raise click.BadParameter(f"{e}; a message id looks like 0190a1b2-...", ctx, param) from e
    return ids[0] if isinstance(value, str) else ids


@contextmanager
def _engine(database_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(database_url)
    try:
        yield engine
    finally:
        engine.dispose()


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


@cli.command()
@database_url_option
@click.argument("message_id", callback=_message_ids)
@json_option
def status(database_url: str, message_id: str, as_json: bool) -> None:
    """Show where MESSAGE_ID is: its outbox row and what each consumer group did with it.

    Exits 0 when the message is known (even if only its receipts remain after
    the retention purge), 1 when the database knows nothing of it.
    """
    with _engine(database_url) as engine:
        report = admin.message_status(engine, message_id)
    if report is None:
        raise click.ClickException(f"no message {message_id} in the outbox or its receipts")
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    click.echo(_format_status(report))


def _format_status(report: admin.MessageStatusReport) -> str:
    def when(value: datetime | None) -> str:
        return value.isoformat(sep=" ", timespec="milliseconds") if value else "-"

    lines = [f"message       {report.message_id}"]
    if report.status is None:
        lines.append("status        (no outbox row: purged by retention; receipts remain)")
    else:
        lines += [
            f"status        {report.status.value}",
            f"topic         {report.topic}",
            f"key           {report.key if report.key is not None else '-'}",
            f"attempts      {report.attempts}   checks {report.checks}",
            f"created       {when(report.created_at)}",
            f"updated       {when(report.updated_at)}",
        ]
        if report.published_at is not None:
            lines.append(f"published     {when(report.published_at)}")
        if report.status in (MessageStatus.PENDING, MessageStatus.PREPARED):
            verb = "next attempt " if report.status is MessageStatus.PENDING else "next check   "
            lines.append(f"{verb} {when(report.next_attempt_at)}")
        if report.claimed_by is not None:
            lines.append(f"claimed by    {report.claimed_by} until {when(report.claimed_until)}")
        if report.last_error:
            # Continuation lines (a driver's multi-line message) stay in the value column.
            error = report.last_error.strip().replace("\n", "\n" + " " * 14)
            lines.append(f"last error    {error}")
        if report.xid is not None:
            lines.append(f"local tx      xid {report.xid} on {report.xid_resource or '-'}")
        lines.append(f"payload       {report.payload_bytes} bytes, {report.content_type}")
        if report.headers:
            lines.append(f"headers       {json.dumps(report.headers, sort_keys=True)}")
        if report.status is MessageStatus.DEAD:
            if report.attempts == 0 and report.checks:
                lines.append(
                    "note          unconfirmed half message: its local transaction may have "
                    "rolled back; replay only if it committed"
                )
            lines += [
                f"retry         outbox dead replay {report.message_id}",
                f"drop          outbox dead purge {report.message_id}",
            ]
    lines.append(f"receipts      {len(report.receipts) or 'none'}")
    width = max((len(r.consumer_group) for r in report.receipts), default=0)
    for r in report.receipts:
        detail = f"  {r.detail}" if r.detail else ""
        lines.append(
            f"  {r.consumer_group:<{width}}  {r.outcome:<9}  {when(r.recorded_at)}{detail}"
        )
    return "\n".join(lines)


@cli.group()
def dead() -> None:
    """Inspect, replay and purge messages the relay gave up on (status dead)."""


@dead.command("list")
@database_url_option
@click.option("--topic", default=None, help="Only messages of this topic.")
@click.option(
    "--limit",
    type=click.IntRange(1, admin.MAX_LIST_LIMIT),
    default=100,
    show_default=True,
    help="At most this many, newest first.",
)
@click.option(
    "--before-id",
    type=int,
    default=None,
    help="Next page: only messages with a row id below this (the last ID shown).",
)
@json_option
def dead_list(
    database_url: str, topic: str | None, limit: int, before_id: int | None, as_json: bool
) -> None:
    """List dead messages, newest first, with why each one died."""
    with _engine(database_url) as engine:
        messages = admin.list_dead(engine, topic=topic, limit=limit, before_id=before_id)
    # A full page may have a next one; the exact answer would cost another query.
    next_before = messages[-1].id if len(messages) == limit else None
    if as_json:
        page = {"messages": [m.to_dict() for m in messages], "next_before_id": next_before}
        click.echo(json.dumps(page, indent=2))
        return
    if not messages:
        click.echo("no dead messages" + (f" of topic {topic}" if topic else ""))
        return
    click.echo(_format_dead(messages))
    if any(m.unconfirmed for m in messages):
        click.echo(
            "* unconfirmed half message: its local transaction was never confirmed; "
            "replay it only if it committed, otherwise purge it"
        )
    if next_before is not None:
        click.echo(f"more: outbox dead list --before-id {next_before}")


def _format_dead(messages: list[admin.DeadMessage]) -> str:
    header = ("ID", "MESSAGE ID", "TOPIC", "KEY", "ATTEMPTS", "CHECKS", "DIED", "LAST ERROR")
    rows = [
        (
            str(m.id),
            m.message_id + ("*" if m.unconfirmed else ""),
            m.topic,
            m.key or "-",
            str(m.attempts),
            str(m.checks),
            m.updated_at.isoformat(sep=" ", timespec="seconds"),
            # First line only, cut short: a stack trace would wreck the table.
            _first_line(m.last_error, 80),
        )
        for m in messages
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join([*(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)), r[-1]]).rstrip()
        for r in [header, *rows]
    )


def _first_line(text: str | None, width: int) -> str:
    if not text:
        return "-"
    line = text.strip().splitlines()[0] if text.strip() else "-"
    return line if len(line) <= width else line[: width - 3] + "..."


def _selection(
    action: str, ids: tuple[str, ...], topic: str | None, older_than: timedelta | None, every: bool
) -> str:
    """Say in words what a replay or purge selects; raise ``UsageError`` if it selects nothing."""
    parts = []
    if ids:
        parts.append(f"{len(ids)} given id(s)")
    if topic is not None:
        parts.append(f"topic {topic}")
    if older_than is not None:
        parts.append(f"dead for longer than {format_duration(older_than)}")
    if every and parts:
        raise click.UsageError("--all selects every dead message; drop it or the other selectors")
    if not parts and not every:
        age = ", --older-than" if action == "purge" else ""
        raise click.UsageError(
            f"say which dead messages to {action}: MESSAGE_ID..., --topic{age} or --all"
        )
    return "every dead message" if every else ", ".join(parts)


def _confirmed(
    engine: sa.Engine,
    action: str,
    what: str,
    *,
    topic: str | None,
    older_than: timedelta | None,
    every: bool,
) -> bool:
    """Show how many messages a bulk change touches and ask; False when it touches none."""
    counted = admin.count_dead(engine, topic=topic, older_than=older_than, all=every)
    if counted.total == 0:
        click.echo(f"no dead messages match ({what}); nothing to {action}")
        return False
    if counted.unconfirmed and action == "replay":
        click.echo(
            f"warning: {counted.unconfirmed} of them are unconfirmed half messages; replaying "
            "makes them deliverable although their local transaction may have rolled back",
            err=True,
        )
    verb = "Replay" if action == "replay" else "Delete"
    tail = "" if action == "replay" else " for good"
    # abort=True: declining exits non-zero (130 from the `outbox` command), touching nothing.
    click.confirm(f"{verb} {counted.total} dead message(s) ({what}){tail}?", abort=True)
    return True


def _report_ids_left_alone(ids: tuple[str, ...], count: int) -> None:
    if ids and count < len(ids):
        click.echo(
            f"{len(ids) - count} of the {len(ids)} given id(s) were not dead (unknown, or in "
            "another state) and were left alone; see `outbox status MESSAGE_ID`",
            err=True,
        )


yes_option = click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")


@dead.command("replay")
@database_url_option
@click.argument("message_ids", nargs=-1, callback=_message_ids, metavar="[MESSAGE_ID]...")
@click.option("--topic", default=None, help="Every dead message of this topic.")
@click.option("--all", "every", is_flag=True, help="Every dead message.")
@yes_option
def dead_replay(
    database_url: str, message_ids: tuple[str, ...], topic: str | None, every: bool, yes: bool
) -> None:
    """Make dead messages pending again, so that a relay publishes them.

    Select MESSAGE_ID..., --topic or --all; --topic and --all ask first unless
    --yes. Only dead messages change: a published or pending one is left alone.
    An unconfirmed half message (marked * by `outbox dead list`) becomes
    deliverable too: replay it only if its local transaction committed,
    otherwise purge it.
    """
    what = _selection("replay", message_ids, topic, None, every)
    with _engine(database_url) as engine:
        # Named ids need no prompt: the operator has already said exactly which.
        bulk = not message_ids
        if (
            bulk
            and not yes
            and not _confirmed(engine, "replay", what, topic=topic, older_than=None, every=every)
        ):
            return
        count = admin.replay_dead(engine, message_ids=message_ids or None, topic=topic, all=every)
    click.echo(f"replayed {count} dead message(s)")
    _report_ids_left_alone(message_ids, count)


@dead.command("purge")
@database_url_option
@click.argument("message_ids", nargs=-1, callback=_message_ids, metavar="[MESSAGE_ID]...")
@click.option("--topic", default=None, help="Dead messages of this topic.")
@click.option(
    "--older-than",
    type=DURATION,
    default=None,
    help="Dead messages last changed longer ago than this: 30s, 15m, 2h, 7d.",
)
@click.option("--all", "every", is_flag=True, help="Every dead message.")
@yes_option
def dead_purge(
    database_url: str,
    message_ids: tuple[str, ...],
    topic: str | None,
    older_than: timedelta | None,
    every: bool,
    yes: bool,
) -> None:
    """Delete dead messages for good (receipts are kept).

    Select MESSAGE_ID..., --topic, --older-than (combined: all must match) or
    --all; without ids it asks first unless --yes. Only dead messages are
    deleted. This is also how to discard a dead half message whose local
    transaction did not commit.
    """
    what = _selection("purge", message_ids, topic, older_than, every)
    with _engine(database_url) as engine:
        bulk = not message_ids
        if (
            bulk
            and not yes
            and not _confirmed(
                engine, "purge", what, topic=topic, older_than=older_than, every=every
            )
        ):
            return
        count = admin.purge_dead(
            engine,
            message_ids=message_ids or None,
            topic=topic,
            older_than=older_than,
            all=every,
        )
    click.echo(f"purged {count} dead message(s)")
    _report_ids_left_alone(message_ids, count)


def main() -> None:
    """Run the CLI; framework errors are printed as one line, without a traceback."""
    try:
        code = cli.main(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except OutboxError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
