"""`Projector.ready` that runs out of time raises the projections' own error, which the command line shows as one
line."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from ledger import events as ev
from ledger.settings import Settings
from ledger.store import EventStore
from ledgerctl.server import EmbeddedServer
from projections.errors import NotCaughtUp, ProjectionError
from projections.projector import Projector
from projections.settings import ProjectionSettings


async def test_ready_that_runs_out_of_time_raises_not_caught_up(server: EmbeddedServer, tmp_path: Path):
    settings = ProjectionSettings(db=str(tmp_path / "p.sqlite3"))
    async with EventStore.connect(Settings(nats_url=server.url)) as store:
        await store.append(ev.SessionCreated(producer=ev.Producer(id="cli", instance="t"), session_id="s1",
                                             pool="p"), expect=0)
        async with Projector(store, settings) as projector:
            assert server.pid is not None
            os.kill(server.pid, signal.SIGSTOP)  # before the projector's first fetch: it cannot catch up
            try:
                with pytest.raises(NotCaughtUp) as caught:
                    await projector.ready(timeout=0.5)
            finally:
                os.kill(server.pid, signal.SIGCONT)
            assert not projector.caught_up.is_set()
    # Both what the projections raise on purpose, and what callers waiting on a deadline already catch.
    assert isinstance(caught.value, ProjectionError) and isinstance(caught.value, TimeoutError)
    assert "did not catch up within 0.5 s" in str(caught.value)
