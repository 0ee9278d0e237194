"""Downlink deltas and worker state over real sockets: a worker that holds a model version is sent only what
changed, ends with the broker's model bit for bit, and keeps its state across a restart."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq.asyncio

from fedctl.broker.policy import SyncConfig
from fedctl.strategies.base import AggregateResult, ClientResult, LocalTrainer, Params, Update
from fedctl.strategies.fedavg import FedAvg
from fedctl.strategies.kernels import weighted_mean
from fedctl.strategies.registry import register
from fedctl.wire.constants import KIND_WEIGHTS
from fedctl.worker.state import STATE_FILE, WorkerState

MODEL_BYTES = 109_386 * 4
DENSE_SENT = int(0.75 * MODEL_BYTES)
"""At least what a dense model costs on the wire: the broker zlib-compresses it (random-init weights: ~14% less)."""


@register
class BiasOnly(FedAvg):
    """Test strategy: averages only fc3.bias, so each version differs from the last in 10 entries; the worker
    side counts its rounds in its private state."""

    name = "bias-only-test"

    def client_update(self, weights: Params, trainer: LocalTrainer, task: Mapping[str, Any],
                      state: Mapping[str, np.ndarray]) -> ClientResult:
        result = super().client_update(weights, trainer, task, state)
        count = state.get("count", np.zeros(1)) + 1
        return ClientResult(KIND_WEIGHTS, result.tensors, result.num_examples, result.metrics, {"count": count})

    def aggregate(self, weights: Params, updates: Sequence[Update], state: dict[str, Any],
                  rng: np.random.Generator) -> AggregateResult:
        mean = weighted_mean([u.tensors for u in updates], [u.num_examples for u in updates])
        return AggregateResult({**weights, "fc3.bias": mean["fc3.bias"]}, state, {})


def run(fed: Any, ctx: zmq.asyncio.Context, state_dir: Path, worker_dirs: list[Path], rounds: int,
        **overrides: Any) -> tuple[Any, list[Any], Any]:
    async def scenario() -> tuple[Any, list[Any], Any]:
        broker = fed.start_broker(ctx, fed.broker_config(state_dir, strategy="bias-only-test", rounds=rounds,
                                                         sync=SyncConfig(1.0, len(worker_dirs), 20.0), **overrides))
        workers = [fed.mlp_worker(ctx, broker.endpoint, i, state_dir=d) for i, d in enumerate(worker_dirs)]
        summary, *results = await fed.run_federation(broker, workers)
        return summary, workers, broker

    return fed.run_async(scenario())


@pytest.mark.timeout(60)
def test_workers_holding_a_version_get_only_the_changes(fed: Any, ctx: zmq.asyncio.Context, state_dir: Path,
                                                        tmp_path: Path) -> None:
    dirs = [tmp_path / f"w{i}" for i in range(2)]
    _, workers, broker = run(fed, ctx, state_dir, dirs, rounds=4)
    metrics = fed.read_metrics(state_dir)
    # Round 1 sends the dense model to both; later rounds only fc3.bias (10 floats), measured on the socket.
    assert metrics[0]["bytes_out"] > 2 * DENSE_SENT
    assert all(m["bytes_out"] < 2000 for m in metrics[1:]), [m["bytes_out"] for m in metrics]
    for w in workers:
        assert w.state.version == 3  # the model of round 4 is version 3; its update made version 4
        for name, arr in w.state.model.items():
            assert np.array_equal(arr, broker.store.at(3)[name]), name
        saved = WorkerState.load(w.config.state_dir)
        assert saved.run_id == broker.state["run_id"] and saved.seq == 4
        assert float(saved.strategy["count"][0]) == 4.0


@pytest.mark.timeout(90)
def test_worker_state_survives_a_restart_and_a_new_run_discards_it(fed: Any, ctx: zmq.asyncio.Context,
                                                                   state_dir: Path, tmp_path: Path) -> None:
    dirs = [tmp_path / "w0"]
    run(fed, ctx, state_dir, dirs, rounds=2)
    assert (dirs[0] / STATE_FILE).is_file()
    # Same run resumed (same state dir → same run id): the worker continues its count and is sent a delta.
    _, workers, _ = run(fed, ctx, state_dir, dirs, rounds=4)
    assert float(workers[0].state.strategy["count"][0]) == 4.0 and workers[0].state.seq == 4
    metrics = fed.read_metrics(state_dir)
    # It holds version 1; the restarted broker keeps no history of past versions, so round 3 goes dense and
    # round 4 (the worker now holds version 2, which the broker kept) carries only the changes.
    assert metrics[2]["bytes_out"] > DENSE_SENT and metrics[3]["bytes_out"] < 2000
    # A new run (fresh broker state) discards the old worker state.
    _, workers, _ = run(fed, ctx, tmp_path / "other-run", dirs, rounds=1)
    assert float(workers[0].state.strategy["count"][0]) == 1.0


@pytest.mark.timeout(60)
def test_history_zero_always_sends_the_dense_model(fed: Any, ctx: zmq.asyncio.Context, state_dir: Path,
                                                    tmp_path: Path) -> None:
    run(fed, ctx, state_dir, [tmp_path / "w0"], rounds=3, history_mb=0.0)
    assert all(m["bytes_out"] > DENSE_SENT for m in fed.read_metrics(state_dir))
