"""Waiting for a condition in async tests without blocking the event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll ``predicate`` in a thread until it holds; fail after ``timeout`` seconds.

    A thread, because a blocking SQLite read on the event loop would wait for a lock
    that a relay or consumer on that same loop could then never release.
    """
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)
