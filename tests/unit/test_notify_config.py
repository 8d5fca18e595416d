"""The notify service's configuration, signature and circuit breaker, without any service.

Configuration errors name the file, the subscription and the field, and say what
to do; a signed call verifies with the secret only, and not when anything in it
changed or it is too old; the breaker opens, postpones and probes as specified.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from consumer.notify import encode_body, load_config, request_headers, verify
from consumer.notify.breaker import BreakerState, CircuitBreaker
from consumer.notify.config import DEFAULT_SCHEDULE
from outbox.cli import cli
from outbox.errors import ConfigurationError

pytestmark = pytest.mark.unit

SECRET = "partner-secret-0123456789abcdef"
ENV = {"PARTNER_SECRET": SECRET, "OUTBOX_NOTIFY_TOKEN": "service-token-0123456789abcdef"}

EXAMPLE = """\
api_port = 8089                       # the query API
[[subscription]]
name = "partner"
topics = ["payments.*"]               # RabbitMQ topic patterns
url = "https://partner.example/hooks/payments"
secret_env = "PARTNER_SECRET"         # the HMAC secret is read from this environment variable
schedule = ["0s", "5s", "5m", "30m", "2h", "5h", "10h", "10h"]
timeout = "10s"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "notify.toml"
    path.write_text(text)
    return path


def with_subscription(**fields: Any) -> str:
    values = {
        "name": '"partner"',
        "topics": '["payments.*"]',
        "url": '"https://partner.example/hooks"',
        "secret_env": '"PARTNER_SECRET"',
        **fields,
    }
    body = "\n".join(f"{k} = {v}" for k, v in values.items() if v is not None)
    return f"[[subscription]]\n{body}\n"


# -- configuration --------------------------------------------------------------------


def test_the_example_of_the_issue_loads_with_its_values(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, EXAMPLE), ENV)

    [sub] = config.subscriptions
    assert config.api_port == 8089
    assert config.group == "notify"
    assert sub.name == "partner"
    assert sub.topics == ("payments.*",)
    assert sub.url == "https://partner.example/hooks/payments"
    assert sub.secret == SECRET
    assert sub.schedule == DEFAULT_SCHEDULE
    assert len(sub.schedule) == 8
    assert sub.timeout == timedelta(seconds=10)


def test_secrets_and_tokens_stay_out_of_repr_and_the_start_up_description(
    tmp_path: Path,
) -> None:
    config = load_config(write(tmp_path, EXAMPLE), ENV)

    shown = repr(config) + repr(config.describe())
    assert SECRET not in shown
    assert ENV["OUTBOX_NOTIFY_TOKEN"] not in shown
    assert "PARTNER_SECRET" in shown


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"schedule": '["0s", "5x"]'}, "'partner': schedule[1]: invalid duration '5x'"),
        ({"schedule": "[]"}, "'partner': schedule: give at least one delay"),
        ({"timeout": '"10"'}, "'partner': timeout: invalid duration '10': '10' has no unit"),
        ({"timeout": "10"}, 'timeout: write durations as strings, like "30s"'),
        ({"url": '"ftp://partner.example/x"'}, "'partner': url: 'ftp://partner.example/x' must"),
        ({"url": '"https:///hooks"'}, "url: 'https:///hooks' has no host"),
        ({"topics": '["payments.**"]'}, "'partner': topics: topic pattern 'payments.**'"),
        ({"topics": "[]"}, "topics: give at least one topic pattern"),
        ({"secret_env": '"MISSING_SECRET"'}, "secret_env: the environment variable MISSING_"),
        ({"secret_env": '"s3cr3t value!"'}, "never the secret itself"),
        ({"secret_env": None}, "'partner': secret_env: missing; name the environment variable"),
        ({"name": None}, "[[subscription]] #1: name: missing"),
        ({"name": '"two words"'}, "name 'two words': use letters, digits"),
        ({"timout": '"5s"'}, "'partner': timout: unknown setting; known ones are"),
        ({"concurrency": "0"}, "concurrency: must be 1-1000"),
        ({"breaker_threshold": "true"}, "breaker_threshold: must be a whole number"),
        ({"token_env": '"NO_SUCH_TOKEN"'}, "token_env: the environment variable NO_SUCH_TOKEN"),
    ],
)
def test_a_bad_subscription_is_refused_naming_file_subscription_and_field(
    tmp_path: Path, fields: dict[str, Any], expected: str
) -> None:
    path = write(tmp_path, with_subscription(**fields))

    with pytest.raises(ConfigurationError) as caught:
        load_config(path, ENV)

    message = str(caught.value)
    assert message.startswith(f"{path}: [[subscription]] ")
    assert expected in message


def test_a_short_secret_is_refused_with_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"\$PARTNER_SECRET must hold at least 16"):
        load_config(write(tmp_path, with_subscription()), {**ENV, "PARTNER_SECRET": "short"})


def test_duplicate_names_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, with_subscription() + with_subscription())

    with pytest.raises(ConfigurationError, match="'partner': name: used twice"):
        load_config(path, ENV)


@pytest.mark.parametrize(
    ("text", "environ", "expected"),
    [
        ("", ENV, "no subscriptions: add a [[subscription]] table"),
        ("api_port = 8089\n" + with_subscription(), {"PARTNER_SECRET": SECRET}, "OUTBOX_NOTIFY"),
        ('lease = "3s"\n' + with_subscription(), ENV, "lease (3s) must be at least twice"),
        ('lease = "soon"\n' + with_subscription(), ENV, "lease: invalid duration 'soon'"),
        ('group = "no spaces"\n' + with_subscription(), ENV, "consumer group 'no spaces'"),
        ('api_port = "8089"\n' + with_subscription(), ENV, "api_port: must be a port number"),
        ("api_prot = 8089\n" + with_subscription(), ENV, "api_prot: unknown setting"),
        ("subscription = 1\n", ENV, "subscription: write each one as a [[subscription]]"),
        ("api_port = \n", ENV, "not valid TOML"),
    ],
)
def test_a_bad_service_setting_is_refused_naming_the_file(
    tmp_path: Path, text: str, environ: dict[str, str], expected: str
) -> None:
    path = write(tmp_path, text)

    with pytest.raises(ConfigurationError) as caught:
        load_config(path, environ)

    assert str(caught.value).startswith(f"{path}: ")
    assert expected in str(caught.value)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"nowhere\.toml: no such file"):
        load_config(tmp_path / "nowhere.toml", ENV)


def test_the_schedule_gives_the_delay_before_each_next_attempt_and_a_fresh_round(
    tmp_path: Path,
) -> None:
    config = load_config(write(tmp_path, with_subscription(schedule='["0s", "1s", "2m"]')), ENV)
    [sub] = config.subscriptions
    s = timedelta(seconds=1)

    assert [sub.delay_after(n, 3) for n in (1, 2, 3)] == [s, 2 * 60 * s, None]
    # After a manual retry the row allows 3 more: the same delays again, then nothing.
    assert [sub.delay_after(n, 6) for n in (4, 5, 6)] == [s, 2 * 60 * s, None]
    assert sub.matches("payments.captured")
    assert not sub.matches("payments.captured.late")


# -- signature ------------------------------------------------------------------------


def signed_call(now: float = 1_800_000_000) -> tuple[bytes, dict[str, str]]:
    from datetime import UTC, datetime

    body = encode_body(
        message_id="0190a1b2-0000-7000-8000-000000000001",
        topic="payments.captured",
        key=None,
        payload={"amount": 5, "note": "café"},
        timestamp=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    )
    headers = request_headers(
        secret=SECRET,
        body=body,
        message_id="0190a1b2-0000-7000-8000-000000000001",
        topic="payments.captured",
        attempt=3,
        now=now,
    )
    return body, headers


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    body, headers = signed_call()

    expected = hmac.new(SECRET.encode(), b"1800000000." + body, hashlib.sha256).hexdigest()
    assert headers["X-Outbox-Signature"] == f"v1={expected}"
    assert headers["X-Outbox-Timestamp"] == "1800000000"
    assert headers["X-Outbox-Attempt"] == "3"
    assert headers["X-Outbox-Message-Id"] == "0190a1b2-0000-7000-8000-000000000001"
    assert headers["X-Outbox-Topic"] == "payments.captured"
    assert body.startswith(b'{"message_id":"0190a1b2-0000-7000-8000-000000000001",')
    assert '"timestamp":"2026-01-02T03:04:05+00:00"' in body.decode()


def test_a_genuine_call_verifies_and_any_change_does_not() -> None:
    body, headers = signed_call()
    ts, sig = headers["X-Outbox-Timestamp"], headers["X-Outbox-Signature"]
    now = 1_800_000_000 + 60

    assert verify(SECRET, body, timestamp=ts, signature=sig, now=now)
    assert not verify("another-secret-0123456789", body, timestamp=ts, signature=sig, now=now)
    assert not verify(SECRET, body + b" ", timestamp=ts, signature=sig, now=now)
    assert not verify(SECRET, body, timestamp="1800000001", signature=sig, now=now)
    assert not verify(SECRET, body, timestamp=ts, signature=None, now=now)
    assert not verify(SECRET, body, timestamp=None, signature=sig, now=now)
    assert not verify(SECRET, body, timestamp=ts, signature=sig.upper(), now=now)


def test_a_call_older_than_the_tolerance_is_refused() -> None:
    body, headers = signed_call()
    ts, sig = headers["X-Outbox-Timestamp"], headers["X-Outbox-Signature"]

    assert verify(SECRET, body, timestamp=ts, signature=sig, now=1_800_000_000 + 299)
    assert not verify(SECRET, body, timestamp=ts, signature=sig, now=1_800_000_000 + 301)
    assert not verify(SECRET, body, timestamp=ts, signature=sig, now=1_800_000_000 - 301)
    assert verify(
        SECRET,
        body,
        timestamp=ts,
        signature=sig,
        now=1_800_000_000 + 3600,
        tolerance=timedelta(hours=2),
    )


# -- circuit breaker ------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_breaker_opens_after_n_consecutive_failures_only() -> None:
    clock = Clock()
    breaker = CircuitBreaker(3, timedelta(seconds=10), clock)

    assert [breaker.failed(), breaker.failed()] == [False, False]
    assert breaker.succeeded() is False  # a success in between starts the count again
    assert [breaker.failed(), breaker.failed(), breaker.failed()] == [False, False, True]
    assert breaker.state is BreakerState.OPEN
    assert breaker.allowed() == 0
    assert breaker.remaining() == 10.0


def test_after_the_cooldown_one_probe_goes_out_and_its_outcome_decides() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, timedelta(seconds=10), clock)
    breaker.failed()
    clock.now += 10

    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allowed() == 1
    breaker.started()
    assert breaker.allowed() == 0  # the probe is out: nobody else
    assert breaker.failed() is True  # the probe failed: another cooldown
    assert breaker.state is BreakerState.OPEN
    assert breaker.remaining() == 10.0
    clock.now += 10
    breaker.started()
    assert breaker.succeeded() is True
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allowed() is None


# -- command line ---------------------------------------------------------------------


def test_notify_without_config_or_subcommand_says_what_to_give() -> None:
    result = CliRunner().invoke(cli, ["notify"], env={"OUTBOX_NOTIFY_CONFIG": None})

    assert result.exit_code == 2
    assert "give --config FILE" in result.output
    assert "show, list, retry" in result.output


def test_notify_config_with_a_subcommand_is_refused() -> None:
    result = CliRunner().invoke(cli, ["notify", "--config", "x.toml", "list", "--token", "t"])

    assert result.exit_code == 2
    assert "--config runs the service" in result.output


def test_the_subcommands_say_when_the_api_is_unreachable() -> None:
    result = CliRunner().invoke(
        cli,
        ["notify", "show", "0190a1b2-0000-7000-8000-000000000001"],
        env={"OUTBOX_NOTIFY_TOKEN": "t" * 20, "OUTBOX_NOTIFY_API_URL": "http://127.0.0.1:9"},
    )

    assert result.exit_code == 1
    assert "cannot reach the notify API at http://127.0.0.1:9" in result.output


def test_the_service_refuses_a_bad_config_before_connecting(tmp_path: Path) -> None:
    path = write(tmp_path, with_subscription(schedule='["0s", "5x"]'))
    result = CliRunner().invoke(
        cli,
        ["notify", "--config", str(path), "--database-url", "sqlite:///x.db"],
        env=ENV,
    )

    assert result.exit_code != 0
    assert isinstance(result.exception, ConfigurationError)
    assert "schedule[1]: invalid duration '5x'" in str(result.exception)
