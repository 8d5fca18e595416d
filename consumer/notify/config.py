"""The notify service's configuration: frozen dataclasses, and the TOML file they are read from.

::

    api_port = 8089
    [[subscription]]
    name = "partner"
    topics = ["payments.*"]
    url = "https://partner.example/hooks/payments"
    secret_env = "PARTNER_SECRET"
    schedule = ["0s", "5s", "5m", "30m", "2h", "5h", "10h", "10h"]
    timeout = "10s"

``load_config`` is the edge: it reads the file and the environment (the
subscriptions' secrets, ``OUTBOX_NOTIFY_TOKEN``) and names the file, the
subscription and the field in every error. The dataclasses hold values only and
check them in ``validate()``.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from consumer.config import validate_group
from outbox.checkback_server import MIN_SECRET_LENGTH
from outbox.durations import format_duration, parse_duration
from outbox.errors import ConfigurationError
from outbox.logs import redact_url
from outbox.topics import topic_matches, validate_pattern

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

__all__ = [
    "DEFAULT_SCHEDULE",
    "TOKEN_ENV",
    "NotifyConfig",
    "Subscription",
    "load_config",
]

TOKEN_ENV = "OUTBOX_NOTIFY_TOKEN"  # noqa: S105  (the variable's name, not a token)
"""The environment variable holding the query API's bearer token."""

DEFAULT_SCHEDULE: tuple[timedelta, ...] = tuple(
    parse_duration(d) for d in ("0s", "5s", "5m", "30m", "2h", "5h", "10h", "10h")
)
"""Eight attempts over about a day: quick retries for a blip, hours apart for an outage."""

_NAME = re.compile(r"[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+)*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MAX_NAME = 100  # outbox_notification.subscription is VARCHAR(100)
_MAX_SCHEDULE = 100  # attempts per round; more is a typo, not a retry policy
_TOKEN_HINT = "make one with python -c 'import secrets; print(secrets.token_urlsafe(32))'"  # noqa: S105


@dataclass(frozen=True, kw_only=True)
class Subscription:
    """One partner endpoint: which topics it gets, where, signed with which secret, how often.

    ``schedule`` is the delay before each attempt (the first counted from when
    the message arrived, each later one from the failure before it); its length
    is the number of attempts. ``concurrency`` bounds the calls in flight to the
    endpoint per notify process; after ``breaker_threshold`` consecutive failures
    the endpoint's circuit opens for ``breaker_cooldown``.
    """

    name: str
    topics: tuple[str, ...]
    """RabbitMQ topic patterns (``payments.*``, ``orders.#``)."""
    url: str
    """The endpoint, ``https://`` (or ``http://`` on a trusted network)."""
    secret: str = field(repr=False)
    """The HMAC-SHA256 key the calls are signed with; never logged."""
    secret_env: str = ""
    """The environment variable the secret came from (shown instead of it)."""
    schedule: tuple[timedelta, ...] = DEFAULT_SCHEDULE
    timeout: timedelta = timedelta(seconds=10)
    """The whole call: connect, send, answer."""
    concurrency: int = 4
    breaker_threshold: int = 5
    breaker_cooldown: timedelta = timedelta(seconds=30)
    token: str | None = field(default=None, repr=False)
    """A bearer token that reads (and retries) this subscription's notifications only, so the
    partner can reconcile through the query API; None: only the service token works."""
    token_env: str | None = None

    def validate(self) -> None:
        """Raise ``ConfigurationError`` saying which field is wrong and how to fix it."""
        if not isinstance(self.name, str) or _NAME.fullmatch(self.name) is None:
            raise ConfigurationError(
                f"name {self.name!r}: use letters, digits, '.', '_' or '-' (like 'partner')"
            )
        if len(self.name) > _MAX_NAME:
            raise ConfigurationError(f"name: at most {_MAX_NAME} characters")
        if not self.topics:
            raise ConfigurationError("topics: give at least one topic pattern, like 'payments.*'")
        for pattern in self.topics:
            try:
                validate_pattern(pattern)
            except ValueError as e:
                raise ConfigurationError(f"topics: {e}") from None
        _check_url(self.url)
        if not isinstance(self.secret, str) or len(self.secret) < MIN_SECRET_LENGTH:
            source = f"${self.secret_env}" if self.secret_env else "the secret"
            raise ConfigurationError(
                f"secret_env: {source} must hold at least {MIN_SECRET_LENGTH} characters; "
                "make one with python -c 'import secrets; print(secrets.token_hex(32))'"
            )
        if not self.schedule:
            raise ConfigurationError(
                'schedule: give at least one delay (["0s"] means one attempt, at once)'
            )
        if len(self.schedule) > _MAX_SCHEDULE:
            raise ConfigurationError(f"schedule: at most {_MAX_SCHEDULE} attempts")
        if any(d < timedelta(0) for d in self.schedule):
            raise ConfigurationError("schedule: delays must not be negative")
        if self.timeout <= timedelta(0):
            raise ConfigurationError("timeout: must be a positive duration, like '10s'")
        if not isinstance(self.concurrency, int) or not 1 <= self.concurrency <= 1000:
            raise ConfigurationError(f"concurrency: must be 1-1000, got {self.concurrency!r}")
        if not isinstance(self.breaker_threshold, int) or self.breaker_threshold < 1:
            raise ConfigurationError(
                f"breaker_threshold: must be >= 1 failures, got {self.breaker_threshold!r}"
            )
        if self.breaker_cooldown <= timedelta(0):
            raise ConfigurationError("breaker_cooldown: must be a positive duration, like '30s'")
        if self.token is not None and len(self.token) < MIN_SECRET_LENGTH:
            raise ConfigurationError(
                f"token_env: ${self.token_env} must hold at least {MIN_SECRET_LENGTH} "
                f"characters; {_TOKEN_HINT}"
            )

    def matches(self, topic: str) -> bool:
        """Tell whether a message of ``topic`` is for this subscription."""
        return any(topic_matches(pattern, topic) for pattern in self.topics)

    def delay_after(self, attempt: int, max_attempts: int) -> timedelta | None:
        """The wait after failed ``attempt`` before the next one; None when none is left.

        ``max_attempts`` is the row's: the schedule's length, plus the schedule's
        length again for each manual retry, so that a retried notification goes
        through the schedule once more (its first attempt at once).
        """
        if attempt >= max_attempts:
            return None
        round_start = max_attempts - len(self.schedule)
        # Clamped: a schedule shortened since the row was written still gives a delay.
        index = min(max(attempt - round_start, 0), len(self.schedule) - 1)
        return self.schedule[index]

    def describe(self) -> dict[str, Any]:
        """The subscription for logs: secrets named by their variable, never shown."""
        return {
            "name": self.name,
            "topics": list(self.topics),
            "url": redact_url(self.url),
            "secret_env": self.secret_env or None,
            "schedule": [format_duration(d) for d in self.schedule],
            "timeout": format_duration(self.timeout),
            "concurrency": self.concurrency,
            "breaker_threshold": self.breaker_threshold,
            "breaker_cooldown": format_duration(self.breaker_cooldown),
            "token_env": self.token_env,
        }


@dataclass(frozen=True, kw_only=True)
class NotifyConfig:
    """The whole service: its subscriptions, the consumer group it reads as, and its API."""

    subscriptions: tuple[Subscription, ...]
    token: str = field(repr=False)
    """The query API's bearer token (``OUTBOX_NOTIFY_TOKEN``): sees every subscription."""
    group: str = "notify"
    """The consumer group, hence the queue ``<queue_prefix>.<group>``."""
    exchange: str = "outbox"
    queue_prefix: str = "outbox"
    queue_type: Literal["quorum", "classic"] = "quorum"
    api_host: str = "127.0.0.1"
    """Where the query API listens; ``0.0.0.0`` to let partners reach it (put TLS in front)."""
    api_port: int = 8089
    """0: any free port (logged at start)."""
    metrics_port: int | None = None
    """Serve ``/metrics`` and ``/healthz`` here; None: not at all."""
    lease: timedelta = timedelta(seconds=60)
    """How long a claimed notification stays with the process that claimed it; a killed
    process's claims come back after this. Must cover every subscription's timeout twice."""
    poll_interval: timedelta = timedelta(milliseconds=500)
    """The longest wait between two looks for due notifications when there is no work."""
    shutdown_timeout: timedelta = timedelta(seconds=20)
    """On SIGTERM, how long calls in flight may finish; the rest come back when their lease
    lapses."""
    retention: timedelta = timedelta(days=30)
    """Delivered and abandoned notifications older than this (by creation) are deleted."""

    def validate(self) -> None:
        """Raise ``ConfigurationError`` naming the first unusable value."""
        if not self.subscriptions:
            raise ConfigurationError(
                "no subscriptions: add a [[subscription]] table with name, topics, url "
                "and secret_env"
            )
        names: set[str] = set()
        for sub in self.subscriptions:
            try:
                sub.validate()
            except ConfigurationError as e:
                raise ConfigurationError(f"[[subscription]] {sub.name!r}: {e}") from None
            if sub.name in names:
                raise ConfigurationError(
                    f"[[subscription]] {sub.name!r}: name: used twice; give each subscription "
                    "a name of its own (it keys its notifications in the database)"
                )
            names.add(sub.name)
            if self.lease < 2 * sub.timeout:
                raise ConfigurationError(
                    f"lease ({format_duration(self.lease)}) must be at least twice the timeout "
                    f"of [[subscription]] {sub.name!r} ({format_duration(sub.timeout)}), or a "
                    "slow call's claim could lapse and another process call again; raise "
                    "lease or lower timeout"
                )
        validate_group(self.group)
        if not isinstance(self.token, str) or len(self.token) < MIN_SECRET_LENGTH:
            raise ConfigurationError(
                f"${TOKEN_ENV} must hold the query API's bearer token, at least "
                f"{MIN_SECRET_LENGTH} characters; {_TOKEN_HINT}"
            )
        for name in ("api_port", "metrics_port"):
            port = getattr(self, name)
            if port is not None and (not isinstance(port, int) or not 0 <= port <= 65535):
                raise ConfigurationError(f"{name}: must be a port number 0-65535, got {port!r}")
        if self.queue_type not in ("quorum", "classic"):
            raise ConfigurationError(
                f"queue_type: must be 'quorum' or 'classic', not {self.queue_type!r}"
            )
        for name in ("lease", "poll_interval", "shutdown_timeout", "retention"):
            if getattr(self, name) <= timedelta(0):
                raise ConfigurationError(f"{name}: must be a positive duration")

    def subscription(self, name: str) -> Subscription | None:
        """The subscription called ``name``, or None."""
        return next((s for s in self.subscriptions if s.name == name), None)

    @property
    def topic_patterns(self) -> tuple[str, ...]:
        """Every subscribed pattern once, in the order the subscriptions list them."""
        return tuple(dict.fromkeys(p for s in self.subscriptions for p in s.topics))

    def describe(self) -> dict[str, Any]:
        """The configuration for the start-up log: no secret, no token."""
        return {
            "group": self.group,
            "exchange": self.exchange,
            "queue_prefix": self.queue_prefix,
            "api": f"{self.api_host}:{self.api_port}",
            "metrics_port": self.metrics_port,
            "lease": format_duration(self.lease),
            "retention": format_duration(self.retention),
            "subscriptions": [s.describe() for s in self.subscriptions],
        }


# -- the TOML file ---------------------------------------------------------------------

_SERVICE_KEYS = {
    "group",
    "exchange",
    "queue_prefix",
    "queue_type",
    "api_host",
    "api_port",
    "metrics_port",
    "lease",
    "poll_interval",
    "shutdown_timeout",
    "retention",
    "subscription",
}
_SUBSCRIPTION_KEYS = {
    "name",
    "topics",
    "url",
    "secret_env",
    "schedule",
    "timeout",
    "concurrency",
    "breaker_threshold",
    "breaker_cooldown",
    "token_env",
}
_SERVICE_DURATIONS = ("lease", "poll_interval", "shutdown_timeout", "retention")
_SUBSCRIPTION_DURATIONS = ("timeout", "breaker_cooldown")


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> NotifyConfig:
    """Read and validate the TOML file at ``path``; secrets come from ``environ`` (os.environ).

    Raises ``ConfigurationError`` whose message starts with the file's name and
    names the subscription and field at fault, with what to do about it.
    """
    env = os.environ if environ is None else environ
    where = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigurationError(f"{where}: no such file") from None
    except OSError as e:
        raise ConfigurationError(f"{where}: cannot read it ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigurationError(f"{where}: not valid TOML: {e}") from None
    try:
        return _build(data, env)
    except ConfigurationError as e:
        raise ConfigurationError(f"{where}: {e}") from None


def _build(data: dict[str, Any], env: Mapping[str, str]) -> NotifyConfig:
    _no_unknown_keys(data, _SERVICE_KEYS)
    raw_subs = data.get("subscription", [])
    if not isinstance(raw_subs, list) or not all(isinstance(s, dict) for s in raw_subs):
        raise ConfigurationError("subscription: write each one as a [[subscription]] table")
    subscriptions = tuple(
        _subscription(raw, index, env) for index, raw in enumerate(raw_subs, start=1)
    )
    values: dict[str, Any] = {}
    for key in _SERVICE_KEYS - {"subscription"}:
        if key in data:
            value = data[key]
            values[key] = _duration(key, value) if key in _SERVICE_DURATIONS else value
    for key in ("group", "exchange", "queue_prefix", "queue_type", "api_host"):
        if key in values and not isinstance(values[key], str):
            raise ConfigurationError(f"{key}: must be a string")
    for key in ("api_port", "metrics_port"):
        if key in values and (isinstance(values[key], bool) or not isinstance(values[key], int)):
            raise ConfigurationError(f"{key}: must be a port number, like 8089")
    config = NotifyConfig(subscriptions=subscriptions, token=env.get(TOKEN_ENV, ""), **values)
    config.validate()
    return config


def _subscription(raw: dict[str, Any], index: int, env: Mapping[str, str]) -> Subscription:
    name = raw.get("name")
    label = f"[[subscription]] {name!r}" if isinstance(name, str) else f"[[subscription]] #{index}"
    try:
        _no_unknown_keys(raw, _SUBSCRIPTION_KEYS)
        for key in ("name", "url", "secret_env"):
            if key not in raw:
                raise ConfigurationError(f"{key}: missing; {_REQUIRED[key]}")
            if not isinstance(raw[key], str):
                raise ConfigurationError(f"{key}: must be a string")
        topics = raw.get("topics")
        if isinstance(topics, str):
            topics = [topics]
        if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
            raise ConfigurationError('topics: must be a list of topic patterns, like ["orders.*"]')
        values: dict[str, Any] = {}
        for key in _SUBSCRIPTION_DURATIONS:
            if key in raw:
                values[key] = _duration(key, raw[key])
        if "schedule" in raw:
            schedule = raw["schedule"]
            if not isinstance(schedule, list):
                raise ConfigurationError('schedule: must be a list of durations, like ["0s", "5s"]')
            values["schedule"] = tuple(
                _duration(f"schedule[{i}]", d) for i, d in enumerate(schedule)
            )
        for key in ("concurrency", "breaker_threshold"):
            if key in raw:
                if isinstance(raw[key], bool) or not isinstance(raw[key], int):
                    raise ConfigurationError(f"{key}: must be a whole number")
                values[key] = raw[key]
        secret_env = _env_name("secret_env", raw["secret_env"])
        secret = env.get(secret_env)
        if secret is None:
            raise ConfigurationError(
                f"secret_env: the environment variable {secret_env} is not set; set it to "
                "the secret shared with this endpoint (the calls are signed with it)"
            )
        token: str | None = None
        token_env: str | None = None
        if "token_env" in raw:
            token_env = _env_name("token_env", raw["token_env"])
            token = env.get(token_env)
            if token is None:
                raise ConfigurationError(
                    f"token_env: the environment variable {token_env} is not set; set it to "
                    "the token this subscription's partner reads its notifications with, or "
                    "drop token_env"
                )
        sub = Subscription(
            name=raw["name"],
            topics=tuple(topics),
            url=raw["url"],
            secret=secret,
            secret_env=secret_env,
            token=token,
            token_env=token_env,
            **values,
        )
        sub.validate()
    except ConfigurationError as e:
        raise ConfigurationError(f"{label}: {e}") from None
    return sub


_REQUIRED = {
    "name": 'give the subscription a name, like name = "partner"',
    "url": 'give the endpoint, like url = "https://partner.example/hooks"',
    "secret_env": "name the environment variable that holds the signing secret, like "
    'secret_env = "PARTNER_SECRET"',
}


def _no_unknown_keys(raw: dict[str, Any], known: set[str]) -> None:
    # A typo (timout = "5s") would otherwise fall back to the default without a word.
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigurationError(
            f"{unknown[0]}: unknown setting; known ones are {', '.join(sorted(known))}"
        )


def _duration(key: str, value: object) -> timedelta:
    if not isinstance(value, str):
        raise ConfigurationError(f'{key}: write durations as strings, like "30s", not {value!r}')
    try:
        return parse_duration(value)
    except ConfigurationError as e:
        raise ConfigurationError(f"{key}: {e}") from None


def _env_name(key: str, value: str) -> str:
    if _ENV_NAME.fullmatch(value) is None:
        raise ConfigurationError(
            f"{key}: {value!r} is not an environment variable name; give the variable's "
            "name (like PARTNER_SECRET), never the secret itself"
        )
    return value


def _check_url(url: object) -> None:
    if not isinstance(url, str):
        raise ConfigurationError("url: must be a string")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ConfigurationError(
            f"url: {redact_url(url)!r} must start with https:// (or http:// on a trusted network)"
        )
    if not parts.hostname:
        raise ConfigurationError(f"url: {redact_url(url)!r} has no host")
