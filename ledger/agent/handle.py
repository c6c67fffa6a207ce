"""`Agent`: one agent process's membership in the ledger, composed of its parts (see the package's docstring)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from types import TracebackType

from ledger import authority, cancellation, codec, decide, subjects
from ledger import events as ev
from ledger import lifecycle as lc
from ledger.codec import Recorded
from ledger.errors import (
    CapacityExhausted,
    Draining,
    Fenced,
    InvalidInput,
    LedgerError,
    NotAuthorized,
    NotFound,
    Superseded,
)
from ledger.ids import check_token, new_id
from ledger.writer import Writer

from .drain import Drain
from .lease import AgentStats, Lease, warn_if_slow_to_notice_a_silent_server
from .registration import GOODBYE_TIMEOUT, Registration
from .sessions import Activity, Claim, OwnedSessions
from .signals import Stopping
from .supervision import TaskSet
from .watch import Watch

log = logging.getLogger(__name__)


class Agent:
    """One agent process's membership in the ledger (an async context manager)."""

    def __init__(self, ledger: Writer, *, agent_id: str, pool: str, platform: str = "default",
                 region: str = "default", labels: dict[str, str] | None = None, capacity: int = 1,
                 heartbeat: float = 5.0, ttl: float = 30.0, handle_signals: bool = False,
                 on_fenced: Callable[[str], None] | None = None,
                 on_lost: Callable[[str, str], None] | None = None,
                 on_gained: Callable[[Claim, str], None] | None = None) -> None:
        for value, what in ((agent_id, "agent id"), (pool, "pool"), (platform, "platform"), (region, "region")):
            check_token(value, what)
        reserved = authority.reserved_agent_id_problem(agent_id)
        if reserved is not None:  # its events would be flagged by every fold: it could never register
            raise NotAuthorized(f"cannot run an agent as {agent_id!r}: {reserved}")
        if capacity < 1:
            raise InvalidInput(f"capacity must be at least 1, got {capacity}")
        if heartbeat <= 0 or ttl <= heartbeat:
            raise InvalidInput(f"need 0 < heartbeat < ttl, got heartbeat {heartbeat} s and ttl {ttl} s")
        if ledger.producer.id != agent_id:
            # An agent writes as itself: the subject's producer token is its id (permissions bind to it).
            ledger = Writer(ledger.store, ev.Producer(id=agent_id, instance=ledger.producer.instance))
        # Who we are.
        self.ledger = ledger
        self.store = ledger.store
        self.agent_id = agent_id
        self.pool, self.platform, self.region = pool, platform, region
        self.labels = labels or {}
        self.capacity = capacity
        self.instance_id = new_id()
        self.producer = ev.Producer(id=agent_id, instance=self.instance_id)
        self._on_fenced, self._on_lost, self._on_gained = on_fenced, on_lost, on_gained
        # Where we stand.
        self.incarnation = 0
        self.fenced: str | None = None
        """Why the agent is fenced (None while it may act as owner)."""
        self.superseded = False
        self._closing = False
        self._said_goodbye = False
        self._goodbye_lock = asyncio.Lock()
        self.goodbye_seq: int | None = None
        """Sequence of the goodbye this process wrote (None until then, and when it wrote none)."""
        # The parts.
        self.sessions = OwnedSessions()
        self.lease = Lease(self, heartbeat=heartbeat, ttl=ttl)
        self.registration = Registration(self)
        self.watch = Watch(self)
        self._drain = Drain(self)
        self.stopping = Stopping(agent_id, handle_signals=handle_signals, closing=lambda: self._closing)
        self.tasks = TaskSet(f"agent-{agent_id}", on_vital_failure=self._loop_failed)
        """Every task the agent starts: its heartbeat and watch loops, and short ones (a release, a drain note)."""
        self._tasks: list[asyncio.Task[None]] = []
        """The two loops (also in `tasks`, which forgets a task once it ended)."""

    @property
    def ref(self) -> decide.AgentRef:
        return decide.AgentRef(self.agent_id, self.instance_id, self.incarnation,
                               (self.pool, self.platform, self.region))

    @property
    def load(self) -> int:
        return len(self.sessions)

    @property
    def owned(self) -> dict[str, Claim]:
        """The sessions this incarnation owns (a copy: the agent keeps one record per session, in `sessions`)."""
        return self.sessions.claims()

    @property
    def draining(self) -> bool:
        return self._drain.draining

    @property
    def heartbeat(self) -> float:
        return self.lease.heartbeat

    @property
    def ttl(self) -> float:
        return self.lease.ttl

    @property
    def stats(self) -> AgentStats:
        return self.lease.stats

    def judged_through(self, session_id: str) -> int:
        """The newest sequence of this session the agent has judged (its watch, or its own writes)."""
        return self.sessions.judged_through(session_id)

    # --- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> Agent:
        warn_if_slow_to_notice_a_silent_server(self.agent_id, self.store.settings, self.ttl)
        await self.registration.first()
        self.stopping.install()
        self._tasks = [self.tasks.spawn(self.lease.run(), "heartbeat", vital=True),
                       self.tasks.spawn(self.watch.run(), "watch", vital=True)]
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool:
        self._closing = True
        try:
            await asyncio.shield(self.goodbye(self.stopping.reason))
        finally:
            await self.tasks.stop()
            self.stopping.remove()
        return self.stopping.absorbs(exc_type)

    def _loop_failed(self, name: str) -> None:
        # Without its heartbeats or its watch the agent can no longer keep its lease or know what it owns: a bug
        # got there (both loops handle the ledger's errors). Stop the body rather than run on half alive.
        log.error("%s: %s ended by an error; stopping", self.agent_id, name)
        self.stopping.stop()

    def stop(self) -> None:
        """Ask `wait_stopped()` to return (the goodbye follows when the `async with` exits)."""
        self.stopping.stop()

    async def wait_stopped(self) -> None:
        """Wait for SIGTERM / SIGINT (with `handle_signals`) or `stop()`."""
        await self.stopping.wait()

    async def goodbye(self, reason: str = "shutdown") -> None:
        """Say goodbye once (later calls do nothing); stop beating and claiming."""
        async with self._goodbye_lock:
            if self._said_goodbye:
                return
            self._said_goodbye = True
            self._closing = True
            if self.superseded or not self.incarnation:
                return  # a replaced process's goodbye would change nothing; don't write it
            await self.registration.settle_pending()
            event = ev.AgentGoodbye(producer=self.producer, agent_id=self.agent_id, instance_id=self.instance_id,
                                    incarnation=self.incarnation, reason=reason)
            try:
                self.goodbye_seq = await cancellation.wait_for(self.store.append(event), GOODBYE_TIMEOUT)
                log.info("%s: goodbye (incarnation %d, %s)", self.agent_id, self.incarnation, reason)
            except (TimeoutError, LedgerError) as e:
                log.warning("%s: goodbye not acknowledged (%s); the liveness monitor will notice",
                            self.agent_id, str(e) or type(e).__name__)
            self.sessions.drop_all()

    def _adopt(self, incarnation: int, started: float, registration: ev.AgentRegistered,
               stored_ns: int | None = None) -> None:
        """Become the incarnation a registration of ours landed as."""
        if incarnation <= self.incarnation:
            # Adopted already: the watch saw it land before its acknowledgement came - or a copy of it that
            # landed later, which every fold takes as the current one: never move back to an older incarnation.
            return
        self.incarnation = incarnation
        # Our own lifecycle from here, as the fold sees it (from an acknowledgement, the stored time is ours until
        # the watch brings the registration).
        rec = Recorded(subjects.LEDGER_STREAM, incarnation, codec.subject_of(registration),
                       stored_ns or time.time_ns(), registration)
        self.watch.registrations.note(rec)
        self.watch.self_state, _ = lc.evolve_agent(None, rec)
        self.lease.renewed_at(started)
        self.fenced = None
        log.info("%s: registered, incarnation %d", self.agent_id, self.incarnation)
        self._drain.new_incarnation(incarnation)

    def _fence(self, reason: str, *, superseded: bool = False, record: bool = True) -> None:
        """Stop acting as owner. `record`: write AgentFenced before registering again (not when the log
        already says why this incarnation is finished, e.g. a goodbye we did not write)."""
        if self.fenced is not None and not superseded:
            return
        self.fenced = reason
        if superseded and not self.superseded:
            self.superseded = True
            self.stopping.stop()  # a replaced process stops for good: wait_stopped() returns
        if not superseded and record:
            # The reason may quote another event's text (a death written about us): cut to what the codec
            # takes, or the record could never be written and we, who write it first, never register again.
            self.registration.fence_record = ev.AgentFenced(
                producer=self.producer, agent_id=self.agent_id, incarnation=self.incarnation,
                reason=reason[:ev.MAX_TEXT], fenced_at=ev.utcnow(), ttl=self.ttl)
        lost = self.sessions.drop_all()
        log.warning("%s: fenced (incarnation %d): %s; dropped %d session(s)",
                    self.agent_id, self.incarnation, reason, len(lost))
        self._call(self._on_fenced, reason)
        for sid in lost:
            self._call(self._on_lost, sid, "fenced")

    # --- what we own, as the fold says ------------------------------------------------------

    def _learn(self, session_id: str, before: lc.SessionState | None, seq: int, event: ev.Event) -> None:
        """Extend a session's fold with our own acknowledged write (decided on `before`, the state it
        read; the compare-and-set proved nothing came between)."""
        if seq <= self.sessions.judged_through(session_id):
            return  # the watch was faster and judged it already
        rec = Recorded(subjects.LEDGER_STREAM, seq, codec.subject_of(event), time.time_ns(), event)
        after, anomaly = lc.evolve_session(before, rec)
        self.sessions.judged(session_id, seq)
        if anomaly is None:
            self._settle(session_id, after, event)

    def _settle(self, session_id: str, after: lc.SessionState | None, e: ev.Event) -> None:
        """Own the session exactly when its folded state says this incarnation owns it."""
        held = self.sessions.get(session_id)
        if lc.owns(after, self.agent_id, self.incarnation) and self.fenced is None:
            assert after is not None and after.token is not None
            if held is not None:
                held.state = after
                if held.claim.token != after.token:
                    held.claim = Claim(session_id, after.token, after.claim_reason or "", after.checkpoint)
                return
            # The fold's state carries the newest checkpoint: the claim hands it on without another read.
            record = self.sessions.own(Claim(session_id, after.token, after.claim_reason or "", after.checkpoint),
                                       after)
            if e.producer.id != self.agent_id:
                self._call(self._on_gained, record.claim, e.producer.id)  # a reclaimer gave it to us
            self._shed_excess()
            return
        if held is not None:
            self._lose(session_id, _why_lost(e))

    def _lose(self, session_id: str, why: str) -> None:
        if self.sessions.drop(session_id) is not None:
            log.info("%s: lost session %s: %s", self.agent_id, session_id, why)
            self._call(self._on_lost, session_id, why)
            if not self.sessions:
                self._drain.none_left()

    def _catch_up_on_writes(self) -> None:
        """Writes whose first try failed (the server was electing, say) are tried again with each beat: an
        agent over capacity must not stay over it, nor a drained one stay draining in the log."""
        if self.load > self.capacity:
            self._shed_excess()
        self._drain.catch_up()

    def _call(self, callback: Callable[..., None] | None, *args: object) -> None:
        """The application's callback: what it raises is logged, and never stops our watch or heartbeats."""
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:
            log.exception("%s: %s raised", self.agent_id, getattr(callback, "__name__", "a callback"))

    def _shed_excess(self) -> None:
        """Over capacity (claims that raced each other): release the newest extra sessions."""
        for sid in decide.excess_sessions(self.sessions.tokens(), self.capacity):
            record = self.sessions.get(sid)
            if record is None or record.releasing:
                continue
            record.releasing = True  # busy() refuses it from here on: no work starts on it
            reason = f"over capacity: owned {self.load} of {self.capacity} session(s)"
            self.tasks.spawn(self._release_excess(sid, reason), f"shed-{sid}")

    async def _release_excess(self, session_id: str, reason: str) -> None:
        record = self.sessions.get(session_id)
        try:
            await self.release(session_id, reason=reason)
            log.info("%s: released %s: %s", self.agent_id, session_id, reason)
        except LedgerError as e:
            log.info("%s: release of extra session %s not written: %s", self.agent_id, session_id, e)
        finally:
            if record is not None:
                record.releasing = False

    # --- claims and owner writes -------------------------------------------------------------

    def _check_may_act(self) -> None:
        if self.superseded:
            raise Superseded(f"agent {self.agent_id} incarnation {self.incarnation} was superseded: {self.fenced}")
        if self.fenced is not None:
            raise Fenced(f"agent {self.agent_id} is fenced: {self.fenced}")
        if self._closing:
            raise Fenced(f"agent {self.agent_id} is shutting down")

    def _check_still(self, incarnation: int, what: str) -> None:
        """Refuse to act on a write that landed for an incarnation this process has left since (it fenced and
        registered again while the write was in flight). Landing after the new registration, every fold flags
        it; landing just before, the new incarnation does not inherit it and the reclaimer moves it on."""
        if self.incarnation != incarnation:
            raise Fenced(f"{what} landed for incarnation {incarnation} of {self.agent_id}, which this process has "
                         f"left for {self.incarnation}; the ledger does not apply it")

    async def claim(self, session_id: str, *, reason: str = "initial", previous_token: int | None = None,
                    causation_id: str | None = None) -> Claim:
        """Claim a session for this agent (compare-and-set); its sequence is the fencing token."""
        self._check_may_act()
        if self.draining:
            raise Draining(f"agent {self.agent_id} is draining and takes no new claims")
        if self.load >= self.capacity and session_id not in self.sessions:
            raise CapacityExhausted(f"agent {self.agent_id} owns {self.load} of {self.capacity} session(s)")
        await self.registration.check_not_superseded()
        seen: list[lc.SessionState | None] = []

        def decide_claim(read: tuple[lc.SessionState | None, object]) -> ev.Event:
            state, owner = read
            seen.append(state)
            return decide.decide_claim(state, session_id, self.ref, producer=self.producer, reason=reason,
                                       previous_token=previous_token, causation_id=causation_id, owner=owner)

        incarnation = self.incarnation
        token, event = await self.ledger.cas(lambda m: self.ledger.session_for_claim(session_id, min_last_seq=m),
                                             decide_claim)
        self._check_may_act()  # fenced while the claim was in flight: it is not ours to act on
        self._check_still(incarnation, f"claim #{token} of session {session_id}")
        self._learn(session_id, seen[-1], token, event)
        record = self.sessions.get(session_id)
        if record is None:
            # Gone again already (the watch saw it move on).
            return Claim(session_id, token, reason, seen[-1].checkpoint if seen and seen[-1] else None)
        record.idle_ttl, record.idle_ttl_known = (seen[-1].idle_ttl if seen and seen[-1] else None), True
        record.touch()
        return record.claim

    async def _owner_write(self, session_id: str, make: Callable[[int], ev.Event], token: int | None) -> int:
        self._check_may_act()
        held = self.sessions.get(session_id)
        held_token = held.claim.token if held is not None else None
        token = token if token is not None else held_token
        if token is None:
            raise NotFound(f"agent {self.agent_id} holds no claim on session {session_id}")

        seen: list[lc.SessionState | None] = []
        incarnation = self.incarnation

        def decide_write(state: lc.SessionState | None) -> ev.Event:
            seen.append(state)
            decide.check_owner(state, session_id, self.ref, token)
            return make(token)

        # A refusal drops the session, so the read must not be stale: from a replica that has at least our
        # claim and all else we know of the session (Direct Get may lag otherwise). Not the caller's token:
        # a floor past the stream's end is never met.
        floor = self.sessions.judged_through(session_id)
        try:
            seq, event = await self.ledger.cas(
                lambda m: self.ledger.session(session_id, min_last_seq=max(m or 0, floor) or None), decide_write)
        except Fenced:
            if held_token == token:
                self.sessions.drop(session_id)
            raise
        self._check_still(incarnation, f"write #{seq} on session {session_id}")
        self._learn(session_id, seen[-1], seq, event)
        return seq

    async def release(self, session_id: str, *, reason: str = "", token: int | None = None) -> int:
        """Give a session up (it becomes `released`: unowned, not an orphan)."""
        seq = await self._owner_write(session_id, lambda t: ev.SessionReleased(
            producer=self.producer, session_id=session_id, agent_id=self.agent_id, incarnation=self.incarnation,
            token=t, reason=reason), token)
        self._lose(session_id, "released")
        return seq

    async def report_resource(self, session_id: str, platform_resource_id: str, *, address: str | None = None,
                              token: int | None = None) -> int:
        """Record the platform resource (container id, pod name ...) that runs the session, and its address."""
        return await self._owner_write(session_id, lambda t: ev.SessionResourceReported(
            producer=self.producer, session_id=session_id, agent_id=self.agent_id, incarnation=self.incarnation,
            token=t, platform_resource_id=platform_resource_id, address=address), token)

    async def checkpoint(self, session_id: str, data: bytes, *, note: str = "", token: int | None = None) -> int:
        """Record progress on a session this agent owns, for whoever owns it next (a failover, a drain, a take-over
        hands it on: `Claim.checkpoint`, in `on_gained` and from `claim`). An owner write under the claim token,
        refused like a release (StaleToken, Superseded, Fenced) once the session is not ours; at most
        `events.MAX_CHECKPOINT_BYTES` bytes (InvalidInput before anything is read or written). Returns its
        sequence. A separate event, never on the heartbeat: checkpoint as often as progress is worth saving."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidInput(f"checkpoint data must be bytes, got {type(data).__name__} (encode text first)")
        data = bytes(data)
        decide.check_checkpoint_size(data)
        return await self._owner_write(session_id, lambda t: ev.SessionCheckpointed(
            producer=self.producer, session_id=session_id, agent_id=self.agent_id, incarnation=self.incarnation,
            token=t, data=data, note=note), token)

    async def terminate(self, session_id: str, *, reason: str = "", token: int | None = None) -> int:
        """End a session this agent owns."""
        seq = await self._owner_write(session_id, lambda t: ev.SessionTerminated(
            producer=self.producer, session_id=session_id, token=t, reason=reason), token)
        self._lose(session_id, "terminated")
        return seq

    async def transition_route(self, route_id: str, to_state: str, *, reason: str = "",
                               address: str | None = None, traffic: str | None = None) -> int:
        """Move a route of one of our sessions; the write carries our claim token for that session."""
        self._check_may_act()
        route, _ = await self.ledger.route(route_id)
        if route is None:
            raise NotFound(f"route {route_id} does not exist")
        held = self.sessions.get(route.session_id)
        if held is None:
            raise NotFound(f"agent {self.agent_id} holds no claim on session {route.session_id} of route {route_id}")
        state, _ = await self.ledger.session(route.session_id,
                                             min_last_seq=self.sessions.judged_through(route.session_id) or None)
        decide.check_owner(state, route.session_id, self.ref, held.claim.token)
        return await self.ledger.transition_route(route_id, to_state, reason=reason, token=held.claim.token,
                                                  address=address, traffic=traffic)

    async def report_health(self, route_id: str, *, healthy: bool, detail: str = "") -> int:
        return await self.ledger.report_health(route_id, healthy=healthy, detail=detail)

    # --- drain -------------------------------------------------------------------------------

    async def drain(self, *, deadline: float | datetime = 3600.0, reason: str = "") -> int:
        """Take no new claims; the sessions are handed off before `deadline` (seconds from now, or a time)."""
        self._check_may_act()
        when = deadline if isinstance(deadline, datetime) else ev.utcnow() + timedelta(seconds=deadline)
        return await self._drain.start(when, reason)

    # --- activity and idleness ---------------------------------------------------------------

    def touch(self, session_id: str) -> None:
        """Note activity on a session (it is not idle now)."""
        record = self.sessions.get(session_id)
        if record is not None:
            record.touch()

    @contextlib.asynccontextmanager
    async def busy(self, session_id: str) -> AsyncIterator[Claim]:
        """Mark work in flight on an owned session: a busy session is never released as idle."""
        record = self.sessions.get(session_id)
        if record is None or record.releasing:
            raise NotFound(f"agent {self.agent_id} does not own session {session_id}")
        record.in_flight += 1
        record.touch()
        try:
            yield record.claim
        finally:
            if self.sessions.get(session_id) is record:  # not lost meanwhile (a new record starts afresh)
                record.in_flight -= 1
                record.touch()

    def activity(self) -> dict[str, Activity]:
        """Idleness of every owned session (idle TTLs unknown so far are None; see `learn_idle_ttl`)."""
        now = time.monotonic()
        return {sid: record.activity(now) for sid, record in self.sessions.items()}

    def needs_idle_ttl(self) -> list[str]:
        return [sid for sid, record in self.sessions.items() if not record.idle_ttl_known]

    def learn_idle_ttl(self, session_id: str, idle_ttl: float | None) -> None:
        record = self.sessions.get(session_id)
        if record is not None:
            record.idle_ttl, record.idle_ttl_known = idle_ttl, True

    async def release_if_idle(self, session_id: str) -> bool:
        """Release the session if it is still idle past its TTL and nothing is in flight."""
        record = self.sessions.get(session_id)
        info = record.activity(time.monotonic()) if record is not None else None
        if record is None or info is None or info.idle_ttl is None or info.in_flight or info.idle_for < info.idle_ttl:
            return False
        record.releasing = True  # from here on busy() refuses it: no work starts on it
        try:
            await self.release(session_id, reason=f"idle for {info.idle_for:.0f}s (idle TTL {info.idle_ttl:g}s)")
        except LedgerError as e:
            log.info("%s: idle release of %s not written: %s", self.agent_id, session_id, e)
            return False
        finally:
            record.releasing = False
        return True


def _why_lost(e: ev.Event) -> str:
    match e:
        case ev.SessionClaimed():
            return f"taken over by {e.agent_id} ({e.reason})"
        case ev.SessionOrphaned():
            return f"orphaned: {e.reason}"
        case ev.SessionTerminated():
            return f"terminated: {e.reason}" if e.reason else "terminated"
        case ev.SessionReleased():
            return "released"
    return e.type_tag()
