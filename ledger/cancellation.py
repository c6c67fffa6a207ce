"""Stopping background tasks for sure."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import TypeVar

T = TypeVar("T")


async def stop(tasks: Iterable[asyncio.Task[object]], *, patience: float = 0.5) -> None:
    """Cancel tasks and wait until they are done, cancelling again while they are not.

    A single cancel() is not always enough on Python 3.11: asyncio.wait_for()
    (used inside nats-py) can swallow a cancellation that arrives just as the
    awaited operation completes, and the task then carries on.
    """
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=patience)


def raise_if_cancelled() -> None:
    """Re-raise a cancellation that an inner wait_for() swallowed (Python 3.11): the request still counts."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def wait_for(aw: Awaitable[T], timeout: float | None) -> T:
    """asyncio.wait_for() that never swallows a cancellation (TimeoutError when the time is up).

    On Python 3.11 asyncio.wait_for() returns the result when the awaited
    thing completes just as the task is cancelled, and the cancellation is
    lost: a loop around it then runs on while its TaskGroup waits for it
    forever. asyncio.timeout() counts cancellations and re-raises them.
    """
    async with asyncio.timeout(timeout):
        return await aw
