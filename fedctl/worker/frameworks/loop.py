"""The local-training loop both framework adapters share: epochs of shuffled mini-batches and their metrics.

An adapter supplies the framework part — one SGD step on a batch, weight I/O, evaluation, and turning a
framework scalar into a float — and inherits ``fit``, so PyTorch and MXNet workers run the same schedule.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedctl.worker.frameworks import check_fit_args, epoch_batches
from fedctl.worker.frameworks.base import Params, TrainResult


class SGDLoop:
    """Mixin implementing ``Trainer.fit`` on top of the adapter's ``_sgd_step``."""

    num_examples: int

    def set_weights(self, weights: Params) -> None:
        raise NotImplementedError

    def get_weights(self) -> Params:
        raise NotImplementedError

    def evaluate(self, weights: Params, batch_size: int = 1000) -> dict[str, float]:
        raise NotImplementedError

    def _sgd_step(self, idx: np.ndarray, lr: float) -> tuple[Any, Any]:
        """One SGD step on batch ``idx``; returns (summed loss, correct count) measured before the step."""
        raise NotImplementedError

    def _scalar(self, value: Any) -> float:
        """A framework scalar (or a plain number) as a Python float; the one host sync per epoch."""
        raise NotImplementedError

    def _apply_threads(self) -> None:
        """Size the framework's CPU thread pool for the call about to run, in the thread that runs it."""

    def fit(self, weights: Params, epochs: int, batch_size: int, lr: float, seed: int) -> TrainResult:
        """Plain mini-batch SGD (no momentum, no weight decay) from ``weights``; see :class:`base.Trainer`.

        Metrics: ``train_loss`` and ``train_accuracy`` over the last epoch's batches (each measured before its
        step, weighted by batch size) and ``steps``. With ``epochs`` 0 they are measured at ``weights``.
        """
        check_fit_args(epochs, lr)
        self._apply_threads()
        self.set_weights(weights)
        if epochs == 0:
            ev = self.evaluate(self.get_weights())
            return TrainResult(self.get_weights(), self.num_examples,
                               {"train_loss": ev["loss"], "train_accuracy": ev["accuracy"], "steps": 0})
        rng = np.random.default_rng(seed)
        steps = 0
        loss_sum: Any = 0.0
        correct: Any = 0
        for _ in range(epochs):
            loss_sum, correct = 0.0, 0
            for idx in epoch_batches(self.num_examples, batch_size, rng):
                batch_loss, batch_correct = self._sgd_step(idx, lr)
                loss_sum = batch_loss + loss_sum
                correct = batch_correct + correct
                steps += 1
        metrics = {"train_loss": self._scalar(loss_sum) / self.num_examples,
                   "train_accuracy": self._scalar(correct) / self.num_examples, "steps": steps}
        return TrainResult(self.get_weights(), self.num_examples, metrics)
