"""Top-k selection: exact against a full sort, sampled within tolerance, its hierarchical and exact fallbacks."""

from __future__ import annotations

import numpy as np
import pytest

from fedctl.compress import exact_topk, index_dtype, sampled_topk, time_selection

N = 1_000_000


def reference_topk(x: np.ndarray, k: int) -> np.ndarray:
    return np.sort(np.argsort(np.abs(x).reshape(-1), kind="stable")[::-1][:k])


def is_top_set(x: np.ndarray, idx: np.ndarray) -> bool:
    """Every selected |x| is at least every unselected |x|."""
    mag = np.abs(x).reshape(-1)
    rest = np.ones(mag.size, bool)
    rest[idx] = False
    return not rest.any() or not idx.size or float(mag[idx].min()) >= float(mag[rest].max())


def check_indices(idx: np.ndarray, numel: int) -> None:
    assert idx.dtype == np.uint32
    assert idx.ndim == 1
    assert (np.diff(idx.astype(np.int64)) > 0).all(), "indices must be strictly increasing"
    assert idx.size == 0 or int(idx[-1]) < numel


@pytest.mark.parametrize("k", [1, 7, 100, 999, 1000])
def test_exact_topk_matches_a_full_sort(k: int) -> None:
    x = np.random.default_rng(k).standard_normal((10, 100)).astype(np.float32)
    idx = exact_topk(x, k)
    check_indices(idx, x.size)
    np.testing.assert_array_equal(idx, reference_topk(x, k))


def test_exact_topk_uses_magnitudes_and_leaves_the_input_alone() -> None:
    x = np.array([0.5, -3.0, 2.0, -0.1, 1.0], np.float32)
    before = x.copy()
    np.testing.assert_array_equal(exact_topk(x, 2), [1, 2])
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("select", [exact_topk, lambda x, k: sampled_topk(x, k, np.random.default_rng(0))])
def test_k_outside_zero_and_numel(select) -> None:  # type: ignore[no-untyped-def]
    x = np.random.default_rng(1).standard_normal(5000).astype(np.float32)
    for k in (0, -3):
        assert select(x, k).size == 0
        assert select(x, k).dtype == np.uint32
    for k in (x.size, x.size + 10):
        np.testing.assert_array_equal(select(x, k), np.arange(x.size))
    assert select(np.zeros(0, np.float32), 3).size == 0


def test_index_dtype_widens_past_32_bits() -> None:
    assert index_dtype(2**32) == np.uint32
    assert index_dtype(2**32 + 1) == np.uint64


@pytest.mark.parametrize("dist", ["normal", "student_t", "cauchy", "lognormal"])
@pytest.mark.parametrize("density", [0.0001, 0.001, 0.01])
def test_sampled_count_is_within_20_percent_and_a_top_set(dist: str, density: float) -> None:
    gen = np.random.default_rng(7)
    x = {"normal": lambda: gen.standard_normal(N), "student_t": lambda: gen.standard_t(1.5, N),
         "cauchy": lambda: gen.standard_cauchy(N), "lognormal": lambda: gen.lognormal(0, 3, N)}[dist]()
    x = x.astype(np.float32)
    k = round(density * N)
    for seed in range(5):
        idx = sampled_topk(x, k, np.random.default_rng(seed))
        check_indices(idx, N)
        assert 0.8 * k <= idx.size <= 1.2 * k, (seed, idx.size, k)
        assert is_top_set(x, idx)


def test_sampled_with_zero_tolerance_is_the_exact_topk() -> None:
    x = np.random.default_rng(3).standard_normal(N).astype(np.float32)
    for seed in range(3):
        np.testing.assert_array_equal(sampled_topk(x, 1000, np.random.default_rng(seed), tolerance=0.0),
                                      exact_topk(x, 1000))


def test_ties_at_the_threshold_go_hierarchical_to_exactly_k() -> None:
    # Almost every value equals 1: the sampled threshold is 1 and selects everything, far beyond k.
    x = np.ones(N, np.float32)
    big = np.random.default_rng(0).choice(N, 300, replace=False)
    x[big] = np.linspace(2.0, 5.0, 300, dtype=np.float32)
    idx = sampled_topk(x, 1000, np.random.default_rng(1))
    check_indices(idx, N)
    assert idx.size == 1000
    assert set(big.tolist()) <= set(idx.tolist())


def test_too_few_above_the_threshold_falls_back_to_exact() -> None:
    # Fewer non-zeros than k·0.8: no threshold selects enough, so the exact top-k (non-zeros first) is returned.
    x = np.zeros(N, np.float32)
    nonzero = np.random.default_rng(0).choice(N, 500, replace=False)
    x[nonzero] = np.random.default_rng(1).standard_normal(500).astype(np.float32) + 10.0
    idx = sampled_topk(x, 1000, np.random.default_rng(2))
    check_indices(idx, N)
    assert idx.size == 1000
    assert set(nonzero.tolist()) <= set(idx.tolist())


def test_threshold_is_lowered_when_the_sample_overshoots() -> None:
    # k = 10 of 5000 is the 2nd largest of a 1000-value sample: a noisy threshold, often selecting too few or too
    # many at first; whichever way it is corrected, the result must be a top set of acceptable size.
    x = np.arange(1, 5001, dtype=np.float32)
    for seed in range(20):
        idx = sampled_topk(x, 10, np.random.default_rng(seed), min_sample=1000)
        check_indices(idx, x.size)
        assert 8 <= idx.size <= 12
        assert is_top_set(x, idx)


def test_sampled_is_deterministic_given_the_rng_and_reads_only() -> None:
    x = np.random.default_rng(5).standard_normal((1000, 1000)).astype(np.float32)
    before = x.copy()
    a = sampled_topk(x, 1000, np.random.default_rng(9))
    b = sampled_topk(x, 1000, np.random.default_rng(9))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(x, before)


def test_small_tensors_are_selected_exactly() -> None:
    x = np.random.default_rng(4).standard_normal(3000).astype(np.float32)  # sample would be a third of it
    np.testing.assert_array_equal(sampled_topk(x, 30, np.random.default_rng(0)), exact_topk(x, 30))


def test_time_selection_reports_both_timings() -> None:
    out = time_selection(200_000, 0.001, 3, np.random.default_rng(0))
    assert out["k"] == 200
    assert out["exact_s"] > 0 and out["sampled_s"] > 0
    assert 160 <= out["selected_min"] <= out["selected"] <= out["selected_max"] <= 240
    with pytest.raises(ValueError):
        time_selection(10, 0.0, 1, np.random.default_rng(0))


@pytest.mark.slow
def test_sampled_is_at_least_five_times_faster_on_10m() -> None:
    out = time_selection(10_000_000, 0.001, 5, np.random.default_rng(0))
    assert out["speedup"] >= 5.0, out
    assert 8000 <= out["selected"] <= 12000
