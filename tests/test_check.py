"""`ledger check`: the independent rules over raw histories, then the command against a real server.

The pure part builds raw stored messages by hand (sequences and stored times chosen by the test); the server
part plants each kind of violation with raw nats-py publishes, bypassing the compare-and-set, and expects
`ledger check` to name it with the right sequence.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
from fleet import agents, consumers, ledger_on
from helpers import eventually
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from ledger import check as ck
from ledger import codec
from ledger import events as ev
from ledger import lifecycle as lc
from ledger.check import RawMessage, check
from ledger.settings import Settings
from ledger.store import EventStore
from ledgerctl.server import EmbeddedServer

CLI = ev.Producer(id="cli", instance="t")
SECOND = 1_000_000_000


def who(agent: str) -> ev.Producer:
    return ev.Producer(id=agent, instance="i")


def encoded_without(event: ev.Event, drop: tuple[str, ...] = ()) -> tuple[str, bytes]:
    """The event's subject and payload, with the fields in `drop` left out (what the codec would refuse)."""
    out = codec.encode(event)
    if not drop:
        return out.subject, out.payload
    doc = json.loads(out.payload)
    for key in drop:
        doc.pop(key)
    return out.subject, json.dumps(doc).encode()


class History:
    """Raw LEDGER and heartbeat messages with sequences and stored times of the test's choosing."""

    def __init__(self) -> None:
        self.messages: list[RawMessage] = []
        self.seq = {ck.LEDGER: 0, ck.HEARTBEATS: 0}
        self.ns = 1_700_000_000 * SECOND

    def raw(self, subject: str, payload: bytes, *, stream: str = ck.LEDGER, after: float = 0.1) -> int:
        self.seq[stream] += 1
        self.ns += int(after * SECOND)
        self.messages.append(RawMessage(stream, self.seq[stream], subject, self.ns, payload))
        return self.seq[stream]

    def add(self, event: ev.Event, *, after: float = 0.1, drop: tuple[str, ...] = ()) -> int:
        subject, payload = encoded_without(event, drop)
        stream = ck.HEARTBEATS if isinstance(event, ev.AgentHeartbeat) else ck.LEDGER
        return self.raw(subject, payload, stream=stream, after=after)

    def register(self, agent: str, pool: str = "p", ttl: float = 5.0) -> int:
        return self.add(ev.AgentRegistered(producer=who(agent), agent_id=agent, instance_id="i", pool=pool, ttl=ttl))

    def create(self, sid: str, pool: str = "p", after: float = 0.1) -> int:
        return self.add(ev.SessionCreated(producer=CLI, session_id=sid, pool=pool), after=after)

    def claim(self, sid: str, agent: str, incarnation: int, previous: int | None = None, *, after: float = 0.1,
              **kw: Any) -> int:
        return self.add(ev.SessionClaimed(producer=who(agent), session_id=sid, agent_id=agent, instance_id="i",
                                          incarnation=incarnation, previous_token=previous, **kw), after=after)

    def release(self, sid: str, agent: str, incarnation: int, token: int) -> int:
        return self.add(ev.SessionReleased(producer=who(agent), session_id=sid, agent_id=agent,
                                           incarnation=incarnation, token=token))

    def beat(self, agent: str, incarnation: int, after: float = 0.1) -> int:
        return self.add(ev.AgentHeartbeat(producer=who(agent), agent_id=agent, instance_id="i",
                                          incarnation=incarnation, beat=0), after=after)

    def check(self, **kw: Any) -> ck.Report:
        return check(self.messages, **kw)


def found(report: ck.Report) -> list[tuple[str, int]]:
    return [(v.kind, v.seq) for v in report.violations]


def test_the_route_state_machine_is_the_briefs():
    # Written out twice on purpose (the checker must not lean on the fold); they must say the same.
    assert ck.ROUTE_MOVES == lc.ROUTE_TRANSITIONS


def test_a_clean_history_is_clean():
    h = History()
    a1 = h.register("a1")
    a2 = h.register("a2")
    h.create("s1")
    c1 = h.claim("s1", "a1", a1)
    h.beat("a1", a1)
    h.add(ev.SessionResourceReported(producer=who("a1"), session_id="s1", agent_id="a1", incarnation=a1, token=c1,
                                     platform_resource_id="x"))
    h.add(ev.RouteCreated(producer=CLI, route_id="r1", session_id="s1", endpoint="e"))
    h.add(ev.RouteTransitioned(producer=who("a1"), route_id="r1", from_state="PENDING", to_state="STARTING", token=c1))
    h.add(ev.AgentDeclaredDead(producer=who("monitor"), agent_id="a1", incarnation=a1, reason="missed_heartbeats"))
    c2 = h.claim("s1", "a2", a2, previous=c1, reason="failover")
    h.release("s1", "a2", a2, c2)
    h.add(ev.SessionTerminated(producer=CLI, session_id="s1"))
    h.raw("ledger.session.s9.created.cli", b"\xff not an event")  # a dead letter, not a violation
    report = h.check()
    assert report.clean, report.violations
    assert report.events == 12 and report.not_events == 1


def test_two_claims_without_a_previous_token_overlap():
    h = History()
    a1, a2 = h.register("a1"), h.register("a2")
    h.create("s1")
    c1 = h.claim("s1", "a1", a1)
    c2 = h.claim("s1", "a2", a2)  # raw: the compare-and-set would have refused it
    report = h.check()
    assert found(report) == [(ck.OVERLAPPING_OWNERSHIP, c2)]
    assert report.violations[0].related == (c1,)
    # Not applied: a1 still owns s1, so its release under c1 is fine and a2's is stale.
    h.release("s1", "a2", a2, c2)
    assert found(h.check())[-1] == (ck.STALE_TOKEN, h.seq[ck.LEDGER])
    h.release("s1", "a1", a1, c1)
    assert len(h.check().violations) == 2


def test_owner_writes_under_a_stale_token():
    h = History()
    a1, a2 = h.register("a1"), h.register("a2")
    h.create("s1")
    h.add(ev.RouteCreated(producer=CLI, route_id="r1", session_id="s1", endpoint="e"))
    c1 = h.claim("s1", "a1", a1)
    h.add(ev.AgentDeclaredDead(producer=who("monitor"), agent_id="a1", incarnation=a1, reason="x"))
    c2 = h.claim("s1", "a2", a2, previous=c1, reason="failover")
    report_seqs = [
        h.release("s1", "a1", a1, c1),
        h.add(ev.SessionResourceReported(producer=who("a1"), session_id="s1", agent_id="a1", incarnation=a1,
                                         token=c1, platform_resource_id="x")),
        h.add(ev.RouteTransitioned(producer=who("a1"), route_id="r1", from_state="PENDING", to_state="STARTING",
                                   token=c1)),
        h.add(ev.SessionTerminated(producer=who("a1"), session_id="s1", token=c1)),
        h.add(ev.SessionOrphaned(producer=who("reclaimer"), session_id="s1", reason="x", previous_token=c1)),
    ]
    report = h.check()
    assert found(report) == [(ck.STALE_TOKEN, s) for s in report_seqs]
    assert all(v.related == (c2,) for v in report.violations)


def test_illegal_transitions():
    h = History()
    a1 = h.register("a1")
    h.create("s1")
    dup = h.create("s1")
    h.add(ev.RouteCreated(producer=CLI, route_id="r1", session_id="s1", endpoint="e"))
    skip = h.add(ev.RouteTransitioned(producer=CLI, route_id="r1", from_state="PENDING", to_state="RUNNING"))
    wrong_from = h.add(ev.RouteTransitioned(producer=CLI, route_id="r1", from_state="STARTING", to_state="WARMING_UP"))
    unknown = h.add(ev.RouteTransitioned(producer=CLI, route_id="r2", from_state="PENDING", to_state="STARTING"))
    orphan = h.add(ev.SessionOrphaned(producer=who("reclaimer"), session_id="s1", reason="x", previous_token=None))
    h.add(ev.SessionTerminated(producer=CLI, session_id="s1"))
    after = h.claim("s1", "a1", a1)
    never = h.release("s2", "a1", a1, 3)
    assert found(h.check()) == [(ck.ILLEGAL_TRANSITION, s) for s in (dup, skip, wrong_from, unknown, orphan, after,
                                                                      never)]


def test_in_flight_writes_of_a_superseded_incarnation_are_counted_not_applied_and_clean():
    """The agent fenced itself with a claim and a release in flight, registered again, then both landed: every fold
    flags them and applies nothing, so they are counted, and the checker's own state does not apply them either."""
    h = History()
    old = h.register("a1")
    h.create("s1")
    h.create("s2")
    c1 = h.claim("s1", "a1", old)
    new = h.register("a1")
    h.release("s1", "a1", old, c1)  # in flight: s1 stays assigned under c1
    h.claim("s2", "a1", old)  # in flight: s2 stays pending
    h.add(ev.SessionResourceReported(producer=who("a1"), session_id="s1", agent_id="a1", incarnation=old, token=c1,
                                     platform_resource_id="x"))
    report = h.check()
    assert report.clean, report.violations
    assert report.flagged == {ck.SUPERSEDED_INCARNATION: 3}
    # A late goodbye of the old incarnation changes nothing and is no violation (the folds flag and ignore it).
    h.add(ev.AgentGoodbye(producer=who("a1"), agent_id="a1", instance_id="i", incarnation=old))
    # Had the release applied, this takeover naming c1 would be stale; had the claim applied, s2's plain claim
    # would overlap it.
    h.claim("s1", "a1", new, previous=c1, reason="failover")
    h.claim("s2", "a1", new)
    report = h.check()
    assert report.clean, report.violations
    assert report.flagged == {ck.SUPERSEDED_INCARNATION: 3}


def test_a_claim_of_a_superseded_incarnation_that_a_later_event_treats_as_applied_is_a_violation():
    """The violation is the later event that depends on the unapplied claim: an owner write under its sequence as
    token, or a claim or orphaning naming it as previous token. Each is reported once, at its own sequence."""
    h = History()
    old = h.register("a1")
    a2 = h.register("a2")
    h.add(ev.RouteCreated(producer=CLI, route_id="r1", session_id="s3", endpoint="e"))
    flagged = {}
    for i in range(1, 8):
        h.create(f"s{i}")
    new = h.register("a1")
    for i in range(1, 8):
        flagged[i] = h.claim(f"s{i}", "a1", old)
    held = h.claim("s7", "a2", a2)  # s7 is truly owned by a2 under `held`
    dependent = [
        h.add(ev.SessionResourceReported(producer=who("a1"), session_id="s1", agent_id="a1", incarnation=old,
                                         token=flagged[1], platform_resource_id="x")),
        h.release("s2", "a1", old, flagged[2]),
        h.add(ev.RouteTransitioned(producer=who("a1"), route_id="r1", from_state="PENDING", to_state="STARTING",
                                   token=flagged[3])),
        h.add(ev.SessionTerminated(producer=CLI, session_id="s4", token=flagged[4])),
        h.add(ev.SessionOrphaned(producer=who("reclaimer"), session_id="s5", reason="owner_dead",
                                 previous_token=flagged[5])),
        h.claim("s6", "a2", a2, previous=flagged[6], reason="failover"),  # pending: the fold applies it
        h.claim("s7", "a1", new, previous=flagged[7], reason="failover"),  # assigned to a2: not applied
    ]
    report = h.check()
    assert found(report) == [(ck.SUPERSEDED_INCARNATION, seq) for seq in dependent]
    assert [v.related for v in report.violations] == [(flagged[i], new) for i in range(1, 8)]
    assert report.flagged == {ck.SUPERSEDED_INCARNATION: 7}
    # Not applied where the fold does not apply it (s7 is still a2's), applied where it does (s6 is a2's now).
    h.release("s7", "a2", a2, held)
    h.release("s6", "a2", a2, dependent[5])
    assert found(h.check()) == found(report)


def test_a_write_by_an_incarnation_that_is_no_registration_of_its_agent_is_a_violation_at_once():
    h = History()
    a1 = h.register("a1")
    a2 = h.register("a2")
    h.create("s1")
    c1 = h.claim("s1", "a1", a1)
    forged = [h.release("s1", "a1", 0, c1), h.release("s1", "a1", a2, c1), h.release("s1", "a1", a1 + 100, c1)]
    h.create("s2")
    forged.append(h.claim("s2", "a1", a2))
    report = h.check()
    assert found(report) == [(ck.SUPERSEDED_INCARNATION, seq) for seq in forged]
    assert report.flagged == {}


def test_claims_for_an_agent_that_cannot_run_the_session():
    """Unregistered, another pool or drained: a violation at once, whatever the grace."""
    h = History()
    ghost_claim_session = h.create("s1")
    ghost = h.claim("s1", "ghost", 1)
    other_pool_agent = h.register("a2", pool="q")
    h.create("s2")
    wrong_pool = h.claim("s2", "a2", other_pool_agent)
    a3 = h.register("a3")
    h.add(ev.AgentDraining(producer=who("a3"), agent_id="a3", incarnation=a3, deadline="2030-01-01T00:00:00Z"))
    done = h.add(ev.AgentDrained(producer=who("a3"), agent_id="a3", incarnation=a3))
    h.create("s3")
    for_drained = h.claim("s3", "a3", a3)
    report = h.check(grace=3600.0)
    assert found(report) == [(ck.CLAIM_FOR_UNAVAILABLE_AGENT, s) for s in (ghost, wrong_pool, for_drained)]
    assert report.violations[2].related == (done,)
    assert ghost_claim_session < ghost and report.flagged == {}


LOST = {
    "dead": lambda a, inc: ev.AgentDeclaredDead(producer=who("monitor"), agent_id=a, incarnation=inc, reason="x"),
    "gone": lambda a, inc: ev.AgentGoodbye(producer=who(a), agent_id=a, instance_id="i", incarnation=inc),
    "fenced": lambda a, inc: ev.AgentFenced(producer=who(a), agent_id=a, incarnation=inc, reason="x",
                                            fenced_at="2026-01-01T00:00:00Z"),
}


@pytest.mark.parametrize("status", sorted(LOST))
def test_a_claim_for_an_agent_lost_a_moment_before_is_counted_and_one_later_than_grace_is_a_violation(status: str):
    """A reclaimer whose view is one event behind claims for an agent the log has just declared dead (or that
    just said goodbye or fenced itself). Every fold flags it final_claimer and leaves the session as it was, and
    so does the checker: within grace counted, clean; its next step claims for another agent, which applies."""
    h = History()
    a1 = h.register("a1", ttl=5.0)
    a2 = h.register("a2", ttl=5.0)
    h.create("s1")
    h.create("s2")
    lost = h.add(LOST[status]("a1", a1))
    lagging = h.claim("s1", "a1", a1, after=2.0)
    report = h.check(grace=2.0)
    assert report.clean, report.violations
    assert report.flagged == {ck.CLAIM_FOR_UNAVAILABLE_AGENT: 1}
    assert ck.fold(h.messages).sessions["s1"].status == "pending"  # not applied
    h.add(ev.SessionOrphaned(producer=who("reclaimer"), session_id="s1", reason="owner_lost", previous_token=lagging))
    assert found(h.check(grace=2.0)) == [(ck.ILLEGAL_TRANSITION, h.seq[ck.LEDGER])]  # no owner to orphan
    h.messages.pop()
    h.seq[ck.LEDGER] -= 1
    repaired = h.add(ev.SessionClaimed(producer=who("reclaimer"), session_id="s1", agent_id="a2", instance_id="i",
                                       incarnation=a2))
    assert h.check(grace=2.0).clean
    assert ck.fold(h.messages).sessions["s1"].token == repaired
    late = h.claim("s2", "a1", a1, after=0.5)  # 2.5 s after the status: past grace
    report = h.check(grace=2.0)
    assert found(report) == [(ck.CLAIM_FOR_UNAVAILABLE_AGENT, late)] and report.violations[0].related == (lost,)
    assert report.flagged == {ck.CLAIM_FOR_UNAVAILABLE_AGENT: 1}
    assert ck.fold(h.messages).sessions["s2"].status == "pending"


def test_a_lagging_claim_is_never_applied_so_it_strands_nothing():
    """Before the final_claimer rule a claim for an agent dead a moment before was taken as owned, and stranded its
    session unless the reclaimer orphaned it; now no fold applies it, the checker neither: nothing is stranded."""
    h = History()
    a1 = h.register("a1", ttl=1.0)
    h.create("s1")
    h.add(LOST["dead"]("a1", a1))
    h.claim("s1", "a1", a1)
    h.create("s-later", after=1.0 + 2.0 + 0.5)
    report = h.check(grace=2.0)
    assert report.clean and report.flagged == {ck.CLAIM_FOR_UNAVAILABLE_AGENT: 1}, report
    assert ck.fold(h.messages).sessions["s1"].status == "pending"


def test_a_session_left_with_a_lost_owner_beyond_ttl_plus_grace_is_stranded():
    h = History()
    a1 = h.register("a1", ttl=5.0)
    h.create("s1")
    c1 = h.claim("s1", "a1", a1)
    dead = h.add(ev.AgentDeclaredDead(producer=who("monitor"), agent_id="a1", incarnation=a1, reason="x"))
    h.create("s-other", after=5.0 + 10.0 - 1)  # the log moves on, but not for ttl + grace yet
    assert h.check(grace=10.0).clean
    h.create("s-later", after=2)
    report = h.check(grace=10.0)
    assert found(report) == [(ck.STRANDED, c1)] and report.violations[0].related == (dead,)
    # A reclaim (or an orphaning) before the end unstrands it; a "now" given from outside is used as is.
    h.add(ev.SessionOrphaned(producer=who("reclaimer"), session_id="s1", reason="owner_dead", previous_token=c1))
    assert h.check(grace=10.0).clean


def test_a_forged_death_for_a2_on_a_subject_ending_in_a1_strands_nothing_and_is_counted_not_a_violation():
    """The folds flag an event whose producer may not write it; so does the checker (counted in `flagged`), or a
    death, goodbye or fence forged by a1 for a2 would make it call a2's sessions stranded."""
    h = History()
    h.register("a1", ttl=2.0)
    a2 = h.register("a2", ttl=2.0)
    h.create("s1")
    h.claim("s1", "a2", a2)
    h.add(ev.AgentDeclaredDead(producer=who("a1"), agent_id="a2", incarnation=a2, reason="forged"))
    h.add(ev.AgentGoodbye(producer=who("a1"), agent_id="a2", instance_id="i", incarnation=a2, reason="forged"))
    h.add(ev.SessionOrphaned(producer=who("a1"), session_id="s1", reason="forged"))
    h.add(ev.AgentHeartbeat(producer=who("a1"), agent_id="a2", instance_id="i", incarnation=a2, beat=1))
    for _ in range(3):  # a2 beats on, past ttl + grace
        h.beat("a2", a2, after=1.0)
    report = h.check(grace=1.0)
    assert report.clean, report.violations
    assert report.flagged == {ck.UNAUTHORIZED_PRODUCER: 4}


def test_a_silent_owner_never_declared_dead_strands_its_sessions():
    h = History()
    a1 = h.register("a1", ttl=2.0)
    h.create("s1")
    c1 = h.claim("s1", "a1", a1)
    h.beat("a1", a1)
    last = h.ns
    h.beat("a2", 99, after=2.0 + 2.0 + 1.0 - 0.5)  # someone else's beats keep the clock going
    assert h.check(grace=1.0).clean
    report = h.check(grace=1.0, now_ns=last + int(5.5 * SECOND))
    assert found(report) == [(ck.STRANDED, c1)]
    # While the pool's breaker is open, sessions of dead agents are held on purpose.
    h.add(ev.PoolBreakerTripped(producer=who("monitor"), pool="p", reason="mass death"))
    assert h.check(grace=1.0, now_ns=last + 100 * SECOND).clean


def test_a_superseded_owners_session_is_stranded_unless_moved():
    h = History()
    a1 = h.register("a1", ttl=1.0)
    h.create("s1")
    c1 = h.claim("s1", "a1", a1)
    again = h.register("a1", ttl=1.0)
    h.beat("a1", again, after=3.0)
    report = h.check(grace=0.5)
    assert found(report) == [(ck.STRANDED, c1)] and report.violations[0].related == (again,)
    h.claim("s1", "a1", again, previous=c1, reason="failover")
    assert h.check(grace=0.5).clean


def test_events_without_an_id_or_a_time():
    h = History()
    h.register("a1")
    no_id = h.add(ev.SessionCreated(producer=CLI, session_id="s1", pool="p"), drop=("event_id",))
    no_time = h.add(ev.SessionCreated(producer=CLI, session_id="s2", pool="p"), drop=("time",))
    beat = h.add(ev.AgentHeartbeat(producer=who("a1"), agent_id="a1", instance_id="i", incarnation=1, beat=0),
                 drop=("event_id", "time"))
    report = h.check()
    assert [(v.kind, v.stream, v.seq) for v in report.violations] == [
        (ck.MISSING_EVENT_ID, ck.LEDGER, no_id), (ck.MISSING_TIME, ck.LEDGER, no_time),
        (ck.MISSING_EVENT_ID, ck.HEARTBEATS, beat)]


def test_since_reports_only_later_violations_but_reads_everything():
    h = History()
    a1, a2 = h.register("a1"), h.register("a2")
    h.create("s1")
    c1 = h.claim("s1", "a1", a1)
    early = h.claim("s1", "a2", a2)
    cut = h.ns + 1
    late = h.release("s1", "a2", a2, early, )  # stale: the overlapping claim was never applied
    assert found(h.check()) == [(ck.OVERLAPPING_OWNERSHIP, early), (ck.STALE_TOKEN, late)]
    assert found(h.check(since_ns=cut)) == [(ck.STALE_TOKEN, late)]
    assert c1 < early


@pytest.mark.parametrize("payload", [b"", b"[]", b"null", b"{}", b'{"type": 3}', b'{"type": "session.created"}',
                                     b"[" * 50_000 + b"]" * 50_000, b'{"type": "x.y", "producer": {}}'])
def test_what_is_not_an_event_is_counted_not_judged(payload: bytes):
    h = History()
    h.raw("ledger.session.s1.created.cli", payload)
    report = h.check()
    assert report.clean and report.not_events == 1


# --- generated histories --------------------------------------------------------------------------------------

OPS = st.lists(st.tuples(st.sampled_from(["claim", "release", "takeover", "terminate", "report", "register"]),
                         st.integers(0, 2), st.integers(0, 2)), max_size=40)


def legal(ops: list[tuple[str, int, int]]) -> tuple[History, dict[str, Any]]:
    """A history the SDK could write: every step checked against the fold's own view of the session."""
    h = History()
    inc = {f"a{i}": h.register(f"a{i}") for i in range(3)}
    owner: dict[str, tuple[str, int] | None] = {}
    draining: set[str] = set()
    for i in range(3):
        h.create(f"s{i}")
        owner[f"s{i}"] = None
    for op, a, s in ops:
        agent, sid = f"a{a}", f"s{s}"
        if sid not in owner:
            continue
        held = owner[sid]
        if op == "register":
            if not any(o and o[0] == agent for o in owner.values()):
                inc[agent] = h.register(agent)
                draining.discard(agent)
        elif op == "claim" and held is None:
            owner[sid] = (agent, h.claim(sid, agent, inc[agent]))
        elif op == "takeover" and held is not None and held[0] != agent:
            # The SDK takes over only from an owner the log says may be replaced: here, one that drains.
            if held[0] not in draining:
                h.add(ev.AgentDraining(producer=who(held[0]), agent_id=held[0], incarnation=inc[held[0]],
                                       deadline=ev.utcnow()))
                draining.add(held[0])
            owner[sid] = (agent, h.claim(sid, agent, inc[agent], previous=held[1], reason="drain"))
        elif op == "release" and held is not None:
            h.release(sid, held[0], inc[held[0]], held[1])
            owner[sid] = None
        elif op == "report" and held is not None:
            h.add(ev.SessionResourceReported(producer=who(held[0]), session_id=sid, agent_id=held[0],
                                             incarnation=inc[held[0]], token=held[1], platform_resource_id="x"))
        elif op == "terminate":
            h.add(ev.SessionTerminated(producer=CLI, session_id=sid, token=held[1] if held else None))
            del owner[sid]
    return h, owner


@hsettings(max_examples=200, deadline=None)
@given(OPS)
def test_histories_the_sdk_could_write_are_clean(ops: list[tuple[str, int, int]]):
    h, _ = legal(ops)
    assert h.check().clean, h.check().violations


@hsettings(max_examples=200, deadline=None)
@given(OPS, st.data())
def test_a_claim_planted_into_an_owned_session_is_the_one_overlap(ops: list[tuple[str, int, int]],
                                                                  data: st.DataObject):
    h, owner = legal(ops)
    held = [(sid, o) for sid, o in owner.items() if o is not None]
    if not held:
        return
    sid, (agent, token) = data.draw(st.sampled_from(held))
    other = next(a for a in ("a0", "a1", "a2") if a != agent)
    incarnation = max(m.seq for m in h.messages if m.subject == f"ledger.agent.{other}.registered.{other}")
    planted = h.claim(sid, other, incarnation, previous=data.draw(st.sampled_from([None, token - 1, token + 1])))
    report = h.check()
    assert found(report) == [(ck.OVERLAPPING_OWNERSHIP, planted)]
    assert report.violations[0].related == (token,)


def current_registration(h: History, agent: str) -> int:
    return max(m.seq for m in h.messages if m.subject == f"ledger.agent.{agent}.registered.{agent}")


@hsettings(max_examples=200, deadline=None)
@given(OPS, st.sampled_from(["a0", "a1", "a2"]), st.data())
def test_in_flight_writes_of_a_superseded_incarnation_are_clean_until_an_event_acts_on_one(
        ops: list[tuple[str, int, int]], agent: str, data: st.DataObject):
    """Any legal history; then the agent registers again while every write its old incarnation could make is in
    flight (a release of each session it holds, a claim of each pending one): all counted, none a violation.
    One later event that uses one of those claims as its token is the one violation."""
    h, owner = legal(ops)
    old = current_registration(h, agent)
    new = h.register(agent)
    for sid, held in owner.items():
        if held is not None and held[0] == agent:
            h.release(sid, agent, old, held[1])
    in_flight = [(sid, h.claim(sid, agent, old)) for sid, held in owner.items() if held is None]
    report = h.check()
    assert report.clean, report.violations
    assert report.flagged.get(ck.SUPERSEDED_INCARNATION, 0) == sum(1 for o in owner.values() if o and o[0] == agent) \
        + len(in_flight)
    if not in_flight:
        return
    sid, token = data.draw(st.sampled_from(in_flight))
    other = data.draw(st.sampled_from([a for a in ("a0", "a1", "a2") if a != agent]))
    act = data.draw(st.sampled_from(["report", "release", "terminate", "orphan", "claim", "takeover"]))
    if act == "report":
        dependent = h.add(ev.SessionResourceReported(producer=who(agent), session_id=sid, agent_id=agent,
                                                     incarnation=old, token=token, platform_resource_id="x"))
    elif act == "release":
        dependent = h.release(sid, agent, old, token)
    elif act == "terminate":
        dependent = h.add(ev.SessionTerminated(producer=CLI, session_id=sid, token=token))
    elif act == "orphan":
        dependent = h.add(ev.SessionOrphaned(producer=who("reclaimer"), session_id=sid, reason="owner_lost",
                                             previous_token=token))
    elif act == "claim":
        dependent = h.claim(sid, other, current_registration(h, other), previous=token, reason="failover")
    else:
        dependent = h.claim(sid, agent, new, previous=token, reason="failover")
    report = h.check()
    assert found(report) == [(ck.SUPERSEDED_INCARNATION, dependent)]
    assert report.violations[0].related == (token, new)


# --- against a real server ------------------------------------------------------------------------------------


def ledger_check(url: str, *args: str) -> tuple[int, dict[str, Any], str]:
    result = subprocess.run([sys.executable, "-m", "ledgerctl", "check", *args], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "LEDGER_NATS_URL": url}, check=False)
    assert "Traceback" not in result.stderr, result.stderr
    doc = json.loads(result.stdout) if "--json" in args and result.stdout.strip() else {}
    return result.returncode, doc, result.stdout


async def test_a_log_written_by_real_agents_and_consumers_is_clean(server: EmbeddedServer):
    async with ledger_on(server.url) as ledger, agents(server.url, "gpu", ["a1", "a2", "a3"],
                                                        heartbeat=0.2, ttl=1.5) as procs:
        async with consumers(server.url):
            sessions = [(await ledger.create_session("gpu", session_id=f"s{i}"))[0] for i in range(9)]

            async def owned_by_others(victim: str | None = None) -> bool:
                owners = [(await ledger.session(s))[0].owner for s in sessions]
                return all(o is not None and o != victim for o in owners)

            await eventually(owned_by_others, timeout=20, what="every session claimed")
            procs["a1"].kill9()
            await eventually(lambda: owned_by_others("a1"), timeout=20, what="a1's sessions moved")
            assert await procs["a2"].terminate() == 0
            await eventually(lambda: owned_by_others("a2"), timeout=20, what="a2's sessions moved")
    code, doc, _ = ledger_check(server.url, "--json")
    assert code == 0, doc["violations"]
    assert doc["clean"] and doc["events"] > 20 and doc["messages"]["LEDGER_HB"] > 0
    # The agents, the `ledger agent` processes and the consumers write only what their roles may write.
    assert ck.UNAUTHORIZED_PRODUCER not in doc["flagged"], doc["flagged"]
    code, _, out = ledger_check(server.url)
    assert code == 0 and "clean: no violation" in out


async def test_violations_planted_with_raw_publishes_are_named_with_their_sequences(server: EmbeddedServer):
    """Each kind, published with raw nats-py (no compare-and-set); exit 1, every one found at its sequence."""
    async with EventStore.connect(Settings(nats_url=server.url)) as store:
        js = store.nc.jetstream()

        async def raw(event: ev.Event, drop: tuple[str, ...] = ()) -> int:
            return (await js.publish(*encoded_without(event, drop))).seq

        a1 = await raw(ev.AgentRegistered(producer=who("a1"), agent_id="a1", instance_id="i", pool="p"))
        a2 = await raw(ev.AgentRegistered(producer=who("a2"), agent_id="a2", instance_id="i", pool="p"))
        await raw(ev.SessionCreated(producer=CLI, session_id="s1", pool="p"))
        c1 = await raw(ev.SessionClaimed(producer=who("a1"), session_id="s1", agent_id="a1", instance_id="i",
                                         incarnation=a1))

        async def applied_claim_of_a_superseded_incarnation() -> int:
            """A claim by a3's first incarnation stored after its second registration (flagged, not applied),
            then a resource report under its token: the write that treats it as applied is the violation."""
            old = await raw(ev.AgentRegistered(producer=who("a3"), agent_id="a3", instance_id="i", pool="p"))
            await raw(ev.AgentRegistered(producer=who("a3"), agent_id="a3", instance_id="j", pool="p"))
            await raw(ev.SessionCreated(producer=CLI, session_id="s3", pool="p"))
            token = await raw(ev.SessionClaimed(producer=who("a3"), session_id="s3", agent_id="a3", instance_id="i",
                                                incarnation=old))
            return await raw(ev.SessionResourceReported(producer=who("a3"), session_id="s3", agent_id="a3",
                                                        incarnation=old, token=token, platform_resource_id="x"))

        planted = {
            ck.OVERLAPPING_OWNERSHIP: await raw(ev.SessionClaimed(producer=who("a2"), session_id="s1", agent_id="a2",
                                                                  instance_id="i", incarnation=a2)),
            ck.STALE_TOKEN: await raw(ev.SessionReleased(producer=who("a2"), session_id="s1", agent_id="a2",
                                                         incarnation=a2, token=c1 + 1)),
            ck.ILLEGAL_TRANSITION: await raw(ev.SessionOrphaned(producer=who("reclaimer"), session_id="s9",
                                                                reason="x")),
            ck.SUPERSEDED_INCARNATION: await applied_claim_of_a_superseded_incarnation(),
            ck.MISSING_EVENT_ID: await raw(ev.SessionCreated(producer=CLI, session_id="s5", pool="p"),
                                           drop=("event_id",)),
            ck.MISSING_TIME: await raw(ev.SessionCreated(producer=CLI, session_id="s6", pool="p"), drop=("time",)),
        }
        await raw(ev.SessionCreated(producer=CLI, session_id="s2", pool="p"))
        planted[ck.CLAIM_FOR_UNAVAILABLE_AGENT] = await raw(ev.SessionClaimed(
            producer=who("ghost"), session_id="s2", agent_id="ghost", instance_id="i", incarnation=1))
        await raw(ev.AgentDeclaredDead(producer=who("monitor"), agent_id="a1", incarnation=a1, reason="x"))

    code, doc, _ = ledger_check(server.url, "--json", "--grace", "0")
    assert code == 1
    seen = {(v["kind"], v["seq"]) for v in doc["violations"]}
    assert set(planted.items()) <= seen
    # a1 (ttl 30 s) died just now: not stranded yet; with a "now" past ttl + grace it would be.
    assert not [v for v in doc["violations"] if v["kind"] == ck.STRANDED]
    assert len(doc["violations"]) == len(planted)
    assert doc["flagged"] == {ck.SUPERSEDED_INCARNATION: 1}  # a3's claim itself
    code, _, out = ledger_check(server.url)
    assert code == 1 and f"{len(planted)} violation(s)" in out and "overlapping_ownership" in out
    code, doc, _ = ledger_check(server.url, "--json", "--since", "2100-01-01T00:00:00Z")
    assert code == 0 and doc["clean"] and doc["events"] == len(planted) + 10  # everything read, nothing after


async def test_an_in_flight_claim_of_a_superseded_incarnation_is_counted_and_clean_on_a_real_server(
        server: EmbeddedServer):
    """The race the fault campaign hit: an agent's claim lands after its next registration. Flagged by every
    fold and never applied; `ledger check` counts it, exits 0, and a later claim by the new incarnation is fine."""
    async with EventStore.connect(Settings(nats_url=server.url)) as store:
        old = await store.append(ev.AgentRegistered(producer=who("a1"), agent_id="a1", instance_id="i", pool="p"))
        await store.append(ev.SessionCreated(producer=CLI, session_id="s1", pool="p"))
        new = await store.append(ev.AgentRegistered(producer=who("a1"), agent_id="a1", instance_id="j", pool="p"))
        await store.append(ev.SessionClaimed(producer=who("a1"), session_id="s1", agent_id="a1", instance_id="i",
                                             incarnation=old))
        await store.append(ev.SessionClaimed(producer=who("a1"), session_id="s1", agent_id="a1", instance_id="j",
                                             incarnation=new))
    code, doc, _ = ledger_check(server.url, "--json")
    assert code == 0 and doc["clean"], doc["violations"]
    assert doc["flagged"] == {ck.SUPERSEDED_INCARNATION: 1}
    code, _, out = ledger_check(server.url)
    assert code == 0 and "flagged, not applied: superseded_incarnation 1" in out and "clean: no violation" in out


async def test_a_stranded_session_on_a_real_server(server: EmbeddedServer):
    async with EventStore.connect(Settings(nats_url=server.url)) as store:
        ledger_seq = await store.append(ev.AgentRegistered(producer=who("a1"), agent_id="a1", instance_id="i",
                                                           pool="p", ttl=0.5, heartbeat_interval=0.1))
        await store.append(ev.SessionCreated(producer=CLI, session_id="s1", pool="p"))
        token = await store.append(ev.SessionClaimed(producer=who("a1"), session_id="s1", agent_id="a1",
                                                     instance_id="i", incarnation=ledger_seq))
        bye = await store.append(ev.AgentGoodbye(producer=who("a1"), agent_id="a1", instance_id="i",
                                                 incarnation=ledger_seq))
        bye_ns = await store.stored_ns(bye)
        # No reclaimer runs. The log moves on until its own clock is past the ttl (grace 0 below).
        n = iter(range(10_000))

        async def past_ttl() -> bool:
            seq = await store.append(ev.SessionCreated(producer=CLI, session_id=f"later{next(n)}", pool="p"))
            return (await store.stored_ns(seq) or 0) - (bye_ns or 0) > 0.5e9

        await eventually(past_ttl, timeout=10, interval=0.05, what="stored times past the ttl")
    code, doc, _ = ledger_check(server.url, "--json", "--grace", "0")
    assert code == 1 and [(v["kind"], v["seq"]) for v in doc["violations"]] == [(ck.STRANDED, token)]
    code, doc, _ = ledger_check(server.url, "--json", "--grace", "60")
    assert code == 0 and doc["clean"]


def test_a_user_mistake_is_one_line():
    result = subprocess.run([sys.executable, "-m", "ledgerctl", "check", "--since", "yesterday-ish"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and "is not a time" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "ledgerctl", "check", "--nats-url", "nats://127.0.0.1:1"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr and "cannot reach" in result.stderr



@pytest.mark.parametrize("payload", [
    {"type": "agent.registered", "agent_id": "a9", "instance_id": "i", "producer": {"id": "a9", "instance": "i"}},
    {"type": "agent.registered", "agent_id": "a9", "instance_id": "i", "pool": 7,
     "producer": {"id": "a9", "instance": "i"}},
    {"type": "agent.registered", "agent_id": "a9", "instance_id": "i", "pool": "p", "producer": {"id": "a9"}},
    {"type": "agent.exploded", "agent_id": "a9", "producer": {"id": "a9", "instance": "i"}},
])
def test_an_event_a_decoder_must_refuse_is_not_acted_upon(payload: dict[str, Any]):
    """A registration every reader dead-letters registers nobody: the claim for a9 stays a violation."""
    h = History()
    verb = payload["type"].split(".")[1]
    h.raw(f"ledger.agent.a9.{verb}.a9",
          json.dumps({"event_id": "x", "time": "2026-01-01T00:00:00Z", **payload}).encode())
    h.create("s1")
    claim = h.claim("s1", "a9", 1)
    report = h.check()
    assert report.not_events == 1 and found(report) == [(ck.CLAIM_FOR_UNAVAILABLE_AGENT, claim)]
