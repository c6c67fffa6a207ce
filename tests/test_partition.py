"""consumers.partition: every pool falls on exactly one replica of N, the same in every process."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumers.partition import EVERYTHING, Partition, parse_partition, pool_slot

pools = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=30)


@given(pools, st.integers(1, 16))
def test_each_pool_is_owned_by_exactly_one_replica(pool: str, n: int) -> None:
    owners = [i for i in range(n) if Partition(replica=i, replicas=n).owns(pool)]
    assert owners == [pool_slot(pool, n)]
    assert EVERYTHING.owns(pool)


def test_the_assignment_does_not_depend_on_the_process() -> None:
    # Python's str hash is salted per process; the slot must not be.
    code = "from consumers.partition import pool_slot; print([pool_slot(f'pool-{i}', 7) for i in range(50)])"
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(runs) == 1
    assert runs.pop().strip() == str([pool_slot(f"pool-{i}", 7) for i in range(50)])


def test_named_pools_and_hash_slots_combine() -> None:
    gpu_cpu = Partition(pools=frozenset({"gpu", "cpu"}))
    assert gpu_cpu.owns("gpu") and gpu_cpu.owns("cpu") and not gpu_cpu.owns("tpu")
    assert not gpu_cpu.everything and EVERYTHING.everything
    both = Partition(pools=frozenset({"gpu", "cpu"}), replica=pool_slot("gpu", 2), replicas=2)
    assert both.owns("gpu") and not both.owns("tpu")
    assert both.owns("cpu") == (pool_slot("cpu", 2) == pool_slot("gpu", 2))
    assert gpu_cpu.describe() == "pools cpu,gpu"


@pytest.mark.parametrize("text", ["3", "a/b", "3/3", "-1/2", "0/0", "1/2/3", ""])
def test_a_bad_partition_is_one_message(text: str) -> None:
    with pytest.raises(ValueError, match="I/N|0 <= I < N"):
        parse_partition(text)


def test_a_good_partition_parses() -> None:
    assert parse_partition("2/5") == (2, 5)
