"""The orphan reclaimer: gives every session that needs an owner to a healthy agent of its pool.

It reacts within milliseconds: after every batch that changed an agent, a
session or a pool it plans (`consumers.reclaim_rules`) and writes. Each claim
is a compare-and-set on the session's last sequence as the in-memory state
knows it - one append, pipelined with the others; only when the session moved
on meanwhile is the claim decided again from the session's history (at most
`retry.READ_LIMIT` such reads at once). Replicas and self-claiming agents may
race: one claim wins per session, the others lose their compare-and-set and
move on. A session whose write failed waits a backoff before it is planned again.

What a plan starts from is kept as it changes, not recomputed: each agent's
eligibility (`reclaim_rules.ineligible`, the one rule) is judged again only when
the agent has an event, beats while ineligible, or reaches the moment its
silence alone would make it ineligible (`reclaim_rules.eligible_until`, a
deadline); the load of each agent follows the session changes. With nothing
changed and nothing due, a tick does no work at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from datetime import datetime

from ledger import decide
from ledger import events as ev
from ledger import lifecycle as lc
from ledger.errors import IllegalTransition, LedgerError, NotClaimable, NotFound, StaleToken
from ledger.writer import Writer
from projections.health import DEFAULT_POLICY, HealthPolicy
from projections.state import AGENT, HEARTBEAT, POOL, SESSION, Change

from . import reclaim_rules as rules
from .deadlines import Deadlines
from .errors import Moved, moved_on_conflict
from .follow import Follower
from .partition import EVERYTHING, Partition
from .reactor import Reactor
from .retry import Backoff, BoundedReads

log = logging.getLogger(__name__)

INFLIGHT_PATIENCE = 10.0
"""Seconds a session stays out of planning while our write for it is not yet seen in the log."""
MAX_WRITES = 256
"""Claims and orphanings in flight at once (a large backlog waits its turn; a cancel finds few to stop)."""


class Reclaimer(Reactor):
    kinds = (AGENT, SESSION, POOL, HEARTBEAT)

    def __init__(self, ledger: Writer, follower: Follower, *, tick: float = 0.5, partition: Partition = EVERYTHING,
                 policy: HealthPolicy = DEFAULT_POLICY, reads: BoundedReads | None = None) -> None:
        super().__init__(follower, tick=tick)
        self.ledger = ledger
        self.policy = policy
        """Who is healthy enough to take sessions: the liveness monitor's policy (`ConsumerGroup` passes it)."""
        self.reads = reads or BoundedReads()
        self.partition = partition
        """The pools whose sessions this replica places (another replica places the rest)."""
        self.backoff = Backoff[str]()
        """Sessions whose write failed: left out of the plans until their retry is due."""
        self._inflight: dict[str, tuple[int, tuple[str, int] | None]] = {}
        """session id -> (its last sequence when we wrote, the agent and incarnation we claimed it for)
        until the log shows it moved."""
        self._patience = Deadlines[str]()
        """session id -> when (monotonic) to stop waiting for the log to show our write."""
        self._load: dict[tuple[str, int], int] | None = None
        """(agent, incarnation) -> sessions assigned to it, kept from the session changes (None: not counted yet)."""
        self._waiting: set[str] = set()
        self._held: dict[tuple[str, int], set[str]] = {}
        self._where: dict[str, tuple[str, int] | None] = {}
        """What a plan looks at, kept from the session changes with `_load`: the sessions waiting for an owner,
        and the assigned ones by (owner, incarnation) - a plan takes those of an owner the one take-over rule
        says may be replaced (it holds for all of them or none). A log's sessions are mostly ended or well held:
        planning over every session of the fold cost a failover of 1,000 sessions ~25 ms a plan on a log of
        50 k ended ones, and a plan follows every batch while a failover is acked."""
        self._touched: dict[str, lc.SessionState | None] = {}
        """Sessions changed since the last step, with their state before the first of those changes."""
        self._able: dict[str, tuple[tuple[str, str, str], decide.AgentRef, int]] = {}
        """Agents that may take sessions: (pool, platform, region), who, capacity - as last judged."""
        self._healthy_until = Deadlines[str]()
        """Eligible agent -> when (server time) its silence alone would make it ineligible: judged again then."""
        self._noted: set[str] = set()
        """Agents with an event since the last step: judged again."""
        self._beaten: set[str] = set()
        """Agents that beat since the last step: an eligible one only has its deadline moved (see `_refresh`)."""
        self._replan = True
        self._slots = asyncio.Semaphore(MAX_WRITES)
        self.writes = 0
        """Events written (for status and tests; counted, not kept, so a long-running reclaimer stays small)."""
        self.assessed = 0
        """Agents judged (for tests: only those that changed or whose deadline passed are)."""
        self.plans = 0

    def changed(self, change: Change) -> bool:
        if change.kind == HEARTBEAT:
            self._beaten.add(change.id)
            return False  # a beat changes the agent's eligibility at most: the next tick judges it again
        if change.kind == SESSION:
            self._touched.setdefault(change.id, change.before)
        elif change.kind == AGENT:
            self._noted.add(change.id)
        self._replan = True  # an agent's, a session's or a pool's event: sessions may need a new owner
        return True

    # --- what the plan starts from, kept as it changes ------------------------------------------

    def _count_load(self) -> dict[tuple[str, int], int]:
        load = self._load
        sessions = self.follower.state.ledger.sessions
        if load is None:
            load = self._load = defaultdict(int)
            for s in sessions.values():
                if s.status == lc.S_ASSIGNED and s.owner is not None:
                    load[(s.owner, s.owner_incarnation or 0)] += 1
            for sid, s in sessions.items():
                self._index(sid, s)
            self._touched.clear()
            return load
        for sid, before in self._touched.items():
            self._index(sid, sessions.get(sid))
            pair: tuple[tuple[lc.SessionState | None, int], ...] = ((before, -1), (sessions.get(sid), 1))
            for one, by in pair:
                if one is not None and one.status == lc.S_ASSIGNED and one.owner is not None:
                    key = (one.owner, one.owner_incarnation or 0)
                    load[key] += by
                    if not load[key]:
                        del load[key]
        self._touched.clear()
        return load

    def _index(self, sid: str, state: lc.SessionState | None) -> None:
        """File `sid` where a plan finds it: waiting, held by (owner, incarnation), or nowhere."""
        if sid in self._where:
            old = self._where.pop(sid)
            if old is None:
                self._waiting.discard(sid)
            else:
                held = self._held[old]
                held.discard(sid)
                if not held:
                    del self._held[old]
        if state is None:
            return
        if state.status in (lc.S_PENDING, lc.S_ORPHANED):
            self._where[sid] = None
            self._waiting.add(sid)
        elif state.status == lc.S_ASSIGNED and state.owner is not None:
            key = (state.owner, state.owner_incarnation or 0)
            self._where[sid] = key
            self._held.setdefault(key, set()).add(sid)

    def _candidates(self) -> list[lc.SessionState]:
        """The sessions a plan may act on: waiting ones, and those of owners that may be replaced."""
        sessions, agents = self.follower.state.ledger.sessions, self.follower.state.ledger.agents
        out = [sessions[sid] for sid in self._waiting if sid in sessions]
        for (owner, _), sids in self._held.items():
            sample = sessions.get(next(iter(sids)))
            if sample is not None and lc.owner_replaceable(sample, agents.get(owner)) is not None:
                out += [sessions[sid] for sid in sids if sid in sessions]
        return out

    def _assess(self, agent_id: str, now: datetime) -> bool:
        """Judge one agent with `reclaim_rules.ineligible` (the one rule); whether what the plan sees changed."""
        self.assessed += 1
        state = self.follower.state
        a = state.ledger.agents.get(agent_id)
        beat = state.heartbeats.beats.get(agent_id)
        was = self._able.get(agent_id)
        if a is None or rules.ineligible(a, beat, now, policy=self.policy) is not None:
            self._able.pop(agent_id, None)
            self._healthy_until.discard(agent_id)
            return was is not None
        able = ((a.pool, a.platform, a.region), decide.AgentRef(a.agent_id, a.instance_id, a.incarnation,
                                                           lc.placement_of(a)), a.capacity)
        self._able[agent_id] = able
        until = rules.eligible_until(a, beat, self.policy).timestamp()
        self._healthy_until.set(agent_id, max(until, now.timestamp() + self.tick))
        return was != able

    def eligible(self, now: datetime) -> dict[tuple[str, str, str], list[rules.Capacity]]:
        """Agents that may take sessions now, with their load, by (pool, platform, region).

        Only the agents that changed since the last call, or whose health deadline passed, are judged again.
        """
        self._refresh(now)
        return self._capacities()

    def _refresh(self, now: datetime) -> None:
        if self._load is None:  # the first: every agent of the fold
            self._noted.clear()
            self._beaten.clear()
            for agent_id in self.follower.state.ledger.agents:
                self._assess(agent_id, now)
            self._count_load()
            self._replan = True
            return
        self._count_load()
        due, self._noted = self._noted, set()
        beaten, self._beaten = self._beaten - due, set()
        beats, agents = self.follower.state.heartbeats.beats, self.follower.state.ledger.agents
        for agent_id in beaten:
            agent = agents.get(agent_id)
            if agent_id in self._able and agent is not None:
                # A newer beat never makes an eligible agent ineligible (it is younger, and it clears a
                # suspicion): only the moment its silence would is later now - unless the beat names another
                # incarnation, which `eligible_until` does not count (that moment may then be now).
                until = rules.eligible_until(agent, beats.get(agent_id), self.policy).timestamp()
                self._healthy_until.set(agent_id, max(until, now.timestamp() + self.tick))
            else:
                due.add(agent_id)
        due.update(self._healthy_until.pop_due(now.timestamp()))
        for agent_id in due:
            if self._assess(agent_id, now):
                self._replan = True

    def _capacities(self) -> dict[tuple[str, str, str], list[rules.Capacity]]:
        load = self._count_load()
        # Our claims not yet seen in the log count too: pipelined claims of consecutive plans would otherwise
        # all see the same free capacity and push an agent past it.
        claimed: dict[tuple[str, int], int] = defaultdict(int)
        for _, claimed_for in self._inflight.values():
            if claimed_for is not None:
                claimed[claimed_for] += 1
        out: dict[tuple[str, str, str], list[rules.Capacity]] = defaultdict(list)
        for key, who, capacity in self._able.values():
            mine = (who.agent_id, who.incarnation)
            out[key].append(rules.Capacity(agent=who, load=load.get(mine, 0) + claimed.get(mine, 0),
                                           capacity=capacity))
        return out

    async def step(self, now: datetime) -> list[rules.Action]:
        """Plan (when anything the plan depends on changed) and write what the plan says; returns the plan."""
        sessions = self.follower.state.ledger.sessions
        clock = time.monotonic()
        t = now.timestamp()
        for sid in self._patience.pop_due(clock):
            self._inflight.pop(sid, None)
            self._replan = True
        for sid in list(self._touched):
            seen = self._inflight.get(sid)
            current = sessions.get(sid)
            if seen is not None and (current is None or current.last_seq > seen[0]):
                del self._inflight[sid]
                self._patience.discard(sid)
        if self.backoff.pop_due(t):
            self._replan = True
        self._refresh(now)
        if not self._replan:
            return []
        self._replan = False
        self.plans += 1
        skip = set(self._inflight) | self.backoff.waiting(t)
        part = self.partition
        candidates = self._candidates()
        mine = candidates if part.everything else [s for s in candidates if part.owns(s.pool)]
        actions = rules.plan(mine, self.follower.state.ledger.agents, self._capacities(),
                             self.follower.state.ledger.pools, skip=skip)
        writes = [a for a in actions if not isinstance(a, rules.Hold)]
        for a in writes:
            claimed_for = (a.agent.agent_id, a.agent.incarnation) if isinstance(a, rules.ClaimFor) else None
            self._inflight[a.session_id] = (sessions[a.session_id].last_seq, claimed_for)
            self._patience.set(a.session_id, clock + INFLIGHT_PATIENCE)
        if writes:
            await asyncio.gather(*(self._write(a, t) for a in writes))
        return actions

    async def _write(self, action: rules.ClaimFor | rules.Orphan, t: float) -> None:
        sid = action.session_id
        state = self.follower.state.ledger.sessions.get(sid)
        try:
            async def read(floor: int | None) -> tuple[lc.SessionState | None, int]:
                return await self.reads.run(lambda: self.ledger.session(sid, min_last_seq=floor))

            # Decided on the fold, guarded by its last sequence: no read unless the session moved meanwhile.
            async with self._slots:
                with moved_on_conflict("session", sid):
                    await self.ledger.cas(read, lambda current: self._event(action, current),
                                          known=(state, state.last_seq if state else 0))
            self.writes += 1
            self.backoff.succeeded(sid)
        except (NotClaimable, NotFound, Moved) as e:
            log.debug("%s: %s", sid, e)  # someone else acted first
            self._forget_write(sid)
            self.backoff.succeeded(sid)
        except LedgerError as e:
            at = self.backoff.failed(sid, t)
            log.warning("reclaim of %s failed (again in %.1fs): %s", sid, at - t, e)
            self._forget_write(sid)

    def _forget_write(self, sid: str) -> None:
        self._inflight.pop(sid, None)
        self._patience.discard(sid)
        self._replan = True

    def _event(self, action: rules.ClaimFor | rules.Orphan, state: lc.SessionState | None) -> ev.Event:
        producer = self.ledger.producer
        if isinstance(action, rules.ClaimFor):
            return decide.decide_claim(state, action.session_id, action.agent, producer=producer,
                                       reason=action.reason, previous_token=action.previous_token,
                                       causation_id=action.cause_id)
        try:
            return decide.decide_orphan(state, action.session_id, producer=producer, reason=action.reason,
                                        previous_token=action.previous_token, previous_owner=action.previous_owner,
                                        causation_id=action.cause_id)
        except (StaleToken, IllegalTransition) as e:  # no longer assigned under that token: nothing to orphan
            raise Moved("session", action.session_id, str(e)) from e
