"""An independent history checker: a few plain rules over the raw stored messages.

`check(messages)` takes every stored message of the LEDGER stream (and of the
heartbeat stream, for the stranded rule), oldest first, as raw bytes, and
returns every violation it finds, each with the sequences involved.

Why apart from the folds: this module imports neither `ledger.lifecycle` nor
the projections, nor the codec's event types. It decodes payloads into plain
dicts and keeps a small state of its own (who owns which session under which
token, which incarnation of each agent is current), so a bug in a fold cannot
hide itself by being applied twice. The rules are the invariants of the brief
(section 3), written out again:

* overlapping_ownership - a claim lands while another claim holds the session
  and does not name that claim's token;
* stale_token - an owner write (release, resource report, terminate or orphan
  with a token, route transition with a token) under a token that is not the
  session's current claim, or by an agent other than the token's owner;
* illegal_transition - a session or route event the state machine forbids
  (after the final state, for an entity that was never created, a route
  transition from the wrong state or to a state not allowed from it);
* superseded_incarnation - an event of a superseded incarnation that was
  APPLIED. A claim or owner write by an older registration N of an agent,
  stored after its registration M > N, is the system's own race (the writer
  fenced itself while the write was in flight; the compare-and-set guards the
  session, not the agent): every fold flags it and applies nothing, so the
  checker counts it (`Report.flagged`) and keeps it out of its own state. It
  is a violation when a later event treats it as applied: an owner write
  (release, resource report, terminate, route transition) under its sequence
  as token, or a claim or orphaning naming it as previous token. A write by
  an incarnation that is no registration of the agent at all is a violation
  at once;
* claim_for_unavailable_agent - a claim for an agent that is not registered,
  not in the session's pool, platform and region, or dead, gone or fenced at
  that point (none of these applies: every fold flags it), or drained then
  (applied). A claim for a dead, gone or fenced agent stored within `grace`
  of that status is the in-flight race of a reclaimer whose view is an event
  behind: counted, not a violation. An owner write by an owner dead, gone or
  fenced at the write is not applied either (counted, `final_owner_write`);
* stranded - a session still assigned, at the end of the history ("now"), to
  an owner that was lost (declared dead, gone, fenced, superseded, or silent:
  no beat of its incarnation for its ttl) longer than ttl + grace before;
* missing_event_id / missing_time - an event whose raw payload has no event
  id or no time (a decoder that fills defaults would make replays differ).

An event whose producer token may not write it (`ledger.authority`, the one
table of who may write what: pure data, no fold) is no violation: every fold flags it and applies
nothing, so the checker counts it (`Report.flagged`, unauthorized_producer)
and keeps it out of its own state - a forged goodbye must not make the
checker call a live owner's sessions stranded. Writes an agent may make as
a session's owner are judged by the token rules above, not by this one.

A take-over (a claim naming the current token) while the owner's current
incarnation is the one holding the session and it is alive is no violation
either: any agent can read the token, so every fold flags it (live_owner) and
applies nothing - the checker counts it and keeps the session with its owner.
It may take over from an owner gone, dead, fenced, draining, drained or
superseded. A later write by the would-be owner is then a stale_token.

An event that breaks a rule is not applied to the checker's own state where
the ledger does not apply it either (an overlapping claim, a stale write), so
one forged event is one violation, not a cascade. Messages that are not
events at all (not JSON, unknown type, wrong subject, a registration or session
whose pool, platform or region is no id) are counted, not judged: they are dead
letters, which `ledger doctor` reports.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import msgspec

from . import authority
from .ids import TOKEN_PATTERN

LEDGER = "LEDGER"
HEARTBEATS = "LEDGER_HB"

OVERLAPPING_OWNERSHIP = "overlapping_ownership"
STALE_TOKEN = "stale_token"
ILLEGAL_TRANSITION = "illegal_transition"
SUPERSEDED_INCARNATION = "superseded_incarnation"
CLAIM_FOR_UNAVAILABLE_AGENT = "claim_for_unavailable_agent"
STRANDED = "stranded"
MISSING_EVENT_ID = "missing_event_id"
MISSING_TIME = "missing_time"
UNAUTHORIZED_PRODUCER = "unauthorized_producer"
"""Counted in Report.flagged, never a violation (see the module's doc)."""
LIVE_OWNER = "live_owner"
"""A take-over of a session whose owner may keep it: counted in Report.flagged, never a violation (see the doc)."""
_LOST = ("dead", "gone", "fenced")
"""Statuses of an incarnation that never serves again: its claims and owner writes are not applied."""
_REPLACEABLE = (*_LOST, "draining", "drained")
"""Statuses of an owner whose sessions may be taken over by naming their token (or a superseded incarnation)."""
FINAL_OWNER_WRITE = "final_owner_write"
"""An owner write by an owner gone, dead or fenced at the write: not applied, counted in Report.flagged."""
KINDS = (OVERLAPPING_OWNERSHIP, STALE_TOKEN, ILLEGAL_TRANSITION, SUPERSEDED_INCARNATION, CLAIM_FOR_UNAVAILABLE_AGENT,
         STRANDED, MISSING_EVENT_ID, MISSING_TIME)

DEFAULT_GRACE = 10.0
"""Seconds beyond an owner's ttl that the consumers get to move its sessions (the monitor's default grace)."""
DEFAULT_TTL = 30.0

# The route state machine of the brief, written out again on purpose (tests compare it with the fold's).
ROUTE_MOVES: dict[str, frozenset[str]] = {
    "PENDING": frozenset({"STARTING", "TERMINATING"}),
    "STARTING": frozenset({"WARMING_UP", "FAILED_TO_START", "TERMINATING"}),
    "WARMING_UP": frozenset({"RUNNING", "TERMINATING"}),
    "RUNNING": frozenset({"RUNNING", "TERMINATING"}),
    "FAILED_TO_START": frozenset({"TERMINATING", "TERMINATED"}),
    "TERMINATING": frozenset({"TERMINATED"}),
    "TERMINATED": frozenset(),
}

_FAMILY_ENTITY = {"agent": "agent_id", "hb": "agent_id", "session": "session_id", "route": "route_id", "pool": "pool"}
_LOST_STATUSES = {"agent.declared_dead": "dead", "agent.goodbye": "gone", "agent.fenced": "fenced"}
_MAY_BECOME = {"dead": ("alive", "draining"), "gone": ("alive", "draining", "drained", "dead", "fenced"),
               "fenced": ("alive", "draining", "dead")}


# The fields each event type cannot do without (what a decoder must refuse an event for lacking), so that the
# checker never acts on a message that every reader of the log dead-letters. Unknown types are not events.
_S, _I = str, int
_REQUIRED: dict[str, dict[str, type]] = {
    "agent.registered": {"agent_id": _S, "instance_id": _S, "pool": _S},
    "agent.heartbeat": {"agent_id": _S, "instance_id": _S, "incarnation": _I, "beat": _I},
    "agent.draining": {"agent_id": _S, "incarnation": _I, "deadline": _S},
    "agent.drained": {"agent_id": _S, "incarnation": _I},
    "agent.goodbye": {"agent_id": _S, "instance_id": _S, "incarnation": _I},
    "agent.suspected": {"agent_id": _S, "incarnation": _I, "reason": _S},
    "agent.declared_dead": {"agent_id": _S, "incarnation": _I, "reason": _S},
    "agent.unreachable_reported": {"agent_id": _S},
    "agent.fenced": {"agent_id": _S, "incarnation": _I, "reason": _S, "fenced_at": _S},
    "agent.drain_requested": {"agent_id": _S, "incarnation": _I, "deadline": _S},
    "session.created": {"session_id": _S, "pool": _S},
    "session.claimed": {"session_id": _S, "agent_id": _S, "instance_id": _S, "incarnation": _I},
    "session.released": {"session_id": _S, "agent_id": _S, "incarnation": _I, "token": _I},
    "session.resource_reported": {"session_id": _S, "agent_id": _S, "incarnation": _I, "token": _I,
                                  "platform_resource_id": _S},
    "session.orphaned": {"session_id": _S, "reason": _S},
    "session.terminated": {"session_id": _S},
    "session.checkpointed": {"session_id": _S, "agent_id": _S, "incarnation": _I, "token": _I},
    "route.created": {"route_id": _S, "session_id": _S, "endpoint": _S},
    "route.transitioned": {"route_id": _S, "from_state": _S, "to_state": _S},
    "route.health_reported": {"route_id": _S, "healthy": bool, "checked_at": _S},
    "pool.breaker_tripped": {"pool": _S, "reason": _S},
    "pool.breaker_reset": {"pool": _S, "reason": _S},
}


_PLACED = ("agent.registered", "session.created")
"""Events whose pool, platform and region the placement rule compares: a reader dead-letters one that names them
other than as ids (platform and region may be left out: "default")."""
_TOKEN = re.compile(TOKEN_PATTERN)


class RawMessage(msgspec.Struct, frozen=True, gc=False):
    """One stored message as the server has it: no decoding, no defaults."""

    stream: str
    seq: int
    subject: str
    stored_ns: int
    data: bytes


class Violation(msgspec.Struct, frozen=True, kw_only=True):
    kind: str
    stream: str
    seq: int
    """The message that breaks the rule (for `stranded`: the claim that is left hanging)."""
    stored_ns: int
    subject: str
    entity: str
    detail: str
    related: tuple[int, ...] = ()
    """Other sequences of the story: the claim held, the registration that superseded, the death ..."""


class Report(msgspec.Struct, kw_only=True):
    violations: list[Violation]
    messages: dict[str, int]
    """Messages read per stream."""
    events: int
    """Messages judged as events (the rest are not events: dead letters)."""
    not_events: int
    now_ns: int
    """The time the stranded rule judged against: the newest stored time read (or the one given)."""
    flagged: dict[str, int] = msgspec.field(default_factory=dict)
    """Events the system itself writes in a race, not applied or soon repaired, that are no violation, by kind:
    in-flight writes of a superseded incarnation (superseded_incarnation), claims stored at most `grace` after
    the agent's death, goodbye or fence (claim_for_unavailable_agent), and events whose producer may not write
    them (unauthorized_producer: a forgery every fold flags, or a misconfigured writer), and take-overs of a
    session whose owner may keep it (live_owner: every fold flags it)."""

    @property
    def clean(self) -> bool:
        return not self.violations


# --- the checker's own small state ------------------------------------------------------------------------------


class _Incarnation(msgspec.Struct, kw_only=True):
    seq: int
    pool: str
    placement: str = ""
    """Where it registered: pool/platform/region."""
    ttl: float
    registered_ns: int
    status: str = "alive"
    status_seq: int = 0
    status_ns: int = 0


class _Session(msgspec.Struct, kw_only=True):
    pool: str
    placement: str = ""
    """Where it must be served: pool/platform/region."""
    created_seq: int
    status: str = "pending"
    owner: str | None = None
    incarnation: int | None = None
    token: int | None = None


class _Unapplied(msgspec.Struct, frozen=True, kw_only=True):
    """A claim of a superseded incarnation, in flight across its agent's next registration: never applied."""

    agent_id: str
    incarnation: int
    superseded_by: int


class _Route(msgspec.Struct, kw_only=True):
    session_id: str
    state: str = "PENDING"
    created_seq: int = 0


class _Breaker(msgspec.Struct, kw_only=True):
    open: bool = False
    since_ns: int = 0
    seq: int = 0


def _placement(d: dict[str, Any]) -> str:
    """pool/platform/region of a registration or a session's creation (platform and region default so)."""
    return "/".join((_str(d, "pool") or "", _str(d, "platform") or "default", _str(d, "region") or "default"))


def _str(d: dict[str, Any], key: str) -> str | None:
    v = d.get(key)
    return v if isinstance(v, str) else None


def _int(d: dict[str, Any], key: str) -> int | None:
    v = d.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _num(d: dict[str, Any], key: str, default: float) -> float:
    v = d.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default


def _is_time(v: object) -> bool:
    if not isinstance(v, str) or not v:
        return False
    try:
        datetime.fromisoformat(v)
    except ValueError:
        return False
    return True


def parse(msg: RawMessage) -> dict[str, Any] | None:
    """The payload as a plain dict when it is an event stored where it belongs; None when it is not an event."""
    try:
        payload = msgspec.json.decode(msg.data)
    except (msgspec.DecodeError, RecursionError, ValueError):
        return None
    if not isinstance(payload, dict):
        return None
    tag = payload.get("type")
    tokens = msg.subject.split(".")
    if not isinstance(tag, str) or "." not in tag or len(tokens) != 5 or tokens[0] != "ledger":
        return None
    family, verb = tag.split(".", 1)
    if tag == "agent.heartbeat":
        family = "hb"
    producer = payload.get("producer")
    entity = _FAMILY_ENTITY.get(family)
    required = _REQUIRED.get(tag)
    if entity is None or required is None or not isinstance(producer, dict) or not all(
            isinstance(producer.get(k), str) for k in ("id", "instance")):
        return None
    for key, kind in required.items():
        value = payload.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return None
    if tag in _PLACED and not all(isinstance(v := payload.get(k, "default"), str) and _TOKEN.match(v)
                                  for k in ("pool", "platform", "region")):
        return None  # a placement no reader can read (the checker took it as "default", and applied claims no
        # fold applies)
    # The codec refuses a payload stored on another subject: so does the checker (it is a dead letter).
    if tokens[1:] != [family, payload.get(entity), verb, producer.get("id")]:
        return None
    return payload


class Checker:
    """Feed it stored messages in stream order (`feed`), then `finish` for the report."""

    def __init__(self, *, grace: float = DEFAULT_GRACE, since_ns: int | None = None) -> None:
        self.grace = grace
        self.since_ns = since_ns
        self.violations: list[Violation] = []
        self.flagged: dict[str, int] = {}
        self.unapplied: dict[int, _Unapplied] = {}
        """Claims of superseded incarnations by sequence: a later write under one of them treats it as applied."""
        self.messages: dict[str, int] = {}
        self.events = 0
        self.not_events = 0
        self.last_ns = 0
        self.agents: dict[str, list[_Incarnation]] = {}
        self.sessions: dict[str, _Session] = {}
        self.routes: dict[str, _Route] = {}
        self.breakers: dict[str, _Breaker] = {}
        self.beats: dict[tuple[str, int], int] = {}
        """Newest stored time of a beat per (agent, incarnation): all the stranded rule needs of heartbeats."""
        self._msg: RawMessage | None = None
        self._entity = ""

    # --- reporting -----------------------------------------------------------------------------------------

    def _flag(self, kind: str, detail: str, *related: int | None) -> None:
        m = self._msg
        assert m is not None
        self._record(Violation(kind=kind, stream=m.stream, seq=m.seq, stored_ns=m.stored_ns, subject=m.subject,
                               entity=self._entity, detail=detail,
                               related=tuple(r for r in related if r is not None)))

    def _record(self, v: Violation) -> None:
        if self.since_ns is None or v.stored_ns >= self.since_ns:
            self.violations.append(v)

    def _count(self, kind: str) -> None:
        """An event flagged and not applied (or soon repaired) that is no violation: counted, as a fold counts it."""
        m = self._msg
        assert m is not None
        if self.since_ns is None or m.stored_ns >= self.since_ns:
            self.flagged[kind] = self.flagged.get(kind, 0) + 1

    # --- agents ----------------------------------------------------------------------------------------------

    def last_beat(self, agent_id: str, incarnation: int) -> int | None:
        return self.beats.get((agent_id, incarnation))

    def current(self, agent_id: str) -> _Incarnation | None:
        regs = self.agents.get(agent_id)
        return regs[-1] if regs else None

    def _agent_event(self, tag: str, e: dict[str, Any], m: RawMessage) -> None:
        agent_id = _str(e, "agent_id") or ""
        if tag == "agent.heartbeat":
            incarnation = _int(e, "incarnation")
            if incarnation is not None:
                key = (agent_id, incarnation)
                self.beats[key] = max(self.beats.get(key, 0), m.stored_ns)
            return
        if tag == "agent.registered":
            self.agents.setdefault(agent_id, []).append(_Incarnation(
                seq=m.seq, pool=_str(e, "pool") or "", placement=_placement(e), ttl=_num(e, "ttl", DEFAULT_TTL),
                registered_ns=m.stored_ns, status_seq=m.seq, status_ns=m.stored_ns))
            return
        cur = self.current(agent_id)
        # Events of an older incarnation change nothing (the folds flag them; they are not violations).
        if cur is None or _int(e, "incarnation") != cur.seq:
            return
        new = _LOST_STATUSES.get(tag)
        if tag == "agent.draining" and cur.status == "alive":
            new = "draining"
        elif tag == "agent.drained" and cur.status == "draining":
            new = "drained"
        if new in ("dead", "gone", "fenced") and cur.status not in _MAY_BECOME[new]:
            new = None
        if new is not None:
            cur.status, cur.status_seq, cur.status_ns = new, m.seq, m.stored_ns

    def _breaker_event(self, tag: str, e: dict[str, Any], m: RawMessage) -> None:
        b = self.breakers.setdefault(_str(e, "pool") or "", _Breaker())
        if tag == "pool.breaker_tripped" and not b.open:
            b.open, b.since_ns, b.seq = True, m.stored_ns, m.seq
        elif tag == "pool.breaker_reset" and b.open:
            b.open, b.since_ns, b.seq = False, m.stored_ns, m.seq

    # --- sessions --------------------------------------------------------------------------------------------

    def _incarnation_problem(self, e: dict[str, Any], what: str) -> bool:
        """Whether a claim or owner write is by an incarnation that is not the agent's current one (then it is not
        applied). An older registration of the agent is the in-flight race: counted, and a claim remembered so that
        a later event treating it as applied is caught. Anything else is a violation here and now."""
        agent_id, incarnation = _str(e, "agent_id") or "", _int(e, "incarnation")
        regs = self.agents.get(agent_id, [])
        if not regs:
            kind = CLAIM_FOR_UNAVAILABLE_AGENT if what == "claim" else SUPERSEDED_INCARNATION
            self._flag(kind, f"{what} by {agent_id}, which never registered")
            return True
        cur = regs[-1]
        if incarnation == cur.seq:
            return False
        later = next((regs[i + 1].seq for i, r in enumerate(regs[:-1]) if r.seq == incarnation), None)
        if later is None:
            self._flag(SUPERSEDED_INCARNATION, f"{what} by {agent_id} incarnation {incarnation}, which is no "
                                               f"registration of it; its current registration is #{cur.seq}", cur.seq)
            return True
        self._count(SUPERSEDED_INCARNATION)
        if what == "claim":
            assert self._msg is not None and incarnation is not None
            self.unapplied[self._msg.seq] = _Unapplied(agent_id=agent_id, incarnation=incarnation,
                                                       superseded_by=later)
        return True

    def _treats_as_applied(self, token: int | None, what: str) -> bool:
        """Flag an event that names an unapplied claim of a superseded incarnation as its token or previous token."""
        u = self.unapplied.get(token) if token is not None else None
        if u is None:
            return False
        self._flag(SUPERSEDED_INCARNATION, f"{what} under token {token}: the claim by {u.agent_id} incarnation "
                                           f"{u.incarnation}, superseded by registration #{u.superseded_by}, "
                                           f"acted on as if applied", token, u.superseded_by)
        return True

    def _session_event(self, tag: str, e: dict[str, Any], m: RawMessage) -> None:
        sid = _str(e, "session_id") or ""
        s = self.sessions.get(sid)
        if tag == "session.created":
            if s is not None:
                self._flag(ILLEGAL_TRANSITION, f"session {sid} created again (first at #{s.created_seq})",
                           s.created_seq)
            else:
                self.sessions[sid] = _Session(pool=_str(e, "pool") or "", placement=_placement(e),
                                              created_seq=m.seq)
            return
        if s is None:
            self._flag(ILLEGAL_TRANSITION, f"{tag} for session {sid}, which was never created")
            return
        if s.status == "terminated":
            self._flag(ILLEGAL_TRANSITION, f"{tag} after session {sid} was terminated")
            return
        if tag == "session.claimed":
            self._claim(s, e, m)
        elif tag in ("session.released", "session.resource_reported", "session.checkpointed"):
            if self._treats_as_applied(_int(e, "token"), tag) or self._incarnation_problem(e, tag):
                return
            token, agent_id = _int(e, "token"), _str(e, "agent_id")
            if (s.status != "assigned" or token != s.token or agent_id != s.owner
                    or _int(e, "incarnation") != s.incarnation):
                self._flag(STALE_TOKEN, f"{tag} by {agent_id} under token {token}; the session is {s.status}"
                                        f"{f' under token {s.token} of {s.owner}' if s.token else ''}", s.token)
                return
            cur = self.current(agent_id or "")
            if cur is not None and cur.status in _LOST:
                # Not applied (every fold flags it final_owner): the session stays with its lost owner, for a
                # take-over. A zombie's write, no violation: nothing takes it as applied.
                self._count(FINAL_OWNER_WRITE)
                return
            if tag == "session.released":
                s.status, s.owner, s.incarnation, s.token = "released", None, None, None
        elif tag == "session.orphaned":
            previous = _int(e, "previous_token")
            if self._treats_as_applied(previous, tag):
                return
            if s.status != "assigned":
                self._flag(ILLEGAL_TRANSITION, f"session.orphaned while the session is {s.status}")
            elif previous != s.token:
                self._flag(STALE_TOKEN, f"orphaned under token {previous}; the current claim is #{s.token}", s.token)
            else:
                s.status, s.owner, s.incarnation, s.token = "orphaned", None, None, None
        elif tag == "session.terminated":
            token = _int(e, "token")
            if self._treats_as_applied(token, tag):
                return
            if token is not None and token != s.token:
                self._flag(STALE_TOKEN, f"terminated under token {token}; the current claim is {s.token}", s.token)
            else:
                s.status, s.owner, s.incarnation, s.token = "terminated", None, None, None
        else:
            self._flag(ILLEGAL_TRANSITION, f"{tag} is not a session event")

    def _replaceable(self, s: _Session) -> bool:
        """Whether the log says the owner of the assigned session may be replaced (a take-over may apply)."""
        cur = self.current(s.owner or "")
        return cur is None or cur.seq != s.incarnation or cur.status in _REPLACEABLE

    def _claim(self, s: _Session, e: dict[str, Any], m: RawMessage) -> None:
        agent_id, previous = _str(e, "agent_id") or "", _int(e, "previous_token")
        if self._treats_as_applied(previous, "session.claimed") and s.status == "assigned":
            return  # not applied (it names no current token): one violation, not an overlap as well
        # (On a pending session the fold applies it whatever it names, so the checker does too.)
        if self._incarnation_problem(e, "claim"):
            return
        if s.status == "assigned" and previous != s.token:
            self._flag(OVERLAPPING_OWNERSHIP, f"claimed for {agent_id} while {s.owner} holds it under token "
                                              f"{s.token} (the claim names {previous})", s.token)
            return
        if s.status == "assigned" and not self._replaceable(s):
            self._count(LIVE_OWNER)  # naming the token proves nothing: the folds flag it, the owner keeps it
            return
        cur = self.current(agent_id)
        assert cur is not None
        # A claim for an agent that cannot run it still lands (the compare-and-set guards the session only).
        if cur.placement != s.placement:
            # Every fold flags it (and the SDK never writes one): not applied, so the session stays as it was.
            self._flag(CLAIM_FOR_UNAVAILABLE_AGENT, f"claim for {agent_id} of {cur.placement!r}; the session is in "
                                                    f"{s.placement!r}", cur.seq)
            return
        if cur.status in _LOST:
            # Not applied either (every fold flags it final_claimer): the session stays as it was, for the
            # reclaimer's next step. A claimer one event behind the monitor (or the agent's goodbye or fence) is
            # the in-flight race, counted; one long after is flagged.
            if m.stored_ns - cur.status_ns <= int(self.grace * 1e9):
                self._count(CLAIM_FOR_UNAVAILABLE_AGENT)
            else:
                self._flag(CLAIM_FOR_UNAVAILABLE_AGENT, f"claim for {agent_id}, which is {cur.status} (since "
                                                        f"#{cur.status_seq}, "
                                                        f"{(m.stored_ns - cur.status_ns) / 1e9:.1f}s before)",
                           cur.status_seq)
            return
        if cur.status not in ("alive", "draining"):  # drained: flagged, and taken as owned, as the folds take it
            self._flag(CLAIM_FOR_UNAVAILABLE_AGENT, f"claim for {agent_id}, which is {cur.status} (since "
                                                    f"#{cur.status_seq}, {(m.stored_ns - cur.status_ns) / 1e9:.1f}s "
                                                    f"before)", cur.status_seq)
        s.status, s.owner, s.incarnation, s.token = "assigned", agent_id, cur.seq, m.seq

    # --- routes ----------------------------------------------------------------------------------------------

    def _route_event(self, tag: str, e: dict[str, Any], m: RawMessage) -> None:
        rid = _str(e, "route_id") or ""
        r = self.routes.get(rid)
        if tag == "route.created":
            if r is not None:
                self._flag(ILLEGAL_TRANSITION, f"route {rid} created again (first at #{r.created_seq})", r.created_seq)
            else:
                self.routes[rid] = _Route(session_id=_str(e, "session_id") or "", created_seq=m.seq)
            return
        if tag != "route.transitioned":
            return  # health reports move no state
        if r is None:
            self._flag(ILLEGAL_TRANSITION, f"transition of route {rid}, which was never created")
            return
        token = _int(e, "token")
        if self._treats_as_applied(token, tag):
            return
        if token is not None:
            s = self.sessions.get(r.session_id)
            current = s.token if s is not None else None
            if token != current:
                self._flag(STALE_TOKEN, f"route transition under token {token}; session {r.session_id} is claimed "
                                        f"under {current}", current)
                return
        src, dst = _str(e, "from_state"), _str(e, "to_state")
        if src != r.state or dst not in ROUTE_MOVES.get(r.state, frozenset()):
            self._flag(ILLEGAL_TRANSITION, f"route transition {src} -> {dst} while the route is {r.state}")
            return
        r.state = dst

    # --- feeding ---------------------------------------------------------------------------------------------

    def feed(self, m: RawMessage) -> None:
        self.messages[m.stream] = self.messages.get(m.stream, 0) + 1
        self.last_ns = max(self.last_ns, m.stored_ns)
        e = parse(m)
        if e is None:
            self.not_events += 1
            return
        self.events += 1
        self._msg, tag = m, e["type"]
        family = "hb" if tag == "agent.heartbeat" else tag.split(".", 1)[0]
        self._entity = f"{family}:{e.get(_FAMILY_ENTITY[family])}"
        # Raw envelope: a decoder that fills a missing id or time would make two replays of the log differ.
        event_id = e.get("event_id")
        if not isinstance(event_id, str) or not event_id:
            self._flag(MISSING_EVENT_ID, f"{tag} without an event id")
            return
        if not _is_time(e.get("time")):
            self._flag(MISSING_TIME, f"{tag} without a valid time")
            return
        if self._unauthorized(tag, e):
            self._count(UNAUTHORIZED_PRODUCER)
            return
        if family in ("agent", "hb"):
            self._agent_event(tag, e, m)
        elif family == "session":
            self._session_event(tag, e, m)
        elif family == "route":
            self._route_event(tag, e, m)
        else:
            self._breaker_event(tag, e, m)

    def _unauthorized(self, tag: str, e: dict[str, Any]) -> bool:
        # An agent writing as an owner is left to the checker's own token rules (a zombie owner's write is a
        # stale_token violation here, whatever the folds call it): only the role and SELF are judged.
        return authority.writer_refusal(tag, e["producer"]["id"], subject_agent=_str(e, "agent_id"),
                                        owner_known=False) is not None

    def finish(self, now_ns: int | None = None) -> Report:
        now = self.last_ns if now_ns is None else now_ns
        for sid, s in self.sessions.items():
            if s.status == "assigned" and s.owner is not None and s.token is not None:
                self._stranded(sid, s, now)
        self.violations.sort(key=lambda v: (v.stream, v.seq, v.kind))
        return Report(violations=self.violations, messages=dict(self.messages), events=self.events,
                      not_events=self.not_events, now_ns=now, flagged=dict(sorted(self.flagged.items())))

    def held_by_lost_owners(self) -> list[str]:
        """Sessions assigned right now to a superseded, dead, gone or fenced incarnation (and not held on purpose
        by an open breaker): what the reclaimer still has to move. Stranded once that takes ttl + grace."""
        out = []
        for sid, s in self.sessions.items():
            regs = self.agents.get(s.owner or "", []) if s.status == "assigned" else []
            if not regs:
                continue
            cur = regs[-1]
            if cur.seq != s.incarnation or cur.status in ("gone", "fenced") or (
                    cur.status == "dead" and not self.breakers.get(cur.pool, _Breaker()).open):
                out.append(sid)
        return sorted(out)

    def _stranded(self, sid: str, s: _Session, now_ns: int) -> None:
        regs = self.agents.get(s.owner or "", [])
        mine = next((r for r in regs if r.seq == s.incarnation), None)
        if mine is None:
            return
        later = [r for r in regs if r.seq > mine.seq]
        held_by_breaker = False
        if later:
            lost_ns, why, related = later[0].registered_ns, f"superseded by registration #{later[0].seq}", later[0].seq
        elif mine.status in ("dead", "gone", "fenced"):
            lost_ns, why, related = mine.status_ns, f"{mine.status} since #{mine.status_seq}", mine.status_seq
            held_by_breaker = mine.status == "dead"
        else:
            beat = self.last_beat(s.owner or "", mine.seq)
            last = beat if beat is not None else mine.registered_ns
            lost_ns = last + int(mine.ttl * 1e9)
            why, related = f"silent: no beat of incarnation #{mine.seq} for its ttl {mine.ttl:g}s", mine.seq
            held_by_breaker = True
        if held_by_breaker:
            # While the pool's breaker is open, sessions of dead agents are held on purpose; the clock starts anew
            # when it resets.
            b = self.breakers.get(mine.pool)
            if b is not None and b.open:
                return
            if b is not None and b.since_ns > lost_ns:
                lost_ns = b.since_ns
        limit_ns = int((mine.ttl + self.grace) * 1e9)
        if now_ns - lost_ns > limit_ns:
            self._record(Violation(
                kind=STRANDED, stream=LEDGER, seq=s.token or 0, stored_ns=lost_ns, subject="",
                entity=f"session:{sid}", related=(related,),
                detail=f"assigned to {s.owner} (token {s.token}), {why}, for {(now_ns - lost_ns) / 1e9:.1f}s "
                       f"> ttl {mine.ttl:g}s + grace {self.grace:g}s"))


def fold(messages: Iterable[RawMessage], *, grace: float = DEFAULT_GRACE, since_ns: int | None = None) -> Checker:
    """A checker fed a whole history: LEDGER messages in sequence order, heartbeats in any order.

    Heartbeats only tell the stranded rule each incarnation's newest beat, so where they fall between the
    lifecycle events does not matter (a reader may feed each stream as it comes, batch by batch).
    """
    ledger: list[RawMessage] = []
    checker = Checker(grace=grace, since_ns=since_ns)
    for m in messages:
        if m.stream == HEARTBEATS:
            checker.feed(m)
        else:
            ledger.append(m)
    ledger.sort(key=lambda m: m.seq)
    for m in ledger:
        checker.feed(m)
    return checker


def check(messages: Iterable[RawMessage], *, grace: float = DEFAULT_GRACE, now_ns: int | None = None,
          since_ns: int | None = None) -> Report:
    """Every violation in a history (see `fold`); "now" defaults to the newest stored time read."""
    return fold(messages, grace=grace, since_ns=since_ns).finish(now_ns)


def to_utc(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, tz=UTC)
