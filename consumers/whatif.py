"""Counterfactual replay: what the liveness monitor would have declared under other settings (`ledger whatif`).

    items = merged(ledger_items, heartbeat_items)        # both streams, in stored-time order
    recorded = recorded_settings(items)                  # what the log's own verdicts say the monitor ran with
    report = whatif(items, LivenessSettings(policy=HealthPolicy(dead_after=60)), recorded=recorded)

Pure: no I/O, no wall clock. The counterfactual monitor judges with the monitor's own rules
(`liveness_rules.judgement`, `overdue`, `breaker_before_death`, `breaker_recovered`, `breaker_quiet_from`)
and folds agents and pools with the lifecycle's own `evolve_agent` / `evolve_pool`; its clock is the log's
(stored times). It reads every recorded event except the monitor's own verdicts (suspicions, deaths, breaker
trips and resets), which it writes itself, as the monitor would have, into its own fold; the rest of the
log - registrations, goodbyes, drains, fences, beats - is what happened and stays as it was.

Time costs events, not ticks: between two stored items the simulation jumps straight to the next moment a
verdict may turn (the deadline `judgement` gives, the moment a breaker's last death leaves its window), as
the monitor's own deadlines do; so a day of history costs O(events).

The baseline is the log: the verdicts the monitor wrote (matched by agent, incarnation and the beat a
suspicion was about; breaker trips by pool and ordinal) and the sessions each dead agent held when it died
(its failovers), from the recorded fold (`projections.state.LedgerState`). A verdict both runs reach within
`tolerance` seconds of each other is the same verdict: the real monitor judges on a tick (and not during its
grace after a start or a reconnect), the counterfactual one at the exact moment.

Left out: suspicions from failure reports (`unreachable_reports`) do not depend on the settings this changes;
they are neither simulated nor compared. Grace periods are not in the log, so they are not replayed.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import msgspec

from ledger import authority
from ledger import events as ev
from ledger import lifecycle as lc
from ledger.codec import Item, Recorded, from_ns
from ledger.subjects import HEARTBEAT_STREAM, LEDGER_STREAM
from projections.beats import of_incarnation
from projections.health import HealthPolicy, assess
from projections.state import LedgerState
from projections.timespec import aware

from . import liveness_rules as rules
from .deadlines import Deadlines

DEATH, SUSPICION, BREAKER = "death", "suspicion", "breaker"
AVOIDED, ADDED, EARLIER, LATER = "avoided", "added", "earlier", "later"
TOLERANCE = 1.0
"""Seconds within which a recorded and a counterfactual verdict are the same one (the monitor judges on a tick)."""

_ENDED = frozenset({lc.A_GONE, lc.A_DRAINED, lc.A_FENCED})
_VERDICTS = (ev.AgentSuspected, ev.AgentDeclaredDead)
_BREAKER_EVENTS = (ev.PoolBreakerTripped, ev.PoolBreakerReset)
_PRODUCER = ev.Producer(id="monitor", instance="whatif")
V = TypeVar("V")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class RecordedSettings(msgspec.Struct, frozen=True, kw_only=True):
    """The settings the log's own verdicts were made with, as their evidence says (defaults where none says)."""

    dead_after: float | None
    """None: each agent's own ttl (every recorded verdict's `dead_after` was its agent's ttl)."""
    suspect_after_missed: int
    breaker_share: float
    breaker_window: float
    verdicts: int
    """Recorded verdicts (of missed heartbeats) the liveness settings were read from; 0: defaults."""
    trips: int
    """Recorded breaker trips the breaker settings were read from; 0: defaults."""

    def liveness(self, *, dead_after: float | None = None, suspect_after_missed: int | None = None,
                 breaker_share: float | None = None) -> rules.LivenessSettings:
        """These settings, with the given ones instead (None: as recorded)."""
        policy = HealthPolicy(suspect_after_missed=suspect_after_missed or self.suspect_after_missed,
                              dead_after=dead_after if dead_after is not None else self.dead_after)
        return rules.LivenessSettings(policy=policy, breaker_window=self.breaker_window,
                                      breaker_share=breaker_share if breaker_share is not None
                                      else self.breaker_share)


class Outcome(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One verdict as one run reached it."""

    at: datetime
    seq: int | None = None
    """Its sequence in the log (recorded verdicts only)."""
    last_beat_seq: int | None = None
    last_beat_at: datetime | None = None
    gap: float | None = None
    """Seconds from the last beat (or the registration) to the verdict."""
    sessions: int = 0
    """Sessions the agent held at its death: the failovers it caused (deaths only)."""
    detail: str = ""


class Difference(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    what: str
    """death, suspicion or breaker."""
    kind: str
    """avoided, added, earlier or later."""
    subject: str
    """The agent (deaths, suspicions) or the pool (breaker trips)."""
    pool: str
    incarnation: int | None = None
    recorded: Outcome | None = None
    whatif: Outcome | None = None
    shift: float | None = None
    """Seconds the verdict moved (earlier or later)."""
    longest_gap: float | None = None
    """The longest silence of this agent's incarnation in the replayed window (its last: to its goodbye, its next
    registration or the window's end)."""
    note: str = ""


class Tally(msgspec.Struct, frozen=True, kw_only=True):
    deaths: int
    suspicions: int
    trips: int
    failovers: int


class Report(msgspec.Struct, frozen=True, kw_only=True):
    settings: dict[str, float | int | None]
    """What the counterfactual ran with (dead_after None: each agent's ttl)."""
    recorded_settings: RecordedSettings
    since: datetime | None
    until: datetime | None
    recorded: Tally
    whatif: Tally
    differences: list[Difference]
    summary: str
    notes: list[str] = []


def merged(*streams: Iterable[Item]) -> Iterator[Item]:
    """Items of several streams in stored-time order (each stream's own order kept: ties go to the first)."""
    return heapq.merge(*streams, key=lambda item: item.timestamp_ns)


def recorded_settings(items: Iterable[Item]) -> RecordedSettings:
    """What the recorded verdicts' evidence says the monitor judged with."""
    agents: dict[str, lc.AgentState] = {}
    dead_after: Counter[float | None] = Counter()
    suspect_after: Counter[int] = Counter()
    shares: Counter[float] = Counter()
    windows: Counter[float] = Counter()
    for item in items:
        if not isinstance(item, Recorded) or item.stream == HEARTBEAT_STREAM:
            continue
        e = item.event
        if isinstance(e, ev.PoolBreakerTripped) and lc.writer_problem(e) is None:
            shares[e.threshold] += 1
            windows[e.window] += 1
        if not isinstance(e, ev.AgentEvent):
            continue
        agent = agents.get(e.agent_id)
        if isinstance(e, _VERDICTS) and e.reason == rules.MISSED_HEARTBEATS and lc.writer_problem(e) is None \
                and agent is not None and agent.incarnation == e.incarnation:
            if e.evidence.suspect_after_missed is not None:
                suspect_after[e.evidence.suspect_after_missed] += 1
            if e.evidence.dead_after is not None:
                dead_after[None if e.evidence.dead_after == agent.ttl else e.evidence.dead_after] += 1
        after, _ = lc.evolve_agent(agent, item)
        if after is not None:
            agents[e.agent_id] = after
    defaults = rules.LivenessSettings()
    return RecordedSettings(
        dead_after=_most_common(dead_after, defaults.policy.dead_after),
        suspect_after_missed=_most_common(suspect_after, defaults.policy.suspect_after_missed),
        breaker_share=_most_common(shares, defaults.breaker_share),
        breaker_window=_most_common(windows, defaults.breaker_window),
        verdicts=sum(suspect_after.values()), trips=sum(shares.values()))


def _most_common(counts: Counter[V], default: V) -> V:
    return counts.most_common(1)[0][0] if counts else default


def _micros(when: datetime) -> int:
    return (aware(when) - _EPOCH) // _MICROSECOND


def _moment(micros: int) -> datetime:
    return _EPOCH + micros * _MICROSECOND


def _gap(evidence: ev.Evidence, since: datetime | None = None) -> float | None:
    start = evidence.last_heartbeat_at or since
    if start is None or evidence.observed_at is None:
        return None
    return max(0.0, (aware(evidence.observed_at) - aware(start)).total_seconds())


def _owned(state: LedgerState, agent_id: str, incarnation: int) -> int:
    return sum(1 for s in state.sessions.values()
               if s.owner == agent_id and s.owner_incarnation == incarnation and s.status == lc.S_ASSIGNED)


Key = tuple[str, str, int, int]
"""(what, agent or pool, incarnation or 0, the beat a suspicion is about or a trip's ordinal)."""


class _Run:
    """One pass over the log: the recorded fold beside the counterfactual monitor's own."""

    def __init__(self, settings: rules.LivenessSettings, since: datetime | None) -> None:
        self.settings = settings
        self.since = _micros(since) if since is not None else None
        self.recorded = LedgerState()
        self.agents: dict[str, lc.AgentState] = {}
        """The counterfactual fold of agents: the log's events, the counterfactual verdicts."""
        self.members: dict[str, dict[str, None]] = defaultdict(dict)
        """Pool -> its agents in `agents` (ordered): a death asks about its pool, not the whole fleet."""
        self.pools: dict[str, lc.PoolState] = {}
        self.deaths: dict[str, list[tuple[str, datetime]]] = defaultdict(list)
        self.written: set[str] = set()
        self.due: Deadlines[str] = Deadlines()
        self.breakers: Deadlines[str] = Deadlines()
        self.judging = since is None
        self.was: dict[Key, tuple[str, Outcome]] = {}
        """Recorded verdicts: key -> (pool, outcome)."""
        self.would: dict[Key, tuple[str, Outcome]] = {}
        self.last_beat: dict[tuple[str, int], int] = {}
        """(agent, incarnation) -> stored time (µs) of its newest beat (or its registration)."""
        self.longest: dict[tuple[str, int], float] = {}
        self.ended: dict[tuple[str, int], int] = {}
        """(agent, incarnation) -> when it stopped being expected to beat: goodbye, drained, fenced, a new one."""
        self.clock = 0

    # --- the clock ---------------------------------------------------------------------------

    def advance(self, to: int, *, inclusive: bool) -> None:
        """Judge at every moment a verdict may turn before `to` (at it too, if `inclusive`)."""
        if not self.judging:
            if self.since is None or to < self.since or (to == self.since and not inclusive):
                return
            self._start()
        while True:
            moments = [m for m in (self.due.next_at(), self.breakers.next_at()) if m is not None]
            if not moments:
                return
            at = int(min(moments))
            if at > to or (at == to and not inclusive):
                return
            self._check(max(at, self.clock))

    def _start(self) -> None:
        """From `since` on the monitor is the counterfactual one: every live agent and open breaker judged."""
        self.judging = True
        assert self.since is not None
        self.due.clear()
        self.breakers.clear()
        self.clock = max(self.clock, self.since)
        for agent_id, agent in self.agents.items():
            if agent.status in (lc.A_ALIVE, lc.A_DRAINING):
                self.due.set(agent_id, self.since)
        for name, pool in self.pools.items():
            if pool.breaker_open:
                self.breakers.set(name, self.since)

    # --- the log -----------------------------------------------------------------------------

    def apply(self, item: Item) -> None:
        at = item.timestamp_ns // 1000
        self.advance(at, inclusive=False)
        self.clock = max(self.clock, at)
        e = item.event if isinstance(item, Recorded) else None
        sessions = 0
        if isinstance(e, ev.AgentDeclaredDead) and lc.writer_problem(e) is None:
            sessions = _owned(self.recorded, e.agent_id, e.incarnation)
        before = self.recorded.ledger.pools.get(e.pool) if isinstance(e, ev.PoolBreakerTripped) else None
        change = self.recorded.apply(item)
        if e is None or change is None:
            return
        assert isinstance(item, Recorded)
        if item.stream == HEARTBEAT_STREAM:
            if change.applied and isinstance(e, ev.AgentHeartbeat):
                self._beat(e.agent_id, e.incarnation, at)
            return
        if isinstance(e, _VERDICTS + _BREAKER_EVENTS) and authority.role_of(e.producer.id) == authority.MONITOR:
            if change.applied and self.judging:
                self._recorded_verdict(item, e, sessions, before)
            if self.judging:
                return  # the counterfactual monitor writes its own
        if isinstance(e, ev.AgentEvent):
            self._agent_event(item, e, at)
        elif isinstance(e, ev.PoolEvent):
            self._pool_event(item, e, at)
        if isinstance(e, ev.AgentDeclaredDead) and not self.judging and change.applied:
            self.deaths[self._pool_of(e.agent_id)].append((e.agent_id, item.stored_at))

    def _pool_of(self, agent_id: str) -> str:
        agent = self.agents.get(agent_id)
        return agent.pool if agent is not None else ""

    def _agent_event(self, item: Recorded, e: ev.AgentEvent, at: int) -> None:
        before = self.agents.get(e.agent_id)
        after, anomaly = lc.evolve_agent(before, item)
        if anomaly is not None or after is None:
            return
        self.agents[e.agent_id] = after
        if before is None or before.pool != after.pool:
            if before is not None:
                self.members[before.pool].pop(e.agent_id, None)
            self.members[after.pool][e.agent_id] = None
        if isinstance(e, ev.AgentRegistered):
            self.last_beat[(e.agent_id, after.incarnation)] = at
            if before is not None:
                self.ended.setdefault((e.agent_id, before.incarnation), at)
        elif after.status in _ENDED:
            self.ended.setdefault((e.agent_id, after.incarnation), at)
        self._changed(after, at)

    def _pool_event(self, item: Recorded, e: ev.PoolEvent, at: int) -> None:
        after, anomaly = lc.evolve_pool(self.pools.get(e.pool), item)
        if anomaly is None and after is not None:
            self.pools[e.pool] = after
        self.breakers.set(e.pool, at)

    def _changed(self, agent: lc.AgentState, at: int) -> None:
        self.due.set(agent.agent_id, at)
        pool = self.pools.get(agent.pool)
        if pool is not None and pool.breaker_open:
            self.breakers.set(agent.pool, at)

    def _beat(self, agent_id: str, incarnation: int, at: int) -> None:
        key = (agent_id, incarnation)
        previous = self.last_beat.get(key)
        if previous is not None and self.judging:
            self.longest[key] = max(self.longest.get(key, 0.0), (at - max(previous, self.since or 0)) / 1e6)
        self.last_beat[key] = at
        if agent_id in self.agents:
            self.due.set(agent_id, at)

    def _recorded_verdict(self, item: Recorded, e: ev.Event, sessions: int, before: lc.PoolState | None) -> None:
        if isinstance(e, ev.PoolBreakerTripped):
            ordinal = (before.trips if before else 0) + 1
            self.was[(BREAKER, e.pool, 0, ordinal)] = (e.pool, Outcome(at=item.stored_at, seq=item.seq,
                                                                       detail=e.reason))
            return
        if not isinstance(e, _VERDICTS) or e.reason != rules.MISSED_HEARTBEATS:
            return  # a reset follows from the trips; suspicions from reports are not replayed
        agent = self.recorded.agents.get(e.agent_id)
        pool = agent.pool if agent is not None else self._pool_of(e.agent_id)
        outcome = Outcome(at=item.stored_at, seq=item.seq, last_beat_seq=e.evidence.last_heartbeat_seq,
                          last_beat_at=e.evidence.last_heartbeat_at,
                          gap=_gap(e.evidence, agent.registered_at if agent else None), sessions=sessions,
                          detail=e.evidence.detail)
        self.was[_key(e, e.evidence)] = (pool, outcome)

    # --- judging, as the monitor's check does ------------------------------------------------

    def _check(self, at: int) -> None:
        self.clock = at
        now = _moment(at)
        verdicts: list[tuple[lc.AgentState, rules.LastBeat | None, rules.Verdict]] = []
        for agent_id in self.due.pop_due(at):
            agent = self.agents.get(agent_id)
            if agent is None or agent.status not in (lc.A_ALIVE, lc.A_DRAINING):
                continue
            last = self._last(agent)
            verdict, turns = rules.judgement(agent, last, [], now, self.settings, _PRODUCER.id)
            if turns is not None:
                self.due.set(agent_id, _micros(turns))
            if verdict is not None and verdict.event_id not in self.written:
                verdicts.append((agent, last, verdict))
        overdue = {pool: self._overdue(pool, now) for pool in {a.pool for a, _, v in verdicts if v.kind == rules.DEAD}}
        for agent, _, verdict in verdicts:
            self.written.add(verdict.event_id)
            self._declare(agent, verdict, now, overdue.get(agent.pool, set()))
        for name in self.breakers.pop_due(at):
            self._breaker_may_close(name, now)

    def _last(self, agent: lc.AgentState) -> rules.LastBeat | None:
        beat = of_incarnation(self.recorded.heartbeats.beats.get(agent.agent_id), agent.incarnation)
        return rules.LastBeat(beat.seq, from_ns(beat.stored_ns)) if beat is not None else None

    def _members(self, pool: str) -> list[lc.AgentState]:
        return [self.agents[agent_id] for agent_id in self.members.get(pool, ())]

    def _overdue(self, pool: str, now: datetime) -> set[str]:
        return {a.agent_id for a in self._members(pool) if rules.overdue(a, self._last(a), now, self.settings)}

    def _declare(self, agent: lc.AgentState, verdict: rules.Verdict, now: datetime, overdue: set[str]) -> None:
        """Fold what the monitor would write for the verdict (`rules.verdict_events`, the monitor's own decision)."""
        at = _micros(now)
        pool = self.pools.get(agent.pool)
        for e in rules.verdict_events(agent, verdict, pool, self._members(agent.pool), self.deaths[agent.pool],
                                      overdue, now, self.settings, _PRODUCER):
            self._write(e, at)
            if isinstance(e, ev.PoolBreakerTripped):
                trips = pool.trips if pool else 0
                self.would[(BREAKER, agent.pool, 0, trips + 1)] = (agent.pool, Outcome(at=now, detail=e.reason))
            elif isinstance(e, ev.AgentDeclaredDead):
                self.deaths[agent.pool].append((agent.agent_id, now))
                outcome = self._outcome(agent, verdict, now)
                self.would[_key_of(verdict, agent)] = (agent.pool, msgspec.structs.replace(
                    outcome, sessions=_owned(self.recorded, agent.agent_id, agent.incarnation)))
            else:
                self.would[_key_of(verdict, agent)] = (agent.pool, self._outcome(agent, verdict, now))

    def _breaker_may_close(self, name: str, now: datetime) -> None:
        pool = self.pools.get(name)
        if pool is None or not pool.breaker_open:
            return
        deaths = self.deaths[name]
        why = rules.breaker_recovered(pool, self._members(name), deaths, now, self.settings)
        if why is None:
            quiet = rules.breaker_quiet_from(deaths, self.settings)
            if quiet is not None and quiet > now:
                self.breakers.set(name, _micros(quiet))
            return
        self._write(ev.PoolBreakerReset(producer=_PRODUCER, pool=name, reason=why), _micros(now))

    def _write(self, e: ev.Event, at: int) -> None:
        """Into the counterfactual fold, as the monitor's write would come back to it."""
        item = Recorded(stream=LEDGER_STREAM, seq=self.recorded.ledger.seq, subject="", timestamp_ns=at * 1000,
                        event=e)
        if isinstance(e, ev.AgentEvent):
            self._agent_event(item, e, at)
        elif isinstance(e, ev.PoolEvent):
            self._pool_event(item, e, at)

    def _outcome(self, agent: lc.AgentState, verdict: rules.Verdict, now: datetime) -> Outcome:
        evidence = verdict.evidence
        return Outcome(at=now, last_beat_seq=evidence.last_heartbeat_seq, last_beat_at=evidence.last_heartbeat_at,
                       gap=_gap(evidence, agent.registered_at), detail=evidence.detail)

    def finish(self, end: int) -> None:
        """Judge up to the end of the window; count each incarnation's last silence, up to its end or the window's
        (a death does not end it: the log's silence is the evidence, whoever judged it)."""
        self.advance(end, inclusive=True)
        for key, at in self.last_beat.items():
            stop = min(self.ended.get(key, end), end)
            if stop > at:
                self.longest[key] = max(self.longest.get(key, 0.0), (stop - max(at, self.since or 0)) / 1e6)


def _key(e: ev.AgentSuspected | ev.AgentDeclaredDead, evidence: ev.Evidence) -> Key:
    if isinstance(e, ev.AgentDeclaredDead):
        return (DEATH, e.agent_id, e.incarnation, 0)
    return (SUSPICION, e.agent_id, e.incarnation, evidence.last_heartbeat_seq or 0)


def _key_of(verdict: rules.Verdict, agent: lc.AgentState) -> Key:
    if verdict.kind == rules.DEAD:
        return (DEATH, agent.agent_id, agent.incarnation, 0)
    return (SUSPICION, agent.agent_id, agent.incarnation, verdict.evidence.last_heartbeat_seq or 0)


def whatif(items: Iterable[Item], settings: rules.LivenessSettings, *, recorded: RecordedSettings,
           since: datetime | None = None, until: datetime | None = None, pool: str | None = None,
           tolerance: float = TOLERANCE, notes: Sequence[str] = ()) -> Report:
    """Re-judge the log under `settings` from `since` (the log before it is folded as recorded) to `until`
    (default: the newest item; items up to `tolerance` after it are read to match verdicts near the end, the
    reader should pass them), and compare with what the monitor recorded. `items`: both streams, merged
    in stored-time order (`merged`)."""
    run = _Run(settings, since)
    last = 0
    # a verdict up to `tolerance` after the window's end may be the match of one inside it: judged, not reported
    bound = _micros(until) + round(tolerance * 1e6) if until is not None else None
    beyond = False
    for item in items:
        if bound is not None and item.timestamp_ns // 1000 > bound:
            beyond = True
            break
        run.apply(item)
        last = max(last, item.timestamp_ns // 1000)
    # Judged up to the bound only if the log goes on past it: after the log's newest item there is no evidence of
    # silence (an --until in the future would kill every live agent at the log's end plus its ttl).
    end = last if bound is None else bound if beyond else min(last, bound)
    run.finish(end)
    notes = list(notes)
    if pool is not None and not any(a.pool == pool for a in run.agents.values()):
        notes.append(f"no agent of pool {pool} in the log")
    window_end = _micros(until) if until is not None else end
    differences = _compare(run, tolerance, pool, end, window_end)
    recorded_tally = _tally(run.was, pool, window_end)
    whatif_tally = _tally(run.would, pool, window_end)
    choice = {"dead_after": settings.policy.dead_after, "suspect_after_missed": settings.policy.suspect_after_missed,
              "breaker_share": settings.breaker_share, "breaker_window": settings.breaker_window}
    return Report(settings=choice, recorded_settings=recorded, since=since, until=until, recorded=recorded_tally,
                  whatif=whatif_tally, differences=differences, summary=summary(settings, recorded, recorded_tally,
                                                                                 differences),
                  notes=notes)


def _tally(verdicts: dict[Key, tuple[str, Outcome]], pool: str | None, until: int) -> Tally:
    mine = [(k, o) for k, (p, o) in verdicts.items() if (pool is None or p == pool) and _micros(o.at) <= until]
    return Tally(deaths=sum(1 for k, _ in mine if k[0] == DEATH), suspicions=sum(1 for k, _ in mine
                                                                                 if k[0] == SUSPICION),
                 trips=sum(1 for k, _ in mine if k[0] == BREAKER),
                 failovers=sum(o.sessions for k, o in mine if k[0] == DEATH))


def _compare(run: _Run, tolerance: float, pool: str | None, end: int, until: int) -> list[Difference]:
    out = []
    for key in sorted(run.was.keys() | run.would.keys(), key=lambda k: _first_time(run, k)):
        if _micros(_first_time(run, key)) > until:
            continue  # after the window (judged only to match those inside it)
        what, subject, incarnation, _ = key
        was, would = run.was.get(key), run.would.get(key)
        where = was[0] if was is not None else would[0] if would is not None else ""
        if pool is not None and where != pool:
            continue
        rec, cf = (was[1] if was else None), (would[1] if would else None)
        shift = None
        if rec is not None and cf is not None:
            shift = (aware(cf.at) - aware(rec.at)).total_seconds()
            if abs(shift) <= tolerance:
                continue
            kind = EARLIER if shift < 0 else LATER
        else:
            kind = AVOIDED if cf is None else ADDED
        longest = run.longest.get((subject, incarnation)) if what != BREAKER else None
        note = ""
        if kind == AVOIDED and what == DEATH:
            agent = run.agents.get(subject)
            if agent is not None and agent.incarnation == incarnation and agent.status in (lc.A_ALIVE,
                                                                                          lc.A_DRAINING):
                silent_from = run.last_beat.get((subject, incarnation), end)
                dies = _moment(silent_from) + timedelta(seconds=_dead_after(run.settings, agent))
                note = (f"still alive when the window ends, silent for {(end - silent_from) / 1e6:.1f}s "
                        f"(dead at {dies:%H:%M:%S} if it stayed silent)")
            elif agent is not None and agent.incarnation == incarnation:
                note = f"then {agent.reason}"
            else:
                note = "registered again"
        out.append(Difference(what=what, kind=kind, subject=subject, pool=where,
                              incarnation=incarnation if what != BREAKER else None, recorded=rec, whatif=cf,
                              shift=shift, longest_gap=round(longest, 3) if longest is not None else None, note=note))
    return out


def _dead_after(settings: rules.LivenessSettings, agent: lc.AgentState) -> float:
    """The silence after which `agent` is dead under `settings` (as `assess` reckons it)."""
    return assess(agent, None, agent.registered_at, settings.policy).dead_after


def _first_time(run: _Run, key: Key) -> datetime:
    return min(aware(found[1].at) for found in (run.was.get(key), run.would.get(key)) if found is not None)


def _seconds(value: float) -> str:
    return f"{value:g} s" if value < 120 else f"{value / 60:g} min"


def describe_settings(settings: rules.LivenessSettings, recorded: RecordedSettings) -> str:
    """What differs from the recorded settings, in words ("dead-after 60 s, suspect-after 5")."""
    parts = []
    policy = settings.policy
    if policy.dead_after != recorded.dead_after:
        parts.append(f"dead-after {_seconds(policy.dead_after)}" if policy.dead_after is not None
                     else "dead-after each agent's ttl")
    if policy.suspect_after_missed != recorded.suspect_after_missed:
        parts.append(f"suspect-after {policy.suspect_after_missed}")
    if settings.breaker_share != recorded.breaker_share:
        parts.append(f"breaker-share {settings.breaker_share:g}")
    return ", ".join(parts) or "the recorded settings"


def summary(settings: rules.LivenessSettings, recorded: RecordedSettings, was: Tally,
            differences: Sequence[Difference]) -> str:
    """One line: "with dead-after 60 s: 3 of 5 deaths avoided, 41 failovers avoided, 1 death 31 s later"."""
    def of(what: str, kind: str) -> list[Difference]:
        return [d for d in differences if d.what == what and d.kind == kind]

    def n(count: int, noun: str) -> str:
        return f"{count} {noun}{'' if count == 1 else 's'}"

    parts = []
    avoided, added = of(DEATH, AVOIDED), of(DEATH, ADDED)
    if avoided:
        parts.append(f"{len(avoided)} of {n(was.deaths, 'death')} avoided")
        parts.append(f"{n(sum(d.recorded.sessions for d in avoided if d.recorded), 'failover')} avoided")
    if added:
        parts.append(f"{n(len(added), 'death')} added")
        parts.append(f"{n(sum(d.whatif.sessions for d in added if d.whatif), 'failover')} added")
    for kind in (LATER, EARLIER):
        moved = of(DEATH, kind)
        if len(moved) == 1:
            parts.append(f"1 death {abs(moved[0].shift or 0):.0f} s {kind}")
        elif moved:
            parts.append(f"{len(moved)} deaths {kind} (by up to {max(abs(d.shift or 0) for d in moved):.0f} s)")
    for what, noun in ((SUSPICION, "suspicion"), (BREAKER, "breaker trip")):
        for kind in (AVOIDED, ADDED, EARLIER, LATER):
            found = of(what, kind)
            if found:
                parts.append(f"{n(len(found), noun)} {kind}")
    if not parts:
        parts.append(f"no difference ({n(was.deaths, 'death')}, {n(was.suspicions, 'suspicion')}, "
                     f"{n(was.trips, 'breaker trip')} as recorded)")
    return f"with {describe_settings(settings, recorded)}: " + ", ".join(parts)
