"""Maintenance jobs: a stop waits for the runs going, or cancels them after its timeout."""

from __future__ import annotations

import asyncio

from outbox.jobs import Jobs


async def test_stop_lets_a_run_going_finish_and_schedules_nothing_more() -> None:
    jobs = Jobs()
    started = asyncio.Event()
    runs: list[str] = []

    async def purge() -> None:
        runs.append("start")
        started.set()
        await asyncio.sleep(0.2)  # a batch halfway through when the stop comes
        runs.append("end")

    jobs.every(0.05, purge, "purge")
    jobs.start()
    await asyncio.wait_for(started.wait(), 5)
    await jobs.stop(timeout=5)
    assert runs == ["start", "end"]  # finished before stop returned
    await asyncio.sleep(0.2)
    assert runs == ["start", "end"]  # and no run after it
    leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert leftover == []


async def test_a_run_that_outlasts_the_timeout_is_cancelled() -> None:
    jobs = Jobs()
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def stuck() -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    jobs.every(0.05, stuck, "stuck")
    jobs.start()
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.wait_for(jobs.stop(timeout=0.1), 5)
    assert cancelled.is_set()


async def test_stop_before_any_run_and_twice_is_fine() -> None:
    jobs = Jobs()

    async def never() -> None:
        raise AssertionError("not due yet")

    jobs.every(3600, never, "hourly")
    jobs.start()
    await jobs.stop(timeout=1)
    await jobs.stop(timeout=1)
