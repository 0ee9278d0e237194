"""The PyTorch adapter for user tasks (docs/tasks.md): the task's ``nn.Module``, loss, optimiser and metrics.

The model's federated tensors come from the module itself, in ``state_dict`` order and names: every parameter
(trainable or frozen) and every floating-point buffer (BatchNorm running statistics) unless the task keeps buffers
local (``local_buffers = True``, FedBN). Integer buffers (``num_batches_tracked``) always stay local. Tensors
travel and are averaged as float32; float16 / bfloat16 / float64 tensors are cast back when loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedctl.errors import ConfigError, ModelMismatch
from fedctl.models.zoo import ModelSpec, ParamSpec, first_difference
from fedctl.tasks import Task
from fedctl.worker.frameworks import check_class_scores, sample_batch, validate_weights
from fedctl.worker.frameworks.base import Params, TrainResult
from fedctl.worker.frameworks.torch import Correction, TorchTrainer, _torch_device
from fedctl.worker.threads import ThreadBudget, as_budget

__all__ = ["TorchTaskTrainer", "build_task_module", "task_spec"]

log = logging.getLogger(__name__)
_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}
_CHUNK = 1000


def build_task_module(task: Task, seed: int = 0) -> nn.Module:
    """A new model from the task's ``model()`` (seeded, so the broker's initial weights are reproducible)."""
    torch.manual_seed(seed)
    try:
        module = task.model() if task.model is not None else None
    except Exception as exc:  # noqa: BLE001 - the user's code may raise anything
        raise ConfigError(f"task {task.name}: model() raised {type(exc).__name__}: {exc}",
                          "fix model() in the task file so that it builds") from None
    if not isinstance(module, nn.Module):
        raise ConfigError(f"task {task.name}: model() returned {type(module).__name__}, not a torch.nn.Module",
                          "return a new torch.nn.Module from model()")
    return module


def federated_tensors(module: nn.Module, local_buffers: bool) -> list[tuple[str, torch.Tensor, str]]:
    """``(name, tensor, kind)`` of every tensor the federation averages, in ``state_dict`` order."""
    params = {name for name, _ in module.named_parameters()}
    out = []
    for name, tensor in module.state_dict(keep_vars=True).items():
        if name in params:
            out.append((name, tensor, "param"))
        elif tensor.is_floating_point() and not local_buffers:
            out.append((name, tensor, "buffer"))
    return out


def _spec_of(task: Task, tensors: list[tuple[str, torch.Tensor, str]]) -> ModelSpec:
    specs = []
    for name, tensor, kind in tensors:
        if tensor.dtype not in _DTYPES:
            raise ConfigError(f"task {task.name}: tensor {name} is {tensor.dtype}",
                              "use float32, float16, bfloat16 or float64 parameters")
        specs.append(ParamSpec(name, tuple(tensor.shape), 1, _DTYPES[tensor.dtype], kind))
    if not specs:
        raise ConfigError(f"task {task.name}: the model has no parameters", "return a model with parameters")
    return ModelSpec(task.name, (), 0, tuple(specs), f"task {task.ref}")


def task_spec(task: Task, seed: int = 0) -> tuple[ModelSpec, Params]:
    """The model spec of a task and its initial weights (float32), built once with the task's own ``model()``."""
    module = build_task_module(task, seed)
    tensors = federated_tensors(module, task.local_buffers)
    spec = _spec_of(task, tensors)
    return spec, {name: t.detach().float().cpu().numpy().copy() for name, t, _ in tensors}


class TorchTaskTrainer(TorchTrainer):
    """A PyTorch trainer for a user task, bound to one device and one local dataset.

    Parameters
    ----------
    spec:
        The broker's model spec; the task's module must produce exactly it (else :class:`ModelMismatch`).
    x, y:
        Features as the task's model takes them (float32 ``[n, ...]``) and integer class labels ``[n]``.
    task:
        The loaded task.
    """

    def __init__(self, spec: ModelSpec, x: np.ndarray, y: np.ndarray, device: str = "cpu",
                 threads: int | ThreadBudget | None = None, *, task: Task) -> None:
        self._budget = as_budget(threads)
        self._apply_threads()
        self.spec, self.task = spec, task
        self.device = _torch_device(device)
        self._net = build_task_module(task).to(self.device)
        tensors = federated_tensors(self._net, task.local_buffers)
        diff = first_difference(_spec_of(task, tensors).signature(), spec.signature(), "worker", "broker")
        if diff is not None:
            raise ModelMismatch(f"this worker's task {task.name} differs from the broker's model: {diff}",
                                "run the same task file (same model, same local_buffers) on the broker and workers")
        self._names = [name for name, _, _ in tensors]
        self._state = [t for _, t, _ in tensors]
        trainable = [(n, p) for n, p in self._net.named_parameters() if p.requires_grad]
        self._params = [p for _, p in trainable]
        self._grad_names = [n for n, _ in trainable]
        self._loss: Callable[[Any, Any], Any] = task.loss or F.cross_entropy
        self._optimizer: torch.optim.Optimizer | None = None
        x, y = self._check(np.ascontiguousarray(x, np.float32), np.ascontiguousarray(y, np.int64))
        self.num_examples = len(y)
        self._x = torch.from_numpy(x).to(self.device)
        self._y = torch.from_numpy(y).to(self.device)

    def _check(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The local data must fit the model: one forward pass on two examples, labels within its classes."""
        if len(y) == 0 or len(x) != len(y):
            raise ConfigError(f"the local dataset has {len(x)} examples and {len(y)} labels",
                              "give the worker a non-empty dataset with one label per example")
        self._net.eval()
        try:
            with torch.no_grad():
                out = self._net(torch.from_numpy(x[:2]).to(self.device))
        except Exception as exc:  # noqa: BLE001 - the user's model may raise anything on bad input
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"task {self.task.name}: the model does not take the local data (examples of shape "
                              f"{tuple(x.shape[1:])}): {first}",
                              "make the data (or the task's load_data) match the model's input") from None
        if self.task.loss is None:
            check_class_scores(self.task.name, tuple(out.shape), y, "loss()")
        return x, y

    @property
    def own_optimizer(self) -> bool:
        """Whether the task trains with its own ``optimizer()`` rather than plain SGD (SCAFFOLD refuses it)."""
        return self.task.optimizer is not None

    # -- weights -------------------------------------------------------------------------------------------------
    def set_weights(self, weights: Params) -> None:
        """Load ``weights`` (validated against the spec) into the module, cast to each tensor's dtype."""
        checked = validate_weights(self.spec, weights)
        with torch.no_grad():
            for name, t in zip(self._names, self._state):
                t.copy_(torch.from_numpy(np.require(checked[name], requirements="W")))
        self._optimizer = None  # a new round starts the local optimiser afresh

    def get_weights(self) -> Params:
        return {name: t.detach().float().cpu().numpy().copy() for name, t in zip(self._names, self._state)}

    def local_state(self) -> Params:
        """The module's state that is not federated (BatchNorm statistics with ``local_buffers``, integer buffers),
        by ``state_dict`` name."""
        federated = set(self._names)
        return {n: t.detach().cpu().numpy().copy() for n, t in self._net.state_dict().items() if n not in federated}

    def set_local_state(self, state: Params) -> None:
        federated = set(self._names)
        own = self._net.state_dict()
        with torch.no_grad():
            for name, value in state.items():
                t = own.get(name)
                if t is not None and name not in federated and tuple(t.shape) == tuple(value.shape):
                    t.copy_(torch.from_numpy(np.array(value)).to(t.dtype))

    # -- training ------------------------------------------------------------------------------------------------
    def _takes_step(self, idx: np.ndarray) -> bool:
        # A last batch of one example is skipped (BatchNorm cannot normalise a single example in training mode;
        # PyTorch users set drop_last for the same reason).
        return not (len(idx) == 1 and self.num_examples > 1)

    def _sgd_step(self, idx: np.ndarray, lr: float,
                  correction: Correction | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of the task's optimiser (plain SGD without one) on batch ``idx``; the gradient is corrected
        before the optimiser sees it, so FedProx's and SCAFFOLD's terms reach any optimiser."""
        if not self._takes_step(idx):
            return torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        self._net.train()
        xb, yb = self._batch(idx)
        out = self._net(xb)
        loss = self._loss(out, yb)
        if self.task.optimizer is None:
            grads = torch.autograd.grad(loss, self._params, allow_unused=True)
            if correction is not None:
                correction.apply_(self._params, grads)
            with torch.no_grad():
                for p, g in zip(self._params, grads):
                    if g is not None:
                        p.add_(g, alpha=-lr)
        else:
            if self._optimizer is None:
                self._optimizer = self.task.optimizer(self._params, lr)
            self._optimizer.zero_grad()
            loss.backward()
            if correction is not None:
                correction.apply_(self._params, [p.grad for p in self._params])
            self._optimizer.step()
        correct = (out.detach().argmax(1) == yb).sum() if out.ndim == 2 else torch.zeros(())
        return loss.detach() * len(yb), correct

    def gradient(self, weights: Params, batch_size: int, seed: int) -> TrainResult:
        """Mean gradient of the task's loss over the shard or one sampled batch, for the trainable parameters
        (buffers and frozen parameters are left out: a gradient update may omit tensors)."""
        self._apply_threads()
        self.set_weights(weights)
        self._net.train()
        idx = sample_batch(self.num_examples, batch_size, seed)
        xs, ys = self._batch(idx)
        count = len(ys)
        grads = [torch.zeros_like(p) for p in self._params]
        loss_sum = 0.0
        for start in range(0, count, _CHUNK):
            xb, yb = xs[start:start + _CHUNK], ys[start:start + _CHUNK]
            loss = self._loss(self._net(xb), yb) * len(yb)
            for acc, g in zip(grads, torch.autograd.grad(loss / count, self._params, allow_unused=True)):
                if g is not None:
                    acc.add_(g)
            loss_sum += float(loss.detach())
        federated = set(self._names)
        params = {n: g.float().cpu().numpy() for n, g in zip(self._grad_names, grads) if n in federated}
        return TrainResult(params, count, {"train_loss": loss_sum / count})

    def evaluate(self, weights: Params, batch_size: int = 1000) -> dict[str, float]:
        """Loss, accuracy (class scores) and the task's own metrics of ``weights`` on the bound dataset."""
        self._apply_threads()
        self.set_weights(weights)
        self._net.eval()
        step = batch_size if batch_size > 0 else self.num_examples
        outputs, loss_sum = [], 0.0
        with torch.no_grad():
            for start in range(0, self.num_examples, step):
                xb, yb = self._x[start:start + step], self._y[start:start + step]
                out = self._net(xb)
                loss_sum += float(self._loss(out, yb)) * len(yb)
                outputs.append(out.float().cpu().numpy())
        scores = np.concatenate(outputs)
        y = self._y.cpu().numpy()
        n = self.num_examples
        result: dict[str, float] = {"loss": loss_sum / n, "num_examples": n}
        if scores.ndim == 2:
            result["accuracy"] = float((scores.argmax(1) == y).mean())
        result.update(self.task.call_metrics(y, scores))
        return result

    def logits(self, weights: Params) -> np.ndarray:
        self.set_weights(weights)
        self._net.eval()
        with torch.no_grad():
            return self._net(self._x).float().cpu().numpy()
