"""The folded state as of a LEDGER sequence or a moment: nearest snapshot, then replay the rest.

As of sequence N: the LEDGER fold up to N, and heartbeats stored up to the
moment N was stored. As of time T: everything stored at or before T on both
streams. Each stream starts from its newest snapshot at or before the target
(so nothing replays from zero once snapshots exist) and replays the remainder
from JetStream into memory. Heartbeats exist only within their stream's
retention; the answer says so when the moment lies beyond it.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import NamedTuple

from ledger.codec import from_ns, to_ns
from ledger.store import EventStore
from ledger.subjects import HEARTBEAT_STREAM, LEDGER_STREAM

from . import snapshots
from .db import ProjectionDB
from .errors import InvalidQuery
from .projector import FILTERS
from .state import AnomalyRecord, HeartbeatState, LedgerState, LifecycleState


class Rebuilt(NamedTuple):
    state: LedgerState
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
                       end_seq: int | None = None, end_time: datetime | None = None) -> tuple[int, list[AnomalyRecord]]:
    n, anomalies = 0, []
    apply = part.apply
    async for items in store.replay(FILTERS[stream], stream=stream, start_seq=part.seq + 1, end_seq=end_seq,
                                    end_time=end_time, batch=5000):
        for item in items:
            change = apply(item)
            if change is not None and change.anomaly is not None:
                anomalies.append(change.anomaly)
        n += len(items)
    return n, anomalies


async def state_as_of(store: EventStore, db: ProjectionDB | None, *, seq: int | None = None,
                      time: datetime | None = None) -> Rebuilt:
    """The state as of LEDGER sequence `seq` or moment `time` (exactly one); `db` supplies snapshots."""
    if (seq is None) == (time is None):
        raise InvalidQuery("as of needs exactly one of a sequence or a time")
    if seq is not None and seq < 0:
        raise InvalidQuery(f"a stream sequence is 0 or more, got {seq}")
    notes: list[str] = []
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
    ledger = snapshots.unpack(snap.data, LifecycleState) if snap else LifecycleState()
    hb_snap = await db.nearest_snapshot(HEARTBEAT_STREAM, stored_ns=cut_ns) if db else None
    beats = snapshots.unpack(hb_snap.data, HeartbeatState) if hb_snap else HeartbeatState()
    hb_facts = await store.stream_facts(HEARTBEAT_STREAM)
    beats_known = True
    gap = hb_facts.messages and hb_facts.first_seq > beats.seq + 1
    replays = [_replay_into(store, ledger, LEDGER_STREAM, end_seq=seq, end_time=time)]
    if gap and hb_facts.first_ns > cut_ns:  # the moment lies before the oldest heartbeat still kept
        if beats.seq:
            notes.append(f"heartbeats after {from_ns(beats.stored_ns).isoformat()} up to this moment are no longer "
                         "kept; health uses the last ones known then")
        else:
            beats_known = False
            notes.append(f"no heartbeat history is kept for this moment (the heartbeat stream starts at "
                         f"{from_ns(hb_facts.first_ns).isoformat()}): the health of running agents is unknown")
    else:
        replays.append(_replay_into(store, beats, HEARTBEAT_STREAM, end_time=from_ns(cut_ns) if cut_ns else None,
                                    end_seq=None if cut_ns else 0))
    done = await asyncio.gather(*replays)
    replayed, anomalies = sum(n for n, _ in done), [a for _, found in done for a in found]
    if len(replays) == 2 and gap and ledger.agents:
        notes.append(f"heartbeats stored before {from_ns(hb_facts.first_ns).isoformat()} are no longer kept")
    state = LedgerState(ledger=ledger, heartbeats=beats)
    return Rebuilt(state, anomalies, {LEDGER_STREAM: snap.seq if snap else 0,
                                      HEARTBEAT_STREAM: hb_snap.seq if hb_snap else 0},
                   replayed, cut_ns, beats_known, notes)
