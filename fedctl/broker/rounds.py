"""The round driver of the sync policy: open a round, hand out the model, wait, aggregate, evaluate, checkpoint."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fedctl.broker import transfers
from fedctl.wire import chunks as wire_chunks
from fedctl.wire import constants as C
from fedctl.wire import make
from fedctl.wire.messages import encode_tensors
from fedctl.wire.tensors import SparseTensor, Tensor, pack_sparse

if TYPE_CHECKING:
    from fedctl.broker.policy import OpenRound
    from fedctl.broker.registry import WorkerRecord
    from fedctl.broker.service import Broker
    from fedctl.strategies.base import Update

log = logging.getLogger(__name__)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _mean_metrics(updates: list[Update]) -> dict[str, float]:
    """Mean over the round's updates of each metric the workers reported (loss, kept elements, time...)."""
    keys = sorted({k for u in updates for k in u.metrics})
    return {k: round(sum(float(u.metrics.get(k, 0.0)) for u in updates) / max(len(updates), 1), 6) for k in keys}


def build_downlinks(b: Broker, held: set[int | None]) -> dict[int | None, tuple[dict[str, Tensor], list[bytes], bool]]:
    """For each model version some worker holds: the tensors to send it, their frames, and whether they are a
    delta on that version. Runs in a thread (diffing and encoding touch the whole model)."""
    store = b.store
    out: dict[int | None, tuple[dict[str, Tensor], list[bytes], bool]] = {}
    chunked = bool(transfers.model_chunks(b))
    # A model sent in chunks is never encoded whole (that would copy it): its chunks are views of the weights.
    dense: tuple[dict[str, Tensor], list[bytes], bool] = (
        dict(store.weights), [] if chunked else encode_tensors(store.weights, compress=True), False)
    for version in held:
        base = None if version is None else store.at(version)
        delta = None if base is None else b.strategy.downlink(store.weights, base)
        if delta is None:
            out[version] = dense
            continue
        # Unchanged tensors are left out: the worker keeps its copy of them.
        changed = {k: t for k, t in delta.items() if not (isinstance(t, SparseTensor) and t.nnz == 0)}
        changed = pack_sparse(changed, b.expected_shapes)  # one frame when every change is sparse
        frames = encode_tensors(changed, compress=True)
        size = sum(map(len, frames))
        # A delta goes whole: when the dense model needs chunks, it must itself stay below the chunking size.
        smaller = size <= b.config.chunk_above if chunked else size < sum(map(len, dense[1]))
        out[version] = (changed, frames, True) if smaller else dense
    return out


async def hand_out(b: Broker, jobs: list[tuple[WorkerRecord, int]]) -> None:
    """Answer each worker's waiting pull with the model for round (or clock tick) ``n``: dense, or only what
    changed since the version it holds when that is smaller. Frames are encoded once per distinct held version."""
    if not jobs:
        return
    downlinks = await asyncio.to_thread(build_downlinks, b, {r.holds_version for r, _ in jobs})
    for record, number in jobs:
        task = b.strategy.task_for_round(number, int(b.rng.integers(2**31)))
        tensors, frames, is_delta = downlinks[record.holds_version]
        chunks = {} if is_delta else transfers.model_chunks(b)
        msg = make(C.MODEL, b.next_id(), re=record.pending_pull, tensors=None if chunks else tensors, round=number,
                   version=b.store.version, task=task, base=record.holds_version if is_delta else None, **chunks)
        record.pending_pull = None
        if not await b.send(record.identity, msg, None if chunks else frames):
            b.drop(record, "is unreachable (its connection is gone)")
        elif chunks:  # the weights follow as chunks, paced by the worker's credits
            out = transfers.Outbound(record, msg.id, wire_chunks.Window(b.config.chunk_bytes))
            b.outbound[(record.identity, msg.id)] = out
            sender = asyncio.get_running_loop().create_task(transfers.send_model_chunks(b, out, b.store.weights))
            b.transfer_tasks.add(sender)
            sender.add_done_callback(b.transfer_tasks.discard)


async def evaluate(b: Broker, number: int, where: str) -> dict[str, float]:
    """Centralised evaluation every ``eval_every`` rounds (sync) or model versions (ssp/async) and after the last;
    notes a reached target in the state, which ends the run."""
    if b.evaluator is None or (number % b.config.eval_every and number < b.config.rounds):
        return {}
    evaluation = await asyncio.to_thread(b.evaluator, b.store.weights)
    target = b.config.target_accuracy
    if target is not None and evaluation.get("accuracy", 0.0) >= target:
        b.state["target_reached_at"] = number
        log.info("target accuracy %.4f reached %s; ending the run", target, where)
    return evaluation


class RoundDriver:
    """Drives rounds ``state['round'] + 1 … rounds`` of one broker."""

    def __init__(self, broker: Broker) -> None:
        from fedctl.broker.policy import SyncRoundPolicy

        assert isinstance(broker.policy, SyncRoundPolicy)
        self.b = broker
        self.policy: SyncRoundPolicy = broker.policy
        self.started = time.monotonic() - float(broker.state.get("elapsed_s", 0.0))

    async def wait_until(self, condition: Callable[[], bool], timeout_s: float | None = None) -> bool:
        """Wait until ``condition()`` holds (re-checked whenever the broker's state changes); False on timeout."""
        deadline = None if timeout_s is None else self.b.now() + timeout_s
        while True:
            self.b.changed.clear()
            if condition():
                return True
            left = None if deadline is None else deadline - self.b.now()
            if left is not None and left <= 0:
                return False
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that races the event
                async with asyncio.timeout(None if left is None else max(left, 0.001)):
                    await self.b.changed.wait()
            except TimeoutError:
                continue

    async def wait_open(self, round_no: int) -> OpenRound:
        """Wait until the policy opens round ``round_no`` with the workers whose pulls wait."""
        opened: list[OpenRound] = []

        def try_open() -> bool:
            ready = [r.worker for r in self.b.registry.waiting()]
            got = self.policy.try_start(round_no, ready, len(self.b.registry), self.b.now(), self.b.rng)
            if got is not None:
                opened.append(got)
            return got is not None

        await self.wait_until(try_open)
        return opened[0]

    async def _hand_out(self, opened: OpenRound) -> None:
        """Answer each sampled worker's pull with the model (see :func:`hand_out`)."""
        records = [r for r in (self.b.registry.get(w) for w in opened.selected) if r is not None]
        await hand_out(self.b, [(r, opened.number) for r in records])

    async def run(self) -> dict[str, Any]:
        b = self.b
        last: dict[str, Any] = {}
        while not b.is_complete():
            round_no = b.state["round"] + 1
            started, in0, out0 = time.perf_counter(), b.transport.counters.bytes_in, b.transport.counters.bytes_out
            push0, model0 = b.bytes_in_by_type.get(C.PUSH, 0), b.bytes_out_by_type.get(C.MODEL, 0)
            if self.policy.current is not None and self.policy.current.number == round_no:  # restored after a crash
                opened = self.policy.current
                b.updates, b.restored = list(b.restored), []
                log.info("round %d resumed: %d of %d sampled workers had answered", round_no, len(b.updates),
                         len(opened.selected))
            else:
                opened = await self.wait_open(round_no)
                b.updates = []
                if b.pending is not None:
                    await asyncio.to_thread(b.pending.save_round, opened.number, opened.selected)
                await self._hand_out(opened)
            await self._wait_close(opened)
            closed, ok = self.policy.close()
            if not ok:
                log.warning("round %d failed: %d of %d sampled workers answered before the deadline (quorum %d); "
                            "retrying with a new sample", round_no, len(closed.received), len(closed.selected),
                            self.policy.quorum(closed))
                if b.pending is not None:
                    await asyncio.to_thread(b.pending.clear)
                continue
            last = await self._complete(closed, started, (in0, out0, push0, model0))
        return {"rounds": b.state["round"], "version": b.store.version, "last": last, "rejected": dict(b.rejected)}

    async def _wait_close(self, opened: OpenRound) -> None:
        """Wait until the round can close, handing its model (again) to any selected worker that asks for it
        without holding it — one that restarted mid-round, or everyone after a broker restart."""
        b = self.b

        def again() -> list[WorkerRecord]:
            return [r for r in b.registry.waiting() if self.policy.needs_model(r.worker)]

        while True:
            await self.wait_until(lambda: self.policy.should_close(b.now()) or bool(again()),
                                  self.policy.time_left(b.now()))
            if self.policy.should_close(b.now()):
                return
            records = again()
            opened.handed.update(r.worker for r in records)
            await hand_out(b, [(r, opened.number) for r in records])

    async def _evaluate(self, round_no: int) -> dict[str, float]:
        return await evaluate(self.b, round_no, f"in round {round_no}")

    async def _complete(self, closed: OpenRound, started: float, counts: tuple[int, int, int, int]) -> dict[str, Any]:
        b = self.b
        in0, out0, push0, model0 = counts
        # Arrival order is a race; summing in worker order makes a seeded run bit-reproducible.
        updates = sorted(b.updates, key=lambda u: u.worker)
        result = await asyncio.to_thread(b.strategy.aggregate, b.store.weights, updates,
                                         b.state["strategy_state"], b.rng)
        b.store.replace(result.weights)
        b.applied_total += len(updates)
        b.state["round"] = closed.number
        b.state["strategy_state"] = result.state
        b.state["elapsed_s"] = time.monotonic() - self.started
        eval_started = time.perf_counter()
        evaluation = await self._evaluate(closed.number)
        eval_s = time.perf_counter() - eval_started
        n = sum(u.num_examples for u in updates)
        train_loss = sum(u.metrics.get("train_loss", 0.0) * u.num_examples for u in updates) / max(n, 1)
        record: dict[str, Any] = {"round": closed.number, "version": b.store.version,
                  "test_accuracy": evaluation.get("accuracy"), "test_loss": evaluation.get("loss"),
                  "train_loss": train_loss, "participants": len(updates), "selected": len(closed.selected),
                  "connected": len(b.registry), "bytes_in": b.transport.counters.bytes_in - in0,
                  "bytes_out": b.transport.counters.bytes_out - out0,
                  "update_bytes_in": b.bytes_in_by_type.get(C.PUSH, 0) - push0,
                  "model_bytes_out": b.bytes_out_by_type.get(C.MODEL, 0) - model0,
                  "update_metrics": _mean_metrics(updates),
                  "duration_s": round(eval_started - started, 4), "eval_s": round(eval_s, 4),
                  "elapsed_s": round(b.state["elapsed_s"], 3),
                  "rejected_total": sum(b.rejected.values()),
                  "strategy": {k: v for k, v in result.metrics.items()}}
        applied = [{"round": u.round, "worker": u.worker, "seq": u.seq, "base_version": u.base_version,
                    "num_examples": u.num_examples} for u in updates]
        await asyncio.to_thread(b.checkpointer.save, b.store, b.state, applied)
        if b.pending is not None:
            await asyncio.to_thread(b.pending.clear, closed.number)
        b.checkpointer.append_metrics(record)
        acc = "-" if record["test_accuracy"] is None else f"{record['test_accuracy']:.4f}"
        log.info("round %d/%d  accuracy %s  %d/%d updates  in %s  out %s  %.2f s", closed.number, b.config.rounds,
                 acc, len(updates), len(closed.selected), _mb(record["bytes_in"]), _mb(record["bytes_out"]),
                 record["duration_s"])
        if b.on_round is not None:
            b.on_round(record)
        return record
