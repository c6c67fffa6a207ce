"""The history of one entity: every event, who wrote it and why, and what it changed or the anomaly it raised.

Read straight from JetStream (one batched Direct Get per entity) and folded
with the same rules as the projection. The checks that look across entities
use the store's session lookups and `ledger.lifecycle.claims_lookup`, built from the
histories of the agents and the session involved, which gives each event the
very answer the log-order fold gave it.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import datetime
from typing import Any

import msgspec

from ledger import events as ev
from ledger.codec import Recorded, Unreadable, to_ns
from ledger.lifecycle import (
    AgentAt,
    IncarnationAt,
    RegisteredAt,
    SessionState,
    claims_lookup,
    evolve_agent,
    evolve_pool,
    evolve_route,
    evolve_session,
    fold,
)
from ledger.store import EventStore

from .errors import InvalidQuery, UnknownEntity

KINDS = ("agent", "session", "route", "pool")


class Flag(msgspec.Struct, frozen=True):
    kind: str
    detail: str


class HistoryEntry(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    stored_at: datetime
    type: str
    """The event type, or `dead_letter` for a stored message that is not an event."""
    time: datetime | None = None
    """When the producer says it happened."""
    producer: str | None = None
    producer_instance: str | None = None
    event_id: str | None = None
    causation_id: str | None = None
    correlation_id: str | None = None
    applied: bool = False
    changes: dict[str, list[Any]] = {}
    """Field -> [before, after] for what the event changed."""
    anomaly: Flag | None = None
    """Why the event was flagged and not applied."""
    dead_letter: str | None = None
    event: dict[str, Any] | None = None
    """The whole payload, evidence and reasons included."""


class EntityHistory(msgspec.Struct, frozen=True, kw_only=True):
    kind: str
    id: str
    entries: list[HistoryEntry]
    state: dict[str, Any] | None
    """The entity's state after the last entry."""
    notes: list[str] = []


def checkpoint_size(doc: dict[str, Any]) -> int:
    """Bytes of a checkpoint as an entity's state document holds it (`data` in base64, as msgspec writes bytes)."""
    return len(base64.b64decode(doc.get("data") or ""))


def diff(before: msgspec.Struct | None, after: msgspec.Struct | None) -> dict[str, list[Any]]:
    if after is None or after is before:
        return {}
    out = {}
    for name in after.__struct_fields__:
        old = getattr(before, name) if before is not None else None
        new = getattr(after, name)
        if old != new:
            out[name] = [msgspec.to_builtins(old), msgspec.to_builtins(new)]
    return out


def entry(item: Recorded | Unreadable, before: Any, after: Any, flag: Any) -> HistoryEntry:
    if isinstance(item, Unreadable):
        return HistoryEntry(seq=item.seq, stored_at=item.stored_at, type="dead_letter", dead_letter=item.reason)
    e = item.event
    return HistoryEntry(
        seq=item.seq, stored_at=item.stored_at, type=e.type_tag(), time=e.time, producer=e.producer.id,
        producer_instance=e.producer.instance, event_id=e.event_id, causation_id=e.causation_id,
        correlation_id=e.correlation_id, applied=flag is None, changes=diff(before, after) if flag is None else {},
        anomaly=Flag(flag.kind, flag.detail) if flag is not None else None, event=msgspec.to_builtins(e),
    )


async def _lookups(store: EventStore, records: list[Recorded]) -> tuple[IncarnationAt, AgentAt, RegisteredAt]:
    """A session history's lookups (the SDK's own: `EventStore.session_lookups`), read from a replica that has the
    whole session history."""
    return await store.session_lookups(records, min_last_seq=records[-1].seq if records else None)


def stored_by(seq: int | None, time: datetime | None) -> Callable[[Recorded | Unreadable], bool]:
    """Whether a LEDGER item was stored by the moment asked about: just after sequence `seq`, or by `time` (a
    datetime covers its whole microsecond); neither: now."""
    if seq is not None:
        return lambda i: i.seq <= seq
    if time is not None:
        limit = to_ns(time) + 999
        return lambda i: i.timestamp_ns <= limit
    return lambda i: True


def _upto(items: list[Recorded | Unreadable], seq: int | None, time: datetime | None) -> list[Recorded | Unreadable]:
    keep = stored_by(seq, time)
    return [i for i in items if keep(i)]


async def entity_history(store: EventStore, kind: str, entity_id: str, *, seq: int | None = None,
                         time: datetime | None = None) -> EntityHistory:
    """Every event of one agent, session, route or pool (up to a sequence or a time), with its effect."""
    if kind not in KINDS:
        raise InvalidQuery(f"history is kept for {', '.join(KINDS)}; not {kind!r}")
    items = _upto(await store.history(kind, entity_id), seq, time)
    if not items:
        at = " at that point" if seq is not None or time is not None else ""
        raise UnknownEntity(f"the ledger holds no event for {kind} {entity_id}{at}")
    records = [i for i in items if isinstance(i, Recorded)]
    notes: list[str] = []
    evolve: Any  # each kind's evolve, with the lookups it takes
    lookups: tuple[Any, ...]
    if kind == "agent":
        evolve, lookups = evolve_agent, ()
    elif kind == "pool":
        evolve, lookups = evolve_pool, ()
    elif kind == "session":
        evolve, lookups = evolve_session, await _lookups(store, records)
    else:
        created = next((r.event for r in records if isinstance(r.event, ev.RouteCreated)), None)
        evolve, lookups = evolve_route, ()
        if created is not None:
            session = [i for i in await store.history("session", created.session_id) if isinstance(i, Recorded)]
            lookups = (claims_lookup(created.session_id, session, *await _lookups(store, session)),)
    state: Any = None
    entries = []
    for item in items:
        if isinstance(item, Unreadable):
            entries.append(entry(item, None, None, None))
            continue
        after, flag = evolve(state, item, *lookups)
        entries.append(entry(item, state, after, flag))
        state = after
    if kind == "agent":
        last = await store.last("hb", entity_id)
        if isinstance(last, Recorded) and (seq is None and time is None):
            beat = last.event
            notes.append(f"last heartbeat kept: #{last.seq} at {last.stored_at.isoformat()} "
                         f"(incarnation {beat.incarnation}, beat {beat.beat})")  # type: ignore[attr-defined]
        elif isinstance(last, Unreadable) and (seq is None and time is None):
            notes.append(f"newest message on its heartbeat subject, #{last.seq} at {last.stored_at.isoformat()}, "
                         f"is not a heartbeat (dead letter: {last.reason[:200]})")
    return EntityHistory(kind=kind, id=entity_id, entries=entries,
                         state=msgspec.to_builtins(state) if state is not None else None, notes=notes)


async def session_as_of(store: EventStore, session_id: str, *, seq: int | None = None,
                        time: datetime | None = None) -> tuple[SessionState | None, int]:
    """A session's state just after LEDGER sequence `seq`, or at `time` (its history cut there as a history is
    cut, and folded with the same lookups), and the sequence of its last event up to there (0: none)."""
    items = _upto(await store.history("session", session_id), seq, time)
    records = [i for i in items if isinstance(i, Recorded)]
    state, _ = fold(evolve_session, records, *await _lookups(store, records))
    return state, items[-1].seq if items else 0
