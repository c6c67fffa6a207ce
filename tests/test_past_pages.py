"""Views of the past are paged in SQL like the present ones (issue: a past view costs one page, not every row):
each page - limits, offsets, `after` an id that exists or not, with filters SQL applies and those it cannot -
equals the same slice of the unpaged view and the replay's page, with the same `total`, on a real nats-server
and a real SQLite file; ids created out of order, retirement and re-creation included. A moment whose beat
versions the file prunes after it was cached is asked again, not answered with beats it no longer has."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from test_time_travel_views import CLI, INDEXED, RECLAIMER, everything, me

from ledger import events as ev
from ledger.settings import Settings
from ledger.store import EventStore
from ledger.subjects import HEARTBEAT_STREAM, LEDGER_STREAM
from ledgerctl.server import EmbeddedServer
from projections.errors import UnknownEntity
from projections.projector import Projector
from projections.query import AsOf, Query
from projections.settings import ProjectionSettings
from projections.timetravel import Past, Rebuilt, past_as_of, state_as_of
from projections.views import paged

SESSIONS = ("s-7", "s-10", "s-2", "s-33", "s-4", "s-1", "s-25")
"""Created in this order: not the order of their ids (the SQL walk must give id order, not creation order)."""
AGENTS = ("a3", "a1", "a4", "a2")
POOLS = ("p", "q")

FILTERS: dict[str, list[dict[str, Any]]] = {
    "sessions": [{}, {"pool": "p"}, {"state": "assigned"}, {"owner": "a1"}, {"pool": "q", "state": "orphaned"},
                 {"state": "terminated"}],
    "routes": [{}, {"session": "s-33"}, {"status": "PROVISIONING"}, {"state": "PENDING"}],
    "agents": [{}, {"pool": "q"}, {"health": "alive"}, {"region": "default", "pool": "p"}],
}
"""Per view, filters SQL applies (pool, state, owner, session, status) and those judged in memory (health, region)."""
PAGES: list[dict[str, Any]] = [{"limit": 1}, {"limit": 2, "offset": 1}, {"limit": 3, "after": "{id}"},
                               {"after": "{between}"}, {"offset": 2}, {"limit": 100}, {"after": "", "limit": 2},
                               {"offset": 10_000}, {"limit": 1, "offset": 1, "after": "{id}"}]
"""{id}: an id that exists (the second of the unpaged view); {between}: one that does not, sorting after it."""


@pytest.fixture
async def store(fresh_server: EmbeddedServer) -> AsyncIterator[EventStore]:
    async with EventStore.connect(Settings(nats_url=fresh_server.url), ensure=True) as s:
        yield s


class Replayed(Query):
    """Every moment rebuilt by a replay from the file's snapshots (with its fold's retain), never from its version
    rows: the reference (a replay without the file folds with the default retain)."""

    async def _past(self, as_of: int | datetime) -> Past | Rebuilt:
        key = self._key(as_of)
        if key not in self._cache:
            seq, time = (as_of, None) if isinstance(as_of, int) else (None, as_of)
            self._cache[key] = await state_as_of(self.store, self.db, seq=seq, time=time)  # type: ignore[arg-type]
        return self._cache[key]


def plain(page: Any) -> Any:
    out = msgspec.to_builtins(page)
    out["position"].pop("source")
    return out


def key(view: str, item: Any) -> str:
    return str(item[{"sessions": "session_id", "routes": "route_id", "agents": "agent_id"}[view]])


async def scrambled_fleet(store: EventStore) -> None:
    """Agents of two pools beating; sessions and routes created out of id order, claimed, orphaned, re-claimed,
    released and terminated; a goodbye and a new incarnation."""
    inc = {a: await store.append(ev.AgentRegistered(producer=me(a), agent_id=a, instance_id="i",
                                                    pool=POOLS[n % 2], capacity=4))
           for n, a in enumerate(AGENTS)}
    members = {pool: [a for n, a in enumerate(AGENTS) if POOLS[n % 2] == pool] for pool in POOLS}

    async def beat(n: int) -> None:
        for a in AGENTS:
            await store.append(ev.AgentHeartbeat(producer=me(a), agent_id=a, instance_id="i", incarnation=inc[a],
                                                 beat=n, load=n % 3, capacity=4))

    tokens: dict[str, tuple[str, int]] = {}
    for n, sid in enumerate(SESSIONS):
        pool = POOLS[n % 2]
        await store.append(ev.SessionCreated(producer=CLI, session_id=sid, pool=pool))
        await store.append(ev.RouteCreated(producer=CLI, route_id=f"r-{sid[2:]}", session_id=sid, endpoint="e"))
        agent = members[pool][(n // 2) % 2]
        tokens[sid] = agent, await store.append(ev.SessionClaimed(producer=me(agent), session_id=sid,
                                                                  agent_id=agent, instance_id="i",
                                                                  incarnation=inc[agent]))
        if n % 3 == 0:
            await store.append(ev.RouteTransitioned(producer=me(agent), route_id=f"r-{sid[2:]}", from_state="PENDING",
                                                    to_state="STARTING", token=tokens[sid][1]))
        await beat(n)
    for sid in ("s-10", "s-4", "s-25"):
        agent, token = tokens[sid]
        await store.append(ev.SessionOrphaned(producer=RECLAIMER, session_id=sid, reason="owner_suspect",
                                              previous_owner=agent, previous_token=token))
    await beat(10)
    agent, token = tokens["s-2"]
    await store.append(ev.SessionReleased(producer=me(agent), session_id="s-2", agent_id=agent,
                                          incarnation=inc[agent], token=token))
    await store.append(ev.SessionTerminated(producer=CLI, session_id="s-7", token=None))
    await store.append(ev.AgentGoodbye(producer=me("a4"), agent_id="a4", instance_id="i", incarnation=inc["a4"]))
    inc["a4"] = await store.append(ev.AgentRegistered(producer=me("a4"), agent_id="a4", instance_id="i", pool="p",
                                                      capacity=4))
    agent = members["q"][1]
    await store.append(ev.SessionClaimed(producer=me(agent), session_id="s-10", agent_id=agent, instance_id="i",
                                         incarnation=inc[agent], reason="orphaned"))
    await store.append(ev.SessionTerminated(producer=CLI, session_id="s-33", token=None))
    await store.append(ev.SessionCreated(producer=CLI, session_id="s-33", pool="p"))  # re-created (if retired)
    await beat(11)
    await store.append(ev.SessionCreated(producer=CLI, session_id="s-0", pool="q"))


async def project(store: EventStore, db: Path, **settings: Any) -> None:
    projection = ProjectionSettings(db=str(db), snapshot_every=7, snapshot_recent=2, **settings)
    async with Projector(store, projection) as projector:
        await projector.ready(timeout=20)
        await scrambled_fleet(store)  # live: many small commits, and snapshots, along the way
        await projector.wait_for(await store.last_seq(LEDGER_STREAM), timeout=20)
        await projector.wait_for(await store.last_seq(HEARTBEAT_STREAM), HEARTBEAT_STREAM, timeout=20)


def pagings(view: str, every: list[str]) -> list[dict[str, Any]]:
    """PAGES with {id} and {between} filled in from the unpaged view's ids."""
    there = every[1] if len(every) > 1 else every[0] if every else "s-5"
    out = []
    for page in PAGES:
        out.append({k: v.format(id=there, between=there + "0") if isinstance(v, str) else v for k, v in page.items()})
    return out


@pytest.mark.parametrize("retain", [None, 0.0], ids=["default-retain", "retain-0"])
async def test_each_page_of_the_past_is_the_slice_of_the_whole_view_and_the_replay_s_page(
        store: EventStore, tmp_path: Path, retain: float | None):
    await project(store, tmp_path / "p.sqlite3", **({} if retain is None else {"retain": retain}))
    end = await store.last_seq(LEDGER_STREAM)
    items = await everything(store)
    moments: list[AsOf] = sorted({*range(2, end + 1, max(1, end // 6)), end})
    moments += [items[len(items) // 2].stored_at, items[-1].stored_at - timedelta(microseconds=1)]
    checked = 0
    async with Query.open(tmp_path / "p.sqlite3", store) as indexed, Replayed.open(tmp_path / "p.sqlite3",
                                                                                    store) as replayed:
        for moment in moments:
            for view, filters in FILTERS.items():
                for where in filters:
                    whole = await getattr(indexed, view)(as_of=moment, **where)
                    assert whole.position.source.startswith(INDEXED), moment
                    assert plain(whole) == plain(await getattr(replayed, view)(as_of=moment, **where)), (
                        view, moment, where)
                    every = plain(whole)["items"]
                    assert [key(view, i) for i in every] == sorted(key(view, i) for i in every)  # id order
                    assert whole.total == len(every)
                    for paging in pagings(view, [key(view, i) for i in every]):
                        page = await getattr(indexed, view)(as_of=moment, **where, **paging)
                        got = plain(page)
                        assert got == plain(await getattr(replayed, view)(as_of=moment, **where, **paging)), (
                            view, moment, where, paging)
                        assert got["items"] == paged(every, lambda i, v=view: key(v, i), **paging), (
                            view, moment, where, paging)
                        assert page.total == whole.total
                        checked += bool(got["items"])
            for agent in (*AGENTS, "a-none"):  # one agent, as `ledger agent show` asks
                try:
                    one = msgspec.to_builtins(await indexed.agent(agent, as_of=moment))
                except UnknownEntity:
                    with pytest.raises(UnknownEntity):
                        await replayed.agent(agent, as_of=moment)
                else:
                    assert one == msgspec.to_builtins(await replayed.agent(agent, as_of=moment)), (agent, moment)
    assert checked > 500  # pages with rows in them, not only empty ones


async def test_a_cached_moment_whose_beat_versions_were_pruned_since_is_asked_again(
        store: EventStore, tmp_path: Path):
    db = tmp_path / "p.sqlite3"
    settings = ProjectionSettings(db=str(db), snapshot_every=3, snapshot_recent=2, beat_history=0)
    async with Projector(store, settings) as projector:
        await projector.ready(timeout=20)
        inc = {a: await store.append(ev.AgentRegistered(producer=me(a), agent_id=a, instance_id="i", pool="p"))
               for a in ("a1", "a2")}

        async def beats(n: int) -> int:
            last = 0
            for a in inc:
                last = await store.append(ev.AgentHeartbeat(producer=me(a), agent_id=a, instance_id="i",
                                                            incarnation=inc[a], beat=n))
            return last

        await beats(1)
        moment = await store.append(ev.SessionCreated(producer=CLI, session_id="s1", pool="p"))
        await projector.wait_for(moment, timeout=20)
        await projector.wait_for(await store.last_seq(HEARTBEAT_STREAM), HEARTBEAT_STREAM, timeout=20)
        async with Query.open(db, store) as indexed:
            assert indexed.db is not None
            past = await past_as_of(store, indexed.db, seq=moment)
            assert past is not None and past.beats is None  # inside the kept beat history: read per view
            before = plain(await indexed.agents(as_of=moment))  # cached, as a dashboard's next view finds it
            assert [a["last_heartbeat_seq"] for a in before["items"]] == [past.hb_seq - 1, past.hb_seq]
            for n in range(2, 8):  # later beats: heartbeat snapshots prune what the moment's beats were
                last = await beats(n)
            await projector.wait_for(last, HEARTBEAT_STREAM, timeout=20)
            assert await indexed.db.beats_from() > past.beats_seq
            again = plain(await indexed.agents(as_of=moment))
            assert again == before == plain(await Query(None, store).agents(as_of=moment))
