"""Framework adapters: a registry of backends imported lazily, plus helpers every adapter shares.

Importing this package never imports PyTorch or MXNet; :func:`create_trainer` imports the one adapter asked for.
The shared helpers (weight validation, batch plans) live here so both adapters train on exactly the same
mini-batches for the same seed, which is what makes a PyTorch worker and an MXNet worker interchangeable.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedctl.errors import BackendUnavailable, ConfigError, ModelMismatch
from fedctl.models.zoo import ModelSpec
from fedctl.worker.frameworks.base import Params, Trainer, TrainResult
from fedctl.worker.threads import ThreadBudget

__all__ = [
    "BACKENDS",
    "Params",
    "TrainResult",
    "Trainer",
    "available_backends",
    "create_trainer",
    "default_backend",
    "epoch_batches",
    "sample_batch",
    "validate_weights",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    """One registered framework: where its adapter class lives, which module it needs and how to install it."""

    target: str
    module: str
    fix: str


BACKENDS: dict[str, Backend] = {
    "torch": Backend("fedctl.worker.frameworks.torch:TorchTrainer", "torch", "pip install 'fedctl[torch]'"),
    "mxnet": Backend(
        "fedctl.worker.frameworks.mxnet:MXNetTrainer", "mxnet", "pip install 'fedctl[mxnet]' (needs numpy<1.24)"
    ),
}
_TASK_ADAPTERS = {
    "torch_task": Backend("fedctl.worker.frameworks.torch_task:TorchTaskTrainer", "torch",
                          "pip install 'fedctl[torch]'"),
    "mxnet_task": Backend("fedctl.worker.frameworks.mxnet_task:MXNetTaskTrainer", "mxnet",
                          "pip install 'fedctl[mxnet]' (needs numpy<1.24)"),
}
"""Adapters for user tasks (docs/tasks.md), looked up like backends but not chosen with --backend."""
_PREFERENCE = ("torch", "mxnet")


def _lookup(backend: str) -> Backend:
    try:
        return BACKENDS[backend] if backend in BACKENDS else _TASK_ADAPTERS[backend]
    except KeyError:
        known = ", ".join(sorted(BACKENDS))
        raise ConfigError(f"unknown backend {backend!r}", f"choose one of: {known}") from None


def available_backends() -> list[str]:
    """Names of the registered backends whose framework is installed (found, not imported), sorted."""
    return sorted(name for name, entry in BACKENDS.items() if importlib.util.find_spec(entry.module) is not None)


def default_backend() -> str:
    """The backend used when none is named: ``torch`` if installed, else ``mxnet``.

    Raises
    ------
    BackendUnavailable
        If neither framework is installed.
    """
    found = available_backends()
    for name in _PREFERENCE:
        if name in found:
            return name
    raise BackendUnavailable(
        "no deep-learning framework is installed (neither torch nor mxnet)",
        f"{BACKENDS['torch'].fix} or {BACKENDS['mxnet'].fix}",
    )


def load_trainer_class(backend: str) -> Any:
    """Import the adapter of ``backend`` and return its trainer class.

    Raises
    ------
    ConfigError
        If ``backend`` is not registered.
    BackendUnavailable
        If the framework is missing or fails to import (a broken install, or numpy too new for MXNet).
    """
    entry = _lookup(backend)
    module_name, _, attr = entry.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    # MXNet 1.9 on numpy>=1.24 dies with AttributeError (np.bool); a missing shared library is an OSError.
    except (ImportError, OSError, AttributeError) as exc:
        raise BackendUnavailable(f"backend {backend!r} cannot be imported: {exc}", entry.fix) from exc
    return getattr(module, attr)


def create_trainer(
    backend: str,
    spec: ModelSpec,
    x: np.ndarray,
    y: np.ndarray,
    device: str = "cpu",
    threads: int | ThreadBudget | None = None,
    task: Any = None,
) -> Trainer:
    """Build the trainer of ``backend`` for one model and one local dataset.

    Parameters
    ----------
    backend:
        A registered backend name (``"torch"`` or ``"mxnet"``).
    spec:
        The model spec; the trainer's parameters carry its canonical names and shapes.
    x:
        Normalised images, float32 of shape ``[n, *spec.input_shape]``.
    y:
        Integer labels in ``[0, spec.num_classes)``, shape ``[n]``.
    device:
        ``"cpu"`` or ``"gpu:N"`` (``"cuda:N"`` is accepted too).
    threads:
        CPU threads for the framework: a count, a :class:`~fedctl.worker.threads.ThreadBudget` the trainer asks
        again before every training call (``fedctl join --threads auto``), or None to keep the framework's default.

    Raises
    ------
    ConfigError
        Unknown backend, bad device string or malformed data.
    BackendUnavailable
        The framework is not installed or the requested GPU does not exist.
    """
    if task is not None and not task.is_builtin:  # a user task (fedctl.tasks.Task): its own model and loss
        cls = load_trainer_class(task_adapter(task, backend))
        trainer: Trainer = cls(spec, x, y, device=device, threads=threads, task=task)
    else:
        cls = load_trainer_class(backend)
        trainer = cls(spec, x, y, device=device, threads=threads)
    logger.debug("created %s trainer for %s on %s (%d examples)", backend, spec.name, device, len(y))
    return trainer


def task_adapter(task: Any, backend: str) -> str:
    """The adapter that trains a user task on ``backend``: ``model()`` with PyTorch, ``gluon_model()`` with MXNet.

    A task with only ``gluon_model()`` trains with MXNet whatever the backend (``torch`` is what ``--backend auto``
    and the broker's evaluator ask for when PyTorch is installed); a task without ``gluon_model()`` is refused on
    MXNet.
    """
    if backend == "mxnet":
        if task.gluon_model is None:
            raise ConfigError(f"task {task.name} defines no gluon_model(); --backend mxnet cannot train it",
                              "pass --backend torch, or add gluon_model() to the task (docs/tasks.md)")
        return "mxnet_task"
    if task.model is None:
        logger.info("task %s defines only gluon_model(): MXNet trains it (not %s)", task.name, backend)
        return "mxnet_task"
    return "torch_task"


def check_data(spec: ModelSpec, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(x, y)`` as contiguous float32 / int64 arrays after checking their shapes against ``spec``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.int64)
    if x.ndim != 1 + len(spec.input_shape) or tuple(x.shape[1:]) != tuple(spec.input_shape):
        raise ConfigError(
            f"images have shape {x.shape}, model {spec.name} expects [n, {spec.input_shape}]",
            "reshape the shard to [n, 1, 28, 28] float32",
        )
    if y.shape != (x.shape[0],):
        raise ConfigError(f"labels have shape {y.shape} for {x.shape[0]} images", "give one int label per image")
    if x.shape[0] == 0:
        raise ConfigError("the local dataset is empty", "give the worker a non-empty shard")
    if y.min() < 0 or y.max() >= spec.num_classes:
        raise ConfigError(f"labels outside [0, {spec.num_classes})", "check the shard's labels")
    return x, y


def check_class_scores(task: str, shape: tuple[int, ...], y: np.ndarray, loss_fn: str) -> None:
    """A task trained with the default cross-entropy must output class scores ``[batch, classes]`` (``shape``: its
    output on two examples) and its labels ``y`` must be classes of it; ConfigError naming the fix otherwise."""
    if len(shape) != 2:
        raise ConfigError(f"task {task}: the model outputs shape {shape}, not [batch, classes]",
                          f"return class scores, or define {loss_fn} in the task")
    classes = shape[1]
    if y.min() < 0 or y.max() >= classes:
        raise ConfigError(f"labels range over [{y.min()}, {y.max()}], the model has {classes} classes",
                          f"use labels 0..{classes - 1}, or change the model's output size")


def validate_weights(spec: ModelSpec, weights: Params) -> Params:
    """Check ``weights`` against ``spec`` and return them as float32 arrays in spec order.

    Raises
    ------
    ModelMismatch
        A name is missing or unexpected, a shape differs from the spec, or a tensor is not floating point.
    """
    expected = {p.name: p for p in spec.params}
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise ModelMismatch(
            f"unexpected tensor {extra[0]!r} for model {spec.name}",
            f"send exactly the tensors of {spec.name}: {', '.join(expected)}",
        )
    out: Params = {}
    for name, p in expected.items():
        if name not in weights:
            raise ModelMismatch(
                f"tensor {name!r} of model {spec.name} is missing (expected shape {p.shape})",
                "send every tensor of the model spec",
            )
        arr = np.asarray(weights[name])
        if tuple(arr.shape) != p.shape:
            raise ModelMismatch(
                f"tensor {name!r}: expected shape {p.shape}, got {tuple(arr.shape)}",
                f"check that both sides use model {spec.name}",
            )
        if arr.dtype.kind != "f":
            raise ModelMismatch(
                f"tensor {name!r}: expected a float tensor, got dtype {arr.dtype}", "send float32 tensors"
            )
        out[name] = np.ascontiguousarray(arr, dtype=np.float32)
    return out


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 0:
        raise ConfigError(f"batch size must be >= 0, got {batch_size}", "use 0 for the whole shard or a positive B")


def epoch_batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Index arrays of one epoch's mini-batches; a fresh permutation from ``rng`` unless it is one full batch.

    ``batch_size`` 0 (or at least ``n``) gives a single batch of all examples in order and draws nothing.
    """
    _check_batch_size(batch_size)
    if batch_size == 0 or batch_size >= n:
        return [np.arange(n)]
    perm = rng.permutation(n)
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


def sample_batch(n: int, batch_size: int, seed: int) -> np.ndarray | None:
    """Indices of one random mini-batch drawn without replacement with ``seed``, or None for the whole shard."""
    _check_batch_size(batch_size)
    if batch_size == 0 or batch_size >= n:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=batch_size, replace=False))


def check_fit_args(epochs: int, lr: float) -> None:
    """Raise :class:`ConfigError` unless ``epochs`` >= 0 and ``lr`` is finite and >= 0."""
    if epochs < 0:
        raise ConfigError(f"epochs must be >= 0, got {epochs}", "use a non-negative number of local epochs")
    if not np.isfinite(lr) or lr < 0:
        raise ConfigError(f"learning rate must be finite and >= 0, got {lr}", "use a positive learning rate")


def check_correction(prox_mu: float, grad_offset: Params | None) -> None:
    """Raise :class:`ConfigError` unless ``prox_mu`` is finite and >= 0 and ``grad_offset`` holds only finite
    arrays (the gradient correction of ``Trainer.fit``)."""
    if not np.isfinite(prox_mu) or prox_mu < 0:
        raise ConfigError(f"the proximal coefficient must be finite and >= 0, got {prox_mu}",
                          "pass --opt mu=<number >= 0> (0 is FedAvg)")
    for name, offset in (grad_offset or {}).items():
        if not np.isfinite(np.asarray(offset)).all():
            raise ConfigError(f"the gradient offset of {name} holds NaN or infinite values",
                              "check the control variates (pass a fresh --state-dir to the worker)")

