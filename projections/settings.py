"""ProjectionSettings: one frozen object, from defaults, the environment and flags (in that order)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import msgspec

from ledger.errors import ConfigError
from ledger.settings import settings_from_env

from .state import DEFAULT_RETAIN

DEFAULT_DB = os.path.join("ledger-data", "projection.sqlite3")
ENV_PREFIX = "LEDGER_PROJECTION_"
DB_ENV = "LEDGER_DB"


class ProjectionSettings(msgspec.Struct, frozen=True, kw_only=True):
    """How the projector reads, batches, checkpoints and snapshots.

    Every field can be set as LEDGER_PROJECTION_<FIELD>; the file also as LEDGER_DB.
    """

    db: str = DEFAULT_DB
    """The SQLite file of the projection."""
    batch: int = 4000
    """Messages handed over by the ordered consumer at a time."""
    commit_every: int = 100_000
    """While catching up, commit once this many events are folded (at the live edge: at once). A fixed population
    rewrites most of its rows at every commit, so fewer commits cost less (half of `max_pending`: the readers
    fold on while one commits)."""
    commit_interval: float = 2.0
    """While catching up, commit at least this often (seconds): what a crash would fold again, and how often
    catch-up progress is reported."""
    max_pending: int = 200_000
    """Folded but uncommitted events before the readers wait for the writer (bounds memory)."""
    snapshot_every: int = 25_000
    """Take a snapshot of a stream's fold every this many sequences (0: never)."""
    snapshot_recent: int = 8
    """Snapshots kept at full density; older ones thin out (projections.snapshots)."""
    cache_mb: int = 8
    """SQLite page cache of the projector's connection (the OS caches the file too; this bounds our RSS)."""
    retain: float = DEFAULT_RETAIN
    """Seconds of log time a terminated session or route, or a gone, dead or fenced agent, stays in the in-memory
    fold (and its snapshots) before it is retired; its row stays in the file (projections.state). Every process
    folding the same log should use the same value: it decides which late events find their entity."""
    beat_history: float = 3600.0
    """Seconds of heartbeat history (server time, before the newest committed beat) kept as version rows in the
    file, so views of those moments are indexed reads. Older beat versions are pruned at each heartbeat snapshot,
    down to each agent's beat at the boundary; a view of an older moment replays the heartbeat stream from the
    nearest heartbeat snapshot instead (slower, same answer). A row per beat: this bounds the file."""

    def __post_init__(self) -> None:
        if self.commit_interval <= 0:
            raise ConfigError(f"commit_interval must be positive, got {self.commit_interval}")
        for name in ("batch", "commit_every", "max_pending", "snapshot_recent", "cache_mb"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.retain >= 0 or self.retain == float("inf"):
            raise ConfigError(f"retain must be 0 or more seconds, got {self.retain}")
        if not self.beat_history >= 0 or self.beat_history == float("inf"):
            raise ConfigError(f"beat_history must be 0 or more seconds, got {self.beat_history}")
        if self.snapshot_every < 0:
            raise ConfigError(f"snapshot_every must be 0 (never) or positive, got {self.snapshot_every}")
        if not self.db:
            raise ConfigError("the projection's database path is empty")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> ProjectionSettings:
        """Defaults, then LEDGER_DB and LEDGER_PROJECTION_* variables, then `overrides` (None ignored)."""
        env = os.environ if env is None else env
        db = {"db": env[DB_ENV]} if env.get(DB_ENV) else {}
        return settings_from_env(cls, ENV_PREFIX, env, overrides, extra=db, what="projection setting")

    def replace(self, **changes: Any) -> ProjectionSettings:
        return msgspec.structs.replace(self, **changes)
