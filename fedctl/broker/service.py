"""The broker's IO shell: it feeds the sans-IO core (:mod:`fedctl.broker.core`) what the ROUTER socket receives and
the passing of time, carries out the effects the core returns, and runs the policy's driver.

Tasks, under one TaskGroup: the socket's reader, the liveness reaper (the core's ``tick``), the durable writer
(accepted updates to ``pending/``, then their acks), one sender per chunked model transfer, and the driver
(:mod:`fedctl.broker.rounds` or :mod:`fedctl.broker.clocks`, chosen by the policy through
:data:`fedctl.broker.drivers.DRIVERS`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from fedctl.broker import clocks, downlink, rounds  # noqa: F401  (the drivers register themselves)
from fedctl.broker.chunking import Inbound
from fedctl.broker.config import BrokerConfig
from fedctl.broker.core import BrokerCore
from fedctl.broker.drivers import DRIVERS, Counters, Driver
from fedctl.broker.durable import PendingStore
from fedctl.broker.effects import (
    CloseTransfer,
    Credited,
    Effect,
    OpenTransfer,
    Persist,
    Send,
    StartModelTransfer,
    Wake,
    WriteChunk,
)
from fedctl.broker.params import ParameterStore
from fedctl.broker.policy import Policy, make_policy
from fedctl.broker.registry import WorkerRecord, WorkerRegistry
from fedctl.broker.store import Checkpointer
from fedctl.broker.transfers import SpoolFiles
from fedctl.broker.transport import RouterTransport
from fedctl.fsio import check_writable_dir
from fedctl.models import ModelSpec, get_model, init_params
from fedctl.strategies import Update, get_strategy
from fedctl.wire import chunks, payload_bytes
from fedctl.wire import constants as C
from fedctl.wire.messages import peek_type

log = logging.getLogger(__name__)

READER_BACKLOG = 1024
"""Messages the reader takes off the socket ahead of handling them (to find heartbeats); beyond it, and beyond
READER_BACKLOG_BYTES, the rest wait in ZeroMQ's queues (its high-water marks push back on senders)."""
READER_BACKLOG_BYTES = 256 * 2**20
DURABLE_GROUP = 256
"""Most accepted updates the durable writer stores with one sync."""
Params = dict[str, np.ndarray]
Evaluator = Callable[[Params], dict[str, float]]


class Broker:
    """A parameter server for one federated run: the IO shell around a :class:`BrokerCore`.

    Parameters
    ----------
    config:
        The run configuration.
    evaluator:
        Optional centralised evaluation ``weights -> {"accuracy", "loss"}``; runs in a worker thread.
    on_round:
        Optional callback receiving each round's metrics record (progress displays).
    ctx, clock:
        The ZeroMQ context (default: the process's) and the monotonic clock every time the broker reads comes
        from (tests pass a fake one).
    transport:
        A ready transport with :class:`RouterTransport`'s methods (default: a ROUTER bound to ``config.bind``;
        ``fedctl.testing.memory.MemoryRouter`` runs a broker without sockets).
    """

    def __init__(self, config: BrokerConfig, evaluator: Evaluator | None = None,
                 on_round: Callable[[dict[str, Any]], None] | None = None,
                 ctx: zmq.asyncio.Context | None = None, clock: Callable[[], float] = time.monotonic,
                 transport: Any = None, model: tuple[ModelSpec, Params] | None = None,
                 driver: Callable[[Any], Driver] | None = None) -> None:
        self.config = config
        self.make_driver = driver
        """Builds the driver instead of the policy's (an edge broker's :class:`fedctl.edge.driver.EdgeDriver`)."""
        self.evaluator = evaluator
        self.on_round = on_round
        self.now = clock
        check_writable_dir(config.state_dir, "--state-dir")  # creates nothing: a refused start leaves no dir
        spec = model[0] if model is not None else get_model(config.model)
        strategy = get_strategy(config.strategy, config.task)
        self.checkpointer = Checkpointer(config.state_dir, config.keep_models)
        store, state = self._load_or_init(spec, None if model is None else model[1])
        store.history_bytes = int(config.history_mb * 2**20)
        policy: Policy = make_policy(config.policy, config.sync, config.clock, state)
        shapes = {p.name: p.shape for p in spec.params}
        self.pending = PendingStore(config.state_dir, shapes) if config.durable_updates else None
        self.spools = SpoolFiles(self.pending.dir if self.pending is not None else config.state_dir / "spool", shapes)
        """Where chunked pushes are written as they arrive (with durable updates: kept with the pending pushes)."""
        if self.pending is None:  # left by a broker that stopped mid-transfer
            self.spools.remove_stale()
        self.core = BrokerCore(config, spec, strategy, policy, store, state, open_spool=self.spools.reader,
                               durable=self.pending is not None)
        self.core.restore(self._restore_pending())
        self.bytes_out_by_type: dict[str, int] = {}
        self.changed = asyncio.Event()
        self.durable_queue: asyncio.Queue[Persist] = asyncio.Queue()
        self.ack_gate = asyncio.Event()
        self.ack_gate.set()
        self.credited: dict[tuple[bytes, int], asyncio.Event] = {}
        self._tasks: asyncio.TaskGroup | None = None
        self._senders: set[asyncio.Task[None]] = set()
        self._effects: dict[type, Callable[[Any], Awaitable[None]]] = {
            Send: self._send, Persist: self._persist, OpenTransfer: self._open_transfer,
            WriteChunk: self._write_chunk, CloseTransfer: self._close_transfer,
            StartModelTransfer: self._start_model_transfer, Wake: self._wake, Credited: self._credited}
        self.transport = transport or RouterTransport(
            ctx or zmq.asyncio.Context.instance(), config.bind, config.max_message_bytes,
            secret_key=config.curve_secret_key, allowed_keys=config.allowed_keys)
        self.endpoint: str = self.transport.endpoint
        self.transport.peer_seen = self.core.peer_seen

    # ------------------------------------------------------------------ state, start and restore
    def _load_or_init(self, spec: ModelSpec, initial: Params | None) -> tuple[ParameterStore, dict[str, Any]]:
        """The checkpoint in the state dir, or a new run from ``initial`` weights (a task's own initialisation) or
        the zoo's seeded initialisation."""
        config = self.config
        if self.checkpointer.exists():
            self.checkpointer.check_resumable(config.model, config.strategy, spec.signature())
            store, state = self.checkpointer.load()
            log.info("resuming run %s from %s at round %d (model version %d)", state["run_id"], config.state_dir,
                     state["round"], store.version)
            return store, state
        store = ParameterStore(initial if initial is not None else init_params(spec, config.seed))
        state = {"run_id": secrets.token_hex(8), "model": config.model, "strategy": config.strategy,
                 "round": 0, "rounds": config.rounds, "seed": config.seed, "strategy_state": {},
                 "spec": spec.to_wire()}
        return store, state

    def _restore_pending(self) -> list[Update]:
        """Updates acknowledged before a crash and not yet applied (the policy decides which); the files of the
        others are removed."""
        if self.pending is None:
            return []
        pending, policy = self.pending, self.core.policy

        def applied() -> set[tuple[str, int]]:
            return {(str(e.get("worker")), int(e.get("round", -1))) for e in self.checkpointer.read_journal()}

        restored = policy.restore(int(self.core.state["round"]), pending.load_round(), pending.load_updates(),
                                  applied, self.now())
        if restored.forget_all:
            pending.clear()
        else:
            pending.remove_many(restored.forget)
        pending.drop_orphan_spools()
        if restored.updates:
            log.info("restored %d acknowledged update(s) not yet applied (%s)", len(restored.updates),
                     ", ".join(f"{u.worker}@{u.round}" for u in restored.updates))
        return restored.updates

    # ------------------------------------------------------------------ the core's state, for callers and tests
    @property
    def store(self) -> ParameterStore:
        return self.core.store

    @property
    def state(self) -> dict[str, Any]:
        return self.core.state

    @property
    def policy(self) -> Policy:
        return self.core.policy

    @property
    def registry(self) -> WorkerRegistry:
        return self.core.registry

    @property
    def rejected(self) -> dict[str, int]:
        return self.core.rejected

    @property
    def updates(self) -> list[Update]:
        return self.core.updates

    @property
    def inbound(self) -> dict[tuple[bytes, int], Inbound]:
        return self.core.inbound

    @property
    def bytes_in_by_type(self) -> dict[str, int]:
        return self.core.bytes_in_by_type

    @property
    def applied_total(self) -> int:
        return self.core.applied_total

    @property
    def spool_dir(self) -> Path:
        return self.spools.dir

    def is_complete(self) -> bool:
        return self.core.is_complete()

    def snapshot(self) -> Counters:
        return Counters(self.transport.counters.bytes_in, self.transport.counters.bytes_out,
                        self.core.bytes_in_by_type.get(C.PUSH, 0), self.bytes_out_by_type.get(C.MODEL, 0), self.now())

    # ------------------------------------------------------------------ effects
    async def execute(self, effects: list[Effect]) -> None:
        for effect in effects:
            await self._effects[type(effect)](effect)

    async def _deliver(self, identity: bytes, frames: list[bytes], mtype: str) -> bool:
        """Send one message; False when the peer is gone. Payload bytes are counted by message type."""
        if not await self.transport.send(identity, frames):
            return False
        size = payload_bytes(frames)
        self.bytes_out_by_type[mtype] = self.bytes_out_by_type.get(mtype, 0) + size
        record = self.core.registry.by_identity(identity)
        if record is not None:
            record.bytes_out += size
        return True

    async def _send(self, e: Send) -> None:
        if not await self._deliver(e.identity, e.frames, e.type) and e.worker is not None:
            await self.execute(self.core.unreachable(e.worker, self.now()))

    async def _persist(self, e: Persist) -> None:
        self.durable_queue.put_nowait(e)

    async def _open_transfer(self, e: OpenTransfer) -> None:
        self.spools.open(e.name, e.nbytes)

    async def _write_chunk(self, e: WriteChunk) -> None:
        self.spools.write(e.name, e.pieces)

    async def _close_transfer(self, e: CloseTransfer) -> None:
        self.spools.close(e.name, e.delete)

    async def _start_model_transfer(self, e: StartModelTransfer) -> None:
        assert self._tasks is not None, "model transfers start while the broker runs"
        sender = self._tasks.create_task(self._send_model_chunks(e))
        self._senders.add(sender)
        sender.add_done_callback(self._senders.discard)

    async def _wake(self, e: Wake) -> None:
        self.changed.set()

    async def _credited(self, e: Credited) -> None:
        event = self.credited.get((e.identity, e.xfer))
        if event is not None:
            event.set()

    # ------------------------------------------------------------------ what the drivers ask
    async def wait_until(self, condition: Callable[[], bool], timeout_s: float | None = None) -> bool:
        """Wait until ``condition()`` holds (re-checked whenever the core's state changes); False on timeout."""
        deadline = None if timeout_s is None else self.now() + timeout_s
        while True:
            self.changed.clear()
            if condition():
                return True
            left = None if deadline is None else deadline - self.now()
            if left is not None and left <= 0:
                return False
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that races the event
                async with asyncio.timeout(None if left is None else max(left, 0.001)):
                    await self.changed.wait()
            except TimeoutError:
                continue

    async def hand_out(self, jobs: list[tuple[WorkerRecord, int]]) -> None:
        """Answer each worker's waiting pull with the model for round (or clock tick) ``n``: dense, or only what
        changed since the version it holds when that is smaller (built in a thread)."""
        if jobs:
            downlinks = await asyncio.to_thread(downlink.build, self.core, [r for r, _ in jobs])
            await self.execute(self.core.hand_out(jobs, downlinks, self.now()))

    # ------------------------------------------------------------------ tasks
    async def _reader(self) -> None:
        """The socket's one reader. Heartbeats jump the queue: before each message it handles, it takes what the
        socket already holds (cheap: no decoding), answers the heartbeats among it at once and keeps the rest in
        arrival order. With 100 workers pushing, ROUTER's fair queueing puts up to one push per peer ahead of a
        heartbeat; decoding and admitting them first would delay the echo by ~100 pushes' work."""
        backlog: collections.deque[tuple[bytes, list[bytes]]] = collections.deque()
        backlog_bytes = handled = 0
        while True:
            if not backlog:
                identity, frames = await self.transport.recv()
                backlog.append((identity, frames))
                backlog_bytes += payload_bytes(frames)
            while len(backlog) < READER_BACKLOG and backlog_bytes < READER_BACKLOG_BYTES:
                ready = await self.transport.recv_ready()
                if ready is None:
                    break
                if len(ready[1]) == 1 and peek_type(ready[1][0]) == C.HEARTBEAT:
                    await self.execute(self.core.handle(ready[0], ready[1], self.now()))
                else:
                    backlog.append(ready)
                    backlog_bytes += payload_bytes(ready[1])
            identity, frames = backlog.popleft()
            backlog_bytes -= payload_bytes(frames)
            await self.execute(self.core.handle(identity, frames, self.now()))
            handled += 1
            if handled % 16 == 0:
                # pyzmq returns finished futures while messages are queued: without this, a flood would keep the
                # reader from yielding, and the round driver and the liveness reaper would not run.
                await asyncio.sleep(0)

    async def _durable_writer(self) -> None:
        """Write queued accepted updates in groups (one sync per group), then acknowledge each."""
        assert self.pending is not None
        while True:
            batch = [await self.durable_queue.get()]
            await self.ack_gate.wait()  # the previous round's checkpoint and this round's record come first
            while not self.durable_queue.empty() and len(batch) < DURABLE_GROUP:
                batch.append(self.durable_queue.get_nowait())
            try:
                await asyncio.to_thread(self.pending.save_updates, [
                    (p.update, p.frames, None if p.spool is None else self.spools.dir / p.spool) for p in batch])
            except OSError as exc:  # no ack: the workers resend after reconnecting, or the round goes on
                log.error("could not make %d update(s) durable (%s); not acknowledged", len(batch), exc)
            else:
                for persisted in batch:
                    await self.execute(list(persisted.then))
            finally:
                for _ in batch:
                    self.durable_queue.task_done()

    async def _reaper(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_s)
            await self.execute(self.core.tick(self.now()))

    async def _send_model_chunks(self, e: StartModelTransfer) -> None:
        """Send the current model to ``e.identity`` as the chunks of transfer ``e.xfer``, at most the core's window
        unanswered. Gives up (the worker pulls again) when no credit comes for ``liveness_s``."""
        key = (e.identity, e.xfer)
        weights, shapes, chunk_bytes = self.core.store.weights, self.core.shapes, self.config.chunk_bytes
        total = chunks.count(shapes, chunk_bytes)
        event = self.credited[key] = asyncio.Event()

        async def wait_credit_below(limit: int, index: int) -> bool:
            """Wait until fewer than ``limit`` chunks are unanswered; False when the transfer ended (no credit
            for liveness_s, or the worker is gone)."""
            while (out := self.core.outbound.get(key)) is not None and index - out.received >= limit:
                event.clear()
                try:
                    async with asyncio.timeout(self.config.liveness_s):
                        await event.wait()
                except TimeoutError:
                    log.warning("worker %s sent no credit for %g s; model transfer %d stopped at chunk %d of %d",
                                e.worker, self.config.liveness_s, e.xfer, out.received, total)
                    return False
            return out is not None

        try:
            for index, piece in enumerate(chunks.split(weights, shapes, chunk_bytes)):
                out = self.core.outbound.get(key)
                if out is None or not await wait_credit_below(out.window.size, index):
                    return
                if not await self._deliver(e.identity, self.core.chunk_message(e.xfer, index, piece), C.CHUNK):
                    log.info("worker %s is unreachable; model transfer %d stopped", e.worker, e.xfer)
                    return
            await wait_credit_below(1, total)  # the transfer stays open for the credits still on their way
        finally:
            self.core.outbound.pop(key, None)
            self.credited.pop(key, None)

    async def run(self) -> dict[str, Any]:
        """Run every round, tell the workers the run is done, and return a summary."""
        core = self.core
        log.info("broker on %s: model %s (%d parameters), strategy %s, policy %s, %d %s", self.endpoint,
                 core.spec.name, core.spec.num_params, core.strategy.name, core.policy.name, self.config.rounds,
                 "rounds" if core.policy.driver == "rounds" else "model versions")
        driver = DRIVERS[core.policy.driver](self) if self.make_driver is None else self.make_driver(self)
        try:
            async with asyncio.TaskGroup() as tg:
                self._tasks = tg
                background = [tg.create_task(self._reader()), tg.create_task(self._reaper())]
                if self.pending is not None:
                    background.append(tg.create_task(self._durable_writer()))
                summary = await driver.run()
                await self._finish()
                for task in [*background, *self._senders]:  # model transfers may still wait for credits
                    task.cancel()
        finally:
            self._tasks = None
            self.spools.abort_all()
            core.inbound.clear()
            self.transport.close()
        return summary

    async def _finish(self) -> None:
        """Tell every worker the run is done, then linger until they leave or the linger time passes."""
        await self.durable_queue.join()  # acks of the last durable writes go out first
        self.core.events.add(self.now(), "finished", f"run finished at round {self.core.state.get('round')}")
        await self.execute(self.core.finish())
        await self.wait_until(lambda: not len(self.core.registry), self.config.done_linger_s)
