"""The centralised baseline with the real PyTorch adapter on the bundled MNIST sample (10k train / 2k test)."""

from __future__ import annotations

from typing import Any

import pytest

from fedctl.errors import ConfigError
from fedctl.sim.baseline import run_centralized
from fedctl.sim.metrics import summarize_centralized

pytest.importorskip("torch")


@pytest.mark.timeout(120)
def test_one_epoch_on_the_sample() -> None:
    seen: list[dict[str, Any]] = []
    records = run_centralized("mlp", "mnist-sample", batch_size=10, lr=0.1, max_epochs=1, evals_per_epoch=2,
                              on_eval=seen.append, threads=1)
    assert seen == records
    assert [r["epoch"] for r in records] == [0.0, 0.5, 1.0]
    assert records[0]["wall_s"] == 0.0 and records[0]["test_accuracy"] < 0.3
    assert records[1]["wall_s"] < records[2]["wall_s"]
    assert records[-1]["test_accuracy"] > 0.85
    summary = summarize_centralized(records, 0.85)
    assert summary["epochs_to_target"] is not None and 0 < summary["epochs_to_target"] <= 1.0
    assert 0 < summary["wall_s_to_target"] <= records[-1]["wall_s"]
    assert summary["best_accuracy"] == max(r["test_accuracy"] for r in records)


@pytest.mark.timeout(120)
def test_stops_one_evaluation_after_the_target() -> None:
    records = run_centralized("mlp", "mnist-sample", max_epochs=3, evals_per_epoch=4, target=0.5, threads=1)
    # The first chunk (a quarter epoch, 250 steps) already passes 50%; one more evaluation follows it.
    reached = next(i for i, r in enumerate(records) if r["test_accuracy"] >= 0.5)
    assert len(records) == reached + 2


@pytest.mark.timeout(120)
def test_same_seed_same_curve() -> None:
    a = run_centralized("mlp", "mnist-sample", max_epochs=1, evals_per_epoch=1, seed=3, threads=1)
    b = run_centralized("mlp", "mnist-sample", max_epochs=1, evals_per_epoch=1, seed=3, threads=1)
    assert [r["test_accuracy"] for r in a] == [r["test_accuracy"] for r in b]


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        run_centralized("mlp", "mnist-sample", evals_per_epoch=0)
    with pytest.raises(ConfigError):
        run_centralized("mlp", "mnist-sample", lr=0.0)
