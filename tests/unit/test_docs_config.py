"""docs/configuration.md matches the code: every setting, flag, variable and default.

The tables of the page are read back and compared with the dataclasses
(``RelayConfig``, ``ConsumerConfig``), the keyword arguments of ``Consumer`` and
``Consumer.handler``, and the options of the click commands. Something added to
the code and not to the page fails here, and so does something the page still
names after the code dropped it.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
import pytest

from consumer import Consumer, ConsumerConfig
from consumer.cli import consume
from outbox.cli import cli
from outbox.durations import format_duration
from relay import RelayConfig
from relay.cli import relay

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
NONE = "—"
REQUIRED = "required"
UNSET = getattr(click.core, "UNSET", None)  # click >= 8.2 marks "no default" with a sentinel


@dataclass(frozen=True)
class Row:
    """One line of a settings table, its cells as written (backticks removed)."""

    setting: str | None
    flag: str | None
    env: str | None
    default: str
    line: str


def cell(text: str) -> str | None:
    """The first code span of a cell, or the cell's text; None for a dash."""
    text = text.strip()
    if text == NONE:
        return None
    span = re.search(r"`([^`]*)`", text)
    return span.group(1) if span else text


def section(heading: str) -> list[Row]:
    """The rows of the table under ``heading`` (up to the next heading of any level)."""
    lines = DOC.read_text().splitlines()
    assert heading in lines, f"{DOC.name} has no heading {heading!r}"
    rows: list[Row] = []
    for line in lines[lines.index(heading) + 1 :]:
        if line.startswith("#"):
            break
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "setting":
            assert cells[:4] == ["setting", "flag", "environment", "default"], line
            continue
        flag = cell(cells[1])
        rows.append(
            Row(
                setting=cell(cells[0]),
                flag=flag.split()[0] if flag else None,  # `--unroutable PATTERN=POLICY`
                env=cell(cells[2]),
                default=cell(cells[3]) or NONE,
                line=line,
            )
        )
    assert rows, f"no table under {heading!r}"
    return rows


def render(value: Any) -> str:
    """A default as the page writes it."""
    if value is dataclasses.MISSING or value is inspect.Parameter.empty:
        return REQUIRED
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, timedelta):
        return format_duration(value)
    if isinstance(value, tuple):
        return " ".join(render(v) for v in value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {render(v)}" for k, v in value.items()) + "}"
    return str(value)


def dataclass_defaults(cls: type) -> dict[str, Any]:
    defaults: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
        else:
            defaults[f.name] = f.default
    return defaults


def signature_defaults(function: Any, skip: tuple[str, ...] = ("self",)) -> dict[str, Any]:
    return {
        name: p.default
        for name, p in inspect.signature(function).parameters.items()
        if name not in skip
    }


def options(command: click.Command) -> list[click.Option]:
    """The command's settings: options read from an environment variable."""
    return [p for p in command.params if isinstance(p, click.Option) and p.envvar]


def option_default(opt: click.Option) -> Any:
    """The option's default as the command converts it; None when it has none."""
    if opt.default is None or opt.default is UNSET or (opt.multiple and not opt.default):
        return None
    default = opt.default
    return opt.type.convert(default, opt, None) if isinstance(default, str) else default


def check_table(
    rows: list[Row],
    settings: dict[str, Any],
    command_options: list[click.Option],
) -> None:
    """Every setting once with its default; every option once with its variable.

    ``settings``: name -> default of the dataclass fields or keyword arguments the
    table documents. ``command_options``: the options whose flags belong in it.
    """
    named = [r.setting for r in rows if r.setting is not None]
    assert sorted(named) == sorted(settings), (
        f"not in the page: {sorted(set(settings) - set(named))}; not in the code: "
        f"{sorted(set(named) - set(settings))}; listed twice: {_twice(named)}"
    )
    by_flag = {o.opts[0]: o for o in command_options}
    flags = [r.flag for r in rows if r.flag is not None]
    assert sorted(flags) == sorted(by_flag), (
        f"not in the page: {sorted(set(by_flag) - set(flags))}; no such flag: "
        f"{sorted(set(flags) - set(by_flag))}; listed twice: {_twice(flags)}"
    )
    for row in rows:
        assert row.setting is not None or row.flag is not None, row.line
        if row.setting is not None:
            expected = settings[row.setting]
            if row.setting == "relay_id":
                # Computed per process: the page names its parts.
                assert row.default == "hostname-pid", row.line
                assert str(RelayConfig(database_url="sqlite://").relay_id).endswith(
                    f"-{os.getpid()}"
                )
            else:
                assert row.default == render(expected), f"default {render(expected)}: {row.line}"
        if row.flag is None:
            continue
        opt = by_flag[row.flag]
        assert row.env == opt.envvar, f"{row.flag} reads {opt.envvar}: {row.line}"
        assert opt.name is not None
        if row.setting is None:
            assert opt.name not in settings, f"{row.flag} sets `{opt.name}`: {row.line}"
            default = option_default(opt)
            assert row.default == render(default), f"{row.flag} defaults to {default}"
        else:
            # The flag's name is the setting's (`--remote-checkback` fills `remote_checkbacks`).
            assert row.setting.startswith(opt.name), f"{row.flag} sets `{opt.name}`: {row.line}"
            default = option_default(opt)
            if default is not None and settings[row.setting] is not dataclasses.MISSING:
                assert default == settings[row.setting], (
                    f"{row.flag} defaults to {default!r}, {row.setting} to "
                    f"{settings[row.setting]!r}: the command and the code disagree"
                )


def _twice(names: list[str]) -> list[str]:
    return sorted({n for n in names if names.count(n) > 1})


def test_the_options_of_every_command_are_documented() -> None:
    check_table(section("## Every command"), {}, options(cli))


def test_relay_settings_flags_variables_and_defaults_match_the_code() -> None:
    rows = section("## Relay")
    check_table(rows, dataclass_defaults(RelayConfig), options(relay))
    # A setting without a flag is read from a variable only when a flag names that variable.
    for row in rows:
        if row.flag is None and row.env is not None:
            readers = [o for o in options(relay) if o.default == row.env]
            assert readers, f"no option names the variable {row.env}: {row.line}"


def test_consumer_settings_flags_variables_and_defaults_match_the_code() -> None:
    consumer_args = signature_defaults(Consumer.__init__)
    config_fields = dataclass_defaults(ConsumerConfig)
    flags = options(consume)
    assert all(o.name in (*consumer_args, *config_fields) for o in flags), [o.name for o in flags]
    check_table(
        section("### `Consumer(...)`"),
        consumer_args,
        [o for o in flags if o.name in consumer_args],
    )
    check_table(
        section("### `ConsumerConfig`"),
        config_fields,
        [o for o in flags if o.name in config_fields],
    )


def test_handler_options_match_the_decorator() -> None:
    check_table(
        section("### Handler options (`@consumer.handler`)"),
        signature_defaults(Consumer.handler),
        [],
    )


def all_parameters() -> list[click.Parameter]:
    """Every parameter of every `outbox` command, the lazily loaded ones included."""
    found: list[click.Parameter] = []
    ctx = click.Context(cli, info_name="outbox")

    def walk(command: click.Command) -> None:
        found.extend(command.params)
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                assert sub is not None, name
                walk(sub)

    walk(cli)
    return found


def test_the_page_names_no_flag_or_variable_that_does_not_exist() -> None:
    text = DOC.read_text()
    parameters = all_parameters()
    # --help is added by click to every command, outside its parameters.
    known_flags = {"--help"} | {o for p in parameters for o in (*p.opts, *p.secondary_opts)}
    known_vars: set[str] = set()
    for p in parameters:
        envvar = getattr(p, "envvar", None)
        known_vars.update([envvar] if isinstance(envvar, str) else envvar or [])
        if isinstance(p.default, str) and re.fullmatch(r"OUTBOX_[A-Z_]+", p.default):
            known_vars.add(p.default)  # a variable read by the name an option gives
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text))
    variables = set(re.findall(r"\bOUTBOX_[A-Z_]+\b", text))
    assert flags <= known_flags, f"no command has {sorted(flags - known_flags)}"
    assert variables <= known_vars, f"nothing reads {sorted(variables - known_vars)}"


@pytest.mark.parametrize(
    ("value", "written"),
    [
        (timedelta(milliseconds=500), "500ms"),
        (timedelta(days=7), "7d"),
        ((timedelta(seconds=1), timedelta(minutes=2)), "1s 2m"),
        (dataclasses.MISSING, REQUIRED),
        (None, "None"),
        ({}, "{}"),
    ],
)
def test_defaults_are_rendered_as_the_page_writes_them(value: object, written: str) -> None:
    assert render(value) == written
