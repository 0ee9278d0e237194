"""The strategy interface: a worker-side update rule and a broker-side aggregation, side by side, pure numpy.

A strategy never does I/O, never reads a clock and draws randomness only from the generator it is given.
The worker side receives a :class:`~fedctl.worker.frameworks.base.Trainer`-like object for the framework work
(gradients, local SGD); the broker side sees numpy arrays only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

from fedctl.errors import ConfigError

Params = dict[str, np.ndarray]


@dataclass(frozen=True)
class TaskConfig:
    """What a sampled worker must do in a round: E local epochs, batch size B (0 = the whole shard), rate η."""

    epochs: int = 1
    batch_size: int = 10
    lr: float = 0.1

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}", "pass --epochs 1 or more")
        if self.batch_size < 0:
            raise ConfigError(f"batch size must be >= 0 (0 = whole shard), got {self.batch_size}",
                              "pass --batch-size 0 for B=∞ or a positive batch size")
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be positive, got {self.lr}", "pass e.g. --lr 0.1")


@dataclass(frozen=True)
class Update:
    """One worker's contribution to a round, as the broker received it."""

    worker: str
    num_examples: int
    tensors: Mapping[str, np.ndarray]
    kind: str
    base_version: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientResult:
    """What the worker side of a strategy returns: the tensors to push and their kind."""

    kind: str
    tensors: Params
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class AggregateResult:
    """New global weights, the strategy's new broker state and metrics of the aggregation."""

    weights: Params
    state: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


class LocalTrainer(Protocol):
    """The two framework operations strategies need (see fedctl.worker.frameworks.base.Trainer)."""

    def fit(self, weights: Params, epochs: int, batch_size: int, lr: float, seed: int) -> Any: ...

    def gradient(self, weights: Params, batch_size: int, seed: int) -> Any: ...


class Strategy(ABC):
    """Base class of federated algorithms. Subclasses set ``name`` and ``update_kind`` and register themselves."""

    name: ClassVar[str]
    update_kind: ClassVar[str]

    def __init__(self, task: TaskConfig) -> None:
        self.task = task

    def task_for_round(self, round_no: int, seed: int) -> dict[str, Any]:
        """The ``task`` map of the model message: everything a worker needs to run :meth:`client_update`."""
        return {"strategy": self.name, "kind": self.update_kind, "epochs": self.task.epochs,
                "batch_size": self.task.batch_size, "lr": self.task.lr, "seed": seed}

    @abstractmethod
    def client_update(self, weights: Params, trainer: LocalTrainer, task: Mapping[str, Any]) -> ClientResult:
        """Worker side: compute the update to push from the global ``weights`` and the round's ``task``."""

    @abstractmethod
    def aggregate(self, weights: Params, updates: Sequence[Update], state: dict[str, Any],
                  rng: np.random.Generator) -> AggregateResult:
        """Broker side: combine the round's updates into new global weights."""
