"""The agent's watch on the log: every agent's registrations, the rest of our own agent's events, and sessions.

What the agent owns follows the fold: it keeps each owned session's state (`lifecycle.evolve_session`) and
judges every session event its watch sees with the projections' own rule, so a forged or inconsistent event that
they flag never makes it gain or lose a session. The log saying this incarnation is gone, dead or fenced (when
it said no such thing) fences it, and it comes back as a new incarnation; a newer registration by another
process stops it for good.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ledger import events as ev
from ledger import lifecycle as lc
from ledger import subjects
from ledger.codec import Recorded, Unreadable
from ledger.errors import LedgerError
from ledger.known_agents import KnownAgents
from ledger.replay import Replay

from .registration import PREFETCH_CONCURRENCY, KnownRegistrations

if TYPE_CHECKING:
    from .handle import Agent

log = logging.getLogger(__name__)

_REGISTRATIONS = subjects.type_filter("agent", "registered")
_AGENT_VERBS = sorted({cls.verb() for cls in ev.EVENT_TYPES if cls.family == "agent"} - {"registered"})
"""Our own agent's events other than registrations, which the watch follows for every agent."""
MAX_TIMELINES = 256
"""Agent histories the watch keeps folded for judging take-overs (see Watch.timelines)."""
JUDGE_ATTEMPTS = 5
"""Times the watch re-judges one session event when our own writes to that session land while it reads."""
_MISSING = object()


class Watch:
    def __init__(self, agent: Agent) -> None:
        self._agent = agent
        self.registrations = KnownRegistrations(agent.ledger, agent.agent_id)
        self.self_state: lc.AgentState | None = None
        """Our current incarnation's lifecycle as the fold sees it (from the watch, starting at our registration)."""
        self._batch_end = 0
        """Last sequence of the batch the watch is judging."""
        self._prefetched: dict[tuple[str, int], lc.SessionState | None] = {}
        """(session, sequence) -> the session's state just before that sequence, read ahead for one batch."""
        self._known = KnownAgents(agent.store, limit=MAX_TIMELINES)
        self.timelines = self._known.timelines
        """agent id -> its history folded so far, for judging take-overs (the owner's state as of the claim): read
        once, then only what follows what was read (an owner's history may be long - anyone may report it
        unreachable - and a take-over claim is cheap to write). At most MAX_TIMELINES, the least recently used let
        go first."""

    async def run(self) -> None:
        a = self._agent
        # Every agent's registrations, the rest of our own agent's events (filters may not overlap), sessions.
        own = [subjects.event_subject("agent", a.agent_id, verb, "*") for verb in _AGENT_VERBS]
        filters = [_REGISTRATIONS, *own, subjects.family_filter("session")]
        start = a.incarnation
        current: list[Replay] = []

        def on_connection(kind: str) -> None:
            # After a reconnect (the server may have restarted and lost our consumer) start again at once.
            if kind == "reconnected":
                self._known.forget()  # as the store's own: the server may hold another log now
                for replay in current:
                    replay.interrupt()

        a.store.add_connection_listener(on_connection)
        try:
            while not a._closing:
                replay = a.store.replay(filters, start_seq=start, follow=True)
                current[:] = [replay]
                try:
                    await self._learn_registrations([a.agent_id], start)
                    async for batch in replay:
                        if batch:
                            self._batch_end = batch[-1].seq
                        for item in batch:  # first: a claim is judged on the registrations stored before it
                            if isinstance(item, Recorded) and isinstance(item.event, ev.AgentRegistered) \
                                    and lc.writer_problem(item.event) is None:  # one the folds take
                                self.registrations.note(item)
                        await self.prefetch(batch)
                        for item in batch:
                            if isinstance(item, Recorded):
                                await self._observe(item)
                            else:  # dead-lettered by the projector; nothing here can act on it
                                if item.subject == a.registration.own_subject:
                                    a.registration.unreadable = max(a.registration.unreadable, item.seq)
                                log.warning("%s: watch skips unreadable #%d on %s: %s", a.agent_id, item.seq,
                                            item.subject, item.reason)
                            start = item.seq + 1  # only once judged: a read that failed is tried again
                            a.sessions.watched_to(start)
                        a.sessions.watched_to(start, prune=True)
                except (TimeoutError, LedgerError) as e:
                    log.debug("%s: watch interrupted (%s); resuming at #%d", a.agent_id, e, start)
                    await asyncio.sleep(0.5)
                except Exception:
                    log.exception("%s: watch failed at #%d; trying again", a.agent_id, start)
                    await asyncio.sleep(1.0)
        finally:
            a.store.remove_connection_listener(on_connection)

    async def _observe(self, rec: Recorded) -> None:
        a = self._agent
        e = rec.event
        match e:
            case ev.AgentRegistered() if e.agent_id != a.agent_id:
                pass  # noted with its batch, for judging claims
            case ev.AgentRegistered() if lc.writer_problem(e) is not None:
                log.warning("%s: ignoring #%d, a registration of this agent written by %s, which every fold "
                            "flags", a.agent_id, rec.seq, e.producer.id)
            case ev.AgentRegistered() if a.registration.is_pending(e.event_id):
                # Our re-registration, seen before its acknowledgement: adopt it now, so that what follows it
                # in the log (a claim for it, a death written about it) is judged as ours.
                assert a.registration.in_flight is not None
                a._adopt(rec.seq, a.registration.in_flight[1], e, rec.timestamp_ns)
            case ev.AgentRegistered():  # (noted with its batch)
                if rec.seq == a.incarnation:
                    self.self_state, _ = lc.evolve_agent(None, rec)
                if lc.superseded_by([(rec.seq, e.instance_id)], a.incarnation, a.instance_id):
                    a._fence(f"superseded by instance {e.instance_id} (incarnation {rec.seq})", superseded=True)
                elif rec.seq > a.incarnation and a.fenced is None:
                    # Our instance id, yet not ours (we register again only while fenced): every fold now takes
                    # it as our current incarnation, so claims by ours would be flagged. Come back as a new one.
                    a._fence(f"the log registers incarnation {rec.seq} of this process, which it did not "
                             f"write (by {e.producer.id})", record=False)
            case ev.AgentEvent():
                self._observe_self(rec)
            case ev.SessionEvent():
                await self._observe_session(rec)

    def _observe_self(self, rec: Recorded) -> None:
        """Our own incarnation's lifecycle, folded by the fold's rule: we act on what every reader applies."""
        a = self._agent
        before = self.self_state
        if before is None or before.incarnation != a.incarnation:
            return  # the watch has not reached our current registration yet: older events are not ours
        after, anomaly = lc.evolve_agent(before, rec)
        if anomaly is not None or after is None:
            if isinstance(rec.event, ev.AgentDrainRequested) and anomaly is not None:
                log.warning("%s: ignoring drain request #%d by %s, which the ledger does not apply: %s: %s",
                            a.agent_id, rec.seq, rec.event.producer.id, anomaly.kind, anomaly.detail)
            return  # flagged, not applied: no reader acts on it, nor do we
        self.self_state = after
        e = rec.event
        if isinstance(e, ev.AgentDrainRequested):
            a._drain.requested(e)  # applied: for this incarnation, which is alive or draining
            return
        if a.fenced is not None or after.status == before.status:
            return
        why = getattr(e, "reason", "")
        if after.status == lc.A_DEAD:
            a._fence(f"declared dead by {e.producer.id}: {why}")
        elif after.status == lc.A_GONE and not a._said_goodbye:
            # Not ours (we write ours only once closing): the log says this incarnation is gone, and every
            # reader acts on that, so stop acting and come back as a new incarnation.
            a._fence(f"the log says incarnation {a.incarnation} said goodbye ({why}, "
                     f"written by {e.producer.id}), which this process did not write", record=False)
        elif after.status == lc.A_FENCED:
            # Ours is written only while fenced, just before registering again: this one is not.
            a._fence(f"the log says incarnation {a.incarnation} fenced itself ({why}, "
                     f"written by {e.producer.id})", record=False)
        elif after.status == lc.A_DRAINED and a.sessions and e.event_id not in a._drain.wrote:
            # Not ours (we say drained only once we own nothing): no reader moves a drained agent's sessions nor
            # judges its liveness, so the ones we hold would stay with us for ever. Come back as a new
            # incarnation: this one's sessions are then superseded, and handed on.
            a._fence(f"the log says incarnation {a.incarnation} drained ({why}, "
                     f"written by {e.producer.id}) while it owns {a.load} session(s)", record=False)
        elif after.status == lc.A_DRAINING:
            a._drain.seen_in_log(ours=e.event_id in a._drain.wrote, by=e.producer.id)

    async def _learn_registrations(self, agents: Iterable[str], floor: int) -> None:
        # Past the whole batch being judged: its registrations of agents not known yet were passed over.
        await self.registrations.learn(agents, max(floor, self._batch_end))

    def _may_gain(self, e: ev.Event) -> bool:
        a = self._agent
        return (isinstance(e, ev.SessionClaimed) and e.agent_id == a.agent_id
                and e.incarnation == a.incarnation and a.fenced is None and not a._closing)

    async def _observe_session(self, rec: Recorded) -> None:
        """Judge one session event by the fold's rule; gain or lose the session only as the fold does."""
        a = self._agent
        e = rec.event
        assert isinstance(e, ev.SessionEvent)
        sid = e.session_id
        if lc.writer_problem(e) is not None:
            # Its producer may not write it at all (a claim for us by another agent, say): every fold flags it
            # whatever the session's state, so it costs no read.
            if sid in a.sessions or self._may_gain(e):
                log.warning("%s: ignoring #%d on session %s, written by %s, who may not write it", a.agent_id,
                            rec.seq, sid, e.producer.id)
            return
        for _ in range(JUDGE_ATTEMPTS):
            known = a.sessions.judged_through(sid)
            if rec.seq <= known:
                return  # judged already (our own write told us, or a restarted watch repeats it)
            cached = a.sessions.get(sid)
            before = cached.state if cached is not None else None
            if cached is None:
                if not self._may_gain(e):
                    return  # a session we do not own: nothing here can make it ours
                prefetched = self._prefetched.pop((sid, rec.seq), _MISSING)
                before = (await self._session_before(sid, rec.seq) if prefetched is _MISSING
                          else prefetched)  # type: ignore[assignment]
            # The fold's rule, reading what it asks for: a claim it flags whatever the claimer (overlapping, of a
            # live owner) reads nothing of the claimer.
            judged = await self._fold([rec], before, rec.seq)
            now = a.sessions.get(sid)
            if a.sessions.judged_through(sid) == known and now is cached \
                    and (now is None or now.state is before):
                break
            # One of our own writes to this session landed while we read: judge on what it taught us.
        else:
            log.warning("%s: could not judge #%d on session %s (our own writes kept landing)",
                        a.agent_id, rec.seq, sid)
            return
        a.sessions.judged(sid, rec.seq)
        if judged.anomalies:
            _, anomaly = judged.anomalies[0]
            if cached is not None or self._may_gain(e):
                log.warning("%s: ignoring #%d on session %s, which the ledger does not apply: %s: %s",
                            a.agent_id, rec.seq, sid, anomaly.kind, anomaly.detail)
            return
        a._settle(sid, judged.state, e)

    async def prefetch(self, batch: list[Recorded | Unreadable]) -> None:
        """Read at once, concurrently, the states the batch's claims for us will be judged on (a reclaimer
        hands over hundreds of sessions at a time; one read after the other would hold the watch up)."""
        a = self._agent
        self._prefetched.clear()
        wanted: dict[str, int] = {}
        for item in batch:
            e = item.event if isinstance(item, Recorded) else None
            if (isinstance(e, ev.SessionClaimed) and self._may_gain(e) and e.session_id not in a.sessions
                    and lc.writer_problem(e) is None
                    and e.session_id not in wanted and item.seq > a.sessions.judged_through(e.session_id)):
                wanted[e.session_id] = item.seq
        keys = list(wanted.items())
        for i in range(0, len(keys), PREFETCH_CONCURRENCY):
            chunk = keys[i:i + PREFETCH_CONCURRENCY]
            states = await asyncio.gather(*(self._session_before(sid, seq) for sid, seq in chunk))
            self._prefetched.update(zip(chunk, states, strict=False))

    async def _session_before(self, session_id: str, seq: int) -> lc.SessionState | None:
        """The session's state just before `seq`, folded from its history as the projections fold it."""
        a = self._agent
        items = await a.store.history("session", session_id, min_last_seq=seq)  # a replica that has `seq`
        records = [i for i in items if isinstance(i, Recorded) and i.seq < seq]
        return (await self._fold(records, None, seq)).state

    async def _fold(self, records: list[Recorded], before: lc.SessionState | None, floor: int) -> lc.SessionFold:
        """Fold session records on `before` by the fold's rule, reading (from a replica that has the whole batch)
        what it asks for and the watch does not know yet: an agent's registrations (then kept current by the
        watch), what follows of an agent's history."""
        floor = max(floor, self._batch_end)
        folded = lc.SessionFold(records, before, self.registrations.table, self.timelines)
        while (need := folded.advance()) is not None:
            what, agent_id = need
            if what == lc.REGISTRATIONS:
                await self.registrations.learn([agent_id], floor)
                if agent_id not in self.registrations.table:  # let go already (a flood of learning meanwhile)
                    folded.learn(what, agent_id, await self._agent.store.registered(agent_id, min_last_seq=floor))
            else:
                await self._known.read_history(agent_id, floor, min_last_seq=floor)
        return folded

