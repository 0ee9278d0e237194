"""DP-FedAvg through a real broker over ZeroMQ (docs/privacy.md): ε after every round in metrics.jsonl, the run
ending before --dp-target-epsilon would be exceeded (and refusing to resume past it), and the model moving by the
clipped mean plus noise of the promised scale."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq.asyncio

from fedctl.broker.policy import SyncConfig
from fedctl.errors import ConfigError
from fedctl.privacy import Accountant, RoundEvent
from fedctl.strategies import TaskConfig

pytestmark = pytest.mark.timeout(120)


class Recorder:
    def __init__(self) -> None:
        self.fits: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = []

    def wrap(self, trainer: Any) -> Any:
        fit = trainer.fit

        def recording(weights: Any, *args: Any, **kwargs: Any) -> Any:
            result = fit(weights, *args, **kwargs)
            self.fits.append(({k: v.copy() for k, v in weights.items()}, dict(result.params)))
            return result

        trainer.fit = recording
        return trainer


def run(fed: Any, ctx: zmq.asyncio.Context, state_dir: Path, rounds: int, recorders: list[Recorder] | None = None,
        **dp: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    config = fed.broker_config(state_dir, rounds=rounds, sync=SyncConfig(1.0, 4, 20.0), task=TaskConfig(1, 20, 0.1),
                               keep_models=None, **dp)
    initial: dict[str, np.ndarray] = {}

    async def scenario() -> dict[str, Any]:
        broker = fed.start_broker(ctx, config)
        initial.update({k: v.copy() for k, v in broker.store.weights.items()})
        workers = [fed.mlp_worker(ctx, broker.endpoint, i, n=120,
                                  wrap=recorders[i].wrap if recorders else None) for i in range(4)]
        summary, *_ = await fed.run_federation(broker, workers)
        return summary

    return fed.run_async(scenario()), initial


def round_one_noise(state_dir: Path, initial: dict[str, np.ndarray], recorders: list[Recorder],
                    clip: float) -> np.ndarray:
    """How far round 1's model is from the initial one plus the uniform mean of the workers' changes clipped to L2
    norm ``clip`` (their first trainings): the noise DP added."""
    from fedctl.broker.store import Checkpointer

    after = Checkpointer(state_dir).load_version(1)
    names = sorted(initial)
    changes = []
    for r in recorders:
        base, new = r.fits[0]
        v = np.concatenate([(new[k] - base[k]).ravel() for k in names]).astype(np.float64)
        changes.append(v * min(1.0, clip / np.linalg.norm(v)))
    moved = np.concatenate([(after[k] - initial[k]).ravel() for k in names]).astype(np.float64)
    return moved - np.mean(changes, axis=0)


def test_epsilon_after_every_round_and_the_noise_on_the_mean(fed: Any, ctx: zmq.asyncio.Context,
                                                             state_dir: Path) -> None:
    recorders = [Recorder() for _ in range(4)]
    summary, initial = run(fed, ctx, state_dir, 3, recorders, dp_noise_multiplier=0.5, dp_clip=0.05)
    metrics = fed.read_metrics(state_dir)
    eps = [m["dp"]["epsilon"] for m in metrics]
    expected = [Accountant(1e-5).epsilon([RoundEvent(4, 4, 0.5)] * r) for r in (1, 2, 3)]
    assert eps == pytest.approx(expected, rel=1e-6) and eps[0] < eps[1] < eps[2]
    assert summary["dp"]["epsilon"] == pytest.approx(eps[-1]) and all(m["participants"] == 4 for m in metrics)
    # Round 1: the model moved by the mean of the clipped changes plus N(0, (z·S/4)²) per value.
    noise = round_one_noise(state_dir, initial, recorders, clip=0.05)
    assert float(np.std(noise)) == pytest.approx(0.5 * 0.05 / 4, rel=0.02)
    assert abs(float(np.mean(noise))) < 1e-4


def test_the_run_ends_before_the_target_epsilon_and_will_not_resume_past_it(fed: Any, ctx: zmq.asyncio.Context,
                                                                             state_dir: Path) -> None:
    per_round = [Accountant(1e-5).epsilon([RoundEvent(4, 4, 1.0)] * r) for r in range(1, 6)]
    target = (per_round[1] + per_round[2]) / 2  # two rounds fit, three do not
    summary, _ = run(fed, ctx, state_dir, 5, dp_noise_multiplier=1.0, dp_target_epsilon=target)
    metrics = fed.read_metrics(state_dir)
    assert [m["round"] for m in metrics] == [1, 2] and metrics[-1]["dp"]["epsilon"] <= target
    assert summary["rounds"] == 2
    with pytest.raises(ConfigError, match="is already exceeded: this run has spent ε = "):
        run(fed, ctx, state_dir, 5, dp_noise_multiplier=1.0, dp_target_epsilon=per_round[0])


def test_distributed_dp_under_secure_aggregation(fed: Any, ctx: zmq.asyncio.Context, state_dir: Path) -> None:
    """The workers clip and add noise of std z·S/√m each; the broker only unmasks the sum. The model moves by the
    uniform mean of the clipped changes plus noise of std z·S/m, and the accountant is charged z."""
    recorders = [Recorder() for _ in range(4)]
    _, initial = run(fed, ctx, state_dir, 2, recorders, dp_noise_multiplier=0.5, dp_clip=0.05,
                     secure_aggregation=True, secagg_clip=1.0)
    metrics = fed.read_metrics(state_dir)
    assert [m["dp"]["mode"] for m in metrics] == ["distributed"] * 2
    assert [m["dp"]["epsilon"] for m in metrics] == pytest.approx(
        [Accountant(1e-5).epsilon([RoundEvent(4, 4, 0.5)] * r) for r in (1, 2)], rel=1e-6)
    noise = round_one_noise(state_dir, initial, recorders, clip=0.05)
    assert float(np.std(noise)) == pytest.approx(0.5 * 0.05 / 4, rel=0.02)
