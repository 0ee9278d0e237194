"""Federated SGD (McMahan et al. 2017): workers send gradients, the broker takes one SGD step on their mean.

With B = 0 (∞) a worker's gradient is the mean over its whole shard, so one round is one step of full-batch
gradient descent over the union of the participants' data. With B > 0 it is the gradient of one random
mini-batch of B local examples (synchronous large-batch SGD). E is ignored: one gradient per round.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedctl.strategies.base import AggregateResult, ClientResult, LocalTrainer, Params, Strategy, Update
from fedctl.strategies.kernels import axpy, weighted_mean
from fedctl.strategies.registry import register
from fedctl.wire.constants import KIND_GRADIENT


@register
class FedSGD(Strategy):
    """w ← w − η_t · Σ_k (n_k/n) · g_k, with η_t = η · lr_decay^t after t aggregations (state ``step``)."""

    name = "fedsgd"
    update_kind = KIND_GRADIENT

    def client_update(self, weights: Params, trainer: LocalTrainer, task: Mapping[str, Any],
                      state: Mapping[str, np.ndarray]) -> ClientResult:
        result = trainer.gradient(weights, int(task["batch_size"]), int(task["seed"]))
        return ClientResult(KIND_GRADIENT, result.params, result.num_examples, dict(result.metrics))

    def aggregate(self, weights: Params, updates: Sequence[Update], state: dict[str, Any],
                  rng: np.random.Generator) -> AggregateResult:
        grad = weighted_mean([u.tensors for u in updates], [u.num_examples for u in updates])
        norm = float(np.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grad.values())))
        step = int(state.get("step", 0))
        lr = self.task.lr_at(step)
        return AggregateResult(axpy(-lr, grad, weights), {**state, "step": step + 1},
                               {"updates": float(len(updates)), "grad_norm": norm, "lr": lr})
