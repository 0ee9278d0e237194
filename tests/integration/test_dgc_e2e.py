"""DGC end to end over real sockets: sparse fp16 pushes, the broker's sparse sum, and residuals that survive a
worker restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq.asyncio

from fedctl.broker.policy import SyncConfig
from fedctl.models import get_model, init_params
from fedctl.strategies import TaskConfig
from fedctl.worker.state import WorkerState

MODEL_BYTES = 109_386 * 4


def dgc_run(fed: Any, ctx: zmq.asyncio.Context, state_dir: Path, worker_dirs: list[Path], rounds: int,
            before: Any = None) -> tuple[Any, list[Any], Any]:
    async def scenario() -> tuple[Any, list[Any], Any]:
        task = TaskConfig(1, 0, 0.5, options={"sparsity": "0.99", "warmup_rounds": "1", "scope": "model"})
        broker = fed.start_broker(ctx, fed.broker_config(state_dir, strategy="dgc", rounds=rounds, task=task,
                                                         sync=SyncConfig(1.0, len(worker_dirs), 20.0)))
        workers = [fed.mlp_worker(ctx, broker.endpoint, i, state_dir=d) for i, d in enumerate(worker_dirs)]
        if before is not None:
            before(workers)
        summary, *_ = await fed.run_federation(broker, workers)
        return summary, workers, broker

    return fed.run_async(scenario())


@pytest.mark.timeout(90)
def test_dgc_trains_with_sparse_pushes_and_keeps_residuals_across_a_restart(fed: Any, ctx: zmq.asyncio.Context,
                                                                            state_dir: Path, tmp_path: Path) -> None:
    dirs = [tmp_path / "w0", tmp_path / "w1"]
    start = init_params(get_model("mlp"), fed.broker_config(tmp_path / "probe").seed)  # the broker's first model
    start_loss = fed.evaluator()(start)["loss"]
    summary, workers, broker = dgc_run(fed, ctx, state_dir, dirs, rounds=6)
    metrics = fed.read_metrics(state_dir)
    assert [m["round"] for m in metrics] == list(range(1, 7))
    # Warm-up: round 1 keeps 25%, round 5 on 1% of the model; bytes counted on the broker's socket.
    assert metrics[0]["update_bytes_in"] > metrics[4]["update_bytes_in"]
    for m in metrics[4:]:
        assert m["update_bytes_in"] < 2 * MODEL_BYTES / 30, m["update_bytes_in"]  # ≥ 30× below dense pushes
        assert m["update_metrics"]["kept"] == pytest.approx(0.01 * 109_386, rel=0.25)
        assert m["strategy"]["density"] <= 2 * 0.012  # ≤ 2 workers × 1% (sampled top-k: ±20% of k)
    assert metrics[-1]["test_loss"] < 0.5 * start_loss
    # Every push was a gradient: the broker refuses any other kind (WRONG_KIND), and it refused nothing.
    assert broker.core.strategy.update_kind == "gradient" and broker.rejected == {}
    assert all(m["participants"] == 2 for m in metrics)

    saved = [WorkerState.load(d) for d in dirs]
    for s in saved:
        assert s.seq == 6 and s.run_id == broker.state["run_id"]
        residual = s.strategy["dgc.v/fc1.weight"]
        assert np.count_nonzero(residual) > 0.5 * residual.size, "most of the gradient waits in the residual"

    # Restart the workers (and the broker, resuming its run): they start from the saved residuals.
    seen: list[dict[str, np.ndarray]] = []

    def capture(crew: list[Any]) -> None:
        seen.extend({k: v.copy() for k, v in w.state.strategy.items()} for w in crew)

    dgc_run(fed, ctx, state_dir, dirs, rounds=8, before=capture)
    for before_restart, loaded in zip(saved, seen):
        assert loaded.keys() == before_restart.strategy.keys()
        for key, arr in before_restart.strategy.items():
            assert np.array_equal(loaded[key], arr), key
    assert [WorkerState.load(d).seq for d in dirs] == [8, 8]
    assert [m["round"] for m in fed.read_metrics(state_dir)] == list(range(1, 9))
