"""What was folded since the last commit, and the batch that commits it (pure: no I/O).

The readers `note` every change; the writer turns the pending changes into a
`Batch` at one instant, with no await in between, so the batch holds exactly
the state its checkpoints name. States are immutable structs: the batch keeps
references and is encoded later, a chunk at a time, while the readers go on.
"""

from __future__ import annotations

import time
from typing import Any

from ledger.codec import Unreadable, to_ns

from . import snapshots, versions
from .beats import Beat, slot_of
from .db import Batch
from .state import (
    AGENT,
    DEAD_LETTER,
    HEARTBEAT,
    POOL,
    ROUTE,
    SESSION,
    STREAMS,
    AnomalyRecord,
    Change,
    LedgerState,
    dead_letter_code,
)


def _rows(table: dict[str, Any], dirty: set[str], retired: dict[str, Any]) -> dict[str, Any]:
    """Each dirty entity's state now, or its last one if the fold retired it since (a re-created id: the new one)."""
    return {k: v if (v := table.get(k)) is not None else retired[k] for k in dirty}


class Uncommitted:
    __slots__ = ("dirty", "retired", "anomalies", "dead", "events", "since", "noted", "beat_slots")

    def __init__(self) -> None:
        self.dirty: dict[str, set[str]] = {AGENT: set(), SESSION: set(), ROUTE: set(), POOL: set()}
        self.retired: dict[str, dict[str, Any]] = {AGENT: {}, SESSION: {}, ROUTE: {}}
        """The last state of each dirty entity the fold retired before this commit: its row must still land."""
        self.anomalies: list[AnomalyRecord] = []
        self.dead: list[Unreadable] = []
        self.events = 0
        """Items folded (including ones already applied before, which change nothing)."""
        self.since = time.monotonic()
        self.noted: list[versions.Noted] = []
        """Every applied change in order, for the version rows (time travel)."""
        self.beat_slots: list[tuple[int, str, Beat]] = []
        """Every accepted beat in order, (seq, agent id, the slot it makes): the writer folds them onto the agents'
        stored records (the fold in memory trims what retirement lets go of; the rows keep the stream's fold)."""

    def note(self, change: Change | None, item: Any) -> None:
        self.events += 1
        if change is None:
            return
        if change.kind == DEAD_LETTER:
            self.dead.append(item)
        elif change.kind == HEARTBEAT and change.anomaly is None:
            self.beat_slots.append((item.seq, change.id, slot_of(item)))
        elif change.anomaly is None:
            self.dirty[change.kind].add(change.id)
            self.noted.append((change.kind, change.id, item.seq, change.before))
        else:
            self.anomalies.append(change.anomaly)
        for gone in change.retired:
            if gone.id in self.dirty[gone.kind]:
                self.retired[gone.kind][gone.id] = gone.final
                self.noted.append((gone.kind, gone.id, versions.RETIRED, gone.final))

    def batch(self, state: LedgerState, plan: snapshots.Plan | None = None, now_ns: int | None = None) -> Batch:
        """Everything to commit for these changes, as of `state` now; `plan` adds any snapshot that is due."""
        stamp = now_ns if now_ns is not None else time.time_ns()
        ledger = state.ledger
        last_dead: dict[tuple[str, str], Unreadable] = {}
        for item in self.dead:
            last_dead[(item.stream, dead_letter_code(item.reason))] = item
        snaps, drops = plan.due(state, stamp) if plan is not None else ([], [])
        batch = Batch(
            agents=_rows(ledger.agents, self.dirty[AGENT], self.retired[AGENT]),
            sessions=_rows(ledger.sessions, self.dirty[SESSION], self.retired[SESSION]),
            routes=_rows(ledger.routes, self.dirty[ROUTE], self.retired[ROUTE]),
            pools={k: ledger.pools[k] for k in self.dirty[POOL]},
            beats={},
            anomalies=[(a.stream, a.seq, to_ns(a.stored_at), a.entity_kind, a.entity_id, a.event_type, a.producer,
                        a.kind, a.detail) for a in self.anomalies],
            dead_letters=[(stream, code, state.part(stream).dead_letters[code], item.seq, item.subject,
                           item.reason[:2000]) for (stream, code), item in last_dead.items()],
            checkpoints=[(s, state.part(s).seq, state.part(s).stored_ns, state.part(s).anomalies, stamp)
                         for s in STREAMS],
            snapshots=snaps,
            drop_snapshots=drops,
            beat_slots=self.beat_slots,
        )
        committed: dict[str, dict[str, Any]] = {AGENT: batch.agents, SESSION: batch.sessions, ROUTE: batch.routes,
                                                POOL: batch.pools}
        return batch._replace(versions=versions.versions(self.noted, committed))
