"""The route watchdog: moves routes along their lifecycle and ends the stuck ones, each step as an event.

It applies `consumers.route_rules` to every live route after each change and
on a timer (timeouts need no event to fire). Each transition is decided again
on the route's history and written with a compare-and-set, so replicas (or an
agent moving its own route) cannot make it twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime

from ledger import decide
from ledger import events as ev
from ledger import lifecycle as lc
from ledger.errors import IllegalTransition, LedgerError, NotFound
from ledger.writer import Writer
from projections.state import ROUTE, SESSION

from .errors import Moved, moved_on_conflict
from .follow import Follower
from .reactor import Reactor
from .route_rules import Step, next_step

log = logging.getLogger(__name__)

FINAL = (lc.FAILED_TO_START, lc.TERMINATED)


class RouteWatchdog(Reactor):
    kinds = (ROUTE, SESSION)

    def __init__(self, ledger: Writer, follower: Follower, *, tick: float = 0.5) -> None:
        super().__init__(follower, tick=tick)
        self.ledger = ledger
        self._inflight: dict[str, tuple[int, float]] = {}
        self.writes = 0
        """Transitions written (counted, not kept: a long-running watchdog stays small)."""

    async def step(self, now: datetime) -> list[tuple[str, Step]]:
        state = self.follower.state.ledger
        clock = time.monotonic()
        due: list[tuple[lc.RouteState, Step]] = []
        for route in list(state.routes.values()):
            if route.state in FINAL:
                continue
            seen = self._inflight.get(route.route_id)
            if seen is not None and route.last_seq <= seen[0] and clock - seen[1] < 10.0:
                continue
            step = next_step(route, state.sessions.get(route.session_id), now)
            if step is not None:
                due.append((route, step))
                self._inflight[route.route_id] = (route.last_seq, clock)
        done = await asyncio.gather(*(self._write(route, step) for route, step in due))
        return [d for d in done if d is not None]

    async def _write(self, route: lc.RouteState, step: Step) -> tuple[str, Step] | None:
        session = self.follower.state.ledger.sessions.get(route.session_id)
        seen = (route.state, route.traffic)

        def decide_step(current: lc.RouteState | None) -> ev.Event:
            # Only if the route is still as we judged it: a replica or the owner may have moved it.
            if current is None or (current.state, current.traffic) != seen:
                raise Moved("route", route.route_id, f"no longer {route.state} ({route.traffic})")
            decide.decide_transition(current, route.route_id, step.to_state)
            return ev.RouteTransitioned(producer=self.ledger.producer, route_id=route.route_id,
                                        from_state=current.state, to_state=step.to_state,
                                        # A reason may quote a health detail or a session's reason, each
                                        # up to the codec's bound: cut, or the step could never be written.
                                        reason=step.reason[:ev.MAX_TEXT],
                                        address=step.address, traffic=step.traffic,
                                        causation_id=session.cause_id if session else None)

        try:
            with moved_on_conflict("route", route.route_id):
                await self.ledger.cas(lambda m: self.ledger.route(route.route_id, min_last_seq=m), decide_step)
        except (IllegalTransition, Moved, NotFound) as e:
            log.debug("route %s: %s", route.route_id, e)  # it moved on meanwhile
            return None
        except LedgerError as e:
            log.warning("route %s: %s -> %s not written: %s", route.route_id, route.state, step.to_state, e)
            self._inflight.pop(route.route_id, None)
            return None
        log.info("route %s: %s -> %s (%s)", route.route_id, route.state, step.to_state, step.reason)
        self.writes += 1
        return route.route_id, step
