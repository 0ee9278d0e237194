"""The driver of the sync policy: open a round, hand out the model, wait, aggregate, evaluate (centrally and, with
``--fed-eval-every``, on the workers' held-out data), checkpoint."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fedctl.broker.drivers import Counters, Driver, applied_entry, mean_metrics, register, skipped_fed_eval, test_fields
from fedctl.broker.policy import OpenRound, SyncRoundPolicy
from fedctl.broker.registry import WorkerRecord
from fedctl.broker.store import ModelSnapshot
from fedctl.strategies.base import ROUND_WORKERS, Update
from fedctl.strategies.kernels import from_change_vector

log = logging.getLogger(__name__)

UNRECORDED = "unrecorded"
"""state.json's copy of its round's metrics line before the evaluations (see RoundDriver._recover_record)."""


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


@register("rounds")
class RoundDriver(Driver):
    """Drives rounds ``state['round'] + 1 … rounds`` of one broker."""

    population = 0
    """Workers connected when the open round sampled its own (DP accounting's K)."""
    _committing: asyncio.Future[None] | None = None
    """Writing the last aggregated round's checkpoint (and its metrics line), overlapped with the next hand-out."""
    _forgetting: asyncio.Task[None] | None = None
    """Deleting a committed round's pending updates, off the critical path (see :meth:`_forget_committed`)."""

    def _forget_committed(self, number: int) -> None:
        """Delete the pending updates of committed round ``number`` in a thread while the next round runs: the
        checkpoint already holds them, and a broker restarted before they are gone forgets them anyway (they
        belong to a committed round, docs/architecture.md). Its round file is left to be replaced by the next
        round's."""
        pending = self.host.pending
        assert pending is not None
        previous = self._forgetting

        async def forget() -> None:
            if previous is not None:
                await previous
            await asyncio.to_thread(pending.forget_through, number)

        self._forgetting = asyncio.ensure_future(forget())

    async def _forgotten(self) -> None:
        if self._forgetting is not None:
            await self._forgetting
            self._forgetting = None

    @property
    def policy(self) -> SyncRoundPolicy:
        policy = self.core.policy
        assert isinstance(policy, SyncRoundPolicy)  # the registry maps only sync to this driver
        return policy

    async def run(self) -> dict[str, Any]:
        try:
            return await self._run()
        finally:  # stopped or failed: the checkpoint and deletions still in flight are abandoned (each is atomic)
            for task in (self._committing, self._forgetting):
                if task is not None and not task.done():
                    task.cancel()

    async def _recover_record(self) -> None:
        """After a restart, make the committed round's metrics line stand, then read from it whether that round
        reached ``--target-accuracy`` (the checkpoint is copied before the evaluations, so only the line knows).

        When the line is missing (the broker stopped between writing the checkpoint and the line), it is written
        from the checkpoint's copy, with the central evaluation done again on the restored model (the same weights,
        so the same figures) and ``"recovered": true``; the federated evaluation is not redone (its fields null)."""
        core, host = self.core, self.host
        stub = core.state.pop(UNRECORDED, None)
        number = int(core.state["round"])
        if number == 0:
            return
        recorded = await asyncio.to_thread(host.checkpointer.read_metrics)
        line = next((r for r in reversed(recorded) if r.get("round") == number), None)
        if line is None and isinstance(stub, dict) and stub.get("round") == number:
            started = host.now()
            evaluation = await self.evaluate(number, f"in round {number}, evaluated again")
            fed = skipped_fed_eval() if host.config.fed_eval_every else {}
            line = {**stub, **test_fields(evaluation), **fed, "eval_s": round(host.now() - started, 4),
                    "recovered": True}
            await asyncio.to_thread(host.checkpointer.append_metrics, line)
            log.warning("round %d's metrics line was lost when the broker stopped after its checkpoint; written "
                        "again from the checkpoint (accuracy %s, evaluated again; federated evaluation not redone)",
                        number, "-" if line["test_accuracy"] is None else f"{line['test_accuracy']:.4f}")
            await self.keep_best(line)
        if line is None:
            return
        core.last_round = line
        target, accuracy = host.config.target_accuracy, line.get("test_accuracy")
        if target is not None and accuracy is not None and accuracy >= target:
            core.state["target_reached_at"] = number
            log.info("round %d reached the target accuracy %.4f before the restart (%.4f): the run is complete",
                     number, target, accuracy)

    async def _run(self) -> dict[str, Any]:
        core, host = self.core, self.host
        await self._recover_record()
        last: dict[str, Any] = dict(core.last_round or {})
        while not core.is_complete():
            round_no = core.state["round"] + 1
            before = host.snapshot()
            current = self.policy.current
            if current is not None and current.number == round_no:  # restored after a crash
                opened = current
                self.population = max(len(core.registry), len(opened.selected))
                log.info("round %d resumed: %d of %d sampled workers had answered", round_no, len(core.updates),
                         len(opened.selected))
            elif core.secure is not None:
                done = await self._secure_round(round_no, before)
                if done is not None:
                    last = done
                continue
            else:
                opened = await self._wait_open(round_no)
                if self._over_budget(opened):
                    break
                await self._open(opened)
            await self._wait_close(opened)
            closed, ok = self.policy.close()
            if not ok:
                log.warning("round %d failed: %d of %d sampled workers answered before the deadline (quorum %d); "
                            "retrying with a new sample", round_no, len(closed.received), len(closed.selected),
                            self.policy.quorum(closed))
                core.take_updates()
                core.events.add(host.now(), "failed", f"round {round_no} failed: {len(closed.received)} of "
                                f"{len(closed.selected)} sampled workers answered before the deadline; retrying")
                await host.execute(core.refuse_held(round_no, f"round {round_no} failed: {len(closed.received)} of "
                                                    f"{len(closed.selected)} sampled workers answered before its "
                                                    "deadline; the update was not used"))
                if host.pending is not None:
                    await self._forgotten()
                    await asyncio.to_thread(host.pending.clear)
                    host.ack_gate.set()
                continue
            last = await self._complete(closed, before)
        await self._committed()
        await self._forgotten()
        summary = self.summary(last)
        if core.dp is not None:
            eps = core.dp.epsilon()
            summary["dp"] = {"epsilon": eps, "delta": core.dp.config.delta, "rounds": len(core.dp.rounds)}
            log.info("differential privacy: the run's model is (ε = %.3f, δ = %g)-DP for each worker (%d noisy "
                     "rounds, noise multiplier %g)", eps, core.dp.config.delta, len(core.dp.rounds),
                     core.dp.config.noise_multiplier)
        return summary

    async def _open(self, opened: OpenRound) -> None:
        """Hand out the round's models while the previous round's checkpoint is still being written, then record
        the round (``pending/round.json``). Until both are durable no update of this round is acknowledged (the
        shell's durable writer waits on ``ack_gate``), so a crash in between loses nothing acknowledged: a restart
        finds the previous round still open with all its acknowledged updates, and completes it again."""
        host = self.host
        if host.pending is None:
            await self._hand_out(opened.number, opened.selected)
            return
        host.ack_gate.clear()
        try:
            await self._hand_out(opened.number, opened.selected)
            await self._committed()
            await asyncio.to_thread(host.pending.save_round, opened.number, opened.selected)
        finally:
            host.ack_gate.set()

    async def _wait_open(self, round_no: int) -> OpenRound:
        """Wait until the policy opens round ``round_no`` with the workers whose pulls wait (the K connected then
        are the population the round sampled from, for DP accounting)."""
        opened: list[OpenRound] = []

        def try_open() -> bool:
            got = self.core.try_open_round(round_no, self.host.now())
            if got is not None:
                opened.append(got)
                self.population = len(self.core.registry)
            return got is not None

        await self.host.wait_until(try_open)
        return opened[0]

    def _over_budget(self, opened: OpenRound) -> bool:
        """With ``--dp-target-epsilon``: end the run instead of running a round that would exceed it."""
        dp = self.core.dp
        eps = None if dp is None else dp.over_budget(self.population, len(opened.selected))
        if eps is None:
            return False
        self.policy.close()
        self.core.state["dp_budget_spent_at"] = opened.number - 1
        log.warning("differential privacy: round %d would take ε to %.3f, above --dp-target-epsilon %g; the run "
                    "ends after round %d", opened.number, eps, self.core.config.dp_target_epsilon, opened.number - 1)
        return True

    async def _hand_out(self, number: int, workers: Any) -> None:
        records = [r for r in (self.core.registry.get(w) for w in workers) if r is not None]
        await self.host.hand_out([(r, number) for r in records])

    async def _wait_close(self, opened: OpenRound) -> None:
        """Wait until the round can close, handing its model (again) to any selected worker that asks for it
        without holding it — one that restarted mid-round, or everyone after a broker restart."""
        core, host, policy = self.core, self.host, self.policy

        def again() -> list[WorkerRecord]:
            return [r for r in core.registry.waiting() if policy.needs_model(r.worker)]

        while True:
            await host.wait_until(lambda: policy.should_close(host.now()) or bool(again()),
                                  policy.time_left(host.now()))
            if policy.should_close(host.now()):
                return
            records = again()
            opened.handed.update(r.worker for r in records)
            await host.hand_out([(r, opened.number) for r in records])

    async def _secure_round(self, round_no: int, before: Counters) -> dict[str, Any] | None:
        """One try of round ``round_no`` with secure aggregation (docs/protocol.md §7.4): open it, hand out the
        model with a fresh attempt, close each stage when every live worker answered or at its deadline (the inputs
        at the round's), then apply the unmasked sum as the round's one update. None when the attempt was abandoned
        or fewer than the quorum's inputs were summed: the round is retried with a new sample and fresh keys."""
        core, host = self.core, self.host
        secure = core.secure
        assert secure is not None
        opened = await self._wait_open(round_no)
        if self._over_budget(opened):
            return None
        records = [r for r in (core.registry.get(w) for w in opened.selected) if r is not None]
        secure.open(round_no, [(r.worker, r.num_examples) for r in records], core.store.version)
        await host.hand_out([(r, round_no) for r in records])
        outcome = None
        unmask_s = 0.0
        while secure.current is not None:
            timeout = (self.policy.time_left(host.now()) if secure.stage() == "inputs"
                       else host.config.secagg_timeout_s)
            await host.wait_until(lambda: secure.stage_done({r.worker for r in core.registry.all()}), timeout)
            started = host.now()
            replies, outcome = secure.advance()
            unmask_s += host.now() - started
            await host.execute(core.secure_effects(replies))
        closed, _ = self.policy.close()
        quorum = max(self.policy.quorum(closed), 2)
        if outcome is None or len(outcome.workers) < quorum:
            log.warning("round %d failed: %s; retrying with a new sample and fresh keys", round_no,
                        "the secure-aggregation attempt was abandoned" if outcome is None else
                        f"{len(outcome.workers)} inputs were summed, the quorum is {quorum}")
            core.take_updates()
            core.events.add(host.now(), "failed", f"round {round_no} failed: secure aggregation "
                            f"{'attempt abandoned' if outcome is None else 'below its quorum'}; retrying")
            return None
        core.updates = [self._secure_update(round_no, outcome)]
        extra: dict[str, Any] = {}
        if core.dp is not None:  # distributed DP: the workers' noise is in the sum
            extra["dp"] = core.dp.record_distributed(self.population, len(records), len(outcome.workers))
            core.state["dp"] = core.dp.saved()
        return await self._complete(closed, before, participants=len(outcome.workers), secagg={
            "inputs": len(outcome.workers), "dropped": outcome.dropped, "clipped": outcome.clipped,
            "attempt": outcome.attempt, "attempts": secure.attempts, "abandoned": secure.aborted,
            "broker_s": round(unmask_s, 4)}, **extra)

    def _secure_update(self, round_no: int, outcome: Any) -> Update:
        """The round's one update: the survivors' weighted mean, as the strategy's kind (a mean of weight changes
        on top of the model they trained, or a mean gradient), counting all their examples."""
        core = self.core
        tensors = from_change_vector(core.spec, core.store.weights, core.strategy.update_kind, outcome.mean)
        return Update("secure-aggregate", outcome.num_examples, tensors, core.strategy.update_kind,
                      outcome.base_version, outcome.metrics, round_no, 0)

    async def _complete(self, closed: OpenRound, before: Counters, **extra: Any) -> dict[str, Any]:
        core, host = self.core, self.host
        # Arrival order is a race; summing in worker order makes a seeded run bit-reproducible.
        updates = sorted(core.take_updates(), key=lambda u: u.worker)
        aggregated = updates
        if core.dp is not None and core.secure is None:  # central DP: one update, the clipped and noised mean
            private, dp = await asyncio.to_thread(core.dp.private_update, core.spec, core.store.weights,
                                                  core.strategy.update_kind, updates, max(self.population, 1),
                                                  len(closed.selected), closed.number)
            extra = {**extra, "dp": dp}
            core.state["dp"] = core.dp.saved()
            aggregated = [private]
        # The state tells the strategy how many workers the round sampled from (SCAFFOLD's N); never saved.
        state = {**core.state["strategy_state"], ROUND_WORKERS: max(self.population, len(closed.selected))}
        result = await asyncio.to_thread(core.strategy.aggregate, core.store.weights, aggregated, state, core.rng)
        core.finish_apply(result.weights, len(aggregated))
        core.state["round"] = closed.number
        core.state["strategy_state"] = {k: v for k, v in result.state.items() if k != ROUND_WORKERS}
        core.state["elapsed_s"] = host.now() - self.started
        # The checkpoint is written while this round is evaluated and the next round's models go out; what it
        # writes is this round's, copied now. Its workers' acks wait for it (intake.py), and no update of the next
        # round is acknowledged before it is durable (see _open).
        store = ModelSnapshot(dict(core.store.weights), core.store.version)
        # The checkpoint also holds this round's metrics line as it stands before the evaluations: a crash after
        # the checkpoint and before the line is written leaves the round committed and its line missing, and the
        # restarted broker completes the line from this (see _recover_record).
        eval_started = host.now()
        unrecorded = self.record(updates, before, eval_started, {}, result, selected=len(closed.selected),
                                 failed=len(closed.failed), update_metrics=mean_metrics(updates), **extra)
        state = {**core.state, "strategy_state": dict(core.state.get("strategy_state") or {}),
                 UNRECORDED: unrecorded}
        applied = [applied_entry(u) for u in updates]
        previous = self._committing

        async def save() -> None:
            if previous is not None:
                await previous
            await asyncio.to_thread(host.checkpointer.save, store, state, applied)
            core.events.add(host.now(), "checkpoint", f"checkpoint of round {closed.number} written")
            await host.execute(core.release_acks(closed.number))
            if host.pending is not None:
                self._forget_committed(closed.number)

        saving = self._committing = asyncio.ensure_future(save())  # (cancelled with the driver, as commit is)
        scores = await self.evaluate(closed.number, f"in round {closed.number}")
        fed = await self.fed_evaluate(closed.number)  # (the workers it asks pull after their acks)
        record = self.record(updates, before, eval_started, scores, result, selected=len(closed.selected),
                             failed=len(closed.failed), update_metrics=mean_metrics(updates), **fed, **extra)

        async def commit() -> None:
            await saving
            await asyncio.to_thread(host.checkpointer.append_metrics, record)  # (its fsync off the event loop)
            acc = "-" if record["test_accuracy"] is None else f"{record['test_accuracy']:.4f}"
            log.info("round %d/%d  accuracy %s  %d/%d updates  in %s  out %s  %.2f s", closed.number,
                     host.config.rounds, acc, record["participants"], len(closed.selected), _mb(record["bytes_in"]),
                     _mb(record["bytes_out"]), record["duration_s"])
            core.events.add(host.now(), "round", f"round {closed.number}/{host.config.rounds}: accuracy {acc}, "
                            f"{record['participants']}/{len(closed.selected)} updates, {record['duration_s']:.2f} s")
            await self.keep_best(record)
            core.last_round = record
            if host.on_round is not None:
                host.on_round(record)

        self._committing = asyncio.ensure_future(commit())
        if core.secure is not None or core.is_complete():
            await self._committed()  # (secure rounds: no overlap; the last round: committed before the summary)
        return record

    async def _committed(self) -> None:
        """Wait for the checkpoint of the last aggregated round (and what follows it) to be written."""
        if self._committing is not None:
            task, self._committing = self._committing, None
            await task
