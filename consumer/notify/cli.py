"""``outbox notify``: run the notification service, or ask it what it notified.

``outbox notify --config notify.toml`` runs the service until SIGTERM or SIGINT.
``outbox notify show MESSAGE_ID``, ``list [...]`` and ``retry ID`` talk to a
running service's query API (``--api-url``, token from ``OUTBOX_NOTIFY_TOKEN``)
rather than to the database: the operator needs no database credentials, the
token is the one authorization point for people and partners alike, and what
the command prints is exactly what a partner reconciling through the API sees.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click
import httpx

from consumer.notify.config import TOKEN_ENV, load_config
from consumer.notify.service import NotifyService
from outbox.durations import parse_duration
from outbox.errors import ConfigurationError
from outbox.logs import redact_url
from outbox.tables import NotificationStatus

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["notify"]

DEFAULT_API_URL = "http://127.0.0.1:8089"
_STATUSES = [s.value for s in NotificationStatus]

# click 8.2+ makes ParamType generic; 8.1 does not subscript at run time.
if TYPE_CHECKING:
    _WhenBase = click.ParamType[datetime]
else:
    _WhenBase = click.ParamType


class _When(_WhenBase):
    """A point in time: ISO 8601 with a UTC offset, or a duration meaning that long ago."""

    name = "time"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            return datetime.now(UTC) - parse_duration(value)
        except ConfigurationError:
            pass
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            self.fail(f"{value!r}: give a duration ago (2h, 1d) or an ISO 8601 time", param, ctx)
        if when.tzinfo is None:
            self.fail(f"{value!r}: add a UTC offset (+00:00 or Z)", param, ctx)
        return when


@click.group(invoke_without_command=True)
@click.option(
    "--config",
    "config_path",
    envvar="OUTBOX_NOTIFY_CONFIG",
    show_envvar=True,
    type=click.Path(dir_okay=False),
    default=None,
    help="The service's TOML file: runs the service.",
)
@click.option(
    "--database-url",
    envvar="OUTBOX_DATABASE_URL",
    show_envvar=True,
    default=None,
    help="The database of the notifications and the group's inbox.",
)
@click.option(
    "--amqp-url",
    envvar="OUTBOX_AMQP_URL",
    show_envvar=True,
    default="amqp://guest:guest@127.0.0.1:5672/",
    show_default=True,
)
@click.option(
    "--metrics-port",
    envvar="OUTBOX_METRICS_PORT",
    show_envvar=True,
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve /metrics and /healthz on this port (overrides metrics_port).",
)
@click.option(
    "--api-port",
    envvar="OUTBOX_NOTIFY_API_PORT",
    show_envvar=True,
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve the query API on this port (overrides api_port).",
)
@click.pass_context
def notify(
    ctx: click.Context,
    config_path: str | None,
    database_url: str | None,
    amqp_url: str,
    metrics_port: int | None,
    api_port: int | None,
) -> None:
    """Call partners' HTTP endpoints for subscribed messages: run with --config FILE.

    The subcommands ask a running service (its query API) what it notified.
    """
    # httpx logs every request at INFO with its full URL; the service logs each call itself,
    # and the subcommands print what matters.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(logging.getLogger().level, logging.WARNING))
    if ctx.invoked_subcommand is not None:
        if ctx.get_parameter_source("config_path") is click.core.ParameterSource.COMMANDLINE:
            raise click.UsageError(
                f"--config runs the service; `{ctx.invoked_subcommand}` asks a running one "
                "through --api-url"
            )
        return
    if config_path is None:
        raise click.UsageError(
            "give --config FILE (or OUTBOX_NOTIFY_CONFIG) to run the service, or a "
            "subcommand: show, list, retry"
        )
    if not database_url:
        raise click.UsageError("the service needs --database-url or OUTBOX_DATABASE_URL")
    config = load_config(config_path)
    overrides: dict[str, Any] = {}
    if api_port is not None:
        overrides["api_port"] = api_port
    if metrics_port is not None:
        overrides["metrics_port"] = metrics_port
    if overrides:
        config = replace(config, **overrides)
    NotifyService(config, database_url=database_url, amqp_url=amqp_url).run()


# -- asking a running service -----------------------------------------------------------


def _api_options(command: Callable[..., None]) -> Callable[..., None]:
    command = click.option(
        "--token",
        envvar=TOKEN_ENV,
        show_envvar=True,
        required=True,
        help="The API's bearer token (prefer the variable: ps shows the command line).",
    )(command)
    return click.option(
        "--api-url",
        envvar="OUTBOX_NOTIFY_API_URL",
        show_envvar=True,
        default=DEFAULT_API_URL,
        show_default=True,
        help="Where the service's query API listens.",
    )(command)


json_option = click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")


def _ask(
    api_url: str, token: str, method: str, path: str, params: dict[str, str] | None = None
) -> dict[str, Any]:
    """Call the query API; raise ``ClickException`` with its error, or why it is unreachable."""
    url = api_url.rstrip("/") + path
    try:
        with httpx.Client(timeout=15) as client:
            response = client.request(
                method, url, params=params, headers={"Authorization": f"Bearer {token}"}
            )
    except httpx.HTTPError as e:
        raise click.ClickException(
            f"cannot reach the notify API at {redact_url(api_url)} ({type(e).__name__}: {e}); "
            "is `outbox notify --config ...` running there, and is --api-url right?"
        ) from None
    try:
        answer = response.json()
    except ValueError:
        raise click.ClickException(
            f"{redact_url(api_url)} answered HTTP {response.status_code} without JSON: "
            "is --api-url the notify service's query API?"
        ) from None
    if response.status_code != 200:
        error = answer.get("error") if isinstance(answer, dict) else None
        raise click.ClickException(f"HTTP {response.status_code}: {error or answer}")
    if not isinstance(answer, dict):
        raise click.ClickException("the API answered something other than a JSON object")
    return answer


@notify.command()
@_api_options
@click.argument("message_id")
@json_option
def show(api_url: str, token: str, message_id: str, as_json: bool) -> None:
    """Show MESSAGE_ID's notification per subscription, with every attempt."""
    answer = _ask(api_url, token, "GET", f"/notifications/{message_id}")
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    click.echo(f"message       {answer['message_id']}")
    for n in answer["notifications"]:
        click.echo("")
        click.echo(_describe(n))
        history = n.get("history") or []
        if history:
            click.echo("  attempt  started                           status  duration  error")
        for h in history:
            code = h["status_code"] if h["status_code"] is not None else "-"
            click.echo(
                f"  {h['attempt']:>7}  {h['started_at']:<32}  {code!s:<6}  "
                f"{h['duration_ms']:>6} ms  {h['error'] or ''}".rstrip()
            )


def _describe(n: dict[str, Any]) -> str:
    lines = [
        f"notification  {n['id']}  ({n['subscription']})",
        f"status        {n['status']}",
        f"topic         {n['topic']}   key {n['key'] if n['key'] is not None else '-'}",
        f"attempts      {n['attempts']} of {n['max_attempts']}",
    ]
    if n["status"] == "pending":
        lines.append(f"next attempt  {n['next_attempt_at']}")
    if n.get("delivered_at"):
        lines.append(f"delivered     {n['delivered_at']}")
    if n.get("abandoned_at"):
        lines.append(f"abandoned     {n['abandoned_at']}")
    if n.get("last_error"):
        lines.append(f"last error    {n['last_error']}")
    if n["status"] != "delivered":
        lines.append(f"retry         outbox notify retry {n['id']}")
    return "\n".join(lines)


@notify.command("list")
@_api_options
@click.option("--subscription", default=None, help="Only this subscription's.")
@click.option("--status", type=click.Choice(_STATUSES), default=None)
@click.option("--since", type=_When(), default=None, help="Created since: 2h (ago) or ISO time.")
@click.option("--until", type=_When(), default=None, help="Created before: 30m (ago) or ISO time.")
@click.option("--after", type=click.IntRange(0), default=None, help="Ids after this (next page).")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@json_option
def list_(
    api_url: str,
    token: str,
    subscription: str | None,
    status: str | None,
    since: datetime | None,
    until: datetime | None,
    after: int | None,
    limit: int,
    as_json: bool,
) -> None:
    """List notifications, oldest first: what was delivered, pending or abandoned."""
    params = {"limit": str(limit)}
    for name, value in (("subscription", subscription), ("status", status)):
        if value is not None:
            params[name] = value
    for name, when in (("since", since), ("until", until)):
        if when is not None:
            params[name] = when.isoformat()
    if after is not None:
        params["after"] = str(after)
    answer = _ask(api_url, token, "GET", "/notifications", params)
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    rows = answer["notifications"]
    if not rows:
        click.echo("no notifications match")
        return
    click.echo(f"{'id':>8}  {'subscription':<16}  {'status':<9}  tries  created_at  message_id")
    for n in rows:
        click.echo(
            f"{n['id']:>8}  {n['subscription']:<16}  {n['status']:<9}  "
            f"{n['attempts']:>2}/{n['max_attempts']:<2}  {n['created_at']}  {n['message_id']}"
        )
    if answer.get("next_after") is not None:
        click.echo(f"more: add --after {answer['next_after']}")


@notify.command()
@_api_options
@click.argument("notification_id", type=click.IntRange(1))
def retry(api_url: str, token: str, notification_id: int) -> None:
    """Call NOTIFICATION_ID's endpoint again now, with a fresh round of attempts."""
    answer = _ask(api_url, token, "POST", f"/notifications/{notification_id}/retry")
    n = answer["notification"]
    click.echo(
        f"notification {n['id']} ({n['subscription']}, message {n['message_id']}) is due now; "
        f"up to {n['max_attempts'] - n['attempts']} more attempt(s)"
    )
