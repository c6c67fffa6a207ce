"""The anomaly vocabulary: what a fold says instead of applying an event, and the first question it asks.

An event that reached the log but must not change state is flagged with an
`Anomaly` (one of the kinds below) and the state is returned unchanged. Before
anything else every fold asks `writer_problem`: whether the event's producer
token (the identity NATS permissions bind) may write that event at all
(`ledger.authority`). An event from a producer that may not is flagged
(unauthorized_producer) and changes nothing, so a goodbye for a2 published on
a subject a1 may use says nothing about a2.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from ledger import authority
from ledger import events as ev


class Anomaly(msgspec.Struct, frozen=True):
    """An event that reached the log but must not change state: flagged, never applied."""

    kind: str
    detail: str


# Anomaly kinds
ILLEGAL_TRANSITION = "illegal_transition"
SUPERSEDED_INCARNATION = "superseded_incarnation"
UNKNOWN_INCARNATION = "unknown_incarnation"
STALE_TOKEN = "stale_token"
OVERLAPPING_CLAIM = "overlapping_claim"
UNKNOWN_ENTITY = "unknown_entity"
DUPLICATE = "duplicate"
AFTER_FINAL = "after_final"
UNAUTHORIZED_PRODUCER = "unauthorized_producer"
LIVE_OWNER = "live_owner"
"""A take-over (a claim naming the current token) while the log says the owner may keep the session."""
FOREIGN_PLACEMENT = "foreign_placement"
"""A claim for an agent registered in another pool, platform or region than the session's."""
FINAL_CLAIMER = "final_claimer"
"""A claim for an incarnation that is gone, dead or fenced at the claim: it will never serve the session."""
FINAL_OWNER = "final_owner"
"""An owner write (release, resource report, checkpoint) by an incarnation gone, dead or fenced at the write."""


S = TypeVar("S")
Evolved = tuple[S, Anomaly | None]


UNKNOWN_OWNER: Any = object()
"""`writer_problem`'s owner when the caller cannot tell who owns the session concerned."""


def writer_problem(e: ev.Event, owner: object = UNKNOWN_OWNER) -> Anomaly | None:
    """Why the event's producer may not write it (None: it may) - `authority.writer_refusal` as an anomaly.

    The producer is the subject's last token (the codec checks `e.producer.id` equals it): what NATS
    permissions bind. `owner`: the agent owning the session concerned just before the event (None: nobody),
    for the event types its owner may write; left out, an agent passes as a possible owner (a caller holding
    one history cannot tell; the folds that can, pass it).
    """
    refusal = authority.writer_refusal(e.type_tag(), e.producer.id, subject_agent=getattr(e, "agent_id", None),
                                       owner=owner if isinstance(owner, str) else None,
                                       owner_known=owner is not UNKNOWN_OWNER)
    return Anomaly(UNAUTHORIZED_PRODUCER, refusal) if refusal is not None else None
