"""Writer: the operations any client may perform, and reading one entity's current state.

    async with Writer.connect(Settings.from_env(), producer_id="operator-scheduler") as ledger:
        sid, _ = await ledger.create_session(pool="gpu")
        await ledger.create_route("r-1", session_id=sid, endpoint="chat")
        await ledger.transition_route("r-1", "STARTING")

Every write is decided on the entity's current state (its history folded with
`ledger.lifecycle`) and appended with a compare-and-set on that history, so
no other writer can slip in between; a lost race is re-read and re-decided.
The producer id is a role (`ledger.authority`): operators (`operator`,
`operator-<name>`, `cli`) create and terminate sessions and routes; an event
its role may not write is refused here (NotAuthorized), as every fold would flag it.
Agents use `ledger.agent.Agent`, which builds on this.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

import msgspec

from . import authority, codec, decide, subjects
from . import events as ev
from . import lifecycle as lc
from .codec import Recorded
from .errors import Conflict, IllegalTransition, InvalidInput, NotAuthorized, NotFound, StaleToken
from .events import Producer
from .ids import check_token, new_id
from .settings import Settings
from .store import EventStore

log = logging.getLogger(__name__)


def check_writer(event: ev.Event, owner: object = lc.UNKNOWN_OWNER) -> None:
    """Refuse to write what every fold would flag as unauthorized (`lifecycle.writer_problem`)."""
    problem = lc.writer_problem(event, owner)
    if problem is not None:
        raise NotAuthorized(_advice(problem.detail, event))


_HINTS = {"session.created": "sessions are created by operators",
          "session.terminated": "sessions are terminated by operators, or by their owner",
          "route.created": "routes are created by operators, or by the agent owning the session",
          "agent.drain_requested": "drains are requested by operators, an agent drains only itself with Agent.drain"}


def _advice(detail: str, event: ev.Event) -> str:
    """The refusal, with what to do instead when an agent id was used where an operator writes."""
    if authority.role_of(event.producer.id) != authority.AGENT:
        return detail
    hint = _HINTS.get(event.type_tag())
    if hint is None:
        return detail
    return (f"{detail} (producer {event.producer.id!r} is an agent id; {hint}: connect with producer_id "
            f"'operator' or 'operator-<name>', or 'cli')")


def _floor(items: list[Any], min_last_seq: int | None) -> int | None:
    """What the lookups of a history's fold must be read at least up to: its last event (a replica lagging behind
    the one that served the history would miss an agent's death before a take-over, and flag the failover)."""
    last: int | None = items[-1].seq if items else None
    if last is None or (min_last_seq is not None and min_last_seq >= last):
        return min_last_seq
    return last


CAS_ATTEMPTS = 8
"""Re-read and re-decide a write this many times before giving up under contention."""

T = TypeVar("T")


class Writer:
    """Writes and entity reads on an EventStore, as one producer."""

    def __init__(self, store: EventStore, producer: Producer) -> None:
        self.store = store
        self.producer = producer

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, settings: Settings | None = None, *, producer_id: str = "cli",
                      name: str | None = None) -> AsyncIterator[Writer]:
        check_token(producer_id, "producer id")
        async with EventStore.connect(settings, name=name or f"ledger-{producer_id}") as store:
            yield cls(store, Producer(id=producer_id, instance=new_id()))

    # --- reading one entity -------------------------------------------------------

    async def registrations(self, agent_id: str, *, min_last_seq: int | None = None) -> list[int]:
        """Stream sequences of every registration of `agent_id` (its incarnations), oldest first.

        Only those the agent wrote itself (its id as producer token): the folds flag any other.
        """
        return await self.store.registrations(agent_id, min_last_seq=min_last_seq)

    async def _session_lookups(self, records: list[Recorded], min_last_seq: int | None
                               ) -> tuple[lc.IncarnationAt, lc.AgentAt, lc.RegisteredAt]:
        return await self.store.session_lookups(records, min_last_seq=min_last_seq)

    async def session(self, session_id: str, *, min_last_seq: int | None = None
                      ) -> tuple[lc.SessionState | None, int]:
        """(current state, last sequence of its history); state None if it was never created."""
        items = await self.store.history("session", session_id, min_last_seq=min_last_seq)
        records = [i for i in items if isinstance(i, Recorded)]
        folded = await self.store.session_fold(records, min_last_seq=_floor(items, min_last_seq))
        return folded.state, items[-1].seq if items else 0

    async def route(self, route_id: str, *, min_last_seq: int | None = None) -> tuple[lc.RouteState | None, int]:
        items = await self.store.history("route", route_id, min_last_seq=min_last_seq)
        records = [i for i in items if isinstance(i, Recorded)]
        session_at = None
        created = next((r.event for r in records if isinstance(r.event, ev.RouteCreated)), None)
        # The session's history tells which token a transition must carry and which agent (its owner) may write.
        if created is not None and any((isinstance(r.event, ev.RouteTransitioned) and r.event.token is not None)
                                       or authority.role_of(r.event.producer.id) == authority.AGENT for r in records):
            session_items = await self.store.history("session", created.session_id, min_last_seq=min_last_seq)
            session_records = [i for i in session_items if isinstance(i, Recorded)]
            session_at = lc.claims_lookup(created.session_id, session_records,
                                          *await self._session_lookups(session_records,
                                                                       _floor(session_items, min_last_seq)))
        state, _ = lc.fold(lc.evolve_route, records, session_at)
        return state, items[-1].seq if items else 0

    async def agent(self, agent_id: str, *, min_last_seq: int | None = None) -> tuple[lc.AgentState | None, int]:
        items = await self.store.history("agent", agent_id, min_last_seq=min_last_seq)
        state, _ = lc.fold(lc.evolve_agent, [i for i in items if isinstance(i, Recorded)])
        return state, items[-1].seq if items else 0

    # --- compare-and-set writes ---------------------------------------------------

    async def cas(self, read: Callable[[int | None], Awaitable[tuple[T, int]]],
                  decide_event: Callable[[T], ev.Event], *, known: tuple[T, int] | None = None) -> tuple[int, ev.Event]:
        """Read, decide, append with an expectation on the read's last sequence; on a lost race, again.

        `read(min_last_seq)` returns (state, last sequence); `decide_event(state)`
        returns the event or raises why it may not be written. With `known` (a state and its last sequence
        held already, as a consumer's in-memory fold holds them) the first attempt decides on it without a
        read: the expectation still guards it, and only a lost race reads.
        """
        min_seq: int | None = None
        for attempt in range(CAS_ATTEMPTS):
            state, last = known if known is not None and attempt == 0 else await read(min_seq)
            event = decide_event(state)
            check_writer(event, state.owner if isinstance(state, lc.SessionState) else lc.UNKNOWN_OWNER)
            try:
                return await self.store.append(event, expect=last), event
            except Conflict as lost:
                # Read again from a replica that has at least what beat us (Direct Get may lag).
                min_seq = lost.actual
        raise Conflict(subjects.entity_filter(type(event).family, event.entity_id), last)

    async def create_session(self, pool: str, *, session_id: str | None = None, platform: str = "default",
                             region: str = "default", labels: dict[str, str] | None = None,
                             idle_ttl: float | None = None) -> tuple[str, int]:
        """Create a session bound to a pool (never to an agent); returns (session id, sequence)."""
        session_id = session_id or f"s-{new_id()[:12]}"
        for value, what in ((session_id, "session id"), (pool, "pool"), (platform, "platform"), (region, "region")):
            check_token(value, what)
        # The idle TTL, like every field, is checked by codec.encode against the event's constraints.
        event = ev.SessionCreated(producer=self.producer, session_id=session_id, pool=pool, platform=platform,
                                  region=region, labels=labels or {}, idle_ttl=idle_ttl)
        check_writer(event)
        try:
            return session_id, await self._create(event)
        except Conflict:
            raise InvalidInput(f"session {session_id} already exists") from None

    async def terminate_session(self, session_id: str, *, reason: str = "", token: int | None = None) -> int:
        """End a session for good (as an operator; the owner passes its token)."""

        def decide_terminate(state: lc.SessionState | None) -> ev.Event:
            if state is None:
                raise NotFound(f"session {session_id} does not exist")
            if state.status == lc.S_TERMINATED:
                raise InvalidInput(f"session {session_id} is already terminated")
            if lc.terminate_problem(state, token) is not None:  # the fold would flag it: never write it
                raise StaleToken(session_id, token, state.token, state.owner)
            return ev.SessionTerminated(producer=self.producer, session_id=session_id, token=token, reason=reason)

        seq, _ = await self.cas(lambda m: self.session(session_id, min_last_seq=m), decide_terminate)
        return seq

    async def session_for_claim(self, session_id: str, *, min_last_seq: int | None = None
                                ) -> tuple[tuple[lc.SessionState | None, Any], int]:
        """((the session's state, its owner agent's state), last sequence of the session's history): what a claim
        is decided on. The owner's is read only for an assigned session (a take-over is judged on it);
        otherwise it is `lifecycle.NO_OWNER_STATE`."""
        state, last = await self.session(session_id, min_last_seq=min_last_seq)
        owner: Any = lc.NO_OWNER_STATE
        if state is not None and state.status == lc.S_ASSIGNED and state.owner is not None:
            owner = await self.store.known_agents.current(state.owner, last,
                                                           min_last_seq=max(last, min_last_seq or 0))
        return (state, owner), last

    async def claim_session(self, session_id: str, who: decide.AgentRef, *, reason: str = "initial",
                            previous_token: int | None = None, causation_id: str | None = None) -> int:
        """Claim a session for `who` (also on its behalf, as a reclaimer does); returns the claim token.

        Without `who.placement`, where its incarnation registered is read first: a claim for an agent of another
        pool, platform or region is refused, as every fold flags it."""
        if who.placement is None:
            registered = next((r for r in lc.as_registered(await self.store.registered(who.agent_id))
                               if r.incarnation == who.incarnation), None)
            if registered is not None:
                who = msgspec.structs.replace(who, placement=lc.placement_of(registered))
        seq, _ = await self.cas(
            lambda m: self.session_for_claim(session_id, min_last_seq=m),
            lambda read: decide.decide_claim(read[0], session_id, who, producer=self.producer, reason=reason,
                                             previous_token=previous_token, causation_id=causation_id,
                                             owner=read[1]))
        return seq

    async def create_route(self, route_id: str, *, session_id: str, endpoint: str, deployment: str = "",
                           probe: ev.Probe | None = None, start_timeout: float = 300.0,
                           stop_timeout: float = 300.0) -> int:
        check_token(route_id, "route id")
        check_token(session_id, "session id")
        event = ev.RouteCreated(producer=self.producer, route_id=route_id, session_id=session_id,
                                endpoint=endpoint, deployment=deployment, probe=probe, start_timeout=start_timeout,
                                stop_timeout=stop_timeout)
        codec.encode(event)  # refuses NaN, negative or absurd timeouts and delays before the session is read
        if probe is not None and probe.on_stale not in ("ignore", "deactivate", "terminate"):
            raise InvalidInput(f"probe.on_stale must be ignore, deactivate or terminate, got {probe.on_stale!r}")
        check_writer(event)  # a role that may not create routes at all, before any read
        state, _ = await self.session(session_id)
        if state is None:
            raise NotFound(f"session {session_id} does not exist")
        check_writer(event, state.owner)  # an agent: only on a session it owns
        try:
            return await self._create(event)
        except Conflict:
            raise InvalidInput(f"route {route_id} already exists") from None

    async def _create(self, event: ev.SessionCreated | ev.RouteCreated) -> int:
        """Append a creation if the entity was never created: the expectation is on its creations only, so an
        event another producer put on the id beforehand (which the folds flag: nothing exists yet) cannot make
        it "already exist" - any agent may publish on any session's or route's subjects under its own token."""
        created = subjects.event_subject(type(event).family, event.entity_id, event.verb(), "*")
        return await (await self.store.submit(event, expect=0, expect_filter=created))

    async def transition_route(self, route_id: str, to_state: str, *, reason: str = "", token: int | None = None,
                               address: str | None = None, traffic: str | None = None,
                               causation_id: str | None = None) -> int:
        """Move a route along its state machine; IllegalTransition names both states when it may not."""
        check_token(route_id, "route id")
        if traffic not in (None, lc.TRAFFIC_ACTIVE, lc.TRAFFIC_INACTIVE):
            raise InvalidInput(f"traffic must be {lc.TRAFFIC_ACTIVE} or {lc.TRAFFIC_INACTIVE}, got {traffic!r}")

        owner = await self._owner_of_route(route_id)

        def decide_transition(state: lc.RouteState | None) -> ev.Event:
            decide.decide_transition(state, route_id, to_state)
            assert state is not None
            event = ev.RouteTransitioned(producer=self.producer, route_id=route_id, from_state=state.state,
                                         to_state=to_state, reason=reason, token=token, address=address,
                                         traffic=traffic, causation_id=causation_id)
            check_writer(event, owner)
            return event

        seq, _ = await self.cas(lambda m: self.route(route_id, min_last_seq=m), decide_transition)
        return seq

    async def report_health(self, route_id: str, *, healthy: bool, detail: str = "",
                            checked_at: datetime | None = None) -> int:
        check_token(route_id, "route id")
        event = ev.RouteHealthReported(producer=self.producer, route_id=route_id, healthy=healthy,
                                       checked_at=checked_at or ev.utcnow(), detail=detail)
        check_writer(event, await self._owner_of_route(route_id))
        return await self.store.append(event)

    async def _owner_of_route(self, route_id: str) -> object:
        """For an agent writing a route's events: the agent owning the route's session now (the one that may).
        Other producers are judged by their role alone (lc.UNKNOWN_OWNER: no read needed)."""
        if authority.role_of(self.producer.id) != authority.AGENT:
            return lc.UNKNOWN_OWNER
        route, _ = await self.route(route_id)
        if route is None:
            return None
        session, _ = await self.session(route.session_id)
        return session.owner if session is not None else None

    async def report_unreachable(self, agent_id: str, *, error: str = "", incarnation: int | None = None) -> int:
        """A usage-time failure report: this client could not reach the agent."""
        check_token(agent_id, "agent id")
        event = ev.AgentUnreachableReported(producer=self.producer, agent_id=agent_id, incarnation=incarnation,
                                            error=error)
        check_writer(event)
        return await self.store.append(event)

    async def request_drain(self, agent_id: str, *, deadline: float | datetime = 3600.0, reason: str = "",
                            incarnation: int | None = None) -> tuple[int, ev.AgentDrainRequested]:
        """Ask the agent's current incarnation (or `incarnation`, which must be the current one) to drain by
        `deadline` (seconds from now, or a time): an operator's write. The agent answers by writing its own
        `draining`, then `drained` once its sessions were handed off. Returns (sequence, the request).

        Compare-and-set on the agent's history: a registration that lands between the read and the write (a new
        incarnation) makes it read again, and a request never names an incarnation that is already superseded.
        """
        check_token(agent_id, "agent id")
        when = deadline if isinstance(deadline, datetime) else ev.utcnow() + timedelta(seconds=deadline)

        def request(n: int) -> ev.AgentDrainRequested:
            return ev.AgentDrainRequested(producer=self.producer, agent_id=agent_id, incarnation=n, deadline=when,
                                          reason=reason)

        check_writer(request(incarnation or 0))  # an agent may not ask, whatever the target's state

        def decide_request(state: lc.AgentState | None) -> ev.Event:
            if state is None:
                raise NotFound(f"agent {agent_id} is not registered")
            if incarnation is not None and incarnation != state.incarnation:
                raise IllegalTransition(f"agent {agent_id}: incarnation {incarnation} is not the current one "
                                        f"({state.incarnation})", current=state.status, requested="drain")
            if state.status not in (lc.A_ALIVE, lc.A_DRAINING):
                raise IllegalTransition(f"agent {agent_id} is {state.status} (incarnation {state.incarnation}); "
                                        f"only an alive agent can drain", current=state.status, requested="drain")
            return request(state.incarnation)

        seq, event = await self.cas(lambda floor: self.agent(agent_id, min_last_seq=floor), decide_request)
        assert isinstance(event, ev.AgentDrainRequested)
        return seq, event

    async def append(self, event: ev.Event, **kwargs: Any) -> int:
        """Append an event decided elsewhere (the consumers' verdicts); one its producer's role may never
        write is refused (owner writes are checked against the session by the decisions and the folds)."""
        check_writer(event)
        return await self.store.append(event, **kwargs)
