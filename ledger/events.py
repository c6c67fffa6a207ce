"""The ledger's events: frozen msgspec Structs with stable tags.

Every event carries the same envelope (event id, time, producer, causation and
correlation ids, schema version) and the payload of its type. The tag (the
`type` field on the wire) is permanent: classes may be renamed, tags never.
Where each event is stored is decided by `ledger.subjects` and `ledger.codec`.

Schema evolution rules (tested in tests/test_events.py against the recorded
payloads in tests/data/events/):

1. A tag, once released, is never renamed, reused or removed.
2. A new field always has a default, so older payloads still decode.
3. An existing field never changes its type or its meaning.
4. Unknown fields are ignored on decode, so payloads written by a newer
   version still decode here (the extra fields are dropped).
5. Open sets (claim reasons, failure reasons, route states) are plain strings,
   not enums, so a newer value does not make an old reader fail.
6. A change of meaning is a new event type (a new tag), or a bump of `v` with
   an upcaster in `ledger.codec`; the fold then handles both versions.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import ClassVar

import msgspec
from msgspec import field

from .ids import Token, new_id

SCHEMA_VERSION = 1

__all__ = [
    "Producer",
    "Evidence",
    "Event",
    "AgentEvent",
    "AgentRegistered",
    "AgentHeartbeat",
    "AgentDraining",
    "AgentDrained",
    "AgentGoodbye",
    "AgentSuspected",
    "AgentDeclaredDead",
    "AgentUnreachableReported",
    "AgentFenced",
    "SessionEvent",
    "SessionCreated",
    "SessionClaimed",
    "SessionReleased",
    "SessionResourceReported",
    "SessionOrphaned",
    "SessionTerminated",
    "RouteEvent",
    "Probe",
    "RouteCreated",
    "RouteTransitioned",
    "RouteHealthReported",
    "PoolEvent",
    "PoolBreakerTripped",
    "PoolBreakerReset",
    "AnyEvent",
    "EVENT_TYPES",
    "BY_TAG",
    "SCHEMA_VERSION",
    "utcnow",
]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Producer(msgspec.Struct, frozen=True):
    """Who wrote an event: an agent id or component name, and its process instance."""

    id: Token
    instance: str


class Evidence(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What a decision (suspect, dead, orphaned, timed out) was based on."""

    last_heartbeat_at: datetime | None = None
    last_heartbeat_seq: int | None = None
    heartbeat_interval: float | None = None
    suspect_after_missed: int | None = None
    dead_after: float | None = None
    reports: int | None = None
    report_window: float | None = None
    observed_at: datetime | None = None
    detail: str = ""


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Envelope fields shared by every event; subclasses add the payload."""

    family: ClassVar[str]
    """First subject token after `ledger.`: agent, hb, session, route or pool."""

    event_id: str = field(default_factory=new_id)
    time: datetime = field(default_factory=utcnow)
    producer: Producer
    causation_id: str | None = None
    correlation_id: str | None = None
    v: int = SCHEMA_VERSION

    @property
    def entity_id(self) -> str:
        raise NotImplementedError

    @classmethod
    def type_tag(cls) -> str:
        return cls.__struct_config__.tag  # type: ignore[return-value]

    @classmethod
    def verb(cls) -> str:
        """Subject token naming the event type, e.g. `claimed` for `session.claimed`."""
        return cls.type_tag().split(".", 1)[1]


# --- agents -------------------------------------------------------------------


class AgentEvent(Event):
    family: ClassVar[str] = "agent"
    agent_id: Token

    @property
    def entity_id(self) -> str:
        return self.agent_id


class AgentRegistered(AgentEvent, tag="agent.registered"):
    """A process of `agent_id` started; its incarnation is this event's stream sequence."""

    instance_id: str
    pool: Token
    platform: Token = "default"
    region: Token = "default"
    labels: dict[str, str] = {}
    capacity: int = 1
    heartbeat_interval: float = 5.0
    ttl: float = 30.0


class AgentHeartbeat(AgentEvent, tag="agent.heartbeat"):
    """A periodic sign of life, stored with bounded retention in the heartbeat stream."""

    family: ClassVar[str] = "hb"
    instance_id: str
    incarnation: int
    beat: int
    load: int = 0
    capacity: int = 1
    sessions: tuple[str, ...] = ()


class AgentDraining(AgentEvent, tag="agent.draining"):
    """The agent takes no new claims; its sessions are handed off before `deadline`."""

    incarnation: int
    deadline: datetime
    reason: str = ""


class AgentDrained(AgentEvent, tag="agent.drained"):
    incarnation: int
    reason: str = ""


class AgentGoodbye(AgentEvent, tag="agent.goodbye"):
    """The process is leaving on purpose; its sessions are orphaned at once."""

    instance_id: str
    incarnation: int
    reason: str = "shutdown"


class AgentSuspected(AgentEvent, tag="agent.suspected"):
    incarnation: int
    reason: str
    evidence: Evidence = Evidence()


class AgentDeclaredDead(AgentEvent, tag="agent.declared_dead"):
    incarnation: int
    reason: str
    evidence: Evidence = Evidence()


class AgentUnreachableReported(AgentEvent, tag="agent.unreachable_reported"):
    """A client failed to reach the agent while using it (the reporter is the producer)."""

    incarnation: int | None = None
    error: str = ""


class AgentFenced(AgentEvent, tag="agent.fenced"):
    """The agent stopped acting as owner on its own (its lease ran out).

    Decided while it could not reach the broker, so it is written afterwards,
    just before the agent registers again as a new incarnation.
    """

    incarnation: int
    reason: str
    fenced_at: datetime
    ttl: float | None = None


# --- sessions -----------------------------------------------------------------


class SessionEvent(Event):
    family: ClassVar[str] = "session"
    session_id: Token

    @property
    def entity_id(self) -> str:
        return self.session_id


class SessionCreated(SessionEvent, tag="session.created"):
    """A session bound to a pool, platform and region, never to an agent instance."""

    pool: Token
    platform: Token = "default"
    region: Token = "default"
    labels: dict[str, str] = {}
    idle_ttl: float | None = None


class SessionClaimed(SessionEvent, tag="session.claimed"):
    """`agent_id` owns the session from here; this event's sequence is the claim token."""

    agent_id: Token
    instance_id: str
    incarnation: int
    reason: str = "initial"
    previous_owner: str | None = None
    previous_token: int | None = None


class SessionReleased(SessionEvent, tag="session.released"):
    agent_id: Token
    incarnation: int
    token: int
    reason: str = ""


class SessionResourceReported(SessionEvent, tag="session.resource_reported"):
    agent_id: Token
    incarnation: int
    token: int
    platform_resource_id: str
    address: str | None = None
    """host:port where the session serves, once it runs (routes move to WARMING_UP with it)."""


class SessionOrphaned(SessionEvent, tag="session.orphaned"):
    """The owner is gone, dead, superseded or draining; the session awaits a new claim."""

    reason: str
    previous_owner: str | None = None
    previous_incarnation: int | None = None
    previous_token: int | None = None
    evidence: Evidence = Evidence()


class SessionTerminated(SessionEvent, tag="session.terminated"):
    token: int | None = None
    reason: str = ""


# --- routes -------------------------------------------------------------------


class RouteEvent(Event):
    family: ClassVar[str] = "route"
    route_id: Token

    @property
    def entity_id(self) -> str:
        return self.route_id


class Probe(msgspec.Struct, frozen=True, kw_only=True):
    """How a route's health is judged while warming up and running."""

    initial_delay: float = 60.0
    period: float = 10.0
    stale_after: float = 30.0
    on_stale: str = "deactivate"
    """What the watchdog does with a RUNNING route whose health is stale: ignore, deactivate or terminate."""


class RouteCreated(RouteEvent, tag="route.created"):
    session_id: Token
    endpoint: str
    deployment: str = ""
    probe: Probe | None = None
    start_timeout: float = 300.0
    stop_timeout: float = 300.0
    """Seconds a TERMINATING route may take before the watchdog ends it."""


class RouteTransitioned(RouteEvent, tag="route.transitioned"):
    """A move along the route state machine (`ledger.lifecycle.ROUTE_TRANSITIONS`)."""

    from_state: str
    to_state: str
    reason: str = ""
    token: int | None = None
    """The session's claim token when the session's owner writes it."""
    address: str | None = None
    traffic: str | None = None
    """ACTIVE or INACTIVE; RUNNING -> RUNNING with only a traffic change is allowed."""


class RouteHealthReported(RouteEvent, tag="route.health_reported"):
    healthy: bool
    checked_at: datetime
    detail: str = ""


# --- pools -------------------------------------------------------------------


class PoolEvent(Event):
    family: ClassVar[str] = "pool"
    pool: Token

    @property
    def entity_id(self) -> str:
        return self.pool


class PoolBreakerTripped(PoolEvent, tag="pool.breaker_tripped"):
    """Too many of the pool's agents died together: stop orphaning their sessions."""

    reason: str
    dead: tuple[str, ...] = ()
    """Agents declared dead inside the window, this one included."""
    agents: int = 0
    """Agents of the pool that were alive when the window began."""
    window: float = 60.0
    threshold: float = 0.5


class PoolBreakerReset(PoolEvent, tag="pool.breaker_reset"):
    """Orphaning resumes: the pool recovered, or an operator said so."""

    reason: str


AnyEvent = (
    AgentRegistered
    | AgentHeartbeat
    | AgentDraining
    | AgentDrained
    | AgentGoodbye
    | AgentSuspected
    | AgentDeclaredDead
    | AgentUnreachableReported
    | SessionCreated
    | SessionClaimed
    | SessionReleased
    | SessionResourceReported
    | SessionOrphaned
    | SessionTerminated
    | RouteCreated
    | RouteTransitioned
    | RouteHealthReported
    | AgentFenced
    | PoolBreakerTripped
    | PoolBreakerReset
)
"""Every event type the ledger knows: the closed union the codec decodes."""

EVENT_TYPES: tuple[type[Event], ...] = AnyEvent.__args__  # type: ignore[attr-defined]
BY_TAG: dict[str, type[Event]] = {cls.type_tag(): cls for cls in EVENT_TYPES}
