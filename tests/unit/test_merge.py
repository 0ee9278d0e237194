"""Edge merging (hierarchical aggregation): a group of workers' updates merged into one, aggregated among the parent's
other updates, gives the flat aggregate — for every strategy an edge may stand in for, on literal arrays, against a
direct numpy computation; the strategies whose broker side needs each worker's own update are refused."""

from __future__ import annotations

import numpy as np
import pytest

from fedctl.errors import ConfigError
from fedctl.strategies import TaskConfig
from fedctl.strategies.base import Update
from fedctl.strategies.kernels import weighted_sum_sparse
from fedctl.strategies.registry import get_strategy
from fedctl.wire.constants import KIND_DELTA, KIND_GRADIENT, KIND_WEIGHTS
from fedctl.wire.tensors import SparseTensor

W = {"a": np.array([[0.5, -1.0, 2.0], [0.25, 0.0, 1.5]], np.float32), "b": np.array([0.1, -0.2], np.float32)}
COUNTS = [600, 300, 100, 450, 50]
GROUPS = [[0, 1], [2, 3, 4]]
W_SPARSE = {"a": np.linspace(-1, 1, 20, dtype=np.float32).reshape(4, 5)}


def _dense_updates(kind: str) -> list[Update]:
    rng = np.random.default_rng(7)
    return [Update(f"w{k}", n, {name: (W[name] + rng.normal(0, 0.1, W[name].shape)).astype(np.float32)
                                if kind == KIND_WEIGHTS else rng.normal(0, 0.1, W[name].shape).astype(np.float32)
                                for name in W}, kind, metrics={"train_loss": 0.1 * (k + 1)})
            for k, n in enumerate(COUNTS)]


def _sparse_updates(kind: str) -> list[Update]:
    picks = [[0, 4], [1, 4], [5], [0, 2], [3]]
    out = []
    for k, (n, idx) in enumerate(zip(COUNTS, picks)):
        values = np.array([0.5 - 0.25 * j + 0.01 * k for j in range(len(idx))], np.float32)
        out.append(Update(f"w{k}", n, {"a": SparseTensor((4, 5), np.array(idx, np.int32), values)}, kind))
    return out


def _two_level(strategy_name: str, updates: list[Update], weights: dict | None = None,
               **options: str) -> tuple[dict, dict]:
    """(flat aggregate, aggregate of the edges' merged updates) with the same strategy and state."""
    weights = W if weights is None else weights
    strategy = get_strategy(strategy_name, TaskConfig(1, 10, 0.1, options=options))
    flat = strategy.aggregate(weights, updates, {}, np.random.default_rng(0))
    edges = []
    for e, group in enumerate(GROUPS):
        m = strategy.merge([updates[k] for k in group])
        edges.append(Update(f"edge{e}", m.num_examples, m.tensors, m.kind, metrics=m.metrics))
    two = strategy.aggregate(weights, edges, {}, np.random.default_rng(0))
    return flat.weights, two.weights


@pytest.mark.parametrize("name, kind, options", [
    ("fedavg", KIND_WEIGHTS, {}), ("fedprox", KIND_WEIGHTS, {"mu": "0.1"}), ("fedsgd", KIND_GRADIENT, {}),
    ("fedsgd", KIND_GRADIENT, {"momentum": "0.9", "clip": "0.05"}), ("fedavgm", KIND_WEIGHTS, {"beta": "0.9"}),
    ("fedadagrad", KIND_WEIGHTS, {}), ("fedadam", KIND_WEIGHTS, {}), ("fedyogi", KIND_WEIGHTS, {}),
    ("ssgd", KIND_DELTA, {"combine": "mean"}),
])
def test_merged_groups_aggregate_to_the_flat_result(name: str, kind: str, options: dict[str, str]) -> None:
    flat, two = _two_level(name, _dense_updates(kind), **options)
    assert set(flat) == set(two)
    for k in flat:
        np.testing.assert_allclose(two[k], flat[k], rtol=1e-6, atol=1e-7)
    assert any(not np.array_equal(flat[k], W[k]) for k in W), "the round changed the model"


@pytest.mark.parametrize("name, options", [("dgc", {}), ("ssgd", {}), ("ssgd", {"combine": "mean"})])
def test_sparse_uploads_merge_sparse_and_aggregate_to_the_flat_result(name: str, options: dict[str, str]) -> None:
    updates = _sparse_updates(KIND_DELTA if name == "ssgd" else KIND_GRADIENT)
    strategy = get_strategy(name, TaskConfig(1, 10, 0.1, options=options))
    first = strategy.merge(updates[:2])
    assert isinstance(first.tensors["a"], SparseTensor), "two top-k uploads merge into one sparse tensor"
    assert first.tensors["a"].indices.tolist() == [0, 1, 4]
    flat, two = _two_level(name, updates, W_SPARSE, **options)
    for k in flat:
        np.testing.assert_allclose(two[k], flat[k], rtol=1e-6, atol=1e-7)


def test_the_merge_is_the_example_weighted_mean_in_numpy() -> None:
    updates = _dense_updates(KIND_WEIGHTS)[:3]
    m = get_strategy("fedavg", TaskConfig()).merge(updates)
    n = np.array(COUNTS[:3], np.float64)
    for name in W:
        expected = sum(n[k] * updates[k].tensors[name].astype(np.float64) for k in range(3)) / n.sum()
        np.testing.assert_allclose(m.tensors[name], expected.astype(np.float32), rtol=1e-7)
    assert m.num_examples == 1000 and m.kind == KIND_WEIGHTS
    assert m.metrics["train_loss"] == pytest.approx((600 * 0.1 + 300 * 0.2 + 100 * 0.3) / 1000)
    s = get_strategy("ssgd", TaskConfig()).merge(_sparse_updates(KIND_DELTA)[:2])
    dense = s.tensors["a"].to_dense().reshape(-1)
    assert dense[:6].tolist() == pytest.approx([0.5, 0.51, 0, 0, 0.25 + 0.26, 0]), "combine=sum merges by the sum"
    assert not dense[6:].any()


def test_sparse_stays_sparse_only_while_smaller_than_dense() -> None:
    dense_enough = [{"a": SparseTensor((4,), np.array([0, 1], np.int32), np.ones(2, np.float32))},
                    {"a": SparseTensor((4,), np.array([2], np.int32), np.ones(1, np.float32))}]
    out = weighted_sum_sparse(dense_enough, [1.0, 2.0])
    assert isinstance(out["a"], np.ndarray) and out["a"].tolist() == [1, 1, 2, 0]
    mixed = [{"a": np.ones(4, np.float32)}, {"a": SparseTensor((4,), np.array([3], np.int32), np.ones(1, np.float32))}]
    assert weighted_sum_sparse(mixed, [0.5, 0.5])["a"].tolist() == [0.5, 0.5, 0.5, 1.0]


@pytest.mark.parametrize("name, options, reason", [
    ("scaffold", {}, "needs every worker's own update"),
    ("ssgd", {"combine": "mean-sent"}, "combine=mean-sent"),
    ("ssgd", {"dp_epsilon": "1.0", "gamma": "0.01"}, "privacy budget"),
])
def test_strategies_an_edge_cannot_stand_for_are_refused(name: str, options: dict[str, str], reason: str) -> None:
    strategy = get_strategy(name, TaskConfig(options=options))
    with pytest.raises(ConfigError, match=reason) as err:
        strategy.merge(_dense_updates(KIND_DELTA))
    assert err.value.fix and "--upstream" in err.value.fix


def test_updates_of_different_kinds_do_not_merge() -> None:
    mixed = _dense_updates(KIND_WEIGHTS)[:1] + _dense_updates(KIND_GRADIENT)[1:2]
    with pytest.raises(ConfigError, match="different kinds"):
        get_strategy("fedavg", TaskConfig()).merge(mixed)
