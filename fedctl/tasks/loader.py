"""Loading a task (``--task path/to/task.py`` or ``--task package.module``) and checking its contract.

A task module defines, in plain framework code (docs/tasks.md):

``model()``               a new ``torch.nn.Module`` (its ``state_dict`` names and shapes are the model's)
``gluon_model()``         a new MXNet Gluon ``Block``, initialised or not; a task has model(), gluon_model() or both
``load_data(path)``       optional: ``(x, y)`` numpy arrays of a local dataset (default: fedctl's loaders)
``loss(outputs, y)``      optional: a scalar tensor (default: cross-entropy on class scores)
``metrics(y, scores)``    optional: ``{name: float}`` computed from labels and the model's outputs (numpy) on held-out
                          or test data, beside accuracy and loss
``optimizer(params, lr)`` optional: a ``torch.optim.Optimizer`` for local training (default: plain SGD at ``lr``)
``local_buffers``         optional bool: keep float buffers (BatchNorm running statistics) local — FedBN
``name``                  optional str: the model's name in the run (default: the file or module name)
``gluon_names()``         optional: the Gluon parameter names in the order of the PyTorch model's float tensors
``gluon_loss(out, y)``    optional: MXNet's loss, on NDArrays (default: softmax cross-entropy)
``gluon_optimizer(params, lr)``  optional: a ``gluon.Trainer`` over ``params`` (default: plain SGD at ``lr``)
``input_shape``           optional tuple: one example's shape, which settles a Gluon block's deferred shapes

Importing a task runs the user's code; this module imports no framework itself.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import re
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from fedctl.errors import ConfigError
from fedctl.models import MODELS, ModelSpec, get_model

log = logging.getLogger(__name__)

BUILTIN_TASKS = ("mlp", "lenet5", "2nn", "cnn")
"""Models fedctl ships as tasks (``--task mlp`` is ``--model mlp``)."""
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


@dataclass(frozen=True)
class Task:
    """A loaded task: the user's functions (None where the default applies) or a built-in model."""

    name: str
    ref: str
    model: Callable[[], Any] | None = None
    load_data: Callable[[str], Any] | None = None
    loss: Callable[[Any, Any], Any] | None = None
    metrics: Callable[[Any, Any], dict[str, float]] | None = None
    optimizer: Callable[[Any, float], Any] | None = None
    local_buffers: bool = False
    gluon_model: Callable[[], Any] | None = None
    gluon_names: Callable[[], Any] | None = None
    gluon_loss: Callable[[Any, Any], Any] | None = None
    gluon_optimizer: Callable[[Any, float], Any] | None = None
    input_shape: tuple[int, ...] | None = None
    builtin: ModelSpec | None = None
    """The zoo spec of a built-in task (the framework adapters build its model by name)."""

    @property
    def is_builtin(self) -> bool:
        return self.builtin is not None

    def call_metrics(self, y: Any, scores: Any) -> dict[str, float]:
        """The task's ``metrics(y, scores)`` as ``{name: float}``; a metric that raises, or is not a number, is
        logged and left out (training goes on)."""
        if self.metrics is None:
            return {}
        try:
            got = self.metrics(y, scores)
        except Exception as exc:  # noqa: BLE001 - the user's code may raise anything
            log.warning("task %s: metrics() raised %s: %s; its metrics are left out", self.name,
                        type(exc).__name__, exc)
            return {}
        if not isinstance(got, dict):
            log.warning("task %s: metrics() returned %s, not a dict; left out", self.name, type(got).__name__)
            return {}
        out = {}
        for key, value in got.items():
            try:
                out[str(key)] = float(value)
            except (TypeError, ValueError):
                log.warning("task %s: metric %r is not a number; left out", self.name, key)
        return out


def load_task(ref: str) -> Task:
    """The task ``ref`` names: a built-in model, a ``.py`` file, or an importable module.

    Raises
    ------
    ConfigError
        One line naming the cause and the fix: no such file or module, a syntax error (file and line), an
        exception while importing (its type and message), or a missing / malformed required definition.
    """
    if ref in MODELS:
        return Task(ref, ref, builtin=get_model(ref))
    if ref.endswith(".py") or "/" in ref or Path(ref).is_file():
        module = _import_file(Path(ref))
    else:
        module = _import_module(ref)
    return _contract(module, ref)


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise ConfigError(f"--task {path}: no such file", "pass the path of your task's .py file, or a module name")
    name = f"fedctl_task_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"--task {path} cannot be imported as Python", "pass a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling in the task look their module up
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(name, None)
        raise ConfigError(f"--task {path}: syntax error at line {exc.lineno}: {exc.msg}",
                          "fix the task file (python -m py_compile FILE shows it)") from None
    except Exception as exc:  # noqa: BLE001 - the user's code may raise anything while it is imported
        sys.modules.pop(name, None)
        raise ConfigError(f"--task {path} raised {type(exc).__name__} while importing{_where(exc, path)}: {exc}",
                          "fix the task file; it must import without errors") from None
    return module


def _import_module(ref: str) -> ModuleType:
    try:
        return importlib.import_module(ref)
    except ModuleNotFoundError as exc:
        if exc.name and ref.startswith(exc.name):
            known = ", ".join(BUILTIN_TASKS)
            raise ConfigError(f"--task {ref!r} is neither a built-in task, a file nor an importable module",
                              f"pass a .py file, a module on PYTHONPATH, or one of: {known}") from None
        raise ConfigError(f"--task {ref} imports {exc.name!r}, which is not installed",
                          f"install it (pip install {exc.name})") from None
    except SyntaxError as exc:
        raise ConfigError(f"--task {ref}: syntax error in {exc.filename} at line {exc.lineno}: {exc.msg}",
                          "fix the task module") from None
    except Exception as exc:  # noqa: BLE001 - the user's code may raise anything while it is imported
        raise ConfigError(f"--task {ref} raised {type(exc).__name__} while importing: {exc}",
                          "fix the task module; it must import without errors") from None


def _where(exc: BaseException, path: Path) -> str:
    """`` (line N)`` of the deepest frame of the exception in the task file, if any."""
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == path.resolve()
             or Path(f.filename) == path]
    return f" (line {lines[-1]})" if lines else ""


def _optional(module: ModuleType, name: str, ref: str, arity: int) -> Callable[..., Any] | None:
    fn = getattr(module, name, None)
    if fn is None:
        return None
    if not callable(fn):
        raise ConfigError(f"--task {ref}: {name} is a {type(fn).__name__}, not a function",
                          f"define {name} as a function (docs/tasks.md)")
    try:
        inspect.signature(fn).bind(*range(arity))
    except TypeError:
        raise ConfigError(f"--task {ref}: {name}() must take {arity} argument(s)",
                          "see the task contract in docs/tasks.md") from None
    except ValueError:  # a builtin without a signature: accept it
        pass
    return fn


def _contract(module: ModuleType, ref: str) -> Task:
    model = _optional(module, "model", ref, 0)
    gluon_model = _optional(module, "gluon_model", ref, 0)
    if model is None and gluon_model is None:
        raise ConfigError(f"--task {ref} defines no model() function (nor gluon_model())",
                          "add `def model():` returning a new torch.nn.Module, or `def gluon_model():` returning "
                          "an MXNet Gluon Block (docs/tasks.md)")
    default_name = Path(ref).stem if ref.endswith(".py") else ref.rsplit(".", 1)[-1]
    name = getattr(module, "name", default_name)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"--task {ref}: name {name!r} is not 1-64 letters, digits, '_', '-' or '.'",
                          "set `name = \"my-model\"` in the task, or rename the file")
    if name in MODELS:
        raise ConfigError(f"--task {ref}: name {name!r} is a built-in model's", "choose another name for your task")
    local = getattr(module, "local_buffers", False)
    if not isinstance(local, bool):
        raise ConfigError(f"--task {ref}: local_buffers must be True or False, got {local!r}",
                          "set local_buffers = True to keep BatchNorm statistics local (FedBN)")
    return Task(name, ref, model=model, load_data=_optional(module, "load_data", ref, 1),
                loss=_optional(module, "loss", ref, 2), metrics=_optional(module, "metrics", ref, 2),
                optimizer=_optional(module, "optimizer", ref, 2), local_buffers=local, gluon_model=gluon_model,
                gluon_names=_optional(module, "gluon_names", ref, 0),
                gluon_loss=_optional(module, "gluon_loss", ref, 2),
                gluon_optimizer=_optional(module, "gluon_optimizer", ref, 2),
                input_shape=_input_shape(module, ref))


def _input_shape(module: ModuleType, ref: str) -> tuple[int, ...] | None:
    shape = getattr(module, "input_shape", None)
    if shape is None:
        return None
    if (not isinstance(shape, (tuple, list)) or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise ConfigError(f"--task {ref}: input_shape must be a tuple of positive ints, got {shape!r}",
                          "give one example's shape without the batch axis, e.g. input_shape = (1, 28, 28)")
    return tuple(shape)
