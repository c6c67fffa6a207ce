"""Export a ledger's stored messages to an incident file, and import one into a fresh server.

    async with EventStore.connect(settings) as store:
        await export_log(store, out.write, since=..., until=...)       # `ledger export > incident.ledger`
    async with EventStore.connect(fresh, check=False) as store:
        header, messages = incident.read(incident.lines_of(f))
        await import_log(store, header, messages)                      # `ledger import incident.ledger`

Both stream: a batch of messages at a time, never the whole log in memory.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from . import __version__, imported, incident, subjects
from .codec import to_ns
from .errors import InvalidInput, LedgerError, StreamMissing
from .incident import End, Header, Message, StreamRange
from .store import EventStore

STREAMS = (subjects.LEDGER_STREAM, subjects.HEARTBEAT_STREAM, subjects.DLQ_STREAM)
"""What an export holds: the lifecycle events, the heartbeats, and the dead letters when the stream exists."""
BATCH = 1000
PROGRESS_EVERY = 2.0

Say = Callable[[str], None]


def _progress(say: Say | None, verb: str) -> Callable[[str, int, int], None]:
    shown = [time.monotonic()]

    def report(stream: str, at: int, last: int) -> None:
        if say is None or time.monotonic() - shown[0] < PROGRESS_EVERY:
            return
        shown[0] = time.monotonic()
        say(f"{verb} {stream}: #{at:,} of #{last:,}")

    return report


async def window(store: EventStore, stream: str, since: datetime | None, until: datetime | None) -> tuple[int, int]:
    """The sequences of `stream` stored in since..until (its whole range without them): (first, last)."""
    facts = await store.stream_facts(stream)
    first = max(facts.first_seq, 1) if facts.messages else facts.last_seq + 1
    last = facts.last_seq
    if facts.messages and since is not None:
        at, _ = await store.last_stored_by(stream, to_ns(since) - 1, first, last)
        first = at + 1
    if facts.messages and until is not None:
        # datetimes stop at microseconds, stored times do not: `until` covers its whole microsecond (as in a replay).
        last, _ = await store.last_stored_by(stream, to_ns(until) + 999, first, last)
    return first, max(last, first - 1)


async def export_log(store: EventStore, write: Callable[[bytes], object], *, since: datetime | None = None,
                     until: datetime | None = None, source: str = "", say: Say | None = None,
                     now: datetime | None = None, on_header: Callable[[Header], object] | None = None) -> End:
    """Write the stored messages of every ledger stream (in since..until) as an incident file; the end line's
    counts are returned."""
    if since is not None and until is not None and until < since:
        raise InvalidInput(f"the window ends ({until.isoformat()}) before it starts ({since.isoformat()})")
    ranges = []
    for stream in STREAMS:
        try:
            first, last = await window(store, stream, since, until)
        except StreamMissing:
            if stream == subjects.DLQ_STREAM:
                continue  # no dead letter was ever kept
            raise
        ranges.append(StreamRange(stream, first, last, await store.stream_config(stream)))
    header = Header(format=incident.FORMAT, version=incident.VERSION, ledger_version=__version__,
                    exported_at=(now or datetime.now(UTC)).isoformat(), streams=ranges,
                    since=since.isoformat() if since else None, until=until.isoformat() if until else None,
                    source=source)
    if on_header is not None:
        on_header(header)
    write(incident.encode(header))
    counts = {}
    progress = _progress(say, "exporting")
    for r in ranges:
        counts[r.name] = 0
        start = r.first_seq
        while start <= r.last_seq:
            batch, pending = await store.raw_batch(r.name, start, batch=BATCH, min_last_seq=r.last_seq)
            for m in batch:
                if m.seq > r.last_seq:
                    break
                write(incident.encode(Message(r.name, m.seq, m.subject, m.stored_ns, m.headers, m.data)))
                counts[r.name] += 1
            if not batch or pending == 0:
                break
            start = batch[-1].seq + 1
            progress(r.name, start - 1, r.last_seq)
    end = End(counts)
    write(incident.encode(end))
    return end


class _Peek:
    """An iterator one can look one item ahead in."""

    def __init__(self, it: Iterator[Message]) -> None:
        self._it = it
        self._next: Message | None = None

    def peek(self) -> Message | None:
        if self._next is None:
            self._next = next(self._it, None)
        return self._next

    def take_while_stream(self, stream: str) -> Iterator[Message]:
        while (m := self.peek()) is not None and m.stream == stream:
            self._next = None
            yield m


def mark_of(header: Header) -> str:
    """What an imported stream's `ledger.imported` metadata says: where and when the log was exported."""
    return f"exported {header.exported_at}" + (f" from {header.source}" if header.source else "")


async def import_log(store: EventStore, header: Header, messages: Iterator[Message], *,
                     say: Say | None = None) -> dict[str, int]:
    """Load the file's streams into the server `store` is connected to, which must have none of them yet;
    returns how many messages each got. A failure half-way removes what was loaded."""
    for r in header.streams:
        try:
            await store.stream_facts(r.name)
        except StreamMissing:
            continue
        raise InvalidInput(f"the server already has a stream {r.name}: import into a fresh server "
                           "(a new --data-dir)")
    loader = store.loader()
    made: list[str] = []
    loaded = {}
    source = _Peek(messages)
    progress = _progress(say, "importing")
    try:
        for r in header.streams:
            made.append(r.name)
            loaded[r.name] = await loader.load(r.name, r.config, r.first_seq, r.last_seq,
                                               source.take_while_stream(r.name), mark_of(header), progress)
        if source.peek() is not None:  # the file's reader checks the order: nothing is left over
            raise InvalidInput("the file holds messages after its last stream")
    except BaseException:
        for name in made:
            with contextlib.suppress(LedgerError):
                await loader.remove(name)
        raise
    return loaded


def read_file(path: Path) -> Header:
    """The header of the incident file at `path` (UnreadableIncident, OSError: one line each)."""
    with path.open("rb") as f:
        return incident.read_header(f.readline(incident.MAX_LINE + 1), str(path))


async def load_file(store: EventStore, path: Path, *, say: Say | None = None) -> dict[str, int] | None:
    """Import the incident file at `path` into the server `store` is connected to; None when that server holds
    this very export already (a second `ledger up --from` on the same data directory reuses it). A server
    holding anything else is refused."""
    header = read_file(path)
    mark = mark_of(header)
    held = {}
    for r in header.streams or [StreamRange(subjects.LEDGER_STREAM, 1, 0)]:
        with contextlib.suppress(StreamMissing):
            config = await store.stream_config(r.name)
            held[r.name] = (config.get("metadata") or {}, bool(config.get("sealed")))
    if held:
        copies = {name: metadata.get(imported.MARK) if sealed else None for name, (metadata, sealed) in held.items()}
        if len(held) == len(header.streams) and all(m == mark for m in copies.values()):
            return None  # every stream of the file, loaded to its end (the mark comes last, with the seal)
        cut = [name for name, (metadata, _) in held.items() if imported.LOADING in metadata]
        if cut or mark in copies.values():
            raise InvalidInput(f"the server holds this export half-loaded ({', '.join(cut) or 'streams missing'}: "
                               f"an import was interrupted): import {path} into a fresh server (a new --data-dir)")
        what = next((f"a copy {m}" for m in copies.values() if m), "a ledger of its own")
        raise InvalidInput(f"the server already holds {what}: import {path} into a fresh server (a new --data-dir)")
    with path.open("rb") as f:
        _, messages = incident.read(incident.lines_of(f), str(path))
        return await import_log(store, header, messages, say=say)
