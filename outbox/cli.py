"""The ``outbox`` command. Every option can also come from the environment (shown in --help).

Commands of the relay and consumer packages are loaded lazily, so ``outbox db``
works without importing them.
"""

from __future__ import annotations

import asyncio
import json
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import click

from outbox import admin, migrate
from outbox.cliutil import DURATION, LazyGroup
from outbox.durations import format_duration
from outbox.engines import make_engine
from outbox.errors import ConfigurationError, OutboxError
from outbox.ids import normalize_message_id
from outbox.logs import configure_logging, get_logger, redact_url
from outbox.tables import MessageStatus

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from datetime import datetime, timedelta

    import sqlalchemy as sa

    from consumer.deadletters import DeadLetter

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
    lazy={
        "relay": "relay.cli:relay",
        "consume": "consumer.cli:consume",
        "notify": "consumer.notify.cli:notify",
        "demo": "outbox.demo.cli:demo",
    },
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
    """Inspect, replay and purge messages the relay gave up on (status dead).

    With --group G, work on consumer group G's dead-letter queue instead: the
    messages its handlers gave up on, with the reason each one died.
    """


# --- `outbox dead ... --group G`: a consumer group's dead-letter queue (consumer/deadletters.py)

dead_database_url_option = click.option(
    "--database-url",
    envvar="OUTBOX_DATABASE_URL",
    show_envvar=True,
    default=None,
    help="The outbox database (required unless --group), e.g. postgresql://app@db/app.",
)


def dead_letter_options(command: Callable[..., None]) -> Callable[..., None]:
    """Add --group, --prefix and --amqp-url, which switch a `dead` command to a queue."""
    # --group has no environment variable on purpose: it changes what the command acts
    # on (queue instead of rows), so it must be visible on the command line.
    command = click.option(
        "--amqp-url",
        envvar="OUTBOX_AMQP_URL",
        show_envvar=True,
        default=None,
        help="With --group: the RabbitMQ broker, e.g. amqp://user@rabbit:5672/.",
    )(command)
    command = click.option(
        "--prefix",
        envvar="OUTBOX_QUEUE_PREFIX",
        show_envvar=True,
        default="outbox",
        show_default=True,
        help="With --group: the consumer's queue_prefix (queues are <prefix>.<group>...).",
    )(command)
    return click.option(
        "--group",
        default=None,
        help="Work on this consumer group's dead-letter queue (<prefix>.<group>.dead) "
        "instead of dead outbox rows.",
    )(command)


@dataclass(frozen=True)
class _DeadLetterQueue:
    """Where `outbox dead ... --group` works: the broker, the group's dead and main queues."""

    amqp_url: str
    queue: str
    main: str


def _param(ctx: click.Context, name: str) -> click.Parameter | None:
    return next((p for p in ctx.command.params if p.name == name), None)


def _dead_letter_queue(
    ctx: click.Context, group: str, prefix: str, amqp_url: str | None, **rows_only: object
) -> _DeadLetterQueue:
    """Check the options of a `--group` run; raise ``UsageError`` naming what does not fit."""
    for name, value in rows_only.items():
        if value is not None:
            raise click.UsageError(
                f"--{name.replace('_', '-')} applies to dead outbox rows only, not with --group"
            )
    if not amqp_url:
        raise click.UsageError("--group needs the broker: give --amqp-url or set OUTBOX_AMQP_URL")
    # Imported here so that the rest of `outbox` never loads the consumer package.
    from consumer import deadletters

    try:
        queue = deadletters.dead_letter_queue(group, prefix)
        main = deadletters.main_queue(group, prefix)
    except ConfigurationError as e:
        raise click.BadParameter(str(e), ctx, _param(ctx, "group")) from None
    return _DeadLetterQueue(amqp_url, queue, main)


def _outbox_rows(ctx: click.Context, database_url: str | None) -> str:
    """The database URL of a run on dead rows (no --group); refuse queue-only options."""
    for name in ("prefix", "amqp_url"):
        if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE:
            raise click.UsageError(
                f"--{name.replace('_', '-')} applies only with --group (a dead-letter queue)"
            )
    if not database_url:
        raise click.MissingParameter(ctx=ctx, param=_param(ctx, "database_url"))
    return database_url


def _ids(ctx: click.Context, values: tuple[str, ...], *, strict: bool) -> tuple[str, ...]:
    """The given message ids, each once; ``strict``: all must be UUIDs (outbox rows).

    A dead-letter queue also holds malformed messages whose id is no UUID at all,
    so there an id that is not a UUID is taken as it is.
    """
    ids: list[str] = []
    for value in values:
        try:
            ids.append(normalize_message_id(value))
        except ValueError as e:
            if strict:
                raise click.BadParameter(
                    f"{e}; a message id looks like 0190a1b2-...", ctx, _param(ctx, "message_ids")
                ) from e
            ids.append(value)
    return tuple(dict.fromkeys(ids))


def _dead_letter_selection(action: str, ids: tuple[str, ...], every: bool) -> None:
    if ids and every:
        raise click.UsageError("--all selects every dead letter; drop it or the ids")
    if not ids and not every:
        raise click.UsageError(f"say which dead letters to {action}: MESSAGE_ID... or --all")


def _dead_letters_confirmed(target: _DeadLetterQueue, action: str) -> bool:
    """Show how many messages the queue holds and ask; False when it holds none."""
    from consumer.deadletters import count_dead_letters

    total = asyncio.run(count_dead_letters(target.amqp_url, target.queue))
    if total == 0:
        click.echo(f"no dead letters in {target.queue}; nothing to {action}")
        return False
    question = (
        f"Replay {total} dead letter(s) from {target.queue} to {target.main}?"
        if action == "replay"
        else f"Delete {total} dead letter(s) from {target.queue} for good?"
    )
    click.confirm(question, abort=True)
    return True


def _report_dead_letters_left_alone(target: _DeadLetterQueue, ids: tuple[str, ...], n: int) -> None:
    if ids and n < len(ids):
        click.echo(
            f"{len(ids) - n} of the {len(ids)} given id(s) were not in {target.queue} (replayed "
            "or purged already, held by another command, or never dead-lettered in this group)",
            err=True,
        )


def _list_dead_letters(target: _DeadLetterQueue, limit: int, as_json: bool) -> None:
    from consumer.deadletters import count_dead_letters, list_dead_letters

    async def look() -> tuple[int, list[DeadLetter]]:
        total = await count_dead_letters(target.amqp_url, target.queue)
        return total, await list_dead_letters(target.amqp_url, target.queue, limit)

    total, letters = asyncio.run(look())
    if as_json:
        page = {
            "queue": target.queue,
            "ready": total,
            "dead_letters": [d.to_dict() for d in letters],
        }
        click.echo(json.dumps(page, indent=2))
        return
    if not letters:
        click.echo(f"no dead letters in {target.queue}")
        return
    click.echo(
        _table(
            ("MESSAGE ID", "TOPIC", "KEY", "ATTEMPTS", "DIED", "REASON"),
            [
                (
                    d.message_id or "-",
                    d.topic or "-",
                    d.key or "-",
                    str(d.attempts),
                    d.dead_at.isoformat(sep=" ", timespec="seconds") if d.dead_at else "-",
                    _first_line(d.reason, 100),
                )
                for d in letters
            ],
        )
    )
    if len(letters) < total:
        click.echo(f"the first {len(letters)} of {total} in {target.queue}; more with --limit")


@dead.command("list")
@dead_database_url_option
@dead_letter_options
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
@click.pass_context
def dead_list(
    ctx: click.Context,
    database_url: str | None,
    group: str | None,
    prefix: str,
    amqp_url: str | None,
    topic: str | None,
    limit: int,
    before_id: int | None,
    as_json: bool,
) -> None:
    """List dead messages, newest first, with why each one died.

    With --group: the group's dead-letter queue from its head, in queue order.
    Looking takes nothing away, but RabbitMQ marks each message looked at as
    redelivered (see docs/operations.md).
    """
    if group is not None:
        target = _dead_letter_queue(ctx, group, prefix, amqp_url, topic=topic, before_id=before_id)
        _list_dead_letters(target, limit, as_json)
        return
    database_url = _outbox_rows(ctx, database_url)
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
    return _table(
        header,
        [
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
        ],
    )


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    """Columns padded to their widest cell; the last one, free text, is not padded."""
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
@dead_database_url_option
@dead_letter_options
@click.argument("message_ids", nargs=-1, metavar="[MESSAGE_ID]...")
@click.option("--topic", default=None, help="Every dead message of this topic.")
@click.option("--all", "every", is_flag=True, help="Every dead message.")
@yes_option
@click.pass_context
def dead_replay(
    ctx: click.Context,
    database_url: str | None,
    group: str | None,
    prefix: str,
    amqp_url: str | None,
    message_ids: tuple[str, ...],
    topic: str | None,
    every: bool,
    yes: bool,
) -> None:
    """Make dead messages pending again, so that a relay publishes them.

    Select MESSAGE_ID..., --topic or --all; --topic and --all ask first unless
    --yes. Only dead messages change: a published or pending one is left alone.
    An unconfirmed half message (marked * by `outbox dead list`) becomes
    deliverable too: replay it only if its local transaction committed,
    otherwise purge it.

    With --group: move dead letters (MESSAGE_ID... or --all, which asks first)
    back to the group's main queue with their attempt count reset; each leaves
    the dead-letter queue only once the broker has confirmed its copy.
    """
    if group is not None:
        target = _dead_letter_queue(ctx, group, prefix, amqp_url, topic=topic)
        ids = _ids(ctx, message_ids, strict=False)
        _dead_letter_selection("replay", ids, every)
        if not ids and not yes and not _dead_letters_confirmed(target, "replay"):
            return
        from consumer.deadletters import replay_dead_letters

        count = asyncio.run(
            replay_dead_letters(
                target.amqp_url, target.queue, target.main, message_ids=ids if ids else None
            )
        )
        click.echo(f"replayed {count} dead letter(s) from {target.queue} to {target.main}")
        _report_dead_letters_left_alone(target, ids, count)
        return
    database_url = _outbox_rows(ctx, database_url)
    message_ids = _ids(ctx, message_ids, strict=True)
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
@dead_database_url_option
@dead_letter_options
@click.argument("message_ids", nargs=-1, metavar="[MESSAGE_ID]...")
@click.option("--topic", default=None, help="Dead messages of this topic.")
@click.option(
    "--older-than",
    type=DURATION,
    default=None,
    help="Dead messages last changed longer ago than this: 30s, 15m, 2h, 7d.",
)
@click.option("--all", "every", is_flag=True, help="Every dead message.")
@yes_option
@click.pass_context
def dead_purge(
    ctx: click.Context,
    database_url: str | None,
    group: str | None,
    prefix: str,
    amqp_url: str | None,
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

    With --group: delete dead letters from the group's dead-letter queue,
    MESSAGE_ID... (every copy of each) or --all (asks first).
    """
    if group is not None:
        target = _dead_letter_queue(
            ctx, group, prefix, amqp_url, topic=topic, older_than=older_than
        )
        ids = _ids(ctx, message_ids, strict=False)
        _dead_letter_selection("purge", ids, every)
        if not ids and not yes and not _dead_letters_confirmed(target, "purge"):
            return
        from consumer.deadletters import purge_dead_letters

        count = asyncio.run(
            purge_dead_letters(
                target.amqp_url, target.queue, message_ids=ids if ids else None, all=every
            )
        )
        click.echo(f"purged {count} dead letter(s) from {target.queue}")
        _report_dead_letters_left_alone(target, ids, count)
        return
    database_url = _outbox_rows(ctx, database_url)
    message_ids = _ids(ctx, message_ids, strict=True)
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
