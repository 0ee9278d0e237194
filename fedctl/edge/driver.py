"""The round driver of an edge broker: each of its rounds is one round of its parent's, run among the edge's own
workers, whose updates it merges into the one update it pushes up (docs/architecture.md "Edge brokers").

Per parent round: install the parent's model as the edge's next version, wait (up to ``--round-timeout``) until the
edge's policy opens a round with its fraction C of the edge's waiting workers, hand them the parent's task (a fresh
seed each), wait for the round to close (quorum, deadline), merge the updates (:meth:`Strategy.merge`) and give the
result to the uplink. The workers' pushes are acknowledged only once the parent answered the merged push: an update
a worker sees acknowledged has reached the parent. A failed round (no worker, or below the quorum by the deadline)
answers the parent with ``failed``; the workers' held pushes are answered ``STALE_UPDATE``.

The edge evaluates nothing and writes no checkpoint: its model is always the parent's. Its metrics line per round
(``metrics.jsonl`` in its state dir) counts its workers' bytes and the merge.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fedctl.broker.drivers import Counters, mean_metrics
from fedctl.broker.policy import OpenRound
from fedctl.broker.rounds import RoundDriver
from fedctl.edge.link import EdgeLink, EdgeOutcome, EdgeRound
from fedctl.errors import ConfigError
from fedctl.strategies import TaskConfig, get_strategy

log = logging.getLogger(__name__)


class EdgeDriver(RoundDriver):
    """Runs the parent's rounds handed over ``link`` among this edge's workers until the link closes (a sync
    round driver whose rounds the parent starts: its ``policy`` and ``_wait_close`` are the round driver's)."""

    def __init__(self, host: Any, link: EdgeLink) -> None:
        super().__init__(host)
        self.link = link
        self.core.hold_acks = True  # (a worker's ack waits for the parent's answer to the merged push)

    async def run(self) -> dict[str, Any]:
        core, host = self.core, self.host
        minimum = host.config.sync.min_workers
        log.info("edge: waiting for %d worker(s) before joining the parent", minimum)
        await host.wait_until(lambda: len(core.registry) >= minimum)
        examples = sum(r.num_examples for r in core.registry.all())
        self.link.ready.set_result(examples)
        last: dict[str, Any] = {}
        while (job := await self.link.rounds.get()) is not None:
            try:
                outcome, record = await self._round(job)
            except BaseException:
                job.outcome.cancel()
                raise
            if not job.outcome.done():
                job.outcome.set_result(outcome)
            if outcome.update is not None:
                last = await self._answered(job, outcome, record)
        return self.summary(last)

    def _check_task(self, job: EdgeRound) -> TaskConfig:
        task = job.task
        ours = self.core.strategy.name
        if task.get("strategy") != ours:
            raise ConfigError(f"the parent runs strategy {task.get('strategy')!r}, this edge was started with "
                              f"--strategy {ours}", f"start the edge with --strategy {task.get('strategy')} (and the "
                              "parent's --opt settings)")
        return TaskConfig(int(task["epochs"]), int(task["batch_size"]), float(task["lr"]),
                          options=dict(task.get("options") or {}))

    async def _round(self, job: EdgeRound) -> tuple[EdgeOutcome, dict[str, Any]]:
        core, host, policy = self.core, self.host, self.policy
        strategy = get_strategy(job.task["strategy"], self._check_task(job))
        strategy.check_hierarchical()
        number = core.state["round"] + 1
        before = host.snapshot()
        core.store.replace(job.weights)  # the parent's model is this round's version
        opened: list[OpenRound] = []

        def try_open() -> bool:
            got = core.try_open_round(number, host.now())
            if got is not None:
                opened.append(got)
            return got is not None

        if not await host.wait_until(try_open, host.config.sync.round_timeout_s):
            reason = (f"no round of the edge opened within --round-timeout {host.config.sync.round_timeout_s:g} s "
                      f"({len(core.registry)} worker(s) connected, {host.config.sync.min_workers} needed)")
            log.warning("parent round %d: %s", job.number, reason)
            return EdgeOutcome(None, reason), {}
        core.round_task = job.task
        records = [r for r in (core.registry.get(w) for w in opened[0].selected) if r is not None]
        await host.hand_out([(r, number) for r in records])
        await self._wait_close(opened[0])
        closed, ok = policy.close()
        updates = sorted(core.take_updates(), key=lambda u: u.worker)
        core.state["round"] = number
        if not ok or not updates:
            reason = (f"{len(closed.received)} of {len(closed.selected)} of the edge's sampled workers answered "
                      f"before its deadline (quorum {policy.quorum(closed)})")
            log.warning("parent round %d failed at the edge: %s", job.number, reason)
            await host.execute(core.refuse_held(number, f"round {job.number} failed at the edge: {reason}"))
            return EdgeOutcome(None, reason), {}
        merged = await asyncio.to_thread(strategy.merge, updates)
        core.applied_total += len(updates)
        record = self._record(job, updates, before, len(closed.selected), len(closed.failed))
        log.info("parent round %d: merged %d update(s) of %d sampled worker(s), %d examples", job.number,
                 len(updates), len(closed.selected), merged.num_examples)
        return EdgeOutcome(merged, workers=len(updates)), record

    def _record(self, job: EdgeRound, updates: Any, before: Counters, selected: int, failed: int) -> dict[str, Any]:
        n = sum(u.num_examples for u in updates)
        return {"round": self.core.state["round"], "parent_round": job.number, "version": self.core.store.version,
                "participants": len(updates), "selected": selected, "failed": failed,
                "connected": len(self.core.registry), "num_examples": n,
                "train_loss": sum(u.metrics.get("train_loss", 0.0) * u.num_examples for u in updates) / max(n, 1),
                "update_metrics": mean_metrics(updates), **self.host.snapshot().since(before),
                "duration_s": round(self.host.now() - before.at, 4)}

    async def _answered(self, job: EdgeRound, outcome: EdgeOutcome, record: dict[str, Any]) -> dict[str, Any]:
        """Wait for the parent's answer to the merged push, then answer this round's workers: acknowledged when
        the parent took it, ``STALE_UPDATE`` when it did not."""
        core, host = self.core, self.host
        number = core.state["round"]
        took = await job.answered
        if took:
            await host.execute(core.release_acks(number))
        else:
            await host.execute(core.refuse_held(number, f"the parent did not use round {job.number}'s update"))
        record = {**record, "forwarded": took}
        await asyncio.to_thread(host.checkpointer.append_metrics, record)
        core.last_round = record
        core.events.add(host.now(), "round", f"parent round {job.number}: {outcome.workers} update(s) merged, "
                        f"{'taken' if took else 'not used'} by the parent")
        if host.on_round is not None:
            host.on_round(record)
        return record
