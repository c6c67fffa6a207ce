"""The projection-recorder contract on the SQLite projection file."""

from __future__ import annotations

from pathlib import Path

from projection_contract import ProjectionRecorderContract

from projections.db import ProjectionDB


class TestSQLiteProjectionFile(ProjectionRecorderContract):
    async def open(self, path: Path, *, readonly: bool = False) -> ProjectionDB:
        return await ProjectionDB.open(path.with_suffix(".sqlite3"), readonly=readonly)
