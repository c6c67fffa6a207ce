"""The short tasks an agent starts (a release, a drain note): kept until done, failures logged when they happen."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine

from .. import tasks

log = logging.getLogger(__name__)


class TaskSet:
    """Every task is referenced until it ends (an unreferenced task may be collected mid-flight), and one that
    fails is logged at once with its traceback - not as "exception never retrieved" whenever it is collected.
    What it was for is retried by its owner (the beat loop tries unwritten drain notes again)."""

    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._tasks: set[asyncio.Task[None]] = set()
        self.failures = 0

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[object, object, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=f"{self._owner}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self.failures += 1
            log.error("%s failed: %s", task.get_name(), error, exc_info=error)

    async def stop(self) -> None:
        await tasks.stop(list(self._tasks))
