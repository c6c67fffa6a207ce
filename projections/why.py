"""Why an entity is as it is: the chain of causes behind its state at a moment, newest first, in sentences.

The chain starts at the event that set the entity's state (`entity_history`, folded with the projection's
rules, up to the moment) and follows each event's cause back through the log:

- its `causation_id`, an event id, looked up in the histories the event names (its own entity, the session's
  previous owner or claimer, a route's session) - every writer names the event its decision was taken on:
  the reclaimer the owner's death, goodbye, drain or fencing (`lifecycle.owner_replaceable`) or the
  orphaning it follows, the monitor the event that set the agent's status, the watchdog the session's;
- where the event names its cause only by fact, those facts: a death or a suspicion by its evidence (the
  suspicion before it, the last heartbeat on the heartbeat stream, or the registration when there was none),
  a take-over without a causation id by its previous owner's status, a `drained` by the `draining` before it.

Each link says which stream and sequence it is, and who wrote it as the log records it (producer id and
instance: a forged event reads as written by its forger, and a flagged one says it was not applied). The walk
is bounded: at most `MAX_LINKS` links, a cause must be stored before its effect, and a cause already in the
chain ends it - a forged causation id naming itself, a later event or a loop stops with a sentence saying so.

The sentences are pure functions of the events (`describe`, `headline`); the reads are a `Source`, which
`StoreSource` answers from JetStream, so the chain is testable without a server.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol, cast

import msgspec

from ledger import events as ev
from ledger import lifecycle as lc
from ledger.codec import Item, Recorded
from ledger.store import EventStore
from ledger.subjects import HEARTBEAT_STREAM, LEDGER_STREAM, entity_filter

from .errors import InvalidQuery, UnknownEntity
from .history import EntityHistory, Flag, HistoryEntry, checkpoint_size, entity_history, stored_by
from .text import printable

__all__ = ["KINDS", "MAX_LINKS", "Chain", "Found", "Link", "Source", "StoreSource", "build_chain", "describe",
           "headline", "printable", "render", "why"]

KINDS = ("agent", "session", "route")
MAX_LINKS = 12
"""A chain is a handful of links (claim, orphaning, death, suspicion, beat); more means a forged chain."""


class Link(msgspec.Struct, frozen=True, kw_only=True):
    """One event of the chain, as data: where it is stored, who wrote it, and the sentence it reads as."""

    seq: int
    stream: str
    kind: str
    """The entity kind the event is about: agent, session, route or pool (a heartbeat: agent)."""
    entity: str
    type: str
    time: datetime
    """When the server stored it (what the folds judge by)."""
    event_time: datetime | None = None
    """When its producer says it happened."""
    producer: str
    producer_instance: str
    event_id: str
    causation_id: str | None = None
    applied: bool = True
    flag: Flag | None = None
    found_by: str
    """How the link was found: `state` (it set the entity's state), `causation_id`, or the fact that names it
    (`evidence`, `previous_owner`, `suspicion`, `draining`, `registration`)."""
    sentence: str
    fields: dict[str, Any] = {}
    """The event's payload: what the sentence was made from."""


class Chain(msgspec.Struct, frozen=True, kw_only=True):
    kind: str
    id: str
    at: str
    """The moment asked about: `now`, `LEDGER #N` or a time."""
    summary: str
    """The entity's state then, in one sentence."""
    links: list[Link]
    """Newest first: the event that set the state, then its cause, then that one's cause..."""
    end: str
    """Why the chain stops (its last link has no recorded cause, a cause is missing, a loop was cut...)."""
    notes: list[str] = []
    """What else held the state then: a session's owner no longer alive, its pool's breaker open (which stops the
    reclaimer from orphaning), the breaker a death tripped."""


class Found(msgspec.Struct, frozen=True):
    """An event of some entity's history, with the fold's verdict on it (the flag, when not applied)."""

    kind: str
    entity: str
    record: Recorded
    flag: Flag | None = None


class Source(Protocol):
    """The reads a chain needs (`StoreSource`: JetStream)."""

    async def events(self, kind: str, entity_id: str) -> list[Found]:
        """Every event of the entity, oldest first (empty when it has none)."""
        ...

    async def beat(self, agent_id: str, seq: int) -> Recorded | None:
        """The heartbeat of `agent_id` stored at `seq` on the heartbeat stream (None: no such beat kept)."""
        ...


# --- sentences (pure) -------------------------------------------------------------------------------------------


def _hms(at: datetime) -> str:
    return at.strftime("%H:%M:%S")


def _s(x: float | None) -> str:
    return "?" if x is None else f"{x:g} s"


def by(e: ev.Event) -> str:
    """Who wrote the event, as the log records it (never taken on trust as a role)."""
    return f"`{e.producer.id}` (instance `{e.producer.instance}`)"


def _evidence(x: ev.Evidence, registration: ev.AgentRegistered | None = None) -> str:
    """The evidence a verdict names: its own account first, then the facts it was judged on."""
    parts = [x.detail] if x.detail else []
    if x.last_heartbeat_seq is not None:
        at = f" at {_hms(x.last_heartbeat_at)}" if x.last_heartbeat_at else ""
        parts.append(f"last beat heartbeat-stream #{x.last_heartbeat_seq}{at}")
    elif x.last_heartbeat_at is None and (x.heartbeat_interval or x.dead_after):
        parts.append("no beat since registering")
    if x.heartbeat_interval is not None:
        parts.append(f"interval {_s(x.heartbeat_interval)}")
    if registration is not None:
        parts.append(f"ttl {_s(registration.ttl)}")
    if x.suspect_after_missed is not None:
        parts.append(f"suspect after {x.suspect_after_missed} missed")
    if x.dead_after is not None:
        parts.append(f"dead after {_s(x.dead_after)}")
    if x.reports is not None:
        parts.append(f"{x.reports} failure reports in {_s(x.report_window)}")
    if x.observed_at is not None:
        parts.append(f"judged at {_hms(x.observed_at)}")
    return "; ".join(parts)


def describe(rec: Recorded, registration: ev.AgentRegistered | None = None) -> str:
    """What the event says happened, in one sentence (without its position: `render` adds that).

    `registration`: the agent's registration of the incarnation concerned, for a death or a suspicion (its ttl
    and interval said beside the evidence)."""
    e, w = rec.event, by(rec.event)
    match e:
        case ev.SessionCreated():
            return f"{w} created session {e.session_id} in pool {e.pool} ({e.platform}/{e.region})"
        case ev.SessionClaimed():
            took = (f", taking it over from {e.previous_owner} under token {e.previous_token}"
                    if e.previous_token is not None else
                    f", after {e.previous_owner}" if e.previous_owner else "")
            return (f"{w} claimed {e.session_id} for {e.agent_id} (incarnation {e.incarnation}, "
                    f"reason {e.reason}{took})")
        case ev.SessionOrphaned():
            owner = f" from {e.previous_owner}" if e.previous_owner else ""
            token = f" (incarnation {e.previous_incarnation}, token {e.previous_token})" \
                if e.previous_token is not None else ""
            more = _evidence(e.evidence)
            return f"{w} orphaned {e.session_id}{owner}{token}: {e.reason}" + (f"; {more}" if more else "")
        case ev.SessionReleased():
            return f"{w} released {e.session_id} held by {e.agent_id} under token {e.token}: {e.reason or 'released'}"
        case ev.SessionTerminated():
            token = f" under token {e.token}" if e.token is not None else ""
            return f"{w} terminated {e.session_id}{token}: {e.reason or 'terminated'}"
        case ev.SessionResourceReported():
            return f"{w} reported {e.session_id}'s resource {e.platform_resource_id} at {e.address or '-'}"
        case ev.SessionCheckpointed():
            note = f": {e.note}" if e.note else ""
            return (f"{w} checkpointed {e.session_id} for {e.agent_id} under token {e.token} "
                    f"({len(e.data)} bytes{note})")
        case ev.AgentRegistered():
            return (f"{w} registered {e.agent_id} as incarnation {rec.seq} in pool {e.pool}: beats every "
                    f"{_s(e.heartbeat_interval)}, ttl {_s(e.ttl)}")
        case ev.AgentHeartbeat():
            return (f"{w} beat for {e.agent_id} on the heartbeat stream (incarnation {e.incarnation}, beat {e.beat}, "
                    f"load {e.load}/{e.capacity})")
        case ev.AgentDeclaredDead() | ev.AgentSuspected():
            verb = "declared" if isinstance(e, ev.AgentDeclaredDead) else "suspected"
            what = " dead" if isinstance(e, ev.AgentDeclaredDead) else ""
            more = _evidence(e.evidence, registration)
            return f"{w} {verb} {e.agent_id}{what} (incarnation {e.incarnation}): {e.reason}" + (
                f"; {more}" if more else "")
        case ev.AgentGoodbye():
            return f"{w} said goodbye for {e.agent_id} (incarnation {e.incarnation}): {e.reason}"
        case ev.AgentDraining():
            return (f"{w} started draining {e.agent_id} (incarnation {e.incarnation}) by {_hms(e.deadline)}"
                    + (f": {e.reason}" if e.reason else ""))
        case ev.AgentDrained():
            return f"{w} said {e.agent_id} is drained (incarnation {e.incarnation})" + (
                f": {e.reason}" if e.reason else "")
        case ev.AgentDrainRequested():
            return (f"{w} asked {e.agent_id} (incarnation {e.incarnation}) to drain by {_hms(e.deadline)}"
                    + (f": {e.reason}" if e.reason else ""))
        case ev.AgentFenced():
            return (f"{w} said {e.agent_id} fenced itself (incarnation {e.incarnation}) at {_hms(e.fenced_at)}: "
                    f"{e.reason}")
        case ev.AgentUnreachableReported():
            return f"{w} reported {e.agent_id} unreachable" + (f": {e.error}" if e.error else "")
        case ev.RouteCreated():
            return f"{w} created route {e.route_id} for session {e.session_id} at {e.endpoint}"
        case ev.RouteTransitioned():
            traffic = f", traffic {e.traffic}" if e.traffic else ""
            return (f"{w} moved route {e.route_id} from {e.from_state} to {e.to_state}{traffic}"
                    + (f": {e.reason}" if e.reason else ""))
        case ev.RouteHealthReported():
            return f"{w} reported route {e.route_id} {'healthy' if e.healthy else 'unhealthy'}" + (
                f": {e.detail}" if e.detail else "")
        case ev.PoolBreakerTripped():
            return f"{w} tripped pool {e.pool}'s breaker: {e.reason} (dead: {', '.join(e.dead) or '-'})"
        case ev.PoolBreakerReset():
            return f"{w} reset pool {e.pool}'s breaker: {e.reason}"
    return f"{w} wrote {e.type_tag()}"


def headline(kind: str, entity_id: str, state: dict[str, Any] | None, head: Link | None) -> str:
    """The entity's state in one sentence: "s1 is owned by a3 since 07:21:32 (claim #12, reason failover)"."""
    if state is None:
        return f"{kind} {entity_id} has no state (none of its events applied)"
    since = f" since {_hms(head.time)} ({head.type} #{head.seq})" if head is not None else ""
    if kind == "session":
        if state.get("status") == "assigned":
            return (f"{entity_id} is owned by {state.get('owner')} (incarnation {state.get('owner_incarnation')}, "
                    f"token {state.get('token')}, reason {state.get('claim_reason')}){since}")
        reason = f", {state['reason']}" if state.get("reason") else ""
        return f"{entity_id} is {state.get('status')}{reason}{since}"
    if kind == "agent":
        return (f"{entity_id} (incarnation {state.get('incarnation')}) is {state.get('status')} "
                f"({state.get('reason')}){since}")
    traffic = f", traffic {state.get('traffic')}" if state.get("traffic") else ""
    reason = f", {state['reason']}" if state.get("reason") else ""
    return f"{entity_id} is {state.get('state')}{traffic}{reason}{since}"


def render(chain: Chain) -> list[str]:
    """The chain as lines of text: the summary, then each link with its position, newest first (every line
    `printable`)."""
    return [printable(line) for line in _lines(chain)]


def _lines(chain: Chain) -> list[str]:
    lines = [chain.summary + (f" (as of {chain.at})" if chain.at != "now" else "")]
    for i, link in enumerate(chain.links):
        where = f"{link.stream} #{link.seq}"
        flag = f" [flagged, not applied: {link.flag.kind}: {link.flag.detail}]" if link.flag else ""
        lead = "" if i == 0 else "because "
        lines.append(f"  {lead}{where} at {_hms(link.time)}: {link.sentence}{flag}")
    lines.append(f"  ({chain.end})")
    lines.extend(f"  note: {note}" for note in chain.notes)
    return lines


# --- the walk -----------------------------------------------------------------------------------------------------


def _link(found: Found, found_by: str, registration: ev.AgentRegistered | None = None) -> Link:
    rec, e = found.record, found.record.event
    fields = msgspec.to_builtins(e)
    return Link(seq=rec.seq, stream=rec.stream, kind=found.kind, entity=found.entity, type=e.type_tag(),
                time=rec.stored_at, event_time=e.time, producer=e.producer.id, producer_instance=e.producer.instance,
                event_id=e.event_id, causation_id=e.causation_id, applied=found.flag is None, flag=found.flag,
                found_by=found_by, sentence=describe(rec, registration), fields=fields)


def _places(found: Found, route_session: Callable[[str], str | None]) -> list[tuple[str, str]]:
    """The histories an event's cause may be in: its own entity's, then those it names."""
    e = found.record.event
    places = [(found.kind, found.entity)]
    if isinstance(e, ev.SessionClaimed | ev.SessionOrphaned) and e.previous_owner:
        places.append(("agent", e.previous_owner))
    if isinstance(e, ev.SessionClaimed | ev.SessionReleased | ev.SessionResourceReported):
        places.append(("agent", e.agent_id))
    if isinstance(e, ev.RouteEvent):
        session = route_session(e.route_id)
        if session:
            places.append(("session", session))
    return [p for i, p in enumerate(places) if p not in places[:i]]


_STATUS_SETTERS = (ev.AgentRegistered, ev.AgentGoodbye, ev.AgentDeclaredDead, ev.AgentFenced, ev.AgentDrained,
                   ev.AgentDraining)


class _Walk:
    def __init__(self, source: Source) -> None:
        self.source = source
        self.histories: dict[tuple[str, str], list[Found]] = {}
        self.route_sessions: dict[str, str | None] = {}

    async def events(self, kind: str, entity_id: str) -> list[Found]:
        key = (kind, entity_id)
        if key not in self.histories:
            self.histories[key] = await self.source.events(kind, entity_id)
            if kind == "route":
                created = next((f.record.event for f in self.histories[key]
                                if isinstance(f.record.event, ev.RouteCreated)), None)
                self.route_sessions[entity_id] = created.session_id if created else None
        return self.histories[key]

    async def by_id(self, event_id: str, places: list[tuple[str, str]], effect: Recorded) -> Found | None:
        """The event with this id in the places named: an id written twice - a forger's copy, on any of them -
        reads as the newest the effect could have seen, stored before it and applied; else stored before it;
        else any (a later one, which ends the chain)."""
        matches = [f for kind, entity_id in places for f in await self.events(kind, entity_id)
                   if f.record.event.event_id == event_id]
        before = [f for f in matches if f.record.seq < effect.seq]
        for tier in ([f for f in before if f.flag is None], before, matches):
            if tier:
                return max(tier, key=lambda f: f.record.seq)
        return None

    async def registration(self, agent_id: str, incarnation: int) -> Found | None:
        return next((f for f in await self.events("agent", agent_id)
                     if f.record.seq == incarnation and isinstance(f.record.event, ev.AgentRegistered)), None)

    async def registration_of(self, found: Found) -> ev.AgentRegistered | None:
        """The registration of the incarnation a death or a suspicion judged (its ttl and interval)."""
        e = found.record.event
        if not isinstance(e, ev.AgentDeclaredDead | ev.AgentSuspected):
            return None
        reg = await self.registration(e.agent_id, e.incarnation)
        return reg.record.event if reg is not None and isinstance(reg.record.event, ev.AgentRegistered) else None

    async def last_before(self, kind: str, entity_id: str, seq: int, match: Callable[[Found], bool]) -> Found | None:
        """The newest applied event matching, stored before `seq`: a fact a verdict followed (a flagged forgery
        stored in between is no fact)."""
        return next((f for f in reversed(await self.events(kind, entity_id))
                     if f.record.seq < seq and f.flag is None and match(f)), None)

    async def causes(self, found: Found) -> tuple[list[tuple[Found | Recorded, str]], str | None]:
        """The next link(s) back from `found` and how each was found, or none and why the chain ends there."""
        rec, e = found.record, found.record.event
        if isinstance(e, ev.AgentHeartbeat):
            return [], "a heartbeat is a sign of life: nothing causes it"
        if isinstance(e, ev.AgentDeclaredDead | ev.AgentSuspected):
            return await self._liveness_causes(found, e)
        if e.causation_id:
            await self.events(found.kind, found.entity)  # a route's session becomes known
            cause = await self.by_id(e.causation_id, _places(found, self.route_sessions.get), rec)
            if cause is None:
                return [], f"cause not found in the log (causation id {e.causation_id})"
            return [(cause, "causation_id")], None
        if isinstance(e, ev.SessionClaimed | ev.SessionOrphaned) and e.previous_owner:
            owner = await self.last_before("agent", e.previous_owner, rec.seq,
                                           lambda f: isinstance(f.record.event, _STATUS_SETTERS))
            if owner is not None:
                return [(owner, "previous_owner")], None
            return [], f"no causation id recorded, and no event of the previous owner {e.previous_owner} before it"
        if isinstance(e, ev.AgentDrained):
            draining = await self.last_before(
                "agent", e.agent_id, rec.seq,
                lambda f: isinstance(f.record.event, ev.AgentDraining) and f.record.event.incarnation == e.incarnation)
            if draining is not None:
                return [(draining, "draining")], None
        return [], f"{e.type_tag()} #{rec.seq} names no cause"

    async def _liveness_causes(self, found: Found, e: ev.AgentDeclaredDead | ev.AgentSuspected,
                               ) -> tuple[list[tuple[Found | Recorded, str]], str | None]:
        out: list[tuple[Found | Recorded, str]] = []
        evidence = e.evidence
        if isinstance(e, ev.AgentDeclaredDead):
            suspicion = await self.last_before(
                "agent", e.agent_id, found.record.seq,
                lambda f: isinstance(f.record.event, ev.AgentSuspected) and f.record.event.incarnation == e.incarnation)
            if suspicion is not None:
                out.append((suspicion, "suspicion"))
                sus = suspicion.record.event
                assert isinstance(sus, ev.AgentSuspected)
                if evidence.last_heartbeat_seq is None:
                    evidence = sus.evidence
        if evidence.last_heartbeat_seq is not None:
            beat = await self.source.beat(e.agent_id, evidence.last_heartbeat_seq)
            if beat is None:
                return out, (f"the last beat it names, heartbeat-stream #{evidence.last_heartbeat_seq}, is not kept "
                             "(past the heartbeat stream's retention, or never a beat of this agent)")
            out.append((beat, "evidence"))
            return out, None
        reg = await self.registration(e.agent_id, e.incarnation)
        if reg is not None:
            out.append((reg, "registration"))
            return out, None
        return out, f"no beat named in its evidence and no registration #{e.incarnation} of {e.agent_id}"


async def build_chain(head: EntityHistory, source: Source, *, at: str = "now",
                      within: Callable[[Recorded], bool] = lambda rec: True) -> Chain:
    """The chain behind `head`'s state (the entity's history up to the moment asked about; `within` says whether
    another entity's event was stored by then)."""
    kind, entity_id = head.kind, head.id
    if kind not in KINDS:
        raise InvalidQuery(f"why is told for {', '.join(KINDS)}; not {kind!r}")
    walk = _Walk(source)
    start = _head_entry(head)
    if start is None:
        return Chain(kind=kind, id=entity_id, at=at, summary=headline(kind, entity_id, head.state, None), links=[],
                     end="no event set its state")
    found = next((f for f in await walk.events(kind, entity_id) if f.record.seq == start.seq), None)
    if found is None:  # the stream changed under us (it never loses an entity's events otherwise)
        return Chain(kind=kind, id=entity_id, at=at, summary=headline(kind, entity_id, head.state, None), links=[],
                     end=f"LEDGER #{start.seq} is no longer in the log")
    links = [_link(found, "state", await walk.registration_of(found))]
    seen = {(LEDGER_STREAM, found.record.seq)}
    end = ""
    frontier: Found | None = found
    while frontier is not None:
        causes, stop = await walk.causes(frontier)
        frontier = None
        for cause, how in causes:
            rec = cause.record if isinstance(cause, Found) else cause
            newest = links[-1]
            if (rec.stream, rec.seq) in seen:
                end = (f"{newest.type} #{newest.seq} names as its cause {rec.stream} #{rec.seq}, already in this "
                       "chain: a loop of causation ids (forged?) ends it")
                break
            if (rec.stream == newest.stream and rec.seq >= newest.seq) or rec.stored_at > newest.time:
                end = (f"{newest.type} #{newest.seq} names as its cause {rec.stream} #{rec.seq}, stored after it: "
                       "a cause comes before its effect, so the chain stops (forged?)")
                break
            if len(links) >= MAX_LINKS:
                end = f"the chain is cut at {MAX_LINKS} links"
                break
            seen.add((rec.stream, rec.seq))
            frontier = cause if isinstance(cause, Found) else Found("agent", rec.event.entity_id, rec)
            links.append(_link(frontier, how, await walk.registration_of(frontier)))
        if end:
            break
        if stop is not None:
            end = stop
            break
    return Chain(kind=kind, id=entity_id, at=at, summary=headline(kind, entity_id, head.state, links[0]), links=links,
                 end=end or "its first event", notes=await _notes(walk, head, within))


async def _notes(walk: _Walk, head: EntityHistory, within: Callable[[Recorded], bool]) -> list[str]:
    """What held the state besides its chain: a session's owner lost but not replaced (the breaker of its pool
    open, or the reclaimer not there yet), the breaker a death tripped."""
    state = head.state or {}
    notes = []

    def where(f: Found) -> str:
        return f"{f.record.stream} #{f.record.seq} at {_hms(f.record.stored_at)}"

    checkpoint = state.get("checkpoint") if head.kind == "session" else None
    if isinstance(checkpoint, dict):  # what the next owner resumes from
        size = checkpoint_size(checkpoint)
        notes.append(f"its last checkpoint is LEDGER #{checkpoint.get('seq')}, written by {checkpoint.get('agent_id')} "
                     f"under token {checkpoint.get('token')} ({size} bytes)")
    if head.kind == "session" and state.get("status") == lc.S_ASSIGNED and state.get("owner"):
        owner, held = str(state["owner"]), state.get("owner_incarnation")
        history = [f for f in await walk.events("agent", owner) if within(f.record) and f.flag is None]
        agent: lc.AgentState | None = None
        for f in history:
            agent, _ = lc.evolve_agent(agent, f.record)
        # The one rule of take-overs reads the session's status, owner and owner's incarnation alone.
        session = lc.SessionState(session_id=head.id, pool=str(state.get("pool") or ""), platform="", region="",
                                  labels={}, idle_ttl=None, status=lc.S_ASSIGNED,
                                  created_at=datetime.min.replace(tzinfo=UTC), owner=owner, owner_incarnation=held)
        replaceable = lc.owner_replaceable(session, agent)
        if replaceable is not None:
            # what says so: the held incarnation's last status, else the registration that superseded it
            status = next((f for f in reversed(history) if isinstance(f.record.event, _STATUS_SETTERS)
                           and not isinstance(f.record.event, ev.AgentRegistered)
                           and getattr(f.record.event, "incarnation", None) == held), None)
            newer = next((f for f in reversed(history) if isinstance(f.record.event, ev.AgentRegistered)
                          and f.record.seq != held), None)
            if status is not None:
                notes.append(f"its owner {owner} is no longer alive: {where(status)}, {describe(status.record)}")
            elif newer is not None:
                notes.append(f"its owner {owner}'s incarnation {held} is superseded: {where(newer)}, "
                             f"{describe(newer.record)}")
            else:
                notes.append(f"its owner {owner} may be replaced: {replaceable[0]}")
            pool = str(state.get("pool") or "")
            breakers = [f for f in await walk.events("pool", pool) if within(f.record) and f.flag is None
                        and isinstance(f.record.event, ev.PoolBreakerTripped | ev.PoolBreakerReset)] if pool else []
            breaker = breakers[-1] if breakers else None
            if breaker is not None and isinstance(breaker.record.event, ev.PoolBreakerTripped):
                notes.append(f"pool {pool}'s breaker is open, so the reclaimer holds the session rather than orphan "
                             f"it: {where(breaker)}, {describe(breaker.record)}")
    if head.kind == "agent" and state.get("status") == "dead" and state.get("pool"):
        pool = str(state["pool"])
        for f in await walk.events("pool", pool):
            e = f.record.event
            if within(f.record) and f.flag is None and isinstance(e, ev.PoolBreakerTripped) and head.id in e.dead \
                    and f.record.seq >= int(state.get("incarnation") or 0):  # a forged (flagged) trip tripped nothing
                notes.append(f"this death tripped pool {pool}'s breaker: {where(f)}, {describe(f.record)}")
    return notes


def _head_entry(head: EntityHistory) -> HistoryEntry | None:
    """The applied event that set the entity's state: its status (agent, session) or its route state."""
    state = head.state or {}
    applied = [e for e in head.entries if e.applied and e.event is not None]
    if not applied:
        return None
    if head.kind == "route":
        seq = state.get("state_seq")
        return next((e for e in applied if e.seq == seq), applied[-1])
    if head.kind == "agent":
        seq = state.get("status_seq")
        return next((e for e in applied if e.seq == seq), applied[-1])
    cause = state.get("cause_id")
    return next((e for e in reversed(applied) if e.event_id == cause), applied[-1])


# --- reads from JetStream -----------------------------------------------------------------------------------------


class _ReadOnce:
    """The store, with each entity's history read once for a chain: the head's fold, the walk's fold and the
    records behind it would read it three times (a long history, a forger's flood, is costly enough once)."""

    def __init__(self, store: EventStore) -> None:
        self._store = store
        self._read: dict[tuple[str, str, tuple[tuple[str, Any], ...]], list[Item]] = {}

    async def history(self, family: str, entity_id: str, **kw: Any) -> list[Item]:
        key = (family, entity_id, tuple(sorted(kw.items())))
        if key not in self._read:
            self._read[key] = await self._store.history(family, entity_id, **kw)
        return self._read[key]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


class StoreSource:
    """A chain's reads from the event store: entity histories folded with the projection's rules (so each event
    carries the fold's flag), heartbeats by sequence."""

    def __init__(self, store: EventStore) -> None:
        self.store = cast(EventStore, store if isinstance(store, _ReadOnce) else _ReadOnce(store))

    async def events(self, kind: str, entity_id: str) -> list[Found]:
        try:
            history = await entity_history(self.store, kind, entity_id)
        except UnknownEntity:
            return []
        records = {r.seq: r for r in await self.store.history(kind, entity_id) if isinstance(r, Recorded)}
        return [Found(kind, entity_id, records[e.seq], e.anomaly) for e in history.entries if e.seq in records]

    async def beat(self, agent_id: str, seq: int) -> Recorded | None:
        items: list[Item]
        items, _ = await self.store.read_batch(HEARTBEAT_STREAM, entity_filter("hb", agent_id), seq, batch=1)
        item = items[0] if items else None
        if isinstance(item, Recorded) and item.seq == seq and isinstance(item.event, ev.AgentHeartbeat):
            return item
        return None


async def why(store: EventStore, kind: str, entity_id: str, *, seq: int | None = None,
              time: datetime | None = None) -> Chain:
    """The chain behind the entity's state now, just after LEDGER #`seq`, or at `time`."""
    if kind not in KINDS:
        raise InvalidQuery(f"why is told for {', '.join(KINDS)}; not {kind!r}")
    if seq is not None and seq < 0:
        raise InvalidQuery(f"a LEDGER sequence is 0 or more, not {seq}")
    source = StoreSource(store)
    head = await entity_history(source.store, kind, entity_id, seq=seq, time=time)
    at = f"LEDGER #{seq}" if seq is not None else time.isoformat() if time is not None else "now"
    return await build_chain(head, source, at=at, within=stored_by(seq, time))
