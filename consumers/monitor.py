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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque
from datetime import datetime

import msgspec

from ledger import events as ev
from ledger import lifecycle as lc
from ledger.codec import Recorded, from_ns
from ledger.errors import EventIdTaken, LedgerError
from ledger.ids import new_id
from ledger.writer import Writer
from projections.state import Change

from . import liveness_rules as rules
from .follow import Follower, Item

log = logging.getLogger(__name__)

MAX_REPORTERS = 64
"""Reporters remembered per agent incarnation (the oldest go first); far above any `report_threshold`."""


class LivenessMonitor:
    def __init__(self, ledger: Writer, follower: Follower, settings: rules.LivenessSettings | None = None, *,
                 tick: float = 0.2) -> None:
        self.ledger = ledger
        self.follower = follower
        self.settings = settings or rules.LivenessSettings()
        self.tick = tick
        self.grace_until = time.monotonic() + self.settings.grace
        self.grace_reason = "starting"
        self.writes = 0
        """Verdicts written (as the reclaimer's and watchdog's `writes`: exported by /metrics)."""
        self._reports: dict[tuple[str, int], dict[str, tuple[int, datetime]]] = defaultdict(dict)
        """(agent, incarnation) -> reporter -> its newest report: a reporter counts once, however often it reports."""
        self._reported: dict[str, int] = {}
        """agent -> the incarnation its kept reports are about (one key per agent in `_reports`)."""
        self._deaths: dict[str, deque[tuple[str, datetime]]] = defaultdict(deque)
        self._written: set[str] = set()
        self._flagged: set[tuple[str, int]] = set()
        """(agent, incarnation) of beats already reported as naming no registration."""
        follower.listen(self._heard)
        ledger.store.add_connection_listener(self._connection)

    # --- what the monitor learns --------------------------------------------------------------

    def _connection(self, kind: str) -> None:
        self.start_grace(f"connection {kind}")

    def start_grace(self, why: str) -> None:
        self.grace_until = time.monotonic() + self.settings.grace
        self.grace_reason = why
        log.info("liveness monitor: no verdicts for %gs (%s)", self.settings.grace, why)

    def _heard(self, stream: str, batch: list[Item], changes: list[Change]) -> None:
        agents = self.follower.state.ledger.agents
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
            elif isinstance(e, ev.AgentDeclaredDead) and e.agent_id in agents and lc.writer_problem(e) is None:
                # (a death only the monitor may declare: one forged by another producer never trips a breaker)
                deaths = self._deaths[agents[e.agent_id].pool]
                deaths.append((e.agent_id, from_ns(item.timestamp_ns)))
                while len(deaths) > 1000:
                    deaths.popleft()

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
        """Judge every agent once; returns what was written."""
        state = self.follower.state
        written: list[ev.Event] = []
        verdicts = []
        overdue: dict[str, set[str]] = defaultdict(set)
        """Per pool, the agents that missed their beats: dying together trips the breaker at the first death."""
        for agent in list(state.ledger.agents.values()):
            self._flag_unregistered(agent)
            beat = state.current_beat(agent.agent_id)  # a beat of any other incarnation says nothing about this one
            last = rules.LastBeat(beat.seq, from_ns(beat.stored_ns)) if beat is not None else None
            if rules.overdue(agent, last, now, self.settings):
                overdue[agent.pool].add(agent.agent_id)
            reports = sorted(self._reports.get((agent.agent_id, agent.incarnation), {}).values())
            verdict = rules.judge(agent, last, reports, now, self.settings, self.ledger.producer.id)
            if verdict is not None:
                verdicts.append((agent, last, verdict))
        for agent, last, verdict in verdicts:
            if verdict.event_id in self._written:
                continue
            if verdict.kind == rules.DEAD:
                if await self._view_lags(agent, last):
                    continue  # no death on stale evidence: wait until our view has caught up
                written += await self._declare_dead(agent, verdict, now, overdue[agent.pool])
            else:
                written.append(await self._write(ev.AgentSuspected(
                    producer=self.ledger.producer, agent_id=agent.agent_id, incarnation=agent.incarnation,
                    reason=verdict.reason, evidence=verdict.evidence, event_id=verdict.event_id,
                    causation_id=agent.cause_id)))
            self._written.add(verdict.event_id)
        written += await self._close_recovered_breakers(now)
        return written

    def _flag_unregistered(self, agent: lc.AgentState) -> None:
        forged = self.follower.state.unregistered_beat(agent.agent_id)
        if forged is not None and (agent.agent_id, forged.incarnation) not in self._flagged:
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

    async def _declare_dead(self, agent: lc.AgentState, verdict: rules.Verdict, now: datetime,
                            overdue: set[str]) -> list[ev.Event]:
        state = self.follower.state.ledger
        written: list[ev.Event] = []
        pool = state.pools.get(agent.pool)
        if pool is None or not pool.breaker_open:
            members = [a for a in state.agents.values() if a.pool == agent.pool]
            call = rules.breaker_before_death(members, list(self._deaths[agent.pool]), overdue | {agent.agent_id},
                                              now, self.settings)
            if call.trip:
                trips = pool.trips if pool else 0
                written.append(await self._write(ev.PoolBreakerTripped(
                    producer=self.ledger.producer, pool=agent.pool, reason=call.reason, dead=call.dead,
                    agents=call.agents, window=self.settings.breaker_window, threshold=self.settings.breaker_share,
                    event_id=f"breaker-{agent.pool}-{trips + 1}")))
                log.warning("pool %s: breaker tripped: %s", agent.pool, call.reason)
        written.append(await self._write(ev.AgentDeclaredDead(
            producer=self.ledger.producer, agent_id=agent.agent_id, incarnation=agent.incarnation,
            reason=verdict.reason, evidence=verdict.evidence, event_id=verdict.event_id, causation_id=agent.cause_id)))
        self._deaths[agent.pool].append((agent.agent_id, now))
        log.warning("agent %s (incarnation %d) declared dead: %s", agent.agent_id, agent.incarnation,
                    verdict.evidence.detail)
        return written

    async def _close_recovered_breakers(self, now: datetime) -> list[ev.Event]:
        state = self.follower.state.ledger
        written = []
        for pool in list(state.pools.values()):
            if not pool.breaker_open:
                continue
            members = [a for a in state.agents.values() if a.pool == pool.pool]
            why = rules.breaker_recovered(pool, members, list(self._deaths[pool.pool]), now, self.settings)
            event_id = f"breaker-reset-{pool.pool}-{pool.trips}"
            if why and event_id not in self._written:
                written.append(await self._write(ev.PoolBreakerReset(producer=self.ledger.producer, pool=pool.pool,
                                                                     reason=why, event_id=event_id)))
                self._written.add(event_id)
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
