"""FedAdagrad (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2): v accumulates Δ²."""

from __future__ import annotations

import numpy as np

from fedctl.strategies.registry import register
from fedctl.strategies.serveropt import AdaptiveOptimizer


@register
class FedAdagrad(AdaptiveOptimizer):
    """Adagrad at the broker: m ← β₁m + (1−β₁)Δ, v ← v + Δ², x ← x + η·m/(√v + τ); β₂ is not used.

    m_{−1} = 0, v_{−1} = τ², no bias correction; float64 moments ``m/<name>``, ``v/<name>`` in the broker state
    (see :mod:`fedctl.strategies.serveropt`). Workers run FedAvg's local SGD.
    """

    name = "fedadagrad"

    def second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return v + delta_sq
