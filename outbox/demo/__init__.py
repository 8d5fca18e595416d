"""``outbox demo``: the whole framework at work in one process, told as a story.

With no arguments it runs on the embedded default (a SQLite file in a temporary
folder and the in-memory broker), so it needs nothing installed but the package;
``--database-url`` and ``--amqp-url`` run the same story on PostgreSQL and
RabbitMQ. ``run_demo`` is the same thing as a function (the tests call it).
"""

from __future__ import annotations

import asyncio
from typing import TextIO

from outbox.demo.narrator import Narrator
from outbox.demo.story import DemoError, Summary, run_story

__all__ = ["DemoError", "Summary", "run_demo"]


def run_demo(
    database_url: str | None = None,
    amqp_url: str | None = None,
    *,
    pace: float = 0.6,
    stream: TextIO | None = None,
) -> Summary:
    """Tell the story and print the summary table; return the summary.

    ``pace``: seconds to pause after each chapter's heading and finding (0 for
    tests). Raises ``DemoError`` if a chapter does not finish in time.
    """
    narrator = Narrator(pace, stream)
    summary = asyncio.run(run_story(narrator, database_url, amqp_url))
    narrator.info("")
    narrator.title("Summary")
    narrator.table(summary.rows())
    narrator.info(
        "\nNext: README.md for the API, docs/ for guarantees and operations, "
        "`outbox --help` for the commands."
    )
    return summary
