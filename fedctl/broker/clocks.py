"""The driver of the clock policies (``ssp:S`` and ``async``): hand out work as clocks allow, apply updates as
they arrive (or in groups of ``--buffer``), weighted by staleness.

Each application is one model version; for these policies the run's ``--rounds`` counts model versions and
``round`` in metrics.jsonl is the version. A worker's pull is held while its clock is more than S ahead of the
slowest live worker's, and released when that worker catches up, leaves or expires.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any

import numpy as np

from fedctl.broker.drivers import Counters, Driver, applied_entry, register
from fedctl.broker.policy import ClockPolicy
from fedctl.strategies.base import AggregateResult, Params, Update
from fedctl.wire import constants as C
from fedctl.wire.tensors import SparseTensor, Tensor

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


@register("clocks")
class ClockDriver(Driver):
    """Runs an SSP or async federation until ``rounds`` model versions exist or the target is reached."""

    def __init__(self, host: Any) -> None:
        super().__init__(host)
        self.unsaved: list[Update] = []
        self.unsaved_journal: list[dict[str, Any]] = []
        self.unsaved_metrics: list[dict[str, Any]] = []
        self.last_save = host.now()

    @property
    def policy(self) -> ClockPolicy:
        policy = self.core.policy
        assert isinstance(policy, ClockPolicy)  # the registry maps only ssp/async to this driver
        return policy

    async def run(self) -> dict[str, Any]:
        core, host = self.core, self.host
        last: dict[str, Any] = {}
        before = host.snapshot()

        def ready() -> bool:
            return bool(core.updates) and (len(core.updates) >= self.policy.config.buffer or self.policy.busy() == 0)

        while not core.is_complete():
            await self._grant()
            if ready():
                last = await self._apply(before)
                before = host.snapshot()
                continue
            # Woken by any change; the timeout re-grants pulls held by a worker that has since expired.
            await host.wait_until(lambda: ready() or self._grantable(), host.config.heartbeat_interval_s)
        await self._checkpoint()
        return {**self.summary(last), "clocks": dict(self.policy.clocks)}

    def _save(self, journal: list[dict[str, Any]], metrics: list[dict[str, Any]], committed: list[Update]) -> None:
        """In a thread: the metrics lines logged since the last checkpoint, the checkpoint, then the pending files
        of the updates it holds (file work stays off the event loop: while the disk syncs even an append or an
        unlink can block, and a second's worth of updates is a thousand of them). The lines go first: a crash
        before the checkpoint's commit leaves lines of versions it does not hold, which the restart drops and
        redoes; the other order would lose the lines of versions it holds."""
        host = self.host
        if metrics:
            host.checkpointer.append_metrics(*metrics)
        host.checkpointer.save(self.core.store, self.core.state, journal)
        if host.pending is not None:
            host.pending.remove_many((u.worker, u.round) for u in committed)

    async def _checkpoint(self) -> None:
        """Commit the model, state and journal of everything applied so far; then drop those pending files."""
        if not self.unsaved and not self.unsaved_journal and not self.unsaved_metrics:
            return
        metrics, self.unsaved_metrics = self.unsaved_metrics, []
        await asyncio.to_thread(self._save, list(self.unsaved_journal), metrics, list(self.unsaved))
        self.unsaved, self.unsaved_journal = [], []
        self.last_save = self.host.now()
        self.core.events.add(self.last_save, "checkpoint", f"checkpoint of version {self.core.store.version} written")

    def _grantable(self) -> bool:
        return any(self.policy.may_start(r.worker) for r in self.core.registry.waiting())

    async def _grant(self) -> None:
        """Hand the model to every waiting worker whose clock is within the bound."""
        jobs = [(r, self.policy.assign(r.worker, self.core.store.version))
                for r in self.core.registry.waiting() if self.policy.may_start(r.worker)]
        await self.host.hand_out(jobs)

    def _combine(self, updates: list[Update], version: int, population: int) -> AggregateResult:
        """In a thread: staleness weights, weights updates turned into changes, then the strategy's rule."""
        core = self.core
        ready, scales = [], []
        limit = self.policy.config.max_staleness
        for u in updates:
            if version - u.base_version > limit:  # admission makes this impossible; never apply one anyway
                log.error("dropping an update %d versions old (limit %d)", version - u.base_version, limit)
                continue
            if u.kind == C.KIND_WEIGHTS:
                base = core.store.at(u.base_version)
                if base is None:  # fell out of the history while buffered: it cannot be applied
                    continue
                u = as_change(u, base)
            ready.append(u)
            scales.append(self.policy.weight(version - u.base_version))
        if not ready:
            return AggregateResult(core.store.weights, core.state["strategy_state"], {"updates": 0.0})
        return core.strategy.apply_async(core.store.weights, ready, scales, core.state["strategy_state"], core.rng,
                                         population)

    async def _apply(self, before: Counters) -> dict[str, Any]:
        core, host = self.core, self.host
        updates = sorted(core.start_apply(), key=lambda u: (u.base_version, u.worker))
        version = core.store.version
        taus = [version - u.base_version for u in updates]
        population = sum(r.num_examples for r in core.registry.all() if r.worker in self.policy.live)
        try:
            result = await asyncio.to_thread(self._combine, updates, version, population)
        except BaseException:
            core.finish_apply(None, 0)
            raise
        core.finish_apply(result.weights, len(updates))
        core.state["round"] = core.store.version
        core.state["strategy_state"] = result.state
        core.state["clocks"] = dict(self.policy.clocks)
        core.state["elapsed_s"] = host.now() - self.started
        eval_started = host.now()
        evaluation = await self.evaluate(core.store.version, f"at model version {core.store.version}")
        fed = await self.fed_evaluate(core.store.version)
        held = sum(1 for r in core.registry.waiting() if not self.policy.may_start(r.worker))
        record = self.record(updates, before, eval_started, evaluation, result, policy=self.policy.name,
                             staleness=taus, min_clock=self.policy.min_clock(), max_clock=self.policy.max_clock(),
                             held_pulls=held, applied_total=core.applied_total,
                             refused_stale_total=core.rejected.get("STALE_UPDATE", 0), **fed)
        self.unsaved += updates
        self.unsaved_journal += [{**applied_entry(u), "staleness": tau} for u, tau in zip(updates, taus)]
        self.unsaved_metrics.append(record)
        evaluated = record["test_accuracy"] is not None or record.get("fed_eval_accuracy") is not None
        if (evaluated or core.is_complete()
                or host.now() - self.last_save >= CHECKPOINT_EVERY_S):
            await self._checkpoint()
        if evaluated or core.store.version % 50 == 0:
            acc = "-" if record["test_accuracy"] is None else f"{record['test_accuracy']:.4f}"
            log.info("version %d/%d  accuracy %s  clocks %s..%s  staleness %s  held %d", core.store.version,
                     host.config.rounds, acc, record["min_clock"], record["max_clock"], taus, held)
            core.events.add(host.now(), "round", f"version {core.store.version}/{host.config.rounds}: accuracy {acc}, "
                            f"clocks {record['min_clock']}..{record['max_clock']}")
        await self.keep_best(record)
        core.last_round = record
        if host.on_round is not None:
            host.on_round(record)
        return record
