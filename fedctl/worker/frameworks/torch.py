"""The PyTorch adapter: zoo models as ``nn.Module``s with canonical parameter names, trained with plain SGD."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedctl.errors import ConfigError, ModelMismatch
from fedctl.models.zoo import ModelSpec
from fedctl.worker.frameworks import check_data, sample_batch, validate_weights
from fedctl.worker.frameworks.base import Params, TrainResult
from fedctl.worker.frameworks.device import parse_device, require_gpu
from fedctl.worker.frameworks.loop import SGDLoop
from fedctl.worker.threads import ThreadBudget, as_budget

__all__ = ["Correction", "TorchTrainer", "build_module"]

logger = logging.getLogger(__name__)

# Chunk of the shard processed at once for full-shard gradients and evaluation, to bound activation memory.
_CHUNK = 1000


class _MLP(nn.Module):
    """784-128-64-10 with ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class _LeNet5(nn.Module):
    """conv5x5(6, pad 2)-pool-conv5x5(16)-pool-120-84-10 with ReLU and 2x2 max pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(400, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class _TwoNN(nn.Module):
    """McMahan et al. 2017's 2NN: 784-200-200-10 with ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 200)
        self.fc2 = nn.Linear(200, 200)
        self.fc3 = nn.Linear(200, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class _CNN(nn.Module):
    """McMahan et al. 2017's CNN: conv5x5(32, pad 2)-pool-conv5x5(64, pad 2)-pool-512-10, ReLU, 2x2 max pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.fc1 = nn.Linear(64 * 7 * 7, 512)
        self.fc2 = nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))


_MODULES: dict[str, Callable[[], nn.Module]] = {"mlp": _MLP, "lenet5": _LeNet5, "2nn": _TwoNN, "cnn": _CNN}


def build_module(spec: ModelSpec) -> nn.Module:
    """Build the ``nn.Module`` of ``spec`` and check its parameters carry the spec's names and shapes.

    Raises
    ------
    ConfigError
        If the model has no PyTorch implementation.
    ModelMismatch
        If the module's parameters disagree with the spec (a bug in this adapter or in the zoo).
    """
    try:
        module = _MODULES[spec.name]()
    except KeyError:
        known = ", ".join(sorted(_MODULES))
        raise ConfigError(f"model {spec.name!r} has no PyTorch implementation", f"choose one of: {known}") from None
    got = {name: tuple(p.shape) for name, p in module.named_parameters()}
    want = {p.name: p.shape for p in spec.params}
    if got != want:
        raise ModelMismatch(
            f"PyTorch {spec.name} parameters {got} differ from the spec {want}",
            "align fedctl/worker/frameworks/torch.py with fedctl/models/zoo.py",
        )
    return module


@dataclass(frozen=True)
class Correction:
    """``fit``'s gradient correction in torch tensors, aligned with the trainable parameters: g ← g + mu · (p −
    start) + offset (``start`` None when mu is 0; an offset None where ``grad_offset`` names none)."""

    mu: float
    start: list[torch.Tensor] | None
    offset: list[torch.Tensor | None]

    @classmethod
    def of(cls, names: Sequence[str], params: Sequence[torch.Tensor], prox_mu: float,
           grad_offset: Params | None) -> Correction:
        """The correction for ``params`` (named ``names``) as they are now (w₀)."""
        offsets: list[torch.Tensor | None] = []
        for name, p in zip(names, params):
            value = (grad_offset or {}).get(name)
            if value is not None and tuple(np.shape(value)) != tuple(p.shape):
                raise ModelMismatch(f"the gradient offset of {name} has shape {tuple(np.shape(value))}, the "
                                    f"parameter {tuple(p.shape)}", "check the strategy's control variates")
            offsets.append(None if value is None else torch.as_tensor(np.asarray(value), dtype=p.dtype,
                                                                      device=p.device))
        start = [p.detach().clone() for p in params] if prox_mu else None
        return cls(float(prox_mu), start, offsets)

    def apply_(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
        """Add the correction to ``grads`` (those of ``params``) in place."""
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads)):
                if g is None:
                    continue
                if self.start is not None:
                    g.add_(p.detach() - self.start[i], alpha=self.mu)
                offset = self.offset[i]
                if offset is not None:
                    g.add_(offset)


def _torch_device(device: str) -> torch.device:
    dev = parse_device(device)
    if not dev.is_gpu:
        return torch.device("cpu")
    require_gpu(dev, "torch", torch.cuda.device_count() if torch.cuda.is_available() else 0)
    return torch.device("cuda", dev.index)


class TorchTrainer(SGDLoop):
    """A PyTorch trainer bound to one model spec, one device and one local dataset.

    Parameters
    ----------
    spec:
        The model spec.
    x, y:
        Normalised float32 images ``[n, 1, 28, 28]`` and int64 labels ``[n]``; copied to the device once.
    device:
        ``"cpu"`` or ``"gpu:N"`` / ``"cuda:N"``.
    threads:
        Intra-op CPU threads: a count, or a :class:`~fedctl.worker.threads.ThreadBudget` asked again before every
        ``fit``, ``gradient`` and ``evaluate``; None keeps PyTorch's default (one per CPU).
    """

    backend = "torch"

    def __init__(
        self, spec: ModelSpec, x: np.ndarray, y: np.ndarray, device: str = "cpu",
        threads: int | ThreadBudget | None = None,
    ) -> None:
        self._budget = as_budget(threads)
        self._apply_threads()
        self.spec = spec
        self.device = _torch_device(device)
        x, y = check_data(spec, x, y)
        self.num_examples = len(y)
        self._x = torch.from_numpy(x).to(self.device)
        self._y = torch.from_numpy(y).to(self.device)
        self._net = build_module(spec).to(self.device)
        self._params: list[torch.Tensor] = [p for _, p in self._net.named_parameters()]
        self._names = [name for name, _ in self._net.named_parameters()]
        self._grad_names = self._names
        """The names of ``_params``, the tensors SGD moves (a user task's trainable parameters)."""

    # -- weights -------------------------------------------------------------------------------------------------

    def set_weights(self, weights: Params) -> None:
        """Load ``weights`` (validated against the spec) into the module."""
        checked = validate_weights(self.spec, weights)
        with torch.no_grad():
            for name, p in zip(self._names, self._params):
                # Decoded wire arrays are read-only views; torch wants a writable buffer.
                p.copy_(torch.from_numpy(np.require(checked[name], requirements="W")))

    def get_weights(self) -> Params:
        """The module's parameters as float32 numpy arrays keyed by canonical name (copies)."""
        return {name: p.detach().cpu().numpy().copy() for name, p in zip(self._names, self._params)}

    # -- training ------------------------------------------------------------------------------------------------

    def _batch(self, idx: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        if idx is None or len(idx) == self.num_examples:
            return self._x, self._y
        index = torch.from_numpy(idx).to(self.device)
        return self._x.index_select(0, index), self._y.index_select(0, index)

    def _correction(self, prox_mu: float, grad_offset: Params | None) -> Correction:
        return Correction.of(self._grad_names, self._params, prox_mu, grad_offset)

    def _sgd_step(self, idx: np.ndarray, lr: float,
                  correction: Correction | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step on the mean loss of batch ``idx`` (its gradient corrected, when asked); returns (summed
        loss, correct count) before the step."""
        xb, yb = self._batch(idx)
        logits = self._net(xb)
        loss = F.cross_entropy(logits, yb)
        grads = torch.autograd.grad(loss, self._params)
        if correction is not None:
            correction.apply_(self._params, grads)
        with torch.no_grad():
            for p, g in zip(self._params, grads):
                p.add_(g, alpha=-lr)
        return loss.detach() * len(yb), (logits.detach().argmax(1) == yb).sum()

    def _scalar(self, value: Any) -> float:
        return float(value)

    def _apply_threads(self) -> None:
        # torch.set_num_threads acts on the calling thread's OpenMP pool (and is the default of threads started
        # later), and the worker trains in an executor thread: so it is set here, in the thread that trains.
        if self._budget is not None:
            count = self._budget.threads()
            if torch.get_num_threads() != count:
                torch.set_num_threads(count)

    def gradient(self, weights: Params, batch_size: int, seed: int) -> TrainResult:
        """Mean cross-entropy gradient at ``weights`` over the shard (``batch_size`` 0) or one sampled batch.

        The full shard is processed in chunks, each chunk's summed loss divided by the total count, so the
        result equals the full-batch mean gradient. ``num_examples`` is the number of examples averaged over.
        """
        self._apply_threads()
        self.set_weights(weights)
        idx = sample_batch(self.num_examples, batch_size, seed)
        xs, ys = self._batch(idx)
        count = len(ys)
        grads = [torch.zeros_like(p) for p in self._params]
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        for start in range(0, count, _CHUNK):
            xb, yb = xs[start : start + _CHUNK], ys[start : start + _CHUNK]
            logits = self._net(xb)
            loss = F.cross_entropy(logits, yb, reduction="sum")
            chunk_grads = torch.autograd.grad(loss / count, self._params)
            for acc, g in zip(grads, chunk_grads):
                acc.add_(g)
            loss_sum += loss.detach()
            correct += (logits.detach().argmax(1) == yb).sum()
        params = {name: g.cpu().numpy() for name, g in zip(self._names, grads)}
        metrics = {"train_loss": float(loss_sum) / count, "train_accuracy": float(correct) / count}
        return TrainResult(params, count, metrics)

    def evaluate(self, weights: Params, batch_size: int = 1000) -> dict[str, float]:
        """Accuracy, mean cross-entropy and example count of ``weights`` on the bound dataset."""
        self._apply_threads()
        self.set_weights(weights)
        step = batch_size if batch_size > 0 else self.num_examples
        loss_sum, correct = 0.0, 0
        with torch.no_grad():
            for start in range(0, self.num_examples, step):
                xb, yb = self._x[start : start + step], self._y[start : start + step]
                logits = self._net(xb)
                loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
                correct += int((logits.argmax(1) == yb).sum())
        n = self.num_examples
        return {"accuracy": correct / n, "loss": loss_sum / n, "num_examples": n}

    def logits(self, weights: Params) -> np.ndarray:
        """Raw outputs of ``weights`` on the whole bound dataset, float32 ``[n, num_classes]`` (for tests)."""
        self.set_weights(weights)
        with torch.no_grad():
            return self._net(self._x).cpu().numpy()


_STATE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64}


def save_state_dict(fh: Any, arrays: Params, dtypes: dict[str, str],
                    template: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``arrays`` as a PyTorch state dict (``torch.save`` of an ordered dict of tensors by canonical name), so
    that ``module.load_state_dict(torch.load(f))`` takes it: each tensor cast from float32 to its model dtype in
    ``dtypes`` (``float32``, ``float16``, ``bfloat16``, ``float64``; rounded to nearest even).

    ``template``: a fresh module's ``state_dict()``; the file then has its every entry, in its order — the federated
    tensors from ``arrays``, the others (local buffers, ``num_batches_tracked``) as the template holds them — so
    that a strict ``load_state_dict`` takes it. ModelMismatch when a federated tensor is not in it, or of another
    shape."""
    state: dict[str, torch.Tensor] = {}
    for name, array in arrays.items():
        tensor = torch.from_numpy(np.array(array, dtype=np.float32, copy=True))
        state[name] = tensor.to(_STATE_DTYPES[dtypes.get(name, "float32")])
    if template is not None:
        for name, tensor in state.items():
            if name not in template or tuple(template[name].shape) != tuple(tensor.shape):
                found = tuple(template[name].shape) if name in template else "absent"
                raise ModelMismatch(f"tensor {name} {tuple(tensor.shape)} of the run is {found} in the task's model",
                                    "pass the --task the run was started with")
        state = {name: state.get(name, tensor.detach().cpu().clone()) for name, tensor in template.items()}
    torch.save(state, fh)
