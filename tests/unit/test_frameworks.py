"""Framework adapters: canonical names, exact weight round-trips and PyTorch/MXNet numerical equivalence."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, cast

import numpy as np
import pytest

from fedctl.errors import BackendUnavailable, ConfigError, ModelMismatch
from fedctl.models.zoo import ModelSpec, get_model, init_params
from fedctl.worker import frameworks
from fedctl.worker.frameworks import Params, Trainer, available_backends, create_trainer, default_backend
from fedctl.worker.frameworks.device import Device, parse_device

MODELS = ["mlp", "lenet5"]




def _data(n: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, size=n).astype(np.int64)
    return x, y


def _learnable(n: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ten fixed prototype images plus noise: a task any of the zoo models learns in a few epochs."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(10, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, size=n).astype(np.int64)
    x = (protos[y] + 0.5 * rng.normal(size=(n, 1, 28, 28))).astype(np.float32)
    return x, y


class _Adapter(Trainer, Protocol):
    """What both adapters offer beyond the Trainer protocol, used here to inspect them."""

    def set_weights(self, weights: Params) -> None: ...

    def get_weights(self) -> Params: ...

    def logits(self, weights: Params) -> np.ndarray: ...


def _trainer(backend: str, model: str, n: int = 64, seed: int = 0) -> _Adapter:
    x, y = _data(n, seed)
    return cast(_Adapter, create_trainer(backend, get_model(model), x, y, threads=1))


def _close(a: np.ndarray, b: np.ndarray, rel: float = 1e-4) -> None:
    scale = max(float(np.abs(b).max()), 1e-12)
    np.testing.assert_allclose(a, b, rtol=rel, atol=rel * scale)


# -- registry ------------------------------------------------------------------------------------------------------


def test_import_does_not_import_frameworks() -> None:
    code = "import fedctl.worker.frameworks, sys; assert 'torch' not in sys.modules and 'mxnet' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_available_and_default_backend(both: None) -> None:
    assert available_backends() == ["mxnet", "torch"]
    assert default_backend() == "torch"


def test_unknown_backend_is_config_error() -> None:
    x, y = _data(4)
    with pytest.raises(ConfigError, match="mxnet, torch"):
        create_trainer("tensorflow", get_model("mlp"), x, y)


def test_missing_framework_is_backend_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = frameworks.Backend("fedctl_no_such_module.adapter:Trainer", "fedctl_no_such_module", "pip install it")
    monkeypatch.setitem(frameworks.BACKENDS, "ghost", fake)
    assert "ghost" not in available_backends()
    x, y = _data(4)
    with pytest.raises(BackendUnavailable) as info:
        create_trainer("ghost", get_model("mlp"), x, y)
    assert info.value.fix == "pip install it"


# -- devices -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("cpu", Device("cpu")), ("gpu", Device("gpu", 0)), ("gpu:1", Device("gpu", 1)), ("CUDA:2", Device("gpu", 2))],
)
def test_parse_device(text: str, expected: Device) -> None:
    assert parse_device(text) == expected


@pytest.mark.parametrize("text", ["tpu", "gpu:-1", "gpu:x", "cpu:3", ""])
def test_parse_device_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_device(text)


def test_missing_gpu_is_backend_unavailable(backend: str) -> None:
    with pytest.raises(BackendUnavailable, match="--device cpu"):
        x, y = _data(4)
        create_trainer(backend, get_model("mlp"), x, y, device="gpu:63")


# -- parameters ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_parameter_names_and_shapes_follow_spec(backend: str, model: str) -> None:
    spec: ModelSpec = get_model(model)
    weights = _trainer(backend, model).get_weights()
    assert list(weights) == spec.names()
    for p in spec.params:
        assert weights[p.name].shape == p.shape
        assert weights[p.name].dtype == np.float32


@pytest.mark.parametrize("model", MODELS)
def test_weight_round_trip_is_exact(backend: str, model: str) -> None:
    trainer = _trainer(backend, model)
    weights = init_params(get_model(model), seed=3)
    trainer.set_weights(weights)
    back = trainer.get_weights()
    for name, arr in weights.items():
        np.testing.assert_array_equal(back[name], arr)


def test_wrong_shape_is_model_mismatch(backend: str) -> None:
    trainer = _trainer(backend, "mlp")
    weights = init_params(get_model("mlp"), seed=0)
    weights["fc2.weight"] = np.zeros((64, 127), np.float32)
    with pytest.raises(ModelMismatch, match=r"fc2\.weight.*\(64, 128\).*\(64, 127\)"):
        trainer.fit(weights, epochs=1, batch_size=8, lr=0.1, seed=0)


def test_missing_or_extra_name_is_model_mismatch(backend: str) -> None:
    trainer = _trainer(backend, "mlp")
    weights = init_params(get_model("mlp"), seed=0)
    missing = {k: v for k, v in weights.items() if k != "fc3.bias"}
    with pytest.raises(ModelMismatch, match=r"fc3\.bias"):
        trainer.gradient(missing, batch_size=0, seed=0)
    with pytest.raises(ModelMismatch, match="conv1.weight"):
        trainer.evaluate({**weights, "conv1.weight": np.zeros((6, 1, 5, 5), np.float32)})


# -- numerics ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_torch_and_mxnet_agree_on_logits_loss_and_gradient(both: None, model: str) -> None:
    weights = init_params(get_model(model), seed=1)
    tt, mt = _trainer("torch", model), _trainer("mxnet", model)
    _close(mt.logits(weights), tt.logits(weights))
    assert mt.evaluate(weights)["loss"] == pytest.approx(tt.evaluate(weights)["loss"], rel=1e-5)
    for batch_size in (0, 16):
        gt, gm = tt.gradient(weights, batch_size, seed=5), mt.gradient(weights, batch_size, seed=5)
        assert gt.num_examples == gm.num_examples == (batch_size or 64)
        assert gm.metrics["train_loss"] == pytest.approx(gt.metrics["train_loss"], rel=1e-5)
        for name in weights:
            _close(gm.params[name], gt.params[name])


@pytest.mark.parametrize("model", MODELS)
def test_full_batch_fit_step_equals_w_minus_lr_g(backend: str, model: str) -> None:
    trainer, lr = _trainer(backend, model), 0.3
    weights = init_params(get_model(model), seed=2)
    grads = trainer.gradient(weights, batch_size=0, seed=0).params
    result = trainer.fit(weights, epochs=1, batch_size=0, lr=lr, seed=0)
    assert result.metrics["steps"] == 1 and result.num_examples == 64
    for name, w in weights.items():
        np.testing.assert_allclose(result.params[name], w - lr * grads[name], rtol=1e-5, atol=1e-6)


def test_chunked_gradient_equals_full_batch_gradient(both: None) -> None:
    """1500 examples span two chunks of 1000; weighting by the total count keeps the full-batch mean."""
    import torch
    import torch.nn.functional as F

    from fedctl.worker.frameworks.torch import build_module

    spec, (x, y) = get_model("mlp"), _data(1500, seed=4)
    weights = init_params(spec, seed=4)
    net = build_module(spec)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    F.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    reference = {name: p.grad.numpy() for name, p in net.named_parameters() if p.grad is not None}
    for backend in ("torch", "mxnet"):
        grads = create_trainer(backend, spec, x, y, threads=1).gradient(weights, batch_size=0, seed=0).params
        for name, g in reference.items():
            _close(grads[name], g)


def test_minibatch_fit_agrees_across_frameworks(both: None) -> None:
    """Same seed, same batches: several epochs of B=10 SGD land on the same weights in both frameworks."""
    weights = init_params(get_model("lenet5"), seed=6)
    rt = _trainer("torch", "lenet5").fit(weights, epochs=2, batch_size=10, lr=0.05, seed=9)
    rm = _trainer("mxnet", "lenet5").fit(weights, epochs=2, batch_size=10, lr=0.05, seed=9)
    assert rt.metrics["steps"] == rm.metrics["steps"] == 14
    assert rm.metrics["train_loss"] == pytest.approx(rt.metrics["train_loss"], rel=1e-4)
    for name in weights:
        _close(rm.params[name], rt.params[name], rel=1e-3)


@pytest.mark.parametrize("model", MODELS)
def test_fit_reduces_loss_on_learnable_task(backend: str, model: str) -> None:
    spec, (x, y) = get_model(model), _learnable()
    trainer = create_trainer(backend, spec, x, y, threads=1)
    weights = init_params(spec, seed=0)
    before = trainer.evaluate(weights)
    result = trainer.fit(weights, epochs=6, batch_size=16, lr=0.1, seed=0)
    after = trainer.evaluate(result.params)
    assert result.metrics["steps"] == 6 * 16
    assert after["loss"] < 0.5 * before["loss"]
    assert after["accuracy"] > 0.8


def test_fit_is_deterministic_in_seed(backend: str) -> None:
    trainer = _trainer(backend, "mlp")
    weights = init_params(get_model("mlp"), seed=0)
    a = trainer.fit(weights, epochs=1, batch_size=8, lr=0.1, seed=1).params
    b = trainer.fit(weights, epochs=1, batch_size=8, lr=0.1, seed=1).params
    c = trainer.fit(weights, epochs=1, batch_size=8, lr=0.1, seed=2).params
    np.testing.assert_array_equal(a["fc1.weight"], b["fc1.weight"])
    assert not np.array_equal(a["fc1.weight"], c["fc1.weight"])


@pytest.mark.parametrize("batch_size", [0, 7, 1000])
def test_evaluate_matches_manual_argmax(backend: str, batch_size: int) -> None:
    trainer = _trainer(backend, "lenet5", n=50)
    _, y = _data(50)
    weights = init_params(get_model("lenet5"), seed=8)
    logits = trainer.logits(weights).astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    ev = trainer.evaluate(weights, batch_size=batch_size)
    assert 0.0 <= ev["accuracy"] <= 1.0
    assert ev["num_examples"] == 50
    assert ev["accuracy"] == pytest.approx(float(np.mean(logits.argmax(axis=1) == y)))
    assert ev["loss"] == pytest.approx(float(-log_probs[np.arange(50), y].mean()), rel=1e-5)


def test_bad_arguments_are_config_errors(backend: str) -> None:
    trainer = _trainer(backend, "mlp")
    weights = init_params(get_model("mlp"), seed=0)
    with pytest.raises(ConfigError):
        trainer.fit(weights, epochs=1, batch_size=-1, lr=0.1, seed=0)
    with pytest.raises(ConfigError):
        trainer.fit(weights, epochs=-1, batch_size=8, lr=0.1, seed=0)
    with pytest.raises(ConfigError):
        create_trainer(backend, get_model("mlp"), np.zeros((4, 28, 28), np.float32), np.zeros(4, np.int64))


def test_zero_epochs_returns_weights_and_their_loss(backend: str) -> None:
    trainer = _trainer(backend, "mlp")
    weights = init_params(get_model("mlp"), seed=0)
    result = trainer.fit(weights, epochs=0, batch_size=8, lr=0.1, seed=0)
    assert result.metrics["steps"] == 0
    assert result.metrics["train_loss"] == pytest.approx(trainer.evaluate(weights)["loss"])
    for name, w in weights.items():
        np.testing.assert_array_equal(result.params[name], w)


# -- CPU threads ---------------------------------------------------------------------------------------------------


def test_torch_threads_follow_the_live_workers_in_the_training_thread(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from fedctl.worker.threads import LocalWorkers, SharedThreads

    before = torch.get_num_threads()
    registry = tmp_path / "workers"
    me = LocalWorkers(registry)
    me.register()
    others = [LocalWorkers(registry) for _ in range(3)]
    x, y = _data(32)
    weights = init_params(get_model("mlp"), seed=0)
    trainer = create_trainer("torch", get_model("mlp"), x, y, threads=SharedThreads(me, cpus=4))

    def fit_in_a_new_thread() -> int:
        # The worker trains in an executor thread, and torch's thread count is per OpenMP thread: check it there.
        def fit() -> int:
            trainer.fit(weights, epochs=1, batch_size=8, lr=0.1, seed=0)
            return int(torch.get_num_threads())

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(fit).result(timeout=60)

    try:
        assert fit_in_a_new_thread() == 4  # alone: every CPU
        others[0].register()
        assert fit_in_a_new_thread() == 2
        for reg in others[1:]:
            reg.register()
        assert fit_in_a_new_thread() == 1
        others[0].close()
        assert fit_in_a_new_thread() == 1  # 4 // 3
        trainer.evaluate(weights)
        assert torch.get_num_threads() == 1  # evaluation asks too, here in the main thread
    finally:
        for reg in [me, *others]:
            reg.close()
        torch.set_num_threads(before)


def test_mxnet_threads_reach_the_engine_worker_thread() -> None:
    pytest.importorskip("mxnet")
    import ctypes

    import mxnet as mx

    from fedctl.worker.frameworks import mxnet as adapter

    try:  # the OpenMP runtime libmxnet links (the system's libgomp for the PyPI wheels)
        gomp = ctypes.CDLL("libgomp.so.1")
    except OSError:
        pytest.skip("libgomp.so.1 not loadable")
    seen: list[int] = []
    probe = adapter._SyncFn(lambda run_ctx, param: seen.append(int(gomp.omp_get_max_threads())))

    def engine_threads() -> int:
        # Runs on MXNet's CPU worker thread, where the operators run, after everything pushed before it.
        mx.base.check_call(mx.base._LIB.MXEnginePushSync(probe, None, None, ctypes.byref(adapter._CPU_CONTEXT),
                                                         None, 0, None, 0, None, 0, b"probe"))
        mx.nd.waitall()
        return seen[-1]

    x, y = _data(32)
    weights = init_params(get_model("mlp"), seed=0)
    for count in (2, 1):
        trainer = create_trainer("mxnet", get_model("mlp"), x, y, threads=count)
        trainer.fit(weights, epochs=1, batch_size=8, lr=0.1, seed=0)
        assert engine_threads() == count
