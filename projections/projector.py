"""The projector: LEDGER and LEDGER_HB folded into the SQLite projection, catch-up then live.

    async with Projector(store, ProjectionSettings(db="proj.sqlite3")) as projector:
        await projector.caught_up.wait()
        ...                                   # it follows both streams until the block ends

Two readers (one ordered consumer per stream, via `EventStore.replay`) fold
each batch into the in-memory `LedgerState` and mark the entities it touched
dirty. One writer commits the dirty rows, new anomalies, dead-letter counters,
both checkpoints and any due snapshot in one SQLite transaction, while the
readers go on folding the next batch. Batches therefore grow by themselves
when the writer is the bottleneck. Restarting loads the committed state and
resumes each stream from its checkpoint + 1: nothing is applied twice or
skipped, wherever the process was killed.

Given a `Follower` (`ledger up`: one fold of the log per process), the projector
reads nothing itself: it resumes the follower from the committed state, and
hears each batch the follower applied to that one state instead. The state in
memory may then run ahead of the file, as it does while the writer commits;
a checkpoint still names exactly the state whose rows it commits with.

While catching up the writer gathers large batches (`commit_every`, at most
`commit_interval` apart): the population is fixed, so a large batch writes
each busy entity once where small ones would write it many times. At the live
edge (the consumer has nothing pending) it commits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from ledger import cancellation
from ledger.codec import Item, Unreadable
from ledger.errors import StoreError
from ledger.store import EventStore, open_connection
from ledger.subjects import HEARTBEAT_STREAM, LEDGER_STREAM

from . import deadletters, snapshots
from .db import Batch, ProjectionDB
from .errors import NotCaughtUp, ProjectionError, StreamChanged
from .filelock import FileLock
from .follow import Follower
from .settings import ProjectionSettings
from .state import STREAMS, Change, HeartbeatState, LedgerState, LifecycleState
from .stored import last_stored_by
from .uncommitted import Uncommitted

log = logging.getLogger(__name__)

FILTERS = {LEDGER_STREAM: "ledger.>", HEARTBEAT_STREAM: "ledger.hb.>"}


class Progress(NamedTuple):
    """Reported after every commit."""

    committed: dict[str, int]
    targets: dict[str, int]
    events: int
    """Items folded since this projector started."""
    elapsed: float


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    for e in group.exceptions:
        if isinstance(e, BaseExceptionGroup):
            return _first_error(e)
        if not isinstance(e, asyncio.CancelledError):
            return e
    return group


class Projector:
    """Keeps the SQLite projection in step with both streams; one per file, `async with` or `open` + `run`."""

    def __init__(self, store: EventStore, settings: ProjectionSettings | None = None, *,
                 name: str = "projector", on_progress: Callable[[Progress], None] | None = None,
                 follower: Follower | None = None) -> None:
        if follower is not None and not follower.complete:
            raise ProjectionError("a projection needs a follower of every item of both streams")
        self.store = store
        self.settings = settings or ProjectionSettings()
        self.name = name
        self.on_progress = on_progress
        self.path = Path(self.settings.db)
        self.db: ProjectionDB | None = None
        self.follower = follower
        """Where the folded batches come from; None: the projector reads both streams itself."""
        self.state = follower.state if follower is not None else LedgerState()
        self.committed = {s: 0 for s in STREAMS}
        self.targets = {s: 0 for s in STREAMS}
        self.caught_up = asyncio.Event()
        """Set once both streams are committed up to where they ended when the projector started."""
        self.events = 0
        self.commits = 0
        self._lock = FileLock(self.path)
        self._pending = Uncommitted()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._closing = False
        self._live_edge = False
        self._failed = False
        self._commit_cond = asyncio.Condition()
        self._plan = snapshots.Plan(self.settings.snapshot_every, self.settings.snapshot_recent)
        self._task: asyncio.Task[None] | None = None
        self._started = 0.0
        self._readers: dict[str, EventStore] = {}
        if follower is not None:
            follower.listen(self._heard, recall=False)  # rows: each item once

    # --- lifecycle ------------------------------------------------------------------

    async def open(self) -> None:
        """Lock and open the file (rebuilding it on a schema change), load the committed state, check the streams."""
        self._lock.acquire()
        try:
            self.db = await ProjectionDB.open(self.path, cache_mb=self.settings.cache_mb)
            if self.db.reset:
                log.warning("projection schema changed: %s is rebuilt from zero", self.path)
            self.state = await self.db.load_state()
            self.state.settle(self.settings.retain)  # the rows hold retired entities and whole beats: let them go
            if self.follower is not None:
                self.follower.resume(self.state)  # the one state of the process starts where the file is
            self.committed = {s: self.state.position(s) for s in STREAMS}
            self._plan = snapshots.Plan(self.settings.snapshot_every, self.settings.snapshot_recent,
                                        {s: await self.db.snapshot_seqs(s) for s in STREAMS})
            await self._check_streams()
            if self.follower is not None:
                return
            # Each stream is read on a connection of its own, so a burst on one never queues behind the other.
            nc = await open_connection(self.store.settings, name=f"{self.name}-{HEARTBEAT_STREAM}")
            self._readers = {LEDGER_STREAM: self.store,
                             HEARTBEAT_STREAM: EventStore(nc, self.store.settings, owns_connection=True)}
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        extra = self._readers.get(HEARTBEAT_STREAM)
        self._readers = {}
        if extra is not None:
            await extra.close()
        if self.db is not None:
            await self.db.close()
            self.db = None
        self._lock.release()

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The running `run()` when used as `async with`; done when it stopped or failed."""
        return self._task

    async def __aenter__(self) -> Projector:
        await self.open()
        self._task = asyncio.create_task(self.run(), name=f"{self.name}-run")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop following, commit what was folded, close the file; re-raises the run's error if it failed."""
        task, self._task = self._task, None
        try:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        finally:
            await self.close()

    async def _check_streams(self) -> None:
        assert self.db is not None
        for stream in STREAMS:
            facts = await self.store.stream_facts(stream)
            known = await self.db.meta(f"created:{stream}")
            position = self.state.position(stream)
            if (known is not None and known != facts.created) or position > facts.last_seq:
                raise StreamChanged(
                    f"{self.path} was built from another {stream} stream (it is at #{position}, the server's ends at "
                    f"#{facts.last_seq}): run `ledger rebuild` or use another --db")
            if known is None:
                await self.db.set_meta(f"created:{stream}", facts.created)
            # Heartbeats expire: when none is left there is nothing to catch up with.
            self.targets[stream] = facts.last_seq if facts.messages else position

    # --- running --------------------------------------------------------------------

    async def run(self) -> None:
        """Catch up with both streams, then follow them until cancelled."""
        await self._run(follow=True)

    async def catch_up(self) -> None:
        """Fold both streams up to where they end now, commit, and return (rebuilds, benchmarks)."""
        if self.follower is not None:
            raise ProjectionError("a projector fed by a follower can only follow (use one without to catch up)")
        await self._run(follow=False)

    async def _run(self, follow: bool) -> None:
        if self.db is None:
            raise ProjectionError("the projector is not open")
        self._started = time.monotonic()
        self._closing = False
        self._note_caught_up()
        try:
            async with asyncio.TaskGroup() as tg:
                writer = tg.create_task(self._write(), name=f"{self.name}-writer")
                if self.follower is None:
                    readers = [tg.create_task(self._read(s, follow), name=f"{self.name}-{s}") for s in STREAMS]
                    await asyncio.wait(readers)
                    self._closing = True
                    self._wake.set()
                await writer
        except BaseExceptionGroup as group:
            self._failed = True
            raise _first_error(group) from None
        except asyncio.CancelledError:
            if not self._failed and self._pending.events:
                await self._flush()  # what was folded before the stop still lands, with its checkpoint
            raise

    async def _read(self, stream: str, follow: bool) -> None:
        part: LifecycleState | HeartbeatState = self.state.part(stream)
        apply = part.apply
        replay = self._readers[stream].replay(FILTERS[stream], stream=stream, start_seq=part.seq + 1,
                                              follow=follow, batch=self.settings.batch)
        async for items in replay:
            note = self._pending.note
            for item in items:
                note(apply(item), item)
            self.events += len(items)
            if replay.remaining == 0:
                self._live_edge = True  # the end of the stream is here: commit now rather than gather more
            self._wake.set()
            if self._pending.events >= self.settings.max_pending:
                self._room.clear()
                await self._room.wait()

    def _heard(self, stream: str, items: list[Item], changes: list[Change]) -> None:
        """The follower applied a batch to the state: note what to commit, as `_read` does for its own.

        The follower never waits for the file (`max_pending` holds back only the projector's own readers):
        until the next commit, pending keeps dirty ids (at most one per entity), new anomalies and dead letters.
        """
        note = self._pending.note
        for change, item in zip(changes, items, strict=True):
            note(change, item)
        self.events += len(items)
        assert self.follower is not None
        if self.follower.behind.get(stream) == 0:
            self._live_edge = True
        self._wake.set()

    async def _write(self) -> None:
        """Commit what the readers folded: promptly at the live edge, in large batches while catching up.

        A large batch writes each busy entity once instead of once per small batch, so catching up
        costs SQLite far fewer rows per event; `commit_interval` bounds how much a crash would redo.
        """
        while True:
            await self._wake.wait()
            self._wake.clear()
            p = self._pending
            if (p.events and not (self._closing or self._live_edge) and p.events < self.settings.commit_every
                    and time.monotonic() - p.since < self.settings.commit_interval):
                with contextlib.suppress(TimeoutError):
                    await cancellation.wait_for(self._wake.wait(), self.settings.commit_interval)
                self._wake.set()  # look again
                continue
            self._live_edge = False
            if self._pending.events:
                await self._flush()
            if self._closing and not self._pending.events:
                return

    async def _flush(self) -> None:
        p, self._pending = self._pending, Uncommitted()
        self._room.set()
        batch = p.batch(self.state, self._plan)
        positions = {s: self.state.position(s) for s in STREAMS}
        # Shielded: a stop during the commit waits for it, so the next commit never meets a half-open transaction.
        inflight = asyncio.ensure_future(self._publish_and_commit(p.dead, batch))
        try:
            await asyncio.shield(inflight)
        except asyncio.CancelledError:
            await inflight
            raise
        finally:
            if inflight.done() and not inflight.cancelled() and inflight.exception() is not None:
                self._failed = True
        self.committed = positions
        self.commits += 1
        self._note_caught_up()
        async with self._commit_cond:
            self._commit_cond.notify_all()
        if self.on_progress is not None:
            self.on_progress(Progress(dict(positions), dict(self.targets), self.events,
                                      time.monotonic() - self._started))

    async def _publish_and_commit(self, dead: list[Unreadable], batch: Batch) -> None:
        for item in dead:  # before the commit that moves the checkpoint past them
            await deadletters.publish(self.store, item, consumer=self.name)
        for stream, seq, stored_ns, *_ in batch.snapshots:  # now and then: beat versions past the kept history go
            if stream == HEARTBEAT_STREAM:
                with contextlib.suppress(StoreError):  # no answer now: a later snapshot prunes them
                    batch = batch._replace(prune_beats_below=await self._beats_kept_from(seq, stored_ns))
        assert self.db is not None
        await self.db.commit(batch)

    async def _beats_kept_from(self, seq: int, stored_ns: int) -> int:
        """The first LEDGER_HB sequence whose beat versions stay: the last beat stored `beat_history` seconds
        before the newest committed one (#`seq`, stored at `stored_ns`), or the stream's first kept one if later.
        Pruned at heartbeat snapshots, not at every commit: the DELETE reads every row below the boundary (one per
        agent once pruned), and a view of an older moment replays from a heartbeat snapshot anyway."""
        facts = await self.store.stream_facts(HEARTBEAT_STREAM)
        boundary_ns = stored_ns - int(self.settings.beat_history * 1e9)
        at, _ = await last_stored_by(self.store, HEARTBEAT_STREAM, boundary_ns, facts.first_seq,
                                     min(seq, facts.last_seq))
        return max(facts.first_seq, at)

    def _note_caught_up(self) -> None:
        if not self.caught_up.is_set() and all(self.committed[s] >= self.targets[s] for s in STREAMS):
            self.caught_up.set()

    async def ready(self, timeout: float | None = None) -> None:
        """Wait until caught up; raises the run's error instead if it stopped first."""
        if self._task is None:
            raise ProjectionError("the projector is not running (use `async with Projector(...)`)")
        waiter = asyncio.ensure_future(self.caught_up.wait())
        try:
            done, _ = await asyncio.wait({waiter, self._task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if self._task.done():
            self._task.result()
        if not self.caught_up.is_set():
            raise NotCaughtUp(f"the projector did not catch up within {timeout} s")

    async def wait_for(self, seq: int, stream: str = LEDGER_STREAM, timeout: float = 10.0) -> None:
        """Wait until `stream` is committed up to `seq` (read-your-writes for tests and tools)."""
        deadline = time.monotonic() + timeout
        async with self._commit_cond:
            while self.committed[stream] < seq:
                if self._task is not None and self._task.done():
                    self._task.result()
                    raise ProjectionError("the projector stopped")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NotCaughtUp(f"{stream} not projected up to #{seq} within {timeout} s "
                                       f"(at #{self.committed[stream]})")
                with contextlib.suppress(TimeoutError):
                    await cancellation.wait_for(self._commit_cond.wait(), min(left, 0.5))
