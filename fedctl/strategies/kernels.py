"""Numerical kernels shared by strategies: example-weighted means and sums over named tensors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedctl.errors import ConfigError

Params = dict[str, np.ndarray]


def example_weights(counts: Sequence[int]) -> np.ndarray:
    """n_k / n for each contributor; raises if there is nothing to weigh."""
    total = float(sum(counts))
    if not counts or total <= 0:
        raise ConfigError("cannot aggregate: no update with a positive number of examples")
    return np.asarray(counts, dtype=np.float64) / total


def weighted_sum(tensors: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float],
                 dtype: np.dtype = np.dtype(np.float32)) -> Params:
    """Σ_k weights[k] · tensors[k][name] for every name, accumulated in float64 and returned as ``dtype``."""
    if len(tensors) != len(weights):
        raise ValueError("one weight per tensor set is required")
    names = list(tensors[0])
    out: Params = {}
    for name in names:
        acc = np.zeros(np.shape(tensors[0][name]), dtype=np.float64)
        for t, w in zip(tensors, weights):
            acc += float(w) * np.asarray(t[name], dtype=np.float64)
        out[name] = acc.astype(dtype)
    return out


def weighted_mean(tensors: Sequence[Mapping[str, np.ndarray]], counts: Sequence[int]) -> Params:
    """Example-weighted mean Σ_k (n_k/n) · tensors[k]."""
    return weighted_sum(tensors, example_weights(counts).tolist())


def axpy(alpha: float, x: Mapping[str, np.ndarray], y: Mapping[str, np.ndarray]) -> Params:
    """y + alpha · x for every name, in y's dtype."""
    return {name: (y[name] + alpha * np.asarray(x[name], dtype=np.float64)).astype(y[name].dtype) for name in y}
