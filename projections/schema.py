"""The projection's SQLite schema and its version.

Each entity is one row: its whole state as a JSON document (`doc`), so loading
it back gives exactly the folded state and ad-hoc SQL can use json_extract, and
a few columns derived from it to filter on. A projection file of another
schema version is dropped and rebuilt from zero: it is a cache of the log,
never the truth.
"""

from __future__ import annotations

PROJECTION_SCHEMA_VERSION = 4
"""Bump whenever the tables, the row encoding or the meaning of a fold change (2: the *_versions tables;
3: a session's document carries its newest checkpoint, `session.checkpointed`; 4: a session version names its
checkpoint by sequence, the checkpoint itself is in `session_checkpoints`, once; a snapshot notes where the
lifecycle fold stood, as the heartbeat fold lets go of retired agents' beats)."""

TABLES = ("meta", "checkpoints", "agents", "beats", "sessions", "routes", "pools", "anomalies", "dead_letters",
          "snapshots", "agent_versions", "session_versions", "session_checkpoints", "route_versions", "pool_versions",
          "beat_versions")

DDL = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

-- One row per stream: the last sequence whose effects are in this file. It is
-- written in the same transaction as the rows, so a crash never splits them.
CREATE TABLE checkpoints (
    stream     TEXT PRIMARY KEY,
    seq        INTEGER NOT NULL,
    stored_ns  INTEGER NOT NULL,
    anomalies  INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE agents (
    agent_id    TEXT PRIMARY KEY,
    pool        TEXT NOT NULL,
    status      TEXT NOT NULL,
    incarnation INTEGER NOT NULL,
    doc         TEXT NOT NULL
);
CREATE INDEX agents_by_pool ON agents (pool);

-- The newest beat per agent, of any incarnation: the join happens at query time.
CREATE TABLE beats (
    agent_id    TEXT PRIMARY KEY,
    incarnation INTEGER NOT NULL,
    doc         TEXT NOT NULL
);

CREATE TABLE sessions (
    session_id TEXT PRIMARY KEY,
    pool       TEXT NOT NULL,
    status     TEXT NOT NULL,
    owner      TEXT,
    doc        TEXT NOT NULL
);
CREATE INDEX sessions_by_pool ON sessions (pool, status);
CREATE INDEX sessions_by_owner ON sessions (owner) WHERE owner IS NOT NULL;

CREATE TABLE routes (
    route_id   TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    state      TEXT NOT NULL,
    doc        TEXT NOT NULL
);
CREATE INDEX routes_by_session ON routes (session_id);

-- Pools with a breaker history (a pool that never tripped has no row: its breaker is closed).
CREATE TABLE pools (
    pool         TEXT PRIMARY KEY,
    breaker_open INTEGER NOT NULL,
    doc          TEXT NOT NULL
);

CREATE TABLE anomalies (
    stream      TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    stored_ns   INTEGER NOT NULL,
    entity_kind TEXT NOT NULL,
    entity_id   TEXT NOT NULL,
    event_type  TEXT NOT NULL,
    producer    TEXT NOT NULL,
    kind        TEXT NOT NULL,
    detail      TEXT NOT NULL,
    PRIMARY KEY (stream, seq)
);
CREATE INDEX anomalies_by_entity ON anomalies (entity_kind, entity_id);

CREATE TABLE dead_letters (
    stream       TEXT NOT NULL,
    reason       TEXT NOT NULL,
    count        INTEGER NOT NULL,
    last_seq     INTEGER NOT NULL,
    last_subject TEXT NOT NULL,
    last_detail  TEXT NOT NULL,
    PRIMARY KEY (stream, reason)
) WITHOUT ROWID;

-- Serialised fold state of one stream at `seq` (zlib-compressed msgpack), so a
-- view "as of" the past replays only from the nearest snapshot. `ledger_seq` and
-- `ledger_ns`: where the lifecycle fold stood when it was taken (a heartbeat
-- snapshot lacks the beats of agents retired by then: a moment before that
-- starts from an older one).
CREATE TABLE snapshots (
    stream     TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    stored_ns  INTEGER NOT NULL,
    created_ns INTEGER NOT NULL,
    data       BLOB NOT NULL,
    ledger_seq INTEGER NOT NULL,
    ledger_ns  INTEGER NOT NULL,
    PRIMARY KEY (stream, seq)
);
"""


VERSIONS_DDL = """
-- Time travel as an index: every state each entity ever had, one row per stream sequence that made it (each
-- LEDGER sequence changes at most one entity, each LEDGER_HB one agent's beats, so the sequence is the rowid).
-- "As of #N" is, per entity, its newest version at or before N: one seek on (id, seq). `first` marks the
-- version that created the entity, so the entities that existed at N are a range of a small partial index.
-- The columns derived from `doc` are those of the current rows, so a view filters and counts the past alike.
CREATE TABLE agent_versions (
    seq         INTEGER PRIMARY KEY,
    agent_id    TEXT NOT NULL,
    first       INTEGER NOT NULL,
    pool        TEXT NOT NULL,
    status      TEXT NOT NULL,
    incarnation INTEGER NOT NULL,
    doc         TEXT NOT NULL
);
CREATE INDEX agent_versions_by_id ON agent_versions (agent_id, seq);
CREATE INDEX agent_versions_first ON agent_versions (seq) WHERE first = 1;

-- A session version's document holds its checkpoint as {"seq": N} only, and `checkpoint` is that N: the
-- checkpoint itself (up to 16 KiB of data, base64 in JSON) is one row of session_checkpoints, keyed by the
-- sequence of the event that wrote it. Copied into every version, it made an owner's small writes after one
-- large checkpoint cost the checkpoint's size each. Reads as of the past put it back (projections.reads).
CREATE TABLE session_versions (
    seq        INTEGER PRIMARY KEY,
    session_id TEXT NOT NULL,
    first      INTEGER NOT NULL,
    pool       TEXT NOT NULL,
    status     TEXT NOT NULL,
    owner      TEXT,
    checkpoint INTEGER,
    doc        TEXT NOT NULL
);
CREATE INDEX session_versions_by_id ON session_versions (session_id, seq);
CREATE INDEX session_versions_first ON session_versions (seq) WHERE first = 1;

CREATE TABLE session_checkpoints (
    seq        INTEGER PRIMARY KEY,
    session_id TEXT NOT NULL,
    doc        TEXT NOT NULL
);

CREATE TABLE route_versions (
    seq        INTEGER PRIMARY KEY,
    route_id   TEXT NOT NULL,
    first      INTEGER NOT NULL,
    session_id TEXT NOT NULL,
    state      TEXT NOT NULL,
    doc        TEXT NOT NULL
);
CREATE INDEX route_versions_by_id ON route_versions (route_id, seq);
CREATE INDEX route_versions_first ON route_versions (seq) WHERE first = 1;

CREATE TABLE pool_versions (
    seq          INTEGER PRIMARY KEY,
    pool         TEXT NOT NULL,
    first        INTEGER NOT NULL,
    breaker_open INTEGER NOT NULL,
    doc          TEXT NOT NULL
);
CREATE INDEX pool_versions_by_id ON pool_versions (pool, seq);
CREATE INDEX pool_versions_first ON pool_versions (seq) WHERE first = 1;

-- Each agent's kept beats after each LEDGER_HB sequence that touched them. Versions older than the kept beat
-- history (ProjectionSettings.beat_history) are pruned down to the one each agent had at its boundary, noted in
-- meta as beats_from (older moments replay from the heartbeat snapshots).
CREATE TABLE beat_versions (
    seq      INTEGER PRIMARY KEY,
    agent_id TEXT NOT NULL,
    doc      TEXT NOT NULL
);
CREATE INDEX beat_versions_by_id ON beat_versions (agent_id, seq);
"""


def statements() -> list[str]:
    """The DDL one statement at a time (no comment in it contains a semicolon)."""
    return [s.strip() for s in (DDL + VERSIONS_DDL).split(";") if s.strip()]
