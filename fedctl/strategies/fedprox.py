"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020): FedAvg whose workers minimise
their loss plus the proximal term (μ/2)·‖w − w_t‖², w_t the global model they were handed.

The term's gradient μ·(w − w_t) is added to every local SGD step's gradient by the trainer's gradient correction
(``Trainer.fit(..., prox_mu=μ)``), before the optimiser sees it, so it also reaches a user task's own optimiser. It
keeps a worker's E epochs from drifting far from w_t on its own (non-IID) data. The broker side is FedAvg's:
the n_k-weighted mean (sync) and its staleness-weighted change (ssp/async). μ = 0 is FedAvg exactly (the trainer
then runs plain SGD: no correction at all).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedctl.strategies.base import ClientResult, LocalTrainer, Option, Params
from fedctl.strategies.fedavg import FedAvg
from fedctl.strategies.registry import register
from fedctl.wire.constants import KIND_WEIGHTS


@register
class FedProx(FedAvg):
    """FedAvg with the proximal term (μ/2)‖w − w_t‖² in each worker's local objective; the n_k-weighted mean.

    Option ``mu`` (μ ≥ 0, default 0.01; 0 is FedAvg). Runs under every policy (sync, ssp, async) as FedAvg does.
    """

    name = "fedprox"
    policies = ("sync", "ssp", "async")  # FedAvg's broker side, which applies stale updates as their change
    options = {"mu": Option(float, 0.01, "proximal coefficient μ: each local step adds μ·(w − w_t) to the gradient "
                            "(0 = FedAvg)", lambda v: 0.0 <= v < math.inf, "a finite number >= 0")}

    def client_update(self, weights: Params, trainer: LocalTrainer, task: Mapping[str, Any],
                      state: Mapping[str, np.ndarray]) -> ClientResult:
        mu = float(self.opts["mu"])
        args = (weights, int(task["epochs"]), int(task["batch_size"]), float(task["lr"]), int(task["seed"]))
        # μ = 0 calls fit exactly as FedAvg does (any trainer, no correction).
        result = trainer.fit(*args, prox_mu=mu) if mu > 0 else trainer.fit(*args)
        return ClientResult(KIND_WEIGHTS, result.params, result.num_examples, dict(result.metrics))
