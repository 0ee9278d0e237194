"""The MXNet Gluon adapter: zoo models as HybridBlocks with canonical parameter names, trained with plain SGD.

MXNet 1.9 needs numpy<1.24 (it uses ``np.bool``); on a newer numpy the import fails and the registry turns that
into :class:`~fedctl.errors.BackendUnavailable`.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

# MXNet 1.9 emits a burst of distutils/numpy DeprecationWarnings on import; they say nothing about fedctl.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import mxnet as mx
    from mxnet import autograd, gluon, nd
    from mxnet.gluon import nn

from fedctl.errors import ConfigError, ModelMismatch
from fedctl.models.zoo import ModelSpec
from fedctl.worker.frameworks import check_data, sample_batch, validate_weights
from fedctl.worker.frameworks.base import Params, TrainResult
from fedctl.worker.frameworks.device import parse_device, require_gpu
from fedctl.worker.frameworks.loop import SGDLoop
from fedctl.worker.threads import ThreadBudget, as_budget, available_cpus

__all__ = ["Correction", "MXNetTrainer", "build_block"]

logger = logging.getLogger(__name__)

# Chunk of the shard processed at once for full-shard gradients and evaluation, to bound activation memory.
_CHUNK = 1000


class _MLP(gluon.HybridBlock):
    """784-128-64-10 with ReLU; Dense(flatten=True) flattens [n, 1, 28, 28] to [n, 784]."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Dense(128, in_units=784)
        self.fc2 = nn.Dense(64, in_units=128)
        self.fc3 = nn.Dense(10, in_units=64)

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class _LeNet5(gluon.HybridBlock):
    """conv5x5(6, pad 2)-pool-conv5x5(16)-pool-120-84-10 with ReLU and 2x2 max pooling (NCHW, OIHW)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2D(6, 5, padding=2, in_channels=1)
        self.conv2 = nn.Conv2D(16, 5, in_channels=6)
        self.pool = nn.MaxPool2D(pool_size=2, strides=2)
        self.fc1 = nn.Dense(120, in_units=400)
        self.fc2 = nn.Dense(84, in_units=120)
        self.fc3 = nn.Dense(10, in_units=84)

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        # fc1 flattens [n, 16, 5, 5] in C, H, W order, the same order as torch.flatten.
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class _TwoNN(gluon.HybridBlock):
    """McMahan et al. 2017's 2NN: 784-200-200-10 with ReLU; fc1 flattens [n, 1, 28, 28] to [n, 784]."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Dense(200, in_units=784)
        self.fc2 = nn.Dense(200, in_units=200)
        self.fc3 = nn.Dense(10, in_units=200)

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class _CNN(gluon.HybridBlock):
    """McMahan et al. 2017's CNN: conv5x5(32, pad 2)-pool-conv5x5(64, pad 2)-pool-512-10, ReLU, 2x2 max pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2D(32, 5, padding=2, in_channels=1)
        self.conv2 = nn.Conv2D(64, 5, padding=2, in_channels=32)
        self.pool = nn.MaxPool2D(pool_size=2, strides=2)
        self.fc1 = nn.Dense(512, in_units=64 * 7 * 7)
        self.fc2 = nn.Dense(10, in_units=512)

    def hybrid_forward(self, F: Any, x: Any) -> Any:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        # fc1 flattens [n, 64, 7, 7] in C, H, W order, the same order as torch.flatten.
        return self.fc2(F.relu(self.fc1(x)))


_BLOCKS: dict[str, Callable[[], gluon.HybridBlock]] = {"mlp": _MLP, "lenet5": _LeNet5, "2nn": _TwoNN, "cnn": _CNN}


def build_block(spec: ModelSpec, ctx: mx.Context) -> tuple[gluon.HybridBlock, dict[str, gluon.Parameter]]:
    """Build, initialise and hybridize the block of ``spec``; return it and its parameters by canonical name.

    Raises
    ------
    ConfigError
        If the model has no MXNet implementation.
    ModelMismatch
        If the block's parameters disagree with the spec (a bug in this adapter or in the zoo).
    """
    try:
        block = _BLOCKS[spec.name]()
    except KeyError:
        known = ", ".join(sorted(_BLOCKS))
        raise ConfigError(f"model {spec.name!r} has no MXNet implementation", f"choose one of: {known}") from None
    # Zero init: the real weights always arrive through set_weights before any use.
    block.initialize(mx.init.Zero(), ctx=ctx)
    block.hybridize(static_alloc=True)
    found = block._collect_params_with_prefix()
    params = {p.name: found[p.name] for p in spec.params if p.name in found}
    got = {name: tuple(p.shape) for name, p in found.items()}
    want = {p.name: p.shape for p in spec.params}
    if got != want:
        raise ModelMismatch(
            f"MXNet {spec.name} parameters {got} differ from the spec {want}",
            "align fedctl/worker/frameworks/mxnet.py with fedctl/models/zoo.py",
        )
    return block, params


@dataclass(frozen=True)
class Correction:
    """``fit``'s gradient correction in NDArrays, by parameter name: g ← g + mu · (w − start) + offset (``start``
    empty when mu is 0; no offset where ``grad_offset`` names none)."""

    mu: float
    start: dict[str, nd.NDArray]
    offset: dict[str, nd.NDArray]

    @classmethod
    def of(cls, params: Mapping[str, gluon.Parameter], ctx: mx.Context, prox_mu: float,
           grad_offset: Params | None) -> Correction:
        """The correction for ``params`` (the trainable ones, by run name) as they are now (w₀)."""
        offsets = {}
        for name, p in params.items():
            value = (grad_offset or {}).get(name)
            if value is None:
                continue
            if tuple(np.shape(value)) != tuple(p.shape):
                raise ModelMismatch(f"the gradient offset of {name} has shape {tuple(np.shape(value))}, the "
                                    f"parameter {tuple(p.shape)}", "check the strategy's control variates")
            offsets[name] = nd.array(np.asarray(value), ctx=ctx, dtype=p.dtype)
        start = {name: p.data(ctx).copy() for name, p in params.items()} if prox_mu else {}
        return cls(float(prox_mu), start, offsets)

    def apply_(self, params: Mapping[str, gluon.Parameter], ctx: mx.Context) -> None:
        """Add the correction to the gradients of ``params`` in place (after ``backward``, before the update)."""
        for name, p in params.items():
            grad = p.grad(ctx)
            if self.start:
                grad += self.mu * (p.data(ctx) - self.start[name])
            offset = self.offset.get(name)
            if offset is not None:
                grad += offset


# -- CPU threads -----------------------------------------------------------------------------------------------------
# MXNet 1.9 runs CPU operators on its engine's worker thread (one per CPU context with the default
# MXNET_CPU_WORKER_NTHREADS=1), whose OpenMP pool is sized once, when that thread starts, to at most MXNet's own cap
# (half the CPUs on x86, see _default_cap). MXSetNumOMPThreads, its public C API for the pool, acts on the calling
# thread only; so it is called here and also pushed onto the engine with MXEnginePushSync (public C API too), which
# runs it on the CPU worker thread before every operator pushed after it. MXNet has no Python API for either.
_SyncFn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)


class _Context(ctypes.Structure):
    """``mxnet::Context`` as the C API reads it: device type (1 = CPU) and device id."""

    _fields_ = [("dev_type", ctypes.c_int), ("dev_id", ctypes.c_int)]


def _set_omp_threads_here(run_ctx: int | None, count: int | None) -> None:
    mx.base._LIB.MXSetNumOMPThreads(ctypes.c_int(count or 1))


# Module-level: the engine calls it later, from its own thread, so it must outlive any one call.
_SET_OMP_THREADS_ON_ENGINE = _SyncFn(_set_omp_threads_here)
_CPU_CONTEXT = _Context(1, 0)


def _default_cap() -> int:
    """MXNet's own default pool size: half the CPUs on x86 (it assumes two hyperthreads per core), else all.

    Measured on 2 CPUs, the MLP at B=10 trains 5x slower with 2 OpenMP threads than with MXNet's 1, so an automatic
    count never goes above this; ``--threads N`` does.
    """
    cpus = available_cpus()
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
    return max(1, cpus // 2) if x86 else cpus


def _set_threads(count: int) -> None:
    lib = mx.base._LIB
    mx.base.check_call(lib.MXSetNumOMPThreads(ctypes.c_int(count)))
    mx.base.check_call(lib.MXEnginePushSync(
        _SET_OMP_THREADS_ON_ENGINE, ctypes.c_void_p(count), None, ctypes.byref(_CPU_CONTEXT),
        None, 0, None, 0, None, 0, b"fedctl_set_omp_threads"))


def _mx_context(device: str) -> mx.Context:
    dev = parse_device(device)
    if not dev.is_gpu:
        return mx.cpu()
    try:
        num_gpus = mx.context.num_gpus()
    except mx.base.MXNetError:  # a CPU-only build may refuse to count
        num_gpus = 0
    require_gpu(dev, "mxnet", num_gpus)
    return mx.gpu(dev.index)


class MXNetTrainer(SGDLoop):
    """An MXNet Gluon trainer bound to one model spec, one device and one local dataset.

    Parameters
    ----------
    spec:
        The model spec.
    x, y:
        Normalised float32 images ``[n, 1, 28, 28]`` and int64 labels ``[n]``; copied to the device once.
    device:
        ``"cpu"`` or ``"gpu:N"`` / ``"cuda:N"``.
    threads:
        OpenMP threads of MXNet's CPU operators: a count, or a :class:`~fedctl.worker.threads.ThreadBudget` asked
        again before every ``fit``, ``gradient`` and ``evaluate`` (an automatic one stays at or below MXNet's own
        default); None keeps MXNet's default.
    """

    backend = "mxnet"

    def __init__(
        self, spec: ModelSpec, x: np.ndarray, y: np.ndarray, device: str = "cpu",
        threads: int | ThreadBudget | None = None,
    ) -> None:
        self._budget = as_budget(threads)
        self._apply_threads()
        self.spec = spec
        self.ctx = _mx_context(device)
        x, y = check_data(spec, x, y)
        self.num_examples = len(y)
        self._x = nd.array(x, ctx=self.ctx, dtype=np.float32)
        # Labels as float32: Gluon's pick and the accuracy comparison both want the logits' dtype (exact for ints).
        self._y = nd.array(y, ctx=self.ctx, dtype=np.float32)
        self._net, self._params = build_block(spec, self.ctx)
        self._loss = gluon.loss.SoftmaxCrossEntropyLoss(sparse_label=True)

    # -- weights -------------------------------------------------------------------------------------------------

    def set_weights(self, weights: Params) -> None:
        """Load ``weights`` (validated against the spec) into the block, in place."""
        checked = validate_weights(self.spec, weights)
        for name, p in self._params.items():
            # Copy from an NDArray, not from numpy: after an inference pass MKL-DNN may hold a conv weight in its
            # own layout, and only NDArray-to-NDArray copies reorder it back.
            p.data(self.ctx)[:] = nd.array(checked[name], ctx=self.ctx, dtype=np.float32)

    def get_weights(self) -> Params:
        """The block's parameters as float32 numpy arrays keyed by canonical name (copies)."""
        return {name: p.data(self.ctx).asnumpy() for name, p in self._params.items()}

    # -- training ------------------------------------------------------------------------------------------------

    def _batch(self, idx: np.ndarray | None) -> tuple[nd.NDArray, nd.NDArray]:
        if idx is None or len(idx) == self.num_examples:
            return self._x, self._y
        index = nd.array(idx, ctx=self.ctx, dtype=np.int64)
        return nd.take(self._x, index), nd.take(self._y, index)

    def _hooked(self) -> Mapping[str, gluon.Parameter]:
        """The parameters SGD moves, by run name (the gradient correction's)."""
        return self._params

    def _correction(self, prox_mu: float, grad_offset: Params | None) -> Correction:
        return Correction.of(self._hooked(), self.ctx, prox_mu, grad_offset)

    def _sgd_step(self, idx: np.ndarray, lr: float,
                  correction: Correction | None = None) -> tuple[nd.NDArray, nd.NDArray]:
        """One SGD step on the mean loss of batch ``idx`` (its gradient corrected, when asked); returns (summed
        loss, correct count) before the step."""
        xb, yb = self._batch(idx)
        with autograd.record():
            logits = self._net(xb)
            losses = self._loss(logits, yb)
            mean = losses.mean()
        mean.backward()
        if correction is not None:
            correction.apply_(self._params, self.ctx)
        for p in self._params.values():
            weight = p.data(self.ctx)
            nd.sgd_update(weight, p.grad(self.ctx), lr=lr, wd=0.0, rescale_grad=1.0, out=weight)
        return losses.sum(), (logits.argmax(axis=1) == yb).sum()

    def _scalar(self, value: Any) -> float:
        return float(value.asscalar()) if hasattr(value, "asscalar") else float(value)

    def _apply_threads(self) -> None:
        if self._budget is not None:
            _set_threads(self._budget.threads(cap=_default_cap()))

    def gradient(self, weights: Params, batch_size: int, seed: int) -> TrainResult:
        """Mean cross-entropy gradient at ``weights`` over the shard (``batch_size`` 0) or one sampled batch.

        The full shard is processed in chunks, each chunk's summed loss divided by the total count, so the
        result equals the full-batch mean gradient. ``num_examples`` is the number of examples averaged over.
        """
        self._apply_threads()
        self.set_weights(weights)
        idx = sample_batch(self.num_examples, batch_size, seed)
        xs, ys = self._batch(idx)
        count = int(ys.shape[0])
        grads = {name: nd.zeros(p.shape, ctx=self.ctx) for name, p in self._params.items()}
        loss_sum = nd.zeros((1,), ctx=self.ctx)
        correct = nd.zeros((1,), ctx=self.ctx)
        for start in range(0, count, _CHUNK):
            xb, yb = xs[start : start + _CHUNK], ys[start : start + _CHUNK]
            with autograd.record():
                logits = self._net(xb)
                losses = self._loss(logits, yb)
                scaled = losses.sum() / count
            scaled.backward()
            for name, p in self._params.items():
                grads[name] += p.grad(self.ctx)
            loss_sum += losses.sum()
            correct += (logits.argmax(axis=1) == yb).sum()
        params = {name: g.asnumpy() for name, g in grads.items()}
        metrics = {
            "train_loss": float(loss_sum.asscalar()) / count,
            "train_accuracy": float(correct.asscalar()) / count,
        }
        return TrainResult(params, count, metrics)

    def evaluate(self, weights: Params, batch_size: int = 1000) -> dict[str, float]:
        """Accuracy, mean cross-entropy and example count of ``weights`` on the bound dataset."""
        self._apply_threads()
        self.set_weights(weights)
        step = batch_size if batch_size > 0 else self.num_examples
        loss_sum = nd.zeros((1,), ctx=self.ctx)
        correct = nd.zeros((1,), ctx=self.ctx)
        for start in range(0, self.num_examples, step):
            xb, yb = self._x[start : start + step], self._y[start : start + step]
            logits = self._net(xb)
            loss_sum += self._loss(logits, yb).sum()
            correct += (logits.argmax(axis=1) == yb).sum()
        n = self.num_examples
        return {"accuracy": float(correct.asscalar()) / n, "loss": float(loss_sum.asscalar()) / n, "num_examples": n}

    def logits(self, weights: Params) -> np.ndarray:
        """Raw outputs of ``weights`` on the whole bound dataset, float32 ``[n, num_classes]`` (for tests)."""
        self.set_weights(weights)
        return self._net(self._x).asnumpy()
