"""How the agent's body learns to stop: `stop()`, or SIGTERM / SIGINT with `handle_signals`."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

log = logging.getLogger(__name__)

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopping:
    """A signal sets `stopped` and interrupts a body that is not parked in `wait()`; the goodbye follows when
    the `async with` exits. Only the first signal counts, and none once the agent is on its way out."""

    def __init__(self, agent_id: str, *, handle_signals: bool, closing: Callable[[], bool]) -> None:
        self._agent_id = agent_id
        self._handle_signals = handle_signals
        self._closing = closing
        self.stopped = asyncio.Event()
        self.signalled: int | None = None
        self._waiting = False
        self._body: asyncio.Task[object] | None = None

    @property
    def reason(self) -> str:
        return "shutdown" if self.signalled is None else f"signal {signal.Signals(self.signalled).name}"

    def install(self) -> None:
        """From the task running the `async with` body (the one a signal interrupts)."""
        self._body = asyncio.current_task()
        if self._handle_signals:
            loop = asyncio.get_running_loop()
            for sig in _SIGNALS:
                loop.add_signal_handler(sig, self._on_signal, sig)

    def remove(self) -> None:
        if self._handle_signals:
            loop = asyncio.get_running_loop()
            for sig in _SIGNALS:
                loop.remove_signal_handler(sig)
        self.stopped.set()

    def absorbs(self, exc_type: type[BaseException] | None) -> bool:
        """A signal cancelled the body to get out: that was a clean stop, not an error."""
        if exc_type is asyncio.CancelledError and self.signalled is not None:
            task = asyncio.current_task()
            return task is not None and task.uncancel() == 0
        return False

    def _on_signal(self, sig: int) -> None:
        if self.signalled is not None or self._closing():
            return  # already on the way out: the goodbye is (being) said once
        self.signalled = sig
        log.info("%s: %s received, saying goodbye", self._agent_id, signal.Signals(sig).name)
        self.stopped.set()
        # A body parked in wait() returns by itself; any other body is interrupted.
        if not self._waiting and self._body is not None and not self._body.done():
            self._body.cancel(f"{signal.Signals(sig).name}")

    def stop(self) -> None:
        self.stopped.set()

    async def wait(self) -> None:
        self._waiting = True
        try:
            await self.stopped.wait()
        finally:
            self._waiting = False
