"""The folded state as of a LEDGER sequence or a moment: read from the version rows, or rebuilt by a replay.

As of sequence N: the LEDGER fold up to N, and heartbeats stored up to the
moment N was stored. As of time T: everything stored at or before T on both
streams. Heartbeats exist only within their stream's retention; the answer
says so when the moment lies beyond it.

Two ways to the same answer:

- `past_as_of` (a projection file that covers the moment): where each
  stream stood then (`Past`), and nothing else; each view then reads what it
  shows from the version rows the projector wrote (`projections.versions`):
  one page of entities as of the moment, in SQL like a view of now
  (`ProjectionReads(as_of=...)`), and the beats of the agents on it
  (`past_beats`), so a page costs its rows, not every entity's, nor the
  history's. A moment is mapped to each stream's last sequence stored at or
  before it by bisection on the stream's stored times (a few direct gets; a
  time bisects both streams at once). Beats come from the beat versions while
  the moment lies within the file's kept beat history
  (`ProjectionSettings.beat_history`, pruned at heartbeat snapshots: the file
  notes from which sequence on its beats answer, `beats_from`; a cached moment
  the pruning has passed since is asked again: `beats_kept`); for an older
  moment, from `beats_as_of_cut`, the one rule a replay uses too: the newest
  heartbeat snapshot at or before it, then what the stream still holds up to
  it (nothing, before the stream's retention). Those beats, and the ones a
  projector a moment behind has not committed yet (replayed onto the file's),
  are rebuilt once, for every agent of the moment, and kept in the `Past`.
- `state_as_of` (no file, or a moment past what the file has committed): the
  nearest snapshot of each stream, then a replay of the rest from JetStream.

Both list what the fold retired (`retain`) before the moment, as it ended: the
version rows keep every entity's last state, so the index lists them, and the
index is the reference. The replay folds with the snapshot's retain (the rule
decides how a later event on a retired id is judged), notes what retires
along the way, and puts those back, with the ones retired before the snapshot
read from the file's version rows as of the snapshot's sequence.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import datetime
from typing import Any, NamedTuple

from ledger.codec import from_ns, to_ns
from ledger.store import EventStore, StreamFacts
from ledger.subjects import HEARTBEAT_STREAM, LEDGER_STREAM

from . import snapshots
from .beats import Beat
from .db import ProjectionDB
from .errors import InvalidQuery
from .projector import FILTERS
from .state import AGENT, ROUTE, SESSION, AnomalyRecord, HeartbeatState, LedgerState, LifecycleState
from .stored import last_stored_by

__all__ = ["Beats", "Past", "Rebuilt", "beats_as_of_cut", "beats_kept", "last_stored_by", "past_as_of", "past_beats",
           "state_as_of"]


class Rebuilt(NamedTuple):
    state: LedgerState
    """The fold as of the moment, with what it had retired by then put back (as the version rows list them)."""
    anomalies: list[AnomalyRecord]
    """Anomalies met while replaying (those before the snapshots are in the projection's table)."""
    snapshots: dict[str, int]
    """The snapshot each stream started from (0: none)."""
    replayed: int
    cut_ns: int
    """The moment heartbeats were cut at (and health is judged at)."""
    beats_known: bool
    notes: list[str]


async def _replay_into(store: EventStore, part: LifecycleState | HeartbeatState, stream: str, *,
                       end_seq: int | None = None, end_time: datetime | None = None,
                       retired: dict[str, dict[str, Any]] | None = None) -> tuple[int, list[AnomalyRecord]]:
    """Fold the stream onto `part` up to the end; `retired` (kind -> id -> last state) notes what retires."""
    n, anomalies = 0, []
    apply = part.apply
    async for items in store.replay(FILTERS[stream], stream=stream, start_seq=part.seq + 1, end_seq=end_seq,
                                    end_time=end_time, batch=5000):
        for item in items:
            change = apply(item)
            if change is not None:
                if change.anomaly is not None:
                    anomalies.append(change.anomaly)
                if retired is not None:
                    for gone in change.retired:
                        retired[gone.kind][gone.id] = gone.final
        n += len(items)
    return n, anomalies


async def _retain_of(db: ProjectionDB | None) -> float:
    """The retain a replay from zero folds with: the file's fold's, as its newest snapshot records it (the rule
    judges a later event on a retired id by it - a re-created id is new with retain 0, a duplicate with the
    default). No file, or no snapshot yet: the default."""
    newest = await db.nearest_snapshot(LEDGER_STREAM) if db is not None else None
    return snapshots.unpack(newest.data, LifecycleState).retain if newest is not None else LifecycleState().retain


def _tables(part: LifecycleState) -> dict[str, dict[str, Any]]:
    return {AGENT: part.agents, SESSION: part.sessions, ROUTE: part.routes}


async def _retired_by(db: ProjectionDB, part: LifecycleState) -> dict[str, dict[str, Any]]:
    """The entities a snapshot's fold had retired, as they ended: those the file's version rows as of its
    sequence hold and it does not (the file committed the snapshot with its rows, so it covers that far)."""
    tables = _tables(part)
    async with db.reading():
        found: dict[str, dict[str, Any]] = {
                 AGENT: {a.agent_id: a for a in await db.agent_states(as_of=part.seq)},
                 SESSION: {s.session_id: s for s in await db.session_states(as_of=part.seq)},
                 ROUTE: {r.route_id: r for r in await db.route_states(as_of=part.seq)}}
    return {kind: {k: v for k, v in rows.items() if k not in tables[kind]} for kind, rows in found.items()}


def _put_back(part: LifecycleState, retired: dict[str, dict[str, Any]]) -> None:
    """Retired entities back into the tables for a view of the moment (an id created again since stays the new
    one). Only for an answer: the state is no longer the fold's, and is folded no further."""
    for kind, table in _tables(part).items():
        for key, final in retired[kind].items():
            table.setdefault(key, final)


class Beats(NamedTuple):
    """The heartbeat fold as of a cut, rebuilt: the nearest heartbeat snapshot at or before it, then a replay of
    what the stream still holds up to it."""

    state: HeartbeatState
    snapshot: int
    """The snapshot it started from (0: none)."""
    replayed: int
    anomalies: list[AnomalyRecord]
    beats_known: bool
    notes: list[str]
    lost: bool
    """Replayed, though the stream no longer holds beats between the snapshot and its start (the caller notes it
    when there are agents: `_lost`)."""


def _lost(hb_facts: StreamFacts) -> str:
    return f"heartbeats stored before {from_ns(hb_facts.first_ns).isoformat()} are no longer kept"


async def beats_as_of_cut(store: EventStore, db: ProjectionDB | None, cut_ns: int, hb_facts: StreamFacts,
                          ledger_seq: int | None = None) -> Beats:
    """The heartbeats as of the moment `cut_ns` (0: none yet), as a replay finds them: the one rule for a moment
    the file's beat versions do not cover (no file, older than its kept beat history, older than the stream).
    `ledger_seq`: the moment's LEDGER sequence, if it is one. A heartbeat snapshot lacks the beats of agents the
    lifecycle fold had retired when it was taken, so only one taken while that fold stood within the moment
    will do (the beats it lacks are then of agents retired by the moment, or of their earlier lives)."""
    hb_snap = await db.nearest_snapshot(HEARTBEAT_STREAM, stored_ns=cut_ns, ledger_seq=ledger_seq,
                                        ledger_ns=cut_ns) if db else None
    beats = snapshots.unpack(hb_snap.data, HeartbeatState) if hb_snap else HeartbeatState()
    snap_seq = hb_snap.seq if hb_snap else 0
    gap = bool(hb_facts.messages) and hb_facts.first_seq > beats.seq + 1
    if gap and hb_facts.first_ns > cut_ns:  # the moment lies before the oldest heartbeat still kept
        if beats.seq:
            return Beats(beats, snap_seq, 0, [], True, [
                f"heartbeats after {from_ns(beats.stored_ns).isoformat()} up to this moment are no longer kept; "
                "health uses the last ones known then"], False)
        return Beats(beats, snap_seq, 0, [], False, [
            f"no heartbeat history is kept for this moment (the heartbeat stream starts at "
            f"{from_ns(hb_facts.first_ns).isoformat()}): the health of running agents is unknown"], False)
    n, anomalies = await _replay_into(store, beats, HEARTBEAT_STREAM, end_time=from_ns(cut_ns) if cut_ns else None,
                                      end_seq=None if cut_ns else 0)
    return Beats(beats, snap_seq, n, anomalies, True, [], gap)


async def state_as_of(store: EventStore, db: ProjectionDB | None, *, seq: int | None = None,
                      time: datetime | None = None) -> Rebuilt:
    """The state as of LEDGER sequence `seq` or moment `time` (exactly one); `db` supplies snapshots."""
    if (seq is None) == (time is None):
        raise InvalidQuery("as of needs exactly one of a sequence or a time")
    if seq is not None and seq < 0:
        raise InvalidQuery(f"a stream sequence is 0 or more, got {seq}")
    time_ns = to_ns(time) + 999 if time is not None else None  # a datetime covers its whole microsecond

    ledger_facts = await store.stream_facts(LEDGER_STREAM)
    if seq is not None and seq > ledger_facts.last_seq:
        raise InvalidQuery(f"the {LEDGER_STREAM} stream ends at #{ledger_facts.last_seq}; there is no #{seq}")
    # Heartbeats are cut at the moment #seq was stored: read it first, so both streams replay at once.
    if time_ns is not None:
        cut_ns = time_ns
    elif seq:
        cut_ns = await store.stored_ns(seq, LEDGER_STREAM) or 0
    else:
        cut_ns = 0
    snap = await db.nearest_snapshot(LEDGER_STREAM, seq=seq, stored_ns=time_ns) if db else None
    ledger = snapshots.unpack(snap.data, LifecycleState) if snap else LifecycleState(retain=await _retain_of(db))
    retired = await _retired_by(db, ledger) if db is not None and snap else {AGENT: {}, SESSION: {}, ROUTE: {}}
    hb_facts = await store.stream_facts(HEARTBEAT_STREAM)
    (replayed, anomalies), hb = await asyncio.gather(
        _replay_into(store, ledger, LEDGER_STREAM, end_seq=seq, end_time=time, retired=retired),
        beats_as_of_cut(store, db, cut_ns, hb_facts, seq))
    _put_back(ledger, retired)
    notes = hb.notes + ([_lost(hb_facts)] if hb.lost and ledger.agents else [])
    state = LedgerState(ledger=ledger, heartbeats=hb.state)
    return Rebuilt(state, anomalies + hb.anomalies, {LEDGER_STREAM: snap.seq if snap else 0,
                                                     HEARTBEAT_STREAM: hb.snapshot},
                   replayed + hb.replayed, cut_ns, hb.beats_known, notes)


class Past(NamedTuple):
    """A moment the version rows cover: where each stream stood then. The entities are read as of `ledger_seq` by
    the view that needs them (`ProjectionReads(as_of=...)`: one page of them, or those a view names), and so are
    the beats, of the agents it shows: `past_beats`."""

    ledger_seq: int
    ledger_ns: int
    hb_seq: int
    hb_ns: int
    cut_ns: int
    """The moment heartbeats were cut at (and health is judged at)."""
    beats: dict[str, Beat] | None
    """The beats of the moment's agents, rebuilt (older than the file's kept beat history, or replayed onto the
    committed ones where the file lags the moment); None: read from the beat versions as of `beats_seq`."""
    beats_seq: int
    """The LEDGER_HB sequence the file's beat versions answer at (with `beats` None)."""
    beats_known: bool
    notes: list[str]
    lagged: list[AnomalyRecord]
    """Anomalies of heartbeats the file has not committed yet, replayed (the table has the others)."""


async def beats_kept(db: ProjectionDB, past: Past) -> bool:
    """Whether `past_beats` still answers for `past` (inside `db.reading()`): the file prunes its beat versions
    as its kept beat history moves on, and a moment once inside it may lie before it by now."""
    return past.beats is not None or past.beats_seq >= await db.beats_from()


async def past_beats(db: ProjectionDB, past: Past, ids: Iterable[str]) -> dict[str, Beat]:
    """The beats of these agents (of the moment's, those with any) as of the moment; read inside `db.reading()`
    where `beats_kept` said so."""
    if past.beats is not None:
        return {k: b for k in ids if (b := past.beats.get(k)) is not None}
    return await db.beats_as_of(past.beats_seq, ids)


async def past_as_of(store: EventStore, db: ProjectionDB, *, seq: int | None = None,
                     time: datetime | None = None) -> Past | None:
    """The moment as of LEDGER sequence `seq` or moment `time` (exactly one), from the version rows; None when
    the file has not committed that far on LEDGER (the caller replays instead: `state_as_of`). Heartbeats the
    file has not committed yet (a projector a moment behind) are replayed onto the committed ones; so are those
    of a moment older than the file's kept beat history, as a replay finds them. Only then are the moment's
    agents read here (their beats are the replay's start); otherwise nothing is, but whether there were any."""
    if (seq is None) == (time is None):
        raise InvalidQuery("as of needs exactly one of a sequence or a time")
    if seq is not None and seq < 0:
        raise InvalidQuery(f"a stream sequence is 0 or more, got {seq}")
    ledger_facts, hb_facts = await asyncio.gather(store.stream_facts(LEDGER_STREAM),
                                                  store.stream_facts(HEARTBEAT_STREAM))
    if seq is not None and seq > ledger_facts.last_seq:
        raise InvalidQuery(f"the {LEDGER_STREAM} stream ends at #{ledger_facts.last_seq}; there is no #{seq}")
    async def heartbeats_by(cut_ns: int) -> tuple[int, int]:
        """Where LEDGER_HB stood at the cut: (0, 0) before its first kept beat."""
        if hb_facts.messages and cut_ns >= hb_facts.first_ns:
            return await last_stored_by(store, HEARTBEAT_STREAM, cut_ns, hb_facts.first_seq, hb_facts.last_seq)
        return 0, 0

    if time is not None:  # both streams bisected at once: each is a few round trips to the server
        cut_ns = to_ns(time) + 999  # a datetime covers its whole microsecond
        (seq, ledger_ns), (hb_seq, hb_ns) = await asyncio.gather(
            last_stored_by(store, LEDGER_STREAM, cut_ns, ledger_facts.first_seq, ledger_facts.last_seq),
            heartbeats_by(cut_ns))
        seq, ledger_ns = (seq, ledger_ns) if ledger_ns else (0, 0)
    else:
        assert seq is not None
        ledger_ns = cut_ns = (await store.stored_ns(seq, LEDGER_STREAM) or 0) if seq else 0
        hb_seq, hb_ns = await heartbeats_by(cut_ns)
    async with db.reading():  # one committed batch: the checkpoints, the agents, and beats not pruned under us
        committed_ledger, committed_hb = await db.checkpoints()
        if seq > committed_ledger.seq:
            return None
        beats_seq = min(hb_seq, committed_hb.seq)
        indexed = bool(hb_seq) and beats_seq >= await db.beats_from()
        lags = indexed and hb_seq > committed_hb.seq
        agents = [a.agent_id for a in await db.agent_states(as_of=seq)] if lags or not indexed else None
        any_agents = bool(agents) if agents is not None else await db.has_agents(as_of=seq)
        if indexed:  # the moment lies within the file's kept beat history
            hb_snap = await db.nearest_snapshot(HEARTBEAT_STREAM, stored_ns=cut_ns, with_data=False)
            committed = await db.beats_as_of(beats_seq, agents) if agents is not None else None
    lagged: list[AnomalyRecord] = []
    if not indexed:  # older than the file's kept beat history (or the stream's): as a replay finds them
        assert agents is not None
        cut = await beats_as_of_cut(store, db, cut_ns, hb_facts, seq)
        beats = {k: b for k in agents if (b := cut.state.beats.get(k)) is not None}
        hb_seq, hb_ns, beats_known = cut.state.seq, cut.state.stored_ns, cut.beats_known
        notes = cut.notes + ([_lost(hb_facts)] if cut.lost and any_agents else [])
        lagged = [a for a in cut.anomalies if a.seq > committed_hb.seq]
        return Past(seq, ledger_ns, hb_seq, hb_ns, cut_ns, beats, 0, beats_known, notes, lagged)
    found: dict[str, Beat] | None = None
    if lags:  # the file's beats lag the moment: replay only the lag
        assert agents is not None and committed is not None
        lag = HeartbeatState(seq=committed_hb.seq, beats=committed)
        _, lagged = await _replay_into(store, lag, HEARTBEAT_STREAM, end_seq=hb_seq)
        found = {k: b for k in agents if (b := lag.beats.get(k)) is not None}
    gap = hb_facts.first_seq > (hb_snap.seq if hb_snap else 0) + 1
    return Past(seq, ledger_ns, hb_seq, hb_ns, cut_ns, found, beats_seq, True,
                [_lost(hb_facts)] if gap and any_agents else [], lagged)
