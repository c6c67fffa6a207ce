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
7. Field constraints (msgspec `Meta`: positive finite durations, non-negative
   counts, bounded strings) are checked on every decode and by `codec.encode`
   before an append. A constraint may be loosened, never tightened: a stored
   payload that broke a new constraint would turn into a dead letter.
8. `event_id` and `time` have defaults only for events built in Python; a
   stored payload without them is refused (`missing-envelope`), so two reads
   of one log always agree.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Annotated, ClassVar, get_args

import msgspec
from msgspec import Meta, field

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
    "AgentDrainRequested",
    "SessionEvent",
    "SessionCreated",
    "SessionClaimed",
    "SessionReleased",
    "SessionResourceReported",
    "SessionOrphaned",
    "SessionTerminated",
    "SessionCheckpointed",
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
    "MAX_CHECKPOINT_BYTES",
    "utcnow",
    "CLOCK",
]


def _system_time() -> datetime:
    return datetime.now(UTC)


CLOCK: ContextVar[Callable[[], datetime]] = ContextVar("ledger_clock", default=_system_time)
"""This machine's clock as the ledger reads it: a test or a simulation sets another (a skewed one, say) for the
tasks it starts - each task keeps the clock in force when it was created."""


def utcnow() -> datetime:
    return CLOCK.get()()


# --- what a valid field looks like --------------------------------------------------------
# Checked by msgspec on every decode, and by `codec.encode` before anything is appended, so
# the SDK never writes what a reader would refuse. Bounds keep hostile values away from the
# folds: an interval of 1e300 s would overflow a timedelta, an int above 2**63 SQLite.

MAX_SECONDS = 1e9
"""About 31 years: the longest interval, timeout or ttl an event may carry."""
MAX_COUNT = 2**63 - 1
"""Stream sequences, tokens, incarnations and counters fit a signed 64-bit integer (SQLite's)."""

Seconds = Annotated[float, Meta(gt=0, le=MAX_SECONDS)]
"""A finite positive duration (NaN and infinity are written as null by msgspec, so they never decode)."""
Delay = Annotated[float, Meta(ge=0, le=MAX_SECONDS)]
"""A finite duration that may be zero."""
Share = Annotated[float, Meta(ge=0, le=1)]
Count = Annotated[int, Meta(ge=0, le=MAX_COUNT)]
Seq = Annotated[int, Meta(ge=1, le=MAX_COUNT)]
"""A stream sequence: a claim token, a heartbeat's position. Incarnations are Counts: 0 is written by a process
that fenced itself before its first registration was acknowledged, and a fold flags one that never registered."""
Capacity = Annotated[int, Meta(ge=1, le=1_000_000)]
Time = Annotated[datetime, Meta(tz=True)]
"""Always with a time zone: a naive time cannot be compared with the aware times the folds use."""
EventId = Annotated[str, Meta(min_length=1, max_length=200)]
"""Printable ASCII without spaces: it is the Nats-Msg-Id header, where a newline would forge headers."""
Name = Annotated[str, Meta(min_length=1, max_length=256)]
"""A process instance, a state, a resource id: never empty."""
MAX_TEXT = 4096
Text = Annotated[str, Meta(max_length=MAX_TEXT)]
"""A reason, an error, a detail: free text, bounded (a writer quoting another event's text must cut it)."""
Address = Annotated[str, Meta(max_length=1024)]
Ref = Annotated[str, Meta(min_length=1, max_length=128)]
"""An id named for the record only, never a subject token: bounded, without the Token pattern (a regex per
value would cost every decode, and a heartbeat lists every session of its agent)."""
Labels = Annotated[dict[Annotated[str, Meta(min_length=1, max_length=256)], Text], Meta(max_length=256)]
Ids = Annotated[tuple[Ref, ...], Meta(max_length=100_000)]
MAX_CHECKPOINT_BYTES = 16 * 1024
"""The largest checkpoint an owner may record: a progress marker, not a state store (base64 in JSON, it stays
well inside `codec.MAX_EVENT_BYTES`)."""
CheckpointData = Annotated[bytes, Meta(max_length=MAX_CHECKPOINT_BYTES)]

# While the codec decodes, a missing envelope field must stay visibly missing (a new random id
# or the reader's clock would make two readings of one log differ). The default factories
# return these sentinels then, and `codec.decode` refuses an event that carries one.
DECODING: ContextVar[bool] = ContextVar("ledger_decoding", default=False)
MISSING_ID = "".join(["<missing", " event_id>"])  # noqa: FLY002 - built at run time: a unique object, compared by `is`
MISSING_TIME = datetime(1, 1, 1, tzinfo=UTC)


def _event_id() -> str:
    return MISSING_ID if DECODING.get() else new_id()


def _event_time() -> datetime:
    return MISSING_TIME if DECODING.get() else utcnow()


class Producer(msgspec.Struct, frozen=True):
    """Who wrote an event: an agent id or component name, and its process instance."""

    id: Token
    instance: Name


class Evidence(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What a decision (suspect, dead, orphaned, timed out) was based on."""

    last_heartbeat_at: Time | None = None
    last_heartbeat_seq: Seq | None = None
    heartbeat_interval: Seconds | None = None
    suspect_after_missed: Count | None = None
    dead_after: Seconds | None = None
    reports: Count | None = None
    report_window: Seconds | None = None
    observed_at: Time | None = None
    detail: Text = ""


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Envelope fields shared by every event; subclasses add the payload."""

    family: ClassVar[str]
    """First subject token after `ledger.`: agent, hb, session, route or pool."""

    event_id: EventId = field(default_factory=_event_id)
    time: Time = field(default_factory=_event_time)
    producer: Producer
    causation_id: Address | None = None
    correlation_id: Address | None = None
    v: Annotated[int, Meta(ge=1, le=1_000_000)] = SCHEMA_VERSION

    @property
    def entity_id(self) -> str:
        raise NotImplementedError

    @classmethod
    def type_tag(cls) -> str:
        tag = cls.__struct_config__.tag
        assert isinstance(tag, str), "tag_field is set on Event, so every event class has a string tag"
        return tag

    @classmethod
    def verb(cls) -> str:
        """Subject token naming the event type, e.g. `claimed` for `session.claimed`."""
        return cls.type_tag().split(".", 1)[1]


# --- agents -------------------------------------------------------------------


class AgentEvent(Event, frozen=True):
    family: ClassVar[str] = "agent"
    agent_id: Token

    @property
    def entity_id(self) -> str:
        return self.agent_id


class AgentRegistered(AgentEvent, frozen=True, tag="agent.registered"):
    """A process of `agent_id` started; its incarnation is this event's stream sequence."""

    instance_id: Name
    pool: Token
    platform: Token = "default"
    region: Token = "default"
    labels: Labels = {}
    capacity: Capacity = 1
    heartbeat_interval: Seconds = 5.0
    ttl: Seconds = 30.0


class AgentHeartbeat(AgentEvent, frozen=True, tag="agent.heartbeat"):
    """A periodic sign of life, stored with bounded retention in the heartbeat stream."""

    family: ClassVar[str] = "hb"
    instance_id: Name
    incarnation: Count
    beat: Count
    load: Count = 0
    capacity: Capacity = 1
    sessions: Ids = ()


class AgentDraining(AgentEvent, frozen=True, tag="agent.draining"):
    """The agent takes no new claims; its sessions are handed off before `deadline`."""

    incarnation: Count
    deadline: Time
    reason: Text = ""


class AgentDrained(AgentEvent, frozen=True, tag="agent.drained"):
    incarnation: Count
    reason: Text = ""


class AgentGoodbye(AgentEvent, frozen=True, tag="agent.goodbye"):
    """The process is leaving on purpose; its sessions are orphaned at once."""

    instance_id: Name
    incarnation: Count
    reason: Text = "shutdown"


class AgentSuspected(AgentEvent, frozen=True, tag="agent.suspected"):
    incarnation: Count
    reason: Text
    evidence: Evidence = Evidence()


class AgentDeclaredDead(AgentEvent, frozen=True, tag="agent.declared_dead"):
    incarnation: Count
    reason: Text
    evidence: Evidence = Evidence()


class AgentUnreachableReported(AgentEvent, frozen=True, tag="agent.unreachable_reported"):
    """A client failed to reach the agent while using it (the reporter is the producer)."""

    incarnation: Count | None = None
    error: Text = ""


class AgentFenced(AgentEvent, frozen=True, tag="agent.fenced"):
    """The agent stopped acting as owner on its own (its lease ran out).

    Decided while it could not reach the broker, so it is written afterwards,
    just before the agent registers again as a new incarnation.
    """

    incarnation: Count
    reason: Text
    fenced_at: Time
    ttl: Seconds | None = None


class AgentDrainRequested(AgentEvent, frozen=True, tag="agent.drain_requested"):
    """An operator asks one incarnation of the agent to drain by `deadline` (`ledger drain`).

    A request, not a status: the agent itself, seeing it on its own subjects, writes `draining` and later
    `drained`, as for a drain it decided. One for another incarnation than the current one drains nothing.
    """

    incarnation: Count
    deadline: Time
    reason: Text = ""


# --- sessions -----------------------------------------------------------------


class SessionEvent(Event, frozen=True):
    family: ClassVar[str] = "session"
    session_id: Token

    @property
    def entity_id(self) -> str:
        return self.session_id


class SessionCreated(SessionEvent, frozen=True, tag="session.created"):
    """A session bound to a pool, platform and region, never to an agent instance."""

    pool: Token
    platform: Token = "default"
    region: Token = "default"
    labels: Labels = {}
    idle_ttl: Seconds | None = None


class SessionClaimed(SessionEvent, frozen=True, tag="session.claimed"):
    """`agent_id` owns the session from here; this event's sequence is the claim token."""

    agent_id: Token
    instance_id: Name
    incarnation: Count
    reason: Text = "initial"
    previous_owner: Ref | None = None
    previous_token: Seq | None = None


class SessionReleased(SessionEvent, frozen=True, tag="session.released"):
    agent_id: Token
    incarnation: Count
    token: Seq
    reason: Text = ""


class SessionResourceReported(SessionEvent, frozen=True, tag="session.resource_reported"):
    agent_id: Token
    incarnation: Count
    token: Seq
    platform_resource_id: Name
    address: Address | None = None
    """host:port where the session serves, once it runs (routes move to WARMING_UP with it)."""


class SessionOrphaned(SessionEvent, frozen=True, tag="session.orphaned"):
    """The owner is gone, dead, superseded or draining; the session awaits a new claim."""

    reason: Text
    previous_owner: Ref | None = None
    previous_incarnation: Count | None = None
    previous_token: Seq | None = None
    evidence: Evidence = Evidence()


class SessionTerminated(SessionEvent, frozen=True, tag="session.terminated"):
    token: Seq | None = None
    reason: Text = ""


class SessionCheckpointed(SessionEvent, frozen=True, tag="session.checkpointed"):
    """The owner's progress so far, for whoever owns the session next (after a failover, a drain, a take-over).

    An owner write like a release: under the claim token, from the incarnation that holds it. The fold keeps
    the newest one across releases, orphanings and claims; a termination drops it.
    """

    agent_id: Token
    incarnation: Count
    token: Seq
    data: CheckpointData = b""
    note: Text = ""


# --- routes -------------------------------------------------------------------


class RouteEvent(Event, frozen=True):
    family: ClassVar[str] = "route"
    route_id: Token

    @property
    def entity_id(self) -> str:
        return self.route_id


class Probe(msgspec.Struct, frozen=True, kw_only=True):
    """How a route's health is judged while warming up and running."""

    initial_delay: Delay = 60.0
    period: Seconds = 10.0
    stale_after: Seconds = 30.0
    on_stale: Annotated[str, Meta(min_length=1, max_length=64)] = "deactivate"
    """What the watchdog does with a RUNNING route whose health is stale: ignore, deactivate or terminate."""


class RouteCreated(RouteEvent, frozen=True, tag="route.created"):
    session_id: Token
    endpoint: Address
    deployment: Address = ""
    probe: Probe | None = None
    start_timeout: Seconds = 300.0
    stop_timeout: Seconds = 300.0
    """Seconds a TERMINATING route may take before the watchdog ends it."""


class RouteTransitioned(RouteEvent, frozen=True, tag="route.transitioned"):
    """A move along the route state machine (`ledger.lifecycle.ROUTE_TRANSITIONS`)."""

    from_state: Name
    to_state: Name
    reason: Text = ""
    token: Seq | None = None
    """The session's claim token when the session's owner writes it."""
    address: Address | None = None
    traffic: Annotated[str, Meta(max_length=64)] | None = None
    """ACTIVE or INACTIVE; RUNNING -> RUNNING with only a traffic change is allowed."""


class RouteHealthReported(RouteEvent, frozen=True, tag="route.health_reported"):
    healthy: bool
    checked_at: Time
    detail: Text = ""


# --- pools -------------------------------------------------------------------


class PoolEvent(Event, frozen=True):
    family: ClassVar[str] = "pool"
    pool: Token

    @property
    def entity_id(self) -> str:
        return self.pool


class PoolBreakerTripped(PoolEvent, frozen=True, tag="pool.breaker_tripped"):
    """Too many of the pool's agents died together: stop orphaning their sessions."""

    reason: Text
    dead: Ids = ()
    """Agents declared dead inside the window, this one included."""
    agents: Count = 0
    """Agents of the pool that were alive when the window began."""
    window: Seconds = 60.0
    threshold: Share = 0.5


class PoolBreakerReset(PoolEvent, frozen=True, tag="pool.breaker_reset"):
    """Orphaning resumes: the pool recovered, or an operator said so."""

    reason: Text


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
    | AgentDrainRequested
    | SessionCheckpointed
)
"""Every event type the ledger knows: the closed union the codec decodes."""

EVENT_TYPES: tuple[type[Event], ...] = get_args(AnyEvent)
BY_TAG: dict[str, type[Event]] = {cls.type_tag(): cls for cls in EVENT_TYPES}
