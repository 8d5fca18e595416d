"""``outbox relay``: run the relay daemon. Every option also reads an ``OUTBOX_*`` variable."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from outbox.cliutil import DURATION, import_object
from outbox.errors import ConfigurationError
from outbox.logs import get_logger
from relay.config import RelayConfig, UnroutablePolicy
from relay.relay import Relay

if TYPE_CHECKING:
    from datetime import timedelta

    from relay.checkbacks import CheckbackSource

__all__ = ["relay"]

_POLICIES = [p.value for p in UnroutablePolicy]


F = TypeVar("F", bound=Callable[..., Any])


def _opt(name: str, env: str, **kwargs: Any) -> Callable[[F], F]:
    option: Callable[[F], F] = click.option(
        name, envvar=env, show_envvar=True, show_default=True, **kwargs
    )
    return option


def _unroutable(values: tuple[str, ...]) -> dict[str, UnroutablePolicy]:
    policies: dict[str, UnroutablePolicy] = {}
    for item in values:
        for entry in item.split():  # the environment variable holds them space-separated
            pattern, sep, policy = entry.partition("=")
            if not sep or policy not in _POLICIES:
                raise click.BadParameter(
                    f"{entry!r}: use TOPIC_PATTERN=POLICY with POLICY one of {_POLICIES}",
                    param_hint="--unroutable",
                )
            policies[pattern] = UnroutablePolicy(policy)
    return policies


def _remote_checkbacks(values: tuple[str, ...]) -> dict[str, str]:
    routes: dict[str, str] = {}
    for item in values:
        for entry in item.split():  # the environment variable holds them space-separated
            pattern, sep, url = entry.partition("=")  # a pattern has no '=', a URL may
            if not sep or not pattern or not url:
                raise click.BadParameter(
                    f"{entry!r}: use TOPIC_PATTERN=URL, like 'payments.*=http://payments:8088"
                    "/outbox/checkback'",
                    param_hint="--remote-checkback",
                )
            routes[pattern] = url
    return routes


@click.command()
@_opt("--database-url", "OUTBOX_DATABASE_URL", required=True, help="The outbox database.")
@_opt("--amqp-url", "OUTBOX_AMQP_URL", default="amqp://guest:guest@127.0.0.1:5672/")
@_opt("--exchange", "OUTBOX_EXCHANGE", default="outbox", help="Durable topic exchange.")
@_opt("--app", "OUTBOX_APP", default=None, help="module:object to load (registers check-backs).")
@_opt("--relay-id", "OUTBOX_RELAY_ID", default=None, help="Default: host-pid.")
@_opt("--batch-size", "OUTBOX_BATCH_SIZE", type=click.IntRange(1, 10_000), default=500)
@_opt("--keyless-workers", "OUTBOX_KEYLESS_WORKERS", type=click.IntRange(1, 32), default=2)
@_opt("--max-attempts", "OUTBOX_MAX_ATTEMPTS", type=click.IntRange(1), default=12)
@_opt("--lease", "OUTBOX_LEASE", type=DURATION, default="30s")
@_opt("--retry-base", "OUTBOX_RETRY_BASE", type=DURATION, default="1s")
@_opt("--retry-max", "OUTBOX_RETRY_MAX", type=DURATION, default="5m")
@_opt("--poll-min", "OUTBOX_POLL_MIN", type=DURATION, default="2ms")
@_opt("--poll-max", "OUTBOX_POLL_MAX", type=DURATION, default="100ms")
@_opt("--confirm-timeout", "OUTBOX_CONFIRM_TIMEOUT", type=DURATION, default="15s")
@_opt(
    "--unroutable",
    "OUTBOX_UNROUTABLE",
    multiple=True,
    help="TOPIC_PATTERN=POLICY (retry, dead, drop); repeatable.",
)
@_opt(
    "--unroutable-default",
    "OUTBOX_UNROUTABLE_DEFAULT",
    type=click.Choice(_POLICIES),
    default=UnroutablePolicy.RETRY.value,
)
@_opt("--check-interval", "OUTBOX_CHECK_INTERVAL", type=DURATION, default="500ms")
@_opt("--check-timeout", "OUTBOX_CHECK_TIMEOUT", type=DURATION, default="10s")
@_opt("--check-concurrency", "OUTBOX_CHECK_CONCURRENCY", type=click.IntRange(1, 256), default=8)
@_opt("--max-checks", "OUTBOX_MAX_CHECKS", type=click.IntRange(1), default=15)
@_opt("--check-retry-base", "OUTBOX_CHECK_RETRY_BASE", type=DURATION, default="10s")
@_opt("--check-retry-max", "OUTBOX_CHECK_RETRY_MAX", type=DURATION, default="10m")
@_opt(
    "--remote-checkback",
    "OUTBOX_REMOTE_CHECKBACK",
    multiple=True,
    help="TOPIC_PATTERN=URL of a producer's check-back endpoint, asked over signed HTTP "
    "when --app has no check-back for the topic; repeatable, first match wins.",
)
@_opt(
    "--checkback-secret-env",
    "OUTBOX_CHECKBACK_SECRET_ENV",
    default="OUTBOX_CHECKBACK_SECRET",
    help="Name of the environment variable holding the remote check-backs' shared secret "
    "(never on the command line, where ps would show it).",
)
@_opt("--retention", "OUTBOX_RETENTION", type=DURATION, default="7d")
@_opt("--receipt-retention", "OUTBOX_RECEIPT_RETENTION", type=DURATION, default="30d")
@_opt("--metrics-port", "OUTBOX_METRICS_PORT", type=click.IntRange(0, 65535), default=None)
@_opt("--shutdown-timeout", "OUTBOX_SHUTDOWN_TIMEOUT", type=DURATION, default="20s")
def relay(
    database_url: str,
    amqp_url: str,
    exchange: str,
    app: str | None,
    relay_id: str | None,
    batch_size: int,
    keyless_workers: int,
    max_attempts: int,
    lease: timedelta,
    retry_base: timedelta,
    retry_max: timedelta,
    poll_min: timedelta,
    poll_max: timedelta,
    confirm_timeout: timedelta,
    unroutable: tuple[str, ...],
    unroutable_default: str,
    check_interval: timedelta,
    check_timeout: timedelta,
    check_concurrency: int,
    max_checks: int,
    check_retry_base: timedelta,
    check_retry_max: timedelta,
    remote_checkback: tuple[str, ...],
    checkback_secret_env: str,
    retention: timedelta,
    receipt_retention: timedelta,
    metrics_port: int | None,
    shutdown_timeout: timedelta,
) -> None:
    """Publish committed outbox messages to RabbitMQ until SIGTERM or SIGINT."""
    checkbacks: CheckbackSource | None = None
    if app is not None:
        loaded = import_object(app)
        log = get_logger("outbox.relay")
        if callable(getattr(loaded, "checkback_for", None)):
            checkbacks = loaded
            topics = getattr(loaded, "checkback_topics", [])
            log.info("relay.app_loaded", app=app, checkbacks=topics)
        else:
            log.warning("relay.app_without_checkbacks", app=app, type=type(loaded).__name__)
    remote = _remote_checkbacks(remote_checkback)
    secret = os.environ.get(checkback_secret_env) if remote else None
    if remote and not secret:
        raise click.UsageError(
            f"--remote-checkback needs the shared secret in ${checkback_secret_env} "
            "(the one the producer's CheckbackServer uses)"
        )
    extra: dict[str, Any] = {"relay_id": relay_id} if relay_id else {}
    config = RelayConfig(
        database_url=database_url,
        amqp_url=amqp_url,
        exchange=exchange,
        batch_size=batch_size,
        keyless_workers=keyless_workers,
        max_attempts=max_attempts,
        lease=lease,
        retry_base=retry_base,
        retry_max=retry_max,
        poll_min=poll_min,
        poll_max=poll_max,
        confirm_timeout=confirm_timeout,
        unroutable=_unroutable(unroutable),
        unroutable_default=UnroutablePolicy(unroutable_default),
        check_interval=check_interval,
        check_timeout=check_timeout,
        check_concurrency=check_concurrency,
        max_checks=max_checks,
        check_retry_base=check_retry_base,
        check_retry_max=check_retry_max,
        remote_checkbacks=remote,
        checkback_secret=secret,
        retention=retention,
        receipt_retention=receipt_retention,
        metrics_port=metrics_port,
        shutdown_timeout=shutdown_timeout,
        **extra,
    )
    try:
        config.validate()
    except ConfigurationError as e:
        raise click.UsageError(str(e)) from None
    asyncio.run(Relay(config, app=checkbacks).run())
