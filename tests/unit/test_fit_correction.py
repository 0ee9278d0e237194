"""The trainers' gradient correction (``fit(..., prox_mu, grad_offset)``, FedProx and SCAFFOLD): in PyTorch and MXNet,
for the built-in mlp and for user tasks with their own optimiser, each step's gradient gets + μ·(w − w₀) + offset
— checked against SGD steps computed by hand in numpy — and with both off, fit is exactly what it was."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedctl.errors import ConfigError, ModelMismatch
from fedctl.models import get_model, init_params
from fedctl.strategies import TaskConfig, get_strategy
from fedctl.strategies.base import EXTRA_TENSORS, Params
from fedctl.tasks import load_task
from fedctl.testing.trainers import mlp_loss_grad
from fedctl.worker.frameworks import create_trainer, epoch_batches

BACKENDS = ["torch", "mxnet"]



def shard(n: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, size=n).astype(np.int64)


def offsets(weights: Params, seed: int = 3) -> Params:
    rng = np.random.default_rng(seed)
    return {k: (0.05 * rng.normal(size=v.shape)).astype(np.float32) for k, v in weights.items()}


def close(got: Params, want: Params) -> None:
    for name, w in want.items():
        scale = max(float(np.abs(w).max()), 1e-6)
        np.testing.assert_allclose(got[name], w, rtol=1e-4, atol=1e-5 * scale, err_msg=name)


def hand_sgd(w0: Params, x: np.ndarray, y: np.ndarray, batches: list[np.ndarray], lr: float, mu: float,
             offset: Params | None) -> Params:
    """SGD by hand on the zoo mlp: per batch, w ← w − lr·(∇L(w) + mu·(w − w0) + offset), in float64."""
    w = {k: v.astype(np.float64) for k, v in w0.items()}
    for idx in batches:
        _, g = mlp_loss_grad({k: v.astype(np.float32) for k, v in w.items()}, x[idx], y[idx])
        w = {k: v - lr * (g[k] + mu * (v - w0[k]) + (0.0 if offset is None else offset[k])) for k, v in w.items()}
    return w


def test_one_step_with_a_gradient_offset_is_the_hand_computed_step(backend: str) -> None:
    x, y = shard()
    w0 = init_params(get_model("mlp"), seed=1)
    off = offsets(w0)
    result = create_trainer(backend, get_model("mlp"), x, y, threads=1).fit(w0, 1, 0, 0.3, seed=0, grad_offset=off)
    assert result.metrics["steps"] == 1
    close(result.params, hand_sgd(w0, x, y, [np.arange(48)], 0.3, 0.0, off))


def test_the_proximal_term_pulls_the_second_step_back_to_the_start(backend: str) -> None:
    """Full batch, two epochs: the proximal gradient is zero at w₀, then μ·(w₁ − w₀)."""
    x, y = shard()
    w0 = init_params(get_model("mlp"), seed=2)
    result = create_trainer(backend, get_model("mlp"), x, y, threads=1).fit(w0, 2, 0, 0.5, seed=0, prox_mu=2.0)
    assert result.metrics["steps"] == 2
    close(result.params, hand_sgd(w0, x, y, [np.arange(48)] * 2, 0.5, 2.0, None))
    plain = create_trainer(backend, get_model("mlp"), x, y, threads=1).fit(w0, 2, 0, 0.5, seed=0).params
    assert not np.allclose(plain["fc1.weight"], result.params["fc1.weight"]), "μ = 2 changes the second step"


def test_both_corrections_over_shuffled_mini_batches(backend: str) -> None:
    x, y = shard(50)
    w0 = init_params(get_model("mlp"), seed=3)
    off = offsets(w0, seed=4)
    result = create_trainer(backend, get_model("mlp"), x, y, threads=1).fit(w0, 2, 16, 0.1, seed=9, prox_mu=0.7,
                                                                           grad_offset=off)
    rng = np.random.default_rng(9)  # the batch plan fit draws from its seed
    batches = [b for _ in range(2) for b in epoch_batches(50, 16, rng)]
    assert result.metrics["steps"] == len(batches) == 8
    close(result.params, hand_sgd(w0, x, y, batches, 0.1, 0.7, off))


def test_with_both_off_fit_is_plain_sgd_bit_for_bit(backend: str) -> None:
    x, y = shard()
    w0 = init_params(get_model("mlp"), seed=5)
    trainer = create_trainer(backend, get_model("mlp"), x, y, threads=1)
    plain = trainer.fit(w0, 1, 16, 0.1, seed=1)
    off = trainer.fit(w0, 1, 16, 0.1, seed=1, prox_mu=0.0, grad_offset=None)
    empty = trainer.fit(w0, 1, 16, 0.1, seed=1, prox_mu=0.0, grad_offset={})
    for name in w0:
        assert plain.params[name].tobytes() == off.params[name].tobytes() == empty.params[name].tobytes(), name
    assert plain.metrics == off.metrics


def test_bad_corrections_are_refused(backend: str) -> None:
    x, y = shard(8)
    w0 = init_params(get_model("mlp"), seed=0)
    trainer = create_trainer(backend, get_model("mlp"), x, y, threads=1)
    with pytest.raises(ConfigError, match="proximal"):
        trainer.fit(w0, 1, 0, 0.1, seed=0, prox_mu=-1.0)
    with pytest.raises(ModelMismatch, match="fc1.bias"):
        trainer.fit(w0, 1, 0, 0.1, seed=0, grad_offset={"fc1.bias": np.zeros(3, np.float32)})
    with pytest.raises(ConfigError, match="NaN"):
        trainer.fit(w0, 1, 0, 0.1, seed=0, grad_offset={"fc1.bias": np.full(128, np.nan, np.float32)})


# ----------------------------------------------------------------------------------------------- user tasks
TORCH_TASK = """
    import torch
    from torch import nn

    def model():
        return nn.Sequential(nn.Linear(6, 3))

    def optimizer(params, lr):
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
"""
GLUON_TASK = """
    from mxnet import gluon
    from mxnet.gluon import nn as gnn

    def gluon_model():
        net = gnn.HybridSequential()
        net.add(gnn.Dense(3, in_units=6))
        return net

    def gluon_optimizer(params, lr):
        return gluon.Trainer(params, "sgd", {"learning_rate": lr, "momentum": 0.9})
"""


def task_trainer(tmp_path: Path, framework: str) -> tuple[Any, Params, np.ndarray, np.ndarray]:
    pytest.importorskip(framework)
    path = tmp_path / f"{framework}_task.py"
    path.write_text(textwrap.dedent(TORCH_TASK if framework == "torch" else GLUON_TASK))
    task = load_task(str(path))
    if framework == "torch":
        from fedctl.worker.frameworks.torch_task import task_spec
    else:
        from fedctl.worker.frameworks.mxnet_task import task_spec
    spec, weights = task_spec(task, seed=1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 6)).astype(np.float32)
    y = rng.integers(0, 3, size=30).astype(np.int64)
    return create_trainer(framework, spec, x, y, threads=1, task=task), weights, x, y


@pytest.mark.parametrize("framework", BACKENDS)
def test_a_tasks_own_optimizer_sees_the_corrected_gradient(tmp_path: Path, framework: str) -> None:
    """Heavy-ball SGD (momentum 0.9), full batch, two steps, by hand: v₁ = g(w₀) + o, w₁ = w₀ − η·v₁;
    v₂ = 0.9·v₁ + g(w₁) + μ·(w₁ − w₀) + o, w₂ = w₁ − η·v₂ (g: the trainer's own full-batch gradient)."""
    trainer, w0, _, _ = task_trainer(tmp_path, framework)
    lr, mu = 0.2, 1.5
    off = offsets(w0, seed=7)
    result = trainer.fit(w0, 2, 0, lr, seed=0, prox_mu=mu, grad_offset=off)
    g0 = trainer.gradient(w0, 0, 0).params
    v1 = {k: g0[k] + off[k] for k in w0}
    w1 = {k: w0[k] - lr * v1[k] for k in w0}
    g1 = trainer.gradient(w1, 0, 0).params
    w2 = {k: w1[k] - lr * (0.9 * v1[k] + g1[k] + mu * (w1[k] - w0[k]) + off[k]) for k in w0}
    assert result.metrics["steps"] == 2
    close(result.params, w2)


@pytest.mark.parametrize("framework", BACKENDS)
def test_scaffold_refuses_a_task_with_its_own_optimizer(tmp_path: Path, framework: str) -> None:
    trainer, w0, _, _ = task_trainer(tmp_path, framework)
    assert trainer.own_optimizer
    task = {"epochs": 1, "batch_size": 0, "lr": 0.1, "seed": 0,
            EXTRA_TENSORS: {f"scaffold.c/{k}": np.zeros_like(v) for k, v in w0.items()}}
    with pytest.raises(ConfigError, match="plain SGD") as info:
        get_strategy("scaffold", TaskConfig()).client_update(w0, trainer, task, {})
    assert "\n" not in str(info.value.message)
    # FedProx's term reaches any optimizer: it trains
    out = get_strategy("fedprox", TaskConfig(options={"mu": 0.1})).client_update(w0, trainer, task, {})
    assert set(out.tensors) == set(w0)
