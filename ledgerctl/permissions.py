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
               name and `<role>-<replica>` for the replicas named), plus the projector's dead letters; it serves
               the query service (subscribes to its subjects and `$SRV.>`, answers each request once).
* `reader`   - reads only (dashboards, `ledger doctor`, views).
* `agent-<id>` - one per agent: subjects ending in its id; its own lifecycle only on its own entity.

Every user but admin and service may ask the query service (`QUERY_REQUESTS`).

Every user but admin subscribes only to its own inbox prefix (`_INBOX_<user>.>`), so nobody reads
another user's replies, and creates only ephemeral consumers (`$JS.API.CONSUMER.CREATE.<stream>` with no
consumer name: JetStream refuses a durable name on that subject).

Accounts (`accounts_config`): NATS checks the subject a client publishes to, never the reply subject it names,
and the server publishes its answers (PubAcks, Direct Gets, pull deliveries) to that reply subject in the
requester's account. So the streams live in an account of their own, LEDGER (admin's), and every other user is
alone in an account that imports from LEDGER exactly the subjects it may publish: an answer steered onto another
producer's subject lands where nothing captures it. The query subjects are the one exception: the service user's
account (SERVICE) exports them, and the accounts that may ask import them from there.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ledger import authority, subjects
from ledger import events as ev
from ledger.errors import InvalidInput
from ledger.ids import check_token

from .query_protocol import DISCOVERY_SUBJECTS, QUERY_SUBJECTS

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
QUERY_REQUESTS = (QUERY_SUBJECTS, DISCOVERY_SUBJECTS)
"""What asking the query service publishes (a query, `$SRV.PING/INFO/STATS`) and what the service subscribes to."""


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    """Allowed publish subjects (`(">",)` for admin)."""
    subscribe: tuple[str, ...]
    subscribe_deny: tuple[str, ...] = ()
    answers_requests: bool = False
    """May answer the requests it receives (nats-server `allow_responses`: once each, to their reply subject)."""


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
        own_entity = _entity_is_the_agent(cls)
        if writers & {authority.AGENT, authority.OWNER} or (authority.SELF in writers and not own_entity):
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
            f"$JS.API.DIRECT.GET.{s}",  # batched and sequence gets (ledger/jsapi.py)
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
        return Permissions(tuple(pub + js_read_api(READ_STREAMS)) + QUERY_REQUESTS, inbox)
    if user == SERVICE:
        pub = []
        for role in SERVICE_PRODUCER_ROLES:
            pub += event_subjects_for_role(role, service_producers(role, replicas))
        pub += subjects.DLQ_SUBJECTS  # the projector's dead letters
        return Permissions(tuple(pub + js_read_api(READ_STREAMS)), (*inbox, LEADER_ADVISORY, *QUERY_REQUESTS),
                           answers_requests=True)
    if user == READER:
        return Permissions(tuple(js_read_api(READ_STREAMS)) + QUERY_REQUESTS, inbox)
    if user.startswith(AGENT_USER_PREFIX):
        agent_id = check_agent_id(user.removeprefix(AGENT_USER_PREFIX))
        return Permissions(tuple(event_subjects_for_agent(agent_id) + js_read_api(AGENT_READ_STREAMS))
                           + QUERY_REQUESTS, inbox)
    raise InvalidInput(f"unknown user {user!r}: one of {', '.join(ROLE_USERS)} or {AGENT_USER_PREFIX}<agent id>")


STREAMS_ACCOUNT = "LEDGER"
"""The account that holds the streams, and admin. Every other user is alone in an account of its own: nothing it
publishes reaches LEDGER but what LEDGER exports to that account, and every answer the server sends to a reply
subject it names goes back into its account. There no stream captures anything; at most the answer lands on one of
the account's own imports, a subject the user may publish anyway. (Two agents in one account would not do: an
answer steered onto the other's import subject goes on into LEDGER as the other's event.)"""
ROLE_ACCOUNTS = {OPERATOR: "OPERATOR", SERVICE: "SERVICE", READER: "READER"}
AGENT_ACCOUNT_PREFIX = "AGENT_"
"""Agent accounts are numbered slots (`AGENT_<n>`, the manifest says whose): nats-server 2.14 does not wire the
imports of an account a reload creates (they work from the next reload on), so the configuration always holds one
spare, empty account, which `ledger auth add-agent` fills: one reload gives the new agent an account that already
exists, and creates the next spare."""


def agent_account(n: int) -> str:
    return f"{AGENT_ACCOUNT_PREFIX}{n}"


def slot_of(account: str) -> int:
    return int(account.removeprefix(AGENT_ACCOUNT_PREFIX))


def assign_agent_accounts(agent_users: Iterable[str], taken: dict[str, str] | None = None) -> dict[str, str]:
    """Agent user -> account: those in `taken` keep theirs, the others get the next free slots, in order."""
    out = dict(taken or {})
    for user in agent_users:
        if user not in out:
            out[user] = spare_agent_account(out)
    return out


def spare_agent_account(agent_accounts: dict[str, str]) -> str:
    """The empty account the configuration holds for the next agent: the slot after the last one taken."""
    return agent_account(max(map(slot_of, agent_accounts.values()), default=0) + 1)


MANY_ANSWERS = ("$JS.API.DIRECT.GET.", "$JS.API.CONSUMER.MSG.NEXT.")
"""Requests answered by many messages (a batched Direct Get, a pull's deliveries and status messages): a service
export answers once unless it says `response_type: stream`."""


@dataclass(frozen=True)
class Share:
    """What the streams account shares with one user's account: the subjects it may publish into LEDGER (its
    events, its JetStream API calls), and the subjects LEDGER publishes that it may hear (advisories)."""

    services: tuple[str, ...]
    streams: tuple[str, ...] = ()
    queries: tuple[str, ...] = ()
    """The query service's subjects it may ask, imported from the SERVICE account (not LEDGER)."""


def share_for(user: str, *, replicas: Sequence[str] = ()) -> Share:
    """Exactly what `user` may publish (its permissions) is what reaches LEDGER - or, for the query subjects, the
    query service's account: one list, two enforcements."""
    perms = permissions_for(user, replicas=replicas)
    streams = (LEADER_ADVISORY,) if LEADER_ADVISORY in perms.subscribe else ()
    return Share(tuple(s for s in perms.publish if s not in QUERY_REQUESTS), streams,
                 tuple(s for s in perms.publish if s in QUERY_REQUESTS))


def _response_type(subject: str) -> str:
    if subject == DISCOVERY_SUBJECTS:
        return "stream"  # `$SRV.PING` is answered by every replica
    return "stream" if subject.startswith(MANY_ANSWERS) and not subject.endswith(".>") else "singleton"


def _user_entry(user: str, key: str, *, replicas: Sequence[str]) -> dict[str, Any]:
    perms = permissions_for(user, replicas=replicas)
    if user == ADMIN:
        return {"nkey": key, "permissions": {"subscribe": {"deny": list(perms.subscribe_deny)}}}
    entry: dict[str, Any] = {"publish": {"allow": list(perms.publish)}, "subscribe": {"allow": list(perms.subscribe)}}
    if perms.answers_requests:
        entry["allow_responses"] = True
    return {"nkey": key, "permissions": entry}


def _ordered(users: Iterable[str]) -> list[str]:
    return sorted(users, key=lambda u: (u not in ROLE_USERS, ROLE_USERS.index(u) if u in ROLE_USERS else 0, u))


def _agent_accounts(users: dict[str, str], agent_accounts: dict[str, str] | None) -> dict[str, str]:
    return assign_agent_accounts([u for u in _ordered(users) if u not in ROLE_USERS],
                                 {u: a for u, a in (agent_accounts or {}).items() if u in users})


def accounts_config(users: dict[str, str], *, replicas: Sequence[str] = (),
                    agent_accounts: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """The nats-server `accounts` map for `users` (user name -> public nkey `U...`): account name -> its settings.

    LEDGER holds the streams and admin, and exports each subject only to the accounts of the users that may publish
    it; every other user is alone in an account that imports exactly what it may publish (`share_for`), the query
    subjects from SERVICE (which exports them) when there is a service user to answer them.
    `agent_accounts` (agent user -> `AGENT_<n>`, from the manifest) keeps each agent in the account it has; agents
    not in it get the next slots. One spare, empty agent account ends the map (AGENT_ACCOUNT_PREFIX says why).
    """
    for user, key in users.items():
        permissions_for(user, replicas=replicas)  # InvalidInput for an unknown user
        if not (key.startswith("U") and len(key) == 56 and key.isalnum()):
            raise InvalidInput(f"{user}: not a public user nkey")
    ordered = _ordered(users)
    agents = _agent_accounts(users, agent_accounts)
    account = {**ROLE_ACCOUNTS, **agents}
    # subject -> accounts that import it, in first-seen order (dicts as ordered sets).
    services: dict[str, dict[str, None]] = {}
    streams: dict[str, dict[str, None]] = {}
    queries: dict[str, dict[str, None]] = {}
    served = SERVICE in users
    out: dict[str, dict[str, Any]] = {STREAMS_ACCOUNT: {}}
    for user in ordered:
        if user == ADMIN:
            continue
        share = share_for(user, replicas=replicas)
        for subject in share.services:
            services.setdefault(subject, {})[account[user]] = None
        for subject in share.streams:
            streams.setdefault(subject, {})[account[user]] = None
        asks = share.queries if served else ()
        for subject in asks:
            queries.setdefault(subject, {})[account[user]] = None
        out[account[user]] = {
            "users": [_user_entry(user, users[user], replicas=replicas)],
            "imports": [{"service": {"account": STREAMS_ACCOUNT, "subject": s}} for s in share.services]
            + [{"stream": {"account": STREAMS_ACCOUNT, "subject": s}} for s in share.streams]
            + [{"service": {"account": ROLE_ACCOUNTS[SERVICE], "subject": s}} for s in asks]}
    if served and queries:
        out[ROLE_ACCOUNTS[SERVICE]]["exports"] = [
            {"service": s, "response_type": _response_type(s), "accounts": list(a)} for s, a in queries.items()]
    out[STREAMS_ACCOUNT] = {
        "jetstream": "enabled",
        "users": [_user_entry(ADMIN, users[ADMIN], replicas=replicas)] if ADMIN in users else [],
        "exports": [{"service": s, "response_type": _response_type(s), "accounts": list(a)}
                    for s, a in services.items()]
        + [{"stream": s, "accounts": list(a)} for s, a in streams.items()]}
    out[spare_agent_account(agents)] = {"users": []}
    return out


def render_authorization(users: dict[str, str], *, replicas: Sequence[str] = (),
                         agent_accounts: dict[str, str] | None = None) -> str:
    """`accounts_config` as the nats-server configuration `ledger auth` writes (auth.conf; NATS reads JSON too).

    It holds public keys only: the seeds stay with their users.
    """
    config = accounts_config(users, replicas=replicas, agent_accounts=agent_accounts)
    whose = {a: u for u, a in {**ROLE_ACCOUNTS, **_agent_accounts(users, agent_accounts)}.items()}
    whose[STREAMS_ACCOUNT] = f"{ADMIN}, and the streams"
    lines = ["# Generated by `ledger auth`: public nkeys only (the seeds stay with their users). Do not edit:",
             "# `ledger auth add-agent` rewrites it; then reload the server (nats-server --signal reload).",
             f"# The streams live in account {STREAMS_ACCOUNT} (admin's). Every other user is alone in an account that",
             "# imports from it only what the user may publish: an answer to a reply subject it names stays there.",
             "accounts {"]
    for name, settings in config.items():
        lines += [f"  # {whose.get(name, 'spare: the next `ledger auth add-agent` fills it')}", f'  "{name}": {{']
        for key, value in settings.items():
            if isinstance(value, list):  # one entry a line: a diff after add-agent shows what changed
                lines += [f'    "{key}": [', ",\n".join(f"      {json.dumps(v)}" for v in value), "    ]"]
            else:
                lines.append(f'    "{key}": {json.dumps(value)}')
        lines.append("  }")
    lines.append("}")
    return "\n".join(ln for ln in lines if ln) + "\n"
