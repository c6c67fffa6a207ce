"""The scale, churn and restart benchmarks run end to end at a tiny size and print their labelled figures (the numbers
themselves belong to the benchmark runs, not to tests). Both run at once: each mostly waits on its own stack."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
RUNS = {
    "scale.py": (["--agents", "20", "--seconds", "1", "--interval", "0.5", "--ttl", "5", "--baseline-seconds", "0",
                  "--idle-seconds", "1"],
                 ["20 agents registered", "false verdicts: suspected", "projector lag behind LEDGER_HB",
                  "ledger up ", "nats-server ", "generator 1 ", "idle after the fleet said goodbye"]),
    "churn.py": (["--sessions", "40", "--every", "20", "--concurrency", "20", "--agents", "2", "--raw-sessions", "0"],
                 ["before ", "40 sessions ", "after (caught up)", "figure  ledger up   RSS",
                  "figure  nats-server RSS"]),
    "restart.py": (["--events", "3000"], ["(a) raw read of the log", "(b) first ledger up", "(c) restart: ready",
                                          "(d) SIGTERM"]),
}


def test_the_scale_and_churn_benchmarks_run_at_a_tiny_size_and_print_their_figures():
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent)}
    procs = {script: subprocess.Popen([sys.executable, str(BENCH / script), *argv], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, env=env)
             for script, (argv, _) in RUNS.items()}
    try:
        outputs = {script: p.communicate(timeout=180)[0] for script, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)
    for script, (_, labels) in RUNS.items():
        assert procs[script].returncode == 0, f"{script} failed:\n{outputs[script]}"
        missing = [label for label in labels if label not in outputs[script]]
        assert not missing, f"{script} did not print {missing}:\n{outputs[script]}"
