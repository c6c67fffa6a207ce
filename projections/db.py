"""The projection's SQLite file, through aiosqlite: open (creating or checking the schema), then write or read.

The writer's side is `writer.ProjectionWriter` (a batch - rows and checkpoints -
in one transaction), the read side `reads.ProjectionReads`; `ProjectionDB` is
the file opened for either: `open(path)` for the projector, `open(path,
readonly=True)` for queries.

WAL with synchronous=NORMAL: a killed process loses nothing that committed; a
power cut may lose the last commits, but rows and checkpoint go back together.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import aiosqlite

from .errors import DatabaseMissing, ProjectionError
from .reads import Checkpoint, DeadLetterCount, SnapshotRow
from .schema import PROJECTION_SCHEMA_VERSION, TABLES, statements
from .writer import Batch, ProjectionWriter

__all__ = ["Batch", "Checkpoint", "DeadLetterCount", "ProjectionDB", "SnapshotRow"]


class ProjectionDB(ProjectionWriter):
    """One aiosqlite connection to a projection file; `open` for the writer, `open(readonly=True)` for queries."""

    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        super().__init__(conn, path)
        self.reset = False
        """True when `open` found another schema version and dropped everything (a rebuild follows)."""

    @classmethod
    async def open(cls, path: str | Path, *, readonly: bool = False, cache_mb: int = 32) -> ProjectionDB:
        path = Path(path)
        if readonly and not path.exists():
            raise DatabaseMissing(f"no projection at {path}: run `ledger project` (or `ledger rebuild`) first")
        if not readonly:
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = await aiosqlite.connect(path, isolation_level=None)
        except (sqlite3.Error, OSError) as e:  # sqlite3.OperationalError: a directory, no permission, ...
            raise ProjectionError(f"cannot open the projection at {path}: {e}") from None
        db = cls(conn, path)
        try:
            await conn.execute_fetchall(f"PRAGMA cache_size = {-1024 * cache_mb}")
            if readonly:
                await conn.execute_fetchall("PRAGMA query_only = ON")
                await db._check_version()
            else:
                await conn.execute_fetchall("PRAGMA journal_mode = WAL")
                await conn.execute_fetchall("PRAGMA synchronous = NORMAL")
                await db._ensure_schema()
        except sqlite3.DatabaseError as e:
            await conn.close()
            raise ProjectionError(f"{path} is not a projection database: {e}") from None
        except BaseException:
            await conn.close()
            raise
        return db

    async def close(self) -> None:
        await self.conn.close()

    async def __aenter__(self) -> ProjectionDB:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _version(self) -> int | None:
        meta_table = "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        if not await self.conn.execute_fetchall(meta_table):
            return None
        value = await self.meta("schema_version")
        return int(value) if value is not None else None

    async def _check_version(self) -> None:
        version = await self._version()
        if version != PROJECTION_SCHEMA_VERSION:
            raise ProjectionError(
                f"{self.path} holds projection schema {version}; this version reads {PROJECTION_SCHEMA_VERSION}: "
                "start the projector (`ledger project`), it rebuilds the file")

    async def _ensure_schema(self) -> None:
        version = await self._version()
        if version == PROJECTION_SCHEMA_VERSION:
            return
        async with self.transaction():
            for table in TABLES:
                await self.conn.execute(f"DROP TABLE IF EXISTS {table}")
            for statement in statements():
                await self.conn.execute(statement)
            await self.conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(PROJECTION_SCHEMA_VERSION),))
        self.reset = version is not None
