"""Acceptance on full MNIST, separate processes over TCP: 5 workers on IID shards of 600 (100-client partition).

Needs the full MNIST IDX files: ``$FEDCTL_MNIST_DIR``, or ``../shared/data/mnist`` beside the repository.
Marked slow (about a minute): ``make acceptance`` runs it, and ``make test`` too when the data is there.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
from conftest import LOOPBACK_ANY, REPO, Launcher, fedctl, read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def _mnist_dir() -> Path | None:
    for candidate in (os.environ.get("FEDCTL_MNIST_DIR"), REPO.parent / "shared" / "data" / "mnist"):
        if candidate and (Path(candidate) / "train-images-idx3-ubyte.gz").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="module")
def mnist100(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = _mnist_dir()
    if source is None:
        pytest.skip("full MNIST not found: set FEDCTL_MNIST_DIR to a directory with the four IDX files")
    tmp = tmp_path_factory.mktemp("mnist100")
    run = fedctl(tmp, "partition", "--dataset", "mnist", "--source-dir", str(source), "--clients", "100",
                 "--iid", "--out", str(tmp / "shards"))
    assert run.returncode == 0, run.stderr
    return tmp / "shards"


def _run(spawn: Launcher, data: Path, state: Path, *options: str) -> list[dict]:
    broker = spawn("serve", "serve", "--bind", LOOPBACK_ANY, "--model", "mlp", "--rounds", "20", "--fraction", "1.0",
                   "--min-workers", "5", "--round-timeout", "120", "--lr", "0.1", "--seed", "0", "--state-dir",
                   str(state), "--eval-data", "test", "--data-dir", str(data), *options)
    endpoint = broker.wait_endpoint()
    backends = ["torch", "torch", "torch", "torch", "mxnet"]
    workers = [spawn(f"join{i}", "join", "--connect", endpoint, "--data", f"shard{i}", "--data-dir", str(data),
                     "--backend", b, "--threads", "1") for i, b in enumerate(backends)]
    for proc in [broker, *workers]:
        assert proc.wait(300) == 0, proc.describe()
    return read_metrics(state)


def test_fedavg_mlp_reaches_90_percent_within_20_rounds(spawn: Launcher, mnist100: Path, tmp_path: Path) -> None:
    metrics = _run(spawn, mnist100, tmp_path / "state", "--strategy", "fedavg", "--epochs", "1", "--batch-size", "10")
    assert [m["round"] for m in metrics] == list(range(1, 21))
    assert all(m["participants"] == 5 for m in metrics)
    assert max(m["test_accuracy"] for m in metrics) >= 0.90, [m["test_accuracy"] for m in metrics]
    assert metrics[-1]["test_accuracy"] >= 0.90


def test_fedsgd_mlp_improves_round_over_round(spawn: Launcher, mnist100: Path, tmp_path: Path) -> None:
    metrics = _run(spawn, mnist100, tmp_path / "state", "--strategy", "fedsgd", "--batch-size", "0")
    accuracy = [m["test_accuracy"] for m in metrics]
    assert len(accuracy) == 20
    # Full-batch gradient descent at η=0.1 from a random start: every round is better than the one before.
    assert all(b > a for a, b in itertools.pairwise(accuracy)), accuracy
    assert accuracy[-1] > accuracy[0] + 0.3, accuracy
