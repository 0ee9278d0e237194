"""FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2): v is an exponential average of Δ²."""

from __future__ import annotations

import numpy as np

from fedctl.strategies.registry import register
from fedctl.strategies.serveropt import AdaptiveOptimizer


@register
class FedAdam(AdaptiveOptimizer):
    """Adam at the broker: m ← β₁m + (1−β₁)Δ, v ← β₂v + (1−β₂)Δ², x ← x + η·m/(√v + τ).

    m_{−1} = 0, v_{−1} = τ², no bias correction; float64 moments ``m/<name>``, ``v/<name>`` in the broker state
    (see :mod:`fedctl.strategies.serveropt`). Workers run FedAvg's local SGD.
    """

    name = "fedadam"

    def second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        beta2 = float(self.opts["beta2"])
        return beta2 * v + (1.0 - beta2) * delta_sq
