"""The task files that ship with the benchmarks (bench/tasks/): they load, and their models are what
bench/task_overhead.py says they are."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from fedctl.models import get_model  # noqa: E402
from fedctl.tasks import load_task  # noqa: E402
from fedctl.wire.constants import MAX_TENSORS  # noqa: E402
from fedctl.worker.frameworks.torch_task import task_spec  # noqa: E402

TASKS = Path(__file__).resolve().parents[2] / "bench" / "tasks"


def test_resnet18_like_is_resnet18_sized_and_fits_one_message() -> None:
    task = load_task(str(TASKS / "resnet18_like.py"))
    spec, weights = task_spec(task, 0)
    params = [p for p in spec.params if p.kind == "param"]
    buffers = [p for p in spec.params if p.kind == "buffer"]
    assert task.name == "resnet18-like"
    assert sum(p.numel for p in params) == 11_173_962  # ResNet-18, CIFAR stem, 10 classes
    assert 11_000_000 < spec.num_params < 11_500_000
    assert (len(params), len(buffers)) == (62, 40)  # BatchNorm running mean / var travel; num_batches_tracked not
    assert all(p.name.endswith(("running_mean", "running_var")) for p in buffers)
    assert len(spec.params) < MAX_TENSORS
    assert sum(w.nbytes for w in weights.values()) == 4 * spec.num_params
    assert task.model()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_mlp_task_federates_the_builtin_mlps_tensors() -> None:
    task = load_task(str(TASKS / "mlp_task.py"))
    spec, _ = task_spec(task, 0)
    assert task.name == "mlp-task"
    assert spec.signature() == get_model("mlp").signature()
