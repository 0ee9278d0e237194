"""The driver of the clock policies (``ssp:S`` and ``async``): hand out work as clocks allow, apply updates as
they arrive (or in groups of ``--buffer``), weighted by staleness.

Each application is one model version; for these policies the run's ``--rounds`` counts model versions and
``round`` in metrics.jsonl is the version. A worker's pull is held while its clock is more than S ahead of the
slowest live worker's, and released when that worker catches up, leaves or expires.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from fedctl.broker.rounds import evaluate, hand_out
from fedctl.wire import constants as C
from fedctl.wire.tensors import SparseTensor, Tensor

if TYPE_CHECKING:
    from fedctl.broker.policy import ClockPolicy
    from fedctl.broker.service import Broker
    from fedctl.strategies.base import AggregateResult, Params, Update

log = logging.getLogger(__name__)
CHECKPOINT_EVERY_S = 1.0
"""Async brokers apply hundreds of versions a second: they checkpoint at most this often (and after evaluations
and the last version). Updates applied since the last checkpoint keep their pending files, so a crash re-applies
them on top of that checkpoint — nothing acknowledged is lost."""


def as_change(update: Update, base: Params) -> Update:
    """A weights update as the change it makes to its base model (kind ``delta``), sparse entries kept sparse."""
    change: dict[str, Tensor] = {}
    for name, t in update.tensors.items():
        if isinstance(t, SparseTensor):  # a sparse weights update lists new values at its indices
            values = t.values.astype(np.float32) - base[name].reshape(-1)[t.indices]
            change[name] = SparseTensor(t.shape, t.indices, values)
        else:
            change[name] = np.asarray(t, np.float32) - base[name]
    return replace(update, tensors=change, kind=C.KIND_DELTA)


class ClockDriver:
    """Runs an SSP or async federation until ``rounds`` model versions exist or the target is reached."""

    def __init__(self, broker: Broker) -> None:
        self.b = broker
        self.policy: ClockPolicy = broker.policy  # type: ignore[assignment]
        self.started = time.monotonic() - float(broker.state.get("elapsed_s", 0.0))
        self.staleness: Counter[int] = Counter()
        self.unsaved: list[Update] = []
        self.unsaved_journal: list[dict[str, Any]] = []
        self.unsaved_metrics: list[dict[str, Any]] = []
        self.last_save = time.monotonic()

    async def run(self) -> dict[str, Any]:
        b = self.b
        last: dict[str, Any] = {}
        counts = self._counts()
        b.updates, b.restored = list(b.restored), []
        while not b.is_complete():
            b.changed.clear()
            await self._grant()
            if b.updates and (len(b.updates) >= self.policy.config.buffer or self.policy.busy() == 0):
                last = await self._apply(counts)
                counts = self._counts()
                continue
            try:
                async with asyncio.timeout(b.config.heartbeat_interval_s):
                    await b.changed.wait()
            except TimeoutError:
                pass
        await self._checkpoint()
        return {"rounds": b.state["round"], "version": b.store.version, "last": last, "rejected": dict(b.rejected),
                "clocks": dict(self.policy.clocks)}

    def _save(self, journal: list[dict[str, Any]], metrics: list[dict[str, Any]], committed: list[Update]) -> None:
        """In a thread: the checkpoint, the metrics lines logged since the last one, then the pending files of the
        updates it holds (file work stays off the event loop: while the disk syncs even an append or an unlink
        can block, and a second's worth of updates is a thousand of them)."""
        self.b.checkpointer.save(self.b.store, self.b.state, journal)
        for record in metrics:
            self.b.checkpointer.append_metrics(record, sync=False)
        if self.b.pending is not None:
            self.b.pending.remove_many((u.worker, u.round) for u in committed)

    async def _checkpoint(self) -> None:
        """Commit the model, state and journal of everything applied so far; then drop those pending files."""
        if not self.unsaved and self.unsaved_journal == [] and not self.unsaved_metrics:
            return
        metrics, self.unsaved_metrics = self.unsaved_metrics, []
        await asyncio.to_thread(self._save, list(self.unsaved_journal), metrics, list(self.unsaved))
        self.unsaved, self.unsaved_journal = [], []
        self.last_save = time.monotonic()

    async def _grant(self) -> None:
        """Hand the model to every waiting worker whose clock is within the bound."""
        jobs = []
        for record in self.b.registry.waiting():
            if self.policy.may_start(record.worker):
                jobs.append((record, self.policy.assign(record.worker, self.b.store.version)))
        await hand_out(self.b, jobs)

    def _counts(self) -> tuple[int, int, int, int, float]:
        b = self.b
        return (b.transport.counters.bytes_in, b.transport.counters.bytes_out, b.bytes_in_by_type.get(C.PUSH, 0),
                b.bytes_out_by_type.get(C.MODEL, 0), time.perf_counter())

    def _combine(self, updates: list[Update], version: int, population: int) -> AggregateResult:
        """In a thread: staleness weights, weights updates turned into changes, then the strategy's rule."""
        b = self.b
        ready, scales = [], []
        limit = self.policy.config.max_staleness
        for u in updates:
            if version - u.base_version > limit:  # admission makes this impossible; never apply one anyway
                log.error("dropping an update %d versions old (limit %d)", version - u.base_version, limit)
                continue
            if u.kind == C.KIND_WEIGHTS:
                base = b.store.at(u.base_version)
                if base is None:  # fell out of the history while buffered: it cannot be applied
                    continue
                u = as_change(u, base)
            ready.append(u)
            scales.append(self.policy.weight(version - u.base_version))
        if not ready:
            from fedctl.strategies.base import AggregateResult

            return AggregateResult(b.store.weights, b.state["strategy_state"], {"updates": 0.0})
        return b.strategy.apply_async(b.store.weights, ready, scales, b.state["strategy_state"], b.rng, population)

    async def _apply(self, counts: tuple[int, int, int, int, float]) -> dict[str, Any]:
        b = self.b
        in0, out0, push0, model0, started = counts
        updates = sorted(b.updates, key=lambda u: (u.base_version, u.worker))
        b.updates = []
        version = b.store.version
        taus = [version - u.base_version for u in updates]
        self.staleness.update(taus)
        b.applying = True
        try:
            population = sum(r.num_examples for r in b.registry.all() if r.worker in self.policy.live)
            result = await asyncio.to_thread(self._combine, updates, version, population)
            b.store.replace(result.weights)
        finally:
            b.applying = False
        b.state["round"] = b.store.version
        b.state["strategy_state"] = result.state
        b.state["clocks"] = dict(self.policy.clocks)
        b.state["elapsed_s"] = time.monotonic() - self.started
        b.applied_total += len(updates)
        eval_started = time.perf_counter()
        evaluation = await self._evaluate(b.store.version)
        n = sum(u.num_examples for u in updates)
        held = sum(1 for r in b.registry.waiting() if not self.policy.may_start(r.worker))
        record: dict[str, Any] = {
            "round": b.store.version, "version": b.store.version, "policy": self.policy.name,
            "test_accuracy": evaluation.get("accuracy"), "test_loss": evaluation.get("loss"),
            "train_loss": sum(u.metrics.get("train_loss", 0.0) * u.num_examples for u in updates) / max(n, 1),
            "participants": len(updates), "connected": len(b.registry),
            "staleness": taus, "min_clock": self.policy.min_clock(), "max_clock": self.policy.max_clock(),
            "held_pulls": held, "applied_total": b.applied_total, "refused_stale_total": b.stale_refused,
            "bytes_in": b.transport.counters.bytes_in - in0, "bytes_out": b.transport.counters.bytes_out - out0,
            "update_bytes_in": b.bytes_in_by_type.get(C.PUSH, 0) - push0,
            "model_bytes_out": b.bytes_out_by_type.get(C.MODEL, 0) - model0,
            "duration_s": round(eval_started - started, 4), "eval_s": round(time.perf_counter() - eval_started, 4),
            "elapsed_s": round(b.state["elapsed_s"], 3), "rejected_total": sum(b.rejected.values()),
            "strategy": dict(result.metrics)}
        self.unsaved += updates
        self.unsaved_journal += [{"version": b.store.version, "round": u.round, "worker": u.worker, "seq": u.seq,
                                  "base_version": u.base_version, "num_examples": u.num_examples, "staleness": tau}
                                 for u, tau in zip(updates, taus)]
        self.unsaved_metrics.append(record)
        if (record["test_accuracy"] is not None or b.is_complete()
                or time.monotonic() - self.last_save >= CHECKPOINT_EVERY_S):
            await self._checkpoint()
        if record["test_accuracy"] is not None or b.store.version % 50 == 0:
            acc = "-" if record["test_accuracy"] is None else f"{record['test_accuracy']:.4f}"
            log.info("version %d/%d  accuracy %s  clocks %s..%s  staleness %s  held %d", b.store.version,
                     b.config.rounds, acc, record["min_clock"], record["max_clock"], taus, held)
        if b.on_round is not None:
            b.on_round(record)
        return record

    async def _evaluate(self, version: int) -> dict[str, float]:
        return await evaluate(self.b, version, f"at model version {version}")
