"""Strategies as pure functions on literal arrays, the registry, and the worker side with the numpy MLP."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from fedctl.errors import ConfigError
from fedctl.models import get_model, init_params
from fedctl.strategies import (
    AggregateResult,
    ClientResult,
    Strategy,
    TaskConfig,
    Update,
    get_strategy,
    register,
    strategy_names,
)
from fedctl.strategies.base import LocalTrainer, Params
from fedctl.strategies.kernels import example_weights, weighted_mean
from fedctl.testing.trainers import NumpyMLPTrainer, synthetic_digits

RNG = np.random.default_rng(0)


def upd(worker: str, n: int, kind: str, **tensors: list[float]) -> Update:
    return Update(worker, n, {k: np.array(v, dtype=np.float32) for k, v in tensors.items()}, kind)


def test_fedavg_is_the_example_weighted_mean() -> None:
    strategy = get_strategy("fedavg", TaskConfig(1, 10, 0.1))
    weights = {"w": np.array([100.0, 100.0], np.float32), "b": np.array([7.0], np.float32)}
    updates = [upd("a", 1, "weights", w=[1.0, 2.0], b=[0.0]), upd("b", 3, "weights", w=[5.0, 10.0], b=[4.0])]
    result = strategy.aggregate(weights, updates, {}, RNG)
    # (1·[1, 2] + 3·[5, 10]) / 4 = [4, 8];  (1·0 + 3·4) / 4 = 3
    np.testing.assert_array_equal(result.weights["w"], np.array([4.0, 8.0], np.float32))
    np.testing.assert_array_equal(result.weights["b"], np.array([3.0], np.float32))
    assert result.weights["w"].dtype == np.float32
    assert result.metrics["updates"] == 2


def test_fedsgd_takes_one_step_on_the_weighted_mean_gradient() -> None:
    strategy = get_strategy("fedsgd", TaskConfig(1, 0, 0.5))
    weights = {"w": np.array([1.0, 1.0], np.float32)}
    updates = [upd("a", 1, "gradient", w=[2.0, 0.0]), upd("b", 3, "gradient", w=[-2.0, 4.0])]
    result = strategy.aggregate(weights, updates, {}, RNG)
    # g = (1·[2, 0] + 3·[-2, 4]) / 4 = [-1, 3];  w − 0.5·g = [1.5, −0.5]
    np.testing.assert_array_equal(result.weights["w"], np.array([1.5, -0.5], np.float32))
    assert result.metrics["grad_norm"] == pytest.approx(np.sqrt(10.0))
    assert weights["w"].tolist() == [1.0, 1.0], "aggregate must not modify the global weights in place"


def test_single_update_is_returned_exactly() -> None:
    strategy = get_strategy("fedavg", TaskConfig())
    w = np.array([0.1, -0.2, 1e-8], np.float32)
    result = strategy.aggregate({"w": np.zeros(3, np.float32)}, [Update("a", 17, {"w": w}, "weights")], {}, RNG)
    assert result.weights["w"].tobytes() == w.tobytes()


def test_example_weights_refuse_empty_and_zero() -> None:
    np.testing.assert_allclose(example_weights([1, 3]), [0.25, 0.75])
    with pytest.raises(ConfigError):
        example_weights([])
    with pytest.raises(ConfigError):
        example_weights([0, 0])
    with pytest.raises(ValueError):
        weighted_mean([{"w": np.zeros(1)}], [1, 2])


def test_task_config_validates() -> None:
    for bad in ({"epochs": 0}, {"batch_size": -1}, {"lr": 0.0}, {"lr": -1.0}):
        with pytest.raises(ConfigError):
            TaskConfig(**bad)


# ----------------------------------------------------------------------------------------------- registry
def test_unknown_strategy_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as e:
        get_strategy("fedprox-typo", TaskConfig())
    assert "fedprox-typo" in str(e.value)
    assert "fedavg" in (e.value.fix or "") and "fedsgd" in (e.value.fix or "")
    assert {"fedavg", "fedsgd"} <= set(strategy_names())


@register
class HalfwayAverage(Strategy):
    """A strategy defined in this test file: the extensibility promise (one file adds one algorithm)."""

    name = "test-halfway"
    update_kind = "weights"

    def client_update(self, weights: Params, trainer: LocalTrainer, task: Mapping[str, Any]) -> ClientResult:
        return ClientResult("weights", {k: v * 0 for k, v in weights.items()}, 1)

    def aggregate(self, weights: Params, updates: Sequence[Update], state: dict[str, Any],
                  rng: np.random.Generator) -> AggregateResult:
        mean = weighted_mean([u.tensors for u in updates], [u.num_examples for u in updates])
        calls = int(state.get("calls", 0)) + 1
        return AggregateResult({k: (weights[k] + mean[k]) / 2 for k in weights}, {"calls": calls})


def test_a_strategy_registered_in_a_test_file_is_found_by_name() -> None:
    assert "test-halfway" in strategy_names()
    strategy = get_strategy("test-halfway", TaskConfig(2, 5, 0.01))
    assert isinstance(strategy, HalfwayAverage) and strategy.task.epochs == 2
    assert strategy.task_for_round(1, 42)["strategy"] == "test-halfway"
    result = strategy.aggregate({"w": np.array([2.0])}, [upd("a", 1, "weights", w=[4.0])], {}, RNG)
    assert result.weights["w"].tolist() == [3.0] and result.state == {"calls": 1}


def test_register_refuses_nameless_and_conflicting_classes() -> None:
    class Nameless(HalfwayAverage):
        name = ""

    with pytest.raises(TypeError):
        register(Nameless)

    class Impostor(HalfwayAverage):
        pass

    with pytest.raises(ValueError):
        register(Impostor)  # same name "test-halfway", another class
    assert register(HalfwayAverage) is HalfwayAverage  # re-registering the same class is harmless


def test_task_for_round_carries_what_a_worker_needs() -> None:
    task = get_strategy("fedavg", TaskConfig(3, 20, 0.25)).task_for_round(4, 99)
    assert task == {"strategy": "fedavg", "kind": "weights", "epochs": 3, "batch_size": 20, "lr": 0.25, "seed": 99,
                    "round": 4}


# ----------------------------------------------------------------------------------------------- worker side
@pytest.fixture(scope="module")
def mlp() -> tuple[NumpyMLPTrainer, Params]:
    spec = get_model("mlp")
    x, y = synthetic_digits(200, seed=3)
    return NumpyMLPTrainer(spec, x, y), init_params(spec, 0)


def test_fedavg_client_update_reduces_the_loss(mlp: tuple[NumpyMLPTrainer, Params]) -> None:
    trainer, weights = mlp
    strategy = get_strategy("fedavg", TaskConfig(2, 10, 0.05))
    task = strategy.task_for_round(1, seed=5)
    result = strategy.client_update(weights, trainer, task, {})
    assert result.kind == "weights" and result.num_examples == 200
    assert set(result.tensors) == set(weights)
    assert all(result.tensors[k].shape == weights[k].shape and result.tensors[k].dtype == np.float32
               for k in weights)
    before, after = trainer.evaluate(weights)["loss"], trainer.evaluate(result.tensors)["loss"]
    assert after < 0.5 * before
    assert "train_loss" in result.metrics
    again = strategy.client_update(weights, trainer, task, {})
    assert all(np.array_equal(again.tensors[k], result.tensors[k]) for k in weights), "same seed, same result"


@pytest.mark.parametrize("batch_size", [0, 16])
def test_fedsgd_client_update_returns_the_trainers_gradient(mlp: tuple[NumpyMLPTrainer, Params],
                                                             batch_size: int) -> None:
    trainer, weights = mlp
    strategy = get_strategy("fedsgd", TaskConfig(1, batch_size, 0.1))
    task = strategy.task_for_round(1, seed=11)
    result = strategy.client_update(weights, trainer, task, {})
    expected = trainer.gradient(weights, batch_size, 11)
    assert result.kind == "gradient" and result.num_examples == expected.num_examples
    for k in weights:
        np.testing.assert_array_equal(result.tensors[k], expected.params[k])


def test_fedsgd_round_with_numpy_mlp_reduces_the_loss(mlp: tuple[NumpyMLPTrainer, Params]) -> None:
    trainer, weights = mlp
    strategy = get_strategy("fedsgd", TaskConfig(1, 0, 0.5))
    grad = strategy.client_update(weights, trainer, strategy.task_for_round(1, 0), {})
    new = strategy.aggregate(weights, [Update("a", grad.num_examples, grad.tensors, grad.kind)], {}, RNG).weights
    assert trainer.evaluate(new)["loss"] < trainer.evaluate(weights)["loss"]
