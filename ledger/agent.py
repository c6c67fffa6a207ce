"""The agent handle: register, heartbeat, claim and own sessions, self-fence, say goodbye once.

    async with Agent(ledger, agent_id="a-1", pool="gpu", capacity=4, handle_signals=True) as agent:
        claim = await agent.claim("s-42")
        await agent.report_resource("s-42", "pod/abc")
        await agent.wait_stopped()          # until SIGTERM / SIGINT, or agent.stop()

* Every process start is a new incarnation: the stream sequence of its
  registration. A newer registration of the same agent id supersedes it.
* Heartbeats come from the agent's own task, so they keep flowing while the
  application's work loop is blocked (on a full queue, say).
* Lease: if no heartbeat is acknowledged within `ttl` seconds, the agent
  fences itself - it stops acting as owner (claims and owner writes raise
  Fenced, `owned` empties, `on_fenced` is called) - and registers again as a
  new incarnation as soon as the broker answers. The liveness monitor declares
  an agent dead `ttl` after the last heartbeat it *stored*, which is never
  earlier than the send time of the last heartbeat we saw acknowledged, so the
  agent has stopped acting before anyone may take its sessions.
* Goodbye is written exactly once - on leaving the `async with`, on SIGTERM or
  SIGINT (with `handle_signals`), whichever comes first, even when they race.
* What the agent owns follows the fold: it keeps each owned session's state
  (`lifecycle.evolve_session`) and judges every session event its watch sees
  with the projections' own rule, so a forged or inconsistent event that they
  flag never makes it gain or lose a session. The log saying this incarnation
  is gone, dead or fenced (when it said no such thing) fences it, and it comes
  back as a new incarnation; a newer registration by another process stops it
  for good. Holding more than `capacity` sessions (claims that raced), it
  releases the newest extra ones.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import signal
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import TracebackType

import msgspec

from . import authority, codec, decide, lifecycle as lc, subjects, tasks
from . import events as ev
from .client import Ledger
from .codec import Recorded, Unreadable
from .reader import Replay
from .settings import Settings
from .errors import (CapacityExhausted, Draining, Fenced, InvalidInput, LedgerError, NotAuthorized, NotFound,
                     Superseded)
from .ids import check_token, new_id

log = logging.getLogger(__name__)

GOODBYE_TIMEOUT = 5.0
_REGISTRATIONS = subjects.type_filter("agent", "registered")
_AGENT_VERBS = sorted({cls.verb() for cls in ev.EVENT_TYPES if cls.family == "agent"} - {"registered"})
"""Our own agent's events other than registrations, which the watch follows for every agent."""
JUDGE_ATTEMPTS = 5
"""Times the watch re-judges one session event when our own writes to that session land while it reads."""
PREFETCH_CONCURRENCY = 32
"""Session histories read at once when the watch's batch holds many claims for us."""
_MISSING = object()


BEAT_SESSIONS_BYTES = codec.MAX_EVENT_BYTES // 2
"""Room in a heartbeat for the list of owned sessions; `load` always carries the full count."""


def beat_sessions(owned: dict[str, object] | set[str], budget: int = BEAT_SESSIONS_BYTES) -> tuple[str, ...]:
    """The owned sessions a heartbeat lists: all of them while they fit, else as many as fit (sorted). A beat
    too large to encode would not be sent, and an agent owning thousands of sessions would fence itself."""
    listed: list[str] = []
    used = 0
    for sid in sorted(owned):
        used += len(sid) + 3  # quotes and comma in the JSON array
        if used > budget:
            break
        listed.append(sid)
    return tuple(listed)


class Claim(msgspec.Struct, frozen=True):
    """A session this agent owns, and the fencing token its owner writes carry."""

    session_id: str
    token: int
    reason: str


class Activity(msgspec.Struct, frozen=True):
    """How long one owned session has been idle, whether work is in flight, and its idle TTL."""

    idle_for: float
    in_flight: int
    idle_ttl: float | None


@dataclass
class AgentStats:
    beats_sent: int = 0
    beats_acked: int = 0
    ack_latencies: deque[float] = field(default_factory=lambda: deque(maxlen=1000))
    """Seconds from sending a heartbeat to its acknowledgement, most recent last."""


def _outcome_seen(future: asyncio.Future[int]) -> None:
    """For an append nobody may wait for to the end (the fenced record, a registration a goodbye gives up on):
    its failure is expected and handled elsewhere, not asyncio's "Future exception was never retrieved"."""
    if not future.cancelled():
        future.exception()


class Agent:
    """One agent process's membership in the ledger (an async context manager)."""

    def __init__(self, ledger: Ledger, *, agent_id: str, pool: str, platform: str = "default",
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
            ledger = Ledger(ledger.store, ev.Producer(id=agent_id, instance=ledger.producer.instance))
        self.ledger = ledger
        self.store = ledger.store
        self.agent_id = agent_id
        self.pool, self.platform, self.region = pool, platform, region
        self.labels = labels or {}
        self.capacity = capacity
        self.heartbeat = heartbeat
        self.ttl = ttl
        self.instance_id = new_id()
        self.producer = ev.Producer(id=agent_id, instance=self.instance_id)
        self._handle_signals = handle_signals
        self._on_fenced = on_fenced
        self._on_lost = on_lost
        self._on_gained = on_gained
        self.incarnation = 0
        self.owned: dict[str, Claim] = {}
        self.fenced: str | None = None
        """Why the agent is fenced (None while it may act as owner)."""
        self.superseded = False
        self.draining = False
        self._drain_asked: tuple[datetime, str] | None = None
        """The drain this process asked for (deadline, reason): it outlives a re-registration."""
        self.stats = AgentStats()
        self._lease_from = 0.0
        self._beat = 0
        self._stopped = asyncio.Event()
        self._closing = False
        self._goodbye_lock = asyncio.Lock()
        self._said_goodbye = False
        self._owner_task: asyncio.Task[object] | None = None
        self._signalled: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pending_registration: tuple[asyncio.Future[int], float, ev.AgentRegistered] | None = None
        self._session_seq: dict[str, int] = {}
        """Per session we touched: the newest sequence already judged, so a lagging watch never undoes our writes."""
        self._sessions: dict[str, lc.SessionState] = {}
        """The folded state of every session we own (the fold our watch extends event by event)."""
        self._registered: dict[str, list[int]] = {}
        """Registrations (ascending) of each agent a judged session named: read once per agent, then kept
        current by the watch, which follows every registration. The fold's incarnation check needs them;
        reading them per judged event let a session full of forged claimers cost a read per claimer, each time."""
        self._self_state: lc.AgentState | None = None
        """Our current incarnation's lifecycle as the fold sees it (from the watch, starting at our registration)."""
        self._wrote: set[str] = set()
        """Ids of the drain events this process wrote about itself (few: one per drain)."""
        self._drained_for = 0
        """The incarnation whose `drained` we wrote (once per incarnation)."""
        self._batch_end = 0
        """Last sequence of the batch the watch is judging."""
        self._unreadable_registration = 0
        self._own_registrations = subjects.event_subject("agent", agent_id, "registered", agent_id)
        """Our registrations' subject. Only the agent itself may register it (the folds flag a registration
        published by another producer, on `...registered.<other>`), so this alone is what our re-registration's
        compare-and-set must expect."""
        """Newest unreadable message on our registration subject the watch skipped: no registration to any
        reader, yet the subject's last sequence, which our re-registration's compare-and-set must expect."""
        self.goodbye_seq: int | None = None
        """Sequence of the goodbye this process wrote (None until then, and when it wrote none)."""
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._prefetched: dict[tuple[str, int], lc.SessionState | None] = {}
        """(session, sequence) -> the session's state just before that sequence, read ahead for one batch."""
        self._agents_read: dict[str, tuple[int, lc.AgentAt]] = {}
        """agent id -> (the floor its history was read at, agent_at from it), for judging take-overs: read once
        per watch batch (a reclaimer hands over a lost agent's sessions hundreds at a time)."""
        self._waiting = False
        self._fence_record: ev.AgentFenced | None = None
        self._last_active: dict[str, float] = {}
        self._in_flight: dict[str, int] = {}
        self._idle_ttl: dict[str, float | None] = {}
        self._releasing: set[str] = set()

    @property
    def ref(self) -> decide.AgentRef:
        return decide.AgentRef(self.agent_id, self.instance_id, self.incarnation)

    @property
    def load(self) -> int:
        return len(self.owned)

    # --- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> Agent:
        self._warn_if_slow_to_notice_a_silent_server()
        await self._register()
        self._owner_task = asyncio.current_task()
        if self._handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_signal, sig)
        self._tasks = [
            asyncio.create_task(self._beat_loop(), name=f"agent-{self.agent_id}-heartbeat"),
            asyncio.create_task(self._watch_loop(), name=f"agent-{self.agent_id}-watch"),
        ]
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool:
        self._closing = True
        try:
            await asyncio.shield(self.goodbye("shutdown" if self._signalled is None
                                              else f"signal {signal.Signals(self._signalled).name}"))
        finally:
            await tasks.stop([*self._tasks, *self._side_tasks])
            if self._handle_signals:
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            self._stopped.set()
        # A signal cancelled the body to get here: that was a clean stop, not an error.
        if exc_type is asyncio.CancelledError and self._signalled is not None:
            task = asyncio.current_task()
            if task is not None and task.uncancel() == 0:
                return True
        return False

    def _on_signal(self, sig: int) -> None:
        if self._signalled is not None or self._closing:
            return  # already on the way out: the goodbye is (being) said once
        self._signalled = sig
        log.info("%s: %s received, saying goodbye", self.agent_id, signal.Signals(sig).name)
        self._stopped.set()
        # A body parked in wait_stopped() returns by itself; any other body is interrupted.
        if not self._waiting and self._owner_task is not None and not self._owner_task.done():
            self._owner_task.cancel(f"{signal.Signals(sig).name}")

    def stop(self) -> None:
        """Ask `wait_stopped()` to return (the goodbye follows when the `async with` exits)."""
        self._stopped.set()

    async def wait_stopped(self) -> None:
        """Wait for SIGTERM / SIGINT (with `handle_signals`) or `stop()`."""
        self._waiting = True
        try:
            await self._stopped.wait()
        finally:
            self._waiting = False

    async def goodbye(self, reason: str = "shutdown") -> None:
        """Say goodbye once (later calls do nothing); stop beating and claiming."""
        async with self._goodbye_lock:
            if self._said_goodbye:
                return
            self._said_goodbye = True
            self._closing = True
            if self.superseded or not self.incarnation:
                return  # a replaced process's goodbye would change nothing; don't write it
            await self._settle_pending_registration()
            event = ev.AgentGoodbye(producer=self.producer, agent_id=self.agent_id, instance_id=self.instance_id,
                                    incarnation=self.incarnation, reason=reason)
            try:
                self.goodbye_seq = await tasks.wait_for(self.store.append(event), GOODBYE_TIMEOUT)
                log.info("%s: goodbye (incarnation %d, %s)", self.agent_id, self.incarnation, reason)
            except (LedgerError, asyncio.TimeoutError) as e:
                log.warning("%s: goodbye not acknowledged (%s); the liveness monitor will notice",
                            self.agent_id, e or type(e).__name__)
            self.owned.clear()
            self._sessions.clear()

    async def _settle_pending_registration(self) -> None:
        """A re-registration still in flight may land after our goodbye: a new incarnation that never beats,
        declared dead later. Wait for it (briefly), so the goodbye is said for the newest incarnation."""
        if self._pending_registration is None:
            return
        future, started, registration = self._pending_registration
        try:
            incarnation = await tasks.wait_for(asyncio.shield(future), GOODBYE_TIMEOUT)
        except (LedgerError, asyncio.TimeoutError):
            return
        self._adopt(incarnation, started, registration)

    def _registration(self) -> ev.AgentRegistered:
        return ev.AgentRegistered(
            producer=self.producer, agent_id=self.agent_id, instance_id=self.instance_id, pool=self.pool,
            platform=self.platform, region=self.region, labels=self.labels, capacity=self.capacity,
            heartbeat_interval=self.heartbeat, ttl=self.ttl,
        )

    async def _register(self) -> None:
        started = time.monotonic()
        registration = self._registration()
        self._adopt(await self.store.append(registration), started, registration)

    def _adopt(self, incarnation: int, started: float, registration: ev.AgentRegistered,
               stored_ns: int | None = None) -> None:
        if incarnation <= self.incarnation:
            # Adopted already: the watch saw it land before its acknowledgement came - or a copy of it that
            # landed later, which every fold takes as the current one: never move back to an older incarnation.
            return
        self.incarnation = incarnation
        self._note_registration(incarnation)
        # Our own lifecycle from here, as the fold sees it (from an acknowledgement, the stored time is ours until
        # the watch brings the registration).
        rec = Recorded(subjects.LEDGER_STREAM, incarnation, codec.subject_of(registration),
                       stored_ns or time.time_ns(), registration)
        self._self_state, _ = lc.evolve_agent(None, rec)
        self._lease_from = started
        self.fenced = None
        self.draining = False
        log.info("%s: registered, incarnation %d", self.agent_id, self.incarnation)
        if self._drain_asked is not None:
            # We asked to drain before we fenced (a goodbye or death written about us, say): coming back as a new
            # incarnation must not undo it, or any claimer could give us sessions again.
            self.draining = True
            self._spawn(self._redrain(incarnation), "redrain")

    async def _redrain(self, incarnation: int) -> None:
        assert self._drain_asked is not None
        if self._closing:
            return  # our goodbye is on its way: a drain after it would be an illegal transition
        deadline, reason = self._drain_asked
        try:
            await self._write_draining(incarnation, deadline, reason)
        except LedgerError as e:
            log.warning("%s: drain of incarnation %d not written: %s", self.agent_id, incarnation, e)
            return
        if not self.owned:
            await self._drained()

    def _warn_if_slow_to_notice_a_silent_server(self) -> None:
        # A frozen server keeps the socket open: only pings notice it, and the lease must outlast that.
        def notices_after(s: Settings) -> float:
            return s.ping_interval * (s.max_outstanding_pings + 1)

        settings = self.store.settings
        slow = notices_after(settings)
        if slow > max(self.ttl / 4, notices_after(settings.for_lease(self.ttl))):
            log.warning("%s: this connection notices a silent server only after ~%.0f s of pings, a large part "
                        "of the %g s ttl; connect with Settings.for_lease(ttl) to move to another node in time",
                        self.agent_id, slow, self.ttl)

    # --- heartbeats, lease and self-fencing ----------------------------------------------

    async def _beat_loop(self) -> None:
        next_beat = time.monotonic()
        while not self._closing:
            if self.superseded:
                # Replaced by a newer process: it never beats or registers again, so this task is done
                # (waking up for a lease that can no longer be renewed would spin).
                return
            now = time.monotonic()
            if self.fenced is None and now >= next_beat:
                await self._send_beat()
                next_beat = now + self.heartbeat
                self._catch_up_on_writes()
            if self.fenced is None and now - self._lease_from > self.ttl:
                self._fence(f"no heartbeat acknowledged for {now - self._lease_from:.1f} s (ttl {self.ttl:g} s)")
            if self.fenced is not None and not self.superseded and not self._closing:
                await self._try_reregister()
                next_beat = time.monotonic()
                continue
            wake = min(next_beat, self._lease_from + self.ttl + 0.001)
            await asyncio.sleep(max(0.0, wake - time.monotonic()))

    async def _send_beat(self) -> None:
        self._beat += 1
        beat = ev.AgentHeartbeat(producer=self.producer, agent_id=self.agent_id, instance_id=self.instance_id,
                                 incarnation=self.incarnation, beat=self._beat, load=self.load,
                                 capacity=self.capacity, sessions=beat_sessions(self.owned))
        sent, incarnation = time.monotonic(), self.incarnation
        try:
            future = await self.store.submit(beat)
        except LedgerError as e:
            log.debug("%s: heartbeat not sent: %s", self.agent_id, e)
            return
        self.stats.beats_sent += 1
        future.add_done_callback(lambda f: self._on_beat_ack(f, sent, incarnation))

    def _on_beat_ack(self, future: asyncio.Future[int], sent: float, incarnation: int) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        self.stats.beats_acked += 1
        self.stats.ack_latencies.append(time.monotonic() - sent)
        if incarnation == self.incarnation and self.fenced is None:
            self._lease_from = max(self._lease_from, sent)

    def _fence(self, reason: str, *, superseded: bool = False, record: bool = True) -> None:
        """Stop acting as owner. `record`: write AgentFenced before registering again (not when the log
        already says why this incarnation is finished, e.g. a goodbye we did not write)."""
        if self.fenced is not None and not superseded:
            return
        self.fenced = reason
        if superseded and not self.superseded:
            self.superseded = True
            self._stopped.set()  # a replaced process stops for good: wait_stopped() returns
        if not superseded and record:
            # The reason may quote another event's text (a death written about us): cut to what the codec
            # takes, or the record could never be written and we, who write it first, never register again.
            self._fence_record = ev.AgentFenced(producer=self.producer, agent_id=self.agent_id,
                                                incarnation=self.incarnation, reason=reason[:ev.MAX_TEXT],
                                                fenced_at=ev.utcnow(), ttl=self.ttl)
        lost = list(self.owned)
        self.owned.clear()
        self._sessions.clear()
        log.warning("%s: fenced (incarnation %d): %s; dropped %d session(s)",
                    self.agent_id, self.incarnation, reason, len(lost))
        self._call(self._on_fenced, reason)
        for sid in lost:
            self._call(self._on_lost, sid, "fenced")

    async def _try_reregister(self) -> None:
        """Register a new incarnation; an attempt in flight is never abandoned (it may still land)."""
        if self._pending_registration is None:
            started = time.monotonic()
            try:
                if self._fence_record is not None:
                    # Write down the decision we took alone, then come back as a new incarnation.
                    (await self.store.submit(self._fence_record)).add_done_callback(_outcome_seen)
                    self._fence_record = None
                registration = self._registration()
                # Only if nobody registered this agent id since the newest registration we know of: one that
                # landed late, after another process took over, would supersede that process in turn.
                known = self._registered.get(self.agent_id) or [self.incarnation]
                expect = max(known[-1], self._unreadable_registration)
                future = await self.store.submit(registration, expect=expect,
                                                 expect_filter=self._own_registrations)
                future.add_done_callback(_outcome_seen)  # a goodbye may stop waiting for it (see goodbye)
            except LedgerError as e:
                log.debug("%s: cannot register yet: %s", self.agent_id, e)
                await asyncio.sleep(min(self.heartbeat, 1.0))
                return
            self._pending_registration = (future, started, registration)
        future, started, registration = self._pending_registration
        done, _ = await asyncio.wait({future}, timeout=self.heartbeat)
        if not done:
            return
        self._pending_registration = None
        if future.exception() is not None:
            # Conflict: a registration we have not seen yet; the watch brings it (and says if we were superseded).
            log.debug("%s: registration failed: %s", self.agent_id, future.exception())
            await asyncio.sleep(min(self.heartbeat, 1.0))
            return
        self._adopt(future.result(), started, registration)

    # --- watching our own agent and the sessions we own ------------------------------------

    async def _watch_loop(self) -> None:
        # Every agent's registrations, the rest of our own agent's events (filters may not overlap), sessions.
        own = [subjects.event_subject("agent", self.agent_id, verb, "*") for verb in _AGENT_VERBS]
        filters = [_REGISTRATIONS, *own, subjects.family_filter("session")]
        start = self.incarnation
        current: list[Replay] = []

        def on_connection(kind: str) -> None:
            # After a reconnect (the server may have restarted and lost our consumer) start again at once.
            if kind == "reconnected":
                for replay in current:
                    replay.interrupt()

        self.store.add_connection_listener(on_connection)
        try:
            while not self._closing:
                replay = self.store.replay(filters, start_seq=start, follow=True)
                current[:] = [replay]
                try:
                    await self._know_registrations([self.agent_id], start)
                    async for batch in replay:
                        if batch:
                            self._batch_end = batch[-1].seq
                        for item in batch:  # first: a claim is judged on the registrations stored before it
                            if isinstance(item, Recorded) and isinstance(item.event, ev.AgentRegistered) \
                                    and lc.writer_problem(item.event) is None:  # one the folds take
                                self._note_registration(item.seq, item.event.agent_id)
                        await self._prefetch(batch)
                        for item in batch:
                            if isinstance(item, Recorded):
                                await self._observe(item)
                            else:  # dead-lettered by the projector; nothing here can act on it
                                if item.subject == self._own_registrations:
                                    self._unreadable_registration = max(self._unreadable_registration, item.seq)
                                log.warning("%s: watch skips unreadable #%d on %s: %s", self.agent_id, item.seq,
                                            item.subject, item.reason)
                            start = item.seq + 1  # only once judged: a read that failed is tried again
                except (LedgerError, asyncio.TimeoutError) as e:
                    log.debug("%s: watch interrupted (%s); resuming at #%d", self.agent_id, e, start)
                    await asyncio.sleep(0.5)
                except Exception:  # noqa: BLE001 - a bug here must not leave a beating agent that no longer watches
                    log.exception("%s: watch failed at #%d; trying again", self.agent_id, start)
                    await asyncio.sleep(1.0)
        finally:
            self.store.remove_connection_listener(on_connection)

    async def _observe(self, rec: Recorded) -> None:
        e = rec.event
        match e:
            case ev.AgentRegistered() if e.agent_id != self.agent_id:
                pass  # noted with its batch, for judging claims
            case ev.AgentRegistered() if lc.writer_problem(e) is not None:
                log.warning("%s: ignoring #%d, a registration of this agent written by %s, which every fold "
                            "flags", self.agent_id, rec.seq, e.producer.id)
            case ev.AgentRegistered() if self._pending_registration is not None \
                    and e.event_id == self._pending_registration[2].event_id:
                # Our re-registration, seen before its acknowledgement: adopt it now, so that what follows it
                # in the log (a claim for it, a death written about it) is judged as ours.
                self._adopt(rec.seq, self._pending_registration[1], e, rec.timestamp_ns)
            case ev.AgentRegistered():  # (noted with its batch)
                if rec.seq == self.incarnation:
                    self._self_state, _ = lc.evolve_agent(None, rec)
                if lc.superseded_by([(rec.seq, e.instance_id)], self.incarnation, self.instance_id):
                    self._fence(f"superseded by instance {e.instance_id} (incarnation {rec.seq})", superseded=True)
                elif rec.seq > self.incarnation and self.fenced is None:
                    # Our instance id, yet not ours (we register again only while fenced): every fold now takes
                    # it as our current incarnation, so claims by ours would be flagged. Come back as a new one.
                    self._fence(f"the log registers incarnation {rec.seq} of this process, which it did not "
                                f"write (by {e.producer.id})", record=False)
            case ev.AgentEvent():
                self._observe_self(rec)
            case ev.SessionEvent():
                await self._observe_session(rec)

    def _observe_self(self, rec: Recorded) -> None:
        """Our own incarnation's lifecycle, folded by the fold's rule: we act on what every reader applies."""
        before = self._self_state
        if before is None or before.incarnation != self.incarnation:
            return  # the watch has not reached our current registration yet: older events are not ours
        after, anomaly = lc.evolve_agent(before, rec)
        if anomaly is not None or after is None:
            return  # flagged, not applied: no reader acts on it, nor do we
        self._self_state = after
        e = rec.event
        if self.fenced is not None or after.status == before.status:
            return
        if after.status == lc.A_DEAD:
            self._fence(f"declared dead by {e.producer.id}: {getattr(e, 'reason', '')}")
        elif after.status == lc.A_GONE and not self._said_goodbye:
            # Not ours (we write ours only once closing): the log says this incarnation is gone, and every
            # reader acts on that, so stop acting and come back as a new incarnation.
            self._fence(f"the log says incarnation {self.incarnation} said goodbye ({getattr(e, 'reason', '')}, "
                        f"written by {e.producer.id}), which this process did not write", record=False)
        elif after.status == lc.A_FENCED:
            # Ours is written only while fenced, just before registering again: this one is not.
            self._fence(f"the log says incarnation {self.incarnation} fenced itself ({getattr(e, 'reason', '')}, "
                        f"written by {e.producer.id})", record=False)
        elif after.status == lc.A_DRAINED and self.owned and e.event_id not in self._wrote:
            # Not ours (we say drained only once we own nothing): no reader moves a drained agent's sessions nor
            # judges its liveness, so the ones we hold would stay with us for ever. Come back as a new
            # incarnation: this one's sessions are then superseded, and handed on.
            self._fence(f"the log says incarnation {self.incarnation} drained ({getattr(e, 'reason', '')}, "
                        f"written by {e.producer.id}) while it owns {self.load} session(s)", record=False)
        elif after.status == lc.A_DRAINING and not self.draining and e.event_id not in self._wrote:
            # The log says we drain (sessions are handed off, no new claims for us): behave so, and say when done.
            log.warning("%s: the log says incarnation %d is draining (written by %s); draining",
                        self.agent_id, self.incarnation, e.producer.id)
            self.draining = True
            if not self.owned:
                self._spawn(self._drained(), "drained")

    def _note_registration(self, seq: int, agent_id: str | None = None) -> None:
        seqs = self._registered.get(agent_id or self.agent_id)
        if seqs is None:
            return  # not known yet: read whole when first needed (a partial list would mislead the lookup)
        i = bisect.bisect_left(seqs, seq)
        if i == len(seqs) or seqs[i] != seq:
            seqs.insert(i, seq)

    async def _know_registrations(self, agents: Iterable[str], floor: int) -> None:
        """Read, once per agent, its registrations up to (at least) `floor`; the watch delivers later ones."""
        missing = sorted({a for a in agents if a not in self._registered})
        # Past the whole batch being judged: its registrations of agents not known yet were passed over.
        floor = max(floor, self._batch_end)
        for i in range(0, len(missing), PREFETCH_CONCURRENCY):
            chunk = missing[i:i + PREFETCH_CONCURRENCY]
            found = await asyncio.gather(*(self.ledger.registrations(a, min_last_seq=floor) for a in chunk))
            for agent_id, seqs in zip(chunk, found):
                if agent_id not in self._registered:
                    self._registered[agent_id] = sorted(seqs)

    def _may_gain(self, e: ev.Event) -> bool:
        return (isinstance(e, ev.SessionClaimed) and e.agent_id == self.agent_id
                and e.incarnation == self.incarnation and self.fenced is None and not self._closing)

    async def _observe_session(self, rec: Recorded) -> None:
        """Judge one session event by the fold's rule; gain or lose the session only as the fold does."""
        e = rec.event
        assert isinstance(e, ev.SessionEvent)
        sid = e.session_id
        if lc.writer_problem(e) is not None:
            # Its producer may not write it at all (a claim for us by another agent, say): every fold flags it
            # whatever the session's state, so it costs no read.
            if sid in self._sessions or self._may_gain(e):
                log.warning("%s: ignoring #%d on session %s, written by %s, who may not write it", self.agent_id,
                            rec.seq, sid, e.producer.id)
            return
        for _ in range(JUDGE_ATTEMPTS):
            known = self._session_seq.get(sid, 0)
            if rec.seq <= known:
                return  # judged already (our own write told us, or a restarted watch repeats it)
            cached = self._sessions.get(sid)
            before = cached
            if cached is None:
                if not self._may_gain(e):
                    return  # a session we do not own: nothing here can make it ours
                prefetched = self._prefetched.pop((sid, rec.seq), _MISSING)
                before = (await self._session_before(sid, rec.seq) if prefetched is _MISSING
                          else prefetched)  # type: ignore[assignment]
            await self._know_registrations([getattr(e, "agent_id", None) or self.agent_id], rec.seq)
            incarnation_at = lc.registrations_lookup(self._registered)
            owner = before.owner if isinstance(e, ev.SessionClaimed) and before is not None else None
            agent_at = await self._agents_at([owner] if owner else [], rec.seq)
            if self._session_seq.get(sid, 0) == known and self._sessions.get(sid) is cached:
                break
            # One of our own writes to this session landed while we read: judge on what it taught us.
        else:
            log.warning("%s: could not judge #%d on session %s (our own writes kept landing)",
                        self.agent_id, rec.seq, sid)
            return
        after, anomaly = lc.evolve_session(before, rec, incarnation_at, agent_at)
        self._session_seq[sid] = rec.seq
        if anomaly is not None:
            if cached is not None or self._may_gain(e):
                log.warning("%s: ignoring #%d on session %s, which the ledger does not apply: %s: %s",
                            self.agent_id, rec.seq, sid, anomaly.kind, anomaly.detail)
            return
        self._settle(sid, after, e)

    async def _prefetch(self, batch: list[Recorded | Unreadable]) -> None:
        """Read at once, concurrently, the states the batch's claims for us will be judged on (a reclaimer
        hands over hundreds of sessions at a time; one read after the other would hold the watch up)."""
        self._prefetched.clear()
        self._agents_read.clear()  # read again for each batch (its floor is the batch's end)
        wanted: dict[str, int] = {}
        for item in batch:
            e = item.event if isinstance(item, Recorded) else None
            if (isinstance(e, ev.SessionClaimed) and self._may_gain(e) and e.session_id not in self._sessions
                    and lc.writer_problem(e) is None
                    and e.session_id not in wanted and item.seq > self._session_seq.get(e.session_id, 0)):
                wanted[e.session_id] = item.seq
        keys = list(wanted.items())
        for i in range(0, len(keys), PREFETCH_CONCURRENCY):
            chunk = keys[i:i + PREFETCH_CONCURRENCY]
            states = await asyncio.gather(*(self._session_before(sid, seq) for sid, seq in chunk))
            self._prefetched.update(zip(chunk, states))

    async def _session_before(self, session_id: str, seq: int) -> lc.SessionState | None:
        """The session's state just before `seq`, folded from its history as the projections fold it."""
        items = await self.store.history("session", session_id, min_last_seq=seq)  # a replica that has `seq`
        records = [i for i in items if isinstance(i, Recorded) and i.seq < seq]
        await self._know_registrations(lc.agents_acting(records), seq)
        incarnation_at = lc.registrations_lookup(self._registered)
        agent_at = await self._agents_at(lc.owners_judged(records, incarnation_at), seq)
        state, _ = lc.fold(lc.evolve_session, records, incarnation_at, agent_at)
        return state

    async def _agents_at(self, agents: Iterable[str], floor: int) -> lc.AgentAt:
        """agent_at over these agents' histories (the fold's take-over check needs the owner's state as of the
        claim), each read at most once per watch batch: from a replica that has the whole batch."""
        agents = sorted(set(agents))
        floor = max(floor, self._batch_end)
        missing = [a for a in agents if a not in self._agents_read or self._agents_read[a][0] < floor]
        for i in range(0, len(missing), PREFETCH_CONCURRENCY):
            chunk = missing[i:i + PREFETCH_CONCURRENCY]
            found = await asyncio.gather(*(self.store.history("agent", a, min_last_seq=floor) for a in chunk))
            for agent_id, items in zip(chunk, found):
                records = [r for r in items if isinstance(r, Recorded)]
                self._agents_read[agent_id] = (floor, lc.agents_lookup({agent_id: records}))
        known = {a: self._agents_read[a][1] for a in agents}

        def agent_at(agent_id: str, seq: int) -> lc.AgentState | None:
            lookup = known.get(agent_id)
            return lookup(agent_id, seq) if lookup is not None else None

        return agent_at

    def _learn(self, session_id: str, before: lc.SessionState | None, seq: int, event: ev.Event) -> None:
        """Extend a session's fold with our own acknowledged write (decided on `before`, the state it
        read; the compare-and-set proved nothing came between)."""
        if seq <= self._session_seq.get(session_id, 0):
            return  # the watch was faster and judged it already
        rec = Recorded(subjects.LEDGER_STREAM, seq, codec.subject_of(event), time.time_ns(), event)
        after, anomaly = lc.evolve_session(before, rec)
        self._session_seq[session_id] = seq
        if anomaly is None:
            self._settle(session_id, after, event)

    def _settle(self, session_id: str, after: lc.SessionState | None, e: ev.Event) -> None:
        """Own the session exactly when its folded state says this incarnation owns it."""
        held = self.owned.get(session_id)
        if lc.owns(after, self.agent_id, self.incarnation) and self.fenced is None:
            assert after is not None and after.token is not None
            self._sessions[session_id] = after
            if held is not None and held.token == after.token:
                return
            claim = self.owned[session_id] = Claim(session_id, after.token, after.claim_reason or "")
            if held is None:
                self.touch(session_id)
                if e.producer.id != self.agent_id:
                    self._call(self._on_gained, claim, e.producer.id)  # a reclaimer gave it to us
                self._shed_excess()
            return
        self._sessions.pop(session_id, None)
        if held is not None:
            self._lose(session_id, _why_lost(e))

    def _catch_up_on_writes(self) -> None:
        """Writes whose first try failed (the server was electing, say) are tried again with each beat: an
        agent over capacity must not stay over it, nor a drained one stay draining in the log."""
        if self.load > self.capacity:
            self._shed_excess()
        if self.draining and not self.owned and self._drained_for != self.incarnation:
            self._spawn(self._drained(), "drained")

    def _spawn(self, coro: Coroutine[object, object, None], name: str) -> None:
        """A short task of ours (a release, a drained note): kept, and stopped with the agent."""
        task = asyncio.get_running_loop().create_task(coro, name=f"agent-{self.agent_id}-{name}")
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    def _call(self, callback: Callable[..., None] | None, *args: object) -> None:
        """The application's callback: what it raises is logged, and never stops our watch or heartbeats."""
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:  # noqa: BLE001 - not ours to handle; ours is to keep the lease and the watch going
            log.exception("%s: %s raised", self.agent_id, getattr(callback, "__name__", "a callback"))

    def _shed_excess(self) -> None:
        """Over capacity (claims that raced each other): release the newest extra sessions."""
        extra = decide.excess_sessions({sid: c.token for sid, c in self.owned.items()}, self.capacity)
        for sid in extra:
            if sid in self._releasing:
                continue
            self._releasing.add(sid)  # busy() refuses it from here on: no work starts on it
            reason = f"over capacity: owned {self.load} of {self.capacity} session(s)"
            self._spawn(self._release_excess(sid, reason), f"shed-{sid}")

    async def _release_excess(self, session_id: str, reason: str) -> None:
        try:
            await self.release(session_id, reason=reason)
            log.info("%s: released %s: %s", self.agent_id, session_id, reason)
        except LedgerError as e:
            log.info("%s: release of extra session %s not written: %s", self.agent_id, session_id, e)
        finally:
            self._releasing.discard(session_id)

    def _lose(self, session_id: str, why: str) -> None:
        for bookkeeping in (self._last_active, self._in_flight, self._idle_ttl, self._sessions):
            bookkeeping.pop(session_id, None)
        if self.owned.pop(session_id, None) is not None:
            log.info("%s: lost session %s: %s", self.agent_id, session_id, why)
            self._call(self._on_lost, session_id, why)
            if self.draining and not self.owned:
                self._spawn(self._drained(), "drained")

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

    async def _check_current_incarnation(self) -> None:
        # Only a later registration by another process supersedes us. The floor (our own incarnation) keeps a
        # lagging replica from answering: one that has not even seen our registration proves nothing.
        items = await self.store.read(subjects.event_subject("agent", self.agent_id, "registered", "*"),
                                      min_last_seq=self.incarnation)
        seen = {i.seq: i.event.instance_id for i in items
                if isinstance(i, Recorded) and isinstance(i.event, ev.AgentRegistered)}
        newer = lc.superseded_by(seen.items(), self.incarnation, self.instance_id)
        if newer is not None:
            self._fence(f"superseded by instance {seen[newer]} (incarnation {newer})", superseded=True)
            self._check_may_act()

    async def claim(self, session_id: str, *, reason: str = "initial", previous_token: int | None = None,
                    causation_id: str | None = None) -> Claim:
        """Claim a session for this agent (compare-and-set); its sequence is the fencing token."""
        self._check_may_act()
        if self.draining:
            raise Draining(f"agent {self.agent_id} is draining and takes no new claims")
        if self.load >= self.capacity and session_id not in self.owned:
            raise CapacityExhausted(f"agent {self.agent_id} owns {self.load} of {self.capacity} session(s)")
        await self._check_current_incarnation()
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
        self._idle_ttl[session_id] = seen[-1].idle_ttl if seen and seen[-1] else None
        self.touch(session_id)
        self._learn(session_id, seen[-1], token, event)
        return self.owned.get(session_id) or Claim(session_id, token, reason)

    async def _owner_write(self, session_id: str, make: Callable[[int], ev.Event], token: int | None) -> int:
        self._check_may_act()
        held = self.owned.get(session_id)
        token = token if token is not None else (held.token if held else None)
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
        floor = self._session_seq.get(session_id, 0)
        try:
            seq, event = await self.ledger.cas(
                lambda m: self.ledger.session(session_id, min_last_seq=max(m or 0, floor) or None), decide_write)
        except Fenced:
            if held is not None and held.token == token:
                self.owned.pop(session_id, None)
                self._sessions.pop(session_id, None)
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
        held = self.owned.get(route.session_id)
        if held is None:
            raise NotFound(f"agent {self.agent_id} holds no claim on session {route.session_id} of route {route_id}")
        state, _ = await self.ledger.session(route.session_id,
                                             min_last_seq=self._session_seq.get(route.session_id) or None)
        decide.check_owner(state, route.session_id, self.ref, held.token)
        return await self.ledger.transition_route(route_id, to_state, reason=reason, token=held.token,
                                                  address=address, traffic=traffic)

    async def report_health(self, route_id: str, *, healthy: bool, detail: str = "") -> int:
        return await self.ledger.report_health(route_id, healthy=healthy, detail=detail)

    # --- drain -------------------------------------------------------------------------------

    async def drain(self, *, deadline: float | datetime = 3600.0, reason: str = "") -> int:
        """Take no new claims; the sessions are handed off before `deadline` (seconds from now, or a time)."""
        self._check_may_act()
        when = deadline if isinstance(deadline, datetime) else ev.utcnow() + timedelta(seconds=deadline)
        seq = await self._write_draining(self.incarnation, when, reason)
        self.draining = True
        self._drain_asked = (when, reason)
        if not self.owned:
            await self._drained()
        return seq

    async def _write_draining(self, incarnation: int, deadline: datetime, reason: str) -> int:
        event = ev.AgentDraining(producer=self.producer, agent_id=self.agent_id, incarnation=incarnation,
                                 deadline=deadline, reason=reason)
        self._wrote.add(event.event_id)  # so the watch does not take it for a drain written about us
        return await self.store.append(event)

    async def _drained(self) -> None:
        if self.fenced is None and not self._closing and self._drained_for != self.incarnation:
            self._drained_for = self.incarnation  # once: a second one would be an illegal transition
            drained = ev.AgentDrained(producer=self.producer, agent_id=self.agent_id, incarnation=self.incarnation,
                                      reason="no sessions left")
            self._wrote.add(drained.event_id)  # so the watch does not take it for a drained written about us
            try:
                await self.store.append(drained)
            except LedgerError as e:
                self._drained_for = 0  # not written: the beat loop tries again
                log.info("%s: drained not written yet: %s", self.agent_id, e)

    # --- activity and idleness ---------------------------------------------------------------

    def touch(self, session_id: str) -> None:
        """Note activity on a session (it is not idle now)."""
        self._last_active[session_id] = time.monotonic()

    @contextlib.asynccontextmanager
    async def busy(self, session_id: str) -> AsyncIterator[Claim]:
        """Mark work in flight on an owned session: a busy session is never released as idle."""
        claim = self.owned.get(session_id)
        if claim is None or session_id in self._releasing:
            raise NotFound(f"agent {self.agent_id} does not own session {session_id}")
        self._in_flight[session_id] = self._in_flight.get(session_id, 0) + 1
        self.touch(session_id)
        try:
            yield claim
        finally:
            if session_id in self._in_flight:
                self._in_flight[session_id] -= 1
                self.touch(session_id)

    def activity(self) -> dict[str, Activity]:
        """Idleness of every owned session (idle TTLs unknown so far are None; see `learn_idle_ttl`)."""
        now = time.monotonic()
        return {sid: Activity(idle_for=now - self._last_active.get(sid, now), in_flight=self._in_flight.get(sid, 0),
                              idle_ttl=self._idle_ttl.get(sid)) for sid in self.owned}

    def needs_idle_ttl(self) -> list[str]:
        return [sid for sid in self.owned if sid not in self._idle_ttl]

    def learn_idle_ttl(self, session_id: str, idle_ttl: float | None) -> None:
        if session_id in self.owned:
            self._idle_ttl[session_id] = idle_ttl
            self._last_active.setdefault(session_id, time.monotonic())

    async def release_if_idle(self, session_id: str) -> bool:
        """Release the session if it is still idle past its TTL and nothing is in flight."""
        info = self.activity().get(session_id)
        if info is None or info.idle_ttl is None or info.in_flight or info.idle_for < info.idle_ttl:
            return False
        self._releasing.add(session_id)  # from here on busy() refuses it: no work starts on it
        try:
            await self.release(session_id, reason=f"idle for {info.idle_for:.0f}s (idle TTL {info.idle_ttl:g}s)")
        except LedgerError as e:
            log.info("%s: idle release of %s not written: %s", self.agent_id, session_id, e)
            return False
        finally:
            self._releasing.discard(session_id)
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
