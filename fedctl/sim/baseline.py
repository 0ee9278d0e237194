"""The centralised baseline: plain mini-batch SGD on the whole training split, evaluated several times an epoch.

It starts from the same initial weights as the broker (:func:`fedctl.models.init_params` with the run's
seed) and trains through the same framework adapter as a worker, so its curve is directly comparable with a
federated run's: accuracy against epochs of computation (the seed thesis's comparison) and against wall time.

Each epoch draws one random permutation of the training set and splits it into ``evals_per_epoch`` chunks;
a lightweight trainer is bound to each chunk and runs one local epoch on it (the adapter shuffles within the
chunk), so every example is visited exactly once per epoch and the model is evaluated after every chunk
without touching the adapter's contract.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedctl.data import get_dataset, load_dataset, normalize
from fedctl.errors import ConfigError
from fedctl.models import ModelSpec, get_model, init_params
from fedctl.worker.frameworks import Params, Trainer, create_trainer

__all__ = ["run_centralized"]

log = logging.getLogger(__name__)

Record = dict[str, Any]
_SEED_SPACE = 2**31


@dataclass(frozen=True)
class _Setup:
    """What every chunk needs: the backend, the model, the device and the normalised training split."""

    backend: str
    spec: ModelSpec
    device: str
    threads: int | None
    x: np.ndarray
    y: np.ndarray


def _load_split(dataset: str, split: str, source_dir: str | os.PathLike[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """One split as normalised float32 ``[n, 1, 28, 28]`` images and int64 labels."""
    spec = get_dataset(dataset)
    images, labels = load_dataset(dataset, split, source_dir)
    return normalize(images, spec.mean, spec.std), labels.astype(np.int64)


def _check_args(batch_size: int, lr: float, max_epochs: int, evals_per_epoch: int) -> None:
    if batch_size < 0:
        raise ConfigError(f"batch size must be >= 0, got {batch_size}", "use a positive B, or 0 for full batch")
    if not np.isfinite(lr) or lr <= 0:
        raise ConfigError(f"learning rate must be positive, got {lr}", "use e.g. --lr 0.1")
    if max_epochs < 1:
        raise ConfigError(f"max_epochs must be >= 1, got {max_epochs}", "train for at least one epoch")
    if evals_per_epoch < 1:
        raise ConfigError(f"evals_per_epoch must be >= 1, got {evals_per_epoch}", "evaluate at least once an epoch")


def _record(epoch: float, evaluation: dict[str, float], wall_s: float, train_loss: float | None) -> Record:
    return {"epoch": round(epoch, 6), "test_accuracy": float(evaluation["accuracy"]),
            "test_loss": float(evaluation["loss"]), "train_loss": train_loss, "wall_s": round(wall_s, 4)}


def _train_chunk(setup: _Setup, idx: np.ndarray, weights: Params, batch_size: int, lr: float,
                 seed: int) -> tuple[Params, float]:
    """One local epoch over the examples ``idx``; returns the new weights and the chunk's training loss."""
    trainer = create_trainer(setup.backend, setup.spec, setup.x[idx], setup.y[idx], setup.device, setup.threads)
    result = trainer.fit(weights, epochs=1, batch_size=batch_size, lr=lr, seed=seed)
    return result.params, float(result.metrics["train_loss"])


class _Stopper:
    """Decides when to stop: one evaluation after the first one that reaches the target."""

    def __init__(self, target: float | None, enabled: bool) -> None:
        self.target = target if enabled else None
        self.reached = False

    def done(self, accuracy: float) -> bool:
        if self.target is None:
            return False
        if self.reached:
            return True
        self.reached = accuracy >= self.target
        return False


def run_centralized(
    model: str,
    dataset: str = "mnist",
    source_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 10,
    lr: float = 0.1,
    max_epochs: int = 20,
    target: float | None = None,
    seed: int = 0,
    backend: str = "torch",
    evals_per_epoch: int = 4,
    on_eval: Callable[[Record], None] | None = None,
    stop_at_target: bool = True,
    threads: int | None = None,
    device: str = "cpu",
    lr_decay: float = 1.0,
) -> list[Record]:
    """Train ``model`` centrally with plain SGD and return its learning curve.

    Parameters
    ----------
    model:
        A model of the zoo (``"mlp"``, ``"lenet5"``, ``"2nn"``, ``"cnn"``).
    dataset, source_dir:
        The registered dataset and, optionally, the directory holding its IDX files.
    batch_size, lr:
        Mini-batch size B (0 = full batch) and learning rate η.
    lr_decay:
        Per-epoch factor: epoch e trains with η · lr_decay^e (1.0 = constant, as in the federated runs).
    max_epochs:
        Upper bound on the number of passes over the training split.
    target:
        Test accuracy to reach; with ``stop_at_target``, training stops one evaluation after reaching it.
    seed:
        Seeds the initial weights (as the broker does) and every shuffle.
    backend, device, threads:
        The framework adapter, its device and its intra-op CPU threads (process-wide; None keeps the default).
    evals_per_epoch:
        Test evaluations per epoch (each after an equal share of the epoch's examples).
    on_eval:
        Called with each record as soon as it exists (progress reporting).

    Returns
    -------
    list of dict
        One record per evaluation, starting with the initial model at epoch 0: ``epoch`` (fractional),
        ``test_accuracy``, ``test_loss``, ``train_loss`` (over the chunk just trained; None at epoch 0) and
        ``wall_s`` (cumulative training time, evaluation excluded).
    """
    _check_args(batch_size, lr, max_epochs, evals_per_epoch)
    if not 0 < lr_decay <= 1:
        raise ConfigError(f"lr_decay must be in (0, 1], got {lr_decay}", "use 1.0 for a constant learning rate")
    spec = get_model(model)
    x, y = _load_split(dataset, "train", source_dir)
    x_test, y_test = _load_split(dataset, "test", source_dir)
    setup = _Setup(backend, spec, device, threads, x, y)
    evaluator: Trainer = create_trainer(backend, spec, x_test, y_test, device, threads)
    weights = init_params(spec, seed)
    records = [_record(0.0, evaluator.evaluate(weights), 0.0, None)]
    _emit(records[-1], on_eval)
    rng = np.random.default_rng(seed)
    stopper = _Stopper(target, stop_at_target)
    wall_s = 0.0
    for epoch in range(max_epochs):
        chunks = np.array_split(rng.permutation(len(y)), evals_per_epoch)
        for i, idx in enumerate(chunks):
            started = time.perf_counter()
            weights, train_loss = _train_chunk(setup, idx, weights, batch_size, lr * lr_decay**epoch,
                                               int(rng.integers(_SEED_SPACE)))
            wall_s += time.perf_counter() - started
            records.append(_record(epoch + (i + 1) / evals_per_epoch, evaluator.evaluate(weights), wall_s,
                                   train_loss))
            _emit(records[-1], on_eval)
            if stopper.done(records[-1]["test_accuracy"]):
                return records
    return records


def _emit(record: Record, on_eval: Callable[[Record], None] | None) -> None:
    log.info("epoch %.2f  test accuracy %.4f  loss %.4f  train %.1f s", record["epoch"], record["test_accuracy"],
             record["test_loss"], record["wall_s"])
    if on_eval is not None:
        on_eval(record)
