"""The reference agent process behind `ledger agent`: an Agent that claims its pool's sessions itself.

It follows the lifecycle stream (and its own heartbeats) into a LedgerState
and, whenever something changes (or every heartbeat interval), asks the
reclaimer's own rules what needs an owner - with itself as the only candidate,
and only while the reclaimer's eligibility rule would choose it: never while
the log says it is gone, dead, fenced, draining, suspect or superseded - and
claims it, up to its capacity. So it takes exactly what the reclaimer would give it: pending and
orphaned sessions, those of agents that said goodbye, were declared dead
(unless the pool's breaker is open) or were replaced, and drain hand-offs.
Claims race with other agents and reclaimers; the compare-and-set picks one
winner, the losers move on. A more loaded agent waits a moment before
claiming, so the least loaded tends to win; the order is shuffled so agents
do not all reach for the same session first.

With an address template the process reports each session it gains as
running at an address (it runs nothing itself: the report stands in for a
workload starting), so the route watchdog can warm the session's routes up;
with health reports it says each route of its sessions that has a probe is
healthy, at the probe's period, so the route runs - and goes stale when the
agent dies, until the session's next owner reports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from datetime import datetime

from consumers import reclaim_rules as rules
from consumers.follow import Follower
from consumers.idle import IdleReaper
from ledger import cancellation
from ledger import events as ev
from ledger import lifecycle as lc
from ledger.agent import Agent, Claim
from ledger.codec import Item
from ledger.errors import CapacityExhausted, Conflict, Draining, Fenced, LedgerError, NotClaimable, NotFound
from ledger.writer import Writer
from projections.health import DEFAULT_POLICY, HealthPolicy
from projections.state import Change

log = logging.getLogger(__name__)

STAGGER_PER_SESSION = 0.01
"""Seconds a claimer waits per session it already owns before claiming more."""
HEALTH_TICK = 0.1
"""Seconds between looks for routes whose probe period has passed since their last report."""


class SelfClaimer:
    def __init__(self, agent: Agent, say: Callable[[str], None], policy: HealthPolicy = DEFAULT_POLICY,
                 on_claimed: Callable[[str], None] | None = None) -> None:
        self.agent = agent
        self.say = say
        self.on_claimed = on_claimed
        self.policy = policy
        """The operator's liveness policy, the reclaimer's: a claimer judges itself as the reclaimer judges it."""
        # Its own beats only: it judges itself with the reclaimer's rule, which needs its newest beat.
        self.follower = Follower(agent.store, heartbeats_of=agent.agent_id)
        self._ineligible: str | None = None
        self.follower.listen(self._heard)
        self._changed = asyncio.Event()

    def _heard(self, stream: str, batch: list[Item], changes: list[Change]) -> None:
        self._changed.set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.follower.run())
            tasks.create_task(self._claim_loop())

    async def _claim_loop(self) -> None:
        await self.follower.caught_up.wait()
        while True:
            cancellation.raise_if_cancelled()  # a cancel that nats-py swallowed in the last claim still stops us
            with contextlib.suppress(asyncio.TimeoutError):
                await cancellation.wait_for(self._changed.wait(), self.agent.heartbeat)
            self._changed.clear()
            await self.claim_what_needs_an_owner()

    def wanted(self, now: datetime | None = None) -> list[rules.ClaimFor]:
        """What the reclaimer's rules would give this agent at `now` (default: the server's now): nothing unless
        the reclaimer would choose it."""
        agent, state = self.agent, self.follower.state.ledger
        now = now if now is not None else self.follower.clock.now(ev.utcnow)
        why = rules.ineligible(state.agents.get(agent.agent_id), self.follower.state.heartbeats.beats.get(
            agent.agent_id), now, incarnation=agent.incarnation, policy=self.policy)
        if why != self._ineligible:
            self._ineligible = why
            if why is not None:
                log.info("%s: not claiming: %s", agent.agent_id, why)
        if why is not None:
            return []
        me = rules.Capacity(agent=agent.ref, load=agent.load, capacity=agent.capacity)
        plan = rules.plan(state.sessions.values(), state.agents, {(agent.pool, agent.platform, agent.region): [me]},
                          state.pools, skip=set(agent.owned))
        return [a for a in plan if isinstance(a, rules.ClaimFor)]

    async def claim_what_needs_an_owner(self) -> None:
        agent = self.agent
        if agent.fenced or agent.draining:
            return
        wanted = self.wanted()
        random.shuffle(wanted)
        for c in wanted:
            if agent.load >= agent.capacity:
                return
            if agent.load:
                await asyncio.sleep(min(0.2, STAGGER_PER_SESSION * agent.load))
            try:
                claim = await agent.claim(c.session_id, reason=c.reason, previous_token=c.previous_token,
                                          causation_id=c.cause_id)
            except (NotClaimable, Conflict, NotFound):
                continue  # another claimer was faster, or the session moved on
            except (Fenced, Draining, CapacityExhausted):
                return
            except LedgerError as e:
                log.warning("claim of %s failed: %s", c.session_id, e)
                continue
            origin = f" from {c.previous_owner}" if c.previous_owner else ""
            self.say(f"claimed {c.session_id} (token {claim.token}, {c.reason}{origin}); "
                     f"load {agent.load}/{agent.capacity}")
            if self.on_claimed is not None:
                self.on_claimed(c.session_id)


class ResourceReporter:
    """Reports each session the agent gains as running at `template` ({agent} and {session} filled in)."""

    def __init__(self, agent: Agent, template: str | None, say: Callable[[str], None]) -> None:
        self.agent, self.template, self.say = agent, template, say
        self._tasks: set[asyncio.Task[None]] = set()

    def gained(self, session_id: str) -> None:
        if self.template is None:
            return
        task = asyncio.create_task(self._report(session_id, address(self.template, self.agent.agent_id, session_id)))
        self._tasks.add(task)  # held until done: the loop keeps only a weak reference
        task.add_done_callback(self._tasks.discard)

    async def _report(self, session_id: str, at: str) -> None:
        try:
            await self.agent.report_resource(session_id, f"{self.agent.agent_id}/{session_id}", address=at)
        except LedgerError as e:  # lost it meanwhile, or fenced: the new owner reports its own
            log.warning("resource of %s not reported: %s", session_id, e)
            return
        self.say(f"{session_id} runs at {at}")

    async def stop(self) -> None:
        await cancellation.stop(list(self._tasks))


class HealthReporter:
    """Reports each probed route of the agent's sessions healthy, once per probe period, while it warms up or runs.

    The routes come from the log the self-claimer follows; the reference agent serves nothing, so "healthy"
    means "its owner is alive" - which is what a failover shows: the dead owner's routes go stale.
    """

    def __init__(self, agent: Agent, follower: Follower) -> None:
        self.agent, self.follower = agent, follower
        self._reported: dict[str, float] = {}

    async def run(self) -> None:
        await self.follower.caught_up.wait()
        while True:
            cancellation.raise_if_cancelled()
            await self.report_due(time.monotonic())
            await asyncio.sleep(HEALTH_TICK)

    async def report_due(self, now: float) -> None:
        owned = self.agent.owned
        for route in list(self.follower.state.ledger.routes.values()):
            if route.probe is None or route.session_id not in owned or route.state not in (lc.WARMING_UP, lc.RUNNING):
                continue
            if now - self._reported.get(route.route_id, -route.probe.period) < route.probe.period:
                continue
            self._reported[route.route_id] = now
            try:
                await self.agent.report_health(route.route_id, healthy=True,
                                               detail=f"{self.agent.agent_id} serves it")
            except LedgerError as e:  # lost the session meanwhile: its next owner reports
                log.debug("health of route %s not reported: %s", route.route_id, e)


PROGRESS = b"progress="
"""The reference agent's checkpoint: `progress=<N>`, a counter of the work units done on the session so far."""


def progress_of(checkpoint: lc.Checkpoint | None) -> int | None:
    """The counter a checkpoint of the reference agent's holds (None: no checkpoint, or another program's)."""
    if checkpoint is None or not checkpoint.data.startswith(PROGRESS):
        return None
    digits = checkpoint.data[len(PROGRESS):]
    return int(digits) if digits.isdigit() and len(digits) <= 18 else None


class Progress:
    """A stand-in for real work: one unit per session per `every` seconds, checkpointed after each, so the
    session's next owner (after a failover or a drain) resumes from the last checkpoint instead of from zero."""

    def __init__(self, agent: Agent, every: float, say: Callable[[str], None]) -> None:
        self.agent, self.every, self.say = agent, every, say
        self.done: dict[str, int] = {}
        """Session -> work units done on it (by all its owners, as far as the checkpoints tell)."""

    def gained(self, claim: Claim) -> None:
        n = progress_of(claim.checkpoint)
        self.done[claim.session_id] = n or 0
        if n is not None and claim.checkpoint is not None:
            self.say(f"resuming {claim.session_id} from checkpoint {n} "
                     f"(#{claim.checkpoint.seq}, written by {claim.checkpoint.agent_id})")

    async def run(self) -> None:
        while True:
            cancellation.raise_if_cancelled()
            await asyncio.sleep(self.every)
            await self.step()

    async def step(self) -> None:
        owned = self.agent.owned
        for sid in [s for s in self.done if s not in owned]:
            del self.done[sid]  # lost: its next owner goes on from our last checkpoint
        for sid, claim in owned.items():
            n = self.done.setdefault(sid, progress_of(claim.checkpoint) or 0) + 1
            try:
                await self.agent.checkpoint(sid, PROGRESS + str(n).encode(), note=f"{n} unit(s) done")
            except LedgerError as e:  # lost it meanwhile, or fenced: the work unit is not counted
                log.info("checkpoint of %s not written: %s", sid, e)
                continue
            self.done[sid] = n


def address(template: str, agent_id: str, session_id: str) -> str:
    """The address a session runs at; KeyError, IndexError or ValueError for a template that names other fields."""
    return template.format(agent=agent_id, session=session_id)


async def run(ledger: Writer, *, agent_id: str, pool: str, platform: str, region: str, capacity: int,
              heartbeat: float, ttl: float, say: Callable[[str], None], self_claim: bool = True,
              policy: HealthPolicy | None = None, address_template: str | None = None,
              report_health: bool = False, checkpoint_every: float | None = None) -> None:
    """Run until SIGTERM or SIGINT, then say goodbye once.

    Without `self_claim` the agent only runs what reclaimers give it (push mode):
    it does not fold the whole log, so it starts at once however long the log is.
    `policy`: the liveness policy the consumers use; None: from the environment
    (LEDGER_SUSPECT_AFTER_MISSED, LEDGER_DEAD_AFTER), as `ledger consumers` and `ledger up` read it.
    `address_template`: report each session gained as running there (`address`); None: report nothing.
    `report_health`: report the probed routes of its sessions healthy (needs `self_claim`: it reads the routes).
    `checkpoint_every`: do a unit of (pretend) work on each session every so many seconds and checkpoint the count
    (`Progress`); a session gained with a checkpoint resumes from it. None: no work, no checkpoints.
    """
    policy = policy if policy is not None else HealthPolicy.from_env()
    agent = Agent(ledger, agent_id=agent_id, pool=pool, platform=platform, region=region, capacity=capacity,
                  heartbeat=heartbeat, ttl=ttl, handle_signals=True,
                  on_fenced=lambda why: say(f"fenced: {why}"),
                  on_lost=lambda sid, why: say(f"lost {sid}: {why}"),
                  on_gained=lambda claim, by: gained(claim, by))
    reporter = ResourceReporter(agent, address_template, say)
    progress = Progress(agent, checkpoint_every, say) if checkpoint_every is not None else None

    def gained(claim: Claim, by: str) -> None:
        say(f"now owns {claim.session_id} (token {claim.token}, {claim.reason}, claimed by {by})")
        got(claim.session_id)

    def got(session_id: str) -> None:
        """A session became ours (given by a reclaimer, or claimed ourselves)."""
        reporter.gained(session_id)
        claim = agent.owned.get(session_id)
        if progress is not None and claim is not None:
            progress.gained(claim)

    async with agent:
        say(f"registered {agent_id} (incarnation {agent.incarnation}) in pool {pool}/{platform}/{region}, "
            f"capacity {capacity}, heartbeat {heartbeat:g} s, ttl {ttl:g} s")
        running = [asyncio.create_task(IdleReaper(agent).run())]
        if self_claim:
            claimer = SelfClaimer(agent, say, policy, got)
            running.append(asyncio.create_task(claimer.run()))
            if report_health:
                running.append(asyncio.create_task(HealthReporter(agent, claimer.follower).run()))
        if progress is not None:
            running.append(asyncio.create_task(progress.run()))
        try:
            await agent.wait_stopped()
        finally:
            await cancellation.stop(running)
            await reporter.stop()
        say(f"stopping: saying goodbye (owned {agent.load} session(s))")
    said = "goodbye written" if agent.goodbye_seq is not None else f"no goodbye written ({agent.fenced or 'no ack'})"
    say(f"{said}; bye")
