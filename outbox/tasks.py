"""Ending background tasks on stop: a grace period, then cancellation."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Collection

__all__ = ["finish_or_cancel"]


async def finish_or_cancel(
    tasks: Collection[asyncio.Future[Any]], timeout: float
) -> set[asyncio.Future[Any]]:
    """Let ``tasks`` finish within ``timeout`` seconds; cancel the rest and wait for them.

    Returns the tasks that were cancelled (empty when all finished in time). Their
    errors, and those of the tasks that finished, are left to their owners.
    """
    if not tasks:
        return set()
    _done, late = await asyncio.wait(tasks, timeout=timeout)
    for task in late:
        task.cancel()
    await asyncio.gather(*late, return_exceptions=True)
    return late
