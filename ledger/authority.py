"""Who may write what: producer roles and the writers of each event type. Pure data and functions, no I/O.

The producer token - the last token of an event's subject, `ledger.<family>.<id>.<verb>.<producer>` - is
the identity NATS permissions bind (a user may publish only subjects ending in its own tokens). This module
gives that identity its meaning, once, for both sides:

* the folds (`lifecycle`, the heartbeat fold) flag - never apply - an event whose producer may not write
  it, so a goodbye for a2 published on a subject a1 may use changes nothing;
* the server permissions `ledger auth` generates are derived from the same table, so what the server lets
  a user publish is what the folds accept from it.

A producer token names a *service role* when it is the role's name, optionally followed by `-<replica>`
(`monitor`, `monitor-b`, `reclaimer-east`); `cli` and `demo` are operators too (the CLI's default `--as`).
Every other token is an *agent* id; an agent may not take a role's name.
"""

from __future__ import annotations

from typing import Final

AGENT: Final = "agent"
MONITOR: Final = "monitor"
RECLAIMER: Final = "reclaimer"
WATCHDOG: Final = "watchdog"
OPERATOR: Final = "operator"

SERVICE_ROLES: Final = (MONITOR, RECLAIMER, WATCHDOG, OPERATOR)
ROLES: Final = (AGENT, *SERVICE_ROLES)
OPERATOR_ALIASES: Final = ("cli", "demo")
"""Producer tokens that are operators without the `operator` prefix (the CLI's and the demo's defaults)."""

SELF: Final = "self"
"""A writer that is the agent the event is about (producer token == the event's `agent_id`)."""
OWNER: Final = "owner"
"""A writer that is an agent owning the session concerned at that point of the log (checked by the fold)."""


_NAMED: Final = tuple((name, f"{name}-", role) for name, role in (*((r, r) for r in SERVICE_ROLES),
                                                                   *((a, OPERATOR) for a in OPERATOR_ALIASES)))
"""(token, replica prefix, role), in the order roles are tried; built once (the folds ask for every event)."""
_NAMES: Final = frozenset(name for name, _, _ in _NAMED)
_PREFIXES: Final = tuple(prefix for _, prefix, _ in _NAMED)


def role_of(producer: str) -> str:
    """The role a producer token names: a service role (its name, or `<name>-<replica>`), else `agent`."""
    if producer not in _NAMES and not producer.startswith(_PREFIXES):
        return AGENT  # the common case, in two C calls
    for name, prefix, role in _NAMED:
        if producer == name or producer.startswith(prefix):
            return role
    return AGENT


def reserved_agent_id_problem(agent_id: str) -> str | None:
    """Why `agent_id` cannot be an agent's id (it names a service role), or None."""
    role = role_of(agent_id)
    if role != AGENT:
        return (f"agent id {agent_id!r} names the {role} role (ids equal to or starting with "
                f"{', '.join(repr(r + '-') for r in (*SERVICE_ROLES, *OPERATOR_ALIASES))} are reserved)")
    return None


WRITERS: Final[dict[str, frozenset[str]]] = {
    # An agent's own lifecycle: only the agent itself.
    "agent.registered": frozenset({SELF}),
    "agent.heartbeat": frozenset({SELF}),
    "agent.draining": frozenset({SELF}),
    "agent.drained": frozenset({SELF}),
    "agent.goodbye": frozenset({SELF}),
    "agent.fenced": frozenset({SELF}),
    # An operator asks an agent to drain; the agent then writes its own `draining` and `drained`.
    "agent.drain_requested": frozenset({OPERATOR}),
    # Verdicts on an agent: the liveness monitor.
    "agent.suspected": frozenset({MONITOR}),
    "agent.declared_dead": frozenset({MONITOR}),
    # Anyone who failed to reach an agent may say so (the reporter is the producer; counted, not trusted).
    "agent.unreachable_reported": frozenset({AGENT, *SERVICE_ROLES}),
    # Sessions: operators create and terminate; an agent claims for itself and writes on what it owns;
    # the reclaimer claims for others and orphans.
    "session.created": frozenset({OPERATOR}),
    "session.claimed": frozenset({SELF, RECLAIMER}),
    "session.released": frozenset({SELF}),
    "session.resource_reported": frozenset({SELF}),
    "session.checkpointed": frozenset({SELF}),
    "session.orphaned": frozenset({RECLAIMER}),
    "session.terminated": frozenset({OPERATOR, OWNER}),
    # Routes: operators, the watchdog (timeouts, stale health), and the agent owning the route's session.
    "route.created": frozenset({OPERATOR, OWNER}),
    "route.transitioned": frozenset({OPERATOR, WATCHDOG, OWNER}),
    "route.health_reported": frozenset({OPERATOR, WATCHDOG, OWNER}),
    # A pool's breaker: the monitor trips and resets it, an operator may reset it.
    "pool.breaker_tripped": frozenset({MONITOR}),
    "pool.breaker_reset": frozenset({MONITOR, OPERATOR}),
}


def role_may_write(role: str, type_tag: str) -> bool:
    """Whether some producer of `role` may write events of `type_tag` (SELF and OWNER are agents)."""
    writers = WRITERS.get(type_tag, frozenset())
    return role in writers or (role == AGENT and bool(writers & {SELF, OWNER}))


_ROLE_NAMES: Final = {MONITOR: "the liveness monitor", RECLAIMER: "the reclaimer", WATCHDOG: "the route watchdog",
                      OPERATOR: "an operator", AGENT: "any agent"}


def describe_writers(type_tag: str) -> str:
    """Who may write `type_tag`, in words (for anomalies and the SDK's refusals)."""
    writers = WRITERS.get(type_tag, frozenset())
    names = [_ROLE_NAMES[r] for r in ROLES if r in writers]
    if SELF in writers:
        names.append("the agent itself")
    if OWNER in writers:
        names.append("the agent owning the session")
    return " or ".join(names) or "no producer"


def writer_refusal(type_tag: str, producer: str, *, subject_agent: str | None = None, owner: str | None = None,
                   owner_known: bool = True) -> str | None:
    """Why `producer` may not write an event of `type_tag` (None: it may). The one rule behind the folds'
    `unauthorized_producer` anomaly and the SDK's refusal at the edge.

    `subject_agent`: the agent the event is about or for (SELF: an agent event's `agent_id`, a claim's
    claimant, an owner write's writer). `owner`: the agent owning the session concerned at that point of the
    log (OWNER); with `owner_known` False the caller cannot tell (it holds one history only) and an agent is
    let through as a possible owner - the fold that can tell flags it.
    """
    writers = WRITERS.get(type_tag)
    if writers is None:
        return f"{type_tag} is not an event type any producer may write"
    role = role_of(producer)
    if role in writers:
        return None
    if role == AGENT:
        if SELF in writers and subject_agent is not None and producer == subject_agent:
            return None
        if OWNER in writers and (not owner_known or (owner is not None and producer == owner)):
            return None
    about = f" for {subject_agent}" if subject_agent is not None and SELF in writers else ""
    if role == AGENT and OWNER in writers and owner_known:
        about += f" (the session's owner is {owner or 'nobody'})"
    who = f"agent {producer}" if role == AGENT else f"{producer} ({_ROLE_NAMES[role]})"
    return f"{type_tag}{about} written by {who}: only {describe_writers(type_tag)} may write it"


def same_writer(producer: str, other: str) -> bool:
    """Whether two producer tokens are one writer for de-duplication: the same agent, or the same service role
    (replicas of the monitor write the same verdict under the same id, on purpose)."""
    role = role_of(producer)
    return producer == other if role == AGENT else role == role_of(other)
