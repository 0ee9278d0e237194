"""Server optimisers (Reddi et al. 2021, "Adaptive Federated Optimization", ICLR 2021, Algorithm 2): FedAvg on the
workers, an optimizer step on the round's pseudo-gradient at the broker.

Workers run FedAvg's client rule unchanged (E local epochs of SGD at the run's ``--lr``, then push their weights
x_k). The broker forms the pseudo-gradient, the example-weighted average change

    Δ_t = Σ_k (n_k/n) · (x_k − x_t)

(with equal n_k the paper's uniform mean; note the sign: Δ_t points where the workers went) and hands it, tensor by
tensor, to the algorithm's :meth:`ServerOptimizer.step`, which returns the change to x_t and its new moment arrays.
The algorithms: :mod:`fedctl.strategies.fedavgm`, :mod:`~fedctl.strategies.fedadagrad`,
:mod:`~fedctl.strategies.fedadam`, :mod:`~fedctl.strategies.fedyogi`.

Precision: the optimizer arithmetic is float64 throughout, and the moments are kept in float64 (a checkpoint holds
them bit for bit, so a resumed run continues exactly); only the model is rounded to float32, once per round, as the
store and the wire hold it. The moments of tensor ``p`` are the arrays ``m/p`` (and ``v/p``) of the broker state
(``AggregateResult.state``), which the broker checkpoints with the model and restores on resume: server memory is
8 bytes per parameter and moment.

The rules are defined for synchronous rounds (every update trained on x_t), so ``policies`` is ``("sync",)``:
the broker refuses ``--policy ssp:S`` and ``async`` with these strategies at start.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from fedctl.errors import ConfigError, ModelMismatch
from fedctl.strategies.base import AggregateResult, Option, Params, Update
from fedctl.strategies.fedavg import FedAvg
from fedctl.strategies.kernels import example_weights, weighted_sum
from fedctl.wire.constants import KIND_WEIGHTS

FLOAT = np.dtype(np.float64)
"""The dtype of the optimizer arithmetic and of the moments kept in the broker state."""


def _positive(v: float) -> bool:
    return 0.0 < v < math.inf


def _decay(v: float) -> bool:
    return 0.0 <= v < 1.0


def eta_option(default: float, rule: str) -> Option:
    """The server learning rate η of an options table, its update ``rule`` in the help."""
    return Option(float, default, f"server learning rate η: {rule} (the workers' rate is --lr)", _positive,
                  "a finite number > 0")


def pseudo_gradient(weights: Params, updates: Sequence[Update]) -> dict[str, np.ndarray]:
    """Δ = Σ_k (n_k/n) · (x_k − x_t) for every tensor of ``weights`` (x_t), in float64.

    A ``weights`` update contributes x_k − x_t, a ``delta`` update its tensors as they are. The updates (dense,
    sparse or fp16) go through the sparse-aware kernel into one accumulator per tensor, and x_t is subtracted once,
    times the weights updates' share of the examples: no update is densified on its own. A tensor that no update
    carries counts as zero there, as in :func:`~fedctl.strategies.kernels.weighted_sum`.
    """
    shares = example_weights([u.num_examples for u in updates])
    total = weighted_sum([u.tensors for u in updates], shares.tolist(), FLOAT)
    base = float(sum(share for u, share in zip(updates, shares) if u.kind == KIND_WEIGHTS))
    return {name: total.get(name, 0.0) - base * x.astype(FLOAT) for name, x in weights.items()}


class ServerOptimizer(FedAvg):
    """FedAvg's worker side; at the broker x ← x + :meth:`step` (Δ) per tensor, the moments kept in the state."""

    policies = ("sync",)
    moments: ClassVar[tuple[str, ...]] = ("m",)
    """The state arrays of each tensor, stored as ``<moment>/<tensor name>``."""

    def initial(self, moment: str, like: np.ndarray) -> np.ndarray:
        """A moment before the first round (m_{−1} = 0); float64 of ``like``'s shape."""
        return np.zeros(like.shape, FLOAT)

    @abstractmethod
    def step(self, delta: np.ndarray, saved: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One tensor's update: from its pseudo-gradient ``delta`` and its ``saved`` moments (float64, by name), the
        change to x and the new moments, float64 and new arrays (the saved ones are never written)."""

    def aggregate(self, weights: Params, updates: Sequence[Update], state: dict[str, Any],
                  rng: np.random.Generator) -> AggregateResult:
        delta = pseudo_gradient(weights, updates)
        new_state, new = dict(state), {}
        delta_sq = step_sq = 0.0
        for name, x in weights.items():
            saved = {m: self._saved(state, m, name, x) for m in self.moments}
            change, moments = self.step(delta[name], saved)
            new_state.update({f"{m}/{name}": moments[m] for m in self.moments})
            new[name] = (x.astype(FLOAT) + change).astype(x.dtype)
            delta_sq += float(np.sum(np.square(delta[name])))
            step_sq += float(np.sum(np.square(change)))
        return AggregateResult(new, new_state, {"updates": float(len(updates)), "delta_norm": math.sqrt(delta_sq),
                                                "step_norm": math.sqrt(step_sq)})

    def apply_async(self, weights: Params, updates: Sequence[Update], scales: Sequence[float],
                    state: dict[str, Any], rng: np.random.Generator, population: int = 0) -> AggregateResult:
        """Not defined: the broker refuses ssp/async with these strategies at start (BrokerConfig); refused here too."""
        raise ConfigError(f"strategy {self.name!r} steps on whole synchronous rounds, not on single updates",
                          "pass --policy sync")

    def _saved(self, state: Mapping[str, Any], moment: str, name: str, like: np.ndarray) -> np.ndarray:
        """The moment ``moment`` of tensor ``name`` from the state (float64), or :meth:`initial` in the first round."""
        saved = state.get(f"{moment}/{name}")
        if saved is None:
            return self.initial(moment, like)
        if np.shape(saved) != like.shape:
            raise ModelMismatch(f"the broker state's {moment}/{name} has shape {np.shape(saved)}, the model "
                                f"{like.shape}", "the checkpoint belongs to another model; pass a fresh --state-dir")
        return np.asarray(saved, FLOAT)


class AdaptiveOptimizer(ServerOptimizer):
    """FedAdagrad, FedAdam and FedYogi: m ← β₁·m + (1 − β₁)·Δ, v ← :meth:`second_moment` (v, Δ²),
    x ← x + η · m / (√v + τ); m_{−1} = 0, v_{−1} = τ², no bias correction (the paper's Algorithm 2)."""

    moments = ("m", "v")
    options = {"eta": eta_option(0.01, "x ← x + η·m/(√v + τ)"),
               "beta1": Option(float, 0.9, "first-moment decay β₁: m ← β₁·m + (1 − β₁)·Δ", _decay, "in [0, 1)"),
               "beta2": Option(float, 0.99, "second-moment decay β₂ (FedAdam, FedYogi; FedAdagrad ignores it)",
                               _decay, "in [0, 1)"),
               "tau": Option(float, 1e-3, "adaptivity τ: the step is η·m/(√v + τ), and v starts at τ² (smaller: "
                             "more adaptive)", _positive, "a finite number > 0")}

    def initial(self, moment: str, like: np.ndarray) -> np.ndarray:
        """m_{−1} = 0 and v_{−1} = τ² (the paper asks v_{−1} ≥ τ²)."""
        if moment == "v":
            return np.full(like.shape, float(self.opts["tau"]) ** 2, FLOAT)
        return super().initial(moment, like)

    @abstractmethod
    def second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        """v_t from v_{t−1} and Δ_t² (float64, a new array)."""

    def step(self, delta: np.ndarray, saved: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        beta1 = float(self.opts["beta1"])
        m = beta1 * saved["m"] + (1.0 - beta1) * delta
        v = self.second_moment(saved["v"], np.square(delta))
        change = float(self.opts["eta"]) * m / (np.sqrt(v) + float(self.opts["tau"]))
        return change, {"m": m, "v": v}
