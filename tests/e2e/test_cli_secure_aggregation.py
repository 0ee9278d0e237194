"""Secure aggregation in real processes: `fedctl serve --secure-aggregation` SIGKILLed in the middle of a secure
round restarts that round with a fresh attempt, every worker makes fresh keys for it, and the run finishes."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from conftest import Launcher, read_metrics
from test_chaos import free_port, kill9, wait_for

pytestmark = pytest.mark.timeout(300)
ROUNDS, WORKERS = 3, 3
ATTEMPT = re.compile(r"round (\d+), secure aggregation attempt ([0-9a-f]+): (\d+) workers")
KEYS = re.compile(r"round (\d+), secure aggregation attempt ([0-9a-f]+): fresh keys ([0-9a-f]+)/([0-9a-f]+)")


def test_a_broker_killed_mid_round_restarts_it_with_fresh_keys(spawn: Launcher, partition_dir: Path,
                                                               tmp_path: Path) -> None:
    port, state = free_port(), tmp_path / "state"

    def serve(name: str) -> object:
        return spawn(name, "serve", "--bind", f"tcp://127.0.0.1:{port}", "--state-dir", str(state), "--rounds",
                     str(ROUNDS), "--min-workers", str(WORKERS), "--secure-aggregation", "--round-timeout", "60",
                     "--liveness", "4", "--heartbeat-interval", "0.5", "--secagg-timeout", "10")

    first = serve("serve-1")
    workers = [spawn(f"join-{i}", "join", "--connect", f"tcp://127.0.0.1:{port}", "--data", f"shard{i}",
                     "--data-dir", str(partition_dir), "--backend", "torch", "--threads", "1", "--connect-timeout",
                     "120", "--slowdown", "8") for i in range(WORKERS)]
    # Round 2's attempt is past its keys and shares: the workers are training on their way to masked inputs.
    wait_for(lambda: "round 2, secure aggregation attempt" in first.stderr and
             re.search(r"round 2, secure aggregation attempt [0-9a-f]+: shares stage closed", first.stderr),
             120, "round 2's shares stage")
    kill9(first)
    time.sleep(1)
    second = serve("serve-2")
    procs = [second, *workers]
    codes = {p.name: p.wait(240) for p in procs}
    assert all(c == 0 for c in codes.values()), "\n\n".join(p.describe() for p in procs)
    assert [m["round"] for m in read_metrics(state)] == [1, 2, 3]
    killed = {a for r, a, _ in ATTEMPT.findall(first.stderr) if r == "2"}
    restarted = {a for r, a, _ in ATTEMPT.findall(second.stderr) if r == "2"}
    assert killed and restarted and not killed & restarted, "round 2 ran again as a new attempt"
    round2 = read_metrics(state)[1]
    assert round2["secagg"]["inputs"] == WORKERS and format(round2["secagg"]["attempt"], "x") in restarted
    for worker in workers:
        keys = [(a, c, s) for r, a, c, s in KEYS.findall(worker.stderr) if r == "2"]
        assert len({a for a, _, _ in keys}) >= 2, worker.describe()  # the killed attempt and the one applied
        assert len({c for _, c, _ in keys}) == len(keys) and len({s for _, _, s in keys}) == len(keys), \
            "no key (so no mask or seed) is used in two attempts"
