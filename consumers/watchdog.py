"""The route watchdog: moves routes along their lifecycle and ends the stuck ones, each step as an event.

It applies `consumers.route_rules` to a route when the route or its session
changed, and when the route's deadline passes (`route_rules.next_check`:
timeouts need no event to fire) - a tick costs the routes due, not the routes
known. Its first step judges every live route of the fold once, from memory.

Each transition is decided on the route as the in-memory fold holds it and
appended with a compare-and-set on the route's last sequence there: no read.
Only when that loses (a replica or the owner moved the route, or the fold
lags) is the route's history read - at most `READ_LIMIT` at once - and the
step decided again on it, so replicas (or an agent moving its own route)
cannot make it twice. A route whose write failed is tried again after a
backoff (`consumers.retry`), not on every tick.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

from ledger import decide
from ledger import events as ev
from ledger import lifecycle as lc
from ledger.errors import IllegalTransition, LedgerError, NotFound
from ledger.writer import Writer
from projections.state import ROUTE, SESSION, Change

from .deadlines import Deadlines
from .errors import Moved, moved_on_conflict
from .follow import Follower
from .partition import EVERYTHING, Partition
from .reactor import Reactor
from .retry import Backoff, BoundedReads
from .route_rules import Step, next_check, next_step

log = logging.getLogger(__name__)

FINAL = (lc.FAILED_TO_START, lc.TERMINATED)
INFLIGHT_PATIENCE = 10.0
"""Seconds a route is left alone after our write for it, while the log does not show it yet."""
MAX_WRITES = 256
"""Transitions in flight at once (the rest of a large backlog waits its turn, and a cancel finds few to stop)."""


class RouteWatchdog(Reactor):
    kinds = (ROUTE, SESSION)

    def __init__(self, ledger: Writer, follower: Follower, *, tick: float = 0.5,
                 reads: BoundedReads | None = None, partition: Partition = EVERYTHING) -> None:
        super().__init__(follower, tick=tick)
        self.ledger = ledger
        self.reads = reads or BoundedReads()
        self.partition = partition
        """The pools whose routes (by their session's pool) this replica moves."""
        self.backoff = Backoff[str]()
        self._inflight: dict[str, int] = {}
        """route id -> its last sequence when we wrote, until the log shows it moved (or patience ran out)."""
        self._due = Deadlines[str]()
        """route id -> when (server time, seconds) it must be judged again without any change."""
        self._noted: set[str] = set()
        """Routes changed (or whose session changed) since the last step."""
        self._of_session: dict[str, set[str]] = {}
        """session id -> its live routes we know of (a session's change may move them)."""
        self._started = False
        self._slots = asyncio.Semaphore(MAX_WRITES)
        self.writes = 0
        """Transitions written (counted, not kept: a long-running watchdog stays small)."""
        self.looked = 0
        """Routes judged (for tests and status: a tick with nothing due judges none)."""

    def changed(self, change: Change) -> bool:
        if change.kind == ROUTE:
            self._noted.add(change.id)
            return True
        routes = self._of_session.get(change.id)
        if routes:
            self._noted.update(routes)
        return bool(routes)

    def _mine(self, route: lc.RouteState) -> bool:
        """Is the route in one of this replica's pools? A route's pool is its session's; one whose session the
        fold does not know (yet, or any more) goes by `Partition.owns_unplaced` - and stays with a replica that
        held it while its session was known (a session retired as it ended: only that replica is told)."""
        if self.partition.everything:
            return True
        session = self.follower.state.ledger.sessions.get(route.session_id)
        if session is None and route.route_id in self._of_session.get(route.session_id, ()):
            return True
        return self.partition.owns(session.pool) if session is not None else self.partition.owns_unplaced()

    def _forget(self, route_id: str, session_id: str | None) -> None:
        self._due.discard(route_id)
        self._inflight.pop(route_id, None)
        self.backoff.forget(route_id)
        routes = self._of_session.get(session_id) if session_id is not None else None
        if routes is not None:
            routes.discard(route_id)
            if not routes:
                del self._of_session[session_id]  # type: ignore[arg-type]

    async def step(self, now: datetime) -> list[tuple[str, Step]]:
        state = self.follower.state.ledger
        t = now.timestamp()
        if not self._started:  # the fold as it stands: every live route once
            self._started = True
            todo = set(state.routes)
            self._noted.clear()
        else:
            todo, self._noted = self._noted, set()
            todo.update(self._due.pop_due(t))
            todo.update(self.backoff.pop_due(t))
        due: list[tuple[lc.RouteState, Step]] = []
        for route_id in todo:
            route = state.routes.get(route_id)
            if route is None or route.state in FINAL or not self._mine(route):  # ended, retired, or not ours
                self._forget(route_id, route.session_id if route is not None else None)
                continue
            self._of_session.setdefault(route.session_id, set()).add(route_id)
            self.looked += 1
            retry_at = self.backoff.until(route_id)
            if retry_at is not None and retry_at > t:
                continue  # failed lately: its retry is scheduled, a change does not bring it forward
            seen = self._inflight.get(route_id)
            if seen is not None:
                if route.last_seq <= seen and route_id in self._due:
                    continue  # our write is not in the log yet; patience is scheduled
                del self._inflight[route_id]
            step = next_step(route, state.sessions.get(route.session_id), now)
            if step is not None:
                due.append((route, step))
                self._inflight[route_id] = route.last_seq
                self._due.set(route_id, t + INFLIGHT_PATIENCE)
                continue
            at = next_check(route)
            if at is None:
                self._due.discard(route_id)
            else:
                self._due.set(route_id, max(at.timestamp(), t + self.tick))
        if not due:
            return []
        done = await asyncio.gather(*(self._write(route, step, t) for route, step in due))
        return [d for d in done if d is not None]

    async def _write(self, route: lc.RouteState, step: Step, t: float) -> tuple[str, Step] | None:
        session = self.follower.state.ledger.sessions.get(route.session_id)
        seen = (route.state, route.traffic)
        route_id = route.route_id

        def decide_step(current: lc.RouteState | None) -> ev.Event:
            # Only if the route is still as we judged it: a replica or the owner may have moved it.
            if current is None or (current.state, current.traffic) != seen:
                raise Moved("route", route_id, f"no longer {route.state} ({route.traffic})")
            decide.decide_transition(current, route_id, step.to_state)
            return ev.RouteTransitioned(producer=self.ledger.producer, route_id=route_id,
                                        from_state=current.state, to_state=step.to_state,
                                        # A reason may quote a health detail or a session's reason, each
                                        # up to the codec's bound: cut, or the step could never be written.
                                        reason=step.reason[:ev.MAX_TEXT],
                                        address=step.address, traffic=step.traffic,
                                        causation_id=session.cause_id if session else None)

        async def read(floor: int | None) -> tuple[lc.RouteState | None, int]:
            return await self.reads.run(lambda: self.ledger.route(route_id, min_last_seq=floor))

        try:
            # Decided on the fold, guarded by its last sequence: no read unless the fold was behind.
            known: tuple[lc.RouteState | None, int] = (route, route.last_seq)
            async with self._slots:
                with moved_on_conflict("route", route_id):
                    await self.ledger.cas(read, decide_step, known=known)
        except (IllegalTransition, Moved, NotFound) as e:
            log.debug("route %s: %s", route_id, e)  # it moved on meanwhile
            self.backoff.succeeded(route_id)
            return None
        except LedgerError as e:
            at = self.backoff.failed(route_id, t)
            self._inflight.pop(route_id, None)
            self._due.discard(route_id)  # the backoff brings it back
            log.warning("route %s: %s -> %s not written (again in %.1fs): %s", route_id, route.state,
                        step.to_state, at - t, e)
            return None
        log.info("route %s: %s -> %s (%s)", route_id, route.state, step.to_state, step.reason)
        self.backoff.succeeded(route_id)
        self.writes += 1
        return route_id, step
