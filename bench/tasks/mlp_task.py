"""The built-in ``mlp`` (784-128-64-10, tensors fc1/fc2/fc3) as a user task, for bench/task_overhead.py.

The module is the one the PyTorch adapter builds for ``--model mlp``, so the task and the built-in path federate
the same tensors (names, shapes, dtypes) and differ only in how the broker got the model.
"""

from __future__ import annotations

from torch import nn

from fedctl.models import get_model
from fedctl.worker.frameworks.torch import build_module

name = "mlp-task"


def model() -> nn.Module:
    return build_module(get_model("mlp"))
