"""The MXNet Gluon adapter for user tasks (docs/tasks.md): the task's ``gluon_model()``, loss, optimiser and metrics.

The Gluon block's tensors are its parameters by structural name (``0.weight``, ``1.gamma``, ``1.running_mean``: what
``save_parameters`` writes), in the block's order or in the order ``gluon_names()`` gives. Parameters Gluon does not
differentiate (BatchNorm's running statistics) are the buffers: federated unless the task keeps them local
(``local_buffers = True``, FedBN). A task with only ``gluon_model()`` federates those names. A task that also has
``model()`` federates the PyTorch model's tensors: the Gluon tensors are paired with them one by one, in order, and
must have the same shapes (conv and dense layouts are (out, in, kh, kw) and (out, in) in both frameworks).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fedctl.errors import ConfigError, ModelMismatch
from fedctl.models.zoo import ModelSpec, ParamSpec
from fedctl.tasks import Task
from fedctl.worker.frameworks import check_class_scores, sample_batch
from fedctl.worker.frameworks.base import Params, TrainResult
from fedctl.worker.frameworks.mxnet import Correction, MXNetTrainer, _mx_context
from fedctl.worker.threads import ThreadBudget, as_budget

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import mxnet as mx
    from mxnet import autograd, gluon, nd

__all__ = ["MXNetTaskTrainer", "build_gluon_block", "task_spec"]

log = logging.getLogger(__name__)
_CHUNK = 1000
_FIX_SHAPES = ("set input_shape = (...) in the task (one example's shape), or give the Gluon layers their input "
               "sizes (in_channels, in_units)")


def build_gluon_block(task: Task, ctx: Any, seed: int = 0, example: np.ndarray | None = None) -> gluon.Block:
    """A new block from the task's ``gluon_model()``, initialised on ``ctx`` (Gluon's default initialiser where the
    task did not initialise it; seeded, so the broker's initial weights are reproducible), hybridized, and with
    every shape known: deferred shapes are settled by one forward pass on ``example`` (one or two examples) or on
    zeros of the task's ``input_shape``."""
    mx.random.seed(seed)
    try:
        block = task.gluon_model() if task.gluon_model is not None else None
    except Exception as exc:  # noqa: BLE001 - the user's code may raise anything
        raise ConfigError(f"task {task.name}: gluon_model() raised {type(exc).__name__}: {_first_line(exc)}",
                          "fix gluon_model() in the task file so that it builds") from None
    if not isinstance(block, gluon.Block):
        raise ConfigError(f"task {task.name}: gluon_model() returned {type(block).__name__}, not an MXNet Gluon "
                          "Block", "return a new mxnet.gluon.Block (or HybridBlock) from gluon_model()")
    for param in block.collect_params().values():
        try:
            if param.list_ctx() != [ctx]:
                param.reset_ctx(ctx)
        except RuntimeError:  # not initialised yet: Gluon's default initialiser (or the parameter's own init)
            param.initialize(ctx=ctx)
    if isinstance(block, gluon.HybridBlock):
        block.hybridize(static_alloc=True)
    if example is None and task.input_shape is not None:
        example = np.zeros((1, *task.input_shape), np.float32)
    if example is not None:
        try:
            block(nd.array(example, ctx=ctx, dtype=np.float32))  # predict mode: BatchNorm statistics stay as they are
        except Exception as exc:  # noqa: BLE001 - the user's block may raise anything on a bad input
            raise ConfigError(f"task {task.name}: the Gluon block does not take examples of shape "
                              f"{tuple(example.shape[1:])}: {_first_line(exc)}",
                              "make the data (or input_shape, or the task's load_data) match the block's input"
                              ) from None
    unknown = [name for name, p in block._collect_params_with_prefix().items() if not _known(p)]
    if unknown:
        raise ConfigError(f"task {task.name}: the Gluon block's shapes are deferred until it sees data "
                          f"({unknown[0]} is {block._collect_params_with_prefix()[unknown[0]].shape})", _FIX_SHAPES)
    return block


def _known(param: gluon.Parameter) -> bool:
    """Whether the parameter's shape is settled (Gluon initialises a parameter as soon as its shape is known)."""
    return param.shape is not None and all(d > 0 for d in param.shape)


def _first_line(exc: BaseException) -> str:
    """The informative line of an MXNet error (its C++ check), without the timestamp and source location."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    line = next((ln for ln in lines if "Check failed" in ln), lines[0])
    return line.split("Check failed: ", 1)[-1] if "Check failed" in line else line


def gluon_tensors(task: Task, block: gluon.Block) -> list[tuple[str, gluon.Parameter, str]]:
    """``(gluon name, parameter, kind)`` of every tensor the federation averages, in ``gluon_names()`` order if
    the task gives one, else the block's; buffers (parameters Gluon does not differentiate) left out when local."""
    found = block._collect_params_with_prefix()
    order = list(found) if task.gluon_names is None else _names(task, list(found))
    out = []
    for name in order:
        param = found[name]
        if np.dtype(param.dtype) != np.float32:
            raise ConfigError(f"task {task.name}: Gluon parameter {name} is {np.dtype(param.dtype)}",
                              "use float32 parameters in the Gluon block (no block.cast())")
        # BatchNorm's running statistics are created with differentiable=False; a frozen parameter
        # (grad_req 'null') is still differentiable, and federated like PyTorch's frozen parameters.
        kind = "param" if getattr(param, "_differentiable", True) else "buffer"
        if kind == "param" or not task.local_buffers:
            out.append((name, param, kind))
    if not out:
        raise ConfigError(f"task {task.name}: the Gluon block has no parameters", "return a block with parameters")
    return out


def _names(task: Task, found: list[str]) -> list[str]:
    """``gluon_names()`` checked: every Gluon parameter named exactly once."""
    assert task.gluon_names is not None
    fix = "return from gluon_names() every name of the Gluon block's parameters once (docs/tasks.md), in the " \
          "order of the PyTorch model's floating-point state_dict tensors"
    try:
        names = [str(n) for n in task.gluon_names()]
    except Exception as exc:  # noqa: BLE001 - the user's code may raise anything
        raise ConfigError(f"task {task.name}: gluon_names() raised {type(exc).__name__}: {exc}", fix) from None
    unknown = [n for n in names if n not in found]
    if unknown:
        raise ConfigError(f"task {task.name}: gluon_names() gives {unknown[0]!r}, which the Gluon block does not "
                          f"have (its names: {', '.join(found[:6])}{', ...' if len(found) > 6 else ''})", fix)
    twice = [n for i, n in enumerate(names) if n in names[:i]]
    missing = [n for n in found if n not in names]
    if twice or missing:
        what = f"gives {twice[0]!r} twice" if twice else f"leaves out {missing[0]!r}"
        raise ConfigError(f"task {task.name}: gluon_names() {what}", fix)
    return names


def task_spec(task: Task, seed: int = 0) -> tuple[ModelSpec, Params]:
    """The model spec of a Gluon-only task (names as the block's, float32) and its initial weights, built once with
    the task's own ``gluon_model()``: what ``fedctl serve --task`` federates for a task without ``model()``."""
    block = build_gluon_block(task, mx.cpu(), seed)
    tensors = gluon_tensors(task, block)
    spec = ModelSpec(task.name, (), 0, tuple(ParamSpec(name, tuple(p.shape), 1, "float32", kind)
                                             for name, p, kind in tensors), f"task {task.ref} (Gluon)")
    return spec, {name: p.data().asnumpy().astype(np.float32) for name, p, _ in tensors}


def gluon_export(task: Task, spec: ModelSpec, arrays: Params) -> Params:
    """The run's model ``arrays`` (keyed by the run's names) as the task's Gluon block names them: every parameter
    of a fresh ``gluon_model()``, the federated ones replaced by the run's values (paired in order, as a worker
    pairs them), the others (FedBN's statistics) as the block initialises them — what ``load_parameters`` takes.

    Raises
    ------
    ConfigError
        The block does not pair with the run's model (another task, or shapes only known from data: give the task
        an ``input_shape``).
    """
    block = build_gluon_block(task, mx.cpu())
    tensors = gluon_tensors(task, block)
    diff = pair_with_spec(task, spec, tensors)
    if diff is not None:
        raise ConfigError(f"task {task.name}: the Gluon block does not pair with the run's model: {diff}",
                          "pass the --task the run was started with (with input_shape if the block defers shapes)")
    out = {name: p.data().asnumpy() for name, p in block._collect_params_with_prefix().items()}
    for want, (name, _, _) in zip(spec.params, tensors):
        out[name] = np.asarray(arrays[want.name], np.float32)
    return out


def pair_with_spec(task: Task, spec: ModelSpec, tensors: list[tuple[str, gluon.Parameter, str]]) -> str | None:
    """The first difference between the Gluon tensors and the run's spec, in words; None when they pair up.

    A task with ``model()`` federates PyTorch's names, so only shapes (and kinds) are compared, one by one in order;
    a Gluon-only task federates the Gluon names, so names are compared too.
    """
    names_too = task.model is None
    for i, ((name, param, kind), want) in enumerate(zip(tensors, spec.params)):
        got = tuple(param.shape)
        if got != want.shape or (names_too and name != want.name) or kind != want.kind:
            return (f"tensor {i} is {want.name} {want.shape} ({want.kind}) on the broker, Gluon {name} {got} "
                    f"({kind}) on the worker")
    if len(tensors) != len(spec.params):
        longer = ([(n, tuple(p.shape)) for n, p, _ in tensors] if len(tensors) > len(spec.params)
                  else [(p.name, p.shape) for p in spec.params])
        name, shape = longer[min(len(tensors), len(spec.params))]
        return (f"the broker has {len(spec.params)} tensors, the worker's Gluon block {len(tensors)}: the first "
                f"extra one is {name} {shape}")
    return None


def gluon_loss(task: Task) -> Callable[[Any, Any], Any]:
    """The loss MXNet minimises: ``gluon_loss``; else ``loss`` when it is a Gluon loss or the task has no PyTorch
    model (then ``loss`` can only be MXNet's); else softmax cross-entropy on class scores."""
    if task.gluon_loss is not None:
        return task.gluon_loss
    if task.loss is not None and (isinstance(task.loss, gluon.loss.Loss) or task.model is None):
        return task.loss
    if task.loss is not None:
        raise ConfigError(f"task {task.name} defines loss() for PyTorch but no gluon_loss() for MXNet",
                          "add gluon_loss(outputs, y) computing the same loss on NDArrays, so both frameworks "
                          "minimise the same objective")
    return gluon.loss.SoftmaxCrossEntropyLoss(sparse_label=True)


class MXNetTaskTrainer(MXNetTrainer):
    """An MXNet Gluon trainer for a user task, bound to one device and one local dataset.

    Parameters
    ----------
    spec:
        The broker's model spec; the task's Gluon block must pair up with it (else :class:`ModelMismatch`).
    x, y:
        Features as the task's block takes them (float32 ``[n, ...]``) and integer class labels ``[n]``.
    task:
        The loaded task (it defines ``gluon_model()``).
    """

    def __init__(self, spec: ModelSpec, x: np.ndarray, y: np.ndarray, device: str = "cpu",
                 threads: int | ThreadBudget | None = None, *, task: Task) -> None:
        self._budget = as_budget(threads)
        self._apply_threads()
        self.spec, self.task = spec, task
        self.ctx = _mx_context(device)
        x = np.ascontiguousarray(x, np.float32)
        y = np.ascontiguousarray(y, np.int64)
        if len(y) == 0 or len(x) != len(y):
            raise ConfigError(f"the local dataset has {len(x)} examples and {len(y)} labels",
                              "give the worker a non-empty dataset with one label per example")
        self._net = build_gluon_block(task, self.ctx, example=x[:2])
        tensors = gluon_tensors(task, self._net)
        diff = pair_with_spec(task, spec, tensors)
        if diff is not None:
            raise ModelMismatch(f"this worker's Gluon block of task {task.name} differs from the broker's model: "
                                f"{diff}", "make gluon_model() build the same tensors as model(), in the same "
                                           "order, or give gluon_names() (docs/tasks.md)")
        # Keyed by the run's names: MXNetTrainer's set_weights / get_weights then work as they are.
        self._params = {want.name: param for want, (_, param, _) in zip(spec.params, tensors)}
        self._trainable = [(n, p) for n, p in self._params.items() if p.grad_req != "null"]
        self._all_trainable = [p for p in self._net.collect_params().values() if p.grad_req != "null"]
        self._loss = gluon_loss(task)
        self._trainer: gluon.Trainer | None = None
        self._check_labels(x, y)
        self.num_examples = len(y)
        self._x = nd.array(x, ctx=self.ctx, dtype=np.float32)
        # Labels as float32: Gluon's pick and the accuracy comparison want the outputs' dtype (exact for ints).
        self._y = nd.array(y, ctx=self.ctx, dtype=np.float32)
        self._y_np = y

    def _check_labels(self, x: np.ndarray, y: np.ndarray) -> None:
        if self.task.gluon_loss is not None or self.task.loss is not None:
            return
        out = self._net(nd.array(x[:2], ctx=self.ctx))
        check_class_scores(self.task.name, tuple(out.shape), y, "gluon_loss()")

    @property
    def own_optimizer(self) -> bool:
        """Whether the task trains with its own ``gluon_optimizer()`` rather than plain SGD (SCAFFOLD refuses it)."""
        return self.task.gluon_optimizer is not None

    def set_weights(self, weights: Params) -> None:
        super().set_weights(weights)
        self._trainer = None  # a new round starts the local optimiser afresh, at the round's learning rate

    def local_state(self) -> Params:
        """The block's parameters that are not federated (BatchNorm statistics with ``local_buffers``), by Gluon
        name."""
        federated = {id(p) for p in self._params.values()}
        return {n: p.data().asnumpy().copy() for n, p in self._net._collect_params_with_prefix().items()
                if id(p) not in federated}

    def set_local_state(self, state: Params) -> None:
        federated = {id(p) for p in self._params.values()}
        for name, param in self._net._collect_params_with_prefix().items():
            value = state.get(name)
            if value is not None and id(param) not in federated and tuple(param.shape) == tuple(value.shape):
                param.set_data(nd.array(value, ctx=self.ctx, dtype=param.dtype))

    def _optimiser(self, lr: float) -> gluon.Trainer:
        if self._trainer is None:
            if self.task.gluon_optimizer is None:
                self._trainer = gluon.Trainer(self._all_trainable, "sgd", {"learning_rate": lr}, kvstore=None)
            else:
                made = self.task.gluon_optimizer(self._all_trainable, lr)
                if not isinstance(made, gluon.Trainer):
                    raise ConfigError(f"task {self.task.name}: gluon_optimizer() returned {type(made).__name__}, "
                                      "not a gluon.Trainer", "return gluon.Trainer(params, 'adam', {...})")
                self._trainer = made
        return self._trainer

    # -- training ------------------------------------------------------------------------------------------------
    def _takes_step(self, idx: np.ndarray) -> bool:
        return not (len(idx) == 1 and self.num_examples > 1)  # skipped as on PyTorch (BatchNorm on one example)

    def _hooked(self) -> Mapping[str, gluon.Parameter]:
        return dict(self._trainable)

    def _sgd_step(self, idx: np.ndarray, lr: float,
                  correction: Correction | None = None) -> tuple[nd.NDArray, nd.NDArray]:
        """One step of the task's optimiser (plain SGD without one) on batch ``idx``; the gradient is corrected
        before the optimiser sees it."""
        if not self._takes_step(idx):
            return nd.zeros((1,), ctx=self.ctx), nd.zeros((1,), ctx=self.ctx)
        xb, yb = self._batch(idx)
        with autograd.record(train_mode=True):  # BatchNorm on batch statistics, dropout on
            out = self._net(xb)
            loss = self._loss(out, yb).mean()
        loss.backward()
        if correction is not None:
            correction.apply_(self._hooked(), self.ctx)
        self._optimiser(lr).step(1, ignore_stale_grad=True)  # the gradient is already the batch mean
        correct = (out.argmax(axis=1) == yb).sum() if out.ndim == 2 else nd.zeros((1,), ctx=self.ctx)
        return loss * len(idx), correct

    def gradient(self, weights: Params, batch_size: int, seed: int) -> TrainResult:
        """Mean gradient of the task's loss over the shard or one sampled batch (train mode), for the trainable
        federated parameters (buffers and frozen parameters are left out: a gradient update may omit tensors)."""
        self._apply_threads()
        self.set_weights(weights)
        idx = sample_batch(self.num_examples, batch_size, seed)
        xs, ys = self._batch(idx)
        count = int(ys.shape[0])
        grads = {name: nd.zeros(p.shape, ctx=self.ctx) for name, p in self._trainable}
        loss_sum = 0.0
        for start in range(0, count, _CHUNK):
            xb, yb = xs[start:start + _CHUNK], ys[start:start + _CHUNK]
            with autograd.record(train_mode=True):
                loss = self._loss(self._net(xb), yb).mean() * len(yb)
                scaled = loss / count
            scaled.backward()
            for name, p in self._trainable:
                grads[name] += p.grad(self.ctx)
            loss_sum += float(loss.asscalar())
        return TrainResult({n: g.asnumpy() for n, g in grads.items()}, count, {"train_loss": loss_sum / count})

    def _outputs(self, step: int) -> tuple[np.ndarray, float]:
        """The block's outputs on the bound dataset in predict mode, and the summed loss."""
        outputs, loss_sum = [], 0.0
        for start in range(0, self.num_examples, step):
            xb, yb = self._x[start:start + step], self._y[start:start + step]
            out = self._net(xb)
            loss_sum += float(self._loss(out, yb).mean().asscalar()) * int(yb.shape[0])
            outputs.append(out.asnumpy())
        return np.concatenate(outputs), loss_sum

    def evaluate(self, weights: Params, batch_size: int = 1000) -> dict[str, float]:
        """Loss, accuracy (class scores) and the task's own metrics of ``weights`` on the bound dataset."""
        self._apply_threads()
        self.set_weights(weights)
        scores, loss_sum = self._outputs(batch_size if batch_size > 0 else self.num_examples)
        n = self.num_examples
        result: dict[str, float] = {"loss": loss_sum / n, "num_examples": n}
        if scores.ndim == 2:
            result["accuracy"] = float((scores.argmax(1) == self._y_np).mean())
        result.update(self.task.call_metrics(self._y_np, scores))
        return result

    def logits(self, weights: Params) -> np.ndarray:
        """The block's outputs (predict mode) on the whole bound dataset, float32 (for tests)."""
        self.set_weights(weights)
        return self._outputs(_CHUNK)[0].astype(np.float32)
