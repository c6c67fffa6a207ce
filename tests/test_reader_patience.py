"""Readers through an outage: a following replay keeps trying to start, a one-shot one gives up in one line."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import pytest

from ledger import reader, subjects
from ledger.codec import Recorded
from ledger.errors import Unavailable
from ledger.server import EmbeddedServer
from ledger.settings import Settings
from ledger.store import EventStore
from helpers import eventually
from test_store import created


async def test_a_following_replay_keeps_trying_through_an_outage_and_a_one_shot_gives_up(
        fresh_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, uid: str):
    # A one-shot replay's patience, shortened; a following one must not have any.
    monkeypatch.setattr(reader, "CONSUMER_CREATE_PATIENCE", 1.0)
    monkeypatch.setattr(reader, "CREATE_LOG_EVERY", 0.5, raising=False)
    caplog.set_level(logging.WARNING, logger="ledger.reader")
    assert fresh_server.pid is not None
    settings = Settings(nats_url=fresh_server.url, request_timeout=1.0)
    async with EventStore.connect(settings, ensure=True) as store:
        first = await store.append(created(f"{uid}-1"))
        got: list[int] = []

        async def follow() -> None:
            async for batch in store.replay(subjects.family_filter("session"), follow=True):
                got.extend(r.seq for r in batch if isinstance(r, Recorded))

        os.kill(fresh_server.pid, signal.SIGSTOP)  # JetStream stops answering; the connection stays open
        following = asyncio.create_task(follow())
        try:
            await eventually(lambda: following.done() or "still trying" in caplog.text, timeout=30,
                             what="the following replay saying it keeps trying")
            assert not following.done(), following.exception()
            with pytest.raises(Unavailable) as one_shot:
                async for _ in store.replay(subjects.family_filter("session")):
                    pass
            assert "\n" not in str(one_shot.value) and "LEDGER" in str(one_shot.value)
        finally:
            os.kill(fresh_server.pid, signal.SIGCONT)
        try:
            second = await store.append(created(f"{uid}-2"))
            await eventually(lambda: second in got or following.done(), timeout=60,
                             what="the following replay delivering what was appended after the outage")
            assert got == [first, second]
        finally:
            following.cancel()
            await asyncio.gather(following, return_exceptions=True)
