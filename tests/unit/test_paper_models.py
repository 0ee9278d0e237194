"""McMahan et al. 2017's models as built-ins (``2nn``, ``cnn``): the paper's parameter counts, the same tensors in the
spec, the PyTorch module and the MXNet block, the same logits from the same weights, and a short fit on MNIST."""

from __future__ import annotations

from typing import Protocol, cast

import numpy as np
import pytest

from fedctl.data import load_split_as_shard
from fedctl.models.zoo import get_model, init_params
from fedctl.worker.frameworks import Params, Trainer, create_trainer

PAPER_COUNTS = {"2nn": 199_210, "cnn": 1_663_370}
MODELS = list(PAPER_COUNTS)




class _Adapter(Trainer, Protocol):
    """The adapters' logits, used here to compare the frameworks."""

    def logits(self, weights: Params) -> np.ndarray: ...


def _batch(n: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, size=n).astype(np.int64)


def _torch_tensors(model: str) -> list[tuple[str, tuple[int, ...]]]:
    from fedctl.worker.frameworks.torch import build_module

    return [(name, tuple(p.shape)) for name, p in build_module(get_model(model)).named_parameters()]


def _mxnet_tensors(model: str) -> list[tuple[str, tuple[int, ...]]]:
    import mxnet as mx

    from fedctl.worker.frameworks.mxnet import build_block

    block, _ = build_block(get_model(model), mx.cpu())
    # The block's own attribute paths (conv1.weight, ...), not the adapter's name map: these must be canonical.
    return [(name, tuple(p.shape)) for name, p in block._collect_params_with_prefix().items()]


@pytest.mark.parametrize("model", MODELS)
def test_spec_has_the_papers_parameter_count(model: str) -> None:
    assert get_model(model).num_params == PAPER_COUNTS[model]


def test_cnn_spec_is_same_padded_with_a_3136_input_to_fc1() -> None:
    spec = get_model("cnn")
    shapes = {p.name: p.shape for p in spec.params}
    assert shapes["conv1.weight"] == (32, 1, 5, 5) and shapes["conv2.weight"] == (64, 32, 5, 5)
    assert shapes["fc1.weight"] == (512, 64 * 7 * 7) and shapes["fc2.weight"] == (10, 512)
    assert "pad 2" in spec.description and "1,663,370" in spec.description


@pytest.mark.parametrize("model", MODELS)
def test_torch_and_mxnet_have_the_specs_names_shapes_and_count(both: None, model: str) -> None:
    want = [(p.name, p.shape) for p in get_model(model).params]
    for got in (_torch_tensors(model), _mxnet_tensors(model)):
        assert got == want
        assert sum(int(np.prod(shape)) for _, shape in got) == PAPER_COUNTS[model]


@pytest.mark.parametrize("model", MODELS)
def test_same_weights_give_the_same_logits_and_gradients(both: None, model: str) -> None:
    """Catches a flatten order or padding that differs between the frameworks: the outputs would not match."""
    spec, (x, y) = get_model(model), _batch()
    weights = init_params(spec, seed=11)
    tt = cast(_Adapter, create_trainer("torch", spec, x, y, threads=1))
    mt = cast(_Adapter, create_trainer("mxnet", spec, x, y, threads=1))
    lt, lm = tt.logits(weights), mt.logits(weights)
    assert lt.shape == lm.shape == (16, 10)
    np.testing.assert_allclose(lm, lt, rtol=1e-4, atol=1e-4)
    gt, gm = tt.gradient(weights, batch_size=0, seed=0), mt.gradient(weights, batch_size=0, seed=0)
    for name in spec.names():
        scale = max(float(np.abs(gt.params[name]).max()), 1e-12)
        np.testing.assert_allclose(gm.params[name], gt.params[name], rtol=1e-3, atol=1e-4 * scale)


@pytest.mark.parametrize("model", MODELS)
def test_a_short_fit_on_mnist_lowers_the_loss(backend: str, model: str) -> None:
    """Ten B=10 steps on 100 MNIST images, evaluated on the same images."""
    shard = load_split_as_shard("mnist-sample", "test")
    x, y = shard.x[:100].copy(), shard.y[:100].copy()
    spec = get_model(model)
    trainer = create_trainer(backend, spec, x, y, threads=1)
    weights = init_params(spec, seed=0)
    before = trainer.evaluate(weights)["loss"]
    result = trainer.fit(weights, epochs=1, batch_size=10, lr=0.1, seed=0)
    assert result.metrics["steps"] == 10
    assert trainer.evaluate(result.params)["loss"] < 0.9 * before  # measured: 2.30 -> 1.76 (2nn), 2.29 -> 1.72 (cnn)
