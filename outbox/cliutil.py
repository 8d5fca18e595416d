"""Pieces shared by the commands of every package: durations, imports, lazy subcommands."""

from __future__ import annotations

import importlib
import os
import sys
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import click

from outbox.durations import parse_duration
from outbox.errors import ConfigurationError

__all__ = ["DURATION", "Duration", "LazyGroup", "import_object"]


# click 8.2+ makes ParamType generic; 8.1 does not subscript at run time.
if TYPE_CHECKING:
    _DurationBase = click.ParamType[timedelta]
else:
    _DurationBase = click.ParamType


class Duration(_DurationBase):
    """A click parameter that takes ``500ms``, ``30s``, ``15m``, ``2h``, ``7d``."""

    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> timedelta:
        if isinstance(value, timedelta):
            return value
        try:
            return parse_duration(value)
        except ConfigurationError as e:
            self.fail(str(e), param, ctx)


DURATION = Duration()


def import_object(spec: str) -> Any:
    """Import ``module:attribute`` (attribute may be dotted) and return the object.

    Raises ``ConfigurationError`` saying which part was not found.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigurationError(
            f"{spec!r} is not of the form module:object (for example myapp.messaging:ob)"
        )
    if "" not in sys.path and os.getcwd() not in sys.path:
        # As `python -m` does: the application's modules are found from where it is run.
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigurationError(
            f"cannot import module {module_name!r} ({e}); is it on PYTHONPATH / installed?"
        ) from e
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigurationError(f"module {module_name!r} has no {attribute!r}") from None
    return obj


class LazyGroup(click.Group):
    """A group whose listed subcommands are imported only when used.

    Keeps ``outbox db ...`` fast and free of the relay's and consumer's imports.
    """

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            command = import_object(self.lazy[cmd_name])
            if not isinstance(command, click.Command):
                raise TypeError(f"{self.lazy[cmd_name]} is not a click command")
            return command
        return super().get_command(ctx, cmd_name)
