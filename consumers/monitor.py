"""The liveness monitor: declares agents suspect and dead, as events with their evidence.

Any number of replicas may run. Each judges from the same log with the same
rules (`consumers.liveness_rules`), and a verdict's event id is derived from its
evidence, so replicas that reach it together write one fact (JetStream drops
the duplicates); one that comes later sees the verdict in the log first.

It looks before it leaps: nothing is declared until it has caught up with
both streams, nor within `grace` seconds of its own reconnect or of a stream
leader change; and before declaring a death it re-reads the agent's newest
heartbeat from the stream leader, in case its own view lags. Before a death
that would make too much of a pool die at once, it trips the pool's breaker.

A tick costs what changed, not the fleet: each agent has a deadline, the
moment its verdict may next be another (`liveness_rules.judgement`), and a
check judges only the agents due - those whose deadline passed, and those the
follower said changed (a registration, a report, a beat that may matter...).
A beat of an agent judged quiet leaves its deadline alone (it can only come
early), so a fleet beating as it should is judged about once per
`suspect_after_missed` intervals per agent, not five times a second, and a
beat costs a few dictionary look-ups; with nothing live, a tick is nothing.
The pools' breakers likewise: only open ones, when one of their agents
changed or their last death leaves the window.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, defaultdict, deque
from datetime import UTC, datetime, timedelta

import msgspec

from ledger import events as ev
from ledger import lifecycle as lc
from ledger.codec import Recorded, from_ns
from ledger.errors import EventIdTaken, LedgerError
from ledger.ids import new_id
from ledger.writer import Writer
from projections.state import AGENT, HEARTBEAT, POOL, Change, LedgerState
from projections.timespec import aware

from . import liveness_rules as rules
from .deadlines import Deadlines
from .follow import Follower, Item
from .partition import EVERYTHING, Partition

log = logging.getLogger(__name__)

MAX_DEATHS = 1000
"""Recent deaths kept per pool (the oldest go first), and deaths waiting for their pool to be read."""
MAX_POOLS_KEPT = 10_000
"""Registrations whose pool the monitor remembers (the oldest go first): a forgotten one is read if needed."""

MAX_REPORTERS = 64
"""Reporters remembered per agent incarnation (the oldest go first); far above any `report_threshold`."""

NOW = 0
"""A deadline that has passed at any check: what a change makes an agent (or a pool)."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _micros(when: datetime) -> int:
    """A moment as the deadlines keep it: whole microseconds, exact (datetimes count microseconds)."""
    return (aware(when) - _EPOCH) // _MICROSECOND


class LivenessMonitor:
    def __init__(self, ledger: Writer, follower: Follower, settings: rules.LivenessSettings | None = None, *,
                 tick: float = 0.2, partition: Partition = EVERYTHING) -> None:
        self.ledger = ledger
        self.follower = follower
        self.settings = settings or rules.LivenessSettings()
        self.tick = tick
        self.partition = partition
        """The pools whose agents (and breakers) this replica judges; another replica judges the rest."""
        self.grace_until = time.monotonic() + self.settings.grace
        self.grace_reason = "starting"
        self.writes = 0
        """Verdicts written (as the reclaimer's and watchdog's `writes`: exported by /metrics)."""
        self._reports: dict[tuple[str, int], dict[str, tuple[int, datetime]]] = defaultdict(dict)
        """(agent, incarnation) -> reporter -> its newest report: a reporter counts once, however often it reports."""
        self._reported: dict[str, int] = {}
        """agent -> the incarnation its kept reports are about (one key per agent in `_reports`)."""
        self._deaths: dict[str, deque[tuple[str, datetime]]] = defaultdict(deque)
        """pool -> its recent deaths (agent, when): each filed under the pool of the incarnation that died."""
        self._pools: OrderedDict[tuple[str, int], str] = OrderedDict()
        """(agent, incarnation) -> the pool it registered in, for the registrations heard (also recalled ones): a
        death recalled after a restart names an incarnation the state may have left for one in another pool."""
        self._unfiled: list[tuple[str, int, datetime]] = []
        """Deaths (agent, incarnation, when) of an incarnation whose pool is not known yet: read at the next check."""
        self._written: set[str] = set()
        self._flagged: set[tuple[str, int]] = set()
        """(agent, incarnation) of beats already reported as naming no registration."""
        self._undecided: set[str] = set()
        """Agents whose beat names a registration not read yet: flagged once the lifecycle is read past it."""
        self.judged = 0
        """Agents judged, in all: a check judges only those due (a counter for /metrics, like `writes`)."""
        self._due: Deadlines[str] = Deadlines()
        """agent -> when its verdict may next be another (microseconds, server clock); NOW once it changed."""
        self._breakers: Deadlines[str] = Deadlines()
        """pool with an open breaker -> when to ask again whether it may close."""
        self._members: dict[str, set[str]] = {}
        """pool -> its agents (kept as the follower tells of them; an id no longer in the state is dropped)."""
        self._pool_of: dict[str, str] = {}
        self._indexed: LedgerState | None = None
        """The state the deadlines and pools were built from: another (resumed) or None (a reconnect): rebuilt."""
        self._checked_at = 0
        self._quiet: dict[str, int] = {}
        """agent -> stored time (ns; -1: none) of the beat it was last judged with, when that judgement was quiet:
        no verdict, no suspicion, no report. A later beat of it need not make it due (see `_beat`)."""
        follower.listen(self._heard)
        ledger.store.add_connection_listener(self._connection)

    # --- what the monitor learns --------------------------------------------------------------

    def _connection(self, kind: str) -> None:
        self.start_grace(f"connection {kind}")

    def start_grace(self, why: str) -> None:
        self.grace_until = time.monotonic() + self.settings.grace
        self.grace_reason = why
        self._indexed = None  # whatever the grace is for, judge everyone once after it
        log.info("liveness monitor: no verdicts for %gs (%s)", self.settings.grace, why)

    def _heard(self, stream: str, batch: list[Item], changes: list[Change]) -> None:
        state = self.follower.state.ledger
        for change in changes:  # what changed is due: judged at the next check
            if change.kind == HEARTBEAT:
                self._beat(change.id)
            elif change.kind == AGENT:
                self._agent_changed(change.id)
            elif change.kind == POOL:
                self._breakers.set(change.id, NOW)
        agents = state.agents
        for item in batch:
            if not isinstance(item, Recorded):
                continue
            e = item.event
            if isinstance(e, ev.AgentUnreachableReported) and e.agent_id in agents:
                current = agents[e.agent_id].incarnation
                if (e.incarnation and e.incarnation != current) or item.seq < current:
                    # no evidence about the incarnation judged (and no key to grow memory with); a report stored
                    # before its registration (recalled after a restart) is about an earlier one
                    continue
                if self._reported.get(e.agent_id, current) != current:  # registered again: the old reports go
                    self._reports.pop((e.agent_id, self._reported[e.agent_id]), None)
                self._reported[e.agent_id] = current
                reports = self._reports[(e.agent_id, current)]
                reports.pop(e.producer.id, None)  # re-inserted: the dict stays ordered oldest report first
                reports[e.producer.id] = (item.seq, from_ns(item.timestamp_ns))
                while len(reports) > MAX_REPORTERS:
                    del reports[next(iter(reports))]
                self._due.set(e.agent_id, NOW)  # (a recalled report comes with no change)
                self._quiet.pop(e.agent_id, None)
            elif isinstance(e, ev.AgentRegistered) and lc.writer_problem(e) is None:
                self._pools[(e.agent_id, item.seq)] = e.pool
                self._pools.move_to_end((e.agent_id, item.seq))
                while len(self._pools) > MAX_POOLS_KEPT:
                    self._pools.popitem(last=False)
            elif isinstance(e, ev.AgentDeclaredDead) and e.agent_id in agents and lc.writer_problem(e) is None:
                # (a death only the monitor may declare: one forged by another producer never trips a breaker)
                # It counts towards the pool of the incarnation that died - live, the agent's pool; recalled after
                # a restart, the state may hold a later incarnation of it, registered in another pool.
                agent, at = agents[e.agent_id], from_ns(item.timestamp_ns)
                pool = agent.pool if agent.incarnation == e.incarnation else self._pools.get((e.agent_id,
                                                                                            e.incarnation))
                if pool is not None:
                    self._file_death(pool, e.agent_id, at)
                elif len(self._unfiled) < MAX_DEATHS:
                    self._unfiled.append((e.agent_id, e.incarnation, at))

    def _file_death(self, pool: str, agent_id: str, at: datetime) -> None:
        deaths = self._deaths[pool]
        deaths.append((agent_id, at))
        while len(deaths) > MAX_DEATHS:
            deaths.popleft()

    async def _file_unfiled(self) -> None:
        """File the deaths heard of incarnations whose pool was not heard: their agents' registrations say it (a
        death naming no registration of its agent is flagged by every fold, and counts nowhere)."""
        while self._unfiled:
            agent_id, incarnation, at = self._unfiled[0]
            registered = await self.ledger.store.registered(agent_id)
            pool = next((r.event.pool for r in registered
                         if r.seq == incarnation and isinstance(r.event, ev.AgentRegistered)), None)
            if pool is not None:
                self._file_death(pool, agent_id, at)
            self._unfiled.pop(0)

    def _beat(self, agent_id: str) -> None:
        """A beat of an agent judged quiet leaves its deadline as it is: the deadline is when that quiet could
        end (overdue, dead) reckoned from an older beat, so it comes no later than it would from this one, and
        nothing else a beat changes matters to a verdict of nothing (no suspicion to clear, no report to count).
        Any other beat - of another incarnation, after a suspicion, with reports - makes the agent due."""
        judged = self._quiet.get(agent_id)
        if judged is not None and agent_id in self._due:
            state = self.follower.state
            agent, beat = state.ledger.agents.get(agent_id), state.heartbeats.beats.get(agent_id)
            if agent is not None and beat is not None and beat.incarnation == agent.incarnation and \
                    beat.stored_ns >= judged:
                return
        self._quiet.pop(agent_id, None)
        self._due.set(agent_id, NOW)

    def _agent_changed(self, agent_id: str) -> None:
        self._due.set(agent_id, NOW)
        self._quiet.pop(agent_id, None)
        agent = self.follower.state.ledger.agents.get(agent_id)
        pool, before = agent.pool if agent is not None else None, self._pool_of.get(agent_id)
        if pool != before:
            if before is not None:
                self._leave(before, agent_id)
            if pool is not None:
                self._members.setdefault(pool, set()).add(agent_id)
                self._pool_of[agent_id] = pool
        pools = self.follower.state.ledger.pools
        for name in (before, pool):
            if name is not None and name in pools and pools[name].breaker_open:
                self._breakers.set(name, NOW)  # an agent of an open pool changed: it may have recovered

    def _leave(self, pool: str, agent_id: str) -> None:
        self._pool_of.pop(agent_id, None)
        members = self._members.get(pool)
        if members is not None:
            members.discard(agent_id)
            if not members:
                del self._members[pool]

    def _members_of(self, pool: str) -> list[lc.AgentState]:
        """The pool's agents in the state (as `[a for a in agents if a.pool == pool]`, from the index)."""
        agents = self.follower.state.ledger.agents
        members: list[lc.AgentState] = []
        for agent_id in list(self._members.get(pool, ())):
            agent = agents.get(agent_id)
            if agent is not None and agent.pool == pool:
                members.append(agent)
            else:  # left the state (retired) without a word, or moved: _agent_changed files it anew
                self._leave(pool, agent_id)
        return members

    def _index(self, state: LedgerState) -> None:
        """Every live agent due, every open breaker due, the pools indexed: once per state, and after a grace."""
        self._indexed = state
        self._due.clear()
        self._quiet.clear()
        self._breakers.clear()
        self._members.clear()
        self._pool_of.clear()
        for agent_id, agent in state.ledger.agents.items():
            self._members.setdefault(agent.pool, set()).add(agent_id)
            self._pool_of[agent_id] = agent.pool
            if agent.status in (lc.A_ALIVE, lc.A_DRAINING):
                self._due.set(agent_id, NOW)
        for name, pool in state.ledger.pools.items():
            if pool.breaker_open:
                self._breakers.set(name, NOW)

    async def _watch_leaders(self) -> None:
        def on_change(stream: str) -> None:
            self.start_grace(f"stream leader change ({stream})")

        async with self.ledger.store.leader_changes(on_change):
            await asyncio.Event().wait()

    # --- judging ------------------------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._watch_leaders())
            tasks.create_task(self._loop())

    async def _loop(self) -> None:
        await self.follower.caught_up.wait()
        await self.follower.heartbeats_caught_up.wait()
        while True:
            await asyncio.sleep(self.tick)
            if time.monotonic() < self.grace_until:
                continue
            try:
                await self.check(self.follower.clock.now(ev.utcnow))
            except LedgerError as e:
                log.warning("liveness check failed: %s", e)

    async def check(self, now: datetime) -> list[ev.Event]:
        """Judge the agents due at `now` (those that changed, or whose verdict may have turned); returns what was
        written. The same verdicts as judging every agent at every check, at the cost of those due."""
        state = self.follower.state
        at = _micros(now)
        if state is not self._indexed or at < self._checked_at:
            self._index(state)  # a new state, a grace, or an earlier moment than the last check: judge everyone
        self._checked_at = at
        await self._file_unfiled()  # before any breaker is judged on the deaths
        agents = state.ledger.agents
        due = self._due.pop_due(at)
        self.judged += len(due)
        self._flag_undecided()
        verdicts = []
        for agent_id in due:
            agent = agents.get(agent_id)
            if agent is None or not self.partition.owns(agent.pool):
                self._quiet.pop(agent_id, None)
                continue  # gone from the state, or another replica's pool: nothing to judge, no deadline kept
            self._flag_unregistered(agent)
            beat = state.current_beat(agent_id)  # a beat of any other incarnation says nothing about this one
            last = rules.LastBeat(beat.seq, from_ns(beat.stored_ns)) if beat is not None else None
            reports = sorted(self._reports.get((agent_id, agent.incarnation), {}).values())
            verdict, turns = rules.judgement(agent, last, reports, now, self.settings, self.ledger.producer.id)
            if turns is not None:
                self._due.set(agent_id, _micros(turns))
            if turns is not None and verdict is None and agent.suspected_at is None and not reports:
                self._quiet[agent_id] = beat.stored_ns if beat is not None else -1
            else:
                self._quiet.pop(agent_id, None)
            if verdict is not None and verdict.event_id not in self._written:
                verdicts.append((agent, last, verdict))
        # per pool with a death, the agents that missed their beats: dying together trips the breaker at the first
        overdue = {pool: self._overdue(pool, now) for pool in {a.pool for a, _, v in verdicts if v.kind == rules.DEAD}}
        written: list[ev.Event] = []
        done = 0
        try:
            for agent, last, verdict in verdicts:
                if verdict.event_id in self._written:
                    pass
                elif verdict.kind == rules.DEAD and await self._view_lags(agent, last):
                    self._due.set(agent.agent_id, at)  # no death on stale evidence: judged again next check
                else:
                    written += await self._declare(agent, verdict, now, overdue.get(agent.pool, set()))
                    self._written.add(verdict.event_id)
                done += 1
        finally:
            for agent, _, _ in verdicts[done:]:  # not written (this check failed): judged again next check
                self._due.set(agent.agent_id, at)
        written += await self._close_recovered_breakers(now, at)
        return written

    def _overdue(self, pool: str, now: datetime) -> set[str]:
        state = self.follower.state
        overdue = set()
        for agent in self._members_of(pool):
            beat = state.current_beat(agent.agent_id)
            last = rules.LastBeat(beat.seq, from_ns(beat.stored_ns)) if beat is not None else None
            if rules.overdue(agent, last, now, self.settings):
                overdue.add(agent.agent_id)
        return overdue

    def _flag_undecided(self) -> None:
        agents = self.follower.state.ledger.agents
        for agent_id in list(self._undecided):
            agent = agents.get(agent_id)
            if agent is None:
                self._undecided.discard(agent_id)
            else:
                self._flag_unregistered(agent)

    def _flag_unregistered(self, agent: lc.AgentState) -> None:
        state = self.follower.state
        forged = state.unregistered_beat(agent.agent_id)
        if forged is None:
            beat = state.heartbeats.beats.get(agent.agent_id)
            if beat is not None and beat.incarnation > agent.incarnation and len(self._undecided) < 10_000:
                self._undecided.add(agent.agent_id)  # a registration not read yet, or a forgery: decided later
            else:
                self._undecided.discard(agent.agent_id)
            return
        self._undecided.discard(agent.agent_id)
        if (agent.agent_id, forged.incarnation) not in self._flagged:
            if len(self._flagged) > 10_000:
                self._flagged.clear()  # a flood of forgeries must not grow memory without bound
            self._flagged.add((agent.agent_id, forged.incarnation))
            log.warning("agent %s: heartbeat #%d names incarnation %d, which has no registration (registered: %d); "
                        "ignored", agent.agent_id, forged.seq, forged.incarnation, agent.incarnation)

    async def _view_lags(self, agent: lc.AgentState, last: rules.LastBeat | None) -> bool:
        """Does the stream leader hold a newer beat of this incarnation, or a newer registration, than our state?

        Only a beat of the incarnation being judged is evidence: the newest beat on the agent's subject may be
        an older incarnation's (one that crashed before its first beat) or a forged one, and counting those as
        "not seen yet" would postpone the death for ever.
        """
        newest = await self.ledger.store.last("hb", agent.agent_id)
        if isinstance(newest, Recorded):
            e = newest.event
            if isinstance(e, ev.AgentHeartbeat) and e.incarnation == agent.incarnation:
                if last is None or newest.seq > last.seq:
                    return True  # a beat of this incarnation we have not seen
            elif newest.seq > self.follower.state.heartbeats.seq:
                return True  # our heartbeat view is behind this: a beat of this incarnation may hide before it
        registrations = await self.ledger.registrations(agent.agent_id)
        return bool(registrations) and registrations[-1] > agent.incarnation

    async def _declare(self, agent: lc.AgentState, verdict: rules.Verdict, now: datetime,
                       overdue: set[str]) -> list[ev.Event]:
        """Write what the verdict decides (`rules.verdict_events`): a suspicion, or a death after its breaker trip."""
        state = self.follower.state.ledger
        written: list[ev.Event] = []
        events = rules.verdict_events(agent, verdict, state.pools.get(agent.pool), self._members_of(agent.pool),
                                      list(self._deaths[agent.pool]), overdue, now, self.settings,
                                      self.ledger.producer)
        for e in events:
            written.append(await self._write(e))
            if isinstance(e, ev.PoolBreakerTripped):
                log.warning("pool %s: breaker tripped: %s", e.pool, e.reason)
            elif isinstance(e, ev.AgentDeclaredDead):
                self._deaths[agent.pool].append((agent.agent_id, now))
                log.warning("agent %s (incarnation %d) declared dead: %s", agent.agent_id, agent.incarnation,
                            verdict.evidence.detail)
        return written

    async def _close_recovered_breakers(self, now: datetime, at: int) -> list[ev.Event]:
        """Close the open breakers due: of a pool whose agents changed, or whose last death left the window."""
        pools = self.follower.state.ledger.pools
        written = []
        due = self._breakers.pop_due(at)
        done = 0
        try:
            for name in due:
                pool = pools.get(name)
                if pool is not None and pool.breaker_open and self.partition.owns(name):
                    deaths = list(self._deaths.get(name, ()))
                    why = rules.breaker_recovered(pool, self._members_of(name), deaths, now, self.settings)
                    event_id = f"breaker-reset-{name}-{pool.trips}"
                    if why is None:
                        quiet = rules.breaker_quiet_from(deaths, self.settings)
                        if quiet is not None and quiet > now:  # else too few alive: asked when one of them changes
                            self._breakers.set(name, _micros(quiet))
                    elif event_id not in self._written:
                        written.append(await self._write(ev.PoolBreakerReset(
                            producer=self.ledger.producer, pool=name, reason=why, event_id=event_id)))
                        self._written.add(event_id)
                done += 1
        finally:
            for name in due[done:]:
                self._breakers.set(name, at)
        return written

    async def _write(self, event: ev.Event) -> ev.Event:
        try:
            await self.ledger.append(event)
        except EventIdTaken as e:
            # Our ids are derived from the log, so that replicas de-duplicate each other; anyone reading the log
            # can derive them too and use one first. A verdict is never lost to that: it is written under a new id.
            log.warning("%s; writing it under a fresh id", e)
            event = msgspec.structs.replace(event, event_id=new_id())
            await self.ledger.append(event)
        self.writes += 1
        return event
