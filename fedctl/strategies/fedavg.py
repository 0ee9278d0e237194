"""Federated Averaging (McMahan et al. 2017): E local epochs of mini-batch SGD, then the n_k-weighted mean."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedctl.strategies.base import (
    AggregateResult,
    ClientResult,
    LocalTrainer,
    Params,
    Strategy,
    Update,
    scale_tensors,
)
from fedctl.strategies.kernels import axpy, weighted_mean, weighted_sum
from fedctl.strategies.registry import register
from fedctl.wire.constants import KIND_WEIGHTS


@register
class FedAvg(Strategy):
    """Workers return their weights after E epochs with batch B; the broker sets w ← Σ_k (n_k/n) · w_k."""

    name = "fedavg"
    update_kind = KIND_WEIGHTS

    def client_update(self, weights: Params, trainer: LocalTrainer, task: Mapping[str, Any],
                      state: Mapping[str, np.ndarray]) -> ClientResult:
        result = trainer.fit(weights, int(task["epochs"]), int(task["batch_size"]), float(task["lr"]),
                             int(task["seed"]))
        return ClientResult(KIND_WEIGHTS, result.params, result.num_examples, dict(result.metrics))

    def aggregate(self, weights: Params, updates: Sequence[Update], state: dict[str, Any],
                  rng: np.random.Generator) -> AggregateResult:
        new = weighted_mean([u.tensors for u in updates], [u.num_examples for u in updates])
        return AggregateResult(new, state, {"updates": float(len(updates))})

    def apply_async(self, weights: Params, updates: Sequence[Update], scales: Sequence[float],
                    state: dict[str, Any], rng: np.random.Generator, population: int = 0) -> AggregateResult:
        """SSP / async: w ← w + Σ_k (n_k/N) · s_k · Δ_k, Δ_k the change worker k made to its base model, s_k its
        staleness weight and N the examples of all live workers. Each update moves w by its share of a synchronous
        FedAvg round over everyone (with every worker fresh and in one group — ``ssp:0 --buffer K`` — this is
        exactly that round); applying each whole Δ_k instead would overshoot K-fold."""
        n = max(population, sum(u.num_examples for u in updates), 1)
        scaled = [scale_tensors(u.tensors, s * u.num_examples / n) for u, s in zip(updates, scales)]
        change = weighted_sum(scaled, [1.0] * len(scaled))
        return AggregateResult(axpy(1.0, change, weights), state, {"updates": float(len(updates))})
