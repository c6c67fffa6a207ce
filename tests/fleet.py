"""Helpers for consumer tests: reference agent processes and in-process consumers on a private server."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from consumers.group import ConsumerGroup
from consumers.liveness_rules import LivenessSettings
from ledger.codec import Recorded
from ledger.events import Producer
from ledger.ids import new_id
from ledger.settings import Settings
from ledger.store import EventStore
from ledger.writer import Writer

HERE = Path(__file__).parent


class AgentProcess:
    """A `ledger agent` child process."""

    def __init__(self, url: str, agent_id: str, pool: str, *, capacity: int = 10, heartbeat: float = 0.2,
                 ttl: float = 1.5, self_claim: bool = True, checkpoint_every: float | None = None) -> None:
        self.agent_id = agent_id
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ledgerctl", "agent", "--agent-id", agent_id, "--pool", pool, "--capacity",
             str(capacity), "--heartbeat", str(heartbeat), "--ttl", str(ttl), "--nats-url", url,
             "--self-claim" if self_claim else "--no-self-claim",
             *(("--checkpoint-every", str(checkpoint_every)) if checkpoint_every is not None else ())],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)

    async def registered(self) -> None:
        await self.says("registered", timeout=60)

    async def says(self, text: str, timeout: float = 30.0) -> str:
        """The next line of the agent's output that contains `text` (a barrier on what the process did)."""
        assert self.proc.stdout is not None

        async def read() -> str:
            while True:
                line = await asyncio.to_thread(self.proc.stdout.readline)  # type: ignore[union-attr]
                if not line:
                    raise AssertionError(f"{self.agent_id} ended: {self.proc.stderr.read()}")  # type: ignore[union-attr]
                if text in line:
                    return line

        return await asyncio.wait_for(read(), timeout)

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()

    async def terminate(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(self.proc.communicate, timeout=30)
        self._close_pipes()
        return self.proc.returncode


@contextlib.asynccontextmanager
async def agents(url: str, pool: str, names: list[str], **kw: object) -> AsyncIterator[dict[str, AgentProcess]]:
    procs = {name: AgentProcess(url, name, pool, **kw) for name in names}  # type: ignore[arg-type]
    try:
        for p in procs.values():
            await p.registered()
        yield procs
    finally:
        for p in procs.values():
            if p.proc.poll() is None:
                p.kill9()


@contextlib.asynccontextmanager
async def consumers(url: str, *, name: str = "", grace: float = 0.3, **parts: bool) -> AsyncIterator[ConsumerGroup]:
    async with EventStore.connect(Settings(nats_url=url)) as store:
        running = ConsumerGroup(store, name=name, liveness=LivenessSettings(grace=grace), **parts)
        task = asyncio.create_task(running.run())
        try:
            await asyncio.wait_for(running.follower.caught_up.wait(), 10)
            yield running
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


@contextlib.asynccontextmanager
async def ledger_on(url: str) -> AsyncIterator[Writer]:
    async with EventStore.connect(Settings(nats_url=url)) as store:
        yield Writer(store, Producer(id="operator-test", instance=new_id()))


async def events(store: EventStore, family: str, entity_id: str) -> list:  # type: ignore[type-arg]
    return [r.event for r in await store.history(family, entity_id) if isinstance(r, Recorded)]
