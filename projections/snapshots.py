"""Snapshots of one stream's fold: when to take them, how they are stored, which to keep.

Storage stays bounded: the newest `recent` snapshots are kept, and older ones
thin out so that their spacing doubles with age (one per power-of-two bucket
of distance from the newest). A long log keeps about `recent + log2(age /
every)` snapshots; a view of the last hours replays at most `every` events,
a view of last year at most about half its age.

A snapshot holds what the fold holds: entities retired from it (projections.state) are not in it, so its size
follows what is live and recent, not history; it records the `retain` it was folded with, and a state resumed
from it goes on retiring with that one.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

from .state import STREAMS, HeartbeatState, LedgerState, LifecycleState, Part, decode, encode

COMPRESSION_LEVEL = 1  # ~10x smaller already; higher levels cost far more time than they save space


def pack(part: LifecycleState | HeartbeatState) -> bytes:
    return compress(encode(part))


def compress(encoded: bytes) -> bytes:
    return zlib.compress(encoded, COMPRESSION_LEVEL)


def unpack(data: bytes, kind: type[Part]) -> Part:
    return decode(zlib.decompress(data), kind)


def due(seq: int, last_snapshot_seq: int, every: int) -> bool:
    return every > 0 and seq - last_snapshot_seq >= every


def to_delete(seqs: Sequence[int], every: int, recent: int) -> list[int]:
    """Which snapshots to drop: keep the newest `recent`, then the oldest of each power-of-two age bucket."""
    ordered = sorted(seqs, reverse=True)
    if len(ordered) <= recent:
        return []
    newest = ordered[0]
    oldest_in_bucket: dict[int, int] = {}
    for seq in ordered[recent:]:
        bucket = ((newest - seq) // max(every, 1)).bit_length()
        oldest_in_bucket[bucket] = seq  # descending order: the last one seen is the oldest
    keep = set(ordered[:recent]) | set(oldest_in_bucket.values())
    return sorted(s for s in ordered if s not in keep)


class Plan:
    """Which snapshots are due for a state, and which older ones go; remembers what was taken."""

    def __init__(self, every: int, recent: int, taken: dict[str, list[int]] | None = None) -> None:
        self.every = every
        self.recent = recent
        self.taken = {s: sorted((taken or {}).get(s, [])) for s in STREAMS}

    def due(self, state: LedgerState, stamp: int) -> tuple[list[tuple[Any, ...]], list[tuple[str, int]]]:
        """(rows of new snapshots, (stream, seq) of snapshots to drop). Data is encoded, not yet compressed; each
        row ends with where the lifecycle fold stood (the heartbeats' trim read it: `LedgerState`)."""
        rows, drops = [], []
        for stream in STREAMS:
            part = state.part(stream)
            taken = self.taken[stream]
            if part.seq and due(part.seq, taken[-1] if taken else 0, self.every):
                rows.append((stream, part.seq, part.stored_ns, stamp, encode(part), state.ledger.seq,
                             state.ledger.stored_ns))
                taken.append(part.seq)
                for seq in to_delete(taken, self.every, self.recent):
                    drops.append((stream, seq))
                    taken.remove(seq)
        return rows, drops
