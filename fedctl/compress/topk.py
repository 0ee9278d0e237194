"""Top-k selection by magnitude: exact (argpartition) and sampled (DGC's threshold estimate), pure numpy.

Selection is stateless: it maps a tensor and a budget k to sorted flat indices, and draws randomness only from the
generator it is given. Residuals, momentum and masks belong to the strategy that calls it (see
:mod:`fedctl.strategies.dgc`).

Sampled top-k follows Lin et al. 2018, "Deep Gradient Compression" (ICLR 2018), §3 and their reference code: the
threshold of the k largest |x| is estimated on a small random sample, everything at or above it is selected in
one pass, and only when that misses the budget does a costlier step run — an exact top-k among the (few)
selected when there are too many, a lower threshold from the same sample when there are too few, and an exact
top-k of the whole tensor as the last resort. On a 10M-element tensor this costs one |x|, one comparison and a
gather of the sample instead of an O(n) argpartition with an n-sized int64 temporary.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

DEFAULT_MIN_SAMPLE = 1024
"""Smallest sample, so a small tensor's threshold is not estimated from a handful of values."""
MAX_ADAPT = 2
"""How many times a too-high threshold is lowered (one extra pass each) before the exact fallback."""


def index_dtype(numel: int) -> np.dtype:
    """The wire index dtype for a tensor of ``numel`` elements: uint32 while every flat index fits, else uint64."""
    return np.dtype(np.uint32) if numel <= 2**32 else np.dtype(np.uint64)


def _topk_of_magnitudes(mag: np.ndarray, k: int) -> np.ndarray:
    """Unsorted positions of the k largest entries of the flat, non-negative ``mag`` (0 < k < mag.size)."""
    return np.argpartition(mag, mag.size - k)[mag.size - k:]


def _finish(indices: np.ndarray, numel: int) -> np.ndarray:
    return np.sort(indices).astype(index_dtype(numel), copy=False)


def _trivial(numel: int, k: int) -> np.ndarray | None:
    """The answer when k selects nothing or everything, else None."""
    if k >= numel:
        return np.arange(numel, dtype=index_dtype(numel))
    if k <= 0:
        return np.empty(0, dtype=index_dtype(numel))
    return None


def exact_topk(x: np.ndarray, k: int) -> np.ndarray:
    """Sorted flat indices of the ``k`` largest ``|x|`` (ties broken arbitrarily).

    Parameters
    ----------
    x:
        Any-shaped finite array; it is read, never modified.
    k:
        How many to select; ``k <= 0`` selects nothing and ``k >= x.size`` everything.

    Returns
    -------
    numpy.ndarray
        Strictly increasing flat indices, uint32 (uint64 for tensors beyond 2**32 elements).
    """
    flat = np.asarray(x).reshape(-1)
    trivial = _trivial(flat.size, k)
    if trivial is not None:
        return trivial
    return _finish(_topk_of_magnitudes(np.abs(flat), k), flat.size)


def sampled_topk(x: np.ndarray, k: int, rng: np.random.Generator, sample_ratio: float = 0.01,
                 min_sample: int = DEFAULT_MIN_SAMPLE, tolerance: float = 0.2) -> np.ndarray:
    """Sorted flat indices of about the ``k`` largest ``|x|``, with the threshold estimated by sampling (DGC).

    A sample of ``max(min_sample, sample_ratio · x.size)`` positions is drawn uniformly with replacement (random
    positions rather than a strided slice, so a weight matrix whose magnitudes vary by column is not sampled
    along a few columns only). Its ⌈k · s / n⌉-th largest magnitude is the threshold; every ``|x| >= thr`` is
    selected. Then:

    - more than ``k · (1 + tolerance)`` selected: an exact top-k among the selected only (hierarchical);
    - fewer than ``k · (1 − tolerance)``: the threshold is lowered to a rank of the same sample scaled by the
      shortfall, at most :data:`MAX_ADAPT` times, and then an exact top-k of the whole tensor;
    - otherwise the selection is returned as it is, so its size is within ``tolerance`` of ``k``.

    Entries equal to the threshold are all selected, so values that tie in large numbers end in the
    hierarchical step; a zero threshold selects the non-zero entries only.

    Parameters
    ----------
    x:
        Any-shaped finite array; it is read, never modified.
    k:
        Target count; ``k <= 0`` selects nothing and ``k >= x.size`` everything.
    rng:
        The only source of randomness (the sample positions).
    sample_ratio, min_sample:
        Sample size as a fraction of ``x.size`` and its floor. A sample of at least a quarter of the tensor
        buys nothing over the exact selection, which is used instead.
    tolerance:
        Accepted relative deviation of the count from ``k``; 0 makes the result an exact top-k.

    Returns
    -------
    numpy.ndarray
        Strictly increasing flat indices, uint32 (uint64 beyond 2**32 elements).
    """
    flat = np.asarray(x).reshape(-1)
    n = flat.size
    trivial = _trivial(n, k)
    if trivial is not None:
        return trivial
    mag = np.abs(flat)  # the one full-size temporary besides the selection itself
    size = max(int(math.ceil(n * sample_ratio)), int(min_sample), 1)
    if 4 * size >= n:
        return _finish(_topk_of_magnitudes(mag, k), n)
    sample = mag[rng.integers(0, n, size=size)]
    low, high = k * (1.0 - tolerance), k * (1.0 + tolerance)
    rank = min(size, int(math.ceil(k * size / n)))
    for _ in range(1 + MAX_ADAPT):
        threshold = np.partition(sample, size - rank)[size - rank]
        selected = np.flatnonzero(mag >= threshold) if threshold > 0 else np.flatnonzero(mag)
        count = selected.size
        if count > high:
            chosen = selected[_topk_of_magnitudes(mag[selected], k)]
            return _finish(chosen, n)
        if count >= low:
            return selected.astype(index_dtype(n), copy=False)  # flatnonzero is already sorted
        if threshold <= 0 or rank >= size:
            break  # the threshold cannot go lower
        # Aim a little above k: too many costs a top-k among ~k values, too few a whole extra pass.
        rank = min(size, int(math.ceil(rank * k * (1.0 + tolerance / 2) / max(count, 1))))
    return _finish(_topk_of_magnitudes(mag, k), n)


def time_selection(numel: int, density: float, repeats: int, rng: np.random.Generator) -> dict[str, Any]:
    """Median wall time of :func:`exact_topk` and :func:`sampled_topk` on a standard-normal float32 tensor.

    For benchmarks (it reads the clock; nothing else in this module does). Both selections run ``repeats`` times
    on the same tensor; ``selected`` is the median count of the sampled selection (min and max alongside).

    Returns
    -------
    dict
        ``numel``, ``k``, ``density``, ``exact_s``, ``sampled_s``, ``speedup``, ``selected``, ``selected_min``,
        ``selected_max``.
    """
    if numel < 1 or not 0 < density <= 1 or repeats < 1:
        raise ValueError("time_selection needs numel >= 1, density in (0, 1] and repeats >= 1")
    x = rng.standard_normal(numel, dtype=np.float32)
    k = max(1, round(density * numel))
    exact_s, sampled_s, counts = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        exact_topk(x, k)
        exact_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        counts.append(sampled_topk(x, k, rng).size)
        sampled_s.append(time.perf_counter() - start)
    exact, sampled = float(np.median(exact_s)), float(np.median(sampled_s))
    return {"numel": numel, "k": k, "density": density, "exact_s": exact, "sampled_s": sampled,
            "speedup": exact / sampled if sampled > 0 else math.inf, "selected": int(np.median(counts)),
            "selected_min": int(min(counts)), "selected_max": int(max(counts))}
