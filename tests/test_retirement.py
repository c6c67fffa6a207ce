"""Retirement: final entities leave the in-memory fold deterministically, and keep their rows and history.

The rule (projections.state): a terminated session or route, a route that failed to start, an agent gone, dead
or fenced, leaves its table once the stream's clock is `retain` seconds past the event that made it final.
Folding in one go, in batches through a snapshot, or resuming from the projection's rows must give one state.
"""

from __future__ import annotations

import asyncio
import tempfile
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from histories import histories
from hypothesis import given, settings
from hypothesis import strategies as st
from projection_helpers import commit_batches, dump, load

from ledger import codec
from ledger import events as ev
from ledger.codec import Recorded, Unreadable
from ledger.subjects import HEARTBEAT_STREAM, LEDGER_STREAM
from projections import snapshots
from projections.beats import of_incarnation
from projections.db import ProjectionDB
from projections.state import (
    AGENT,
    DEAD_LETTER,
    ROUTE,
    SESSION,
    HeartbeatState,
    LedgerState,
    LifecycleState,
    final_at,
)

RETAINS = st.sampled_from((0.0, 2.0, 5.0, 15.0))
"""Seconds of log time: generated histories store one item a second, so each of these retires something."""


def fresh(retain: float) -> LedgerState:
    return LedgerState(ledger=LifecycleState(retain=retain))



def through_snapshots(items: list[Any], retain: float, data: st.DataObject) -> LedgerState:
    """The fold in batches cut where hypothesis says, each batch's state packed and unpacked as a snapshot is."""
    batched = fresh(retain)
    for start, end in cuts(data, len(items)):
        batched.apply_all(items[start:end])
        batched = LedgerState(ledger=snapshots.unpack(snapshots.pack(batched.ledger), LifecycleState),
                              heartbeats=snapshots.unpack(snapshots.pack(batched.heartbeats), HeartbeatState))
    return batched

def fold(items: list[Any], retain: float) -> LedgerState:
    state = fresh(retain)
    state.apply_all(items)
    return state


def cuts(data: st.DataObject, n: int) -> list[tuple[int, int]]:
    return list(pairwise([0, *sorted(data.draw(st.lists(st.integers(0, n), max_size=6))), n]))


def tables(part: LifecycleState) -> dict[str, dict[str, Any]]:
    return {AGENT: part.agents, SESSION: part.sessions, ROUTE: part.routes}


class Rows:
    """What the projector's file holds: the last state of every entity ever changed, retired or not."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {AGENT: {}, SESSION: {}, ROUTE: {}}
        self.lives: dict[str, int] = {}
        """Agent -> the sequence of its newest creating version (`first` in agent_versions)."""

    def note(self, state: LedgerState, change: Any) -> None:
        if change is None:
            return
        for gone in change.retired:
            self.rows[gone.kind][gone.id] = gone.final
        if change.kind in self.rows and change.applied and change.id in tables(state.ledger)[change.kind]:
            self.rows[change.kind][change.id] = tables(state.ledger)[change.kind][change.id]
            if change.kind == AGENT and change.before is None:
                self.lives[change.id] = state.ledger.agents[change.id].incarnation

    def loaded(self, state: LedgerState) -> LedgerState:
        """The state as `load_state` reads it back: rows, pools, checkpoints and counters (then the projector
        settles it with its retain)."""
        ledger = LifecycleState(agents=dict(self.rows[AGENT]), sessions=dict(self.rows[SESSION]),
                                routes=dict(self.rows[ROUTE]), pools=dict(state.ledger.pools),
                                dead_letters=dict(state.ledger.dead_letters), seq=state.ledger.seq,
                                stored_ns=state.ledger.stored_ns, anomalies=state.ledger.anomalies,
                                lives=dict(self.lives))
        beats = snapshots.unpack(snapshots.pack(state.heartbeats), HeartbeatState)
        return LedgerState(ledger=ledger, heartbeats=beats)


@settings(max_examples=120, deadline=None)
@given(items=histories(max_size=90), retain=RETAINS, data=st.data())
def test_one_go_equals_batches_through_snapshots_equals_a_resume_from_rows(items: list[Any], retain: float,
                                                                          data: st.DataObject):
    whole = fold(items, retain)

    assert through_snapshots(items, retain, data) == whole

    k = data.draw(st.integers(0, len(items)))
    state, rows = fresh(retain), Rows()
    for item in items[:k]:
        rows.note(state, state.apply(item))
    resumed = rows.loaded(state)
    resumed.settle(retain)
    assert resumed == state  # what the projector's file gives back is what the fold had
    for item in items[k:]:
        resumed.apply(item)
    assert resumed == whole


@settings(max_examples=120, deadline=None)
@given(items=histories(max_size=90), retain=RETAINS)
def test_after_every_item_no_entity_final_for_retain_is_left_and_each_retired_one_was(items: list[Any],
                                                                                    retain: float):
    state = fresh(retain)
    for item in items:
        change = state.apply(item)
        part = state.ledger
        for kind, table in tables(part).items():
            for entity in table.values():
                final = final_at(kind, entity)
                assert final is None or final[1] + round(retain * 1e9) > part.stored_ns
        for gone in change.retired if change is not None else ():
            final = final_at(gone.kind, gone.final)
            assert final is not None and final[1] + round(retain * 1e9) <= part.stored_ns
            assert tables(part)[gone.kind].get(gone.id) is not gone.final


@settings(max_examples=60, deadline=None)
@given(items=histories(max_size=90), retain=RETAINS)
def test_retirement_reads_the_lifecycle_stream_only(items: list[Any], retain: float):
    ledger_first = [i for i in items if i.stream == LEDGER_STREAM] + [i for i in items if i.stream == HEARTBEAT_STREAM]
    assert fold(ledger_first, retain) == fold(items, retain)



def stream_only(items: list[Any]) -> HeartbeatState:
    """The beats as the heartbeat stream alone folds them: nothing trimmed."""
    beats = HeartbeatState()
    for item in items:
        if item.stream == HEARTBEAT_STREAM:
            beats.apply(item)
    return beats


def interleaved(data: st.DataObject, items: list[Any]) -> list[Any]:
    """The two streams merged in an order hypothesis picks, each in its own order (as two consumers read them)."""
    ledger = [i for i in items if i.stream == LEDGER_STREAM]
    beats = [i for i in items if i.stream == HEARTBEAT_STREAM]
    picks = data.draw(st.lists(st.booleans(), min_size=len(items), max_size=len(items)), label="heartbeat next")
    out: list[Any] = []
    for pick in picks:
        first, other = (beats, ledger) if pick else (ledger, beats)
        out.append((first or other).pop(0))
    return out


@settings(max_examples=120, deadline=None)
@given(items=histories(max_size=90), retain=RETAINS, data=st.data())
def test_beats_of_retired_agents_leave_alike_whatever_the_interleaving_and_every_read_of_a_beat_stays(
        items: list[Any], retain: float, data: st.DataObject):
    """Beats leave the fold deterministically: any interleaving of the two streams, a fold in batches through
    snapshots, all give one state; and what anything reads of a beat - the registered incarnation's, or one above
    it - is what the heartbeat stream alone keeps."""
    whole = fold(items, retain)
    state, alone = fresh(retain), HeartbeatState()
    for item in interleaved(data, items):
        state.apply(item)
        if item.stream == HEARTBEAT_STREAM:
            alone.apply(item)
        part = state.ledger
        for agent_id, agent in part.agents.items():
            full = alone.beats.get(agent_id)
            assert state.current_beat(agent_id) == of_incarnation(full, agent.incarnation), agent_id
            above = full is not None and full.incarnation > agent.incarnation and (
                full.incarnation <= part.seq or part.stored_ns >= full.stored_ns)
            forged = state.unregistered_beat(agent_id)  # its top slot: the beat above the registered incarnation
            assert (forged.slots()[0] if forged else None) == (full.slots()[0] if full and above else None), agent_id
        for agent_id, beat in state.beats.items():  # a trimmed record is the stream's, less some of its slots
            assert set(beat.slots()) <= set(alone.beats[agent_id].slots())
    assert state == whole
    assert through_snapshots(items, retain, data) == whole


@settings(max_examples=15, deadline=None)
@given(items=histories(max_size=90), retain=RETAINS, data=st.data())
def test_retired_beats_leave_the_memory_never_the_file(items: list[Any], retain: float, data: st.DataObject):
    """The beat rows and versions are the heartbeat stream's fold whatever the fold in memory let go of: the same
    file as with nothing retired, and every moment's beats as the stream alone had them."""
    batches = [items[start:end] for start, end in cuts(data, len(items))]
    hb_end = max((i.seq for i in items if i.stream == HEARTBEAT_STREAM), default=0)

    async def scenario(tmp: Path) -> None:
        retiring = await commit_batches(tmp / "retiring.sqlite3", batches, state=fresh(retain))
        await commit_batches(tmp / "keeping.sqlite3", batches, state=fresh(10**9))
        files = dump(tmp / "retiring.sqlite3"), dump(tmp / "keeping.sqlite3")
        for table in ("beats", "beat_versions"):
            assert files[0][table] == files[1][table], table
        assert retiring.heartbeats == fold(items, retain).heartbeats
        ever = {i.event.entity_id for i in items if isinstance(i, Recorded)}
        async with await ProjectionDB.open(tmp / "retiring.sqlite3", readonly=True) as db, db.reading():
            assert await db.beats() == stream_only(items).beats
            for hb_seq in range(hb_end + 1):
                upto = [i for i in items if i.stream == LEDGER_STREAM or i.seq <= hb_seq]
                assert await db.beats_as_of(hb_seq, ever) == stream_only(upto).beats, hb_seq

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(Path(tmp)))


# --- bounded by what is live and recent, not by history --------------------------------------------------

OPERATOR = ev.Producer(id="cli", instance="c")
WATCHDOG = ev.Producer(id="watchdog", instance="w")
T0_NS = codec.to_ns(ev.utcnow())
STEP_NS = 50_000_000
"""Stored 50 ms apart: the default retention (ten minutes) spans 12,000 items of the workload."""


class Log:
    def __init__(self) -> None:
        self.seq = 0

    def __call__(self, event: ev.Event) -> Recorded:
        self.seq += 1
        return Recorded(LEDGER_STREAM, self.seq, codec.subject_of(event), T0_NS + self.seq * STEP_NS, event)


def churn(sessions: int, routed: int = 1) -> list[Recorded]:
    """Agents come and go, each serving sessions that are created, claimed and terminated; every `routed`-th
    with a route that ends too."""
    log, items = Log(), []
    agent, incarnation = "", 0
    for n in range(sessions):
        if n % 50 == 0:
            if agent:
                items.append(log(ev.AgentGoodbye(producer=ev.Producer(id=agent, instance="i"), agent_id=agent,
                                                 instance_id="i", incarnation=incarnation)))
            agent = f"a{n // 50}"
            me = ev.Producer(id=agent, instance="i")
            registered = log(ev.AgentRegistered(producer=me, agent_id=agent, instance_id="i", pool="p", ttl=60))
            items.append(registered)
            incarnation = registered.seq
        sid, rid = f"s{n}", f"r{n}"
        route = n % routed == 0
        items.append(log(ev.SessionCreated(producer=OPERATOR, session_id=sid, pool="p")))
        if route:
            items.append(log(ev.RouteCreated(producer=OPERATOR, route_id=rid, session_id=sid, endpoint="e")))
        items.append(log(ev.SessionClaimed(producer=me, session_id=sid, agent_id=agent, instance_id="i",
                                           incarnation=incarnation, reason="initial")))
        if route:
            items += [log(ev.RouteTransitioned(producer=WATCHDOG, route_id=rid, from_state="PENDING",
                                               to_state="TERMINATING")),
                      log(ev.RouteTransitioned(producer=WATCHDOG, route_id=rid, from_state="TERMINATING",
                                               to_state="TERMINATED"))]
        items.append(log(ev.SessionTerminated(producer=OPERATOR, session_id=sid, token=None)))
    return items


def entries(state: LedgerState) -> int:
    part = state.ledger
    return len(part.agents) + len(part.sessions) + len(part.routes)


def test_20k_sessions_created_and_terminated_leave_the_fold_as_small_as_10k_did():
    items = churn(20_000, routed=10)
    half = next(i for i, item in enumerate(items) if getattr(item.event, "session_id", None) == "s10000")
    state = LedgerState()
    state.apply_all(items[:half])
    at_10k = entries(state)
    state.apply_all(items[half:])
    at_20k = entries(state)
    # Ten minutes of log time hold 12,000 items (3.3 per session, 5 per route, 1 per 25 sessions per agent).
    window = 600 * 1e9 / STEP_NS
    assert at_20k <= window / 3.3 * 1.1 + 100
    assert abs(at_20k - at_10k) <= 0.05 * at_10k
    assert all(s.status == "terminated" for s in state.ledger.sessions.values())
    assert len(state.ledger._retiring) <= at_20k  # the heap is bounded by what it may still retire



def beat(agent: str, incarnation: int, seq: int, stored_ns: int) -> Recorded:
    e = ev.AgentHeartbeat(producer=ev.Producer(id=agent, instance="i"), agent_id=agent, instance_id="i",
                          incarnation=incarnation, beat=seq)
    return Recorded(HEARTBEAT_STREAM, seq, codec.subject_of(e), stored_ns, e)


def test_agents_that_come_and_go_leave_the_heartbeat_fold_after_retain():
    """2,000 agents register, beat, say goodbye: their beats stay while they may still be read, and leave with the
    agents once retired - also beats stored after that (a late one, of the old incarnation), while an agent that
    registers again keeps the beats of its new life only."""
    n, retain = 2_000, 600.0  # 4,000 lifecycle items, 50 ms apart: none retires before the clock moves on
    log, state = Log(), LedgerState(ledger=LifecycleState(retain=retain))
    hb_seq = 0
    incarnations = {}
    for k in range(n):
        agent = f"a{k}"
        me = ev.Producer(id=agent, instance="i")
        registered = log(ev.AgentRegistered(producer=me, agent_id=agent, instance_id="i", pool="p"))
        state.apply(registered)
        incarnations[agent] = registered.seq
        for _ in range(3):
            hb_seq += 1
            state.apply(beat(agent, registered.seq, hb_seq, registered.timestamp_ns))
        state.apply(log(ev.AgentGoodbye(producer=me, agent_id=agent, instance_id="i", incarnation=registered.seq)))
    assert len(state.heartbeats.beats) == n  # gone, not yet retired: a view of them still shows their last beat
    assert len(state.ledger.lives) == n
    clock = T0_NS + log.seq * STEP_NS + int(retain * 1e9)
    state.apply(Recorded(LEDGER_STREAM, log.seq + 1, "ledger.session.s.created.cli", clock,
                         ev.SessionCreated(producer=OPERATOR, session_id="s", pool="p")))
    log.seq += 1
    assert len(state.agents) == 0 and len(state.ledger.lives) == 0
    assert len(state.heartbeats.beats) == 0  # the heartbeat fold is back to nothing
    for k in range(0, n, 100):  # late beats of the retired incarnations are not kept
        hb_seq += 1
        state.apply(beat(f"a{k}", incarnations[f"a{k}"], hb_seq, clock))
    assert len(state.heartbeats.beats) == 0
    me = ev.Producer(id="a7", instance="i")  # a7 comes back: a new life
    again = log(ev.AgentRegistered(producer=me, agent_id="a7", instance_id="i", pool="p"))
    state.apply(again)
    hb_seq += 1
    state.apply(beat("a7", incarnations["a7"], hb_seq, clock))  # its old life's beat, after the new registration
    hb_seq += 1
    state.apply(beat("a7", again.seq, hb_seq, clock))
    assert list(state.heartbeats.beats) == ["a7"] and state.beats["a7"].slots() == (state.current_beat("a7"),)
    assert len(state._pending) <= 4 * len(state.heartbeats.beats)  # the heap of slots ahead of the lifecycle



async def test_an_agent_back_in_a_new_life_keeps_its_old_beats_in_its_row(tmp_path: Path):
    """The fold drops a retired agent's record; its next life begins a new one in memory. Its row must still be
    the stream's record - the old life's beat in `earlier` - batch after batch (the writer reads the row back)."""
    log, me = Log(), ev.Producer(id="a1", instance="i")
    first = log(ev.AgentRegistered(producer=me, agent_id="a1", instance_id="i", pool="p"))
    items: list[Any] = [first, beat("a1", first.seq, 1, first.timestamp_ns),
                        log(ev.AgentGoodbye(producer=me, agent_id="a1", instance_id="i", incarnation=first.seq))]
    again = log(ev.AgentRegistered(producer=me, agent_id="a1", instance_id="i", pool="p"))  # retires it (retain 0)
    items += [again, beat("a1", again.seq, 2, again.timestamp_ns), beat("a1", again.seq, 3, again.timestamp_ns)]
    state = await commit_batches(tmp_path / "p.sqlite3", [items[:5], items[5:]], state=fresh(0.0))
    assert state.beats["a1"].slots() == (state.current_beat("a1"),)  # memory: the new life only
    async with await ProjectionDB.open(tmp_path / "p.sqlite3", readonly=True) as db, db.reading():
        assert await db.beats() == stream_only(items).beats
        assert [b.incarnation for b in (await db.beats())["a1"].slots()] == [again.seq, first.seq]
        assert await db.beats_as_of(3, ["a1"]) == stream_only(items).beats


def test_a_late_event_on_a_retired_session_is_an_unknown_entity_and_a_re_creation_a_new_session():
    log = Log()
    items = churn(1)
    log.seq = items[-1].seq
    state = LedgerState(ledger=LifecycleState(retain=0))
    changes = state.apply_all(items)
    assert {(g.kind, g.id) for c in changes for g in c.retired} == {(SESSION, "s0"), (ROUTE, "r0")}
    late = state.apply(log(ev.SessionTerminated(producer=OPERATOR, session_id="s0", token=None)))
    assert late is not None and late.anomaly is not None and late.anomaly.kind == "unknown_entity"
    again = state.apply(log(ev.SessionCreated(producer=OPERATOR, session_id="s0", pool="p")))
    assert again is not None and again.applied and state.sessions["s0"].status == "pending"


def test_a_dead_letter_moves_the_clock_and_retires_too():
    items = churn(1)
    state = LedgerState(ledger=LifecycleState(retain=1.0))
    state.apply_all(items)
    assert "s0" in state.sessions
    last = items[-1]
    change = state.apply(Unreadable(LEDGER_STREAM, last.seq + 1, "ledger.session.x.created.cli",
                                    last.timestamp_ns + 2 * 10**9, b"{", "malformed: JSON is malformed"))
    assert change is not None and change.kind == DEAD_LETTER
    assert {g.id for g in change.retired} == {"s0", "r0"} and "s0" not in state.sessions


# --- the projection keeps the rows ------------------------------------------------------------------------

async def test_an_entity_retired_within_one_batch_keeps_its_terminal_row(tmp_path: Path):
    items = churn(300)
    retiring, keeping = fresh(1.0), fresh(10**9)
    await commit_batches(tmp_path / "retiring.sqlite3", [items], state=retiring)
    await commit_batches(tmp_path / "keeping.sqlite3", [items[:500], items[500:]], state=keeping)
    assert len(retiring.sessions) < 30 < len(keeping.sessions) == 300
    rows = dump(tmp_path / "retiring.sqlite3")
    assert rows == dump(tmp_path / "keeping.sqlite3")  # retirement changes the memory, never the file
    assert len(rows["sessions"]) == 300 and {r[2] for r in rows["sessions"]} == {"terminated"}
    assert {r[2] for r in rows["routes"]} == {"TERMINATED"}


async def test_a_projection_loaded_back_is_settled_to_the_fold(tmp_path: Path):
    path = tmp_path / "p.sqlite3"
    items = churn(300)
    state = await commit_batches(path, [items[:700], items[700:]], state=fresh(1.0))
    loaded = await load(path)
    assert len(loaded.sessions) == 300  # the file keeps every row
    loaded.settle(1.0)  # what Projector.open does with its settings' retain
    assert loaded == state


@settings(max_examples=15, deadline=None)
@given(items=histories(max_size=90), retain=RETAINS, data=st.data())
def test_a_projection_committed_in_batches_and_loaded_back_settles_to_the_fold(items: list[Any], retain: float,
                                                                              data: st.DataObject):
    batches = [items[start:end] for start, end in cuts(data, len(items))]

    async def committed_and_loaded(path: Path) -> LedgerState:
        await commit_batches(path, batches, state=fresh(retain))
        return await load(path)

    with tempfile.TemporaryDirectory() as tmp:
        loaded = asyncio.run(committed_and_loaded(Path(tmp) / "p.sqlite3"))
    loaded.settle(retain)
    assert loaded == fold(items, retain)


def test_the_retention_is_a_projection_setting():
    from ledger.errors import ConfigError
    from projections.settings import ProjectionSettings
    from projections.state import DEFAULT_RETAIN

    assert ProjectionSettings().retain == DEFAULT_RETAIN == 600.0
    assert ProjectionSettings.from_env({"LEDGER_PROJECTION_RETAIN": "30"}).retain == 30.0
    with pytest.raises(ConfigError):
        ProjectionSettings(retain=-1)


# --- a retired id against a real server: the writer decides from the history, which still says terminated ----

async def test_a_forged_re_creation_of_a_retired_session_gives_it_no_owner_through_the_writer(server: Any):
    from fleet import ledger_on

    from ledger.decide import AgentRef
    from ledger.errors import NotClaimable
    from ledger.writer import Writer

    state = LedgerState(ledger=LifecycleState(retain=0))

    async def fold_log(store: Any) -> None:
        async for batch in store.replay("ledger.>", stream=LEDGER_STREAM, start_seq=state.ledger.seq + 1):
            state.apply_all(batch)

    async with ledger_on(server.url) as operator:
        store = operator.store
        refs, writers = {}, {}
        for agent in ("a1", "a2"):
            me = ev.Producer(id=agent, instance=f"{agent}-i")
            seq = await store.append(ev.AgentRegistered(producer=me, agent_id=agent, instance_id=f"{agent}-i",
                                                        pool="gpu", ttl=3600))
            refs[agent], writers[agent] = AgentRef(agent, f"{agent}-i", seq), Writer(store, me)
        sid, _ = await operator.create_session(pool="gpu")
        await writers["a1"].claim_session(sid, refs["a1"])
        await operator.terminate_session(sid, reason="done")
        await fold_log(store)
        assert sid not in state.sessions  # retired at once (retain 0): the fold no longer knows it

        # An operator's raw publish re-creates the id (Writer.create_session would refuse: it expects no creation).
        await store.append(ev.SessionCreated(producer=operator.producer, session_id=sid, pool="gpu"))
        await fold_log(store)
        assert state.sessions[sid].status == "pending"  # the fold takes it for a new session, as documented
        for agent in ("a1", "a2"):  # but every claim is decided on the whole history: still terminated
            with pytest.raises(NotClaimable):
                await writers[agent].claim_session(sid, refs[agent])

        # Claims forged past the writer: the fold lets one owner in at most, and the history stays terminated.
        for agent in ("a2", "a1"):
            await store.append(ev.SessionClaimed(producer=writers[agent].producer, session_id=sid, agent_id=agent,
                                                 instance_id=refs[agent].instance_id,
                                                 incarnation=refs[agent].incarnation, reason="initial"))
        changes = []
        async for batch in store.replay("ledger.>", stream=LEDGER_STREAM, start_seq=state.ledger.seq + 1):
            changes += state.apply_all(batch)
        assert [c.anomaly.kind if c.anomaly else None for c in changes] == [None, "overlapping_claim"]
        assert state.sessions[sid].owner == "a2"
        history, _ = await operator.session(sid)
        assert history is not None and history.status == "terminated" and history.owner is None
        with pytest.raises(NotClaimable):
            await writers["a1"].claim_session(sid, refs["a1"], previous_token=state.sessions[sid].token)


async def test_the_projector_retires_from_memory_keeps_the_rows_and_settles_on_restart(server: Any, tmp_path: Path):
    from ledger.settings import Settings
    from ledger.store import EventStore
    from projections.projector import Projector
    from projections.settings import ProjectionSettings

    settings = ProjectionSettings(db=str(tmp_path / "p.sqlite3"), retain=0)
    async with EventStore.connect(Settings(nats_url=server.url)) as store:
        ended = [await store.append(r.event) for r in churn(3)]  # a fresh stream: the same sequences
        async with Projector(store, settings) as projector:
            await projector.wait_for(ended[-1], timeout=20)
            assert entries(projector.state) == 1  # the agent serving: every session and route ended
        async with await ProjectionDB.open(settings.db, readonly=True) as db:
            assert [s.status for s in await db.session_states()] == ["terminated"] * 3
            assert [r.state for r in await db.route_states()] == ["TERMINATED"] * 3
        async with Projector(store, settings) as projector:  # loaded from the rows, which keep everything
            assert entries(projector.state) == 1
            created = await store.append(ev.SessionCreated(producer=OPERATOR, session_id="s-new", pool="p"))
            await projector.wait_for(created, timeout=20)
            assert set(projector.state.sessions) == {"s-new"}
