"""Views as of the past (a stream sequence or a moment) and entity histories with their causation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import start_binary_server
from projection_helpers import until

from ledger import events as ev
from ledger.codec import Recorded
from ledger.settings import Settings
from ledger.store import EventStore
from ledger.subjects import HEARTBEAT_STREAM, LEDGER_STREAM
from ledgerctl.server import EmbeddedServer
from projections.errors import InvalidQuery, UnknownEntity
from projections.projector import FILTERS, Projector
from projections.query import Query
from projections.settings import ProjectionSettings
from projections.state import LedgerState
from projections.timetravel import state_as_of

CLI = ev.Producer(id="cli", instance="t")
MONITOR = ev.Producer(id="monitor", instance="m")
RECLAIMER = ev.Producer(id="reclaimer", instance="r")


def me(agent: str) -> ev.Producer:
    return ev.Producer(id=agent, instance="i")


@pytest.fixture
async def history_store(fresh_server: EmbeddedServer) -> AsyncIterator[EventStore]:
    async with EventStore.connect(Settings(nats_url=fresh_server.url), ensure=True) as store:
        yield store


async def everything(store: EventStore) -> list[Recorded]:
    out = []
    for stream in (LEDGER_STREAM, HEARTBEAT_STREAM):
        async for batch in store.replay(FILTERS[stream], stream=stream):
            out.extend(batch)
    return sorted(out, key=lambda r: r.timestamp_ns)


async def fleet(store: EventStore, rounds: int = 12) -> None:
    """Agents that register, beat, claim, lose and re-claim sessions, and routes that come up."""
    incarnations = {a: await store.append(ev.AgentRegistered(producer=me(a), agent_id=a, instance_id="i", pool="p"))
                    for a in ("a1", "a2")}
    for n in range(rounds):
        sid = f"s{n % 4}"
        agent = ("a1", "a2")[n % 2]
        await store.append(ev.AgentHeartbeat(producer=me(agent), agent_id=agent, instance_id="i",
                                             incarnation=incarnations[agent], beat=n, load=n % 3))
        if n < 4:
            await store.append(ev.SessionCreated(producer=CLI, session_id=sid, pool="p"))
            await store.append(ev.RouteCreated(producer=CLI, route_id=f"r{n}", session_id=sid, endpoint="e"))
        token = await store.append(ev.SessionClaimed(producer=me(agent), session_id=sid, agent_id=agent,
                                                     instance_id="i", incarnation=incarnations[agent]))
        await store.append(ev.RouteTransitioned(producer=me(agent), route_id=f"r{n % 4}", from_state="PENDING",
                                                to_state="STARTING", token=token))
        await store.append(ev.SessionOrphaned(producer=RECLAIMER, session_id=sid, reason="owner_suspect",
                                              previous_owner=agent, previous_token=token))


async def test_as_of_a_sequence_or_a_moment_is_the_fold_of_what_was_stored_by_then(
        history_store: EventStore, tmp_path: Path):
    settings = ProjectionSettings(db=str(tmp_path / "p.sqlite3"), snapshot_every=7, snapshot_recent=3)
    async with Projector(history_store, settings) as projector:
        await projector.ready(timeout=20)
        await fleet(history_store)  # live: commits, and snapshots, land all along the way
        await projector.wait_for(await history_store.last_seq(LEDGER_STREAM), timeout=20)
        await projector.wait_for(await history_store.last_seq(HEARTBEAT_STREAM), HEARTBEAT_STREAM, timeout=20)
    items = await everything(history_store)
    ledger_items = [i for i in items if i.stream == LEDGER_STREAM]
    async with Query.open(settings.db, history_store) as q:
        for target in (ledger_items[3], ledger_items[len(ledger_items) // 2], ledger_items[-1]):
            expected = LedgerState()
            expected.apply_all(i for i in items if i.timestamp_ns <= target.timestamp_ns)
            by_seq = await state_as_of(history_store, q.db, seq=target.seq)
            assert by_seq.state == expected
            by_time = await state_as_of(history_store, q.db, time=target.stored_at)
            assert by_time.state == expected
            # The views answer the same, with health judged at that moment.
            page = await q.sessions(as_of=target.seq)
            assert {s.session_id: s.state for s in page.items} == {k: v.status for k, v in expected.sessions.items()}
            assert page.position.ledger_seq == target.seq and page.position.now == target.stored_at
            if target is not ledger_items[3]:  # past the first snapshot: it starts there, replays the rest
                assert 0 < by_seq.snapshots[LEDGER_STREAM] <= target.seq and by_seq.replayed < len(items)
        before_anything = await q.agents(as_of=ledger_items[0].stored_at - timedelta(seconds=1))
        assert before_anything.items == [] and before_anything.position.ledger_seq == 0
        with pytest.raises(InvalidQuery, match="ends at"):
            await q.agents(as_of=ledger_items[-1].seq + 100)


async def test_history_shows_who_changed_what_and_why(history_store: EventStore):
    inc = await history_store.append(ev.AgentRegistered(producer=me("a1"), agent_id="a1", instance_id="i", pool="p"))
    await history_store.append(ev.SessionCreated(producer=CLI, session_id="s1", pool="p"))
    suspected = ev.AgentSuspected(producer=MONITOR, agent_id="a1", incarnation=inc, reason="missed_heartbeats",
                                  evidence=ev.Evidence(heartbeat_interval=5.0, suspect_after_missed=3))
    token = await history_store.append(ev.SessionClaimed(producer=me("a1"), session_id="s1", agent_id="a1",
                                                         instance_id="i", incarnation=inc))
    await history_store.append(suspected)
    await history_store.append(ev.SessionOrphaned(producer=RECLAIMER, session_id="s1", reason="owner_suspect",
                                                  previous_owner="a1", previous_token=token,
                                                  causation_id=suspected.event_id, correlation_id="incident-7"))
    stale = await history_store.append(ev.SessionReleased(producer=me("a1"), session_id="s1", agent_id="a1",
                                                          incarnation=inc, token=token))
    q = Query(None, history_store)  # no projection file: histories come from JetStream alone
    h = await q.history("session", "s1")
    assert [e.type for e in h.entries] == ["session.created", "session.claimed", "session.orphaned",
                                            "session.released"]
    orphaned = h.entries[2]
    assert (orphaned.producer, orphaned.causation_id, orphaned.correlation_id) == (
        "reclaimer", suspected.event_id, "incident-7")
    assert orphaned.changes["status"] == ["assigned", "orphaned"] and orphaned.changes["owner"] == ["a1", None]
    late = h.entries[3]
    assert (late.seq, late.applied, late.anomaly.kind) == (stale, False, "stale_token")
    assert h.state is not None and h.state["status"] == "orphaned"
    agent = await q.history("agent", "a1")
    assert agent.entries[-1].event["evidence"]["suspect_after_missed"] == 3
    assert len((await q.history("session", "s1", as_of=token)).entries) == 2
    with pytest.raises(UnknownEntity):
        await q.history("session", "nobody")


async def test_moments_older_than_the_heartbeat_retention_say_so(tmp_path_factory: pytest.TempPathFactory):
    server = start_binary_server(tmp_path_factory.mktemp("short-hb"))
    try:
        settings = Settings(nats_url=server.url, heartbeat_max_age=1.0, duplicate_window=0.5)
        async with EventStore.connect(settings, ensure=True) as store:
            inc = await store.append(ev.AgentRegistered(producer=me("a1"), agent_id="a1", instance_id="i", pool="p"))
            await store.append(ev.AgentHeartbeat(producer=me("a1"), agent_id="a1", instance_id="i", incarnation=inc,
                                                 beat=1))
            first = (await everything(store))[0]

            async def expired() -> bool:
                return (await store.nc.jsm().stream_info(HEARTBEAT_STREAM)).state.messages == 0

            await until(expired, timeout=10, what="the heartbeat to expire")
            await store.append(ev.AgentHeartbeat(producer=me("a1"), agent_id="a1", instance_id="i", incarnation=inc,
                                                 beat=2))
            q = Query(None, store)
            page = await q.agents(as_of=first.seq)
            assert page.items[0].health == "unknown"
            assert any("no heartbeat history is kept" in note for note in page.position.notes)
    finally:
        server.stop()
