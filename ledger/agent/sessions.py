"""What the agent keeps about each session it owns: ONE record per session, in one mapping.

The claim, the fold's state, the newest sequence judged, activity and idleness of a session all live in its
record, so a fence, a loss or a goodbye drops them together: no view of a session can outlive another.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import msgspec

from ledger import lifecycle as lc


class Claim(msgspec.Struct, frozen=True):
    """A session this agent owns, and the fencing token its owner writes carry."""

    session_id: str
    token: int
    reason: str
    checkpoint: lc.Checkpoint | None = None
    """The newest checkpoint recorded on the session when this claim was made (by a previous owner, or an earlier
    claim of ours): where to resume from. None if no owner ever recorded one (or the session was terminated)."""


class Activity(msgspec.Struct, frozen=True):
    """How long one owned session has been idle, whether work is in flight, and its idle TTL."""

    idle_for: float
    in_flight: int
    idle_ttl: float | None


@dataclass
class SessionRecord:
    """One owned session."""

    claim: Claim
    state: lc.SessionState
    """The session's folded state (the fold the watch extends event by event)."""
    seq: int
    """The newest sequence of the session already judged, so a lagging watch never undoes our writes."""
    last_active: float
    in_flight: int = 0
    idle_ttl: float | None = None
    idle_ttl_known: bool = False
    releasing: bool = False
    """A release of it is on its way: `busy()` refuses it, no work starts on it."""

    def touch(self) -> None:
        self.last_active = time.monotonic()

    def activity(self, now: float) -> Activity:
        return Activity(idle_for=now - self.last_active, in_flight=self.in_flight, idle_ttl=self.idle_ttl)


class OwnedSessions:
    """The records of the sessions this incarnation owns, and how far each session's events were judged.

    A session's judged sequence outlives its record only until the watch has passed it (`watched_to`): below
    the watch's position every event was judged already, so nothing is kept about a session we do not own.
    """

    def __init__(self) -> None:
        self._records: dict[str, SessionRecord] = {}
        self._judged: dict[str, int] = {}
        """Sessions without a record whose newest judged sequence is past the watch (our own write told us)."""
        self._watched = 0
        """Every event below this sequence has been judged by the watch."""

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._records

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._records))

    def get(self, session_id: str) -> SessionRecord | None:
        return self._records.get(session_id)

    def items(self) -> list[tuple[str, SessionRecord]]:
        return list(self._records.items())

    def claims(self) -> dict[str, Claim]:
        return {sid: r.claim for sid, r in self._records.items()}

    def tokens(self) -> dict[str, int]:
        return {sid: r.claim.token for sid, r in self._records.items()}

    def judged_through(self, session_id: str) -> int:
        """The newest sequence of this session judged so far (by the watch, or from our own write)."""
        record = self._records.get(session_id)
        return max(record.seq if record is not None else 0, self._judged.get(session_id, 0), self._watched - 1)

    def judged(self, session_id: str, seq: int) -> None:
        record = self._records.get(session_id)
        if record is not None:
            record.seq = seq
        elif seq >= self._watched:
            self._judged[session_id] = seq

    def watched_to(self, seq: int, *, prune: bool = False) -> None:
        """The watch judged every event below `seq`; `prune` forgets what that makes redundant."""
        self._watched = max(self._watched, seq)
        if prune and self._judged:
            self._judged = {sid: s for sid, s in self._judged.items() if s >= self._watched}

    def own(self, claim: Claim, state: lc.SessionState) -> SessionRecord:
        """A new record (the session just became ours); it starts active now."""
        record = SessionRecord(claim, state, self._judged.pop(claim.session_id, 0), time.monotonic())
        self._records[claim.session_id] = record
        return record

    def drop(self, session_id: str) -> SessionRecord | None:
        """Forget an owned session (keeping only how far it was judged, until the watch passes that)."""
        record = self._records.pop(session_id, None)
        if record is not None:
            self.judged(session_id, record.seq)
        return record

    def drop_all(self) -> list[str]:
        lost = list(self._records)
        for sid in lost:
            self.drop(sid)
        return lost

    def traces(self, session_id: str) -> list[str]:
        """Where anything about the session is still kept (for tests: nothing once it is lost and watched)."""
        return [where for where, kept in (("record", session_id in self._records),
                                          ("judged", session_id in self._judged)) if kept]
