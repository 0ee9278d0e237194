"""FedProx and SCAFFOLD on literal arrays, against the papers' rules written out plainly here: FedProx's proximal
step and μ = 0 being FedAvg; SCAFFOLD's client update (c_i⁺, Δy, Δc, option II) from a trainer that returns a known
y and K, and its server update of x and c over two rounds; options, policies and the registry."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from fedctl.broker.config import BrokerConfig
from fedctl.cli.strategies import strategies_cmd
from fedctl.errors import ConfigError
from fedctl.models import get_model, init_params
from fedctl.strategies import TaskConfig, Update, get_strategy, strategy_names
from fedctl.strategies.base import EXTRA_TENSORS, ROUND_WORKERS, Params
from fedctl.testing.trainers import NumpyMLPTrainer, mlp_loss_grad, synthetic_digits
from fedctl.worker.frameworks.base import TrainResult

RNG = np.random.default_rng(0)
X = {"w": np.array([1.0, -2.0, 0.5], np.float32), "b": np.array([0.25], np.float32)}


def f32(*values: float) -> np.ndarray:
    return np.array(values, np.float32)


class Scripted:
    """A trainer that returns a known y and K, and records how fit was called."""

    def __init__(self, y: Params, steps: int | None) -> None:
        self.y, self.steps = y, steps
        self.calls: list[dict[str, Any]] = []

    def fit(self, weights: Params, epochs: int, batch_size: int, lr: float, seed: int, prox_mu: float = 0.0,
            grad_offset: Params | None = None) -> TrainResult:
        self.calls.append({"weights": weights, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
                           "prox_mu": prox_mu, "grad_offset": grad_offset})
        metrics = {"train_loss": 0.5} if self.steps is None else {"train_loss": 0.5, "steps": self.steps}
        return TrainResult({k: v.copy() for k, v in self.y.items()}, 40, metrics)

    def gradient(self, weights: Params, batch_size: int, seed: int) -> TrainResult:
        raise AssertionError("not used")


def task_map(lr: float, extras: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    return {"epochs": 2, "batch_size": 10, "lr": lr, "seed": 3, EXTRA_TENSORS: dict(extras or {})}


# ----------------------------------------------------------------------------------------------- FedProx
class Quadratic:
    """f(w) = ½‖w − a‖² for each tensor, full-batch GD with fit's gradient correction: a worker's local problem."""

    def __init__(self, a: Params) -> None:
        self.a = a

    def fit(self, weights: Params, epochs: int, batch_size: int, lr: float, seed: int, prox_mu: float = 0.0,
            grad_offset: Params | None = None) -> TrainResult:
        w = {k: v.astype(np.float64) for k, v in weights.items()}
        for _ in range(epochs):
            w = {k: v - lr * ((v - self.a[k]) + prox_mu * (v - weights[k]) + (grad_offset or {}).get(k, 0.0))
                 for k, v in w.items()}
        return TrainResult({k: v.astype(np.float32) for k, v in w.items()}, 10, {"steps": epochs})

    def gradient(self, weights: Params, batch_size: int, seed: int) -> TrainResult:
        raise AssertionError("not used")


def test_fedprox_local_steps_are_gradient_descent_on_loss_plus_the_proximal_term() -> None:
    """Two steps on ½‖w − a‖² + (μ/2)‖w − w_t‖², by hand: w₁ = w₀ − η(w₀ − a) (the proximal gradient is 0 at w_t),
    w₂ = w₁ − η((w₁ − a) + μ(w₁ − w₀))."""
    a = {"w": f32(3.0, 0.0, -1.0), "b": f32(1.0)}
    strategy = get_strategy("fedprox", TaskConfig(options={"mu": "0.5"}))
    out = strategy.client_update(X, Quadratic(a), {"epochs": 2, "batch_size": 0, "lr": 0.1, "seed": 0}, {})
    # w: w₁ = [1, −2, 0.5] − 0.1·[−2, −2, 1.5] = [1.2, −1.8, 0.35]
    #    w₂ = w₁ − 0.1·([−1.8, −1.8, 1.35] + 0.5·[0.2, 0.2, −0.15]) = [1.37, −1.63, 0.2225]
    np.testing.assert_allclose(out.tensors["w"], f32(1.37, -1.63, 0.2225), rtol=1e-6)
    # b: 0.25 → 0.25 − 0.1·(−0.75) = 0.325 → 0.325 − 0.1·(−0.675 + 0.5·0.075) = 0.38875
    np.testing.assert_allclose(out.tensors["b"], f32(0.38875), rtol=1e-6)
    assert out.kind == "weights" and out.num_examples == 10 and out.state == {}


def test_fedprox_passes_mu_to_fit_and_mu_zero_calls_fit_as_fedavg_does() -> None:
    y = {"w": f32(0.0, 0.0, 0.0), "b": f32(1.0)}
    prox, zero, avg = Scripted(y, 4), Scripted(y, 4), Scripted(y, 4)
    get_strategy("fedprox", TaskConfig(options={"mu": "0.25"})).client_update(X, prox, task_map(0.1), {})
    get_strategy("fedprox", TaskConfig(options={"mu": "0"})).client_update(X, zero, task_map(0.1), {})
    get_strategy("fedavg", TaskConfig()).client_update(X, avg, task_map(0.1), {})
    assert prox.calls[0]["prox_mu"] == 0.25 and prox.calls[0]["grad_offset"] is None
    assert zero.calls == avg.calls  # μ = 0: the same call as FedAvg's (the trainer's plain SGD)


def test_fedprox_with_mu_zero_is_fedavg_exactly_on_the_numpy_mlp() -> None:
    spec = get_model("mlp")
    x, y = synthetic_digits(60, seed=2)
    weights = init_params(spec, seed=4)
    task = {"epochs": 2, "batch_size": 10, "lr": 0.1, "seed": 5}
    prox = get_strategy("fedprox", TaskConfig(options={"mu": 0.0})).client_update(
        weights, NumpyMLPTrainer(spec, x, y), task, {})
    avg = get_strategy("fedavg", TaskConfig()).client_update(weights, NumpyMLPTrainer(spec, x, y), task, {})
    assert prox.kind == avg.kind and prox.num_examples == avg.num_examples
    for name in weights:
        assert prox.tensors[name].tobytes() == avg.tensors[name].tobytes(), name
    updates = [Update("a", 10, prox.tensors, "weights"), Update("b", 30, avg.tensors, "weights")]
    mine = get_strategy("fedprox", TaskConfig()).aggregate(weights, updates, {}, RNG).weights
    theirs = get_strategy("fedavg", TaskConfig()).aggregate(weights, updates, {}, RNG).weights
    assert all(mine[k].tobytes() == theirs[k].tobytes() for k in weights)


def test_the_numpy_mlp_applies_the_proximal_term_like_the_hand_computed_steps() -> None:
    spec = get_model("mlp")
    x, y = synthetic_digits(20, seed=1)
    w0 = init_params(spec, seed=1)
    got = NumpyMLPTrainer(spec, x, y).fit(w0, 2, 0, 0.2, seed=0, prox_mu=3.0).params
    _, g0 = mlp_loss_grad(w0, x, y)
    w1 = {k: w0[k] - np.float32(0.2) * g0[k] for k in w0}
    _, g1 = mlp_loss_grad(w1, x, y)
    for k in w0:
        np.testing.assert_allclose(got[k], w1[k] - 0.2 * (g1[k] + 3.0 * (w1[k] - w0[k])), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------- SCAFFOLD worker
def test_scaffold_client_update_is_option_two() -> None:
    """x, c, c_i, a trainer that lands on y after K = 4 steps at η_l = 0.5 (K·η_l = 2)."""
    c = {"w": f32(0.5, 0.0, -1.0), "b": f32(2.0)}
    ci = {"w": f32(0.25, 1.0, 0.0), "b": f32(0.0)}
    y = {"w": f32(0.0, -2.0, 1.5), "b": f32(1.25)}
    trainer = Scripted(y, steps=4)
    extras = {f"scaffold.c/{k}": v for k, v in c.items()}
    out = get_strategy("scaffold", TaskConfig()).client_update(X, trainer, task_map(0.5, extras),
                                                              {f"scaffold.ci/{k}": v for k, v in ci.items()})
    call = trainer.calls[0]
    assert (call["epochs"], call["batch_size"], call["lr"], call["seed"], call["prox_mu"]) == (2, 10, 0.5, 3, 0.0)
    # each local step: g − c_i + c, i.e. the offset c − c_i
    np.testing.assert_array_equal(call["grad_offset"]["w"], f32(0.25, -1.0, -1.0))
    np.testing.assert_array_equal(call["grad_offset"]["b"], f32(2.0))
    # Δy = y − x
    np.testing.assert_array_equal(out.tensors["w"], f32(-1.0, 0.0, 1.0))
    np.testing.assert_array_equal(out.tensors["b"], f32(1.0))
    # c_i⁺ = c_i − c + (x − y)/(K η_l):  w: [0.25 − 0.5 + 0.5, 1 − 0 + 0, 0 + 1 − 0.5] = [0.25, 1, 0.5]
    #                                     b: 0 − 2 + (−1)/2 = −2.5
    np.testing.assert_allclose(out.state["scaffold.ci/w"], f32(0.25, 1.0, 0.5))
    np.testing.assert_allclose(out.state["scaffold.ci/b"], f32(-2.5))
    # Δc = c_i⁺ − c_i
    np.testing.assert_allclose(out.tensors["scaffold.dc/w"], f32(0.0, 0.0, 0.5))
    np.testing.assert_allclose(out.tensors["scaffold.dc/b"], f32(-2.5))
    assert out.kind == "delta" and out.num_examples == 40 and out.metrics["steps"] == 4
    assert set(out.state) == {"scaffold.ci/w", "scaffold.ci/b"}


def test_scaffold_first_round_starts_from_zero_control_variates() -> None:
    y = {"w": f32(0.0, -1.0, 0.5), "b": f32(0.0)}
    zeros = {f"scaffold.c/{k}": np.zeros_like(v) for k, v in X.items()}
    out = get_strategy("scaffold", TaskConfig()).client_update(X, Scripted(y, 10), task_map(0.1, zeros), {})
    # c_i⁺ = (x − y)/(K η_l) = (x − y)/1
    np.testing.assert_allclose(out.state["scaffold.ci/w"], f32(1.0, -1.0, 0.0))
    np.testing.assert_allclose(out.tensors["scaffold.dc/b"], f32(0.25))


def test_scaffold_without_a_step_keeps_c_i_and_without_k_or_c_refuses() -> None:
    c = {f"scaffold.c/{k}": np.ones_like(v) for k, v in X.items()}
    ci = {"scaffold.ci/w": f32(1.0, 2.0, 3.0), "scaffold.ci/b": f32(4.0)}
    strategy = get_strategy("scaffold", TaskConfig())
    out = strategy.client_update(X, Scripted(X, 0), task_map(0.1, c), ci)
    assert all(np.array_equal(out.state[k], v) for k, v in ci.items())
    assert not np.any(out.tensors["scaffold.dc/w"]) and not np.any(out.tensors["w"])
    with pytest.raises(ConfigError, match="number of local steps"):
        strategy.client_update(X, Scripted(X, None), task_map(0.1, c), ci)
    with pytest.raises(ConfigError, match="scaffold.c/w"):
        strategy.client_update(X, Scripted(X, 3), task_map(0.1, {"scaffold.c/b": f32(1.0)}), ci)


# ----------------------------------------------------------------------------------------------- SCAFFOLD broker
def scaffold_update(worker: str, n: int, dy: Mapping[str, list[float]], dc: Mapping[str, list[float]]) -> Update:
    tensors = {k: np.array(v, np.float32) for k, v in dy.items()}
    tensors.update({f"scaffold.dc/{k}": np.array(v, np.float32) for k, v in dc.items()})
    return Update(worker, n, tensors, "delta")


ROUND_1 = [scaffold_update("a", 10, {"w": [1.0, 0.0, -2.0], "b": [0.5]}, {"w": [2.0, 4.0, 0.0], "b": [1.0]}),
           scaffold_update("b", 30, {"w": [-1.0, 2.0, 0.0], "b": [1.5]}, {"w": [0.0, -4.0, 8.0], "b": [3.0]})]
ROUND_2 = [scaffold_update("c", 20, {"w": [0.0, 4.0, 4.0], "b": [-1.0]}, {"w": [4.0, 0.0, 0.0], "b": [-2.0]})]


def test_scaffold_server_update_over_two_rounds_uniform_mean() -> None:
    """η_g = 0.5, N = 4 workers: x ← x + η_g · (1/|S|) ΣΔy, c ← c + (1/N) ΣΔc."""
    strategy = get_strategy("scaffold", TaskConfig(options={"eta_g": "0.5"}))
    one = strategy.aggregate(X, ROUND_1, {ROUND_WORKERS: 4}, RNG)
    # mean Δy: w [0, 1, −1], b [1];  x: [1, −2, 0.5] + 0.5·[0, 1, −1] = [1, −1.5, 0];  b: 0.25 + 0.5 = 0.75
    np.testing.assert_array_equal(one.weights["w"], f32(1.0, -1.5, 0.0))
    np.testing.assert_array_equal(one.weights["b"], f32(0.75))
    # c: 0 + [2, 0, 8]/4 = [0.5, 0, 2];  b: 0 + 4/4 = 1
    np.testing.assert_array_equal(one.state["c/w"], f32(0.5, 0.0, 2.0))
    np.testing.assert_array_equal(one.state["c/b"], f32(1.0))
    assert ROUND_WORKERS not in one.state and one.metrics["workers"] == 4 and one.metrics["updates"] == 2
    assert one.state["c/w"].dtype == np.float32 and one.weights["w"].dtype == np.float32
    two = strategy.aggregate(one.weights, ROUND_2, {**one.state, ROUND_WORKERS: 4}, RNG)
    # x: [1, −1.5, 0] + 0.5·[0, 4, 4] = [1, 0.5, 2];  b: 0.75 + 0.5·(−1) = 0.25
    np.testing.assert_array_equal(two.weights["w"], f32(1.0, 0.5, 2.0))
    np.testing.assert_array_equal(two.weights["b"], f32(0.25))
    # c: [0.5, 0, 2] + [4, 0, 0]/4 = [1.5, 0, 2];  b: 1 + (−2)/4 = 0.5
    np.testing.assert_array_equal(two.state["c/w"], f32(1.5, 0.0, 2.0))
    np.testing.assert_array_equal(two.state["c/b"], f32(0.5))
    # the model message of round 3 carries that c, whole
    extra = strategy.downlink_extra(two.weights, two.state)
    assert set(extra) == {"scaffold.c/w", "scaffold.c/b"}
    np.testing.assert_array_equal(extra["scaffold.c/w"], f32(1.5, 0.0, 2.0))


def test_scaffold_weighting_examples_and_n_defaults() -> None:
    strategy = get_strategy("scaffold", TaskConfig(options={"weighting": "examples"}))
    out = strategy.aggregate(X, ROUND_1, {}, RNG)
    # (10·[1, 0, −2] + 30·[−1, 2, 0]) / 40 = [−0.5, 1.5, −0.5];  b: (10·0.5 + 30·1.5)/40 = 1.25
    np.testing.assert_allclose(out.weights["w"], f32(0.5, -0.5, 0.0))
    np.testing.assert_allclose(out.weights["b"], f32(1.5))
    # N unknown: |S| = 2 (full participation); c is never example-weighted
    np.testing.assert_array_equal(out.state["c/w"], f32(1.0, 0.0, 4.0))
    assert out.metrics["workers"] == 2
    # N never below |S|
    assert strategy.aggregate(X, ROUND_1, {ROUND_WORKERS: 1}, RNG).metrics["workers"] == 2


def test_scaffold_starts_from_c_zero_and_refuses_an_update_without_its_control_change() -> None:
    strategy = get_strategy("scaffold", TaskConfig())
    extra = strategy.downlink_extra(X, {})
    assert set(extra) == {"scaffold.c/w", "scaffold.c/b"} and not any(np.any(v) for v in extra.values())
    bare = Update("a", 1, {"w": f32(1.0, 1.0, 1.0), "b": f32(0.0)}, "delta")
    with pytest.raises(Exception, match="scaffold.dc/w"):
        strategy.aggregate(X, [bare], {}, RNG)
    with pytest.raises(ConfigError, match="--policy sync"):
        strategy.apply_async(X, ROUND_1, [1.0, 1.0], {}, RNG)


# ----------------------------------------------------------------------------------------------- options, policies
@pytest.mark.parametrize(("name", "options"), [
    ("fedprox", {"mu": "-0.1"}), ("fedprox", {"mu": "inf"}), ("fedprox", {"mu": "nan"}), ("fedprox", {"mu": "x"}),
    ("scaffold", {"eta_g": "0"}), ("scaffold", {"eta_g": "-1"}), ("scaffold", {"eta_g": "inf"}),
    ("scaffold", {"weighting": "median"}), ("scaffold", {"mu": "0.1"}), ("fedprox", {"eta_g": "1"})])
def test_option_range_errors_are_config_errors(name: str, options: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        get_strategy(name, TaskConfig(options=options))


def test_registry_policies_and_the_strategies_listing() -> None:
    assert {"fedprox", "scaffold"} <= set(strategy_names())
    assert get_strategy("fedprox", TaskConfig()).opts == {"mu": 0.01}
    assert get_strategy("scaffold", TaskConfig()).opts == {"eta_g": 1.0, "weighting": "uniform"}
    for policy in ("sync", "ssp:2", "async"):
        BrokerConfig(strategy="fedprox", policy=policy)
    BrokerConfig(strategy="scaffold")
    for policy in ("ssp:2", "async"):
        with pytest.raises(ConfigError, match="--policy sync"):
            BrokerConfig(strategy="scaffold", policy=policy)
    listing = CliRunner().invoke(strategies_cmd, [], terminal_width=200).output
    assert "fedprox" in listing and "scaffold" in listing
    for option in ("mu", "eta_g", "weighting"):
        assert option in listing
