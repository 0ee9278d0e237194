"""Numerical kernels shared by strategies: example-weighted means and sums over named tensors.

Inputs may mix dense arrays and :class:`~fedctl.wire.tensors.SparseTensor` (any float dtype, e.g. fp16 values):
a sparse term is scattered into the one accumulator, never densified on its own, so summing K sparse updates
costs O(model + Σ nnz) memory and time, not O(K · model).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedctl.errors import ConfigError
from fedctl.models.zoo import ModelSpec
from fedctl.wire.constants import KIND_WEIGHTS
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
    """Σ_k weights[k] · tensors[k][name] for every name, accumulated in float64 and returned as ``dtype``.

    A name missing from some tensor sets counts as zero there (sparse pushes leave out tensors they do not change);
    the result has every name that appears in any set.
    """
    if len(tensors) != len(weights):
        raise ValueError("one weight per tensor set is required")
    shapes: dict[str, tuple[int, ...]] = {}
    for t in tensors:
        for name, tensor in t.items():
            shapes.setdefault(name, tuple(tensor.shape))
    out: Params = {}
    for name, shape in shapes.items():
        acc = np.zeros(shape, dtype=np.float64)
        for t, w in zip(tensors, weights):
            if name in t:
                accumulate(acc, t[name], w)
        out[name] = acc.astype(dtype)
    return out


def weighted_sum_sparse(tensors: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """:func:`weighted_sum`, but a name that every set carrying it carries sparse stays sparse — the union of their
    indices, each entry summed in float64 — while that is smaller on the wire than dense (an edge broker forwarding
    the merged top-k updates of its workers, docs/architecture.md); any other name is dense float32."""
    if len(tensors) != len(weights):
        raise ValueError("one weight per tensor set is required")
    dense: list[str] = []
    out: dict[str, Tensor] = {}
    names = list(dict.fromkeys(name for t in tensors for name in t))
    for name in names:
        terms = [(t[name], w) for t, w in zip(tensors, weights) if name in t]
        if not all(isinstance(term, SparseTensor) for term, _ in terms):
            dense.append(name)
            continue
        sparse = [term for term, _ in terms if isinstance(term, SparseTensor)]
        indices = np.concatenate([term.indices.astype(np.int64) for term in sparse])
        values = np.concatenate([float(w) * term.values.astype(np.float64) for term, w in terms
                                 if isinstance(term, SparseTensor)])
        union, where = np.unique(indices, return_inverse=True)
        numel = sparse[0].numel
        if 2 * union.size >= numel:  # (index + value per entry: dense is smaller from half the entries on)
            dense.append(name)
            continue
        summed = np.bincount(where, weights=values, minlength=union.size)
        out[name] = SparseTensor(sparse[0].shape, union.astype(sparse[0].indices.dtype), summed.astype(np.float32))
    if dense:
        out.update(weighted_sum([{k: t[k] for k in dense if k in t} for t in tensors], weights))
    return {name: out[name] for name in names}


def weighted_mean(tensors: Sequence[Mapping[str, Tensor]], counts: Sequence[int]) -> Params:
    """Example-weighted mean Σ_k (n_k/n) · tensors[k]."""
    return weighted_sum(tensors, example_weights(counts).tolist())


def axpy(alpha: float, x: Mapping[str, Tensor], y: Mapping[str, np.ndarray]) -> Params:
    """y + alpha · x for every name, in y's dtype (x may be sparse; a name x lacks is left as it is in y)."""
    out: Params = {}
    for name in y:
        if name not in x:
            out[name] = y[name]
            continue
        acc = y[name].astype(np.float64)
        accumulate(acc, x[name], alpha)
        out[name] = acc.astype(y[name].dtype)
    return out


def change_vector(spec: ModelSpec, base: Mapping[str, np.ndarray], kind: str,
                  tensors: Mapping[str, Tensor]) -> np.ndarray:
    """An update as one float64 vector in the model's order: a weights update as its change from ``base`` (the
    model it trained on), a gradient or delta as it is; a tensor it leaves out (frozen) is zeros. Secure aggregation
    and DP-FedAvg work on this vector."""
    dense = {k: t.to_dense() if isinstance(t, SparseTensor) else t for k, t in tensors.items()}
    parts = []
    for p in spec.params:
        t = dense.get(p.name)
        value = np.zeros(p.shape) if t is None else np.asarray(t, np.float64).reshape(p.shape)
        parts.append((value - base[p.name] if kind == KIND_WEIGHTS else value).reshape(-1))
    return np.concatenate(parts)


def from_change_vector(spec: ModelSpec, base: Mapping[str, np.ndarray], kind: str, vector: np.ndarray) -> Params:
    """The inverse of :func:`change_vector`: float32 tensors of ``kind`` (``base`` plus the change for weights)."""
    out: Params = {}
    offset = 0
    for p in spec.params:
        values = vector[offset:offset + p.numel].reshape(p.shape)
        offset += p.numel
        out[p.name] = (base[p.name] + values if kind == KIND_WEIGHTS else values).astype(np.float32)
    return out
