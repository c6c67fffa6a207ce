"""Partition: which pools this consumer replica acts on, so a fleet larger than one process can serve is split.

    Partition()                          # every pool (the default: one replica, or replicas that overlap)
    Partition(pools=frozenset({"gpu"}))  # only these pools   (`ledger consumers --pools gpu,cpu`)
    Partition(replica=2, replicas=4)     # pools whose stable hash falls on replica 2 of 4 (`--partition 2/4`)

Every replica still folds the whole log (a claim or a death anywhere may concern any pool's capacity or
breaker) but judges, reclaims and moves only the entities of its pools. A pool is all-or-nothing: its
breaker counts its whole membership, so it must live on one replica. The hash is a fixed function of the
pool's name (not Python's per-process `hash`), so every replica computes the same assignment.

Partitions that overlap (a misconfiguration, or a rolling change of N) are safe: every write is still a
compare-and-set on the entity's stream sequence and every verdict's id is derived from its evidence, so two
replicas acting on one pool make one write; they only duplicate work.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import msgspec


def pool_slot(pool: str, replicas: int) -> int:
    """The replica (0 .. replicas-1) that a pool falls on: CRC-32 of its name, stable across processes."""
    return zlib.crc32(pool.encode()) % replicas


class Partition(msgspec.Struct, frozen=True, kw_only=True):
    pools: frozenset[str] | None = None
    """Only these pools (None: any pool the hash gives this replica)."""
    replica: int = 0
    replicas: int = 1

    def __post_init__(self) -> None:
        if self.replicas < 1 or not 0 <= self.replica < self.replicas:
            raise ValueError(f"a partition is I/N with 0 <= I < N, got {self.replica}/{self.replicas}")
        if self.pools is not None and not self.pools:
            raise ValueError("a partition by pools names at least one pool")

    @property
    def everything(self) -> bool:
        return self.pools is None and self.replicas == 1

    def owns(self, pool: str) -> bool:
        """Does this replica act on `pool`'s agents, sessions and routes?"""
        if self.pools is not None and pool not in self.pools:
            return False
        return self.replicas == 1 or pool_slot(pool, self.replicas) == self.replica

    def owns_unplaced(self) -> bool:
        """Does this replica act on an entity of no known pool (a route whose session is forged, or retired before
        the replica saw it)? The replica of pool "" by the hash alone; a replica that names its pools, which cannot
        know the others' (nor whether any runs on the slot of ""), judges it too: rare, and overlapping is safe (one
        compare-and-set lands), where leaving it to none would leave the route unjudged forever."""
        return self.pools is not None or self.replicas == 1 or pool_slot("", self.replicas) == self.replica

    def off_slot(self) -> dict[str, int]:
        """Named pools whose hash falls on another replica's slot, with that slot: this replica never acts on them."""
        if self.pools is None or self.replicas == 1:
            return {}
        return {p: pool_slot(p, self.replicas) for p in sorted(self.pools)
                if pool_slot(p, self.replicas) != self.replica}

    def unknown(self, in_use: Iterable[str]) -> list[str]:
        """Named pools that nothing in `in_use` (the pools the log's agents, sessions and breakers name) is in."""
        if self.pools is None:
            return []
        return sorted(self.pools - set(in_use))

    def describe(self) -> str:
        parts = []
        if self.pools is not None:
            parts.append("pools " + ",".join(sorted(self.pools)))
        if self.replicas > 1:
            parts.append(f"hash slot {self.replica} of {self.replicas}")
        return " and ".join(parts) or "every pool"


EVERYTHING = Partition()


def parse_partition(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N); ValueError with the expected form otherwise."""
    replica, sep, replicas = text.partition("/")
    try:
        if not sep:
            raise ValueError
        i, n = int(replica), int(replicas)
    except ValueError:
        raise ValueError(f"expected I/N (this replica's slot and the number of replicas, e.g. 0/3), "
                         f"got {text!r}") from None
    Partition(replica=i, replicas=n)  # range-checked there, one message
    return i, n
