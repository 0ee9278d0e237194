"""Which task a run uses (``task=`` / ``--task``), what the broker needs of it, and a worker's data read by the task."""

from __future__ import annotations

import importlib
import logging
from typing import Any

import numpy as np

from fedctl.errors import ConfigError
from fedctl.models import ModelSpec
from fedctl.tasks import Task, load_task
from fedctl.worker.frameworks.base import Params

log = logging.getLogger(__name__)


def resolve_task(task_ref: str | None, model: str, model_given: bool) -> Task:
    """The task a command runs: ``--task`` if given (``--model`` then must not name another model), else the
    built-in ``--model``."""
    if task_ref is None:
        return load_task(model)
    if model_given and model != task_ref:
        raise ConfigError(f"--task {task_ref} and --model {model} name two models",
                          "pass one of them (--model NAME is short for --task NAME)")
    return load_task(task_ref)


def broker_model(task: Task, seed: int) -> tuple[ModelSpec, Params] | None:
    """The spec and initial weights of a user task (built once with its framework, seeded: PyTorch's ``model()``, or
    for a task with only ``gluon_model()`` MXNet's), or None for a built-in model, which the broker initialises with
    numpy alone."""
    if task.is_builtin:
        return None
    from fedctl.worker.frameworks import load_trainer_class  # the framework is imported for this one step

    adapter = "torch_task" if task.model is not None else "mxnet_task"
    load_trainer_class(adapter)  # a framework that is missing is one line naming how to install it
    spec, weights = importlib.import_module(f"fedctl.worker.frameworks.{adapter}").task_spec(task, seed)
    _check_wire_limits(task, spec)
    log.info("task %s (%s): %d tensors, %d values, initialised with seed %d", task.name, task.ref, len(spec.params),
             spec.num_params, seed)
    return spec, weights


def _check_wire_limits(task: Task, spec: ModelSpec) -> None:
    """A model must travel in one message (at most ``MAX_TENSORS`` tensors) and its signature must fit a join
    header (docs/protocol.md §3.4): checked when the task is loaded, on the broker and on every worker."""
    import msgpack

    from fedctl.wire import constants as C

    n = len(spec.params)
    if n > C.MAX_TENSORS:
        raise ConfigError(f"task {task.name}: the model has {n} tensors; a run carries at most {C.MAX_TENSORS}",
                          "federate fewer, larger tensors (e.g. keep buffers local with local_buffers = True)")
    size = len(msgpack.packb(spec.signature()))
    if size > C.MAX_HEADER_BYTES - 4096:  # room for join's other fields
        raise ConfigError(f"task {task.name}: the model's signature ({n} tensors, {size} bytes of names, shapes "
                          f"and dtypes) does not fit a join header ({C.MAX_HEADER_BYTES} bytes)",
                          "give the model's modules shorter names, or federate fewer tensors")


def worker_spec(task: Task) -> ModelSpec | None:
    """The spec a worker's task produces, sent with its join; None for a built-in model (checked by name)."""
    model = broker_model(task, 0)
    return None if model is None else model[0]


def uses_task_loader(task: Task | None, data: str, data_dir: Any) -> bool:
    """Whether ``--data`` is read by the task's own ``load_data``: the task defines one and ``--data`` is a file or
    folder of the data holder's — not a shard of a ``fedctl partition`` directory (those are fedctl's format, read
    by fedctl), and not named within ``--data-dir``."""
    from pathlib import Path

    from fedctl.data.partition import MANIFEST_NAME

    if task is None or task.load_data is None or data_dir is not None:
        return False
    path = Path(data)
    return path.exists() and not (path.parent / MANIFEST_NAME).is_file()


def load_task_data(task: Task, path: str, holdout: float | None = None, seed: int = 0) -> Any:
    """A worker's local data read by the task's own ``load_data(path)``: a shard with x, y and a seeded, stratified
    held-out split for federated evaluation (``holdout``: its fraction, default 0.1 as for any local dataset)."""
    from fedctl.data.shards import Shard, with_holdout

    assert task.load_data is not None
    try:
        got = task.load_data(path)
        x, y = got
        x, y = np.asarray(x, dtype=np.float32), np.asarray(y)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"task {task.name}: load_data({path!r}) must return (x, y) arrays: {exc}",
                          "return a pair of numpy arrays: features [n, ...] and integer labels [n]") from None
    except OSError as exc:
        raise ConfigError(f"task {task.name}: load_data({path!r}) could not read it: {exc}",
                          "pass --data a path the task's load_data can read") from None
    except Exception as exc:  # noqa: BLE001 - the user's loader may raise anything
        raise ConfigError(f"task {task.name}: load_data({path!r}) raised {type(exc).__name__}: {exc}",
                          "fix load_data in the task file, or the data") from None
    if y.ndim != 1 or len(x) != len(y) or not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"task {task.name}: load_data({path!r}) gave {len(x)} examples and labels of shape "
                          f"{y.shape} ({y.dtype})", "return one integer label per example")
    if len(y) == 0:
        raise ConfigError(f"task {task.name}: load_data({path!r}) found no examples", "pass a non-empty dataset")
    shard = Shard(f"{task.name}:{path}", task.name, x, y.astype(np.int64), len(y))
    return with_holdout(shard, 0.1 if holdout is None else holdout, seed)
