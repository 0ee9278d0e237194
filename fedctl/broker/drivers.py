"""What the round and clock drivers share: the shell they run in (:class:`Host`), the registry that maps a policy
to its driver, counter snapshots, the one metrics-record builder and centralised evaluation.

A driver runs a federation's schedule — open a round or grant clocks, hand out the model, wait, aggregate,
evaluate, checkpoint — asking the core (:class:`~fedctl.broker.core.BrokerCore`) what the conversation allows and
the host for IO. It never sees a socket.
"""

from __future__ import annotations

import asyncio
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fedctl.broker import downlink, evaluation
from fedctl.broker.config import BrokerConfig
from fedctl.broker.core import BrokerCore
from fedctl.broker.durable import PendingStore
from fedctl.broker.effects import Effect
from fedctl.broker.params import Params
from fedctl.broker.registry import WorkerRecord
from fedctl.broker.store import Checkpointer
from fedctl.strategies.base import AggregateResult, Update

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Counters:
    """A snapshot of the broker's byte counters and clock, taken when a round (or version) starts."""

    bytes_in: int
    bytes_out: int
    update_bytes_in: int
    model_bytes_out: int
    at: float

    def since(self, before: Counters) -> dict[str, int]:
        return {"bytes_in": self.bytes_in - before.bytes_in, "bytes_out": self.bytes_out - before.bytes_out,
                "update_bytes_in": self.update_bytes_in - before.update_bytes_in,
                "model_bytes_out": self.model_bytes_out - before.model_bytes_out}


class Host(Protocol):
    """The IO shell a driver runs in (:class:`fedctl.broker.service.Broker`)."""

    core: BrokerCore
    config: BrokerConfig
    checkpointer: Checkpointer
    pending: PendingStore | None
    evaluator: Callable[[Params], dict[str, float]] | None
    on_round: Callable[[dict[str, Any]], None] | None
    ack_gate: asyncio.Event
    """Set while updates may be acknowledged: the durable writer waits on it before writing a group (the round
    driver clears it while a round's checkpoint and the next round's record are not yet durable)."""

    def now(self) -> float: ...

    def snapshot(self) -> Counters: ...

    async def wait_until(self, condition: Callable[[], bool], timeout_s: float | None = None) -> bool: ...

    async def hand_out(self, jobs: list[tuple[WorkerRecord, int]]) -> None: ...

    async def execute(self, effects: list[Effect]) -> None: ...


class Driver(ABC):
    """Runs one policy's schedule until the run is complete; returns the run's summary."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.core = host.core
        self.started = host.now() - float(self.core.state.get("elapsed_s", 0.0))
        self._warned_best = False

    @abstractmethod
    async def run(self) -> dict[str, Any]: ...

    def summary(self, last: dict[str, Any]) -> dict[str, Any]:
        return {"rounds": self.core.state["round"], "version": self.core.store.version, "last": last,
                "rejected": dict(self.core.rejected)}

    async def evaluate(self, number: int, where: str) -> dict[str, float]:
        """Centralised evaluation every ``eval_every`` rounds (sync) or model versions (ssp/async) and after the
        last; notes a reached target in the state, which ends the run."""
        host, config = self.host, self.host.config
        if host.evaluator is None or (number % config.eval_every and number < config.rounds):
            return {}
        evaluation = await asyncio.to_thread(host.evaluator, self.core.store.weights)
        if config.target_accuracy is not None and evaluation.get("accuracy", 0.0) >= config.target_accuracy:
            self.core.state["target_reached_at"] = number
            log.info("target accuracy %.4f reached %s; ending the run", config.target_accuracy, where)
        return evaluation

    async def fed_evaluate(self, number: int) -> dict[str, Any]:
        """Federated evaluation after round (or model version) ``number`` when due (every ``fed_eval_every`` and
        after the last): wait (up to ``round_timeout``) until max(⌈C·K⌉, 1) pulls wait, answer a sample of them
        with ``evaluate``, wait until every asked worker answered or the deadline; the ``fed_eval_*`` fields of the
        metrics line (none when it is off, nulls when not evaluated). No work is handed out meanwhile: under
        ssp/async it is a pause, during which the workers finish what they train and pull."""
        core, host, config = self.core, self.host, self.host.config
        every = config.fed_eval_every
        if not every:
            return {}
        skipped = skipped_fed_eval()
        if number % every and not core.is_complete():
            return skipped
        started = host.now()

        def enough() -> bool:
            return len(core.registry.waiting()) >= evaluation.sample_size(config.fed_eval_fraction,
                                                                            len(core.registry))

        await host.wait_until(enough, config.sync.round_timeout_s)
        waiting = {r.worker: r for r in core.registry.waiting()}
        records = [waiting[w] for w in core.evaluations.sample(list(waiting), len(core.registry), core.rng)]
        if not records:
            log.warning("round %d: no worker waited for work; no federated evaluation", number)
            return skipped
        downlinks = await asyncio.to_thread(downlink.build, core, records)
        await host.execute(core.open_evaluation(number, records, downlinks, host.now()))
        await host.wait_until(lambda: core.evaluations.complete(host.now()), core.evaluations.time_left(host.now()))
        closed = core.evaluations.close()
        assert closed is not None
        summary = {**closed.summary(), "fed_eval_s": round(host.now() - started, 4)}
        acc, loss = summary["fed_eval_accuracy"], summary["fed_eval_loss"]
        log.info("round %d federated evaluation: accuracy %s  loss %s  on %d examples of %d/%d workers (%s)", number,
                 "-" if acc is None else f"{acc:.4f}", "-" if loss is None else f"{loss:.4f}",
                 summary["fed_eval_examples"], summary["fed_eval_workers"], len(closed.asked),
                 "all answered" if not closed.outstanding() else f"{len(closed.outstanding())} did not answer")
        return summary

    def best_rule(self) -> tuple[str, str] | None:
        """``(metric, mode)`` the best model is chosen by: ``--best-metric`` (``none``: no best model), or by default
        ``test_accuracy`` when the broker evaluates, else ``fed_eval_accuracy`` (federated evaluation); ``--best-mode``,
        by default ``min`` for a loss and ``max`` for anything else."""
        config = self.host.config
        if config.best_metric == "none":
            return None
        metric = config.best_metric or ("test_accuracy" if self.host.evaluator is not None else "fed_eval_accuracy")
        return metric, config.best_mode or ("min" if "loss" in metric.rsplit(".", 1)[-1] else "max")

    async def keep_best(self, record: dict[str, Any]) -> None:
        """Save the current model as ``model-best.npz`` when ``record`` (this round's complete metrics line, for the
        current model) improves on the best one by :meth:`best_rule`; rounds without the metric are skipped."""
        rule = self.best_rule()
        if rule is None:
            return
        metric, mode = rule
        try:
            value = metric_value(record, metric)
        except KeyError:
            if self.host.config.best_metric and not self._warned_best:  # a typo'd name, not a round left out
                self._warned_best = True
                log.warning("--best-metric %s is in no metrics record (they hold e.g. %s); no best model is kept",
                            metric, ", ".join(k for k in record if k.endswith(("accuracy", "loss"))))
            return
        if value is None:
            return
        checkpointer = self.host.checkpointer
        if not checkpointer.improves(metric, mode, value):
            return
        weights = self.core.store.at(record["version"])
        if weights is None:  # never save another version's weights under this record's value
            log.warning("the model of version %d is gone; it cannot be kept as the best", record["version"])
            return
        meta = {"round": record["round"], "version": record["version"], "metric": metric, "mode": mode,
                "value": value, "run_id": self.core.state.get("run_id")}
        # Versions are immutable (an aggregation installs new arrays), so the thread reads a stable snapshot.
        await asyncio.to_thread(checkpointer.save_best, weights, meta)
        log.info("best model so far: %s %s %.6g at round %d (model-best.npz)", metric, mode, value, record["round"])

    def record(self, updates: Sequence[Update], before: Counters, eval_started: float, evaluation: dict[str, float],
               result: AggregateResult, **extra: Any) -> dict[str, Any]:
        """The metrics line of one round (sync) or model version (ssp/async)."""
        core, now = self.core, self.host.now()
        n = sum(u.num_examples for u in updates)
        return {"round": core.state["round"], "version": core.store.version, **test_fields(evaluation),
                "train_loss": sum(u.metrics.get("train_loss", 0.0) * u.num_examples for u in updates) / max(n, 1),
                "participants": len(updates), "connected": len(core.registry), **extra,
                **self.host.snapshot().since(before),
                "duration_s": round(eval_started - before.at, 4), "eval_s": round(now - eval_started, 4),
                "elapsed_s": round(core.state["elapsed_s"], 3), "rejected_total": sum(core.rejected.values()),
                "strategy": dict(result.metrics)}


DRIVERS: dict[str, type[Driver]] = {}
"""Driver classes by the name a policy gives as its ``driver``."""


def register(name: str) -> Callable[[type[Driver]], type[Driver]]:
    def add(cls: type[Driver]) -> type[Driver]:
        DRIVERS[name] = cls
        return cls
    return add


def test_fields(evaluation: dict[str, float]) -> dict[str, Any]:
    """The ``test_*`` fields of a metrics line from a central evaluation (null when none ran); a task's own metrics
    (docs/tasks.md) land beside accuracy and loss as ``test_<name>``."""
    others = {f"test_{k}": v for k, v in evaluation.items() if k not in ("accuracy", "loss", "num_examples")}
    return {"test_accuracy": evaluation.get("accuracy"), "test_loss": evaluation.get("loss"), **others}


def skipped_fed_eval() -> dict[str, Any]:
    """The ``fed_eval_*`` fields of a line whose round had no federated evaluation (all null)."""
    return {**evaluation.empty_summary(), "fed_eval_s": None}


def mean_metrics(updates: Sequence[Update]) -> dict[str, float]:
    """Mean over the updates of each metric the workers reported (loss, kept elements, time...)."""
    keys = sorted({k for u in updates for k in u.metrics})
    return {k: round(sum(float(u.metrics.get(k, 0.0)) for u in updates) / max(len(updates), 1), 6) for k in keys}


def metric_value(record: dict[str, Any], name: str) -> float | None:
    """The number ``name`` names in a metrics record (a dotted name reaches into a nested map, e.g.
    ``update_metrics.train_accuracy``): None when it is null or not a finite number; KeyError when it is absent."""
    value: Any = record
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(name)
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def applied_entry(u: Update) -> dict[str, Any]:
    """An update's line in the journal (the checkpointer adds the version)."""
    return {"round": u.round, "worker": u.worker, "seq": u.seq, "base_version": u.base_version,
            "num_examples": u.num_examples}
