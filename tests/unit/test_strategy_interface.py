"""The strategy interface's shared machinery: options, the learning-rate schedule, sparse-aware kernels, the
exact downlink delta and the broker's bounded history of model versions."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from fedctl.broker.params import ParameterStore
from fedctl.errors import ConfigError
from fedctl.strategies.base import Option, TaskConfig, Update, exact_delta
from fedctl.strategies.fedavg import FedAvg
from fedctl.strategies.fedsgd import FedSGD
from fedctl.strategies.kernels import axpy, weighted_mean
from fedctl.wire.tensors import SparseTensor


def _sparse(dense: np.ndarray, keep: np.ndarray, dtype: Any = np.float32) -> SparseTensor:
    idx = np.flatnonzero(keep.reshape(-1)).astype(np.uint32)
    return SparseTensor(dense.shape, idx, dense.reshape(-1)[idx].astype(dtype))


class Opted(FedAvg):
    name = "opted-test"
    options = {"rate": Option(float, 0.5, "a rate", lambda v: 0 < v <= 1, "in (0, 1]"),
               "mode": Option(str, "a", "a mode", lambda v: v in ("a", "b"), "a or b"),
               "flag": Option(bool, False, "a flag"),
               "bound": Option(float, math.inf, "a bound", lambda v: v > 0, "positive")}


def test_options_take_defaults_parse_strings_and_refuse_unknown_or_bad_values() -> None:
    assert Opted(TaskConfig()).opts == {"rate": 0.5, "mode": "a", "flag": False, "bound": math.inf}
    got = Opted(TaskConfig(options={"rate": "0.25", "mode": "b", "flag": "yes", "bound": "inf"})).opts
    assert got == {"rate": 0.25, "mode": "b", "flag": True, "bound": math.inf}
    with pytest.raises(ConfigError, match="no option 'speed'") as info:
        Opted(TaskConfig(options={"speed": "1"}))
    assert "rate" in (info.value.fix or "")
    with pytest.raises(ConfigError, match="out of range"):
        Opted(TaskConfig(options={"rate": "2"}))
    with pytest.raises(ConfigError, match="not a valid float"):
        Opted(TaskConfig(options={"rate": "fast"}))
    with pytest.raises(ConfigError, match="not a valid bool"):
        Opted(TaskConfig(options={"flag": "maybe"}))


def test_options_travel_to_the_worker_in_the_task_and_parse_back() -> None:
    broker_side = Opted(TaskConfig(options={"rate": "0.25", "bound": "inf"}))
    task = broker_side.task_for_round(3, 7)
    assert task["options"]["rate"] == 0.25 and task["round"] == 3
    worker_side = Opted(TaskConfig(options=task["options"]))
    assert worker_side.opts == broker_side.opts


def test_lr_schedule_decays_per_round_and_fedsgd_follows_it() -> None:
    task = TaskConfig(lr=0.2, lr_decay=0.5)
    assert [task.lr_at(s) for s in range(3)] == [0.2, 0.1, 0.05]
    assert FedSGD(task).task_for_round(3, 0)["lr"] == pytest.approx(0.05)
    with pytest.raises(ConfigError, match="lr decay"):
        TaskConfig(lr_decay=0.0)
    strategy = FedSGD(task)
    w = {"w": np.zeros(2, np.float32)}
    grad = Update("a", 1, {"w": np.ones(2, np.float32)}, "gradient")
    state: dict[str, Any] = {}
    steps = []
    for _ in range(3):
        result = strategy.aggregate(w, [grad], state, np.random.default_rng(0))
        steps.append(float(w["w"][0] - result.weights["w"][0]))
        w, state = result.weights, result.state
    assert steps == pytest.approx([0.2, 0.1, 0.05])
    assert state["step"] == 3


def test_kernels_scatter_sparse_and_fp16_terms_like_their_dense_values() -> None:
    rng = np.random.default_rng(1)
    dense = [rng.normal(size=(4, 5)).astype(np.float32) for _ in range(3)]
    keeps = [rng.random((4, 5)) < 0.3 for _ in range(3)]
    sparse = [{"t": _sparse(d, k, np.float16)} for d, k in zip(dense, keeps)]
    reference = [{"t": np.where(k, d.astype(np.float16).astype(np.float32), 0)} for d, k in zip(dense, keeps)]
    got = weighted_mean(sparse, [1, 2, 3])["t"]
    want = weighted_mean(reference, [1, 2, 3])["t"]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    mixed = weighted_mean([sparse[0], reference[1]], [1, 1])["t"]
    np.testing.assert_allclose(mixed, (reference[0]["t"] + reference[1]["t"]) / 2, rtol=1e-6)
    y = {"t": np.ones((4, 5), np.float32)}
    np.testing.assert_allclose(axpy(-0.5, sparse[0], y)["t"], 1 - 0.5 * reference[0]["t"], rtol=1e-6)


def test_exact_delta_rebuilds_the_current_model_bit_for_bit_and_goes_dense_when_most_changed() -> None:
    rng = np.random.default_rng(2)
    base = {"a": rng.normal(size=(50, 40)).astype(np.float32), "b": rng.normal(size=30).astype(np.float32)}
    current = {"a": base["a"].copy(), "b": base["b"] + np.float32(0.1)}
    current["a"].reshape(-1)[[3, 17, 999]] += np.float32(1e-3)
    delta = exact_delta(current, base)
    assert isinstance(delta["a"], SparseTensor) and delta["a"].nnz == 3
    assert isinstance(delta["b"], np.ndarray)
    rebuilt = {k: v.copy() for k, v in base.items()}
    for name, t in delta.items():
        if isinstance(t, SparseTensor):
            rebuilt[name].reshape(-1)[t.indices] = t.values
        else:
            rebuilt[name] = t
    for name in current:
        assert np.array_equal(rebuilt[name], current[name])
    assert exact_delta(current, current)["a"].nnz == 0


def test_store_keeps_past_versions_within_its_memory_bound() -> None:
    w = {"w": np.zeros(256, np.float32)}  # 1 KiB per version
    store = ParameterStore(w, history_bytes=3 * 1024)
    for i in range(1, 6):
        store.replace({"w": np.full(256, i, np.float32)})
    assert store.version == 5 and store.kept_versions == 3
    assert store.at(5) is store.weights
    assert store.at(4) is not None and float(store.at(4)["w"][0]) == 4.0
    assert store.at(2) is not None and store.at(1) is None
    no_history = ParameterStore(w, history_bytes=0)
    no_history.replace({"w": np.ones(256, np.float32)})
    assert no_history.at(0) is None and no_history.kept_versions == 0


def test_fedsgd_server_momentum_is_heavy_ball_and_survives_a_checkpoint(tmp_path: Any) -> None:
    from fedctl.broker.store import Checkpointer

    strategy = FedSGD(TaskConfig(lr=0.1, options={"momentum": "0.5"}))
    w = {"w": np.zeros(2, np.float32)}
    grad = Update("a", 1, {"w": np.ones(2, np.float32)}, "gradient")
    first = strategy.aggregate(w, [grad], {}, np.random.default_rng(0))
    second = strategy.aggregate(first.weights, [grad], first.state, np.random.default_rng(0))
    # v1 = g = 1 → w = −0.1; v2 = 0.5 + 1 = 1.5 → w = −0.25
    np.testing.assert_allclose(second.weights["w"], [-0.25, -0.25], rtol=1e-6)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(ParameterStore(second.weights, 2), {"round": 2, "strategy_state": second.state})
    store, state = ckpt.load()
    assert set(store.weights) == {"w"}, "strategy arrays are not model tensors"
    np.testing.assert_array_equal(state["strategy_state"]["velocity/w"], second.state["velocity/w"])
    assert state["strategy_state"]["step"] == 2
    third = strategy.aggregate(store.weights, [grad], state["strategy_state"], np.random.default_rng(0))
    np.testing.assert_allclose(third.weights["w"], [-0.425, -0.425], rtol=1e-6)  # v3 = 1.75
