"""The subject layout and stream names: pure functions, no I/O.

Every event lives on a five-token subject::

    ledger.<family>.<entity id>.<verb>.<producer id>

    ledger.agent.a-17.registered.a-17
    ledger.session.s-42.claimed.reclaimer
    ledger.route.r-9.transitioned.a-17
    ledger.hb.a-17.heartbeat.a-17

* `ledger.<family>.<id>.>` is one entity's whole history, so one
  compare-and-set (Nats-Expected-Last-Subject-Sequence with that filter)
  guards the entity.
* `ledger.<family>.*.<verb>.*` selects one event type; `ledger.<family>.>`
  one kind of entity; `ledger.*.*.*.<producer>` everything one producer wrote.
* The producer token lets NATS permissions bind identity to subjects: an agent
  may publish only subjects that end in its own id.

Heartbeats (family `hb`) go to their own stream with bounded retention; the
other families go to the immutable LEDGER stream. Dead letters go to
`ledger.dlq.<stream>.<reason>`.
"""

from __future__ import annotations

from typing import NamedTuple

from .errors import InvalidInput

PREFIX = "ledger"

LEDGER_STREAM = "LEDGER"
HEARTBEAT_STREAM = "LEDGER_HB"
DLQ_STREAM = "LEDGER_DLQ"

LEDGER_FAMILIES = ("agent", "session", "route", "pool")
HEARTBEAT_FAMILY = "hb"

LEDGER_SUBJECTS = [f"{PREFIX}.{family}.*.*.*" for family in LEDGER_FAMILIES]
HEARTBEAT_SUBJECTS = [f"{PREFIX}.{HEARTBEAT_FAMILY}.*.*.*"]
DLQ_SUBJECTS = [f"{PREFIX}.dlq.>"]


class SubjectParts(NamedTuple):
    family: str
    entity_id: str
    verb: str
    producer: str


def event_subject(family: str, entity_id: str, verb: str, producer: str) -> str:
    return f"{PREFIX}.{family}.{entity_id}.{verb}.{producer}"


def parse(subject: str) -> SubjectParts:
    """Split an event subject into its parts; InvalidInput if it is not one."""
    tokens = subject.split(".")
    if len(tokens) != 5 or tokens[0] != PREFIX:
        raise InvalidInput(f"not a ledger event subject: {subject!r}")
    return SubjectParts(*tokens[1:])


def entity_filter(family: str, entity_id: str) -> str:
    """The subject filter covering one entity's whole history."""
    return f"{PREFIX}.{family}.{entity_id}.>"


def type_filter(family: str = "*", verb: str = "*", producer: str = "*") -> str:
    return f"{PREFIX}.{family}.*.{verb}.{producer}"


def family_filter(family: str) -> str:
    return f"{PREFIX}.{family}.>"


def stream_for_family(family: str) -> str:
    if family == HEARTBEAT_FAMILY:
        return HEARTBEAT_STREAM
    if family in LEDGER_FAMILIES:
        return LEDGER_STREAM
    raise InvalidInput(f"unknown subject family {family!r}")


def stream_for_filter(subject_filter: str) -> str:
    """Which stream holds the messages a filter selects (filters never span streams)."""
    tokens = subject_filter.split(".")
    if len(tokens) < 2 or tokens[0] != PREFIX:
        raise InvalidInput(f"subject filter must start with '{PREFIX}.': {subject_filter!r}")
    family = tokens[1]
    if family == "dlq":
        return DLQ_STREAM
    if family in ("*", ">"):
        return LEDGER_STREAM  # the heartbeat stream is only ever read on purpose
    return stream_for_family(family)


def dlq_subject(stream: str, reason: str) -> str:
    return f"{PREFIX}.dlq.{stream}.{reason}"
