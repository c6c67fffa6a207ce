"""Stopping background tasks for sure."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


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
