"""Periodic maintenance jobs (APScheduler) whose runs a stop waits for.

``AsyncIOScheduler.shutdown()`` cancels a run already going (a purge halfway
through its batches) and does not wait for it: the run then unwinds after the
service has disposed its engine, and its database connection outlives it (with
aiosqlite, that can leave the event loop unable to close). ``Jobs`` keeps track
of the runs, and ``stop`` lets them finish (they check the service's stopping
flag between batches), cancelling and awaiting them only after a timeout.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from outbox.tasks import finish_or_cancel

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["Jobs"]


class Jobs:
    """Interval jobs on the running event loop; one run of each at a time."""

    def __init__(self) -> None:
        self._scheduler = AsyncIOScheduler()
        self._running: set[asyncio.Task[object]] = set()

    def every(self, seconds: float, job: Callable[[], Awaitable[None]], name: str) -> None:
        """Run ``job`` every ``seconds`` (a late run is skipped, not queued)."""

        async def run() -> None:
            task = asyncio.current_task()
            assert task is not None
            self._running.add(task)
            try:
                await job()
            finally:
                self._running.discard(task)

        self._scheduler.add_job(
            run, "interval", seconds=seconds, max_instances=1, coalesce=True, id=name
        )

    def start(self) -> None:
        """Start scheduling (call on the event loop the jobs should run on)."""
        self._scheduler.start()

    async def stop(self, timeout: float) -> None:
        """Schedule nothing more; wait up to ``timeout`` seconds for runs going, then cancel."""
        if not self._scheduler.running:
            return
        # Paused first: shutdown() itself would cancel the runs going, and not wait for them.
        self._scheduler.pause()
        await finish_or_cancel(set(self._running), timeout)
        self._scheduler.shutdown(wait=False)
