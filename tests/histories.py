"""Generated ledger histories for property tests: both streams, legal and illegal, as stored.

A history is a list of `Recorded | Unreadable` items in the order the two
streams were written (LEDGER and LEDGER_HB numbered independently, stored
times rising). The generator keeps a model of the current state (the real
fold) so that most writes are plausible - the right incarnation, the current
claim token, the next route state - and mixes in what must be flagged:
superseded incarnations, stale tokens, overlapping claims, illegal route
moves, duplicates of earlier events, messages that are not events, and
events written by a producer that may not write them (`ledger.authority`).
Every other write comes from a producer of the role that may write it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
from hypothesis import strategies as st

from ledger import codec
from ledger import events as ev
from ledger.codec import Recorded, Unreadable
from ledger.ids import new_id
from ledger.lifecycle import ROUTE_STATES, ROUTE_TRANSITIONS
from ledger.subjects import HEARTBEAT_STREAM, LEDGER_STREAM
from projections.state import LedgerState

T0 = datetime(2026, 11, 1, tzinfo=UTC)
T0_NS = codec.to_ns(T0)
AGENTS = ("a0", "a1", "a2")
SESSIONS = ("s0", "s1", "s2", "s3")
ROUTES = ("r0", "r1", "r2")
MONITOR = ev.Producer(id="monitor", instance="m")
CLI = ev.Producer(id="cli", instance="c")
RECLAIMER = ev.Producer(id="reclaimer", instance="r")
WATCHDOG = ev.Producer(id="watchdog", instance="w")
PRODUCERS = (*(ev.Producer(id=a, instance=f"{a}-i") for a in AGENTS), MONITOR, CLI, RECLAIMER, WATCHDOG)
ACTIONS = ("register", "heartbeat", "heartbeat", "heartbeat", "goodbye", "suspect", "dead", "drain", "drained",
           "unreachable", "create_session", "claim", "claim", "claim", "release", "release", "resource", "orphan",
           "orphan", "terminate", "create_route", "transition", "transition", "transition", "transition", "health",
           "duplicate", "unreadable", "trip", "reset", "fenced", "impersonate", "checkpoint", "checkpoint")
BAD_PAYLOADS = (
    (b"{not json", "malformed: JSON is malformed"),
    (b'{"type": "agent.teleported", "agent_id": "a0"}', "unknown-type: Invalid value 'agent.teleported' - at `$.type`"),
    (b"{}", "invalid: Object missing required field `type`"),
)


class Builder:
    """Numbers items like the two streams would, and keeps the model the generator aims with."""

    def __init__(self) -> None:
        self.items: list[Recorded | Unreadable] = []
        self.seq = {LEDGER_STREAM: 0, HEARTBEAT_STREAM: 0}
        self.clock = 0
        self.model = LedgerState()
        self.registrations: dict[str, list[int]] = {}
        self.claims: dict[str, list[int]] = {}
        self.events: list[ev.Event] = []

    def _next(self, stream: str) -> tuple[int, int]:
        self.seq[stream] += 1
        self.clock += 1
        return self.seq[stream], T0_NS + self.clock * 1_000_000_000

    def add(self, event: ev.Event) -> Recorded:
        stream = HEARTBEAT_STREAM if type(event).family == "hb" else LEDGER_STREAM
        seq, ns = self._next(stream)
        rec = Recorded(stream, seq, codec.subject_of(event), ns, event)
        self.items.append(rec)
        self.events.append(event)
        self.model.apply(rec)
        return rec

    def add_unreadable(self, data: bytes, reason: str, subject: str = "ledger.session.sx.created.cli") -> None:
        seq, ns = self._next(LEDGER_STREAM)
        self.items.append(Unreadable(LEDGER_STREAM, seq, subject, ns, data, reason))

    def now(self) -> datetime:
        return T0 + timedelta(seconds=self.clock + 1)


@st.composite
def histories(draw: st.DrawFn, max_size: int = 60) -> list[Recorded | Unreadable]:
    b = Builder()
    # Most histories start with a fleet, so later writes meet existing entities (and their rules).
    prefix = draw(st.lists(st.sampled_from(("register", "create_session", "create_route")), min_size=3, max_size=8))
    for action in sorted(prefix, key=("register", "create_session", "create_route").index):
        _step(draw, b, action)
    for action in draw(st.lists(st.sampled_from(ACTIONS), min_size=min(10, max_size), max_size=max_size)):
        _step(draw, b, action)
    return b.items


def _pick(draw: st.DrawFn, known: object, every: tuple[str, ...]) -> str:
    """Mostly an entity that exists; sometimes any id."""
    existing = sorted(known)  # type: ignore[call-overload]
    if existing and draw(st.integers(0, 4)):
        return draw(st.sampled_from(existing))
    return draw(st.sampled_from(every))


def _incarnation(draw: st.DrawFn, b: Builder, agent: str) -> int:
    """Mostly the current incarnation; sometimes an old one, or one that never was."""
    known = b.registrations.get(agent, [])
    current = b.model.agents[agent].incarnation if agent in b.model.agents else None
    choices = [st.just(current)] * 4 if current is not None else []
    if len(known) > 1:
        choices.append(st.sampled_from(known[:-1]))
    choices.append(st.integers(1, 500))
    return draw(st.one_of(*choices))


def _token(draw: st.DrawFn, b: Builder, session: str) -> int | None:
    """Mostly the session's current token; sometimes a stale one or none."""
    current = b.model.sessions[session].token if session in b.model.sessions else None
    choices = [st.just(current)] * 3
    if b.claims.get(session):
        choices.append(st.sampled_from(b.claims[session]))
    choices.append(st.none())
    return draw(st.one_of(*choices))


def _step(draw: st.DrawFn, b: Builder, action: str) -> None:
    agent = _pick(draw, b.model.agents, AGENTS)
    me = ev.Producer(id=agent, instance=f"{agent}-i")
    if action == "create_session":
        session = _pick(draw, set(SESSIONS) - set(b.model.sessions), SESSIONS)
    else:
        session = _pick(draw, b.model.sessions, SESSIONS)
    if action == "create_route":
        route = _pick(draw, set(ROUTES) - set(b.model.routes), ROUTES)
    else:
        route = _pick(draw, b.model.routes, ROUTES)
    at = b.now()
    match action:
        case "register":
            rec = b.add(ev.AgentRegistered(producer=me, agent_id=agent, instance_id=f"{agent}-{b.clock}",
                                           pool=draw(st.sampled_from(("p", "q"))), capacity=draw(st.integers(1, 4)),
                                           time=at))
            b.registrations.setdefault(agent, []).append(rec.seq)
        case "heartbeat":
            b.add(ev.AgentHeartbeat(producer=me, agent_id=agent, instance_id="i", time=at, beat=b.clock,
                                    incarnation=_incarnation(draw, b, agent), load=draw(st.integers(0, 4))))
        case "goodbye":
            b.add(ev.AgentGoodbye(producer=me, agent_id=agent, instance_id="i", time=at,
                                  incarnation=_incarnation(draw, b, agent)))
        case "suspect":
            b.add(ev.AgentSuspected(producer=MONITOR, agent_id=agent, reason="missed_heartbeats", time=at,
                                    incarnation=_incarnation(draw, b, agent)))
        case "dead":
            b.add(ev.AgentDeclaredDead(producer=MONITOR, agent_id=agent, reason="ttl", time=at,
                                       incarnation=_incarnation(draw, b, agent)))
        case "drain":
            b.add(ev.AgentDraining(producer=me, agent_id=agent, deadline=at + timedelta(hours=1), time=at,
                                   incarnation=_incarnation(draw, b, agent)))
        case "drained":
            b.add(ev.AgentDrained(producer=me, agent_id=agent, time=at, incarnation=_incarnation(draw, b, agent)))
        case "unreachable":
            b.add(ev.AgentUnreachableReported(producer=CLI, agent_id=agent, time=at,
                                              incarnation=_incarnation(draw, b, agent)))
        case "create_session":
            b.add(ev.SessionCreated(producer=CLI, session_id=session, pool=draw(st.sampled_from(("p", "q"))),
                                    time=at))
        case "claim":
            previous = _token(draw, b, session)
            claimer = draw(st.sampled_from((me, me, RECLAIMER)))  # for itself, or given by the reclaimer
            rec = b.add(ev.SessionClaimed(producer=claimer, session_id=session, agent_id=agent, instance_id="i",
                                          incarnation=_incarnation(draw, b, agent), previous_token=previous,
                                          reason=draw(st.sampled_from(("initial", "failover"))), time=at))
            b.claims.setdefault(session, []).append(rec.seq)
        case "release":
            b.add(ev.SessionReleased(producer=me, session_id=session, agent_id=agent, time=at,
                                     incarnation=_incarnation(draw, b, agent), token=_token(draw, b, session) or 0))
        case "resource":
            b.add(ev.SessionResourceReported(producer=me, session_id=session, agent_id=agent, time=at,
                                             incarnation=_incarnation(draw, b, agent),
                                             token=_token(draw, b, session) or 0,
                                             platform_resource_id=f"pod-{b.clock}"))
        case "checkpoint":
            b.add(ev.SessionCheckpointed(producer=me, session_id=session, agent_id=agent, time=at,
                                         incarnation=_incarnation(draw, b, agent), token=_token(draw, b, session) or 0,
                                         data=draw(st.binary(max_size=24)), note=draw(st.sampled_from(("", "n")))))
        case "orphan":
            b.add(ev.SessionOrphaned(producer=RECLAIMER, session_id=session, reason="owner_gone", time=at,
                                     previous_token=_token(draw, b, session)))
        case "terminate":
            b.add(ev.SessionTerminated(producer=CLI, session_id=session, token=_token(draw, b, session), time=at))
        case "create_route":
            b.add(ev.RouteCreated(producer=CLI, route_id=route, session_id=session, endpoint="e", time=at,
                                  probe=ev.Probe(stale_after=draw(st.sampled_from((5.0, 30.0))))))
        case "transition":
            current = b.model.routes[route].state if route in b.model.routes else "PENDING"
            legal = sorted(ROUTE_TRANSITIONS[current]) or ["TERMINATED"]
            to = draw(st.one_of(st.sampled_from(legal), st.sampled_from(ROUTE_STATES)))
            frm = draw(st.one_of(st.just(current), st.sampled_from(ROUTE_STATES)))
            owner_session = b.model.routes[route].session_id if route in b.model.routes else session
            owner = b.model.sessions[owner_session].owner if owner_session in b.model.sessions else None
            writers = (CLI, WATCHDOG) + ((ev.Producer(id=owner, instance=f"{owner}-i"),) * 2 if owner else ())
            b.add(ev.RouteTransitioned(producer=draw(st.sampled_from(writers)), route_id=route, from_state=frm,
                                       to_state=to, time=at,
                                       token=draw(st.one_of(st.none(), st.just(_token(draw, b, owner_session)))),
                                       traffic=draw(st.sampled_from((None, "ACTIVE", "INACTIVE")))))
        case "health":
            b.add(ev.RouteHealthReported(producer=CLI, route_id=route, healthy=draw(st.booleans()), checked_at=at,
                                         time=at))
        case "trip":
            b.add(ev.PoolBreakerTripped(producer=MONITOR, pool=draw(st.sampled_from(("p", "q"))), reason="mass death",
                                        agents=draw(st.integers(0, 3)), time=at))
        case "reset":
            b.add(ev.PoolBreakerReset(producer=CLI, pool=draw(st.sampled_from(("p", "q"))), reason="operator",
                                      time=at))
        case "fenced":
            b.add(ev.AgentFenced(producer=me, agent_id=agent, time=at, fenced_at=at,
                                 incarnation=_incarnation(draw, b, agent), reason="lease lost"))
        case "impersonate":
            if b.events:  # an earlier kind of event, written again by any producer (mostly one that may not)
                forged = draw(st.sampled_from(b.events))
                b.add(msgspec.structs.replace(forged, producer=draw(st.sampled_from(PRODUCERS)), event_id=new_id()))
        case "duplicate":
            if b.events:  # the same fact stored twice (a retry after the dedupe window)
                b.add(draw(st.sampled_from(b.events)))
        case "unreadable":
            data, reason = draw(st.sampled_from(BAD_PAYLOADS))
            b.add_unreadable(data, reason)
