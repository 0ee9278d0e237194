"""DP-FedAvg's arithmetic: each worker's update clipped to L2 norm S, Gaussian noise of std z·S on the sum, the
sum divided by the number of updates (a public count), and adaptive clipping.

Adaptive clipping (Andrew et al., "Differentially Private Learning with Adaptive Clipping", NeurIPS 2021): each
round also releases the noisy fraction of updates that were *not* clipped, b̄ = (Σ 1[‖Δ_k‖ ≤ S] + N(0, σ_b²)) / m,
and moves the bound geometrically towards the target quantile γ: S ← S · exp(−η (b̄ − γ)). The two releases
together are a Gaussian mechanism with noise multiplier z when the update sum gets z_Δ = (z^−2 − (2σ_b)^−2)^−1/2
(as Andrew et al. show), so the accountant charges z for
the round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DPConfig:
    """``--dp-noise-multiplier`` z, ``--dp-clip`` S (initial, when adaptive), ``--dp-delta`` δ,
    ``--dp-target-epsilon`` (stop before exceeding it), ``--dp-adaptive-quantile`` γ (None: fixed clipping),
    ``--dp-clip-lr`` η, and where the noise is added: ``central`` (the broker, on the sum it makes) or
    ``distributed`` (each worker adds its share, under secure aggregation)."""

    noise_multiplier: float
    clip: float
    delta: float = 1e-5
    target_epsilon: float | None = None
    adaptive_quantile: float | None = None
    clip_lr: float = 0.2
    mode: str = "central"

    def count_noise(self, expected: int) -> float:
        """σ_b of adaptive clipping's count: expected updates / 20 (Andrew et al.'s recommendation)."""
        return max(expected, 1) / 20.0

    def update_noise(self, expected: int) -> float:
        """z_Δ, the noise multiplier of the update sum (z itself with fixed clipping)."""
        if self.adaptive_quantile is None:
            return self.noise_multiplier
        rest = self.noise_multiplier ** -2 - (2 * self.count_noise(expected)) ** -2
        if rest <= 0:
            raise ValueError(f"adaptive clipping with {expected} updates per round: its count's noise σ_b = "
                             f"{self.count_noise(expected):g} would spend more than noise multiplier "
                             f"{self.noise_multiplier:g} allows (σ_b must exceed z/2: sample more workers)")
        return rest ** -0.5


def clip_l2(vector: np.ndarray, bound: float) -> tuple[np.ndarray, bool]:
    """``vector`` scaled down to L2 norm ``bound`` if longer; whether it was within the bound."""
    norm = float(np.linalg.norm(vector))
    if norm <= bound:
        return vector, True
    return vector * (bound / norm), False


def noisy_mean(vectors: list[np.ndarray], bound: float, z: float, rng: np.random.Generator) -> np.ndarray:
    """Central DP: Σ clip(v_k, S) + N(0, (z·S)² I), divided by the number of vectors."""
    total = np.zeros_like(vectors[0], dtype=np.float64)
    for v in vectors:
        total += clip_l2(np.asarray(v, np.float64), bound)[0]
    total += rng.normal(0.0, z * bound, size=total.shape)
    return total / len(vectors)


@dataclass
class AdaptiveClip:
    """The clipping bound S across rounds (fixed unless ``quantile`` is set)."""

    bound: float
    quantile: float | None = None
    lr: float = 0.2

    def update(self, unclipped: int, expected: int, count_noise: float, rng: np.random.Generator) -> float:
        """After a round in which ``unclipped`` of the updates were within the bound: the noisy fraction b̄ (the
        only thing released) and the new bound."""
        if self.quantile is None:
            return float("nan")
        fraction = (unclipped + rng.normal(0.0, count_noise)) / max(expected, 1)
        self.bound *= math.exp(-self.lr * (fraction - self.quantile))
        return fraction
