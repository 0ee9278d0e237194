"""Federated SGD (McMahan et al. 2017): workers send gradients, the broker takes one SGD step on their mean.

With B = 0 (∞) a worker's gradient is the mean over its whole shard, so one round is one step of full-batch
gradient descent over the union of the participants' data. With B > 0 it is the gradient of one random
mini-batch of B local examples (synchronous large-batch SGD). E is ignored: one gradient per round.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedctl.strategies.base import (
    AggregateResult,
    ClientResult,
    LocalTrainer,
    Option,
    Params,
    Strategy,
    TaskConfig,
    Update,
)
from fedctl.strategies.kernels import axpy, weighted_mean
from fedctl.strategies.registry import register
from fedctl.wire.constants import KIND_GRADIENT
from fedctl.wire.tensors import Tensor


@register
class FedSGD(Strategy):
    """w ← w − η_t · Σ_k (n_k/n) · g_k, with η_t = η · lr_decay^t after t aggregations (state ``step``).

    With ``--opt momentum=β`` > 0 the broker steps with heavy-ball momentum on the mean gradient (server
    momentum, as in FedAvgM / Reddi et al. 2021): v ← β·v + ḡ, w ← w − η_t·v; v is kept in the broker state
    (checkpointed). β = 0, the default, is McMahan et al.'s plain FedSGD. ``clip=c`` scales the mean gradient
    down to global L2 norm c when it is longer (a guard against the loss spikes of large full-batch steps) and
    ``weight_decay=λ`` adds λ·w to it (L2 regularisation, applied by the broker: workers are unchanged).
    """

    name = "fedsgd"
    update_kind = KIND_GRADIENT
    options = {"momentum": Option(float, 0.0, "server momentum β on the mean gradient (0 = plain FedSGD)",
                                  lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
               "clip": Option(float, 0.0, "largest global L2 norm of the mean gradient (0 = no clipping)",
                              lambda v: v >= 0.0, ">= 0"),
               "weight_decay": Option(float, 0.0, "L2 regularisation λ: the broker steps on ḡ + λ·w",
                                      lambda v: v >= 0.0, ">= 0")}

    def client_update(self, weights: Params, trainer: LocalTrainer, task: Mapping[str, Any],
                      state: Mapping[str, np.ndarray]) -> ClientResult:
        result = trainer.gradient(weights, int(task["batch_size"]), int(task["seed"]))
        return ClientResult(KIND_GRADIENT, result.params, result.num_examples, dict(result.metrics))

    def aggregate(self, weights: Params, updates: Sequence[Update], state: dict[str, Any],
                  rng: np.random.Generator) -> AggregateResult:
        grad = mean_gradient(updates)
        norm = float(np.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grad.values())))
        clip, decay = float(self.opts["clip"]), float(self.opts["weight_decay"])
        if 0 < clip < norm:
            grad = {name: g * np.float32(clip / norm) for name, g in grad.items()}
        if decay > 0:
            grad = {name: grad.get(name, np.float32(0.0)) + np.float32(decay) * w for name, w in weights.items()}
        beta = float(self.opts["momentum"])
        if beta > 0:
            velocity = {name: beta * np.asarray(state.get(f"velocity/{name}", 0.0), np.float32) + g
                        for name, g in grad.items()}
            state = {**state, **{f"velocity/{name}": v.astype(np.float32) for name, v in velocity.items()}}
            grad = velocity
        return sgd_step(self.task, weights, grad, state, {"updates": float(len(updates)), "grad_norm": norm})


def mean_gradient(updates: Sequence[Update]) -> Params:
    """Σ_k (n_k/n) · g_k over the updates' tensors (dense or sparse), dense."""
    return weighted_mean([u.tensors for u in updates], [u.num_examples for u in updates])


def sgd_step(task: TaskConfig, weights: Params, grad: Mapping[str, Tensor], state: dict[str, Any],
             metrics: dict[str, float]) -> AggregateResult:
    """w ← w − η_t · grad, η_t the task's rate after ``state["step"]`` steps; the state counts this step and the
    metrics gain ``lr``. The broker side of FedSGD and of the gradient strategies built on it (DGC)."""
    step = int(state.get("step", 0))
    lr = task.lr_at(step)
    return AggregateResult(axpy(-lr, grad, weights), {**state, "step": step + 1}, {**metrics, "lr": lr})
