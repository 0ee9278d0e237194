"""The broker's DP-FedAvg (``fedctl serve --dp-noise-multiplier Z --dp-clip S``, docs/privacy.md): each round's
updates become one noisy mean, and the accountant charges the round.

Central DP: the broker sees the updates (use it with a trusted broker, or combine with secure aggregation for
distributed DP, where the workers add the noise). Each update's change u_k (a weights update minus the model it
trained on, or a gradient) is clipped to L2 norm S, the sum gets N(0, (z_Δ·S)² I) — z_Δ = z with fixed clipping,
slightly more with adaptive clipping, whose noisy count takes the rest — and is divided by the number of updates.
The noise comes from the OS's entropy, never from the run's ``--seed``. The round's (K, m, z) is kept in the run
state, so ε after every round is recomputed on resume, and ``--dp-target-epsilon`` ends the run before a round
would exceed it.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedctl.errors import ConfigError
from fedctl.models import ModelSpec
from fedctl.privacy import Accountant, AdaptiveClip, DPConfig, RoundEvent, clip_l2
from fedctl.strategies.base import Update
from fedctl.strategies.kernels import change_vector, from_change_vector

log = logging.getLogger(__name__)


class PrivateRounds:
    """DP state of a run: the accountant's rounds, the clipping bound, the noise generator."""

    def __init__(self, config: DPConfig, saved: Mapping[str, Any] | None = None) -> None:
        saved = saved or {}
        self.config = config
        self.accountant = Accountant(config.delta, "fixed")
        self.rounds = [RoundEvent(int(k), int(m), float(z)) for k, m, z in saved.get("rounds", [])]
        self.clip = AdaptiveClip(float(saved.get("clip", config.clip)), config.adaptive_quantile, config.clip_lr)
        self._rng = np.random.default_rng(secrets.randbits(128))

    def epsilon(self, extra: Sequence[RoundEvent] = ()) -> float:
        return self.accountant.epsilon([*self.rounds, *extra])

    def over_budget(self, population: int, sampled: int) -> float | None:
        """ε after one more round of ``sampled`` of ``population`` workers, if that exceeds the target; else None."""
        target = self.config.target_epsilon
        if target is None:
            return None
        eps = self.epsilon([RoundEvent(population, sampled, self.config.noise_multiplier)])
        return eps if eps > target else None

    def saved(self) -> dict[str, Any]:
        return {"rounds": [[r.population, r.sampled, r.z] for r in self.rounds], "clip": self.clip.bound}

    def record_distributed(self, population: int, handed: int, summed: int) -> dict[str, Any]:
        """Distributed DP under secure aggregation: the round's sum holds the noise of the ``summed`` workers whose
        input arrived, std z·S·√(summed/handed) — the accountant is charged that smaller noise multiplier (a
        dropout weakens the round's guarantee, never hides it)."""
        z_eff = self.config.noise_multiplier * (summed / max(handed, 1)) ** 0.5
        self.rounds.append(RoundEvent(population, handed, z_eff))
        return {"epsilon": round(self.epsilon(), 6), "delta": self.config.delta,
                "noise_multiplier": self.config.noise_multiplier, "effective_noise_multiplier": round(z_eff, 6),
                "clip": self.clip.bound, "mode": "distributed", "population": population, "sampled": handed,
                "summed": summed}

    def private_update(self, spec: ModelSpec, base: Mapping[str, np.ndarray], kind: str, updates: Sequence[Update],
                       population: int, sampled: int, round_no: int) -> tuple[Update, dict[str, Any]]:
        """Central DP: the round's one update (the noisy mean change, as ``kind``) and its ``dp`` metrics."""
        bound = self.clip.bound
        z_update = self.config.update_noise(sampled)
        total = np.zeros(spec.num_params, np.float64)
        unclipped = 0
        for u in updates:
            clipped, within = clip_l2(change_vector(spec, base, kind, u.tensors), bound)
            total += clipped
            unclipped += within
        total += self._rng.normal(0.0, z_update * bound, size=total.shape)
        mean = total / max(len(updates), 1)
        fraction = self.clip.update(unclipped, sampled, self.config.count_noise(sampled), self._rng)
        self.rounds.append(RoundEvent(population, sampled, self.config.noise_multiplier))
        tensors = from_change_vector(spec, base, kind, mean)
        metrics = {"epsilon": round(self.epsilon(), 6), "delta": self.config.delta,
                   "noise_multiplier": self.config.noise_multiplier, "clip": bound, "next_clip": self.clip.bound,
                   "mode": self.config.mode, "population": population, "sampled": sampled}
        if self.config.adaptive_quantile is not None:
            metrics["unclipped_fraction"] = round(fraction, 6)  # the noisy release, not the true count
        update = Update("dp-aggregate", sum(u.num_examples for u in updates), tensors, kind,
                        updates[0].base_version if updates else 0, {}, round_no, 0)
        return update, metrics


def check_budget(config: DPConfig | None, saved: Mapping[str, Any] | None, rounds_done: int) -> None:
    """Refuse to resume a DP run whose spent ε already exceeds ``--dp-target-epsilon`` (before anything starts)."""
    if config is None or config.target_epsilon is None or not saved:
        return
    private = PrivateRounds(config, saved)
    spent = private.epsilon()
    if spent > config.target_epsilon:
        raise ConfigError(f"--dp-target-epsilon {config.target_epsilon:g} is already exceeded: this run has spent "
                          f"ε = {spent:.3f} (δ = {config.delta:g}) in {rounds_done} rounds",
                          "raise --dp-target-epsilon, or start a new run with another --state-dir")
