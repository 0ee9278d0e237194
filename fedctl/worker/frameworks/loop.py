"""The local-training loop both framework adapters share: epochs of shuffled mini-batches and their metrics.

An adapter supplies the framework part — one SGD step on a batch, weight I/O, evaluation, and turning a
framework scalar into a float — and inherits ``fit``, so PyTorch and MXNet workers run the same schedule. The
gradient correction of ``fit`` (``prox_mu``, ``grad_offset``: FedProx, SCAFFOLD) is the adapter's too: it turns it
into framework tensors once per call (:meth:`SGDLoop._correction`) and adds it to each step's gradient.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedctl.worker.frameworks import check_correction, check_fit_args, epoch_batches
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

    def _sgd_step(self, idx: np.ndarray, lr: float, correction: Any = None) -> tuple[Any, Any]:
        """One SGD step on batch ``idx``, its gradient corrected by ``correction`` (what :meth:`_correction` made;
        None: plain SGD); returns (summed loss, correct count) measured before the step."""
        raise NotImplementedError

    def _correction(self, prox_mu: float, grad_offset: Params | None) -> Any:
        """The gradient correction g + prox_mu · (w − w₀) + grad_offset in the framework's tensors, w₀ the weights
        just set; called once per ``fit`` and only when one of them is on."""
        raise NotImplementedError

    def _takes_step(self, idx: np.ndarray) -> bool:
        """Whether :meth:`_sgd_step` moves the parameters on batch ``idx`` (a user task skips a batch of one)."""
        return True

    def _scalar(self, value: Any) -> float:
        """A framework scalar (or a plain number) as a Python float; the one host sync per epoch."""
        raise NotImplementedError

    def _apply_threads(self) -> None:
        """Size the framework's CPU thread pool for the call about to run, in the thread that runs it."""

    def fit(self, weights: Params, epochs: int, batch_size: int, lr: float, seed: int, prox_mu: float = 0.0,
            grad_offset: Params | None = None) -> TrainResult:
        """Plain mini-batch SGD (no momentum, no weight decay) from ``weights``; see :class:`base.Trainer`.

        ``prox_mu`` and ``grad_offset`` correct every step's gradient (see :class:`base.Trainer`); both off, the
        steps are exactly plain SGD's. Metrics: ``train_loss`` and ``train_accuracy`` over the last epoch's batches
        (each measured before its step, weighted by batch size) and ``steps``, the steps taken (K). With ``epochs``
        0 they are measured at ``weights``.
        """
        check_fit_args(epochs, lr)
        check_correction(prox_mu, grad_offset)
        self._apply_threads()
        self.set_weights(weights)
        correction = self._correction(prox_mu, grad_offset) if prox_mu or grad_offset else None
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
                batch_loss, batch_correct = self._sgd_step(idx, lr, correction)
                loss_sum = batch_loss + loss_sum
                correct = batch_correct + correct
                steps += self._takes_step(idx)
        metrics = {"train_loss": self._scalar(loss_sum) / self.num_examples,
                   "train_accuracy": self._scalar(correct) / self.num_examples, "steps": steps}
        return TrainResult(self.get_weights(), self.num_examples, metrics)
