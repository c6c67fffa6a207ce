"""Loading an exported log into a fresh server's streams (`ledger import`), so every stream sequence is the
original's and every reader sees the original stored times (`ledger.imported`).

How, for each stream of the file:

1. It is created from the original's configuration (`copy_config`: one replica, no deletion guard yet, no
   limits that could push a message out while loading) with `first_seq` at the file's first sequence.
2. Each message is published with its original headers (escaped where the server would act on them) and its
   stored time in `Ledger-Stored-Ns`, guarded by `Nats-Expected-Last-Sequence` so that it lands exactly at its
   own sequence or not at all. A sequence the file lacks (a gap: deleted, aged out) gets a filler on a subject of
   the import's own, and all fillers are purged at the end: a purge keeps the sequences, so the gap stays a gap.
   Publishes go in chunks; if one is refused (a repeated `Nats-Msg-Id` taken for a duplicate, whose id is then
   escaped too), the chunk goes again from there: the guard makes a misplaced message impossible.
3. The stream gets its original configuration back, marked `ledger.imported` and sealed: the server refuses any
   write, deletion or ageing from then on.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from nats.aio.client import Client as NATS

from . import imported, jsapi
from .errors import StoreError
from .incident import SUBJECTS, Message

CHUNK = 256
"""Publishes in flight at once."""
ATTEMPTS = 3
"""Tries at one sequence before the load gives up (each retry follows a change: an escaped id, a reordering)."""
WRONG_LAST_SEQUENCE = 10071
PURGE_EVERY = 65_536
"""Fillers loaded between purges: a file's gaps are the file's to claim (2**62 sequences of nothing take a line),
and the disk holds no more than this many fillers at once, whatever it claims."""

KEPT = ("name", "description", "max_consumers", "max_msgs", "max_bytes", "max_age",
        "max_msgs_per_subject", "max_msg_size", "discard", "storage", "duplicate_window", "allow_direct",
        "allow_rollup_hdrs", "compression", "allow_msg_ttl", "persist_mode", "deny_delete", "deny_purge")
"""What a copy keeps of the original's configuration (not its cluster, placement, sources, counters, schedules; not
its subjects nor retention either: a file is anyone's, and a copy stores the ledger's own subjects and keeps what it
stores)."""
LIMITS: dict[str, Any] = {"max_msgs": -1, "max_bytes": -1, "max_age": 0, "max_msgs_per_subject": -1,
                          "duplicate_window": 100_000_000}
"""While loading: nothing may push a message out (fillers count as messages), and a message id is a duplicate
only within 100 ms, the least JetStream allows: the original may hold an id twice, further apart than its own
window; each such pair loaded closer than 100 ms costs a retry of the rest of a chunk."""

Progress = Callable[[str, int, int], None]
"""(stream, sequence loaded up to, last sequence)"""


def copy_config(original: dict[str, Any], name: str) -> dict[str, Any]:
    """The configuration of the copy of stream `name`: the original's settings that a sealed single-node copy
    keeps, and its user metadata (the server's own `_nats.*` keys dropped)."""
    config = {k: original[k] for k in KEPT if k in original}
    config["name"] = name
    config["num_replicas"] = 1
    config["allow_direct"] = True  # the store's reads are direct gets
    config["subjects"] = list(SUBJECTS[name])
    config["retention"] = "limits"
    metadata = {k: v for k, v in (original.get("metadata") or {}).items() if not str(k).startswith("_nats.")}
    metadata.pop(imported.MARK, None)
    metadata.pop(imported.LOADING, None)
    if metadata:
        config["metadata"] = metadata
    return config


def filler_subject(config: dict[str, Any]) -> str:
    """A subject of the stream no original message can be on (a token of the import's own, never guessed)."""
    pattern = str((config.get("subjects") or ["import.>"])[0])
    token = f"import-gap-{secrets.token_hex(8)}"
    return ".".join(token if t in ("*", ">") else t for t in pattern.split("."))


class _Planned:
    __slots__ = ("data", "escape_msg_id", "headers", "seq", "stored_ns", "subject", "tries")

    def __init__(self, seq: int, subject: str, headers: dict[str, str], data: bytes, stored_ns: int | None) -> None:
        self.seq, self.subject, self.headers, self.data, self.stored_ns = seq, subject, headers, data, stored_ns
        self.escape_msg_id = False
        self.tries = 0

    def outgoing(self) -> tuple[str, dict[str, str], bytes]:
        headers = (imported.publish_headers(self.headers, self.stored_ns, escape_msg_id=self.escape_msg_id)
                   if self.stored_ns is not None else {})
        headers["Nats-Expected-Last-Sequence"] = str(self.seq - 1)
        return self.subject, headers, self.data


class Loader:
    """Loads streams of an incident file into the server connected to (which must not have them yet)."""

    def __init__(self, nc: NATS, timeout: float) -> None:
        self._nc = nc
        self._timeout = timeout

    async def load(self, name: str, original: dict[str, Any], first_seq: int, last_seq: int,
                   messages: Iterable[Message], mark: str, progress: Progress | None = None) -> int:
        """Create stream `name` covering first_seq..last_seq, load `messages` (its, in order) at their own
        sequences, then seal it with the original configuration marked `mark`; returns how many were loaded."""
        config = copy_config(original, name)
        loading: dict[str, Any] = {**config, **LIMITS, "deny_delete": False, "deny_purge": False,
                                   "first_seq": max(first_seq, 1),
                                   "metadata": {**(config.get("metadata") or {}), imported.LOADING: mark}}
        await jsapi.create_stream(self._nc, loading, self._timeout)
        filler = filler_subject(config)
        counts = [0, 0]  # messages, fillers

        def planned() -> Iterator[_Planned]:
            expect = max(first_seq, 1)
            for m in messages:
                size = len(m.data) + sum(len(k) + len(v) + 4 for k, v in m.headers.items())
                if size > self._nc.max_payload:  # the client would refuse it, naming nothing
                    raise StoreError(f"cannot load {name} #{m.seq}: {size:,} bytes, more than the server takes "
                                     f"({self._nc.max_payload:,})")
                while expect < m.seq:  # a gap of the original
                    counts[1] += 1
                    yield _Planned(expect, filler, {}, b"", None)
                    expect += 1
                counts[0] += 1
                yield _Planned(m.seq, m.subject, m.headers, m.data, m.stored_ns)
                expect = m.seq + 1
            while expect <= last_seq:
                counts[1] += 1
                yield _Planned(expect, filler, {}, b"", None)
                expect += 1

        await self._publish(name, planned(), last_seq, progress, filler)
        if counts[1]:
            await jsapi.purge_subject(self._nc, name, filler, self._timeout)
        metadata = {**(config.get("metadata") or {}), imported.MARK: mark}
        await jsapi.update_stream(self._nc, {**config, "first_seq": loading["first_seq"], "metadata": metadata,
                                             "sealed": True}, self._timeout)
        return counts[0]

    async def remove(self, name: str) -> None:
        """Delete a stream this loader made (a load that failed half-way leaves nothing to mistake for a copy)."""
        await jsapi.delete_stream(self._nc, name, self._timeout)

    async def _publish(self, stream: str, plan: Iterator[_Planned], last_seq: int, progress: Progress | None,
                       filler: str) -> None:
        window: list[_Planned] = []
        fillers = 0  # loaded since the last purge
        while True:
            window.extend(item for _, item in zip(range(CHUNK - len(window)), plan, strict=False))
            if not window:
                return
            answers = await jsapi.publish_each(self._nc, [p.outgoing() for p in window], self._timeout)
            done = 0
            for item, answer in zip(window, answers, strict=True):
                if answer.error is None and not answer.duplicate and answer.seq == item.seq:
                    done += 1
                    continue
                item.tries += 1
                if item.tries >= ATTEMPTS:
                    why = (f"{answer.error.description} (error {answer.error.err_code})" if answer.error
                           else f"stored at #{answer.seq}")
                    raise StoreError(f"cannot load {stream} #{item.seq} at its own sequence: {why}")
                if answer.duplicate:
                    item.escape_msg_id = True  # an id the original stored twice (more than its window apart)
                elif answer.error is not None and answer.error.err_code != WRONG_LAST_SEQUENCE:
                    raise StoreError(f"cannot load {stream} #{item.seq}: {answer.error.description} "
                                     f"(error {answer.error.err_code})")
                break  # everything after it was refused by its guard: again from here
            fillers += sum(1 for item in window[:done] if item.stored_ns is None)
            if fillers >= PURGE_EVERY:
                await jsapi.purge_subject(self._nc, stream, filler, self._timeout)
                fillers = 0
            window = window[done:]
            if progress is not None and done:
                progress(stream, window[0].seq - 1 if window else last_seq, last_seq)
