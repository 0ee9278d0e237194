"""Selective SGD: upload selection and bounding, the DP upload, the broker's sum/mean, θ_d downlink, training."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import fedctl.strategies.ssgd  # noqa: F401 - registers "ssgd" whatever the registry's built-in list holds
from fedctl.errors import ConfigError
from fedctl.models import get_model, init_params
from fedctl.strategies import TaskConfig, Update, get_strategy
from fedctl.strategies.base import ClientResult, Params, exact_delta
from fedctl.strategies.ssgd import SelectiveSGD, upload_count
from fedctl.testing.trainers import NumpyMLPTrainer, synthetic_digits
from fedctl.wire.tensors import SparseTensor, Tensor, densify
from fedctl.worker.frameworks.base import TrainResult

RNG = np.random.default_rng(0)


@dataclass
class ShiftTrainer:
    """A trainer whose local training adds a fixed, literal change Δw to the weights it gets."""

    delta: Params
    n: int = 10

    def fit(self, weights: Params, epochs: int, batch_size: int, lr: float, seed: int) -> TrainResult:
        return TrainResult({k: (weights[k] + self.delta[k]).astype(np.float32) for k in weights}, self.n,
                           {"train_loss": 1.0})

    def gradient(self, weights: Params, batch_size: int, seed: int) -> TrainResult:
        raise NotImplementedError


def ssgd(**options: Any) -> SelectiveSGD:
    strategy = get_strategy("ssgd", TaskConfig(1, 10, 0.1, options=options))
    assert isinstance(strategy, SelectiveSGD)
    return strategy


def model() -> Params:
    return {"w": np.zeros((20, 30), np.float32), "b": np.zeros(30, np.float32)}


def random_delta(seed: int = 1) -> Params:
    r = np.random.default_rng(seed)
    return {"w": r.normal(size=(20, 30)).astype(np.float32), "b": r.normal(size=30).astype(np.float32)}


def upload(strategy: SelectiveSGD, delta: Params, seed: int = 7, weights: Params | None = None) -> ClientResult:
    return strategy.client_update(weights or model(), ShiftTrainer(delta), strategy.task_for_round(1, seed), {})


def flat(params: Mapping[str, Tensor]) -> np.ndarray:
    return np.concatenate([np.asarray(v, np.float64).reshape(-1) for v in densify(params).values()])


def chosen(result: ClientResult) -> np.ndarray:
    """Global flat indices (model order) of the uploaded entries."""
    out, offset = [], 0
    for t in result.tensors.values():
        if isinstance(t, SparseTensor):
            assert t.indices.dtype == np.uint32 and t.values.dtype == np.float32
            assert np.all(np.diff(t.indices.astype(np.int64)) > 0), "indices must be sorted and unique"
            out.append(t.indices.astype(np.int64) + offset)
            offset += t.numel
        else:
            out.append(np.arange(t.size) + offset)
            offset += t.size
    return np.concatenate(out)


# ------------------------------------------------------------------------------------------------ selection


def test_largest_uploads_the_c_largest_changes_over_the_whole_model() -> None:
    delta = random_delta()
    delta["b"] += np.sign(delta["b"]) * 100  # all bias changes outgrow every weight change: b goes whole, dense
    result = upload(ssgd(theta_u=0.1), delta)
    c = round(0.1 * 630)
    idx = chosen(result)
    assert idx.size == c == result.metrics["uploaded"]
    magnitude = np.abs(flat(delta))
    rest = np.setdiff1d(np.arange(630), idx)
    assert magnitude[idx].min() >= magnitude[rest].max()
    assert isinstance(result.tensors["b"], np.ndarray), "a tensor selected whole is sent dense"
    assert isinstance(result.tensors["w"], SparseTensor) and result.tensors["w"].nnz == c - 30
    np.testing.assert_array_equal(flat(result.tensors)[idx], flat(delta)[idx])
    assert result.kind == "delta" and result.num_examples == 10


def test_random_uploads_c_entries_above_tau_reproducibly_per_seed() -> None:
    delta, tau = random_delta(), 0.5
    strategy = ssgd(theta_u=0.1, select="random", tau=tau)
    first, again, other = (chosen(upload(strategy, delta, seed=s)) for s in (3, 3, 4))
    assert first.size == other.size == round(0.1 * 630)
    assert np.all(np.abs(flat(delta)[first]) > tau) and np.all(np.abs(flat(delta)[other]) > tau)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    # Not the largest ones: a uniform sample of the ~390 entries above τ almost surely includes smaller ones.
    largest = chosen(upload(ssgd(theta_u=0.1), delta))
    assert not np.array_equal(np.sort(first), np.sort(largest))


def test_random_uploads_at_most_the_entries_above_tau() -> None:
    delta = {"w": np.zeros((20, 30), np.float32), "b": np.zeros(30, np.float32)}
    delta["w"][3, 4], delta["b"][7] = 2.0, -3.0
    result = upload(ssgd(theta_u=0.5, select="random", tau=1.0), delta)
    assert chosen(result).tolist() == [3 * 30 + 4, 600 + 7]


@pytest.mark.parametrize("gamma", [0.5, 0.001])
def test_values_are_bounded_to_gamma(gamma: float) -> None:
    delta = random_delta()
    result = upload(ssgd(theta_u=0.2, gamma=gamma), delta)
    values = flat(result.tensors)[chosen(result)]
    assert np.all(np.abs(values) <= gamma), "the float32 values must stay within [−γ, γ] as float64 too"
    np.testing.assert_allclose(values, np.clip(flat(delta)[chosen(result)], -gamma, gamma), atol=1e-9)
    assert np.abs(values).max() == pytest.approx(gamma, rel=1e-6), "large changes are clipped, not dropped"


def test_theta_u_one_uploads_everything_dense() -> None:
    delta = random_delta()
    result = upload(ssgd(theta_u=1.0), delta)
    for name in delta:
        tensor = result.tensors[name]
        assert isinstance(tensor, np.ndarray) and tensor.dtype == np.float32
        np.testing.assert_array_equal(tensor, delta[name])


def test_the_options_in_the_task_win_over_the_workers_defaults() -> None:
    broker = ssgd(theta_u=0.5, gamma=math.inf)
    worker = get_strategy("ssgd", TaskConfig(1, 10, 0.1))  # a worker builds its strategy without the options
    task = broker.task_for_round(1, 7)
    assert task["options"]["gamma"] == "inf"
    result = worker.client_update(model(), ShiftTrainer(random_delta()), task, {})
    assert chosen(result).size == upload_count(0.5, 630) == 315


@pytest.mark.parametrize("options", [{"theta_u": 0.0}, {"theta_u": 1.5}, {"theta_d": 0.0}, {"select": "top"},
                                     {"tau": -1.0}, {"gamma": 0.0}, {"combine": "median"}, {"dp_epsilon": -1.0},
                                     {"dp_epsilon": 1.0}, {"dp_epsilon": "inf", "gamma": 1.0}, {"theta": 0.1}])
def test_bad_options_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        ssgd(**options)  # dp_epsilon alone: the default γ = inf gives no sensitivity bound


# ----------------------------------------------------------------------------------------------------- DP


def dp_upload(seed: int, epsilon: float = 1.0, gamma: float = 0.1, tau: float = 0.0) -> ClientResult:
    return upload(ssgd(theta_u=0.1, dp_epsilon=epsilon, gamma=gamma, tau=tau), random_delta(), seed=seed)


def test_dp_upload_is_bounded_at_most_c_and_reports_epsilon() -> None:
    result = dp_upload(3)
    values = flat(result.tensors)[chosen(result)]
    assert 0 < chosen(result).size <= upload_count(0.1, 630)
    assert np.all(np.abs(values) <= 0.1)
    assert result.metrics["epsilon_round"] == 1.0
    # At ε = 1 the noise (scale 2·c·Δf/ε2 ≈ 227) dwarfs γ: released values are almost all ±γ.
    assert np.mean(np.isclose(np.abs(values), 0.1, rtol=1e-6)) > 0.9


def test_dp_noise_is_reproducible_per_seed_and_differs_across_seeds() -> None:
    a, b, c = dp_upload(3), dp_upload(3), dp_upload(4)
    np.testing.assert_array_equal(flat(a.tensors), flat(b.tensors))
    assert not np.array_equal(flat(a.tensors), flat(c.tensors))


def test_dp_with_a_huge_budget_selects_above_tau_and_releases_the_bounded_change() -> None:
    delta, tau, gamma = flat(random_delta()), 1.0, 1.5
    result = dp_upload(5, epsilon=1e12, gamma=gamma, tau=tau)
    idx = chosen(result)
    assert idx.size == upload_count(0.1, 630), "more than c entries exceed τ, so the SVT stops at c"
    assert np.all(np.abs(delta[idx]) >= tau - 1e-6)
    np.testing.assert_allclose(flat(result.tensors)[idx], np.clip(delta[idx], -gamma, gamma), atol=1e-5)


# ------------------------------------------------------------------------------------------------ aggregate


def sparse_updates() -> list[Update]:
    updates = []
    for k, n in enumerate((1, 3, 6)):
        result = upload(ssgd(theta_u=0.1, select="random"), random_delta(10 + k), seed=k)
        updates.append(Update(f"w{k}", n, result.tensors, result.kind))
    return updates


@pytest.mark.parametrize("combine", ["sum", "mean"])
def test_aggregate_matches_a_dense_reference(combine: str) -> None:
    weights = random_delta(99)
    before = {k: v.copy() for k, v in weights.items()}
    updates = sparse_updates()
    assert all(isinstance(t, SparseTensor) for u in updates for t in u.tensors.values())
    result = ssgd(combine=combine).aggregate(weights, updates, {}, RNG)
    coeff = [1.0, 1.0, 1.0] if combine == "sum" else [0.1, 0.3, 0.6]
    for name in weights:
        expected = weights[name].astype(np.float64) + sum(
            c * densify(u.tensors)[name].astype(np.float64) for c, u in zip(coeff, updates))
        np.testing.assert_allclose(result.weights[name], expected, rtol=1e-6, atol=1e-6)
        assert result.weights[name].dtype == np.float32
    assert all(np.array_equal(weights[k], before[k]) for k in weights), "global weights must not change in place"
    assert result.metrics["updates"] == 3
    assert result.metrics["uploaded_nnz"] == 3 * upload_count(0.1, 630)
    assert "epsilon_max" not in result.metrics


def test_aggregate_accumulates_the_epsilon_spent_per_worker() -> None:
    strategy = ssgd(dp_epsilon=0.5, gamma=0.1)
    weights, state = model(), dict[str, Any]()
    zero = {k: np.zeros_like(v) for k, v in weights.items()}
    for workers in (["a", "b"], ["a"], ["a", "c"]):
        result = strategy.aggregate(weights, [Update(w, 1, zero, "delta") for w in workers], state, RNG)
        state = result.state
    assert state["epsilon_spent"] == {"a": 1.5, "b": 0.5, "c": 0.5}
    assert result.metrics["epsilon_max"] == 1.5 and result.metrics["epsilon_round"] == 0.5


# ------------------------------------------------------------------------------------------------- downlink


def test_downlink_sends_the_largest_changes_as_new_values() -> None:
    base = random_delta(1)
    current = {k: v + random_delta(2)[k] for k, v in base.items()}
    sent = ssgd(theta_d=0.25).downlink(current, base)
    assert sent is not None and all(isinstance(t, SparseTensor) for t in sent.values())
    idx = chosen(ClientResult("delta", sent, 0))
    change = np.abs(flat(current) - flat(base))
    assert idx.size == round(0.25 * 630)
    assert change[idx].min() >= change[np.setdiff1d(np.arange(630), idx)].max()
    for name, tensor in sent.items():
        assert isinstance(tensor, SparseTensor)
        np.testing.assert_array_equal(tensor.values, current[name].reshape(-1)[tensor.indices])  # bit for bit
        mixed = base[name].reshape(-1).copy()
        mixed[tensor.indices] = tensor.values
        untouched = np.setdiff1d(np.arange(tensor.numel), tensor.indices)
        np.testing.assert_array_equal(mixed[untouched], base[name].reshape(-1)[untouched])


def test_downlink_defaults_and_edges() -> None:
    base, current = random_delta(1), random_delta(2)
    assert ssgd(theta_d=0.5).downlink(current, None) is None
    exact = ssgd().downlink(current, base)
    assert exact is not None and flat(exact).tolist() == flat(exact_delta(current, base)).tolist()
    # Fewer changes than θ_d · numel: exactly the changed entries go.
    current = {k: v.copy() for k, v in base.items()}
    current["w"][0, 1] += 1.0
    sent = ssgd(theta_d=0.5).downlink(current, base)
    assert sent is not None and chosen(ClientResult("delta", sent, 0)).tolist() == [1]


# ------------------------------------------------------------------------------------------------- training


def train(theta_u: float, combine: str = "sum", rounds: int = 20) -> tuple[dict[str, float], dict[str, float]]:
    """``rounds`` synchronous rounds of 5 participants (40 noisy examples each), in process."""
    spec = get_model("mlp")
    shards = [NumpyMLPTrainer(spec, *synthetic_digits(40, seed=10 + k, noise=5.0)) for k in range(5)]
    test = NumpyMLPTrainer(spec, *synthetic_digits(1000, seed=99, noise=5.0))
    strategy = get_strategy("ssgd", TaskConfig(1, 10, 0.05, options={"theta_u": theta_u, "combine": combine}))
    weights, state = init_params(spec, 0), dict[str, Any]()
    before = test.evaluate(weights)
    for r in range(1, rounds + 1):
        updates = []
        for k, shard in enumerate(shards):
            result = strategy.client_update(weights, shard, strategy.task_for_round(r, 1000 * r + k), {})
            updates.append(Update(f"w{k}", result.num_examples, result.tensors, result.kind))
        aggregated = strategy.aggregate(weights, updates, state, RNG)
        weights, state = aggregated.weights, aggregated.state
    return before, test.evaluate(weights)


@pytest.fixture(scope="module")
def curves() -> dict[tuple[float, str], dict[str, float]]:
    runs = {(t, "sum"): train(t) for t in (0.01, 0.1, 1.0)}
    runs[(0.1, "mean")] = train(0.1, "mean")
    assert all(before == runs[(0.1, "sum")][0] for before, _ in runs.values())
    return {key: {"before_acc": b["accuracy"], "before_loss": b["loss"], "acc": a["accuracy"], "loss": a["loss"]}
            for key, (b, a) in runs.items()}


def test_ssgd_at_theta_u_0_1_learns(curves: dict[tuple[float, str], dict[str, float]]) -> None:
    run = curves[(0.1, "sum")]
    assert run["before_acc"] < 0.2
    assert run["acc"] > 0.5 and run["loss"] < 0.6 * run["before_loss"]


def test_more_upload_trains_at_least_as_well(curves: dict[tuple[float, str], dict[str, float]]) -> None:
    assert curves[(1.0, "sum")]["acc"] >= curves[(0.01, "sum")]["acc"]
    assert curves[(1.0, "sum")]["loss"] <= curves[(0.01, "sum")]["loss"]


def test_sum_the_default_trains_better_than_mean(curves: dict[tuple[float, str], dict[str, float]]) -> None:
    assert SelectiveSGD.options["combine"].default == "sum"
    assert curves[(0.1, "sum")]["loss"] < curves[(0.1, "mean")]["loss"]


def test_mean_sent_moves_each_entry_by_the_mean_of_the_uploads_that_carry_it() -> None:
    from fedctl.strategies.base import TaskConfig as TC
    from fedctl.strategies.base import Update as U
    from fedctl.strategies.ssgd import SelectiveSGD as S
    from fedctl.wire.tensors import SparseTensor as ST

    strategy = S(TC(options={"combine": "mean-sent"}))
    w = {"t": np.zeros(4, np.float32), "u": np.ones(2, np.float32)}
    a = U("a", 1, {"t": ST((4,), np.array([0, 1], np.uint32), np.array([1.0, 2.0], np.float32))}, "delta")
    b = U("b", 3, {"t": ST((4,), np.array([1, 3], np.uint32), np.array([6.0, 8.0], np.float32))}, "delta")
    got = strategy.aggregate(w, [a, b], {}, np.random.default_rng(0)).weights
    # entry 0: only a (1.0); entry 1: (1·2 + 3·6)/4 = 5; entry 2: nobody; entry 3: only b (8.0); "u" left out.
    np.testing.assert_allclose(got["t"], [1.0, 5.0, 0.0, 8.0])
    np.testing.assert_array_equal(got["u"], w["u"])
