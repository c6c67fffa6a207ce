"""The orphan reclaimer: gives every session that needs an owner to a healthy agent of its pool.

It reacts within milliseconds: after every batch that changed an agent, a
session or a pool it plans (`consumers.reclaim_rules`) and writes. Each claim
is a compare-and-set on the session's last sequence as the in-memory state
knows it - one append, pipelined with the others; when the session moved on
meanwhile, the claim is decided again from the session's history. Replicas and
self-claiming agents may race: one claim wins per session, the others lose
their compare-and-set and move on.
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
from ledger.errors import Conflict, IllegalTransition, LedgerError, NotClaimable, NotFound, StaleToken
from ledger.writer import Writer
from projections.health import DEFAULT_POLICY, HealthPolicy
from projections.state import AGENT, POOL, SESSION

from . import reclaim_rules as rules
from .errors import Moved, moved_on_conflict
from .follow import Follower
from .reactor import Reactor

log = logging.getLogger(__name__)

INFLIGHT_PATIENCE = 10.0
"""Seconds a session stays out of planning while our write for it is not yet seen in the log."""


class Reclaimer(Reactor):
    kinds = (AGENT, SESSION, POOL)

    def __init__(self, ledger: Writer, follower: Follower, *, tick: float = 0.5,
                 policy: HealthPolicy = DEFAULT_POLICY) -> None:
        super().__init__(follower, tick=tick)
        self.ledger = ledger
        self.policy = policy
        """Who is healthy enough to take sessions: the liveness monitor's policy (`ConsumerGroup` passes it)."""
        self._inflight: dict[str, tuple[int, float, tuple[str, int] | None]] = {}
        """session id -> (its last sequence when we wrote, when, the agent and incarnation we claimed it for)
        until the log shows it moved."""
        self.writes = 0
        """Events written (for status and tests; counted, not kept, so a long-running reclaimer stays small)."""

    def eligible(self, now: datetime) -> dict[tuple[str, str, str], list[rules.Capacity]]:
        """Agents that may take sessions now, with their load, by (pool, platform, region)."""
        state = self.follower.state
        load: dict[tuple[str, int], int] = defaultdict(int)
        for s in state.ledger.sessions.values():
            if s.status == lc.S_ASSIGNED and s.owner is not None:
                load[(s.owner, s.owner_incarnation or 0)] += 1
        # Our claims not yet seen in the log count too: pipelined claims of consecutive plans would otherwise
        # all see the same free capacity and push an agent past it.
        for _, _, claimed_for in self._inflight.values():
            if claimed_for is not None:
                load[claimed_for] += 1
        out: dict[tuple[str, str, str], list[rules.Capacity]] = defaultdict(list)
        for a in state.ledger.agents.values():
            if rules.ineligible(a, state.heartbeats.beats.get(a.agent_id), now, policy=self.policy) is not None:
                continue
            out[(a.pool, a.platform, a.region)].append(rules.Capacity(
                agent=decide.AgentRef(a.agent_id, a.instance_id, a.incarnation),
                load=load[(a.agent_id, a.incarnation)], capacity=a.capacity))
        return out

    async def step(self, now: datetime) -> list[rules.Action]:
        """Plan once and write what the plan says; returns the plan."""
        sessions = self.follower.state.ledger.sessions
        clock = time.monotonic()
        for sid, (seq, since, _) in list(self._inflight.items()):
            current = sessions.get(sid)
            if current is None or current.last_seq > seq or clock - since > INFLIGHT_PATIENCE:
                del self._inflight[sid]
        actions = rules.plan(sessions.values(), self.follower.state.ledger.agents, self.eligible(now),
                             self.follower.state.ledger.pools, skip=set(self._inflight))
        writes = [a for a in actions if not isinstance(a, rules.Hold)]
        for a in writes:
            claimed_for = (a.agent.agent_id, a.agent.incarnation) if isinstance(a, rules.ClaimFor) else None
            self._inflight[a.session_id] = (sessions[a.session_id].last_seq, clock, claimed_for)
        if writes:
            await asyncio.gather(*(self._write(a) for a in writes))
        return actions

    async def _write(self, action: rules.ClaimFor | rules.Orphan) -> None:
        state = self.follower.state.ledger.sessions.get(action.session_id)
        try:
            event = self._event(action, state)
            try:
                await self.ledger.append(event, expect=state.last_seq if state else 0)
            except Conflict:
                event = await self._decide_again(action)
            self.writes += 1
        except (NotClaimable, NotFound, Moved) as e:
            log.debug("%s: %s", action.session_id, e)  # someone else acted first
            self._inflight.pop(action.session_id, None)
        except LedgerError as e:
            log.warning("reclaim of %s failed: %s", action.session_id, e)
            self._inflight.pop(action.session_id, None)

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

    async def _decide_again(self, action: rules.ClaimFor | rules.Orphan) -> ev.Event:
        """The session moved since our view of it: decide from its history instead."""
        read = lambda m: self.ledger.session(action.session_id, min_last_seq=m)  # noqa: E731
        with moved_on_conflict("session", action.session_id):
            _, event = await self.ledger.cas(read, lambda state: self._event(action, state))
        return event
