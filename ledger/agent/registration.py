"""Registering: every process start is a new incarnation (the sequence of its registration), and a fenced one
registers again - by compare-and-set on our registration subject, so a late one never supersedes another process.
Also what the watch knows of every agent's registrations, which the fold's incarnation check needs."""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ledger import cancellation, subjects
from ledger import events as ev
from ledger import lifecycle as lc
from ledger.codec import Recorded
from ledger.errors import LedgerError
from ledger.writer import Writer

if TYPE_CHECKING:
    from .handle import Agent

log = logging.getLogger(__name__)

GOODBYE_TIMEOUT = 5.0
PREFETCH_CONCURRENCY = 32
"""Histories read at once (registrations of the agents a batch names, sessions a batch hands us)."""


def outcome_seen(future: asyncio.Future[int]) -> None:
    """For an append nobody may wait for to the end (the fenced record, a registration a goodbye gives up on):
    its failure is expected and handled elsewhere, not asyncio's "Future exception was never retrieved"."""
    if not future.cancelled():
        future.exception()


MAX_KNOWN_AGENTS = 1024
"""Agents whose registrations the watch keeps (besides its own): the oldest learnt is let go first, and read again
if a judged event needs it again. Forged claims for made-up agents never reach it (the rule asks a claimer's
registrations only for a claim that may apply), yet nothing a client writes may grow the watch for ever."""


class KnownRegistrations:
    """Registrations (ascending, as registered: `lifecycle.as_registered`) of each agent a judged session event
    needed: read once per agent, then kept current by the watch, which follows every registration. Reading them
    per judged event let a session full of forged claimers cost a read per claimer, each time. At most
    MAX_KNOWN_AGENTS of them besides our own."""

    def __init__(self, ledger: Writer, own: str) -> None:
        self._ledger = ledger
        self._own = own
        self.table: OrderedDict[str, list[lc.AgentState]] = OrderedDict()
        """agent id -> its registrations as registered: what a `lifecycle.SessionFold` judging for the watch reads
        (and learns into)."""

    @property
    def known(self) -> dict[str, list[int]]:
        """agent id -> the sequences of its registrations (its incarnations)."""
        return {a: [r.incarnation for r in regs] for a, regs in self.table.items()}

    def note(self, rec: Recorded) -> None:
        """A registration the watch (or our own append) saw land: kept if its agent is known."""
        regs = self.table.get(rec.event.entity_id)
        if regs is None:
            return  # not known yet: read whole when first needed (a partial list would mislead the lookup)
        for registered in lc.as_registered([rec]):
            seqs = [r.incarnation for r in regs]
            i = bisect.bisect_left(seqs, registered.incarnation)
            if i == len(seqs) or seqs[i] != registered.incarnation:
                regs.insert(i, registered)

    def newest(self, agent_id: str) -> int | None:
        regs = self.table.get(agent_id)
        return regs[-1].incarnation if regs else None

    async def learn(self, agents: Iterable[str], floor: int) -> None:
        """Read, once per agent, its registrations up to (at least) `floor`; the watch delivers later ones."""
        missing = sorted({a for a in agents if a not in self.table})
        for i in range(0, len(missing), PREFETCH_CONCURRENCY):
            chunk = missing[i:i + PREFETCH_CONCURRENCY]
            found = await asyncio.gather(*(self._ledger.store.registered(a, min_last_seq=floor) for a in chunk))
            for agent_id, records in zip(chunk, found, strict=False):
                if agent_id not in self.table:
                    self.table[agent_id] = lc.as_registered(records)
        self.trim()

    def trim(self) -> None:
        while len(self.table) > MAX_KNOWN_AGENTS + 1:
            oldest = next(iter(self.table))
            if oldest == self._own:
                self.table.move_to_end(oldest)  # ours is never let go: re-registering expects its newest
                continue
            del self.table[oldest]


class Registration:
    """This process's registrations: the first, the re-registration in flight, and the check that no other
    process registered our agent id since."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent
        self.in_flight: tuple[asyncio.Future[int], float, ev.AgentRegistered] | None = None
        """A re-registration sent and not yet settled: (its future, when it started, the event)."""
        self.fence_record: ev.AgentFenced | None = None
        """The fence we decided alone, written just before registering again."""
        self.own_subject = subjects.event_subject("agent", agent.agent_id, "registered", agent.agent_id)
        """Our registrations' subject. Only the agent itself may register it (the folds flag a registration
        published by another producer, on `...registered.<other>`), so this alone is what our re-registration's
        compare-and-set must expect."""
        self.unreadable = 0
        """Newest unreadable message on our registration subject the watch skipped: no registration to any
        reader, yet the subject's last sequence, which our re-registration's compare-and-set must expect."""

    def event(self) -> ev.AgentRegistered:
        a = self._agent
        return ev.AgentRegistered(
            producer=a.producer, agent_id=a.agent_id, instance_id=a.instance_id, pool=a.pool,
            platform=a.platform, region=a.region, labels=a.labels, capacity=a.capacity,
            heartbeat_interval=a.lease.heartbeat, ttl=a.lease.ttl,
        )

    async def first(self) -> None:
        started = time.monotonic()
        registration = self.event()
        self._agent._adopt(await self._agent.store.append(registration), started, registration)

    async def again(self) -> None:
        """Register a new incarnation; an attempt in flight is never abandoned (it may still land)."""
        a = self._agent
        if self.in_flight is None:
            started = time.monotonic()
            try:
                if self.fence_record is not None:
                    # Write down the decision we took alone, then come back as a new incarnation.
                    (await a.store.submit(self.fence_record)).add_done_callback(outcome_seen)
                    self.fence_record = None
                registration = self.event()
                # Only if nobody registered this agent id since the newest registration we know of: one that
                # landed late, after another process took over, would supersede that process in turn.
                newest = a.watch.registrations.newest(a.agent_id) or a.incarnation
                future = await a.store.submit(registration, expect=max(newest, self.unreadable),
                                              expect_filter=self.own_subject)
                future.add_done_callback(outcome_seen)  # a goodbye may stop waiting for it (see settle_pending)
            except LedgerError as e:
                log.debug("%s: cannot register yet: %s", a.agent_id, e)
                await asyncio.sleep(min(a.lease.heartbeat, 1.0))
                return
            self.in_flight = (future, started, registration)
        future, started, registration = self.in_flight
        done, _ = await asyncio.wait({future}, timeout=a.lease.heartbeat)
        if not done:
            return
        self.in_flight = None
        if future.exception() is not None:
            # Conflict: a registration we have not seen yet; the watch brings it (and says if we were superseded).
            log.debug("%s: registration failed: %s", a.agent_id, future.exception())
            await asyncio.sleep(min(a.lease.heartbeat, 1.0))
            return
        a._adopt(future.result(), started, registration)

    def is_pending(self, event_id: str) -> bool:
        return self.in_flight is not None and self.in_flight[2].event_id == event_id

    async def settle_pending(self) -> None:
        """A re-registration still in flight may land after our goodbye: a new incarnation that never beats,
        declared dead later. Wait for it (briefly), so the goodbye is said for the newest incarnation."""
        if self.in_flight is None:
            return
        future, started, registration = self.in_flight
        try:
            incarnation = await cancellation.wait_for(asyncio.shield(future), GOODBYE_TIMEOUT)
        except (TimeoutError, LedgerError):
            return
        self._agent._adopt(incarnation, started, registration)

    async def check_not_superseded(self) -> None:
        """Only a later registration by another process supersedes us. The floor (our own incarnation) keeps a
        lagging replica from answering: one that has not even seen our registration proves nothing. Read on our
        own subject only, as every fold reads registrations: one another client wrote in our name is no
        registration (and a wildcard read costs the server a scan of everything since our first registration)."""
        a = self._agent
        records = await a.store.registered(a.agent_id, min_last_seq=a.incarnation)
        seen = {r.seq: r.event.instance_id for r in records if isinstance(r.event, ev.AgentRegistered)}
        newer = lc.superseded_by(seen.items(), a.incarnation, a.instance_id)
        if newer is not None:
            a._fence(f"superseded by instance {seen[newer]} (incarnation {newer})", superseded=True)
            a._check_may_act()
