"""Durations typed by operators are read exactly, and anything else is refused with the forms."""

from __future__ import annotations

from datetime import timedelta

import pytest

from outbox.durations import ACCEPTED_FORMS, format_duration, parse_duration
from outbox.errors import ConfigurationError, OutboxError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500ms", timedelta(milliseconds=500)),
        ("30s", timedelta(seconds=30)),
        ("15m", timedelta(minutes=15)),
        ("2h", timedelta(hours=2)),
        ("7d", timedelta(days=7)),
        ("0s", timedelta(0)),
        ("1.5h", timedelta(minutes=90)),
        (".5s", timedelta(milliseconds=500)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1d2h3m4s5ms", timedelta(days=1, hours=2, minutes=3, seconds=4, milliseconds=5)),
        ("2m500ms", timedelta(minutes=2, milliseconds=500)),
        ("  10m\n", timedelta(minutes=10)),
        ("0.001ms", timedelta(microseconds=1)),
        ("36500d", timedelta(days=36500)),
    ],
)
def test_accepted_forms_give_the_exact_timedelta(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty duration"),
        ("   ", "empty duration"),
        ("30", "has no unit"),
        ("1.5", "has no unit"),
        ("-5m", "cannot be negative"),
        ("+5m", "cannot be negative or signed"),
        ("5 m", "cannot read"),
        ("5min", "cannot read"),
        ("5M", "cannot read"),  # never months
        ("7D", "cannot read"),
        ("1w", "cannot read"),
        ("abc", "cannot read"),
        ("1.h", "cannot read"),
        ("1h 30m", "cannot read"),
        ("30m1h", "largest first"),
        ("1m1m", "largest first"),
        ("5mss", "cannot read"),
        ("nan s", "cannot read"),
        ("1e3s", "cannot read"),
        ("99999999999d", "longer than the largest duration"),
    ],
)
def test_anything_else_is_refused_with_the_accepted_forms(text: str, why: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        parse_duration(text)

    message = str(caught.value)
    assert why in message
    assert ACCEPTED_FORMS in message
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, OutboxError)


def test_text_is_required() -> None:
    with pytest.raises(ConfigurationError, match="must be text, not int"):
        parse_duration(30)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (timedelta(0), "0s"),
        (timedelta(days=7), "7d"),
        (timedelta(hours=36), "1d12h"),
        (timedelta(minutes=90), "1h30m"),
        (timedelta(seconds=30, milliseconds=250), "30s250ms"),
        (timedelta(milliseconds=1, microseconds=500), "1.5ms"),
        (timedelta(seconds=1, microseconds=7), "1s0.007ms"),
    ],
)
def test_format_writes_what_parse_reads_back(value: timedelta, text: str) -> None:
    assert format_duration(value) == text
    assert parse_duration(text) == value


@pytest.mark.parametrize(
    "value",
    [timedelta(microseconds=1), timedelta(days=3, seconds=7, microseconds=999), timedelta.max],
)
def test_format_and_parse_round_trip_to_the_microsecond(value: timedelta) -> None:
    assert parse_duration(format_duration(value)) == value


def test_format_refuses_a_negative_duration() -> None:
    with pytest.raises(ValueError, match="negative"):
        format_duration(timedelta(seconds=-1))
