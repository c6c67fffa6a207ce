"""Draining: take no new claims, hand the sessions off, and say `drained` once none is left.

A drain this process asked for outlives a re-registration: coming back as a new incarnation (after a goodbye or
a death written about us, say) must not undo it, or any claimer could give us sessions again. Each incarnation's
`draining`, then its `drained`, is written until the log has it: a write that failed (the server was electing,
or refused it) is tried again with the next heartbeat, never dropped after one warning.

An operator asks for a drain by writing `agent.drain_requested` for our current incarnation (`ledger drain`); the
watch hands it here, and it becomes this process's own drain, written by us like any other: the folds flag a
request for another incarnation, so one meant for an earlier process never drains this one.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING

from ledger import events as ev
from ledger.errors import LedgerError

if TYPE_CHECKING:
    from .handle import Agent

log = logging.getLogger(__name__)


class Drain:
    def __init__(self, agent: Agent) -> None:
        self._agent = agent
        self.asked: tuple[datetime, str] | None = None
        """The drain this process asked for (deadline, reason)."""
        self.draining = False
        """This incarnation takes no new claims."""
        self._said_draining = 0
        """The newest incarnation the log says drains (our `draining` acknowledged, or one the watch saw)."""
        self._said_drained = 0
        """The incarnation whose `drained` we wrote (once per incarnation: a second is an illegal transition)."""
        self._writing = False
        """A `draining` or `drained` of ours in flight: one at a time."""
        self.cause: str | None = None
        """Event id of the operator's request this drain answers (the `draining` names it as its causation)."""
        self.wrote: set[str] = set()
        """Ids of the drain events this process wrote about itself (few: one per drain), so the watch does not
        take them for drain events written about us."""

    async def start(self, deadline: datetime, reason: str) -> int:
        a = self._agent
        incarnation = a.incarnation
        self.cause = None  # our own decision
        seq = await self._write_draining(incarnation, deadline, reason)
        self.draining = True
        self.asked = (deadline, reason)
        if not a.sessions:
            await self.write_drained()
        return seq

    def requested(self, request: ev.AgentDrainRequested) -> None:
        """The watch saw an operator's drain request for our current incarnation, which the fold applied."""
        a = self._agent
        if self.draining or a.fenced is not None or a._closing:
            return  # draining already (the request changes nothing), or no longer acting as this incarnation
        log.warning("%s: drain of incarnation %d requested by %s%s; draining", a.agent_id, a.incarnation,
                    request.producer.id, f" ({request.reason})" if request.reason else "")
        why = f"requested by {request.producer.id}" + (f": {request.reason}" if request.reason else "")
        self.asked = (request.deadline, why)
        self.cause = request.event_id
        self.draining = True  # no new claims from here, even before our `draining` is written
        a.tasks.spawn(self._redrain(a.incarnation), "requested drain")

    def new_incarnation(self, incarnation: int) -> None:
        self.draining = self.asked is not None
        if self.asked is not None:
            self._agent.tasks.spawn(self._redrain(incarnation), "redrain")

    def seen_in_log(self, ours: bool, by: str) -> None:
        """The watch saw the log say our current incarnation drains."""
        a = self._agent
        self._said_draining = max(self._said_draining, a.incarnation)
        if not self.draining and not ours:
            # The log says we drain (sessions are handed off, no new claims for us): behave so, and say when done.
            log.warning("%s: the log says incarnation %d is draining (written by %s); draining",
                        a.agent_id, a.incarnation, by)
            self.draining = True
            if not a.sessions:
                a.tasks.spawn(self.write_drained(), "drained")

    def none_left(self) -> None:
        """The last owned session just went."""
        if self.draining:
            self._agent.tasks.spawn(self.write_drained(), "drained")

    def catch_up(self) -> None:
        """With each heartbeat: what is not written yet is tried again."""
        a = self._agent
        if not self.draining or self._writing or a.fenced is not None or a._closing:
            return
        if self._said_draining != a.incarnation:
            if self.asked is not None:
                a.tasks.spawn(self._redrain(a.incarnation), "redrain")
        elif not a.sessions and self._said_drained != a.incarnation:
            a.tasks.spawn(self.write_drained(), "drained")

    async def _write_draining(self, incarnation: int, deadline: datetime, reason: str) -> int:
        a = self._agent
        event = ev.AgentDraining(producer=a.producer, agent_id=a.agent_id, incarnation=incarnation,
                                 deadline=deadline, reason=reason, causation_id=self.cause)
        self.wrote.add(event.event_id)
        seq = await a.store.append(event)
        self._said_draining = max(self._said_draining, incarnation)
        return seq

    async def _redrain(self, incarnation: int) -> None:
        a = self._agent
        if a._closing or self._writing or self.asked is None or self._said_draining >= incarnation:
            return  # our goodbye is on its way (a drain after it is an illegal transition), or it is written
        self._writing = True
        try:
            await self._write_draining(incarnation, *self.asked)
        except LedgerError as e:
            log.warning("%s: drain of incarnation %d not written: %s; trying again with the next heartbeat",
                        a.agent_id, incarnation, e)
            return
        finally:
            self._writing = False
        if not a.sessions:
            await self.write_drained()

    async def write_drained(self) -> None:
        a = self._agent
        incarnation = a.incarnation
        if (a.fenced is not None or a._closing or self._writing or self._said_drained == incarnation
                or self._said_draining != incarnation):
            return
        self._writing = True
        drained = ev.AgentDrained(producer=a.producer, agent_id=a.agent_id, incarnation=incarnation,
                                  reason="no sessions left")
        self.wrote.add(drained.event_id)
        try:
            await a.store.append(drained)
            self._said_drained = incarnation
        except LedgerError as e:
            log.info("%s: drained not written yet: %s", a.agent_id, e)  # the next heartbeat tries again
        finally:
            self._writing = False
