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


def test_named_pools_off_this_slot_and_unknown_ones_are_named() -> None:
    slot = {p: pool_slot(p, 3) for p in ("gpu", "cpu", "edge")}  # 0, 2, 1
    part = Partition(pools=frozenset(slot), replica=slot["gpu"], replicas=3)
    assert part.off_slot() == {"cpu": 2, "edge": 1}
    assert Partition(pools=frozenset(slot)).off_slot() == {} and EVERYTHING.off_slot() == {}
    assert Partition(replica=1, replicas=3).off_slot() == {}  # no names: every pool of the slot, none left out
    assert part.unknown({"gpu", "tpu"}) == ["cpu", "edge"] and EVERYTHING.unknown(set()) == []


async def test_consumers_warn_of_a_named_pool_nothing_is_in_once_caught_up(settings, ledger, uid) -> None:  # type: ignore[no-untyped-def]
    """`--pools gpu,gpx`: a typo would serve nothing, silently; the replica says so once it has read the log."""
    import asyncio
    import os
    import signal

    pool = f"{uid}-gpu"
    await ledger.create_session(pool)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ledgerctl", "consumers", "--no-monitor", "--no-reclaimer", "--pools",
        f"{pool},{pool}x", env={**os.environ, "LEDGER_NATS_URL": settings.nats_url},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    try:
        line = await asyncio.wait_for(proc.stderr.readline(), 60)
    finally:
        proc.send_signal(signal.SIGINT)
        rest = (await asyncio.wait_for(proc.communicate(), 30))[1].decode()
    assert line.decode().strip() == (f"warning: --pools {pool}x: no agent, session or breaker of the ledger is in it "
                                     "yet (a typo?); this replica acts on it once one appears"), rest
    assert proc.returncode == 0 and "warning" not in rest, rest


def test_pools_partly_off_the_slot_are_served_with_a_warning(capsys: pytest.CaptureFixture[str]) -> None:
    from ledgerctl.cli.consumers import _partition

    part = _partition("gpu,cpu", "0/3")  # gpu falls on slot 0, cpu on 2
    assert part.owns("gpu") and not part.owns("cpu")
    assert capsys.readouterr().err == "warning: --partition 0/3 leaves out some of --pools: cpu falls on slot 2\n"
