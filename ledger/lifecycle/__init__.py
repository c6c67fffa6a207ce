"""Lifecycle rules and per-entity folds: pure functions of an entity's events.

`evolve_agent`, `evolve_session` and `evolve_route` take the current state (or
None) and one stored event of that entity, and return the next state and,
when the event must not be applied, an Anomaly saying why (the state is then
returned unchanged). The SDK folds one entity's history with them to decide
what it may write; the projections fold the whole log with the very same
functions, so both sides agree on what every event means.

One module per concern, all re-exported here (`from ledger import lifecycle as lc; lc.X`):

  anomalies  the vocabulary of refusal (`Anomaly`, its kinds) and `writer_problem`, asked first by every fold
  agents     agent statuses, `AgentState`, `evolve_agent`, incarnations
  sessions   session statuses, `SessionState`, the one rule of which session events apply, take-overs
  routes     route states and transitions, `RouteState`, `evolve_route`
  pools      the mass-failure breaker, `PoolState`, `evolve_pool`
  lookups    `fold` of one history, and the lookups built from histories

Some checks need more than the entity's own history, and are passed in as
lookups so that every caller applies them identically, as of the event's
position in the log:

* `incarnation_at(agent_id, seq)` - the agent's current incarnation just
  before `seq` (None if it never registered). A claim or owner write made by
  any other incarnation is flagged (superseded_incarnation), not applied.
* `session_at(session_id, seq)` - the session's state just before `seq`: its
  claim token (a route transition written under another one is flagged,
  stale_token) and its owner (the only agent that may write the route's events).
* `agent_at(agent_id, seq)` - the agent's state just before `seq` (None if it
  never registered). A take-over (a claim of an assigned session naming its
  token) applies only while the owner may be replaced (`owner_replaceable`):
  any agent can read the token, so naming it proves nothing (live_owner).
* `registered_at(agent_id, seq)` - the agent's current registration just
  before `seq`: a claim applies only for an agent registered in the session's
  pool, platform and region (foreign_placement). The whole-log fold answers
  it with `agent_at` (its agent table holds each current registration).

Without a lookup the check is skipped (a caller that has only one history).
"""

from __future__ import annotations

from .agents import (
    A_ALIVE,
    A_DEAD,
    A_DRAINED,
    A_DRAINING,
    A_FENCED,
    A_GONE,
    FINAL_AGENT_STATUSES,
    AgentAt,
    AgentState,
    CurrentIncarnation,
    IncarnationAt,
    evolve_agent,
    incarnation_problem,
    superseded_by,
)
from .anomalies import (
    AFTER_FINAL,
    DUPLICATE,
    FINAL_CLAIMER,
    FINAL_OWNER,
    FOREIGN_PLACEMENT,
    ILLEGAL_TRANSITION,
    LIVE_OWNER,
    OVERLAPPING_CLAIM,
    STALE_TOKEN,
    SUPERSEDED_INCARNATION,
    UNAUTHORIZED_PRODUCER,
    UNKNOWN_ENTITY,
    UNKNOWN_INCARNATION,
    UNKNOWN_OWNER,
    Anomaly,
    Evolved,
    writer_problem,
)
from .lookups import (
    HISTORY,
    REGISTRATIONS,
    AgentTimeline,
    SessionFold,
    agents_lookup,
    as_registered,
    claims_lookup,
    fold,
    registered_lookup,
    registrations_lookup,
)
from .pools import (
    PoolState,
    evolve_pool,
)
from .routes import (
    FAILED_TO_START,
    PENDING,
    ROUTE_STATES,
    ROUTE_TRANSITIONS,
    RUNNING,
    STARTING,
    TERMINATED,
    TERMINATING,
    TRAFFIC_ACTIVE,
    TRAFFIC_INACTIVE,
    WARMING_UP,
    RouteState,
    evolve_route,
    route_status,
    route_transition_error,
)
from .sessions import (
    CLAIM_REASONS,
    CLAIMABLE,
    NO_OWNER_STATE,
    OWNER_DEAD,
    OWNER_DRAINING,
    OWNER_FENCED,
    OWNER_GONE,
    OWNER_SUPERSEDED,
    OWNER_UNKNOWN,
    S_ASSIGNED,
    S_ORPHANED,
    S_PENDING,
    S_RELEASED,
    S_TERMINATED,
    SESSION_STATES,
    Checkpoint,
    Placement,
    RegisteredAt,
    SessionAt,
    SessionState,
    claim_problem,
    evolve_session,
    orphan_problem,
    owner_replaceable,
    owner_write_problem,
    owns,
    placement_of,
    session_event_problem,
    terminate_problem,
)

__all__ = [
    "AFTER_FINAL",
    "DUPLICATE",
    "FINAL_CLAIMER",
    "FINAL_OWNER",
    "FOREIGN_PLACEMENT",
    "ILLEGAL_TRANSITION",
    "LIVE_OWNER",
    "OVERLAPPING_CLAIM",
    "STALE_TOKEN",
    "SUPERSEDED_INCARNATION",
    "UNAUTHORIZED_PRODUCER",
    "UNKNOWN_ENTITY",
    "UNKNOWN_INCARNATION",
    "UNKNOWN_OWNER",
    "Anomaly",
    "Evolved",
    "writer_problem",
    "A_ALIVE",
    "A_DEAD",
    "A_DRAINED",
    "A_DRAINING",
    "A_FENCED",
    "A_GONE",
    "FINAL_AGENT_STATUSES",
    "AgentAt",
    "AgentState",
    "CurrentIncarnation",
    "IncarnationAt",
    "evolve_agent",
    "incarnation_problem",
    "superseded_by",
    "CLAIMABLE",
    "CLAIM_REASONS",
    "Checkpoint",
    "NO_OWNER_STATE",
    "OWNER_DEAD",
    "OWNER_DRAINING",
    "OWNER_FENCED",
    "OWNER_GONE",
    "OWNER_SUPERSEDED",
    "OWNER_UNKNOWN",
    "SESSION_STATES",
    "S_ASSIGNED",
    "S_ORPHANED",
    "S_PENDING",
    "S_RELEASED",
    "S_TERMINATED",
    "Placement",
    "RegisteredAt",
    "SessionAt",
    "SessionState",
    "claim_problem",
    "evolve_session",
    "owner_replaceable",
    "orphan_problem",
    "owner_write_problem",
    "owns",
    "placement_of",
    "session_event_problem",
    "terminate_problem",
    "FAILED_TO_START",
    "PENDING",
    "ROUTE_STATES",
    "ROUTE_TRANSITIONS",
    "RUNNING",
    "STARTING",
    "TERMINATED",
    "TERMINATING",
    "TRAFFIC_ACTIVE",
    "TRAFFIC_INACTIVE",
    "WARMING_UP",
    "RouteState",
    "evolve_route",
    "route_status",
    "route_transition_error",
    "PoolState",
    "evolve_pool",
    "HISTORY",
    "REGISTRATIONS",
    "AgentTimeline",
    "SessionFold",
    "agents_lookup",
    "as_registered",
    "claims_lookup",
    "fold",
    "registered_lookup",
    "registrations_lookup",
]
