"""Whole federations in one process over real ZeroMQ sockets: FedAvg and FedSGD on tcp and inproc, and resume."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq.asyncio

from fedctl.broker.policy import SyncConfig
from fedctl.models import get_model, init_params
from fedctl.strategies import TaskConfig

REQUIRED = {"round", "test_accuracy", "test_loss", "participants", "bytes_in", "bytes_out", "duration_s"}
MODEL_BYTES = get_model("mlp").nbytes


async def federate(fed: Any, ctx: zmq.asyncio.Context, state_dir: Path, bind: str = "tcp://127.0.0.1:*",
                   workers: int = 3, **overrides: Any) -> tuple[Any, list[Any], dict[str, np.ndarray]]:
    broker = fed.start_broker(ctx, fed.broker_config(state_dir, bind=bind, **overrides))
    crew = [fed.mlp_worker(ctx, broker.endpoint, i) for i in range(workers)]
    summary, *worker_results = await fed.run_federation(broker, crew)
    return summary, worker_results, broker.store.weights


def check_run(fed: Any, summary: dict[str, Any], worker_results: list[dict[str, Any]], state_dir: Path, rounds: int,
              workers: int) -> list[dict[str, Any]]:
    assert summary["rounds"] == rounds and summary["version"] == rounds
    assert summary["rejected"] == {}
    for res in worker_results:
        assert res["final_round"] == rounds and res["version"] == rounds
        assert res["rounds_trained"] == rounds
    metrics = fed.read_metrics(state_dir)
    assert [m["round"] for m in metrics] == list(range(1, rounds + 1))
    for m in metrics:
        assert REQUIRED <= set(m), REQUIRED - set(m)
        assert m["participants"] == workers and m["version"] == m["round"]
        # every participant pushes one model-sized update (plus small headers, pulls and heartbeats)
        assert m["bytes_in"] == pytest.approx(m["participants"] * MODEL_BYTES, rel=0.05)
        # the models go zlib-compressed when that is smaller (trained weights: 10-15% less)
        assert 0.75 * m["participants"] * MODEL_BYTES <= m["bytes_out"] <= 1.05 * m["participants"] * MODEL_BYTES
        assert m["duration_s"] > 0
    return metrics


def initial_accuracy(fed: Any, seed: int) -> float:
    return fed.evaluator()(init_params(get_model("mlp"), seed))["accuracy"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", ["tcp", "inproc"])
def test_fedavg_three_workers_three_rounds(fed: Any, ctx: zmq.asyncio.Context, state_dir: Path, transport: str) -> None:
    bind = "tcp://127.0.0.1:*" if transport == "tcp" else f"inproc://fedctl-test-{uuid.uuid4().hex}"
    summary, results, weights = fed.run_async(federate(fed, ctx, state_dir, bind=bind))
    metrics = check_run(fed, summary, results, state_dir, rounds=3, workers=3)
    start = initial_accuracy(fed, seed=7)
    assert start < 0.3
    assert metrics[-1]["test_accuracy"] > 0.8 > start
    assert metrics[-1]["test_loss"] < metrics[0]["test_loss"]
    assert all(w.dtype == np.float32 and np.isfinite(w).all() for w in weights.values())


@pytest.mark.timeout(60)
def test_fedsgd_three_workers_three_rounds(fed: Any, ctx: zmq.asyncio.Context, state_dir: Path) -> None:
    summary, results, _ = fed.run_async(federate(fed, ctx, state_dir, strategy="fedsgd", task=TaskConfig(1, 0, 0.5)))
    metrics = check_run(fed, summary, results, state_dir, rounds=3, workers=3)
    losses = [m["test_loss"] for m in metrics]
    assert losses == sorted(losses, reverse=True), f"full-batch gradient descent must lower the loss: {losses}"
    assert metrics[-1]["test_accuracy"] > initial_accuracy(fed, seed=7)
    assert summary["last"]["strategy"]["grad_norm"] > 0


@pytest.mark.timeout(60)
def test_resume_continues_from_the_checkpoint(fed: Any, ctx: zmq.asyncio.Context, state_dir: Path) -> None:
    async def scenario() -> tuple[Any, Any, dict[str, np.ndarray], Any]:
        first, _, weights_after_2 = await federate(fed, ctx, state_dir, rounds=2)
        resumed = fed.start_broker(ctx, fed.broker_config(state_dir, rounds=4))
        assert resumed.state["round"] == 2 and resumed.store.version == 2
        for k, w in weights_after_2.items():
            assert resumed.store.weights[k].tobytes() == w.tobytes()
        crew = [fed.mlp_worker(ctx, resumed.endpoint, i) for i in range(3)]
        second, *results = await fed.run_federation(resumed, crew)
        return first, second, resumed.store.weights, results

    first, second, _, results = fed.run_async(scenario())
    assert first["rounds"] == 2 and first["version"] == 2
    assert second["rounds"] == 4 and second["version"] == 4
    assert all(r["rounds_trained"] == 2 and r["final_round"] == 4 for r in results)
    metrics = fed.read_metrics(state_dir)
    assert [m["round"] for m in metrics] == [1, 2, 3, 4]
    assert [m["version"] for m in metrics] == [1, 2, 3, 4]


@pytest.mark.timeout(60)
def test_resume_refuses_another_strategy(fed: Any, ctx: zmq.asyncio.Context, state_dir: Path) -> None:
    from fedctl.errors import ConfigError

    async def scenario() -> None:
        await federate(fed, ctx, state_dir, rounds=1, workers=1, sync=SyncConfig(1.0, 1, 20.0))
        with pytest.raises(ConfigError) as e:
            fed.start_broker(ctx, fed.broker_config(state_dir, strategy="fedsgd"))
        assert "--state-dir" in (e.value.fix or "")

    fed.run_async(scenario())


@pytest.mark.timeout(60)
def test_a_seeded_run_is_bit_reproducible(fed: Any, ctx: zmq.asyncio.Context, tmp_path: Path) -> None:
    """Same seed, same data: identical weights, whatever order the three updates arrive in each round."""
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        runs.append(fed.run_async(federate(fed, ctx, tmp_path / name, rounds=2))[2])
    assert list(runs[0]) == list(runs[1])
    for k in runs[0]:
        assert runs[0][k].tobytes() == runs[1][k].tobytes(), k
