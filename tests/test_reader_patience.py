"""Readers through an outage: a following replay keeps trying to start, a one-shot one gives up in one line."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import pytest
from helpers import eventually
from test_store import created

from ledger import jsapi, subjects
from ledger import replay as replaying
from ledger.codec import Recorded
from ledger.errors import Unavailable
from ledger.settings import Settings
from ledger.store import EventStore
from ledgerctl.server import EmbeddedServer


async def test_a_following_replay_keeps_trying_through_an_outage_and_a_one_shot_gives_up(
        fresh_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, uid: str):
    # A one-shot replay's patience, shortened; a following one must not have any.
    monkeypatch.setattr(replaying, "CONSUMER_CREATE_PATIENCE", 1.0)
    monkeypatch.setattr(replaying, "CREATE_LOG_EVERY", 0.5, raising=False)
    caplog.set_level(logging.WARNING, logger="ledger.replay")
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


async def test_a_one_shot_replay_waits_out_a_jetstream_that_answers_temporarily_unavailable(tmp_path, uid: str):
    # A node just resumed or restarted answers stream info with 503 until it has caught up; what is asked
    # in that window is retried (the cluster freeze test met it on CI), a lasting 503 ends in one line.
    import subprocess

    import nats

    from ledgerctl.server import find_binary, free_port

    port = free_port()
    binary, _ = find_binary()
    # Popen returns at once (ASYNC220): the server runs beside the loop. No JetStream: we answer for it.
    proc = subprocess.Popen([binary, "-a", "127.0.0.1", "-p", str(port)],  # noqa: ASYNC220
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"nats://127.0.0.1:{port}"
        await eventually_connectable(url)
        nc = await nats.connect(url)
        answers: list[str] = []
        unavailable = (b'{"error": {"code": 503, "err_code": 10008, '
                       b'"description": "JetStream system temporarily unavailable"}}')

        async def stream_info(msg: nats.aio.msg.Msg) -> None:
            answers.append(msg.subject)
            await msg.respond(unavailable if len(answers) <= 3 else b'{"state": {"last_seq": 0}}')

        await nc.subscribe(f"{jsapi.API_PREFIX}.STREAM.INFO.{subjects.LEDGER_STREAM}", cb=stream_info)
        try:
            replay = replaying.Replay(nc, subjects.LEDGER_STREAM, [subjects.family_filter("session")], timeout=1.0,
                                      patience=10.0)
            assert [batch async for batch in replay] == []  # an empty stream, once it answered
            assert len(answers) == 4
            answers.clear()
            unavailable_forever = replaying.Replay(nc, subjects.LEDGER_STREAM, [subjects.family_filter("session")],
                                                   timeout=0.2, patience=0.0)
            with pytest.raises(Unavailable) as gave_up:
                async for _ in unavailable_forever:
                    pass
            assert "temporarily unavailable" in str(gave_up.value) and "\n" not in str(gave_up.value)
        finally:
            await nc.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def eventually_connectable(url: str) -> None:
    import nats

    async def up() -> bool:
        try:
            nc = await nats.connect(url, connect_timeout=0.5, max_reconnect_attempts=0, allow_reconnect=False)
        except (nats.errors.Error, OSError, TimeoutError):
            return False
        await nc.close()
        return True
    for _ in range(100):
        if await up():
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"no server at {url}")
