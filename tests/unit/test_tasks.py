"""Tasks (docs/tasks.md): loading a user's file, its contract, the model spec a real PyTorch model gives (buffers,
frozen parameters, half precision), training it, and refusing a worker whose model differs — on both sides."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from coresim import CoreSim, Peer

from fedctl.errors import ConfigError, ModelMismatch
from fedctl.models import first_difference, get_model
from fedctl.tasks import load_task
from fedctl.wire import constants as C
from fedctl.wire.constants import ErrorCode
from fedctl.worker.client import check_spec
from fedctl.worker.frameworks import create_trainer
from fedctl.worker.frameworks.torch_task import task_spec

BN_TASK = """
    import torch
    from torch import nn

    def model():
        net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        {extra}
        return net
"""


def bn(extra: str = "", tail: str = "") -> str:
    """The BatchNorm task's source, with ``extra`` lines in model() and ``tail`` after it."""
    return textwrap.dedent(BN_TASK.format(extra=extra)) + textwrap.dedent(tail)


def task_file(tmp_path: Path, body: str, name: str = "task.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def data(n: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1).astype(np.int64)


def test_a_builtin_model_is_a_task() -> None:
    task = load_task("mlp")
    assert task.is_builtin and task.builtin == get_model("mlp") and task.name == "mlp"


@pytest.mark.parametrize("body, words", [
    ("def model(:\n    pass\n", "syntax error at line 1"),
    ("x = 1\n", "defines no model() function"),
    ("import no_such_module_here\ndef model(): pass\n", "ModuleNotFoundError while importing"),
    ("def model(): pass\nraise RuntimeError('boom')\n", "RuntimeError while importing (line 2): boom"),
    ("model = 3\n", "model is a int, not a function"),
    ("def model(): pass\ndef metrics(y): pass\n", "metrics() must take 2 argument(s)"),
    ("def model(): pass\nname = 'mlp'\n", "is a built-in model's"),
    ("def model(): pass\nlocal_buffers = 'yes'\n", "local_buffers must be True or False"),
])
def test_a_broken_task_file_is_one_line(tmp_path: Path, body: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_task(str(task_file(tmp_path, body)))
    assert words in str(info.value) and "\n" not in str(info.value) and info.value.fix


def test_a_task_that_is_no_file_nor_module(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_task(str(tmp_path / "missing.py"))
    with pytest.raises(ConfigError, match="neither a built-in task, a file nor an importable module"):
        load_task("no_such_task_module")


def test_a_model_that_does_not_build(tmp_path: Path) -> None:
    task = load_task(str(task_file(tmp_path, "def model():\n    return 1 / 0\n")))
    with pytest.raises(ConfigError, match="model\\(\\) raised ZeroDivisionError"):
        task_spec(task)
    task = load_task(str(task_file(tmp_path, "def model():\n    return 'a model'\n", "t2.py")))
    with pytest.raises(ConfigError, match="returned str, not a torch.nn.Module"):
        task_spec(task)


def test_the_spec_follows_the_state_dict_buffers_averaged_counters_local(tmp_path: Path) -> None:
    task = load_task(str(task_file(tmp_path, bn())))
    spec, weights = task_spec(task, seed=3)
    assert [(p.name, p.kind) for p in spec.params] == [
        ("0.weight", "param"), ("0.bias", "param"), ("1.weight", "param"), ("1.bias", "param"),
        ("1.running_mean", "buffer"), ("1.running_var", "buffer"), ("3.weight", "param"), ("3.bias", "param")]
    assert "1.num_batches_tracked" not in weights, "integer buffers stay local"
    torch.manual_seed(3)
    ref = task.model().state_dict()  # type: ignore[misc]
    assert all(np.array_equal(weights[k], ref[k].numpy()) for k in weights), "the task's own initialisation"
    assert task_spec(task, seed=3)[1]["0.weight"].tobytes() == weights["0.weight"].tobytes()


def test_local_buffers_keep_batchnorm_statistics_out_of_the_federation(tmp_path: Path) -> None:
    task = load_task(str(task_file(tmp_path, bn(tail="\nlocal_buffers = True\n"))))
    spec, _ = task_spec(task)
    assert [p.kind for p in spec.params] == ["param"] * 6


def test_frozen_and_half_precision_tensors(tmp_path: Path) -> None:
    body = """
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3).to(torch.bfloat16)
                self.a.weight.requires_grad_(False)

            def forward(self, x):
                return self.b(torch.relu(self.a(x)).to(torch.bfloat16)).float()

        def model():
            return Net()
    """
    task = load_task(str(task_file(tmp_path, body)))
    spec, weights = task_spec(task)
    assert [(p.name, p.dtype) for p in spec.params] == [("a.weight", "float32"), ("a.bias", "float32"),
                                                        ("b.weight", "bfloat16"), ("b.bias", "bfloat16")]
    assert all(w.dtype == np.float32 for w in weights.values()), "float32 on the wire and at the broker"
    x, y = data()
    trainer = create_trainer("torch", spec, x, y, task=task)
    before = weights["a.weight"].copy()
    result = trainer.fit(weights, 1, 10, 0.1, seed=0)
    assert np.array_equal(result.params["a.weight"], before), "a frozen parameter is not trained"
    assert not np.array_equal(result.params["b.weight"], weights["b.weight"])
    # Loaded into bfloat16 and read back: the values are what bfloat16 holds.
    trainer.set_weights(weights)
    got = trainer.get_weights()["b.weight"]
    assert np.array_equal(got, torch.from_numpy(weights["b.weight"]).bfloat16().float().numpy())


def test_training_a_task_with_its_optimizer_and_metrics(tmp_path: Path) -> None:
    body = bn(tail="""
        def optimizer(params, lr):
            return torch.optim.Adam(params, lr=lr)

        def metrics(y, scores):
            return {"always_half": 0.5, "bad": "x"}
    """)
    task = load_task(str(task_file(tmp_path, body)))
    spec, weights = task_spec(task)
    x, y = data(300)
    trainer = create_trainer("torch", spec, x, y, task=task)
    start = trainer.evaluate(weights)
    result = trainer.fit(weights, 5, 10, 0.01, seed=0)
    end = trainer.evaluate(result.params)
    assert end["loss"] < start["loss"] and end["accuracy"] > 0.8
    assert end["always_half"] == 0.5 and "bad" not in end
    assert not np.array_equal(result.params["1.running_mean"], weights["1.running_mean"]), "BN statistics moved"
    grads = trainer.gradient(weights, 0, 0).params
    assert set(grads) == {p.name for p in spec.params if p.kind == "param"}


def test_data_that_does_not_fit_the_model(tmp_path: Path) -> None:
    task = load_task(str(task_file(tmp_path, bn())))
    spec, _ = task_spec(task)
    x, y = data()
    with pytest.raises(ConfigError, match="does not take the local data \\(examples of shape \\(5,\\)\\)"):
        create_trainer("torch", spec, x[:, :5], y, task=task)
    with pytest.raises(ConfigError, match="the model has 3 classes"):
        create_trainer("torch", spec, x, y + 3, task=task)
    with pytest.raises(ConfigError, match="0 examples"):
        create_trainer("torch", spec, x[:0], y[:0], task=task)
    with pytest.raises(ConfigError, match=r"defines no gluon_model\(\); --backend mxnet cannot train it"):
        create_trainer("mxnet", spec, x, y, task=task)


def test_a_worker_whose_model_differs_is_refused_naming_the_first_difference(tmp_path: Path) -> None:
    ours, _ = task_spec(load_task(str(task_file(tmp_path, bn()))))
    other = bn().replace("nn.Linear(8, 3)", "nn.Linear(8, 4)")
    theirs, _ = task_spec(load_task(str(task_file(tmp_path, other, "other.py"))))
    x, y = data()
    task = load_task(str(tmp_path / "other.py"))
    with pytest.raises(ModelMismatch, match=r"tensor 6 is 3.weight \(4, 8\) float32 on the worker, 3.weight "
                                            r"\(3, 8\) float32 on the broker"):
        create_trainer("torch", ours, x, y, task=task)
    # The worker, from the broker's welcome:
    with pytest.raises(ModelMismatch, match="tensor 6 is 3.weight"):
        check_spec(ours.to_wire(), theirs)
    assert check_spec(ours.to_wire(), ours) is ours
    # The broker, from the worker's join:
    sim = CoreSim()
    peer = Peer(sim, "w")
    [err] = peer.send(C.JOIN, worker="w", backend="torch", num_examples=5, params=get_model("lenet5").signature())
    assert err.type == C.ERROR and err["code"] == ErrorCode.MODEL_MISMATCH
    assert "tensor 0 is fc1.weight (128, 784) float32 on the broker, conv1.weight (6, 1, 5, 5) float32 on the " \
           "worker" in err["reason"]
    [ok] = peer.send(C.JOIN, worker="w", backend="torch", num_examples=5, params=get_model("mlp").signature())
    assert ok.type == C.WELCOME


def test_first_difference_names_an_extra_tensor() -> None:
    a = [["x", [2], "float32"]]
    assert first_difference(a, a) is None
    assert "the worker has 2 tensors, the broker 1: the first extra one (on the worker) is y (3,) float16" == \
        first_difference(a + [["y", [3], "float16"]], a, "worker", "broker")


def test_a_last_batch_of_one_example_is_skipped_not_fatal_with_batchnorm(tmp_path: Path) -> None:
    task = load_task(str(task_file(tmp_path, bn())))
    spec, weights = task_spec(task)
    x, y = data(121)  # batches of 10: the last holds one example, which BatchNorm cannot train on
    result = create_trainer("torch", spec, x, y, task=task).fit(weights, 1, 10, 0.1, seed=0)
    # 13 batches, 12 steps: "steps" counts the SGD steps taken (SCAFFOLD's K), and the batch of one is no step
    assert result.metrics["steps"] == 12 and np.isfinite(result.metrics["train_loss"])
