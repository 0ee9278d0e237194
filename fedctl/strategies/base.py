"""The strategy interface: a worker-side update rule and a broker-side aggregation, side by side, pure numpy.

A strategy never does I/O, never reads a clock and draws randomness only from the generator it is given.
The worker side receives a :class:`~fedctl.worker.frameworks.base.Trainer`-like object for the framework work
(gradients, local SGD); the broker side sees numpy arrays only.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Protocol

import numpy as np

from fedctl.errors import ConfigError
from fedctl.strategies.kernels import example_weights, weighted_sum_sparse
from fedctl.wire.tensors import SparseTensor, Tensor

Params = dict[str, np.ndarray]
EXTRA_TENSORS = "extra_tensors"
"""Key of the ``task`` map a worker hands :meth:`Strategy.client_update`: the extra tensors the model message
carried (``<prefix>/<tensor name>`` for the prefixes of :attr:`Strategy.extra_downlink`, docs/protocol.md §5.6), set
by the worker (never read from the wire's task map)."""
ROUND_WORKERS = "round_workers"
"""Key of the state the sync round driver passes to :meth:`Strategy.aggregate`: the number of workers connected
when the round opened (at least those it sampled), SCAFFOLD's N. The driver removes it from the returned state, so
it is never checkpointed; absent when the caller does not know it (direct calls, unit tests)."""


@dataclass(frozen=True)
class TaskConfig:
    """What a sampled worker must do in a round: E local epochs, batch size B (0 = the whole shard), rate η.

    ``lr_decay`` makes the rate a schedule: round r (1-based) uses η · lr_decay^(r−1); 1.0 keeps it constant.
    """

    epochs: int = 1
    batch_size: int = 10
    lr: float = 0.1
    lr_decay: float = 1.0
    options: Mapping[str, Any] = field(default_factory=dict)
    """Strategy-specific settings (``--opt key=value``), checked against the strategy's ``options`` table."""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}", "pass --epochs 1 or more")
        if self.batch_size < 0:
            raise ConfigError(f"batch size must be >= 0 (0 = whole shard), got {self.batch_size}",
                              "pass --batch-size 0 for B=∞ or a positive batch size")
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be positive, got {self.lr}", "pass e.g. --lr 0.1")
        if not 0 < self.lr_decay <= 1:
            raise ConfigError(f"lr decay must be in (0, 1], got {self.lr_decay}",
                              "pass --lr-decay 1 for a constant rate or e.g. 0.999 to shrink it each round")

    def lr_at(self, step: int) -> float:
        """The learning rate of the ``step``-th round (0-based): η · lr_decay^step."""
        return self.lr * self.lr_decay ** max(step, 0)


@dataclass(frozen=True)
class Option:
    """One strategy setting: its type (int, float, str or bool), default, help and an optional check."""

    type: type
    default: Any
    help: str
    check: Callable[[Any], bool] | None = None
    check_help: str = ""

    def parse(self, name: str, raw: Any) -> Any:
        """The value of ``raw`` (a string from the command line, or already typed) as this option's type."""
        try:
            if self.type is bool and isinstance(raw, str):
                if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(raw)
                value: Any = raw.lower() in ("1", "true", "yes", "on")
            elif self.type is float and isinstance(raw, str) and raw.lower() in ("inf", "infinity"):
                value = math.inf
            else:
                value = self.type(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"option {name}={raw!r} is not a valid {self.type.__name__}",
                              f"pass --opt {name}=<{self.type.__name__}> ({self.help})") from None
        if self.check is not None and not self.check(value):
            raise ConfigError(f"option {name}={raw!r} is out of range", f"{name} must be {self.check_help}")
        return value


@dataclass(frozen=True)
class Update:
    """One worker's contribution to a round, as the broker received it.

    ``tensors`` may hold :class:`~fedctl.wire.tensors.SparseTensor` values (sparse or fp16 uploads); the kernels
    in :mod:`fedctl.strategies.kernels` accept both, so no update is densified on its own.
    """

    worker: str
    num_examples: int
    tensors: Mapping[str, Tensor]
    kind: str
    base_version: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)
    round: int = 0
    """The round (sync) or clock tick (ssp/async) the update answers, and the worker's sequence number: with
    ``worker`` they identify it, so a resent update is never applied twice."""
    seq: int = 0

    @classmethod
    def from_push(cls, worker: str, header: Any, tensors: Mapping[str, Tensor]) -> Update:
        """The update a validated ``push`` header (docs/protocol.md §5.4) from ``worker`` carries, with ``tensors``
        (its frames, or the spool of a chunked push)."""
        return cls(worker, header["num_examples"], tensors, header["kind"], header["base_version"],
                   dict(header.get("metrics") or {}), header["round"], header["seq"])


@dataclass(frozen=True)
class ClientResult:
    """What the worker side of a strategy returns: the tensors to push, their kind and the new local state.

    ``state`` is the worker's private, persistent strategy state (e.g. DGC's residuals and momentum): named numpy
    arrays the worker keeps between rounds, saves with its state dir and passes back to the next client_update.
    It never leaves the worker.
    """

    kind: str
    tensors: Mapping[str, Tensor]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    state: Params = field(default_factory=dict)


@dataclass(frozen=True)
class AggregateResult:
    """New global weights, the strategy's new broker state and metrics of the aggregation."""

    weights: Params
    state: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


class LocalTrainer(Protocol):
    """The two framework operations strategies need (see fedctl.worker.frameworks.base.Trainer)."""

    def fit(self, weights: Params, epochs: int, batch_size: int, lr: float, seed: int, prox_mu: float = 0.0,
            grad_offset: Params | None = None) -> Any: ...

    def gradient(self, weights: Params, batch_size: int, seed: int) -> Any: ...


class Strategy(ABC):
    """Base class of federated algorithms. Subclasses set ``name`` and ``update_kind`` and register themselves."""

    name: ClassVar[str]
    update_kind: ClassVar[str]
    options: ClassVar[Mapping[str, Option]] = {}
    """The strategy's settings; ``TaskConfig.options`` may set any of them and nothing else."""
    policies: ClassVar[tuple[str, ...]] = ("sync", "ssp", "async")
    """The consistency policies (``--policy`` names: ``sync``, ``ssp``, ``async``) the algorithm is defined for; the
    broker refuses a run under any other at start (:meth:`check_policy`)."""
    extra_downlink: ClassVar[tuple[str, ...]] = ()
    """Prefixes of the extra tensors the broker adds to each ``model`` message (:meth:`downlink_extra`): for each, one
    dense float32 tensor ``<prefix>/<name>`` per model tensor (docs/protocol.md §5.6; SCAFFOLD's ``scaffold.c``)."""
    extra_uplink: ClassVar[tuple[str, ...]] = ()
    """Prefixes of the extra tensors every ``push`` of the run must carry besides the update, one per model tensor
    each, validated by the broker against the model and kept in :attr:`Update.tensors` (SCAFFOLD's ``scaffold.dc``)."""

    hierarchical: ClassVar[bool] = True
    """Whether an edge broker may stand for a group of this strategy's workers with one merged update
    (:meth:`merge`); where the broker side's rule needs each worker's own update it is False, and
    :meth:`check_hierarchical` refuses."""

    def __init__(self, task: TaskConfig) -> None:
        self.task = task
        unknown = sorted(set(task.options) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise ConfigError(f"strategy {self.name!r} has no option {unknown[0]!r}",
                              f"its options are: {known} (see `fedctl strategies`)")
        self.opts: dict[str, Any] = {k: o.parse(k, task.options[k]) if k in task.options else o.default
                                     for k, o in self.options.items()}

    @classmethod
    def check_policy(cls, policy: str) -> None:
        """Raise ConfigError unless the policy named ``policy`` (``sync``, ``ssp`` or ``async``) is one of
        :attr:`policies`."""
        if policy not in cls.policies:
            supported = " or ".join(cls.policies)
            raise ConfigError(f"strategy {cls.name!r} is defined for --policy {supported} only, not {policy}",
                              f"pass --policy {cls.policies[0]}, or a strategy that runs under {policy} "
                              "(`fedctl strategies` lists each one's policies)")

    def why_not_hierarchical(self) -> str | None:
        """Why an edge broker cannot merge this strategy's updates with these options (None: it can)."""
        if not self.hierarchical:
            return "its broker side needs every worker's own update"
        return None

    def check_hierarchical(self) -> None:
        """Raise ConfigError unless an edge broker can stand for a group of workers (:meth:`merge`)."""
        reason = self.why_not_hierarchical()
        if reason is not None:
            raise ConfigError(f"strategy {self.name!r} cannot run behind edge brokers: {reason}",
                              "run it on one broker (no --upstream), or pick a strategy an edge can merge "
                              "(`fedctl strategies`)")

    def merge(self, updates: Sequence[Update]) -> ClientResult:
        """Edge side (hierarchical aggregation, docs/architecture.md): one update that stands for ``updates`` at the
        parent broker, so that aggregating it among the parent's other updates equals aggregating every one of
        ``updates`` there directly — to float tolerance, since the merged tensors travel as float32.

        The default is right for every strategy whose broker side starts from the example-weighted mean of the
        round's updates (FedAvg, FedSGD, DGC, FedProx, the server optimisers): that mean over n = Σ n_k, carried
        with ``num_examples`` n, so the parent's weights n_e / Σ n_e recompose the flat weights n_k / Σ n_k. Sparse
        uploads stay sparse (the union of their indices) while that is smaller than dense. Metrics are
        example-weighted means."""
        self.check_hierarchical()
        return merged(updates, example_weights([u.num_examples for u in updates]).tolist())

    def task_for_round(self, round_no: int, seed: int) -> dict[str, Any]:
        """The ``task`` map of the model message: everything a worker needs to run :meth:`client_update`.

        Subclasses may add per-round fields (e.g. DGC's sparsity of the warm-up schedule).
        """
        task: dict[str, Any] = {"strategy": self.name, "kind": self.update_kind, "epochs": self.task.epochs,
                                "batch_size": self.task.batch_size, "lr": self.task.lr_at(round_no - 1),
                                "seed": seed, "round": round_no}
        if self.opts:
            task["options"] = {k: (str(v) if isinstance(v, float) and math.isinf(v) else v)
                               for k, v in self.opts.items()}
        return task

    @abstractmethod
    def client_update(self, weights: Params, trainer: LocalTrainer, task: Mapping[str, Any],
                      state: Mapping[str, np.ndarray]) -> ClientResult:
        """Worker side: compute the update to push from the global ``weights`` and the round's ``task``.

        ``state`` is what the previous call returned as ``ClientResult.state`` (empty on a worker's first round).
        """

    @abstractmethod
    def aggregate(self, weights: Params, updates: Sequence[Update], state: dict[str, Any],
                  rng: np.random.Generator) -> AggregateResult:
        """Broker side: combine the round's updates into new global weights."""

    def apply_async(self, weights: Params, updates: Sequence[Update], scales: Sequence[float],
                    state: dict[str, Any], rng: np.random.Generator, population: int = 0) -> AggregateResult:
        """Broker side under SSP / async: apply updates computed on older model versions as they arrive.

        ``scales`` are the staleness weights (1 + τ)^−a, one per update; ``population`` is the number of examples
        of all live workers (the n of a synchronous round with C = 1). A ``weights`` update arrives here as the
        change from its base model (kind ``delta``). The default scales each update and applies the strategy's own
        rule (``aggregate``), which is right for gradients and deltas; strategies that aggregate ``weights``
        override it.
        """
        scaled = [replace(u, tensors=scale_tensors(u.tensors, s)) for u, s in zip(updates, scales)]
        return self.aggregate(weights, scaled, state, rng)

    def downlink_extra(self, weights: Params, state: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The extra tensors of the ``model`` messages handed out now, named ``<prefix>/<tensor name>`` for each
        prefix of :attr:`extra_downlink`, from the broker's ``state``; they go whole in every ``model`` message (not
        in ``evaluate``). The default, for strategies that declare none, is nothing."""
        return {}

    def downlink(self, current: Params, base: Params | None) -> dict[str, Tensor] | None:
        """What to send a worker that holds ``base`` (None: it holds nothing) so that it gets ``current``.

        Returns replacement tensors: a dense array replaces the whole tensor, a SparseTensor replaces the entries
        at its indices (values are the new values, not differences, so the worker's copy equals ``current``
        bit for bit). The default sends exactly the entries that changed, each tensor sparse when that is smaller
        than dense; None means "send the dense model". A strategy may send less (Selective SGD's θ_d).
        """
        if base is None:
            return None
        return exact_delta(current, base)


def merged(updates: Sequence[Update], coefficients: Sequence[float]) -> ClientResult:
    """Σ_k coefficients[k] · updates[k] as one update of their common kind, with Σ n_k examples and the
    example-weighted mean of each metric the updates report."""
    if not updates:
        raise ConfigError("cannot merge: no update")
    kinds = sorted({u.kind for u in updates})
    if len(kinds) != 1:
        raise ConfigError(f"cannot merge updates of different kinds ({', '.join(kinds)})",
                          "run every worker of the round with the same strategy")
    total = sum(u.num_examples for u in updates)
    metrics: dict[str, float] = {}
    for key in dict.fromkeys(k for u in updates for k in u.metrics):
        having = [u for u in updates if key in u.metrics]
        weight = sum(u.num_examples for u in having)
        if weight > 0:
            metrics[key] = sum(float(u.metrics[key]) * u.num_examples for u in having) / weight
    tensors = weighted_sum_sparse([u.tensors for u in updates], coefficients)
    return ClientResult(kinds[0], tensors, total, metrics)


def scale_tensors(tensors: Mapping[str, Tensor], scale: float) -> dict[str, Tensor]:
    """Every tensor times ``scale`` (sparse stays sparse; 1.0 returns them unchanged)."""
    if scale == 1.0:
        return dict(tensors)
    out: dict[str, Tensor] = {}
    for name, t in tensors.items():
        if isinstance(t, SparseTensor):
            out[name] = SparseTensor(t.shape, t.indices, (t.values.astype(np.float32) * np.float32(scale)))
        else:
            out[name] = np.asarray(t, np.float32) * np.float32(scale)
    return out


def exact_delta(current: Params, base: Params) -> dict[str, Tensor]:
    """Per tensor: the entries of ``current`` that differ from ``base`` as a SparseTensor of new values, or the
    dense tensor when at least a quarter of it changed (where sparse stops being smaller on the wire)."""
    out: dict[str, Tensor] = {}
    for name, new in current.items():
        flat_new, flat_old = new.reshape(-1), base[name].reshape(-1)
        changed = np.flatnonzero(flat_new != flat_old)
        if changed.size * 4 >= flat_new.size:
            out[name] = new
        else:
            out[name] = SparseTensor(tuple(new.shape), changed.astype(np.uint32 if flat_new.size < 2**32
                                                                      else np.uint64), flat_new[changed])
    return out
