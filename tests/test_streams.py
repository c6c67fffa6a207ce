"""Stream creation and upgrade: idempotent, verified, immutable where it matters."""

from __future__ import annotations

import asyncio
import time

import nats
import pytest
from nats.js.api import PersistMode, StreamConfig
from nats.js.errors import APIError

from ledger import codec, streams, subjects
from ledger.errors import StreamMismatch
from ledger.events import AgentHeartbeat, Producer
from ledger.settings import Settings
from ledger.store import EventStore
from ledgerctl.server import EmbeddedServer


async def test_streams_are_created_with_their_settings_then_ok(fresh_server: EmbeddedServer):
    settings = Settings(nats_url=fresh_server.url, heartbeat_max_age=3600, heartbeat_per_agent=50)
    async with EventStore.connect(settings, check=False) as store:
        first = await store.ensure_streams()
        assert [(r.name, r.action) for r in first] == [
            (subjects.LEDGER_STREAM, "created"), (subjects.HEARTBEAT_STREAM, "created"),
            (subjects.DLQ_STREAM, "created")]
        again = await store.ensure_streams()
        assert [r.action for r in again] == ["ok", "ok", "ok"]

        jsm = store.nc.jsm()
        ledger = (await jsm.stream_info(subjects.LEDGER_STREAM)).config
        assert ledger.deny_delete and ledger.deny_purge and not ledger.allow_rollup_hdrs
        assert ledger.storage == "file" and ledger.discard == "new"
        assert ledger.max_age in (0, None) and ledger.max_msgs in (-1, None)
        assert ledger.duplicate_window == 120.0
        hb = (await jsm.stream_info(subjects.HEARTBEAT_STREAM)).config
        assert hb.max_age == 3600 and hb.max_msgs_per_subject == 50 and hb.discard == "old"
        # Beats are acknowledged before their fsync on a single node; lifecycle events after theirs.
        assert hb.persist_mode == PersistMode.ASYNC and ledger.persist_mode is None


async def test_a_heartbeat_stream_created_with_fsynced_writes_is_kept_as_it_is(fresh_server: EmbeddedServer):
    # JetStream cannot change a stream's persist mode: a stream from before async beats is a working ledger.
    settings = Settings(nats_url=fresh_server.url)
    spec = next(s for s in streams.specs(settings) if s.name == subjects.HEARTBEAT_STREAM)
    spec.persist_mode = None
    nc = await nats.connect(fresh_server.url)
    await nc.jetstream().add_stream(spec)
    await nc.close()
    async with EventStore.connect(settings, check=False) as store:
        reports = {r.name: r for r in await store.ensure_streams()}
        assert reports[subjects.HEARTBEAT_STREAM].action == "ok"
        assert await store.check_streams() == {name: {} for name in reports}
        assert (await store.nc.jsm().stream_info(subjects.HEARTBEAT_STREAM)).config.persist_mode is None


def test_replicated_heartbeats_keep_the_servers_default_persist_mode():
    # (ADR-56: the async persist mode is for R1 streams; a replicated stream gets its durability from its quorum)
    hb = next(s for s in streams.specs(Settings(replicas=3)) if s.name == subjects.HEARTBEAT_STREAM)
    assert hb.num_replicas == 3 and hb.persist_mode is None


async def test_changed_settings_upgrade_the_streams(fresh_server: EmbeddedServer):
    async with EventStore.connect(Settings(nats_url=fresh_server.url), ensure=True):
        pass
    wider = Settings(nats_url=fresh_server.url, heartbeat_max_age=7200, heartbeat_per_agent=99)
    async with EventStore.connect(wider, check=False) as store:
        reports = {r.name: r for r in await store.ensure_streams()}
        assert reports[subjects.HEARTBEAT_STREAM].action == "updated"
        assert set(reports[subjects.HEARTBEAT_STREAM].changed) == {"max_age", "max_msgs_per_subject"}
        assert reports[subjects.LEDGER_STREAM].action == "ok"
        hb = (await store.nc.jsm().stream_info(subjects.HEARTBEAT_STREAM)).config
        assert (hb.max_age, hb.max_msgs_per_subject) == (7200, 99)


async def test_a_ledger_stream_that_allows_purge_is_refused(fresh_server: EmbeddedServer):
    nc = await nats.connect(fresh_server.url)
    await nc.jetstream().add_stream(StreamConfig(name=subjects.LEDGER_STREAM, subjects=subjects.LEDGER_SUBJECTS))
    await nc.close()
    async with EventStore.connect(Settings(nats_url=fresh_server.url), check=False) as store:
        with pytest.raises(StreamMismatch,
                           match=r"cannot change: deny_delete=False \(want True\), deny_purge=False \(want True\)"):
            await store.ensure_streams()


async def test_overlapping_foreign_stream_gives_a_clear_error(fresh_server: EmbeddedServer):
    nc = await nats.connect(fresh_server.url)
    await nc.jetstream().add_stream(StreamConfig(name="OTHER", subjects=["ledger.session.>"]))
    await nc.close()
    async with EventStore.connect(Settings(nats_url=fresh_server.url), check=False) as store:
        with pytest.raises(StreamMismatch, match="cannot create stream LEDGER: subjects overlap"):
            await store.ensure_streams()


async def test_the_ledger_refuses_delete_and_purge(store: EventStore, uid: str):
    from ledger.events import SessionCreated

    seq = await store.append(SessionCreated(producer=Producer(id="cli", instance="t"), session_id=uid, pool="p"))
    jsm = store.nc.jsm()
    with pytest.raises(nats.js.errors.APIError):
        await jsm.delete_msg(subjects.LEDGER_STREAM, seq)
    with pytest.raises(nats.js.errors.APIError):
        await jsm.purge_stream(subjects.LEDGER_STREAM)
    assert [r.seq for r in await store.history("session", uid)] == [seq]


def _beat(agent: str, n: int) -> AgentHeartbeat:
    return AgentHeartbeat(producer=Producer(id=agent, instance="i"), agent_id=agent, instance_id="i",
                          incarnation=1, beat=n)


async def test_heartbeats_are_bounded_per_agent(fresh_server: EmbeddedServer):
    settings = Settings(nats_url=fresh_server.url, heartbeat_per_agent=5)
    async with EventStore.connect(settings, ensure=True) as store:
        for n in range(12):
            await store.submit(_beat("a1", n))
            await store.submit(_beat("a2", n))
        await store.flush()
        kept = await store.history("hb", "a1")
        assert [r.event.beat for r in kept] == [7, 8, 9, 10, 11]  # the newest five, still replayable
        info = await store.nc.jsm().stream_info(subjects.HEARTBEAT_STREAM)
        assert info.state.messages == 10  # 5 per agent, not 24


async def test_heartbeats_are_bounded_by_age(fresh_server: EmbeddedServer):
    settings = Settings(nats_url=fresh_server.url, heartbeat_max_age=1.0, duplicate_window=1.0)
    async with EventStore.connect(settings, ensure=True) as store:
        await store.append(_beat("a1", 1))
        deadline = time.monotonic() + 10
        while (await store.nc.jsm().stream_info(subjects.HEARTBEAT_STREAM)).state.messages:
            assert time.monotonic() < deadline, "heartbeat outlived heartbeat_max_age"
            await asyncio.sleep(0.1)
        # The lifecycle stream keeps everything regardless of age.
        ledger = (await store.nc.jsm().stream_info(subjects.LEDGER_STREAM)).config
        assert ledger.max_age in (0, None)


def test_specs_match_the_subject_layout():
    by_name = {s.name: s for s in streams.specs(Settings())}
    assert by_name[subjects.LEDGER_STREAM].subjects == subjects.LEDGER_SUBJECTS
    assert by_name[subjects.HEARTBEAT_STREAM].subjects == subjects.HEARTBEAT_SUBJECTS
    for event_family in ("agent", "session", "route", "pool"):
        assert f"ledger.{event_family}.*.*.*" in by_name[subjects.LEDGER_STREAM].subjects
    assert codec.MAX_EVENT_BYTES < 1024 * 1024  # below nats-server's default max_payload


async def test_a_cluster_not_yet_able_to_place_a_stream_is_asked_again_and_other_refusals_are_not(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A fresh cluster whose nodes have not all joined answers 10005 for a while; nothing else is worth a retry.
    monkeypatch.setattr(streams, "PLACEMENT_PATIENCE", 5.0)
    answers = [APIError(code=500, description="no suitable peers for placement", err_code=10005)] * 2
    calls: list[int] = []

    async def change() -> None:
        calls.append(1)
        if answers:
            raise answers.pop()

    await streams._placed(change, "LEDGER")
    assert len(calls) == 3

    async def refused() -> None:
        calls.append(1)
        raise APIError(code=400, description="insufficient resources", err_code=10023)

    calls.clear()
    with pytest.raises(APIError):
        await streams._placed(refused, "LEDGER")
    assert len(calls) == 1

    monkeypatch.setattr(streams, "PLACEMENT_PATIENCE", 0.1)  # patience over: the refusal is the answer
    answers[:] = [APIError(code=500, description="no suitable peers for placement", err_code=10005)] * 9
    calls.clear()
    with pytest.raises(APIError):
        await streams._placed(change, "LEDGER")
    assert len(calls) == 1
