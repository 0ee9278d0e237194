"""Deep Gradient Compression: conservation of the accumulated gradient, masking, warm-up, clipping, aggregation,
saved state, and a small training run of the strategy pair in process."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from fedctl.errors import ConfigError, ModelMismatch
from fedctl.models import get_model, init_params
from fedctl.strategies.base import ClientResult, Params, TaskConfig, Update
from fedctl.strategies.dgc import DGC, WARMUP_STAGES, clip_by_global_norm, keep_count, warmup_sparsity
from fedctl.testing.trainers import NumpyMLPTrainer, synthetic_digits
from fedctl.wire.constants import KIND_GRADIENT
from fedctl.wire.tensors import SparseTensor, densify
from fedctl.worker.frameworks.base import TrainResult

SHAPES = {"w": (40, 50), "b": (10,)}
M = 0.9


class FixedTrainer:
    """A deterministic stand-in for a framework: the gradient of call ``seed`` is a fixed function of the seed."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]] = SHAPES, scale: float = 1.0) -> None:
        self.shapes = dict(shapes)
        self.scale = scale
        self.calls = 0

    def grad(self, seed: int) -> Params:
        gen = np.random.default_rng(seed)
        return {k: (self.scale * gen.standard_normal(s)).astype(np.float32) for k, s in self.shapes.items()}

    def gradient(self, weights: Params, batch_size: int, seed: int) -> Any:
        from fedctl.worker.frameworks.base import TrainResult

        self.calls += 1
        return TrainResult(self.grad(seed), 25, {"train_loss": 1.5})

    def fit(self, weights: Params, epochs: int, batch_size: int, lr: float, seed: int) -> Any:
        raise AssertionError("DGC never calls fit")


def dgc(**options: Any) -> DGC:
    return DGC(TaskConfig(1, 10, 0.1, options=options))


def task(strategy: DGC, round_no: int) -> dict[str, Any]:
    return strategy.task_for_round(round_no, seed=100 + round_no)


def zeros_or(state: Mapping[str, np.ndarray], key: str, shape: tuple[int, ...]) -> np.ndarray:
    return state[key].astype(np.float64) if key in state else np.zeros(shape)


@pytest.mark.parametrize("fp16", [True, False])
def test_sent_plus_residual_conserves_the_momentum_accumulated_gradient(fp16: bool) -> None:
    strategy, trainer = dgc(sparsity=0.99, fp16=fp16), FixedTrainer()
    state: Mapping[str, np.ndarray] = {}
    total_u = {k: np.zeros(s) for k, s in SHAPES.items()}
    total_sent = {k: np.zeros(s) for k, s in SHAPES.items()}
    for r in range(1, 9):
        t = task(strategy, r)
        g = trainer.grad(t["seed"])
        result = strategy.client_update({}, trainer, t, state)
        sent = densify(result.tensors)
        for k, shape in SHAPES.items():
            u_before_mask = M * zeros_or(state, "dgc.u/" + k, shape) + g[k]
            # This round alone: v_old + u = v_new + sent, to float32 rounding.
            np.testing.assert_allclose(zeros_or(result.state, "dgc.v/" + k, shape) + sent[k],
                                       zeros_or(state, "dgc.v/" + k, shape) + u_before_mask, rtol=0, atol=2e-6)
            total_u[k] += u_before_mask
            total_sent[k] += sent[k]
        sparse = result.tensors["w"]
        assert isinstance(sparse, SparseTensor)
        assert sparse.values.dtype == (np.float16 if fp16 else np.float32)
        state = result.state
    for k, shape in SHAPES.items():
        np.testing.assert_allclose(total_sent[k] + zeros_or(state, "dgc.v/" + k, shape), total_u[k], atol=1e-5)
    # Nothing was dropped: a real residual is still waiting in v.
    assert np.abs(state["dgc.v/w"]).max() > 0.1


def test_momentum_factor_masking_and_residual_at_sent_indices() -> None:
    strategy, trainer = dgc(sparsity=0.95, fp16=True), FixedTrainer()
    first = strategy.client_update({}, trainer, task(strategy, 1), {})
    t = task(strategy, 2)
    second = strategy.client_update({}, trainer, t, first.state)
    sent = second.tensors["w"]
    assert isinstance(sent, SparseTensor)
    idx = sent.indices.astype(np.int64)
    u = second.state["dgc.u/w"].reshape(-1)
    assert (u[idx] == 0).all()
    expected_u = (M * first.state["dgc.u/w"] + trainer.grad(t["seed"])["w"]).reshape(-1)
    rest = np.setdiff1d(np.arange(u.size), idx)
    np.testing.assert_allclose(u[rest], expected_u[rest], rtol=1e-6)
    assert (u[rest] != 0).all()
    # At sent indices only the fp16 rounding error is left in v: at most half an fp16 ulp of the sent value.
    v = second.state["dgc.v/w"].reshape(-1)
    sent32 = sent.values.astype(np.float32)
    assert (np.abs(v[idx]) <= np.abs(sent32) * 2.0**-11 + 2.0**-25).all()
    assert np.abs(v[idx]).max() > 0, "fp16 rounding should leave something in the residual"


def test_fortran_ordered_gradients_and_state_are_masked_in_place() -> None:
    class FortranTrainer(FixedTrainer):
        def grad(self, seed: int) -> Params:
            return {k: np.asfortranarray(v) for k, v in super().grad(seed).items()}

    strategy, trainer = dgc(sparsity=0.9, fp16=False), FortranTrainer()
    first = strategy.client_update({}, trainer, task(strategy, 1), {})
    state = {k: np.asfortranarray(v) for k, v in first.state.items()}
    second = strategy.client_update({}, trainer, task(strategy, 2), state)
    for result in (first, second):
        sent = result.tensors["w"]
        assert isinstance(sent, SparseTensor)
        assert (result.state["dgc.u/w"].reshape(-1)[sent.indices] == 0).all()
        assert (result.state["dgc.v/w"].reshape(-1)[sent.indices] == 0).all()


def test_selection_follows_the_largest_accumulated_values() -> None:
    strategy, trainer = dgc(sparsity=0.99, fp16=False), FixedTrainer()
    t = task(strategy, 1)
    result = strategy.client_update({}, trainer, t, {})
    sent = result.tensors["w"]
    assert isinstance(sent, SparseTensor)
    g = np.abs(trainer.grad(t["seed"])["w"]).reshape(-1)
    assert 16 <= sent.nnz <= 24  # k = 20 of 2000, sampled within 20%
    assert g[sent.indices].min() >= np.delete(g, sent.indices).max()


def test_warmup_schedule_per_round() -> None:
    got = [warmup_sparsity(r, 2, 0.999) for r in range(1, 12)]
    assert got == [0.75, 0.75, 0.9375, 0.9375, 0.984375, 0.984375, 0.99609375, 0.99609375, 0.999, 0.999, 0.999]
    assert [warmup_sparsity(r, 0, 0.999) for r in (1, 5, 100)] == [0.999] * 3
    assert [warmup_sparsity(r, 1, 0.9) for r in (1, 2, 3, 4)] == [0.75, 0.9, 0.9, 0.9]  # never above the final
    # A shorter first (densest) stage: 1 round at 75%, then 2 rounds per stage.
    assert [warmup_sparsity(r, 2, 0.999, first=1) for r in range(1, 10)] == [
        0.75, *[WARMUP_STAGES[1]] * 2, *[WARMUP_STAGES[2]] * 2, *[WARMUP_STAGES[3]] * 2, 0.999, 0.999]
    assert WARMUP_STAGES == tuple(1 - 4.0**-i for i in range(1, 5))
    strategy = dgc(warmup_rounds=3, sparsity=0.999)
    assert [task(strategy, r)["sparsity"] for r in (1, 3, 4, 12, 13, 500)] == [
        0.75, 0.75, 0.9375, 0.99609375, 0.999, 0.999]


def test_worker_keeps_the_round_sparsity_from_the_task() -> None:
    broker_side = dgc(warmup_rounds=2, sparsity=0.999)
    worker_side = DGC(TaskConfig(1, 10, 0.1))  # built from the task alone, as a worker does
    trainer = FixedTrainer()
    for round_no, expected_k in ((1, 500), (3, 125), (9, 2)):
        result = worker_side.client_update({}, trainer, task(broker_side, round_no), {})
        sent = result.tensors["w"]
        assert isinstance(sent, SparseTensor)
        assert keep_count(2000, task(broker_side, round_no)["sparsity"]) == expected_k
        assert abs(sent.nnz - expected_k) <= 0.2 * expected_k
        assert result.metrics["kept"] == sent.nnz + 10


def test_options_in_the_task_override_the_workers_defaults() -> None:
    t = task(dgc(fp16=False, dense_below=5000), 1)
    result = DGC(TaskConfig(1, 10, 0.1)).client_update({}, FixedTrainer(), t, {})
    assert all(isinstance(x, np.ndarray) and x.dtype == np.float32 for x in result.tensors.values())


def test_keep_count_bounds() -> None:
    assert keep_count(2000, 0.999) == 2
    assert keep_count(100, 0.999) == 1
    assert keep_count(100, 0.0) == 100


def test_clipping_bounds_the_global_norm() -> None:
    grads = {"a": np.full((3, 4), 10.0, np.float32), "b": np.full(5, -10.0, np.float32)}
    before = {k: v.copy() for k, v in grads.items()}
    clipped, norm = clip_by_global_norm(grads, 2.0)
    assert norm == pytest.approx(10.0 * np.sqrt(17))
    total = np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in clipped.values()))
    assert total == pytest.approx(2.0, rel=1e-6)
    np.testing.assert_allclose(clipped["a"] / clipped["a"][0, 0], 1.0)  # the direction is kept
    assert clipped["b"][0] < 0
    for k in grads:
        np.testing.assert_array_equal(grads[k], before[k])
    unclipped, _ = clip_by_global_norm(grads, 1e6)
    np.testing.assert_array_equal(unclipped["a"], grads["a"])
    off, _ = clip_by_global_norm(grads, 0.0)
    np.testing.assert_array_equal(off["b"], grads["b"])


def test_clipping_applies_before_accumulation() -> None:
    strategy, trainer = dgc(clip_norm=0.5, sparsity=0.9), FixedTrainer(scale=100.0)
    result = strategy.client_update({}, trainer, task(strategy, 1), {})
    # First round: u = clipped g, so v + sent = clipped g and its global norm is the threshold.
    acc = {k: densify(result.tensors)[k].astype(np.float64) + zeros_or(result.state, "dgc.v/" + k, s)
           for k, s in SHAPES.items()}
    assert np.sqrt(sum(float(np.sum(a * a)) for a in acc.values())) == pytest.approx(0.5, rel=1e-3)
    assert result.metrics["clipped"] == 1.0


def test_non_finite_gradient_is_refused_without_touching_state() -> None:
    class Broken(FixedTrainer):
        def grad(self, seed: int) -> Params:
            g = super().grad(seed)
            g["w"][3, 3] = np.nan
            return g

    strategy = dgc()
    state = strategy.client_update({}, FixedTrainer(), task(strategy, 1), {}).state
    saved = {k: v.copy() for k, v in state.items()}
    with pytest.raises(ConfigError, match="not finite"):
        strategy.client_update({}, Broken(), task(strategy, 2), state)
    for k in saved:
        np.testing.assert_array_equal(state[k], saved[k])


def test_small_tensors_go_dense_with_plain_momentum() -> None:
    strategy, trainer = dgc(dense_below=256), FixedTrainer()
    t1, t2 = task(strategy, 1), task(strategy, 2)
    first = strategy.client_update({}, trainer, t1, {})
    second = strategy.client_update({}, trainer, t2, first.state)
    for result in (first, second):
        assert isinstance(result.tensors["b"], np.ndarray) and result.tensors["b"].dtype == np.float32
        assert isinstance(result.tensors["w"], SparseTensor)
        assert "dgc.v/b" not in result.state
    g1, g2 = trainer.grad(t1["seed"])["b"], trainer.grad(t2["seed"])["b"]
    np.testing.assert_array_equal(densify(first.tensors)["b"], g1)
    np.testing.assert_allclose(densify(second.tensors)["b"], M * g1 + g2, rtol=1e-6)
    all_sparse = dgc(dense_below=0)
    everything_sparse = all_sparse.client_update({}, trainer, task(all_sparse, 1), {})
    assert isinstance(everything_sparse.tensors["b"], SparseTensor)
    assert everything_sparse.tensors["b"].nnz == 1  # k = max(1, round(0.001 · 10))


def test_input_state_is_never_mutated() -> None:
    strategy, trainer = dgc(sparsity=0.9), FixedTrainer()
    state = strategy.client_update({}, trainer, task(strategy, 1), {}).state
    saved = {k: v.copy() for k, v in state.items()}
    again = strategy.client_update({}, trainer, task(strategy, 2), state)
    for k in saved:
        np.testing.assert_array_equal(state[k], saved[k])
        assert again.state[k] is not state[k]
    # A failed push retried from the saved state sends exactly the same update.
    retry = strategy.client_update({}, trainer, task(strategy, 2), state)
    assert_same_result(again, retry)


def assert_same_result(a: ClientResult, b: ClientResult) -> None:
    assert a.tensors.keys() == b.tensors.keys() and a.state.keys() == b.state.keys()
    for k, t in a.tensors.items():
        other = b.tensors[k]
        if isinstance(t, SparseTensor):
            assert isinstance(other, SparseTensor)
            np.testing.assert_array_equal(t.indices, other.indices)
            np.testing.assert_array_equal(t.values, other.values)
            assert t.values.dtype == other.values.dtype
        else:
            assert isinstance(other, np.ndarray)
            np.testing.assert_array_equal(t, other)
    for k in a.state:
        np.testing.assert_array_equal(a.state[k], b.state[k])


def save_and_load(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    buf = io.BytesIO()
    np.savez(buf, **{f"strategy/{k}": v for k, v in state.items()})
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as npz:
        return {k.removeprefix("strategy/"): npz[k] for k in npz.files}


def test_restart_from_saved_state_equals_continuing() -> None:
    trainer = FixedTrainer()
    running = dgc(sparsity=0.99, warmup_rounds=1)
    state: Mapping[str, np.ndarray] = {}
    results = []
    for r in range(1, 6):
        result = running.client_update({}, trainer, task(running, r), state)
        results.append(result)
        state = result.state
    # A worker that stopped after round 3 and restarted (fresh strategy object, state read back from disk).
    restored = save_and_load(results[2].state)
    restarted = DGC(TaskConfig(1, 10, 0.1))
    r4 = restarted.client_update({}, trainer, task(running, 4), restored)
    r5 = restarted.client_update({}, trainer, task(running, 5), r4.state)
    assert_same_result(r4, results[3])
    assert_same_result(r5, results[4])
    # Without the saved state the worker starts from zeros: a different update.
    fresh = restarted.client_update({}, trainer, task(running, 4), {})
    assert not np.array_equal(densify(fresh.tensors)["w"], densify(results[3].tensors)["w"])


def test_state_of_another_model_is_refused() -> None:
    with pytest.raises(ModelMismatch):
        dgc().client_update({}, FixedTrainer(), task(dgc(), 1), {"dgc.v/w": np.zeros((3, 3), np.float32)})


def test_aggregate_equals_the_dense_computation() -> None:
    strategy = DGC(TaskConfig(1, 10, 0.5, lr_decay=0.5))
    gen = np.random.default_rng(0)
    weights = {"w": gen.standard_normal((4, 5)).astype(np.float32), "b": gen.standard_normal(3).astype(np.float32)}
    updates = [
        Update("a", 10, {"w": SparseTensor((4, 5), np.array([0, 7, 19], np.uint32),
                                           np.array([1.5, -2.0, 0.25], np.float16)),
                         "b": np.array([3.0, 2.0, 3.0], np.float32)}, KIND_GRADIENT),
        Update("b", 30, {"w": SparseTensor((4, 5), np.array([7, 8], np.uint32), np.array([4.0, 1.0], np.float32)),
                         "b": np.array([-1.0, 0.0, 1.0], np.float32)}, KIND_GRADIENT),
    ]
    state: dict[str, Any] = {}
    for step, lr in ((0, 0.5), (1, 0.25)):
        result = strategy.aggregate(weights, updates, state, np.random.default_rng(0))
        dense = [densify(u.tensors) for u in updates]
        for k in weights:
            mean = (10 * dense[0][k].astype(np.float64) + 30 * dense[1][k]) / 40
            np.testing.assert_allclose(result.weights[k], weights[k] - lr * mean, rtol=1e-6, atol=1e-7)
            assert result.weights[k].dtype == np.float32
        assert result.state["step"] == step + 1
        assert result.metrics["lr"] == lr
        assert result.metrics["updates"] == 2
        assert result.metrics["nnz"] == 4 + 2  # w: indices 0, 7, 8, 19; b: (10·3 − 30·1) / 40 = 0 at index 0
        weights, state = result.weights, result.state


def test_training_reduces_the_loss() -> None:
    spec = get_model("mlp")
    workers = [NumpyMLPTrainer(spec, *synthetic_digits(200, seed=i)) for i in range(3)]
    held_out = NumpyMLPTrainer(spec, *synthetic_digits(600, seed=99))
    strategy = DGC(TaskConfig(1, 32, 0.1, options={"sparsity": 0.99, "warmup_rounds": 2}))
    weights, states, broker_state = init_params(spec, 0), [{} for _ in workers], {}  # type: ignore[var-annotated]
    start = held_out.evaluate(weights)
    densities = []
    for r in range(1, 31):
        updates = []
        for i, trainer in enumerate(workers):
            result = strategy.client_update(weights, trainer, strategy.task_for_round(r, 1000 * r + i), states[i])
            states[i] = result.state
            densities.append(result.metrics["kept"] / sum(w.size for w in weights.values()))
            updates.append(Update(str(i), result.num_examples, result.tensors, result.kind))
        agg = strategy.aggregate(weights, updates, broker_state, np.random.default_rng(r))
        weights, broker_state = agg.weights, agg.state
    end = held_out.evaluate(weights)
    assert end["loss"] < 0.25 * start["loss"]
    assert end["accuracy"] > 0.9
    assert max(densities[-3:]) < 0.02  # 1% of the weights plus the dense biases


def test_model_scope_takes_one_topk_over_all_tensors_and_leaves_out_empty_ones() -> None:
    grads = {"big": np.zeros((50, 40), np.float32), "other": np.zeros(1000, np.float32),
             "bias": np.ones(10, np.float32)}
    grads["big"].reshape(-1)[[5, 77, 1999]] = [9.0, -8.0, 7.0]  # the three largest of the whole model
    grads["other"][3] = 0.5

    class Trainer:
        def gradient(self, weights: Any, batch_size: int, seed: int) -> Any:
            return TrainResult({k: v.copy() for k, v in grads.items()}, 10, {"train_loss": 1.0})

        def fit(self, weights: Any, epochs: int, batch_size: int, lr: float, seed: int) -> Any:
            raise AssertionError("DGC never calls fit")

    strategy = DGC(TaskConfig(1, 0, 0.1, options={"sparsity": 1 - 3 / 3000, "scope": "model", "fp16": False}))
    result = strategy.client_update({}, Trainer(), strategy.task_for_round(1, 0), {})
    assert set(result.tensors) == {"big", "bias"}, "a tensor with nothing kept is left out; small ones go dense"
    big = result.tensors["big"]
    assert isinstance(big, SparseTensor)
    assert big.indices.tolist() == [5, 77, 1999] and big.values.tolist() == [9.0, -8.0, 7.0]
    assert result.state["dgc.v/other"][3] == pytest.approx(0.5), "what was not sent stays in the residual"
    assert result.metrics["kept"] == 3 + 10
    # The broker treats the left-out tensor as zero.
    weights = {k: np.ones_like(v) for k, v in grads.items()}
    agg = strategy.aggregate(weights, [Update("w", 10, result.tensors, "gradient")], {}, np.random.default_rng(0))
    assert np.array_equal(agg.weights["other"], weights["other"])
    assert agg.weights["big"].reshape(-1)[5] == pytest.approx(1 - 0.1 * 9.0)


@pytest.mark.parametrize("lr_decay", [1.0, 0.5])
def test_aggregate_is_fedsgds_on_the_same_updates(lr_decay: float) -> None:
    """DGC's broker side is plain FedSGD's: bit-identical weights and step on the same sparse updates and on their
    dense equivalents."""
    from fedctl.strategies.fedsgd import FedSGD

    task_config = TaskConfig(1, 10, 0.3, lr_decay=lr_decay)
    gen = np.random.default_rng(5)
    weights = {"w": gen.standard_normal((6, 7)).astype(np.float32), "b": gen.standard_normal(4).astype(np.float32)}
    sparse = [Update(f"k{i}", 10 + 7 * i,
                     {"w": SparseTensor((6, 7), np.sort(gen.choice(42, 5, replace=False)).astype(np.uint32),
                                        gen.standard_normal(5).astype(np.float16)),
                      "b": gen.standard_normal(4).astype(np.float32)}, KIND_GRADIENT) for i in range(3)]
    dense = [Update(u.worker, u.num_examples, densify(u.tensors), KIND_GRADIENT) for u in sparse]
    for updates in (sparse, dense):
        d_weights, d_state = weights, {}  # type: ignore[var-annotated]
        f_weights, f_state = weights, {}  # type: ignore[var-annotated]
        for _ in range(3):
            d = DGC(task_config).aggregate(d_weights, updates, d_state, np.random.default_rng(0))
            f = FedSGD(task_config).aggregate(f_weights, updates, f_state, np.random.default_rng(0))
            assert d.weights.keys() == f.weights.keys()
            for name in weights:
                assert d.weights[name].dtype == f.weights[name].dtype == np.float32
                assert d.weights[name].tobytes() == f.weights[name].tobytes()
            assert d.state == f.state
            assert d.metrics["lr"] == f.metrics["lr"] and d.metrics["updates"] == f.metrics["updates"]
            d_weights, d_state, f_weights, f_state = d.weights, d.state, f.weights, f.state
