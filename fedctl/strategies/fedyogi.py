"""FedYogi (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2; Yogi: Zaheer et al. 2018): v moves
towards Δ² by at most (1 − β₂)Δ² a round, additively, so it cannot collapse after one large round as Adam's can."""

from __future__ import annotations

import numpy as np

from fedctl.strategies.registry import register
from fedctl.strategies.serveropt import AdaptiveOptimizer


@register
class FedYogi(AdaptiveOptimizer):
    """Yogi at the broker: m ← β₁m + (1−β₁)Δ, v ← v − (1−β₂)Δ²·sign(v − Δ²), x ← x + η·m/(√v + τ).

    m_{−1} = 0, v_{−1} = τ², no bias correction; float64 moments ``m/<name>``, ``v/<name>`` in the broker state
    (see :mod:`fedctl.strategies.serveropt`). Workers run FedAvg's local SGD.
    """

    name = "fedyogi"

    def second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return v - (1.0 - float(self.opts["beta2"])) * delta_sq * np.sign(v - delta_sq)
