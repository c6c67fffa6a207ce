"""The O(change) consumers against the worst values the codec lets through: agents whose heartbeat interval and
ttl are the largest allowed (1e9 s: deadlines beyond any clock's reach), the smallest, and dead letters on both
streams. Each consumer must keep working (no OverflowError, no lost deadline) and still judge the sane agent."""

from __future__ import annotations

from datetime import timedelta

from histories import CLI, Builder

from consumers.follow import Follower
from consumers.monitor import LivenessMonitor
from consumers.reclaim_rules import ClaimFor
from consumers.reclaimer import Reclaimer
from ledger import events as ev
from ledger.codec import Unreadable
from ledger.events import MAX_SECONDS
from ledger.ids import new_id
from ledger.store import EventStore
from ledger.subjects import HEARTBEAT_STREAM
from ledger.writer import Writer


def writer(store: EventStore, producer: str) -> Writer:
    return Writer(store, ev.Producer(id=producer, instance=new_id()))


async def test_extreme_intervals_and_dead_letters_leave_the_consumers_judging(store: EventStore, uid: str):
    b = Builder()
    agents = {"huge": (MAX_SECONDS, MAX_SECONDS), "tiny": (1e-9, 1e-9), "sane": (5.0, 30.0)}
    for name, (interval, ttl) in agents.items():
        agent_id = f"{uid}-{name}"
        b.add(ev.AgentRegistered(producer=ev.Producer(id=agent_id, instance="i"), agent_id=agent_id,
                                 instance_id="i", pool=f"{uid}-pool", capacity=10, heartbeat_interval=interval,
                                 ttl=ttl))
    b.add_unreadable(b"\xff" * 64, "undecodable: not JSON")
    seq, ns = b._next(HEARTBEAT_STREAM)  # a dead letter on the heartbeat stream too
    b.items.append(Unreadable(HEARTBEAT_STREAM, seq, f"ledger.hb.{uid}-sane.heartbeat.{uid}-sane", ns, b"{",
                              "undecodable: not JSON"))
    for item in b.items[-2:]:
        b.model.apply(item)
    b.add(ev.SessionCreated(producer=CLI, session_id=f"{uid}-s", pool=f"{uid}-pool"))
    follower = Follower(store, b.model)
    monitor = LivenessMonitor(writer(store, f"monitor-{uid}"), follower)
    reclaimer = Reclaimer(writer(store, f"reclaimer-{uid}"), follower)

    now = b.now()
    await monitor.check(now)  # the tiny agent may be judged at once; nothing may raise
    actions = await reclaimer.step(now)
    claimed_for = {a.agent.agent_id for a in actions if isinstance(a, ClaimFor)}
    assert claimed_for <= {f"{uid}-huge", f"{uid}-sane"}  # never the agent silent past its (tiny) bounds
    assert claimed_for  # the session is placed

    # A minute later the sane agent (ttl 30 s, no beat) is dead; the huge one is still fine; nothing raises.
    later = now + timedelta(seconds=60)
    written = await monitor.check(later)
    dead = {e.agent_id for e in written if isinstance(e, ev.AgentDeclaredDead)}
    assert f"{uid}-sane" in dead and f"{uid}-huge" not in dead
    assert f"{uid}-huge" in monitor._due  # its deadline is kept (beyond any clock), not dropped
