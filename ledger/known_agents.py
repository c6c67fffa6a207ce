"""What session reads learn of agents, kept: each agent's registrations and its history folded, read whole the
first time and then only what follows the part read.

Why: judging a claim needs the claimer's registrations, and a take-over the previous owner's history. An agent's
events span its whole life in the log, and nats-server answers a wildcard read (`ledger.agent.<id>.>`) by scanning
every message between the entity's first and last event (each of our subjects holds about one message, so it
never uses its per-subject index): reading them whole for every claim cost the server O(log) per claim, and under
churn `ledger up` fell from ~200 to ~40 sessions/s within 30 k sessions. Read from where the last read ended, the
scan covers only what is new.

The log is append-only (the LEDGER stream denies deletes and purges), so a prefix once read stays true.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING

from . import lifecycle, subjects
from .codec import Recorded
from .ids import check_token

if TYPE_CHECKING:
    from .store import EventStore

MAX_AGENTS = 1024
"""Agents whose registrations (and, separately, histories) are kept; the least recently used are let go first."""


class _Registrations:
    __slots__ = ("states", "through")

    def __init__(self) -> None:
        self.states: list[lifecycle.AgentState] = []
        """As registered (`lifecycle.as_registered`), ascending."""
        self.through = 0
        """Every registration up to this sequence is in `states`."""


class KnownAgents:
    """Registrations and history timelines of the agents a reader has needed (at most MAX_AGENTS of each)."""

    def __init__(self, store: EventStore, limit: int = MAX_AGENTS) -> None:
        # A take-over is judged on two histories at once, its owner's and its claimer's: with room for fewer, a fold
        # would read one, let the other go, and ask for it again, forever.
        if limit < 2:
            raise ValueError(f"KnownAgents keeps at least two agents, not {limit}")
        self._store = store
        self._limit = limit
        self._registrations: OrderedDict[str, _Registrations] = OrderedDict()
        self.timelines: OrderedDict[str, lifecycle.AgentTimeline] = OrderedDict()
        """agent id -> its history folded so far: what a `lifecycle.SessionFold` reads (and learns into)."""

    def registrations_known(self, agent_ids: Iterable[str], through: int) -> dict[str, list[lifecycle.AgentState]]:
        """The registrations of those of `agent_ids` known up to `through` at least (no read)."""
        out: dict[str, list[lifecycle.AgentState]] = {}
        for agent_id in agent_ids:
            known = self._registrations.get(agent_id)
            if known is not None and known.through >= through and agent_id not in out:
                out[agent_id] = known.states
                self._registrations.move_to_end(agent_id)
        return out

    def none_registered(self, agent_ids: Iterable[str], through: int) -> None:
        """`agent_ids` have no registration up to `through` (one request asked: `EventStore.ever_registered`)."""
        for agent_id in agent_ids:
            known = self._entry(agent_id)
            if not known.states:
                known.through = max(known.through, through)

    async def registrations(self, agent_id: str, through: int, *,
                            min_last_seq: int | None = None) -> list[lifecycle.AgentState]:
        """The agent's registrations up to `through` at least: those known, and a read of what follows them."""
        check_token(agent_id, "agent id")  # a wildcard or a dot would read other agents' subjects
        known = self._entry(agent_id)
        if known.through < through:
            after = known.through
            items = await self._store.read(subjects.event_subject("agent", agent_id, "registered", agent_id),
                                           after=after, min_last_seq=min_last_seq)
            new = lifecycle.as_registered([i for i in items if isinstance(i, Recorded) and i.seq > after])
            seen = {s.incarnation for s in known.states}
            known.states = sorted([*known.states, *(s for s in new if s.incarnation not in seen)],
                                  key=lambda s: s.incarnation)
            known.through = max(known.through, through, items[-1].seq if items else 0)
        return known.states

    async def read_history(self, agent_id: str, through: int, *, min_last_seq: int | None = None,
                           fresh: bool = False) -> lifecycle.AgentTimeline:
        """Bring the agent's timeline up to `through`: its whole history the first time, then only what follows
        the part read (concurrent readers may extend it twice: `AgentTimeline.extend` folds nothing twice).
        `fresh`: read what follows even if the part known reaches `through`."""
        timeline = self.timelines.get(agent_id) or lifecycle.AgentTimeline(through=0)
        if fresh or timeline.through < through:
            items = await self._store.history("agent", agent_id, after=timeline.through, min_last_seq=min_last_seq)
            timeline.extend([i for i in items if isinstance(i, Recorded)], through)
        self.timelines[agent_id] = timeline
        self.timelines.move_to_end(agent_id)
        while len(self.timelines) > self._limit:
            self.timelines.popitem(last=False)
        return timeline

    async def current(self, agent_id: str, through: int, *,
                      min_last_seq: int | None = None) -> lifecycle.AgentState | None:
        """The agent's state now, as `lifecycle.fold` of its whole history gives it: always reads what follows
        the part known (a take-over is judged on this: a death since must not be missed). `through`: a sequence
        the stream is known to hold (the session history's end): what the read taught counts as known up to it
        and its newest event. Not `min_last_seq`, which may lie past the stream's end (a single node answers at
        once), where what lands below it would never be read; and not the newest event alone, which for a quiet
        agent lies far back: the next read would scan the server's log from there."""
        timeline = await self.read_history(agent_id, through, min_last_seq=min_last_seq, fresh=True)
        return timeline.at(timeline.last_seq + 1)

    def forget(self) -> None:
        """Let go of everything known (after a reconnect: the server may hold another log now)."""
        self._registrations.clear()
        self.timelines.clear()

    def _entry(self, agent_id: str) -> _Registrations:
        known = self._registrations.get(agent_id)
        if known is None:
            known = self._registrations[agent_id] = _Registrations()
        self._registrations.move_to_end(agent_id)
        while len(self._registrations) > self._limit:
            self._registrations.popitem(last=False)
        return known
