"""Federated evaluation over real ZeroMQ sockets: a broker with no test data of its own gets fed_eval_* metrics in
metrics.jsonl, the example-weighted mean of what the workers computed on their held-out data (docs/protocol.md
§7.2), with the model sent dense, as a delta or in chunks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq.asyncio

from fedctl.broker.policy import SyncConfig
from fedctl.models import ModelSpec
from fedctl.testing.trainers import NumpyMLPTrainer, synthetic_digits
from fedctl.worker.client import Evaluate, Worker, WorkerConfig

HELD_OUT = (50, 100, 150)
"""Held-out examples of the three workers that have some; a fourth worker has none."""


class Recorder:
    """A worker's evaluation on its held-out data that remembers what it computed, by model version."""

    def __init__(self, seed: int, n: int) -> None:
        self.x, self.y = synthetic_digits(n, seed=seed)
        self.seen: list[tuple[dict[str, float], int]] = []
        self.weights: list[dict[str, np.ndarray]] = []

    def factory(self, spec: ModelSpec) -> Evaluate:
        trainer = NumpyMLPTrainer(spec, self.x, self.y)

        def evaluate(weights: dict[str, np.ndarray], local: dict[str, np.ndarray]) -> tuple[dict[str, float], int]:
            metrics = trainer.evaluate(weights)
            self.seen.append((metrics, len(self.y)))
            self.weights.append({k: v.copy() for k, v in weights.items()})
            return metrics, len(self.y)

        return evaluate


def make_worker(ctx: zmq.asyncio.Context, endpoint: str, index: int, recorder: Recorder | None) -> Worker:
    x, y = synthetic_digits(200, seed=index)
    return Worker(WorkerConfig(endpoint, f"w{index}", "numpy", len(y)), lambda spec: NumpyMLPTrainer(spec, x, y),
                  ctx=ctx, evaluator=None if recorder is None else recorder.factory)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
def test_fed_eval_is_the_example_weighted_mean_of_what_the_workers_computed(
        fed: Any, ctx: zmq.asyncio.Context, state_dir: Path, chunked: bool) -> None:
    recorders = [Recorder(100 + i, n) for i, n in enumerate(HELD_OUT)]
    chunking = {"chunk_above": 64 * 1024, "chunk_bytes": 64 * 1024} if chunked else {}
    config = fed.broker_config(state_dir, rounds=3, sync=SyncConfig(1.0, 4, 20.0), fed_eval_every=2, **chunking)

    async def scenario() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        broker = fed.start_broker(ctx, config, evaluator=None)  # the broker has no test data at all
        crew = [make_worker(ctx, broker.endpoint, i, r) for i, r in enumerate([*recorders, None])]
        summary, *_ = await fed.run_federation(broker, crew)
        assert [w.evaluations for w in crew] == [2, 2, 2, 2]
        return summary, broker.store.weights

    summary, final = fed.run_async(scenario())
    assert summary["rejected"] == {}
    metrics = fed.read_metrics(state_dir)
    assert [m["round"] for m in metrics] == [1, 2, 3]
    first, *evaluated = metrics
    assert first["test_accuracy"] is None and first["fed_eval_accuracy"] is None, "round 1 is not evaluated"
    assert first["fed_eval_examples"] is None and first["fed_eval_s"] is None
    for index, line in enumerate(evaluated):  # after round 2 (every 2) and round 3 (the last)
        answers = [r.seen[index] for r in recorders]
        total = sum(n for _, n in answers)
        for name in ("accuracy", "loss"):
            expected = sum(m[name] * n for m, n in answers) / total
            assert line[f"fed_eval_{name}"] == pytest.approx(expected, rel=1e-12), (line["round"], name)
        assert (line["fed_eval_examples"], line["fed_eval_workers"], line["fed_eval_asked"]) == (300, 3, 4)
        assert line["fed_eval_s"] > 0 and line["test_accuracy"] is None
    # What the workers evaluated last is the final model, bit for bit (dense, delta or chunks alike).
    for r in recorders:
        assert all(np.array_equal(r.weights[-1][k], final[k]) for k in final)
    assert evaluated[-1]["fed_eval_accuracy"] > evaluated[0]["fed_eval_accuracy"] - 0.05


@pytest.mark.timeout(60)
def test_a_sample_evaluates_and_centralised_evaluation_stays(fed: Any, ctx: zmq.asyncio.Context,
                                                             state_dir: Path) -> None:
    recorders = [Recorder(100 + i, 80) for i in range(4)]
    config = fed.broker_config(state_dir, rounds=2, sync=SyncConfig(1.0, 4, 20.0), fed_eval_every=1,
                               fed_eval_fraction=0.5)

    async def scenario() -> None:
        broker = fed.start_broker(ctx, config)  # with its own test data too
        crew = [make_worker(ctx, broker.endpoint, i, r) for i, r in enumerate(recorders)]
        await fed.run_federation(broker, crew)

    fed.run_async(scenario())
    metrics = fed.read_metrics(state_dir)
    for line in metrics:
        assert line["test_accuracy"] is not None and line["fed_eval_accuracy"] is not None
        assert (line["fed_eval_asked"], line["fed_eval_workers"], line["fed_eval_examples"]) == (2, 2, 160)
    assert sum(len(r.seen) for r in recorders) == 4, "two workers per round"


@pytest.mark.timeout(60)
def test_an_evaluation_that_raises_is_answered_with_no_examples(fed: Any, ctx: zmq.asyncio.Context,
                                                                state_dir: Path) -> None:
    good = Recorder(100, 60)

    def broken(spec: ModelSpec) -> Evaluate:
        def evaluate(weights: dict[str, np.ndarray], local: dict[str, np.ndarray]) -> tuple[dict[str, float], int]:
            raise RuntimeError("the task's metric is broken")
        return evaluate

    config = fed.broker_config(state_dir, rounds=1, sync=SyncConfig(1.0, 2, 20.0), fed_eval_every=1)

    async def scenario() -> None:
        broker = fed.start_broker(ctx, config, evaluator=None)
        crew = [make_worker(ctx, broker.endpoint, 0, good), make_worker(ctx, broker.endpoint, 1, None)]
        crew[1].make_evaluator = broken
        await fed.run_federation(broker, crew)

    fed.run_async(scenario())
    [line] = fed.read_metrics(state_dir)
    assert (line["fed_eval_asked"], line["fed_eval_workers"], line["fed_eval_examples"]) == (2, 1, 60)
    assert line["fed_eval_accuracy"] == pytest.approx(good.seen[0][0]["accuracy"])


@pytest.mark.timeout(90)
@pytest.mark.parametrize("policy", ["ssp:1", "async"])
def test_fed_eval_under_clock_policies_pauses_then_goes_on(fed: Any, ctx: zmq.asyncio.Context, state_dir: Path,
                                                           policy: str) -> None:
    """Under ssp/async the run has no rounds: every 3 model versions (and at the last) the broker stops handing out
    work, asks the workers that pulled to evaluate that version, then goes on; what they evaluated is the version
    the metrics line names."""
    recorders = [Recorder(100 + i, n) for i, n in enumerate(HELD_OUT)]
    config = fed.broker_config(state_dir, policy=policy, rounds=7, fed_eval_every=3)

    async def scenario() -> dict[str, Any]:
        broker = fed.start_broker(ctx, config, evaluator=None)
        crew = [make_worker(ctx, broker.endpoint, i, r) for i, r in enumerate(recorders)]
        summary, *_ = await fed.run_federation(broker, crew)
        return summary

    summary = fed.run_async(scenario())
    metrics = fed.read_metrics(state_dir)
    assert [m["round"] for m in metrics] == list(range(1, 8)) and summary["version"] == 7
    evaluated = [m for m in metrics if m["fed_eval_accuracy"] is not None]
    assert [m["round"] for m in evaluated] == [3, 6, 7], [(m["round"], m["fed_eval_asked"]) for m in metrics]
    for index, line in enumerate(evaluated):
        answers = [r.seen[index] for r in recorders]
        assert line["fed_eval_examples"] == sum(HELD_OUT) and line["fed_eval_workers"] == 3
        expected = sum(m["accuracy"] * n for m, n in answers) / sum(HELD_OUT)
        assert line["fed_eval_accuracy"] == pytest.approx(expected, rel=1e-12)
    assert all(len(r.seen) == 3 for r in recorders)
