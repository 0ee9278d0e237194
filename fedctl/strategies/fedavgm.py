"""FedAvgM: Federated Averaging with server momentum (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data
Distribution for Federated Visual Classification"), as Reddi et al. 2021 use it: m ← β·m + Δ, x ← x + η·m."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedctl.strategies.base import Option
from fedctl.strategies.registry import register
from fedctl.strategies.serveropt import ServerOptimizer, eta_option


@register
class FedAvgM(ServerOptimizer):
    """FedAvg with server momentum: m ← β·m + Δ, x ← x + η·m on the average change Δ (β=0, η=1: FedAvg).

    m_{−1} = 0; m is kept per tensor as ``m/<name>`` in the broker state (float64; see
    :mod:`fedctl.strategies.serveropt`). Workers run FedAvg's local SGD.
    """

    name = "fedavgm"
    options = {"eta": eta_option(1.0, "x ← x + η·m"),
               "beta": Option(float, 0.9, "server momentum β: m ← β·m + Δ (0 with eta=1 is FedAvg)",
                              lambda v: 0.0 <= v < 1.0, "in [0, 1)")}

    def step(self, delta: np.ndarray, saved: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        m = float(self.opts["beta"]) * saved["m"] + delta
        return float(self.opts["eta"]) * m, {"m": m}
