"""NATS server permissions per user, derived from `authority.WRITERS`: pure functions, no I/O.

The server binds identity to the producer token (the last subject token); `authority` says which producer
may write which event type, and the folds flag what it forbids. This module turns that one table into
what nats-server enforces, so the two cannot disagree: a user may publish exactly the event subjects whose
producer token is one of its own and whose type its role may write, plus the JetStream API calls the SDK
needs to read (found by running the SDK's flows under these permissions: tests/test_permissions.py).

Users:

* `admin`    - everything (`ledger init` creates and upgrades the streams), but subscribing to event subjects.
* `operator` - the operator role's events as `operator` and `cli` (sessions, routes, breaker reset).
* `service`  - one connection for the liveness monitor, the reclaimer and the watchdog (each as its role's
               name and `<role>-<replica>` for the replicas named), plus the projector's dead letters.
* `reader`   - reads only (dashboards, `ledger doctor`, views).
* `agent-<id>` - one per agent: subjects ending in its id; its own lifecycle only on its own entity.

Every user but admin subscribes only to its own inbox prefix (`_INBOX_<user>.>`), so nobody reads
another user's replies, and creates only ephemeral consumers (`$JS.API.CONSUMER.CREATE.<stream>` with no
consumer name: JetStream refuses a durable name on that subject).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from . import authority, subjects
from . import events as ev
from .errors import InvalidInput
from .ids import check_token

ADMIN = "admin"
OPERATOR = "operator"
SERVICE = "service"
READER = "reader"
ROLE_USERS = (ADMIN, OPERATOR, SERVICE, READER)
AGENT_USER_PREFIX = "agent-"

OPERATOR_PRODUCERS = (authority.OPERATOR, "cli")
"""The producer tokens the operator user writes as (`cli` is the CLI's default `--as`)."""
SERVICE_PRODUCER_ROLES = (authority.MONITOR, authority.RECLAIMER, authority.WATCHDOG)

READ_STREAMS = (subjects.LEDGER_STREAM, subjects.HEARTBEAT_STREAM, subjects.DLQ_STREAM)
AGENT_READ_STREAMS = (subjects.LEDGER_STREAM, subjects.HEARTBEAT_STREAM)
LEADER_ADVISORY = "$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.*"
"""The liveness monitor listens for stream leader elections (consumers/monitor.py)."""


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    """Allowed publish subjects (`(">",)` for admin)."""
    subscribe: tuple[str, ...]
    subscribe_deny: tuple[str, ...] = ()


NO_EVENT_SUBSCRIPTIONS = (f"{subjects.PREFIX}.>",)
"""Nobody subscribes to event subjects, admin included (everyone reads through JetStream). A push consumer -
which any reader may create - delivers only where someone subscribes: without a subscriber, an agent cannot
relay what it wrote on its own subjects onto another's (a LEDGER subject would store the delivery)."""


def agent_user(agent_id: str) -> str:
    return AGENT_USER_PREFIX + agent_id


def inbox_prefix(user: str) -> str:
    """The inbox prefix a user's connection must pass (`inbox_prefix=`): the only replies it may receive."""
    return f"_INBOX_{user}"


def check_agent_id(agent_id: str) -> str:
    """An id an agent user can have; InvalidInput naming the problem otherwise."""
    check_token(agent_id, "agent id")
    problem = authority.reserved_agent_id_problem(agent_id)
    if problem:
        raise InvalidInput(problem)
    return agent_id


def service_producers(role: str, replicas: Iterable[str] = ()) -> list[str]:
    """A service role's producer tokens: its name and `<name>-<replica>` (NATS wildcards are whole tokens,
    so each replica must be named)."""
    return [role, *(f"{role}-{check_token(r, 'replica name')}" for r in replicas)]


def _entity_is_the_agent(cls: type[ev.Event]) -> bool:
    # Agent-family events (heartbeats too) are about the agent they name: their entity id is its id.
    return issubclass(cls, ev.AgentEvent)


def event_subjects_for_role(role: str, producers: Sequence[str]) -> list[str]:
    """Subjects a service role may publish as each of `producers` (one per event type it may write)."""
    out = []
    for cls in ev.EVENT_TYPES:
        if role in authority.WRITERS.get(cls.type_tag(), frozenset()):
            out += [subjects.event_subject(cls.family, "*", cls.verb(), p) for p in producers]
    return out


def event_subjects_for_agent(agent_id: str) -> list[str]:
    """Subjects agent `agent_id` may publish: SELF writes on its own entity when the event is about the agent
    (registration, heartbeat, goodbye...), on any entity otherwise (a claim for itself on a session); OWNER and
    any-agent writes on any entity (the fold checks ownership)."""
    out = []
    for cls in ev.EVENT_TYPES:
        writers = authority.WRITERS.get(cls.type_tag(), frozenset())
        if writers & {authority.AGENT, authority.OWNER} or (authority.SELF in writers and not _entity_is_the_agent(cls)):
            entity = "*"
        elif authority.SELF in writers:
            entity = agent_id
        else:
            continue
        out.append(subjects.event_subject(cls.family, entity, cls.verb(), agent_id))
    return out


def js_read_api(streams: Sequence[str]) -> list[str]:
    """The JetStream API a reading SDK connection uses, nothing that changes a stream or deletes anything."""
    api = ["$JS.API.INFO"]
    for s in streams:
        api += [
            f"$JS.API.STREAM.INFO.{s}",
            f"$JS.API.STREAM.MSG.GET.{s}",  # from the stream leader: last sequence, first after (reader.py)
            f"$JS.API.DIRECT.GET.{s}",  # batched and sequence gets (ledger/reader.py)
            f"$JS.API.DIRECT.GET.{s}.>",  # last message of a subject
            f"$JS.API.CONSUMER.CREATE.{s}",  # ephemeral only: no consumer name token
            f"$JS.API.CONSUMER.MSG.NEXT.{s}.*",
        ]
    return api


def permissions_for(user: str, *, replicas: Sequence[str] = ()) -> Permissions:
    """The permissions of one user (`admin`, `operator`, `service`, `reader` or `agent-<id>`)."""
    inbox = (f"{inbox_prefix(user)}.>",)
    if user == ADMIN:
        return Permissions(publish=(">",), subscribe=(">",), subscribe_deny=NO_EVENT_SUBSCRIPTIONS)
    if user == OPERATOR:
        pub = event_subjects_for_role(authority.OPERATOR, OPERATOR_PRODUCERS)
        return Permissions(tuple(pub + js_read_api(READ_STREAMS)), inbox)
    if user == SERVICE:
        pub = []
        for role in SERVICE_PRODUCER_ROLES:
            pub += event_subjects_for_role(role, service_producers(role, replicas))
        pub += subjects.DLQ_SUBJECTS  # the projector's dead letters
        return Permissions(tuple(pub + js_read_api(READ_STREAMS)), (*inbox, LEADER_ADVISORY))
    if user == READER:
        return Permissions(tuple(js_read_api(READ_STREAMS)), inbox)
    if user.startswith(AGENT_USER_PREFIX):
        agent_id = check_agent_id(user.removeprefix(AGENT_USER_PREFIX))
        return Permissions(tuple(event_subjects_for_agent(agent_id) + js_read_api(AGENT_READ_STREAMS)), inbox)
    raise InvalidInput(f"unknown user {user!r}: one of {', '.join(ROLE_USERS)} or {AGENT_USER_PREFIX}<agent id>")


def _quoted(items: Iterable[str]) -> str:
    return "[" + ", ".join(f'"{s}"' for s in items) + "]"


def render_authorization(users: dict[str, str], *, replicas: Sequence[str] = ()) -> str:
    """A nats-server `authorization { users = [...] }` block for `users` (user name -> public nkey `U...`).

    It holds public keys only: the seeds stay with their users.
    """
    lines = ["# Generated by `ledger auth`: public nkeys only (the seeds stay with their users). Do not edit:",
             "# `ledger auth add-agent` rewrites it; then reload the server (nats-server --signal reload).",
             "authorization {", "  users = ["]
    for user in sorted(users, key=lambda u: (u not in ROLE_USERS, ROLE_USERS.index(u) if u in ROLE_USERS else 0, u)):
        key = users[user]
        if not (key.startswith("U") and len(key) == 56 and key.isalnum()):
            raise InvalidInput(f"{user}: not a public user nkey")
        perms = permissions_for(user, replicas=replicas)
        lines.append(f"    # {user}")
        if user == ADMIN:
            lines.append(f'    {{ nkey: "{key}", permissions: {{ subscribe: {{ deny: {_quoted(perms.subscribe_deny)} }} }} }}')
            continue
        lines += [f'    {{ nkey: "{key}", permissions: {{',
                  f"        publish: {{ allow: {_quoted(perms.publish)} }}",
                  f"        subscribe: {{ allow: {_quoted(perms.subscribe)} }}",
                  "    } }"]
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"
