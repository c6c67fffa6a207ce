"""State <-> SQLite rows: each entity is a JSON document, and each batch one statement per table.

Why one statement: aiosqlite runs SQLite in a thread, and Python's sqlite3
releases the GIL around every step. With `executemany`, that thread needs the
GIL back after every row while the event loop is busy folding, and a batch
crawls (a few hundred rows/s). Handing SQLite one JSON text per table and
letting `json_each` expand it keeps the whole upsert in C, off the GIL, on the
other core.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import msgspec

from ledger.lifecycle import AgentState, PoolState, RouteState, SessionState

from .beats import Beat

_encode = msgspec.json.Encoder().encode
_agent = msgspec.json.Decoder(AgentState).decode
_session = msgspec.json.Decoder(SessionState).decode
_route = msgspec.json.Decoder(RouteState).decode
_pool = msgspec.json.Decoder(PoolState).decode
_beat = msgspec.json.Decoder(Beat).decode

# Each takes one JSON object {id: state, ...} (bytes, hence the CAST: SQLite >= 3.45 would read a BLOB as JSONB);
# `WHERE true` lets SQLite parse the upsert that follows a SELECT.
UPSERT_AGENTS = """
INSERT INTO agents (agent_id, pool, status, incarnation, doc)
SELECT key, json_extract(value, '$.pool'), json_extract(value, '$.status'), json_extract(value, '$.incarnation'), value
FROM json_each(CAST(? AS TEXT)) WHERE true
ON CONFLICT (agent_id) DO UPDATE SET pool = excluded.pool, status = excluded.status,
    incarnation = excluded.incarnation, doc = excluded.doc
"""
UPSERT_SESSIONS = """
INSERT INTO sessions (session_id, pool, status, owner, doc)
SELECT key, json_extract(value, '$.pool'), json_extract(value, '$.status'), json_extract(value, '$.owner'), value
FROM json_each(CAST(? AS TEXT)) WHERE true
ON CONFLICT (session_id) DO UPDATE SET pool = excluded.pool, status = excluded.status, owner = excluded.owner,
    doc = excluded.doc
"""
UPSERT_ROUTES = """
INSERT INTO routes (route_id, session_id, state, doc)
SELECT key, json_extract(value, '$.session_id'), json_extract(value, '$.state'), value
FROM json_each(CAST(? AS TEXT)) WHERE true
ON CONFLICT (route_id) DO UPDATE SET session_id = excluded.session_id, state = excluded.state, doc = excluded.doc
"""
UPSERT_POOLS = """
INSERT INTO pools (pool, breaker_open, doc)
SELECT key, json_extract(value, '$.breaker_open'), value
FROM json_each(CAST(? AS TEXT)) WHERE true
ON CONFLICT (pool) DO UPDATE SET breaker_open = excluded.breaker_open, doc = excluded.doc
"""
UPSERT_BEATS = """
INSERT INTO beats (agent_id, incarnation, doc)
SELECT key, json_extract(value, '$.incarnation'), value
FROM json_each(CAST(? AS TEXT)) WHERE true
ON CONFLICT (agent_id) DO UPDATE SET incarnation = excluded.incarnation, doc = excluded.doc
"""
# One JSON array of [stream, seq, stored_ns, entity_kind, entity_id, event_type, producer, kind, detail].
INSERT_ANOMALIES = """
INSERT OR IGNORE INTO anomalies (stream, seq, stored_ns, entity_kind, entity_id, event_type, producer, kind, detail)
SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'),
       json_extract(value, '$[3]'), json_extract(value, '$[4]'), json_extract(value, '$[5]'),
       json_extract(value, '$[6]'), json_extract(value, '$[7]'), json_extract(value, '$[8]')
FROM json_each(CAST(? AS TEXT))
"""
UPSERT_DEAD_LETTERS = """
INSERT INTO dead_letters (stream, reason, count, last_seq, last_subject, last_detail) VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (stream, reason) DO UPDATE SET count = excluded.count, last_seq = excluded.last_seq,
    last_subject = excluded.last_subject, last_detail = excluded.last_detail
"""
UPSERT_CHECKPOINT = """
INSERT INTO checkpoints (stream, seq, stored_ns, anomalies, updated_ns) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (stream) DO UPDATE SET seq = excluded.seq, stored_ns = excluded.stored_ns,
    anomalies = excluded.anomalies, updated_ns = excluded.updated_ns
"""

# Version rows (time travel): a JSON object {seq: state} per statement, and a JSON array of the sequences that
# created their entity (few). `value` is the document itself: nothing is extracted from it but the id and the
# columns derived as for the current rows.
_VERSIONS = """
INSERT OR REPLACE INTO {table} (seq, {key}, first, {columns}, doc)
SELECT CAST(key AS INTEGER), json_extract(value, '$.{key}'),
       CAST(key AS INTEGER) IN (SELECT value FROM json_each(CAST(:firsts AS TEXT))), {derived}, value
FROM json_each(CAST(:versions AS TEXT)) WHERE true
"""
VERSION_COLUMNS = {"agent": ("agent_id", ("pool", "status", "incarnation")),
                   "session": ("session_id", ("pool", "status", "owner", "checkpoint.seq")),
                   "route": ("route_id", ("session_id", "state")),
                   "pool": ("pool", ("breaker_open",))}
"""Kind -> (key, the paths in the document of the derived columns), as the current rows derive them (UPSERT_*);
a column is named by the path's first part (a session version's `checkpoint` is the sequence it names)."""
INSERT_VERSIONS = {
    kind: _VERSIONS.format(table=f"{kind}_versions", key=key, columns=", ".join(c.split(".")[0] for c in columns),
                           derived=", ".join(f"json_extract(value, '$.{c}')" for c in columns))
    for kind, (key, columns) in VERSION_COLUMNS.items()}
# One JSON array of [seq, session_id, checkpoint] per checkpoint the batch's session versions name. A checkpoint
# is the same whichever version names it (the event at its seq wrote it), so a second write of it changes nothing.
INSERT_CHECKPOINTS = """
INSERT OR IGNORE INTO session_checkpoints (seq, session_id, doc)
SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]')
FROM json_each(CAST(? AS TEXT))
"""
INSERT_VERSIONS["heartbeat"] = """
INSERT OR REPLACE INTO beat_versions (seq, agent_id, doc)
SELECT CAST(key AS INTEGER), json_extract(value, '$.agent_id'), value FROM json_each(CAST(:versions AS TEXT))
WHERE :firsts IS NOT NULL
"""
# Beat versions no indexed moment can need: superseded at or before :below (the first sequence of the kept beat
# history: `ProjectionSettings.beat_history`, or the stream's first kept one if later), so every LEDGER_HB
# sequence from :below on still finds each agent's beats. Earlier ones are replayed (projections.timetravel).
# A range of the rowid, then one seek each on (agent_id, seq): what is left below :below is one row per agent.
PRUNE_BEAT_VERSIONS = """
DELETE FROM beat_versions WHERE seq < :below AND EXISTS (
    SELECT 1 FROM beat_versions AS newer
    WHERE newer.agent_id = beat_versions.agent_id AND newer.seq > beat_versions.seq AND newer.seq <= :below)
"""
BEATS_FROM = "beats_from"
"""The meta key of the first LEDGER_HB sequence the beat versions answer exactly (0 or missing: every one)."""
NOTE_BEATS_FROM = f"""
INSERT INTO meta VALUES ('{BEATS_FROM}', :below)
ON CONFLICT (key) DO UPDATE SET value = max(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))
"""

CHUNK = 500
"""Documents per statement: enough to stay off the GIL, few enough that SQLite's JSON parse stays small."""


def chunks(picked: Mapping[str, Any], size: int = CHUNK) -> Iterator[bytes]:
    """{id: state} as JSON objects of at most `size` entities each."""
    items = list(picked.items())
    for start in range(0, len(items), size):
        yield _encode(dict(items[start:start + size]))


class CheckpointRef(msgspec.Struct, frozen=True):
    """What a session version's document holds in place of its checkpoint: the sequence of its row in
    session_checkpoints."""

    seq: int


def _versioned(kind: str, state: Any) -> Any:
    """The document a version row keeps: the state, a session's checkpoint replaced by a reference to its row.
    (`replace` does not check types: the struct with a CheckpointRef in it only lives to be encoded.)"""
    if kind == "session" and state.checkpoint is not None:
        return msgspec.structs.replace(state, checkpoint=CheckpointRef(state.checkpoint.seq))
    return state


def version_chunks(kind: str, versions: Sequence[Any], size: int = CHUNK) -> Iterator[dict[str, bytes]]:
    """Versions of one kind ((seq, first, state): `projections.versions`) as the parameters of `INSERT_VERSIONS`,
    `size` at a time."""
    for start in range(0, len(versions), size):
        part = versions[start:start + size]
        yield {"versions": _encode({seq: _versioned(kind, state) for seq, _, state in part}),
               "firsts": _encode([seq for seq, first, _ in part if first])}


def checkpoint_chunks(versions: Sequence[Any], size: int = CHUNK) -> Iterator[bytes]:
    """The checkpoints session versions name, each once, as the parameter of `INSERT_CHECKPOINTS`."""
    named = {s.checkpoint.seq: [s.checkpoint.seq, s.session_id, s.checkpoint]
             for _, _, s in versions if s.checkpoint is not None}
    rows_ = list(named.values())
    for start in range(0, len(rows_), size):
        yield _encode(rows_[start:start + size])


def ids(values: Iterable[str]) -> bytes:
    """A JSON array of ids, for `json_each` (one parameter however many)."""
    return _encode(list(values))


def anomalies(rows: list[tuple[Any, ...]]) -> bytes | None:
    return _encode(rows) if rows else None


def agent_of(doc: str) -> AgentState:
    return _agent(doc)


def session_of(doc: str) -> SessionState:
    return _session(doc)


def route_of(doc: str) -> RouteState:
    return _route(doc)


def pool_of(doc: str) -> PoolState:
    return _pool(doc)


def beat_of(doc: str) -> Beat:
    return _beat(doc)
