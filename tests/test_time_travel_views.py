"""Views of the past answered from the projection's version rows equal the same views replayed from the log,
by sequence and by moment, on a real nats-server and a real SQLite file; past what the file committed, and
without a file, the replay answers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import start_binary_server
from projection_helpers import until

from ledger import events as ev
from ledger.codec import Recorded
from ledger.lifecycle import AgentState
from ledger.settings import Settings
from ledger.store import EventStore
from ledger.subjects import HEARTBEAT_STREAM, LEDGER_STREAM
from ledgerctl.server import EmbeddedServer
from projections.beats import Beat
from projections.db import ProjectionDB
from projections.projector import FILTERS, Projector
from projections.query import AsOf, Query
from projections.settings import ProjectionSettings
from projections.timetravel import Past, past_as_of, past_beats, state_as_of

CLI = ev.Producer(id="cli", instance="t")
RECLAIMER = ev.Producer(id="reclaimer", instance="r")
INDEXED = "the projection's versions"


def me(agent: str) -> ev.Producer:
    return ev.Producer(id=agent, instance="i")


@pytest.fixture
async def store(fresh_server: EmbeddedServer) -> AsyncIterator[EventStore]:
    async with EventStore.connect(Settings(nats_url=fresh_server.url), ensure=True) as s:
        yield s


async def of_the_moment(db: ProjectionDB, past: Past) -> tuple[dict[str, AgentState], dict[str, Beat]]:
    """The agents a Past's moment had and their beats, as its views read them (every agent: as the pools view)."""
    async with db.reading():
        agents = {a.agent_id: a for a in await db.agent_states(as_of=past.ledger_seq)}
        return agents, await past_beats(db, past, agents)


async def everything(store: EventStore) -> list[Recorded]:
    out: list[Recorded] = []
    for stream in (LEDGER_STREAM, HEARTBEAT_STREAM):
        async for batch in store.replay(FILTERS[stream], stream=stream):
            out.extend(batch)  # type: ignore[arg-type]
    return sorted(out, key=lambda r: r.timestamp_ns)


async def fleet(store: EventStore, rounds: int = 6) -> None:
    """Agents that beat, claim, lose and re-claim sessions, leave and come back; routes; a flagged event and a
    message that is not an event."""
    inc = {a: await store.append(ev.AgentRegistered(producer=me(a), agent_id=a, instance_id="i", pool="p"))
           for a in ("a1", "a2")}
    for n in range(rounds):
        sid, agent = f"s{n % 3}", ("a1", "a2")[n % 2]
        await store.append(ev.AgentHeartbeat(producer=me(agent), agent_id=agent, instance_id="i",
                                             incarnation=inc[agent], beat=n, load=n % 3))
        if n < 3:
            await store.append(ev.SessionCreated(producer=CLI, session_id=sid, pool="p"))
            await store.append(ev.RouteCreated(producer=CLI, route_id=f"r{n}", session_id=sid, endpoint="e"))
        token = await store.append(ev.SessionClaimed(producer=me(agent), session_id=sid, agent_id=agent,
                                                     instance_id="i", incarnation=inc[agent]))
        await store.append(ev.RouteTransitioned(producer=me(agent), route_id=f"r{n % 3}", from_state="PENDING",
                                                to_state="STARTING", token=token))
        await store.append(ev.SessionOrphaned(producer=RECLAIMER, session_id=sid, reason="owner_suspect",
                                              previous_owner=agent, previous_token=token))
        if n == 3:  # a stale release (flagged), a goodbye and a new incarnation, a message that is not an event
            await store.append(ev.SessionReleased(producer=me(agent), session_id=sid, agent_id=agent,
                                                  incarnation=inc[agent], token=token))
            await store.append(ev.AgentGoodbye(producer=me(agent), agent_id=agent, instance_id="i",
                                               incarnation=inc[agent]))
            inc[agent] = await store.append(ev.AgentRegistered(producer=me(agent), agent_id=agent, instance_id="i",
                                                               pool="p"))
            await store.nc.jetstream().publish("ledger.session.sx.created.cli", b"{not json")


async def views(q: Query, as_of: AsOf) -> dict[str, Any]:
    """Every view of one moment, as the JSON the CLI and HTTP API return (the position's source set apart)."""
    pages = {"agents": await q.agents(as_of=as_of), "sessions": await q.sessions(as_of=as_of),
             "routes": await q.routes(as_of=as_of), "pools": await q.pools(as_of=as_of),
             "anomalies": await q.anomalies(as_of=as_of)}
    out: dict[str, Any] = {name: msgspec.to_builtins(page) for name, page in pages.items()}
    sources = {page["position"].pop("source") for page in out.values()}
    assert len(sources) == 1, sources
    out["source"] = sources.pop()
    return out


async def project(store: EventStore, db: Path) -> None:
    settings = ProjectionSettings(db=str(db), snapshot_every=5, snapshot_recent=2)
    async with Projector(store, settings) as projector:
        await projector.ready(timeout=20)
        await fleet(store)  # live: many small commits, and snapshots, along the way
        await projector.wait_for(await store.last_seq(LEDGER_STREAM), timeout=20)
        await projector.wait_for(await store.last_seq(HEARTBEAT_STREAM), HEARTBEAT_STREAM, timeout=20)


async def test_every_view_of_the_past_from_the_index_equals_the_replay(store: EventStore, tmp_path: Path):
    await project(store, tmp_path / "p.sqlite3")
    items = await everything(store)
    end = await store.last_seq(LEDGER_STREAM)
    moments: list[AsOf] = [*range(1, end + 1, 2), end]  # (#0 judges health at the wall clock: no moment)
    for item in items[1::3]:  # moments: when items of either stream were stored, and just before
        moments += [item.stored_at, item.stored_at - timedelta(microseconds=1)]
    moments.append(items[0].stored_at - timedelta(seconds=1))
    replayed = Query(None, store)
    async with Query.open(tmp_path / "p.sqlite3", store) as indexed:
        for moment in moments:
            from_index, from_replay = await views(indexed, moment), await views(replayed, moment)
            assert from_index.pop("source").startswith(INDEXED), moment
            assert not from_replay.pop("source").startswith(INDEXED)
            assert from_index == from_replay, moment
        page = await indexed.sessions(as_of=end)
        assert page.items and page.position.ledger_seq == end


async def test_a_moment_the_file_has_not_committed_yet_is_replayed(store: EventStore, tmp_path: Path):
    await project(store, tmp_path / "p.sqlite3")
    committed = await store.last_seq(LEDGER_STREAM)
    newer = await store.append(ev.SessionCreated(producer=CLI, session_id="late", pool="p"))  # no projector now
    async with Query.open(tmp_path / "p.sqlite3", store) as q:
        ahead = await q.sessions(as_of=newer)
        assert not ahead.position.source.startswith(INDEXED)
        assert "late" in [s.session_id for s in ahead.items]
        behind = await q.sessions(as_of=committed)
        assert behind.position.source.startswith(INDEXED)
        assert "late" not in [s.session_id for s in behind.items]


async def test_beyond_the_heartbeat_retention_the_index_says_what_the_replay_says(
        tmp_path_factory: pytest.TempPathFactory):
    server = start_binary_server(tmp_path_factory.mktemp("short-hb"))
    try:
        settings = Settings(nats_url=server.url, heartbeat_max_age=1.0, duplicate_window=0.5)
        db = tmp_path_factory.mktemp("db") / "p.sqlite3"
        async with EventStore.connect(settings, ensure=True) as store:
            projection = ProjectionSettings(db=str(db), snapshot_every=1, snapshot_recent=2)
            async with Projector(store, projection) as projector:
                await projector.ready(timeout=20)
                inc = await store.append(ev.AgentRegistered(producer=me("a1"), agent_id="a1", instance_id="i",
                                                            pool="p"))
                beat = ev.AgentHeartbeat(producer=me("a1"), agent_id="a1", instance_id="i", incarnation=inc, beat=1)
                await store.append(beat)
                registered = await store.append(ev.SessionCreated(producer=CLI, session_id="s1", pool="p"))

                async def expired() -> bool:
                    return (await store.stream_facts(HEARTBEAT_STREAM)).messages == 0

                await until(expired, timeout=10, what="the heartbeat to expire")
                for n in (2, 3):  # later beats; each snapshot of the heartbeat fold prunes what expired
                    last = await store.append(msgspec.structs.replace(beat, beat=n, event_id=f"e{n}"))
                    await projector.wait_for(last, HEARTBEAT_STREAM, timeout=20)
                await projector.wait_for(registered, timeout=20)
            async with Query.open(db, store) as indexed:
                assert indexed.db is not None
                for moment in (1, registered):  # before any heartbeat snapshot; after the first one
                    past = await past_as_of(store, indexed.db, seq=moment)
                    rebuilt = await state_as_of(store, indexed.db, seq=moment)  # the same file's snapshots
                    assert past is not None
                    agents, beats = await of_the_moment(indexed.db, past)
                    assert agents == rebuilt.state.ledger.agents
                    assert beats == rebuilt.state.heartbeats.beats and past.notes == rebuilt.notes
                    assert (past.hb_seq, past.beats_known) == (rebuilt.state.heartbeats.seq, rebuilt.beats_known)
                unknown = await indexed.agents(as_of=1)
                assert unknown.items[0].health == "unknown" and "no heartbeat history" in unknown.position.notes[0]
                now = await indexed.agents(as_of=(await everything(store))[-1].stored_at)
                assert now.items[0].last_heartbeat_seq == last
                kept = [r[0] for r in await indexed.db.conn.execute_fetchall("SELECT seq FROM beat_versions")]
                assert 1 not in kept and last in kept  # the expired #1, superseded since, was pruned
    finally:
        server.stop()


async def test_heartbeats_the_file_has_not_committed_yet_are_replayed_onto_the_committed_ones(
        store: EventStore, tmp_path: Path):
    await project(store, tmp_path / "p.sqlite3")
    agents = {a.agent_id: a for a in (await Query(None, store).agents(as_of=await store.last_seq())).items}
    for n, agent in enumerate(("a1", "a2", "a1")):  # no projector now: the file's beats lag these
        await store.append(ev.AgentHeartbeat(producer=me(agent), agent_id=agent, instance_id="i",
                                             incarnation=agents[agent].incarnation, beat=100 + n, load=2))
    await store.append(ev.AgentHeartbeat(producer=me("a2"), agent_id="a1", instance_id="i",  # flagged: not a1's
                                         incarnation=agents["a1"].incarnation, beat=200))
    last = (await everything(store))[-1]
    assert last.stream == HEARTBEAT_STREAM
    async with Query.open(tmp_path / "p.sqlite3", store) as indexed:
        for moment in (last.stored_at, last.stored_at - timedelta(microseconds=1)):
            from_index, from_replay = await views(indexed, moment), await views(Query(None, store), moment)
            assert from_index.pop("source").startswith(INDEXED)
            from_replay.pop("source")
            assert from_index == from_replay, moment
        page = await indexed.agents(as_of=last.stored_at)
        assert {a.agent_id: a.last_heartbeat_seq for a in page.items} == {"a1": last.seq - 1, "a2": last.seq - 2}
        flagged = await indexed.anomalies(as_of=last.stored_at)
        assert [(a.stream, a.seq) for a in flagged.items][:1] == [(HEARTBEAT_STREAM, last.seq)]
