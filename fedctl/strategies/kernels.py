"""Numerical kernels shared by strategies: example-weighted means and sums over named tensors.

Inputs may mix dense arrays and :class:`~fedctl.wire.tensors.SparseTensor` (any float dtype, e.g. fp16 values):
a sparse term is scattered into the one accumulator, never densified on its own, so summing K sparse updates
costs O(model + Σ nnz) memory and time, not O(K · model).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedctl.errors import ConfigError
from fedctl.wire.tensors import SparseTensor, Tensor

Params = dict[str, np.ndarray]


def example_weights(counts: Sequence[int]) -> np.ndarray:
    """n_k / n for each contributor; raises if there is nothing to weigh."""
    total = float(sum(counts))
    if not counts or total <= 0:
        raise ConfigError("cannot aggregate: no update with a positive number of examples")
    return np.asarray(counts, dtype=np.float64) / total


def accumulate(acc: np.ndarray, term: Tensor, weight: float) -> None:
    """acc += weight · term in place; a sparse term touches only its nnz entries (its indices are unique)."""
    if isinstance(term, SparseTensor):
        flat = acc.reshape(-1)
        flat[term.indices] += float(weight) * term.values.astype(np.float64)
    else:
        acc += float(weight) * np.asarray(term, dtype=np.float64)


def weighted_sum(tensors: Sequence[Mapping[str, Tensor]], weights: Sequence[float],
                 dtype: np.dtype = np.dtype(np.float32)) -> Params:
    """Σ_k weights[k] · tensors[k][name] for every name, accumulated in float64 and returned as ``dtype``."""
    if len(tensors) != len(weights):
        raise ValueError("one weight per tensor set is required")
    names = list(tensors[0])
    out: Params = {}
    for name in names:
        acc = np.zeros(tuple(tensors[0][name].shape), dtype=np.float64)
        for t, w in zip(tensors, weights):
            accumulate(acc, t[name], w)
        out[name] = acc.astype(dtype)
    return out


def weighted_mean(tensors: Sequence[Mapping[str, Tensor]], counts: Sequence[int]) -> Params:
    """Example-weighted mean Σ_k (n_k/n) · tensors[k]."""
    return weighted_sum(tensors, example_weights(counts).tolist())


def axpy(alpha: float, x: Mapping[str, Tensor], y: Mapping[str, np.ndarray]) -> Params:
    """y + alpha · x for every name, in y's dtype (x may be sparse)."""
    out: Params = {}
    for name in y:
        acc = y[name].astype(np.float64)
        accumulate(acc, x[name], alpha)
        out[name] = acc.astype(y[name].dtype)
    return out
