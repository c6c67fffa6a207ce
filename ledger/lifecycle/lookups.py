"""Folding one entity's history, and the lookups a fold of one history needs from the others, as of a position.

A whole-log fold has every entity at hand; a caller holding a few histories
(the SDK deciding what it may write, time travel, `ledger history`) builds
`incarnation_at`, `agent_at` and `session_at` from them with these, so its
fold applies exactly the checks the whole-log fold applies.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any

from ledger import events as ev
from ledger.codec import Recorded

from .agents import AgentAt, AgentState, IncarnationAt, evolve_agent
from .anomalies import Anomaly, Evolved
from .sessions import RegisteredAt, SessionAt, SessionState, evolve_session


def fold(evolve: Callable[..., Evolved[Any]], records: Iterable[Recorded],
         *lookups: Any) -> tuple[Any, list[tuple[int, Anomaly]]]:
    """Fold one entity's records with its evolve function; returns (state, [(seq, anomaly), ...])."""
    state = None
    anomalies = []
    for rec in records:
        state, anomaly = evolve(state, rec, *lookups)
        if anomaly is not None:
            anomalies.append((rec.seq, anomaly))
    return state, anomalies


_EVER = 2**63 - 1
"""`through` of a history read whole, as of now."""


class AgentTimeline:
    """One agent's states along its own history (its LEDGER events, oldest first), folded with `evolve_agent` as
    the whole-log fold folds them. A reader that reads more of the history later `extend`s it with what follows:
    only that is folded (and read)."""

    __slots__ = ("_seqs", "_states", "last_seq", "through")

    def __init__(self, records: Iterable[Recorded] = (), through: int | None = None) -> None:
        self._seqs: list[int] = []
        self._states: list[AgentState | None] = []
        self.last_seq = 0
        """The newest sequence folded (0: none)."""
        self.through = 0
        """Every event of the agent up to this sequence is folded in: `at` answers up to it (a read from a replica
        holding at least sequence N, returning events up to L, covers max(N, L))."""
        self.extend(records, through)

    def extend(self, records: Iterable[Recorded], through: int | None = None) -> None:
        """Fold what follows of the history; `through`: what the read covers (None: all there is)."""
        state = self._states[-1] if self._states else None
        for rec in records:
            if rec.seq <= self.last_seq:
                continue  # read already
            self.last_seq = rec.seq
            after, _ = evolve_agent(state, rec)
            if after is not state:  # kept only where it changes: a flagged event leaves no entry
                state = after
                self._seqs.append(rec.seq)
                self._states.append(state)
        self.through = max(self.through, self.last_seq, _EVER if through is None else through)

    def at(self, seq: int) -> AgentState | None:
        """The agent's state just before `seq` (None before its first registration)."""
        i = bisect_left(self._seqs, seq)
        return self._states[i - 1] if i else None


def agents_lookup(histories: dict[str, list[Recorded]]) -> AgentAt:
    """agent_at from each agent's own history (its LEDGER events, oldest first), folded with `evolve_agent` - as
    the whole-log fold has them, since an agent's state depends on its own events alone."""
    timelines = {agent_id: AgentTimeline(records) for agent_id, records in histories.items()}

    def agent_at(agent_id: str, seq: int) -> AgentState | None:
        timeline = timelines.get(agent_id)
        return timeline.at(seq) if timeline is not None else None

    return agent_at


def as_registered(records: Iterable[Recorded]) -> list[AgentState]:
    """The states its registrations give an agent (ascending), from the records on its own registration subject:
    those the folds take (its own producer token)."""
    out: list[AgentState] = []
    for rec in records:
        if isinstance(rec.event, ev.AgentRegistered):
            state, problem = evolve_agent(None, rec)
            if problem is None and state is not None:
                out.append(state)
    return sorted(out, key=lambda s: s.incarnation)


def _registered_before(registrations: list[AgentState], seq: int) -> AgentState | None:
    i = bisect_left([r.incarnation for r in registrations], seq)
    return registrations[i - 1] if i else None


def registered_lookup(registrations: dict[str, list[AgentState]]) -> RegisteredAt:
    """registered_at from each agent's registrations as registered (ascending, `as_registered`)."""

    def registered_at(agent_id: str, seq: int) -> AgentState | None:
        return _registered_before(registrations.get(agent_id, []), seq)

    return registered_at


def registrations_lookup(registrations: dict[str, list[int]]) -> IncarnationAt:
    """incarnation_at from each agent's registration sequences (ascending)."""

    def incarnation_at(agent_id: str, seq: int) -> int | None:
        seqs = registrations.get(agent_id)
        if not seqs:
            return None
        i = bisect_left(seqs, seq)
        return seqs[i - 1] if i else None

    return incarnation_at


REGISTRATIONS, HISTORY = "registrations", "history"
"""What a `SessionFold` asks to read of an agent: its registrations, or its whole history."""


class _Unread(Exception):
    """A lookup was asked about an agent whose registrations or history the fold has not been given yet."""

    def __init__(self, what: str, agent_id: str) -> None:
        super().__init__(f"{what} of {agent_id} not read")
        self.need = (what, agent_id)


class SessionFold:
    """One session's history folded with lookups read only as the fold asks for them, as the whole-log fold has
    them at each event.

        folded = SessionFold(records)
        while (need := folded.advance()) is not None:
            what, agent_id = need          # REGISTRATIONS or HISTORY of that agent
            folded.learn(what, agent_id, records_read)
        folded.state, folded.anomalies

    The rule asks a lookup only where the answer can change the outcome (`sessions._claim_problem`): a claim
    flagged whatever its claimer (overlapping, a take-over of a live owner) reads nothing of the claimer, and a
    take-over reads only the history of the session's owner at that point - an agent that really owned it. So
    claims and writes for made-up agents, however many, cost a reader no read; what it reads is bounded by the
    claims that apply. The fold resumes where it stopped: the records folded so far asked nothing of the agent
    just read (they would have stopped there), so they stand.
    """

    def __init__(self, records: Iterable[Recorded], state: SessionState | None = None,
                 registrations: MutableMapping[str, list[AgentState]] | None = None,
                 timelines: MutableMapping[str, AgentTimeline] | None = None) -> None:
        """`state`: the session's state before `records`; `registrations` (agent id -> `as_registered`) and
        `timelines`: what the caller knows already (a long-lived reader's caches), learnt into in place."""
        self.records = list(records)
        self.registrations = registrations if registrations is not None else {}
        self.timelines = timelines if timelines is not None else {}
        self.state = state
        self.anomalies: list[tuple[int, Anomaly]] = []
        self._next = 0

    def registered_at(self, agent_id: str, seq: int) -> AgentState | None:
        registrations = self.registrations.get(agent_id)
        if registrations is None:
            raise _Unread(REGISTRATIONS, agent_id)
        return _registered_before(registrations, seq)

    def incarnation_at(self, agent_id: str, seq: int) -> int | None:
        registered = self.registered_at(agent_id, seq)
        return registered.incarnation if registered is not None else None

    def agent_at(self, agent_id: str, seq: int) -> AgentState | None:
        timeline = self.timelines.get(agent_id)
        if timeline is None or timeline.through < seq:
            raise _Unread(HISTORY, agent_id)
        return timeline.at(seq)

    def lookups(self) -> tuple[IncarnationAt, AgentAt, RegisteredAt]:
        """(incarnation_at, agent_at, registered_at), as `evolve_session` takes them: once `advance` returned None,
        what folds these records again (`claims_lookup`, `ledger history`) asks exactly what it asked."""
        return self.incarnation_at, self.agent_at, self.registered_at

    def advance(self) -> tuple[str, str] | None:
        """Fold on as far as what was learnt allows: None once every record is folded, else what to read next
        (REGISTRATIONS or HISTORY, agent id)."""
        lookups = self.lookups()
        while self._next < len(self.records):
            rec = self.records[self._next]
            try:
                state, anomaly = evolve_session(self.state, rec, *lookups)
            except _Unread as unread:
                return unread.need
            self.state = state
            if anomaly is not None:
                self.anomalies.append((rec.seq, anomaly))
            self._next += 1
        return None

    def next_claimers(self, limit: int) -> list[str]:
        """The agents named by claims from the next record on whose registrations are not known yet, first named
        first (at most `limit`): what a reader may ask about in one request (`EventStore.session_fold`)."""
        found: dict[str, None] = {}
        known = self.registrations
        for rec in self.records[self._next:]:
            e = rec.event
            if isinstance(e, ev.SessionClaimed) and e.agent_id not in known and e.agent_id not in found:
                found[e.agent_id] = None
                if len(found) >= limit:
                    break
        return list(found)

    def learn(self, what: str, agent_id: str, records: Iterable[Recorded], through: int | None = None) -> None:
        """What was read of an agent: its registration subject's records (REGISTRATIONS), or its history (what
        follows the part already known, covering events up to `through`; None: all there is)."""
        if what == REGISTRATIONS:
            self.registrations[agent_id] = as_registered(records)
            return
        timeline = self.timelines.get(agent_id)
        if timeline is None:
            self.timelines[agent_id] = AgentTimeline(records, through)
        else:
            timeline.extend(records, through)


def claims_lookup(session_id: str, records: Iterable[Recorded], incarnation_at: IncarnationAt | None = None,
                  agent_at: AgentAt | None = None, registered_at: RegisteredAt | None = None) -> SessionAt:
    """session_at for one session (its claim token and owner as of any point), from its history."""
    seqs: list[int] = []
    states: list[SessionState | None] = []
    state: SessionState | None = None
    for rec in records:
        state, _ = evolve_session(state, rec, incarnation_at, agent_at, registered_at)
        seqs.append(rec.seq)
        states.append(state)

    def session_at(sid: str, seq: int) -> SessionState | None:
        if sid != session_id:
            return None
        i = bisect_left(seqs, seq)
        return states[i - 1] if i else None

    return session_at
