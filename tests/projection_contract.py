"""What a projection recorder promises, written once (in the manner of eventsourcing's recorder test cases): a
subclass per storage says how to open one, for writing or for reading; everything else goes through the
projection's public API - `commit` a batch of folded changes, `load_state`, the checkpoints and the queries.

The promises: rows and their checkpoint are committed together or not at all, and a reader never sees one
without the other; a reopened file reads what was committed; whatever the batches, restarts and re-deliveries,
the incremental result equals a rebuild in one batch.
"""

from __future__ import annotations

import abc
import asyncio
import tempfile
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from histories import CLI, Builder, histories
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import events as ev
from ledger.subjects import HEARTBEAT_STREAM, LEDGER_STREAM
from projections.state import LedgerState
from projections.uncommitted import Uncommitted

if TYPE_CHECKING:
    from projections.db import ProjectionDB


def cut(data: st.DataObject, items: list[Any], label: str = "cuts") -> list[list[Any]]:
    """`items` in consecutive batches, cut where hypothesis says."""
    cuts = sorted(data.draw(st.lists(st.integers(0, len(items)), max_size=5), label=label))
    return [items[a:b] for a, b in pairwise([0, *cuts, len(items)])]


async def fold_and_commit(db: ProjectionDB, batches: Sequence[Sequence[Any]], state: LedgerState) -> LedgerState:
    """Fold each batch into `state` and commit it, as the projector does."""
    for items in batches:
        pending = Uncommitted()
        for item in items:
            pending.note(state.apply(item), item)
        await db.commit(pending.batch(state))
    return state


async def view(db: ProjectionDB) -> dict[str, Any]:
    """Everything the public API reads from a projection (checkpoints without their wall-clock commit time)."""
    loaded = await db.load_state()
    async with db.reading():
        return {
            "state": loaded,
            "checkpoints": [(c.stream, c.seq, c.stored_ns, c.anomalies) for c in await db.checkpoints()],
            "agents": await db.agent_states(), "sessions": await db.session_states(),
            "routes": await db.route_states(), "pools": await db.pool_states(), "beats": await db.beats(),
            "anomalies": await db.anomalies(), "dead_letters": await db.dead_letters(),
            "owned": await db.owned_counts(), "counts": await db.session_counts(),
        }


def sessions_created(count: int) -> list[Any]:
    """`count` sessions created, as stored: s0 at LEDGER #1, s1 at #2, ..."""
    b = Builder()
    return [b.add(ev.SessionCreated(producer=CLI, session_id=f"s{n}", pool="p")) for n in range(count)]


class ProjectionRecorderContract(abc.ABC):
    """The projection's write / read / checkpoint behaviours; collected only through subclasses."""

    @abc.abstractmethod
    async def open(self, path: Path, *, readonly: bool = False) -> ProjectionDB:
        """The recorder at `path`: the writer, or (readonly) a reader beside it."""

    def run(self, scenario: Any) -> None:
        """Run `scenario(directory)` in a directory of its own (hypothesis examples cannot share tmp_path)."""
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(scenario(Path(tmp)))

    @settings(max_examples=15, deadline=None)
    @given(items=histories(), data=st.data())
    def test_a_reopened_recorder_reads_what_was_committed(self, items: list[Any], data: st.DataObject):
        async def scenario(tmp: Path) -> None:
            async with await self.open(tmp / "p") as db:
                state = await fold_and_commit(db, cut(data, items), LedgerState())
            async with await self.open(tmp / "p", readonly=True) as db:
                seen = await view(db)
            assert seen["state"] == state
            assert seen["checkpoints"] == [(s, state.part(s).seq, state.part(s).stored_ns, state.part(s).anomalies)
                                           for s in (LEDGER_STREAM, HEARTBEAT_STREAM)]
            assert seen["sessions"] == [state.ledger.sessions[k] for k in sorted(state.ledger.sessions)]
            assert seen["agents"] == [state.ledger.agents[k] for k in sorted(state.ledger.agents)]

        self.run(scenario)

    def test_rows_and_their_checkpoint_are_committed_together_or_not_at_all(self):
        items = sessions_created(6)
        first, second = items[:3], items[3:]

        async def scenario(tmp: Path) -> None:
            async with await self.open(tmp / "p") as db:
                state = await fold_and_commit(db, [first], LedgerState())
                before = await view(db)
                pending = Uncommitted()
                for item in second:
                    pending.note(state.apply(item), item)
                batch = pending.batch(state)
                # The file refuses the batch's last part, after its rows and its checkpoint were written.
                with pytest.raises(Exception):  # noqa: B017 - whatever the storage raises for it
                    await db.commit(batch._replace(drop_snapshots=[(LEDGER_STREAM,)]))
                assert await view(db) == before  # neither the new rows nor the new checkpoint
            async with await self.open(tmp / "p", readonly=True) as db:
                assert await view(db) == before
            async with await self.open(tmp / "p") as db:
                await db.commit(batch)  # the same batch, whole: all of it at once
            async with await self.open(tmp / "p", readonly=True) as db:
                after = await view(db)
            assert after["state"] == state and [s.session_id for s in after["sessions"]] == [f"s{n}" for n in range(6)]
            assert after["checkpoints"][0][1] == 6

        self.run(scenario)

    def test_a_reader_never_sees_rows_without_their_checkpoint(self):
        items = sessions_created(200)
        batches = [items[n:n + 5] for n in range(0, len(items), 5)]
        created_at = {r.event.session_id: r.seq for r in items}

        async def scenario(tmp: Path) -> None:
            async with await self.open(tmp / "p") as writer:
                await fold_and_commit(writer, batches[:1], state := LedgerState())
                async with await self.open(tmp / "p", readonly=True) as reader:
                    done = asyncio.Event()
                    views: list[tuple[int, set[str]]] = []

                    async def read() -> None:
                        while not done.is_set() or not views:
                            async with reader.reading():
                                checkpoint = (await reader.checkpoints())[0].seq
                                ids = {s.session_id for s in await reader.session_states()}
                            views.append((checkpoint, ids))
                            await asyncio.sleep(0)

                    reading = asyncio.create_task(read())
                    for batch in batches[1:]:
                        await fold_and_commit(writer, [batch], state)
                        await asyncio.sleep(0)  # let the reader in between commits too
                    done.set()
                    await reading
                    async with reader.reading():  # and once after the last commit
                        views.append(((await reader.checkpoints())[0].seq,
                                      {s.session_id for s in await reader.session_states()}))
            for checkpoint, ids in views:
                assert ids == {sid for sid, seq in created_at.items() if seq <= checkpoint}, checkpoint
            assert len({c for c, _ in views}) > 1, "the reader saw only one commit: it tested nothing"

        self.run(scenario)

    @settings(max_examples=15, deadline=None)
    @given(items=histories(), data=st.data())
    def test_a_rebuild_equals_the_incremental_result(self, items: list[Any], data: st.DataObject):
        async def scenario(tmp: Path) -> None:
            async with await self.open(tmp / "rebuilt") as db:
                await fold_and_commit(db, [items], LedgerState())
                rebuilt = await view(db)
            position = 0  # everything before it is committed
            while position < len(items):
                # One writer's lifetime: load what committed, resume (a consumer may re-deliver older items),
                # commit a few batches, stop - whatever it folded after its last commit is lost with it.
                async with await self.open(tmp / "incremental") as db:
                    state = await db.load_state()
                    resume = data.draw(st.integers(0, position), label="re-delivered from")
                    committed = data.draw(st.integers(position + 1, len(items)), label="last commit of this life")
                    await fold_and_commit(db, cut(data, items[resume:committed]), state)
                position = committed
            async with await self.open(tmp / "incremental", readonly=True) as db:
                assert await view(db) == rebuilt

        self.run(scenario)
