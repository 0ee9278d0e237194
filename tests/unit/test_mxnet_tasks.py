"""MXNet Gluon tasks (docs/tasks.md): the spec of a Gluon-only task, a task written for both frameworks whose PyTorch
and MXNet workers federate the same tensors and compute the same outputs, loss and gradients, training, the name and
shape checks, and BatchNorm statistics federated or kept local."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from fedctl.api.tasking import broker_model
from fedctl.errors import ConfigError, ModelMismatch
from fedctl.tasks import load_task

pytest.importorskip("torch")
try:
    import mxnet  # noqa: F401 - MXNet 1.9 fails on numpy>=1.24 with AttributeError, not ImportError
except (ImportError, OSError, AttributeError):
    pytest.skip("mxnet is not usable here", allow_module_level=True)

from fedctl.worker.frameworks import create_trainer  # noqa: E402
from fedctl.worker.frameworks.base import local_state, set_local_state  # noqa: E402
from fedctl.worker.frameworks.mxnet_task import MXNetTaskTrainer  # noqa: E402
from fedctl.worker.frameworks.mxnet_task import task_spec as gluon_spec  # noqa: E402
from fedctl.worker.frameworks.torch_task import TorchTaskTrainer  # noqa: E402
from fedctl.worker.frameworks.torch_task import task_spec as torch_spec  # noqa: E402

TORCH = """
    import torch
    from torch import nn

    def model():
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), {dropout}nn.Linear(4 * 4 * 4, 3))
"""
GLUON = """
    from mxnet.gluon import nn as gnn

    def gluon_model():
        net = gnn.HybridSequential()
        net.add(gnn.Conv2D(4, 3, padding=1), gnn.BatchNorm(), gnn.Activation("relu"), gnn.MaxPool2D(2),
                gnn.Flatten(), {gdropout}gnn.Dense(3))
        return net
"""


def task_file(tmp_path: Path, *parts: str, name: str = "task.py", dropout: bool = False) -> Path:
    path = tmp_path / name
    body = "".join(textwrap.dedent(p) for p in parts)
    path.write_text(body.replace("{dropout}", "nn.Dropout(0.3), " if dropout else "")
                    .replace("{gdropout}", "gnn.Dropout(0.3), " if dropout else ""))
    return path


def data(n: int = 160, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """8x8 one-channel images; the class says which halves are bright."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 1, 8, 8)).astype(np.float32)
    return x, (x[:, 0, :4].mean((1, 2)) > 0).astype(np.int64) + (x[:, 0, 4:].mean((1, 2)) > 0)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return task_file(tmp_path_factory.mktemp("mixed"), TORCH, GLUON)


def test_a_gluon_only_task_federates_the_blocks_parameters_by_name(tmp_path: Path) -> None:
    task = load_task(str(task_file(tmp_path, GLUON, "\ninput_shape = (1, 8, 8)\n")))
    assert task.model is None and task.gluon_model is not None and task.input_shape == (1, 8, 8)
    spec, weights = broker_model(task, seed=3) or (None, {})
    assert spec is not None
    assert [(p.name, p.shape, p.kind) for p in spec.params] == [
        ("0.weight", (4, 1, 3, 3), "param"), ("0.bias", (4,), "param"), ("1.gamma", (4,), "param"),
        ("1.beta", (4,), "param"), ("1.running_mean", (4,), "buffer"), ("1.running_var", (4,), "buffer"),
        ("5.weight", (3, 64), "param"), ("5.bias", (3,), "param")]
    assert all(w.dtype == np.float32 for w in weights.values())
    assert np.array_equal(gluon_spec(task, seed=3)[1]["0.weight"], weights["0.weight"]), "seeded"
    assert not np.array_equal(gluon_spec(task, seed=4)[1]["0.weight"], weights["0.weight"])
    x, y = data()
    trainer = create_trainer("torch", spec, x, y, task=task)  # a Gluon-only task trains with MXNet
    assert isinstance(trainer, MXNetTaskTrainer)
    assert trainer.evaluate(weights)["num_examples"] == len(y)


def test_deferred_shapes_need_input_shape_at_the_broker(tmp_path: Path) -> None:
    task = load_task(str(task_file(tmp_path, GLUON)))
    with pytest.raises(ConfigError, match=r"shapes are deferred until it sees data \(0.weight is \(4, 0, 3, 3\)\)"):
        gluon_spec(task)
    x, y = data()  # a worker settles them with its own data
    spec = gluon_spec(load_task(str(task_file(tmp_path, GLUON, "\ninput_shape = (1, 8, 8)\n", name="t2.py"))))[0]
    assert isinstance(create_trainer("mxnet", spec, x, y, task=task), MXNetTaskTrainer)
    with pytest.raises(ConfigError, match=r"does not take examples of shape \(1, 8\)"):
        create_trainer("mxnet", spec, x[:, :, 0], y, task=task)


def test_pytorch_and_mxnet_workers_of_one_task_agree(mixed: Path) -> None:
    task = load_task(str(mixed))
    spec, weights = torch_spec(task, seed=1)  # the broker's: from model()
    x, y = data()
    torch_worker = create_trainer("torch", spec, x, y, task=task)
    mxnet_worker = create_trainer("mxnet", spec, x, y, task=task)
    assert isinstance(torch_worker, TorchTaskTrainer) and isinstance(mxnet_worker, MXNetTaskTrainer)
    assert set(mxnet_worker.get_weights()) == {p.name for p in spec.params}
    mxnet_worker.set_weights(weights)
    got = mxnet_worker.get_weights()
    assert all(np.array_equal(got[k], weights[k]) for k in weights), "set then get is exact"
    np.testing.assert_allclose(mxnet_worker.logits(weights), torch_worker.logits(weights), atol=1e-5, rtol=1e-5)
    a, b = torch_worker.evaluate(weights), mxnet_worker.evaluate(weights)
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["accuracy"] == b["accuracy"]
    # Training mode (BatchNorm on batch statistics) gives the same gradients too.
    ga, gb = torch_worker.gradient(weights, 0, 0), mxnet_worker.gradient(weights, 0, 0)
    assert set(ga.params) == set(gb.params) == {p.name for p in spec.params if p.kind == "param"}
    for name in ga.params:
        np.testing.assert_allclose(gb.params[name], ga.params[name], atol=1e-5)
    # And the same steps: one epoch of plain SGD lands on the same weights (BatchNorm statistics included; the
    # running variance differs by PyTorch's unbiased n/(n-1), n = 20 x 8 x 8, in the fourth digit).
    wa, wb = torch_worker.fit(weights, 1, 20, 0.1, seed=0).params, mxnet_worker.fit(weights, 1, 20, 0.1, seed=0).params
    for name in wa:
        np.testing.assert_allclose(wb[name], wa[name], atol=1e-3 if name.endswith("running_var") else 1e-5)


def test_gluon_training_reduces_the_loss_with_the_tasks_optimizer_and_metrics(tmp_path: Path) -> None:
    tail = """
        from mxnet import gluon

        def gluon_optimizer(params, lr):
            return gluon.Trainer(params, "adam", {"learning_rate": lr})

        def metrics(y, scores):
            return {"always_half": 0.5, "bad": "x"}
    """
    task = load_task(str(task_file(tmp_path, TORCH, GLUON, tail, dropout=True)))
    spec, weights = torch_spec(task)
    x, y = data(400)
    trainer = create_trainer("mxnet", spec, x, y, task=task)
    start = trainer.evaluate(weights)
    result = trainer.fit(weights, 5, 20, 0.01, seed=0)
    end = trainer.evaluate(result.params)
    assert end["loss"] < 0.8 * start["loss"] and end["accuracy"] > 0.7
    assert end["always_half"] == 0.5 and "bad" not in end
    assert result.metrics["steps"] == 100
    assert not np.array_equal(result.params["1.running_mean"], weights["1.running_mean"]), "BN statistics moved"


def test_batchnorm_statistics_stay_on_the_worker_with_local_buffers(tmp_path: Path) -> None:
    task = load_task(str(task_file(tmp_path, TORCH, GLUON, "\nlocal_buffers = True\n")))
    spec, weights = torch_spec(task)
    assert [p.name for p in spec.params] == ["0.weight", "0.bias", "1.weight", "1.bias", "5.weight", "5.bias"]
    x, y = data()
    worker = create_trainer("mxnet", spec, x, y, task=task)
    assert isinstance(worker, MXNetTaskTrainer)
    assert set(worker.fit(weights, 1, 20, 0.1, seed=0).params) == {p.name for p in spec.params}
    running = worker._net[1].running_mean.data().asnumpy()
    assert np.abs(running).max() > 0, "the worker's own statistics moved"
    worker.set_weights(weights)  # the next round's model leaves them as they are
    assert np.array_equal(worker._net[1].running_mean.data().asnumpy(), running)
    # The statistics are the trainer's local state, which a held-out evaluator (or a restarted worker) takes over.
    local = local_state(worker)
    assert sorted(local) == ["1.running_mean", "1.running_var"] and np.array_equal(local["1.running_mean"], running)
    evaluator = create_trainer("mxnet", spec, x[:40], y[:40], task=task)
    fresh = evaluator.evaluate(weights)
    set_local_state(evaluator, {**local, "no.such": np.zeros(3), "1.running_var": np.ones(5)})  # ignored: unknown
    assert np.array_equal(evaluator._net[1].running_mean.data().asnumpy(), running)  # and wrong shapes
    assert evaluator.evaluate(weights) != fresh
    torch_worker = create_trainer("torch", spec, x, y, task=task)
    torch_worker.fit(weights, 1, 20, 0.1, seed=0)
    assert sorted(local_state(torch_worker)) == ["1.num_batches_tracked", "1.running_mean", "1.running_var"]
    only = load_task(str(task_file(tmp_path, GLUON, "\ninput_shape = (1, 8, 8)\nlocal_buffers = True\n", name="g.py")))
    assert [p.name for p in gluon_spec(only)[0].params] == ["0.weight", "0.bias", "1.gamma", "1.beta", "5.weight",
                                                             "5.bias"]


def test_gluon_names_pair_a_block_declared_in_another_order(tmp_path: Path) -> None:
    gluon = """
        from mxnet import gluon
        from mxnet.gluon import nn as gnn

        class Net(gluon.HybridBlock):  # the head is declared first: Gluon's order is not PyTorch's
            def __init__(self):
                super().__init__()
                self.head = gnn.Dense(3, in_units=64)
                self.conv = gnn.Conv2D(4, 3, padding=1, in_channels=1)
                self.bn = gnn.BatchNorm(in_channels=4)

            def hybrid_forward(self, F, x):
                return self.head(F.Pooling(F.relu(self.bn(self.conv(x))), kernel=(2, 2), stride=(2, 2),
                                           pool_type="max"))

        def gluon_model():
            return Net()

        def gluon_names():
            return ["conv.weight", "conv.bias", "bn.gamma", "bn.beta", "bn.running_mean", "bn.running_var",
                    "head.weight", "head.bias"]
    """
    task = load_task(str(task_file(tmp_path, TORCH, gluon)))
    spec, weights = torch_spec(task)
    x, y = data()
    np.testing.assert_allclose(create_trainer("mxnet", spec, x, y, task=task).logits(weights),
                               create_trainer("torch", spec, x, y, task=task).logits(weights), atol=1e-5)
    wrong = gluon.replace('"bn.running_var",', "")
    with pytest.raises(ConfigError, match=r"gluon_names\(\) leaves out 'bn.running_var'"):
        create_trainer("mxnet", spec, x, y, task=load_task(str(task_file(tmp_path, TORCH, wrong, name="w1.py"))))
    wrong = gluon.replace('"bn.gamma"', '"bn.weight"')
    with pytest.raises(ConfigError, match=r"gives 'bn.weight', which the Gluon block does not have"):
        create_trainer("mxnet", spec, x, y, task=load_task(str(task_file(tmp_path, TORCH, wrong, name="w2.py"))))


def test_a_gluon_block_that_differs_names_the_first_difference(tmp_path: Path, mixed: Path) -> None:
    spec, _ = torch_spec(load_task(str(mixed)))
    x, y = data()
    other = load_task(str(task_file(tmp_path, TORCH, GLUON.replace("gnn.Dense(3)", "gnn.Dense(4)"))))
    with pytest.raises(ModelMismatch) as info:
        create_trainer("mxnet", spec, x, y, task=other)
    assert "tensor 6 is 5.weight (3, 64) (param) on the broker, Gluon 5.weight (4, 64) (param) on the worker" \
        in str(info.value) and "\n" not in str(info.value)
    extra = GLUON.replace("gnn.Dense(3)", "gnn.Dense(8), gnn.Dense(3)")
    with pytest.raises(ModelMismatch, match=r"tensor 6 is 5.weight \(3, 64\) \(param\) on the broker, Gluon "
                                            r"5.weight \(8, 64\)"):
        create_trainer("mxnet", spec, x, y, task=load_task(str(task_file(tmp_path, TORCH, extra, name="e.py"))))
    # A Gluon-only run compares names too.
    only = task_file(tmp_path, GLUON, "\ninput_shape = (1, 8, 8)\n", name="g.py")
    gspec, _ = gluon_spec(load_task(str(only)))
    renamed = GLUON.replace("gnn.Activation(\"relu\"), ", "")
    with pytest.raises(ModelMismatch, match=r"tensor 6 is 5.weight \(3, 64\) \(param\) on the broker, Gluon "
                                            r"4.weight \(3, 64\) \(param\) on the worker"):
        create_trainer("mxnet", gspec, x, y,
                       task=load_task(str(task_file(tmp_path, renamed, "\ninput_shape = (1, 8, 8)\n", name="r.py"))))


def test_the_contract_of_gluon_tasks(tmp_path: Path, mixed: Path) -> None:
    with pytest.raises(ConfigError, match=r"defines no model\(\) function \(nor gluon_model\(\)\)"):
        load_task(str(task_file(tmp_path, "x = 1\n", name="none.py")))
    with pytest.raises(ConfigError, match="input_shape must be a tuple of positive ints"):
        load_task(str(task_file(tmp_path, GLUON, "\ninput_shape = (1, 0)\n", name="s.py")))
    with pytest.raises(ConfigError, match=r"gluon_optimizer\(\) must take 2 argument"):
        load_task(str(task_file(tmp_path, GLUON, "\ndef gluon_optimizer(p): pass\n", name="o.py")))
    torch_only = load_task(str(task_file(tmp_path, TORCH, name="t.py")))
    spec, _ = torch_spec(torch_only)
    x, y = data()
    with pytest.raises(ConfigError, match=r"defines no gluon_model\(\); --backend mxnet cannot train it"):
        create_trainer("mxnet", spec, x, y, task=torch_only)
    # A PyTorch loss without its Gluon twin would have the two frameworks minimise different objectives.
    lossy = task_file(tmp_path, TORCH, GLUON, "\ndef loss(out, y):\n    return torch.nn.functional.nll_loss(out, y)\n",
                      name="l.py")
    with pytest.raises(ConfigError, match=r"defines loss\(\) for PyTorch but no gluon_loss\(\) for MXNet"):
        create_trainer("mxnet", spec, x, y, task=load_task(str(lossy)))
    with pytest.raises(ConfigError, match=r"gluon_model\(\) returned str, not an MXNet Gluon Block"):
        gluon_spec(load_task(str(task_file(tmp_path, "def gluon_model():\n    return 'net'\n", name="b.py"))))
    with pytest.raises(ConfigError, match=r"labels range over \[3, 5\], the model has 3 classes"):
        create_trainer("mxnet", spec, x, y + 3, task=load_task(str(mixed)))
