"""Paced, readable terminal output for ``outbox demo``."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

import click

__all__ = ["Narrator"]


class Narrator:
    """Prints the story: numbered chapters, what happens, and what it shows.

    ``pace`` is the pause in seconds after each chapter's heading and each
    finding, so a reader can follow; 0 runs flat out (tests). Handlers call
    ``event`` from worker threads, hence the lock.
    """

    def __init__(self, pace: float = 0.6, stream: TextIO | None = None) -> None:
        self.pace = pace
        self._out = stream or sys.stdout
        self._color = self._out.isatty()
        self._chapter = 0
        self._lock = threading.Lock()

    def _echo(self, text: str, **style: object) -> None:
        with self._lock:
            click.echo(click.style(text, **style) if self._color and style else text, self._out)  # type: ignore[arg-type]

    def title(self, text: str) -> None:
        """The banner at the start."""
        self._echo(text, bold=True)
        self._echo("=" * len(text))

    def chapter(self, title: str, why: str) -> None:
        """Start chapter N: a title and one line on what it demonstrates."""
        self._chapter += 1
        self._echo("")
        self._echo(f"{self._chapter}. {title}", bold=True, fg="cyan")
        self._echo(f"   {why}", dim=True)
        self._pause()

    def step(self, text: str) -> None:
        """Something the demo does."""
        self._echo(f"   > {text}")

    def event(self, who: str, text: str) -> None:
        """Something a component did (relay, consumer, partner...)."""
        self._echo(f"     [{who}] {text}", fg="yellow")

    def shows(self, text: str) -> None:
        """What the chapter proved."""
        self._echo(f"   = {text}", fg="green")
        self._pause()

    def info(self, text: str) -> None:
        """Plain text (setup, hints)."""
        self._echo(text)

    def table(self, rows: list[tuple[str, object]]) -> None:
        """A two-column table: name, value."""
        width = max(len(name) for name, _ in rows)
        line = "+" + "-" * (width + 2) + "+" + "-" * 10 + "+"
        self._echo(line)
        for name, value in rows:
            self._echo(f"| {name.ljust(width)} | {str(value).rjust(8)} |")
        self._echo(line)

    def _pause(self) -> None:
        if self.pace > 0:
            time.sleep(self.pace)
