"""The heartbeat fold: per agent, the newest beat of each of its few highest incarnations.

Heartbeats live in their own stream (LEDGER_HB, bounded retention) and are
folded apart from the lifecycle events: the fold never reads a registration,
so the two streams can be consumed independently and in any relative order.
The join with the agent's registered incarnation happens at query time
(`of_incarnation`, used by `projections.health` and the consumers).

Why several incarnations and not just the highest: an incarnation number is
whatever the beat says. A forged beat claiming incarnation 10**12 has no
registration behind it; if it were the only beat kept, the agent's real beats
(of its lower, registered incarnation) would be refused from then on and the
agent would look dead in every view while it beats. So the newest beat of each
of the `KEEP` most recently beating incarnations is kept: a beat of an
unregistered incarnation sits in a slot nobody reads (the monitor logs it), and
the registered incarnation, beating every interval, keeps its slot. Kept by
incarnation instead, `KEEP` one-shot forged beats of high incarnations would
push the real one out for good - and every later incarnation of the agent,
all lower than theirs, would be refused too (dead, registered again, dead...).
Only a flood of `KEEP` new incarnations in every heartbeat interval can push
the real one out, and only the agent itself may beat for it: a beat whose
producer token is not the agent's id (`lifecycle.writer_problem`) is flagged
first, so a1 may not keep a2 alive, nor push a2's real beats out.
Keeping the `KEEP` incarnations whose newest beats are the newest is a
function of the set of beats, so the fold stays deterministic and
order-independent. The top slot is the highest incarnation kept.

`HeartbeatState` is this fold alone, and the projection's rows and beat
versions are it too (`merged`). The fold in memory beside the lifecycle one
(`state.LedgerState`) also lets go of the slots of an agent's past
(`trimmed`), so beats do not outlive retired agents.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import msgspec

from ledger import events as ev
from ledger.codec import Recorded
from ledger.lifecycle import SUPERSEDED_INCARNATION, Anomaly, writer_problem

KEEP = 4
"""Incarnations per agent whose newest beat is kept (the registered one plus room for stale or forged ones):
those that beat most recently."""


class Beat(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The newest heartbeat seen for one agent (of its highest incarnation seen), with those of lower ones."""

    agent_id: str
    incarnation: int
    instance_id: str
    seq: int
    """Sequence in the heartbeat stream."""
    beat: int
    sent_at: datetime
    """The agent's clock."""
    stored_ns: int
    """The server's clock: liveness is judged by this, so agent clock skew does not matter."""
    load: int
    capacity: int
    sessions: int
    earlier: tuple[Beat, ...] = ()
    """The newest beat of each of the next-highest incarnations (at most KEEP - 1), highest first."""

    def slots(self) -> tuple[Beat, ...]:
        """Every kept beat, highest incarnation first (each without `earlier`)."""
        return (msgspec.structs.replace(self, earlier=()), *self.earlier) if self.earlier else (self,)


def of_incarnation(beat: Beat | None, incarnation: int) -> Beat | None:
    """The newest kept beat of exactly this incarnation (the agent's registered one), or None."""
    if beat is None:
        return None
    if beat.incarnation == incarnation:
        return beat if not beat.earlier else msgspec.structs.replace(beat, earlier=())
    for b in beat.earlier:
        if b.incarnation == incarnation:
            return b
    return None


def _beat(rec: Recorded, e: ev.AgentHeartbeat, earlier: tuple[Beat, ...]) -> Beat:
    return Beat(agent_id=e.agent_id, incarnation=e.incarnation, instance_id=e.instance_id, seq=rec.seq, beat=e.beat,
                sent_at=e.time, stored_ns=rec.timestamp_ns, load=e.load, capacity=e.capacity,
                sessions=len(e.sessions), earlier=earlier)


def _pack(slots: list[Beat]) -> Beat:
    top, *rest = slots
    return msgspec.structs.replace(top, earlier=tuple(rest))


def evolve_beat(current: Beat | None, rec: Recorded) -> tuple[Beat | None, Anomaly | None]:
    """Keep the newest beat of each of the KEEP most recently beating incarnations; an older beat of one that
    is not among them is flagged."""
    e = rec.event
    if not isinstance(e, ev.AgentHeartbeat):
        return current, Anomaly("illegal_transition", f"{e.type_tag()} is not a heartbeat")
    problem = writer_problem(e)  # a beat for a2 on a subject ending in a1 never keeps a2 alive
    if problem is not None:
        return current, problem
    if current is not None and e.incarnation == current.incarnation:  # the common case: the top slot beats on
        if rec.seq <= current.seq:
            return current, None  # an older delivery of what we already hold
        return _beat(rec, e, current.earlier), None
    return place(current, _beat(rec, e, ()))


def place(current: Beat | None, new: Beat) -> tuple[Beat, Anomaly | None]:
    """The record with the slot of one accepted beat (`new`, without `earlier`) in it: the rule of `evolve_beat`,
    also what the projector folds onto an agent's stored record (`merged`)."""
    if current is None:
        return new, None
    if new.incarnation == current.incarnation:
        return (current if new.seq <= current.seq else msgspec.structs.replace(new, earlier=current.earlier)), None
    slots = list(current.slots())
    for i, b in enumerate(slots):
        if b.incarnation == new.incarnation:
            if new.seq <= b.seq:
                return current, None  # an older delivery of what we already hold
            slots[i] = new
            return _pack(slots), None
    if len(slots) >= KEEP:
        stalest = min(slots, key=lambda b: b.seq)
        if new.seq < stalest.seq:
            return current, Anomaly(SUPERSEDED_INCARNATION, f"heartbeat #{new.seq} from incarnation "
                                                            f"{new.incarnation}, older than the newest beats of the "
                                                            f"{KEEP} kept")
        slots.remove(stalest)
    slots.append(new)
    slots.sort(key=lambda b: b.incarnation, reverse=True)
    return _pack(slots), None


def slot_of(rec: Recorded) -> Beat:
    """The slot an accepted heartbeat makes (what `place` puts in its agent's record)."""
    e = rec.event
    assert isinstance(e, ev.AgentHeartbeat)
    return _beat(rec, e, ())


def merged(bases: dict[str, Beat | None], slots: list[tuple[int, str, Beat]]) -> tuple[dict[str, Beat],
                                                                                     list[tuple[int, bool, Beat]]]:
    """Each agent's record after the batch's beats (`slots`: (seq, agent id, slot), in stream order) placed on
    its record before them (`bases`; none: a new agent), and the record after each beat (a version), as the
    stream alone folds them. The projector's rows are this, not the in-memory records retirement trims."""
    records = dict(bases)
    versions: list[tuple[int, bool, Beat]] = []
    for seq, agent_id, slot in slots:
        record, _ = place(records.get(agent_id), slot)
        records[agent_id] = record
        versions.append((seq, False, record))
    return {k: v for k, v in records.items() if v is not None}, versions


def trimmed(beat: Beat, gone: Callable[[Beat], bool]) -> Beat | None:
    """The record without the slots `gone` says belong to an agent's past (retired, or an earlier life) that no
    later beat can bring back into play: those older than every slot still in play. None if none is in play.

    Why only those: a slot takes part in the choice of the stalest, the one a new incarnation's beat pushes out.
    A gone slot older than every slot in play would be pushed out before any of them, so without it the slots in
    play end the same; a gone one newer than one in play could still spare that one, so it stays (a shell nobody
    reads: `gone` never says so of the slot of the agent's registered incarnation, nor of a higher one). That
    makes the result a function of the beats and of what the lifecycle stream says, whatever the order the two
    streams were folded in (`LedgerState`)."""
    slots = beat.slots()
    in_play = [s.seq for s in slots if not gone(s)]
    if not in_play:
        return None
    oldest = min(in_play)
    kept = [s for s in slots if s.seq > oldest or not gone(s)]
    return beat if len(kept) == len(slots) else _pack(kept)
