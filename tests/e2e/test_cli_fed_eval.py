"""Federated evaluation through the CLI: ``fedctl serve --fed-eval-every`` with no evaluation data of its own, and
``fedctl join --holdout`` workers that evaluate the global model on their held-out examples."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import LOOPBACK_ANY, Launcher, read_metrics

pytestmark = pytest.mark.timeout(240)


def test_a_broker_without_data_gets_test_metrics_from_its_workers(spawn: Launcher, partition_dir: Path,
                                                                  tmp_path: Path) -> None:
    state = tmp_path / "state"
    broker = spawn("serve", "serve", "--bind", LOOPBACK_ANY, "--state-dir", str(state), "--rounds", "2",
                   "--min-workers", "2", "--fed-eval-every", "1")
    endpoint = broker.wait_endpoint()
    workers = [spawn(f"join-{i}", "join", "--connect", endpoint, "--data", f"shard{i}", "--data-dir",
                     str(partition_dir), "--backend", "torch", "--threads", "1", "--holdout", "0.2")
               for i in range(2)]
    procs = [broker, *workers]
    deadline = time.monotonic() + 150
    codes = {p.name: p.wait(max(deadline - time.monotonic(), 1.0)) for p in procs}
    assert all(code == 0 for code in codes.values()), "\n\n".join(p.describe() for p in procs)
    metrics = read_metrics(state)
    assert [m["round"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["test_accuracy"] is None, "the broker has no test data"
        assert m["fed_eval_workers"] == 2 and m["fed_eval_asked"] == 2 and m["fed_eval_examples"] > 0
        assert 0.5 < m["fed_eval_accuracy"] <= 1.0 and m["fed_eval_loss"] > 0
    assert "federated evaluation: accuracy" in broker.stderr
    for worker in workers:
        assert "held-out examples for federated evaluation" in worker.stderr, worker.describe()
