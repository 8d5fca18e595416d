"""Durations as operators type them (``30s``, ``15m``, ``2h``, ``7d``, ``1h30m``).

Used wherever a duration comes from the command line or the environment; the
framework's own configuration holds ``timedelta`` values, so this parser lives
only at the edge.
"""

from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal, InvalidOperation

from outbox.errors import ConfigurationError

__all__ = ["ACCEPTED_FORMS", "format_duration", "parse_duration"]

# Microseconds per unit, largest first: the order a compound duration must use.
_UNITS: dict[str, int] = {
    "d": 86_400_000_000,
    "h": 3_600_000_000,
    "m": 60_000_000,
    "s": 1_000_000,
    "ms": 1_000,
}
_ORDER = list(_UNITS)

# One "<number><unit>" part. "ms" is tried before "m" and "s" so that "500ms" is not
# read as 500 minutes followed by garbage. No sign is accepted: a negative duration is
# always a typo for these uses (an age, a delay), and "-" is refused as garbage.
_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ms|d|h|m|s)")

ACCEPTED_FORMS = (
    "a number followed by a unit, ms, s, m, h or d (for example 500ms, 30s, 15m, 2h, 7d, "
    "1.5h), or several of them largest unit first without spaces (1h30m)"
)
"""How ``parse_duration`` input must look; quoted in its error messages."""


def parse_duration(text: str) -> timedelta:
    """Return the non-negative ``timedelta`` that ``text`` spells.

    Accepts ``<number><unit>`` with unit ``ms``, ``s``, ``m`` (minutes), ``h``
    or ``d``, a decimal number (``1.5h``), and compounds of such parts with the
    largest unit first, each unit at most once (``1d12h``, ``2m30s``). Leading
    and trailing whitespace is ignored; units are lower case only, so that
    ``M`` is never taken for months. Precision is one microsecond (finer parts
    are rounded).

    Raises ``ConfigurationError`` (a ``ValueError``) for anything else: an empty
    string, a bare number without unit, a sign, an unknown unit, units out of
    order or repeated, or a value too large for ``timedelta``. The message
    shows the accepted forms.
    """
    if not isinstance(text, str):
        raise ConfigurationError(
            f"a duration must be text, not {type(text).__name__}; use {ACCEPTED_FORMS}"
        )
    stripped = text.strip()
    if not stripped:
        raise ConfigurationError(f"empty duration; use {ACCEPTED_FORMS}")
    micros = Decimal(0)
    position = 0
    last_unit = -1
    while position < len(stripped):
        match = _PART.match(stripped, position)
        if match is None:
            raise ConfigurationError(_bad(text, _hint(stripped, position)))
        number, unit = match.groups()
        rank = _ORDER.index(unit)
        if rank <= last_unit:
            raise ConfigurationError(_bad(text, "units must go largest first, each once"))
        last_unit = rank
        try:
            micros += Decimal(number) * _UNITS[unit]
        except InvalidOperation:  # the regex admits only plain decimals; kept for safety
            raise ConfigurationError(_bad(text, f"{number!r} is not a number")) from None
        position = match.end()
    try:
        return timedelta(microseconds=int(micros.to_integral_value()))
    except OverflowError:
        raise ConfigurationError(
            _bad(text, f"longer than the largest duration, {timedelta.max.days} days")
        ) from None


def format_duration(value: timedelta) -> str:
    """Return ``value`` in the form ``parse_duration`` reads (``timedelta(hours=36)`` -> ``1d12h``).

    ``parse_duration(format_duration(d)) == d`` for every non-negative ``d``
    that is a whole number of microseconds. Raises ``ValueError`` for a
    negative ``value``, which ``parse_duration`` would not accept back.
    """
    if value < timedelta(0):
        raise ValueError(f"cannot format a negative duration ({value!r})")
    remaining = (value.days * 86_400 + value.seconds) * 1_000_000 + value.microseconds
    if remaining == 0:
        return "0s"
    parts: list[str] = []
    for unit, size in _UNITS.items():
        count, remaining = divmod(remaining, size)
        if count:
            parts.append(f"{count}{unit}")
    if remaining:  # below a millisecond: write it as a fraction of one
        micro = f"{remaining / 1000:.3f}".rstrip("0")
        if parts and parts[-1].endswith("ms"):
            whole = int(parts.pop()[:-2])
            micro = f"{whole + remaining / 1000:.3f}".rstrip("0")
        parts.append(f"{micro}ms")
    return "".join(parts)


def _hint(text: str, position: int) -> str:
    rest = text[position:]
    if rest[0] in "+-":
        return "durations cannot be negative or signed"
    if re.fullmatch(r"\d+(?:\.\d+)?", rest):
        return f"{rest!r} has no unit"
    return f"cannot read {rest!r}"


def _bad(text: str, why: str) -> str:
    return f"invalid duration {text!r}: {why}; use {ACCEPTED_FORMS}"
