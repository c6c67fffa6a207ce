"""The heartbeat fold: per agent, the beat with the highest (incarnation, stream sequence).

Heartbeats live in their own stream (LEDGER_HB, bounded retention) and are
folded apart from the lifecycle events. Keeping the maximum is commutative, so
the two streams can be consumed independently and in any relative order; the
join with the agent's incarnation happens at query time (`projections.health`).
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from ledger import events as ev
from ledger.codec import Recorded
from ledger.lifecycle import SUPERSEDED_INCARNATION, Anomaly


class Beat(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The newest heartbeat seen for one agent."""

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


def evolve_beat(current: Beat | None, rec: Recorded) -> tuple[Beat | None, Anomaly | None]:
    """Keep the beat with the highest (incarnation, seq); a beat of an older incarnation is flagged."""
    e = rec.event
    if not isinstance(e, ev.AgentHeartbeat):
        return current, Anomaly("illegal_transition", f"{e.type_tag()} is not a heartbeat")
    if current is not None:
        if e.incarnation < current.incarnation:
            return current, Anomaly(SUPERSEDED_INCARNATION,
                                    f"heartbeat from incarnation {e.incarnation}; newest seen is {current.incarnation}")
        if e.incarnation == current.incarnation and rec.seq <= current.seq:
            return current, None  # an older delivery of what we already hold
    return Beat(agent_id=e.agent_id, incarnation=e.incarnation, instance_id=e.instance_id, seq=rec.seq, beat=e.beat,
                sent_at=e.time, stored_ns=rec.timestamp_ns, load=e.load, capacity=e.capacity,
                sessions=len(e.sessions)), None
