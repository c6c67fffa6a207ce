"""LedgerState: the whole log folded in memory - pure, deterministic, serialisable.

    state = LedgerState()
    for item in batch:                  # Recorded | Unreadable, from either stream
        change = state.apply(item)      # None when the item was already applied
        if change and change.anomaly:
            ...                         # flagged, not applied

Each stream has its own fold and its own position: LEDGER (agents, sessions,
routes, via the per-entity rules of `ledger.lifecycle`) and LEDGER_HB (the
newest beat per agent, `projections.beats`). The two never read each other, so
they may be consumed independently and still give the same state.

An item at or below its stream's position is ignored, which makes redelivery
harmless. Nothing here does I/O: the SQLite projector, time travel and the
long-running consumers of `consumers/` all keep this same state.

Retirement: the fold lets go of an entity that can no longer change
--------------------------------------------------------------------
Terminated sessions and routes, and agents gone, dead or fenced, would
otherwise stay in memory (and in every snapshot, and in every consumer's scan)
forever. An entity is *final* when `final_at` says so - a session
`terminated`; a route `TERMINATED` or `FAILED_TO_START`; an agent `gone`,
`dead` or `fenced` - and it is *retired* (removed from its table) once the
stream's clock is `retain` seconds past the event that made it final. Its last
state stays in the projection's SQLite row, and its history in the log.

* Determinism. The rule reads the log alone: the clock is `stored_ns`, the
  highest time the server stored any item of the stream with (a high-water
  mark, so a server clock stepping back never un-retires anything), and the
  moment an entity became final is in its own state (`final_at`). After every
  applied item, every entity final at least `retain` before the clock is gone.
  That is a property of the state alone, so folding in one go, in batches,
  from a snapshot, or from the projection's rows (`settle`) all agree.
* Cost. Each entity that becomes final is pushed once on a heap keyed by when
  it falls due; an apply pops only what is due (O(log n) each, amortised over
  the pushes), never scans. An entry whose entity moved on (an agent that
  registered again, a dead agent that then said goodbye) is dropped when it
  comes up: the entity is retired only if it is still final as of that entry.
  The heap is not serialised: it is rebuilt from the tables on decode.
* Settings. `retain` (DEFAULT_RETAIN: ten minutes of log time) is a field of
  the state, so a snapshot records what it was made with, and every process
  folding the same log with the same setting agrees. The projector sets it
  from ProjectionSettings.retain (LEDGER_PROJECTION_RETAIN); a state built
  without one (an agent's own fold, time travel from zero) uses the default.
* Reporting. A retirement rides on the Change of the item after which it
  happened (`Change.retired`, with the entity's last state), so whatever keeps
  rows beside the state (the projector's Uncommitted) writes the final row of
  an entity retired before its batch committed.
* Events after retirement. The fold no longer knows the entity, so an event
  naming it is judged as for an id never created: a session or route event is
  flagged unknown_entity (it would have been after_final, since only final
  entities retire), an agent's event "for an unregistered agent", a claim or
  owner write by a retired agent's incarnation unknown_entity, and a take-over
  from a retired owner applies as from an unknown one (owner_unknown). A
  SessionCreated or RouteCreated reusing a retired id starts a new entity here.
  The SDK's writer never writes one (its creations expect no earlier creation
  on the subject) and decides every claim from the entity's whole history in
  the store (compare-and-set), which still says terminated: a retired id gains
  no owner through it, so the at-most-one-owner rule stands; only a raw,
  forged publish can re-create it, and that shows in this fold and its row.
  A route that failed to start is final here as for the watchdog; an
  operator's later move to TERMINATED, once it is retired, is flagged and its
  row stays FAILED_TO_START (the log has the move).
* Time travel folds with the same rule, so a snapshot plus the rest still
  equals a replay from zero; a view of a past moment lists what was retired
  before it as it ended, as the version rows do (`projections.timetravel`
  puts those back into the answer).
* Beats. The heartbeat fold (`HeartbeatState`) cannot see whether an agent is
  gone, so `LedgerState`, which holds both, lets go of a beat once it is of the
  past: the lifecycle fold has read the registration the beat names (its
  incarnation) and no longer knows the agent (retired, or never registered
  there), or knows it from a later life (retired, then registered again:
  `LifecycleState.lives`). Once of the past, a slot stays so, whichever stream
  moves first; and only the slots no later beat can matter for go
  (`beats.trimmed`), so the result does not depend on how the two streams
  were interleaved. What no view reads goes (a view reads the beat of the
  agent's registered incarnation, or one above it); a beat arriving for such
  an agent is not kept. The projection's rows are not trimmed: the projector
  folds each beat onto the agent's stored record (`beats.merged`); the record
  in memory cannot tell whether it lost slots before (a record dropped, then
  begun again by a new life), so `Change.before` of a beat is not that row.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, NamedTuple, TypeVar, overload

import msgspec

from ledger.codec import Recorded, Unreadable, from_ns, reason_code, to_ns
from ledger.events import AgentEvent, PoolEvent, RouteEvent, SessionEvent
from ledger.lifecycle import (
    FAILED_TO_START,
    FINAL_AGENT_STATUSES,
    ILLEGAL_TRANSITION,
    S_TERMINATED,
    TERMINATED,
    AgentState,
    Anomaly,
    PoolState,
    RouteState,
    SessionState,
    evolve_agent,
    evolve_pool,
    evolve_route,
    evolve_session,
)
from ledger.subjects import HEARTBEAT_STREAM, LEDGER_STREAM

from .beats import KEEP, Beat, evolve_beat, of_incarnation, trimmed

AGENT, SESSION, ROUTE, POOL, HEARTBEAT, DEAD_LETTER = "agent", "session", "route", "pool", "heartbeat", "dead_letter"
"""What a Change touched: an entity kind, the heartbeat of an agent, or a dead letter."""


class AnomalyRecord(msgspec.Struct, frozen=True, kw_only=True):
    """An event that reached the log but was flagged and not applied, with where and why."""

    stream: str
    seq: int
    stored_at: datetime
    entity_kind: str
    entity_id: str
    event_type: str
    producer: str
    kind: str
    detail: str


DEFAULT_RETAIN = 600.0
"""Seconds of log time a final entity stays in the fold before it is retired (see the module's docstring)."""

FINAL_ROUTE_STATES = frozenset({TERMINATED, FAILED_TO_START})


def final_at(kind: str, state: Any) -> tuple[int, int] | None:
    """(sequence, stored time in ns) of the event that made the entity final, or None while it may still change.

    The one rule of which entities retire, and from when: the fold, `settle` and the tests all ask it.
    """
    if kind == SESSION:
        return (state.last_seq, to_ns(state.status_since)) if state.status == S_TERMINATED else None
    if kind == ROUTE:
        return (state.state_seq, to_ns(state.state_since)) if state.state in FINAL_ROUTE_STATES else None
    if kind == AGENT:
        return (state.status_seq, to_ns(state.status_since)) if state.status in FINAL_AGENT_STATUSES else None
    return None


class Retired(NamedTuple):
    """An entity the fold let go of, with its last state (what its row keeps)."""

    kind: str
    id: str
    final: Any


class Change(NamedTuple):
    """What one applied item did: the entity it concerned and, if it was refused, why."""

    kind: str
    """agent, session, route, heartbeat (the agent's beat) or dead_letter."""
    id: str
    """The entity id (the agent id for a heartbeat), or the reason code of a dead letter."""
    before: Any
    """The entity's state before the item (None if it did not exist); the new one is in the state."""
    anomaly: AnomalyRecord | None
    retired: tuple[Retired, ...] = ()
    """Entities retired right after this item (the clock it brought made them due)."""

    @property
    def applied(self) -> bool:
        return self.anomaly is None and self.kind != DEAD_LETTER


S = TypeVar("S")

_CODE = re.compile(r"^[a-z][a-z0-9-]{0,40}$")


def dead_letter_code(reason: str) -> str:
    """The short code of an Unreadable's reason, usable as a subject token (`other` if it has none)."""
    code = reason_code(reason)
    return code if _CODE.match(code) else "other"


def _flag(item: Recorded, kind: str, entity_id: str, anomaly: Anomaly) -> AnomalyRecord:
    e = item.event
    return AnomalyRecord(stream=item.stream, seq=item.seq, stored_at=from_ns(item.timestamp_ns), entity_kind=kind,
                         entity_id=entity_id, event_type=e.type_tag(), producer=e.producer.id, kind=anomaly.kind,
                         detail=anomaly.detail)


class LifecycleState(msgspec.Struct, kw_only=True, dict=True):
    """The LEDGER stream folded: every agent, session and route not yet retired, as of `seq`."""

    seq: int = 0
    """The last stream sequence applied."""
    stored_ns: int = 0
    """The latest time the server stored a message of the stream with, up to `seq` (the retirement clock)."""
    agents: dict[str, AgentState] = {}
    sessions: dict[str, SessionState] = {}
    routes: dict[str, RouteState] = {}
    pools: dict[str, PoolState] = {}
    """Pools with a breaker history (a pool never tripped has no entry: its breaker is closed)."""
    dead_letters: dict[str, int] = {}
    """Reason code -> messages of this stream that were not events."""
    anomalies: int = 0
    retain: float = DEFAULT_RETAIN
    """Seconds of log time a final entity is kept before it is retired (part of the state: snapshots record it)."""
    lives: dict[str, int] = {}
    """Agent id -> the incarnation that made it known to this fold (its first registration, or the first after it
    was retired): a beat of an earlier incarnation is of a life the fold let go of (`LedgerState`'s beats)."""

    def __post_init__(self) -> None:  # also after decoding: the heap is rebuilt, never serialised
        self._index()

    def _index(self) -> None:
        """The retirement heap, from the tables: one (due ns, final seq, kind, id) per final entity."""
        retain_ns = round(self.retain * 1e9)
        heap = []
        for kind, table in ((AGENT, self.agents), (SESSION, self.sessions), (ROUTE, self.routes)):
            for key, entity in table.items():
                final = final_at(kind, entity)
                if final is not None:
                    heap.append((final[1] + retain_ns, final[0], kind, key))
        heapq.heapify(heap)
        self._retiring: list[tuple[int, int, str, str]] = heap
        self._retain_ns = retain_ns

    def settle(self, retain: float | None = None) -> int:
        """Take `retain` (if given) and retire what is due: for a state whose tables were filled from rows.

        The projection's rows keep retired entities too; loaded back, they leave exactly as the fold let go of
        them, since the rule is a function of each entity's state and the clock. Returns how many retired.
        """
        if retain is not None:
            self.retain = retain
        self._index()
        return len(self._retire())

    def _retire(self) -> tuple[Retired, ...]:
        heap = self._retiring
        clock = self.stored_ns
        out: list[Retired] = []
        while heap and heap[0][0] <= clock:
            _, seq, kind, key = heapq.heappop(heap)
            table: dict[str, Any] = self.sessions if kind == SESSION else self.routes if kind == ROUTE else self.agents
            entity = table.get(key)
            if entity is None:
                continue
            final = final_at(kind, entity)
            if final is None or final[0] != seq:  # it moved on since (registered again, died then left)
                continue
            del table[key]
            if kind == AGENT:
                self.lives.pop(key, None)
            out.append(Retired(kind, key, entity))
        return tuple(out)

    def incarnation_at(self, agent_id: str, seq: int) -> int | None:
        # Items are applied in log order, so "as of seq" is simply "now".
        agent = self.agents.get(agent_id)
        return agent.incarnation if agent is not None else None

    def session_at(self, session_id: str, seq: int) -> SessionState | None:
        return self.sessions.get(session_id)

    def agent_at(self, agent_id: str, seq: int) -> AgentState | None:
        return self.agents.get(agent_id)

    def apply(self, item: Recorded | Unreadable) -> Change | None:
        seq = item.seq
        if seq <= self.seq:
            return None
        self.seq = seq
        if item.timestamp_ns > self.stored_ns:
            self.stored_ns = item.timestamp_ns
        change = self._apply(item)
        if self._retiring and self._retiring[0][0] <= self.stored_ns:
            retired = self._retire()
            if retired:
                return change._replace(retired=retired)
        return change

    def _apply(self, item: Recorded | Unreadable) -> Change:
        if isinstance(item, Unreadable):
            code = dead_letter_code(item.reason)
            self.dead_letters[code] = self.dead_letters.get(code, 0) + 1
            return Change(DEAD_LETTER, code, None, None)
        event = item.event
        match event:  # each family's fold, on its own table
            case SessionEvent(session_id=key):
                return self._settle(item, SESSION, self.sessions, key,
                                    evolve_session(self.sessions.get(key), item, self.incarnation_at, self.agent_at))
            case RouteEvent(route_id=key):
                return self._settle(item, ROUTE, self.routes, key,
                                    evolve_route(self.routes.get(key), item, self.session_at))
            case AgentEvent(agent_id=key) if event.family == AGENT:  # not a heartbeat (an AgentEvent of its own family)
                return self._settle(item, AGENT, self.agents, key, evolve_agent(self.agents.get(key), item))
            case PoolEvent(pool=key):
                return self._settle(item, POOL, self.pools, key, evolve_pool(self.pools.get(key), item))
        # A heartbeat payload on a LEDGER subject fails decoding first; this is defence in depth.
        problem = Anomaly(ILLEGAL_TRANSITION, f"{event.type_tag()} does not belong in the {item.stream} stream")
        return self._flagged(item, AGENT, event.entity_id, None, problem)

    def _settle(self, item: Recorded, kind: str, table: dict[str, S], key: str,
                evolved: tuple[S | None, Anomaly | None]) -> Change:
        """Keep what the fold made of the entity, or flag the event it refused."""
        after, anomaly = evolved
        before = table.get(key)
        if anomaly is not None:
            return self._flagged(item, kind, key, before, anomaly)
        assert after is not None, "a fold returns a state for every event it accepts"
        table[key] = after
        if kind == AGENT and before is None:
            self.lives[key] = after.incarnation  # type: ignore[attr-defined]
        if kind != POOL:
            final = final_at(kind, after)
            if final is not None and (before is None or final_at(kind, before) != final):
                heapq.heappush(self._retiring, (final[1] + self._retain_ns, final[0], kind, key))
        return Change(kind, key, before, None)

    def _flagged(self, item: Recorded, kind: str, key: str, before: object, anomaly: Anomaly) -> Change:
        self.anomalies += 1
        return Change(kind, key, before, _flag(item, kind, key, anomaly))


class HeartbeatState(msgspec.Struct, kw_only=True):
    """The LEDGER_HB stream folded: the newest beat per agent, as of `seq`."""

    seq: int = 0
    stored_ns: int = 0
    beats: dict[str, Beat] = {}
    dead_letters: dict[str, int] = {}
    anomalies: int = 0

    def apply(self, item: Recorded | Unreadable) -> Change | None:
        seq = item.seq
        if seq <= self.seq:
            return None
        self.seq = seq
        self.stored_ns = item.timestamp_ns
        if isinstance(item, Unreadable):
            code = dead_letter_code(item.reason)
            self.dead_letters[code] = self.dead_letters.get(code, 0) + 1
            return Change(DEAD_LETTER, code, None, None)
        key = item.event.entity_id
        before = self.beats.get(key)
        after, anomaly = evolve_beat(before, item)
        if anomaly is None:
            if after is not before and after is not None:  # the fold keeps a beat for every beat it accepts
                self.beats[key] = after
            return Change(HEARTBEAT, key, before, None)
        self.anomalies += 1
        return Change(HEARTBEAT, key, before, _flag(item, AGENT, key, anomaly))


class LedgerState(msgspec.Struct, kw_only=True, dict=True):
    """Both streams folded; `apply` routes each item to its stream's fold, and lets go of the beats of agents the
    lifecycle fold let go of (see the module's docstring: beats of the past)."""

    ledger: LifecycleState = msgspec.field(default_factory=LifecycleState)
    heartbeats: HeartbeatState = msgspec.field(default_factory=HeartbeatState)

    def __post_init__(self) -> None:  # also after decoding, and for a state put together from two snapshots
        self.trim_beats()

    def trim_beats(self) -> None:
        """Trim every record by what the lifecycle fold knows (records filled from the projection's rows, which are
        the heartbeat stream's fold; `settle` does it too), and rebuild the heap of slots whose registration the
        lifecycle fold has not reached."""
        for agent_id in list(self.heartbeats.beats):
            self._trim(agent_id)
        self._index_pending()

    def _index_pending(self) -> None:
        seq = self.ledger.seq
        self._pending: list[tuple[int, str]] = [(b.incarnation, agent_id)
                                                for agent_id, beat in self.heartbeats.beats.items()
                                                for b in beat.slots() if b.incarnation > seq]
        heapq.heapify(self._pending)

    def settle(self, retain: float | None = None) -> int:
        """`LifecycleState.settle`, then the beats' trim: for a state whose tables were filled from the rows."""
        retired = self.ledger.settle(retain)
        self.trim_beats()
        return retired

    def _gone(self, agent_id: str) -> Callable[[Beat], bool]:
        """Whether a slot of the agent is of its past: the lifecycle fold has read the registration it names
        (incarnation = that sequence) and no longer knows the agent, or knows it from a later life (it was retired
        and registered again). Once true, true for good, as the fold only moves on: trimming stays deterministic."""
        ledger = self.ledger
        agent = ledger.agents.get(agent_id)
        seq, life = ledger.seq, ledger.lives.get(agent_id, 0) if agent is not None else 0
        if agent is None:
            return lambda b: b.incarnation <= seq
        return lambda b: b.incarnation < life  # (< life <= seq)

    def _trim(self, agent_id: str) -> Beat | None:
        beats = self.heartbeats.beats
        beat = beats.get(agent_id)
        if beat is None:
            return None
        kept = trimmed(beat, self._gone(agent_id))
        if kept is None:
            del beats[agent_id]
        elif kept is not beat:
            beats[agent_id] = kept
        return kept

    def apply(self, item: Recorded | Unreadable) -> Change | None:
        """Fold one stored item; None if its stream's position is already past it."""
        if item.stream == HEARTBEAT_STREAM:
            hb = self.heartbeats
            change = hb.apply(item)
            if change is None or change.kind != HEARTBEAT or change.anomaly is not None:
                return change
            beat = hb.beats.get(change.id)
            agent = self.ledger.agents.get(change.id)
            if beat is not None and (agent is None or beat.earlier or beat.incarnation < self.ledger.lives.get(
                    change.id, 0)):  # else its one slot is the registered life's: nothing to trim (most beats)
                beat = self._trim(change.id)
            if beat is not None and item.event.incarnation > self.ledger.seq:  # type: ignore[union-attr]
                heapq.heappush(self._pending, (item.event.incarnation, change.id))  # type: ignore[union-attr]
                if len(self._pending) > 64 and len(self._pending) > 2 * KEEP * len(hb.beats):
                    self._index_pending()  # forged incarnations: the heap stays within a constant of the slots
            return change
        change = self.ledger.apply(item)
        if change is not None and self.heartbeats.beats:
            if change.kind == AGENT and change.anomaly is None:
                self._trim(change.id)
            for gone in change.retired:
                if gone.kind == AGENT:
                    self._trim(gone.id)
            pending, seq = self._pending, self.ledger.seq
            while pending and pending[0][0] <= seq:
                self._trim(heapq.heappop(pending)[1])
        return change

    def apply_all(self, items: Iterable[Recorded | Unreadable]) -> list[Change]:
        apply = self.apply
        return [c for c in map(apply, items) if c is not None]

    def position(self, stream: str) -> int:
        return self.heartbeats.seq if stream == HEARTBEAT_STREAM else self.ledger.seq

    def part(self, stream: str) -> LifecycleState | HeartbeatState:
        return self.heartbeats if stream == HEARTBEAT_STREAM else self.ledger

    @property
    def agents(self) -> dict[str, AgentState]:
        return self.ledger.agents

    @property
    def sessions(self) -> dict[str, SessionState]:
        return self.ledger.sessions

    @property
    def routes(self) -> dict[str, RouteState]:
        return self.ledger.routes

    @property
    def beats(self) -> dict[str, Beat]:
        return self.heartbeats.beats

    def current_beat(self, agent_id: str) -> Beat | None:
        """The newest beat of the agent's registered incarnation (a beat of any other one never counts)."""
        agent = self.ledger.agents.get(agent_id)
        if agent is None:
            return None
        return of_incarnation(self.heartbeats.beats.get(agent_id), agent.incarnation)

    def unregistered_beat(self, agent_id: str) -> Beat | None:
        """The agent's kept beat of an incarnation that has no registration behind it (forged), or None.

        A beat names the sequence of its registration, which was stored before the beat. So once this state
        has read the lifecycle stream past that sequence, or up to a message stored after the beat, a
        registration it has not seen cannot exist: a higher incarnation than the agent's is then an anomaly.
        """
        agent = self.ledger.agents.get(agent_id)
        beat = self.heartbeats.beats.get(agent_id)
        if agent is None or beat is None or beat.incarnation <= agent.incarnation:
            return None
        if beat.incarnation <= self.ledger.seq or self.ledger.stored_ns >= beat.stored_ns:
            return beat
        return None


STREAMS = (LEDGER_STREAM, HEARTBEAT_STREAM)

_encoder = msgspec.msgpack.Encoder()
_decoders: dict[type[Any], msgspec.msgpack.Decoder[Any]] = {
    LedgerState: msgspec.msgpack.Decoder(LedgerState),
    LifecycleState: msgspec.msgpack.Decoder(LifecycleState),
    HeartbeatState: msgspec.msgpack.Decoder(HeartbeatState),
}

Part = TypeVar("Part", LedgerState, LifecycleState, HeartbeatState)
"""What `encode` writes and `decode` reads back: both streams' state, or one of them."""


def encode(state: LedgerState | LifecycleState | HeartbeatState) -> bytes:
    """The state as msgpack bytes (snapshots, hand-over between processes)."""
    return _encoder.encode(state)


@overload
def decode(data: bytes) -> LedgerState: ...
@overload
def decode(data: bytes, kind: type[Part]) -> Part: ...
def decode(data: bytes, kind: type[Any] = LedgerState) -> Any:
    return _decoders[kind].decode(data)
