"""The task helpers: a cancellation racing a completion still cancels."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from ledger import cancellation


async def test_wait_for_does_not_swallow_a_cancel_that_races_the_result():
    event = asyncio.Event()

    async def waiter() -> str:
        await cancellation.wait_for(event.wait(), 10)
        return "carried on"

    task = asyncio.create_task(waiter())
    await asyncio.sleep(0)  # parked in the wait
    event.set()  # the result and the cancellation arrive in the same turn of the loop
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_wait_for_times_out():
    with pytest.raises(TimeoutError):
        await cancellation.wait_for(asyncio.Event().wait(), 0.01)
    assert await cancellation.wait_for(asyncio.sleep(0, "done"), 1) == "done"


async def test_a_swallowed_cancel_is_raised_at_the_next_check():
    checked = asyncio.Event()

    async def loop() -> None:
        with contextlib.suppress(asyncio.CancelledError):  # what nats-py's internal wait_for can do on Python 3.11
            await asyncio.sleep(10)
        checked.set()
        cancellation.raise_if_cancelled()

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert checked.is_set()


async def test_stop_cancels_again_until_the_task_ends():
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while swallowed < 2:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                swallowed += 1
        await asyncio.sleep(10)

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await cancellation.stop([task], patience=0.01)
    assert task.cancelled() and swallowed == 2
