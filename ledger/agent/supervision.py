"""The short tasks an agent starts (a release, a drain note): kept until done, failures logged when they happen."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine

from ledger import cancellation

log = logging.getLogger(__name__)


class TaskSet:
    """Every task is referenced until it ends (an unreferenced task may be collected mid-flight), and one that
    fails is logged at once with its traceback - not as "exception never retrieved" whenever it is collected.
    What it was for is retried by its owner (the beat loop tries unwritten drain notes again)."""

    def __init__(self, owner: str, *, on_vital_failure: Callable[[str], None] | None = None) -> None:
        self._owner = owner
        self._tasks: set[asyncio.Task[None]] = set()
        self._vital: set[asyncio.Task[None]] = set()
        self._on_vital_failure = on_vital_failure
        self.failures = 0

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[object, object, None], name: str, *, vital: bool = False) -> asyncio.Task[None]:
        """`vital`: a task the owner cannot do without (a loop meant to run until stopped): its failure is also
        reported to `on_vital_failure`."""
        task = asyncio.get_running_loop().create_task(coro, name=f"{self._owner}-{name}")
        self._tasks.add(task)
        if vital:
            self._vital.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        vital = task in self._vital
        self._vital.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self.failures += 1
            log.error("%s failed: %s", task.get_name(), error, exc_info=error)
            if vital and self._on_vital_failure is not None:
                self._on_vital_failure(task.get_name())

    async def stop(self) -> None:
        await cancellation.stop(list(self._tasks))
