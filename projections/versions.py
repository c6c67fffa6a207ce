"""Every state an entity had, by the sequence that made it: the rows behind time travel as an index (pure).

A commit writes each changed entity's current row once, however often it changed in the batch. Time travel
needs every state in between as well: the state after change i of an entity is the state the fold had
*before* its change i + 1 (`Change.before`), and after its last change it is the state the batch commits.
So the projector notes (kind, id, seq, before) for each applied change, and `versions` turns the notes of a
batch into one version per change - without keeping anything in the fold, so it does not matter whether
the fold still holds an entity later (terminated ones may leave it).

Heartbeats get versions too (`beat_versions`: an agent's kept beats after each beat), because health as of a
moment needs each agent's newest beat at or before it, exactly, and views show the beat's time and load. The
trade-off: that is a row per beat (~250 bytes of JSON plus its index entry) - at 20,000 agents beating every
5 s, ~4,000 rows/s. So they are bounded by a window of their own, `ProjectionSettings.beat_history` (an hour by
default, not the stream's day): when a heartbeat snapshot is taken, versions superseded at or before the last
beat stored `beat_history` before the newest committed one (or the stream's first kept beat, if later) are
pruned - each agent keeps the one it had there - and the file notes that sequence (`beats_from`). A moment
older than it takes its beats as a replay does (`timetravel.beats_as_of_cut`: the nearest heartbeat snapshot,
then the stream up to the moment). Keeping fewer beat versions within the window (only those that change a
verdict, or one per bucket) would make "as of T" answer with an older beat than the log holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .state import AGENT, POOL, ROUTE, SESSION

VERSIONED = (AGENT, SESSION, ROUTE, POOL)
"""The kinds of change that leave a version row made here (every applied change of them). Beats leave one each
too, made as their rows are, from the agent's stored record (`beats.merged`): the fold in memory trims them."""


Noted = tuple[str, str, int, Any]
"""One applied change as the projector notes it: (kind, id, seq, the state before it - None if it created the
entity). A plain tuple: one is made per event folded. A retirement is noted too, as (kind, id, RETIRED, its
final state): a change after it (a re-creation) has no state before, yet the version before it ended as that."""

RETIRED = -1
"""The seq of a noted retirement (no version of its own)."""


Version = tuple[int, bool, Any]
"""(seq, whether this change created the entity, the state it made)."""

_MISSING = object()


def versions(noted: Sequence[Noted], committed: Mapping[str, Mapping[str, Any]]) -> dict[str, list[Version]]:
    """Kind -> the versions the noted changes made, oldest first; `committed` is kind -> {id: state} of the
    batch (each entity's state after its last change). An entity missing from it leaves no version."""
    out: dict[str, list[Version]] = {kind: [] for kind in VERSIONED}
    later: dict[str, dict[str, Any]] = {kind: {} for kind in VERSIONED}
    """Per kind, id -> the state before the entity's next change (walking back from the last one)."""
    for kind, id_, seq, before in reversed(noted):
        after = later[kind]
        if seq == RETIRED:
            after[id_] = before
            continue
        state = after.get(id_, _MISSING)
        if state is _MISSING:
            state = committed[kind].get(id_)
        if state is not None:
            out[kind].append((seq, before is None, state))
        after[id_] = before
    for rows in out.values():
        rows.reverse()
    return out
