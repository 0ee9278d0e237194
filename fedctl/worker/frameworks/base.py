"""The contract between a worker's training runner and a framework adapter (MXNet Gluon or PyTorch).

An adapter owns a model built from a :class:`~fedctl.models.ModelSpec` and a local dataset; it trains and
evaluates on numpy parameters keyed by canonical names. Strategies call it through this protocol only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

Params = dict[str, np.ndarray]


@dataclass
class TrainResult:
    """What one call of local training produced: tensors (weights or gradients) plus metrics."""

    params: Params
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class Trainer(Protocol):
    """A framework adapter bound to one model spec, one device and one local dataset."""

    backend: str

    def fit(self, weights: Params, epochs: int, batch_size: int, lr: float, seed: int, prox_mu: float = 0.0,
            grad_offset: Params | None = None) -> TrainResult:
        """Run ``epochs`` of mini-batch SGD (batch ``batch_size``; 0 = the whole shard) from ``weights``.

        ``prox_mu`` and ``grad_offset`` correct the gradient of every step before the parameters move:
        g ← g + prox_mu · (w − w₀) + grad_offset, w₀ being ``weights`` (FedProx's proximal term; SCAFFOLD's c − c_i).
        The offset applies to the trainable tensors it names (others, and a user task's buffers, get none). With
        both off (the defaults) the loop does no extra work.

        Returns the new weights (float32 numpy, canonical names) and metrics (``train_loss``, ``train_accuracy``,
        ``steps``: the SGD steps taken, K).
        """
        ...

    def gradient(self, weights: Params, batch_size: int, seed: int) -> TrainResult:
        """Mean cross-entropy gradient at ``weights`` over the shard (``batch_size`` 0) or one random mini-batch."""
        ...

    def evaluate(self, weights: Params, batch_size: int = 1000) -> dict[str, float]:
        """Accuracy and mean loss of ``weights`` on the bound dataset: ``{"accuracy": .., "loss": ..}``."""
        ...


def local_state(trainer: object) -> Params:
    """The tensors of ``trainer``'s model that never leave the worker (FedBN's BatchNorm statistics, integer
    buffers such as ``num_batches_tracked``), by the framework's own names; empty for trainers that keep none."""
    get = getattr(trainer, "local_state", None)
    return get() if get is not None else {}


def set_local_state(trainer: object, state: Params) -> None:
    """Load ``state`` (from :func:`local_state` of a trainer of the same task and framework) into ``trainer``;
    names it does not have, or of another shape, are ignored."""
    put = getattr(trainer, "set_local_state", None)
    if put is not None and state:
        put(state)
