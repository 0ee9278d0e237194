"""The broker service: one reader task on the ROUTER socket, a liveness reaper and the round driver.

A round flows: workers ``pull`` → the policy samples m of K → each sampled worker gets ``model`` as the reply to
its pull → workers ``push`` → the policy closes the round (all answered, or quorum at the deadline) → the
strategy aggregates (in a thread) → the store bumps the version → evaluation, checkpoint, metrics line.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from fedctl.broker import handlers, transfers
from fedctl.broker.clocks import ClockDriver
from fedctl.broker.config import BrokerConfig
from fedctl.broker.durable import PendingStore
from fedctl.broker.policy import ClockPolicy, SyncRoundPolicy, parse_policy
from fedctl.broker.registry import WorkerRecord, WorkerRegistry
from fedctl.broker.rounds import RoundDriver
from fedctl.broker.store import Checkpointer, ParameterStore
from fedctl.broker.transport import RouterTransport
from fedctl.errors import ConfigError, ProtocolError
from fedctl.models import get_model, init_params
from fedctl.strategies import Update, get_strategy
from fedctl.wire import constants as C
from fedctl.wire import decode, encode, make, payload_bytes, peek_id
from fedctl.wire.constants import ErrorCode
from fedctl.wire.messages import Message, peek_type

log = logging.getLogger(__name__)

READER_BACKLOG = 1024
"""Messages the reader takes off the socket ahead of handling them (to find heartbeats); beyond it, and beyond
READER_BACKLOG_BYTES, the rest wait in ZeroMQ's queues (its high-water marks push back on senders)."""
READER_BACKLOG_BYTES = 256 * 2**20
Params = dict[str, np.ndarray]
Evaluator = Callable[[Params], dict[str, float]]


class Broker:
    """A parameter server for one federated run.

    Parameters
    ----------
    config:
        The run configuration.
    evaluator:
        Optional centralised evaluation ``weights -> {"accuracy", "loss"}``; runs in a worker thread.
    on_round:
        Optional callback receiving each round's metrics record (progress displays).
    """

    def __init__(self, config: BrokerConfig, evaluator: Evaluator | None = None,
                 on_round: Callable[[dict[str, Any]], None] | None = None,
                 ctx: zmq.asyncio.Context | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.spec = get_model(config.model)
        self.strategy = get_strategy(config.strategy, config.task)
        bound = parse_policy(config.policy)
        self.policy: SyncRoundPolicy | ClockPolicy = SyncRoundPolicy(config.sync)
        self.registry = WorkerRegistry(config.liveness_s)
        self.checkpointer = Checkpointer(config.state_dir)
        self.expected_shapes = {p.name: p.shape for p in self.spec.params}
        self.evaluator = evaluator
        self.on_round = on_round
        self.now = clock
        self.updates: list[Update] = []
        self.rejected: dict[str, int] = {}
        self._last_refusal_log: dict[str, float] = {}
        self.current_frames: list[bytes] | None = None
        self.durable_queue: asyncio.Queue[tuple[bytes, Message, Update, list[bytes] | None]] = asyncio.Queue()
        """Accepted pushes waiting to be written to ``pending/`` and acknowledged (see :meth:`_durable_writer`)."""
        self.bytes_in_by_type: dict[str, int] = {}
        """Payload bytes of accepted (decoded) messages by type; the transport counts every byte received."""
        self.bytes_out_by_type: dict[str, int] = {}
        self.finished = False
        self.changed = asyncio.Event()
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._msg_id = 0
        self.store, self.state = self._load_or_init()
        self.store.history_bytes = int(self.config.history_mb * 2**20)
        if bound is not None:
            self.policy = ClockPolicy(replace(config.clock, bound=bound), self.state.get("clocks"))
        self.pending = PendingStore(config.state_dir, self.expected_shapes) if config.durable_updates else None
        self.spool_dir = self.pending.dir if self.pending is not None else config.state_dir / "spool"
        """Where chunked pushes are written as they arrive (with durable updates: kept with the pending pushes)."""
        self.inbound: dict[tuple[bytes, int], transfers.Inbound] = {}
        self.outbound: dict[tuple[bytes, int], transfers.Outbound] = {}
        self.transfer_tasks: set[asyncio.Task[None]] = set()
        if self.pending is None and self.spool_dir.is_dir():  # left by a broker that stopped mid-transfer
            for stale in self.spool_dir.glob("spool-*.f4"):
                stale.unlink(missing_ok=True)
        self.restored: list[Update] = self._restore_pending()
        """Acknowledged updates of the round (sync) or buffer (ssp/async) the broker was in when it stopped."""
        self.applied_total = 0
        self.stale_refused = 0
        self.applying = False
        """True while the clock driver applies updates (admission then counts one more version of staleness)."""
        self.rng = np.random.default_rng([config.seed, self.state["round"]])
        self.transport = RouterTransport(self._ctx, config.bind, config.max_message_bytes,
                                         secret_key=config.curve_secret_key, allowed_keys=config.allowed_keys)
        self.endpoint = self.transport.endpoint

    def _restore_pending(self) -> list[Update]:
        """Updates acknowledged before a crash and not yet applied; stale files of committed rounds are removed."""
        if self.pending is None:
            return []
        done = int(self.state["round"])
        if isinstance(self.policy, SyncRoundPolicy):
            self.pending.clear(through_round=done)
            opened = self.pending.load_round()
            if opened is None or opened[0] != done + 1:
                self.pending.clear()
                return []
            updates = [u for u, r, _ in self.pending.load_updates() if r == done + 1 and u.worker in opened[1]]
            self.policy.restore(done + 1, opened[1], [u.worker for u in updates], self.now())
        else:
            # Pending = acknowledged; the journal says which of those a committed version already holds.
            applied = {(e.get("worker"), e.get("round")) for e in self.checkpointer.read_journal()}
            clocks = self.policy.clocks
            updates = []
            for u, tick, _ in self.pending.load_updates():
                if (u.worker, tick) in applied:
                    self.pending.remove(u.worker, tick)
                    continue
                updates.append(u)
                clocks[u.worker] = max(clocks.get(u.worker, 0), tick)
        self.pending.drop_orphan_spools()
        if updates:
            log.info("restored %d acknowledged update(s) not yet applied (%s)", len(updates),
                     ", ".join(f"{u.worker}@{u.round}" for u in updates))
        return updates

    def _load_or_init(self) -> tuple[ParameterStore, dict[str, Any]]:
        if self.checkpointer.exists():
            store, state = self.checkpointer.load()
            if state.get("model") != self.config.model or state.get("strategy") != self.config.strategy:
                raise ConfigError(f"{self.config.state_dir} holds a run of model {state.get('model')!r} with "
                                  f"strategy {state.get('strategy')!r}",
                                  "pass a fresh --state-dir, or the same --model and --strategy to resume")
            log.info("resuming run %s from %s at round %d (model version %d)", state["run_id"],
                     self.config.state_dir, state["round"], store.version)
            return store, state
        store = ParameterStore(init_params(self.spec, self.config.seed))
        state = {"run_id": secrets.token_hex(8), "model": self.config.model, "strategy": self.config.strategy,
                 "round": 0, "rounds": self.config.rounds, "seed": self.config.seed, "strategy_state": {}}
        return store, state

    def is_complete(self) -> bool:
        """True when the state holds a finished run: every round done, or the target accuracy reached."""
        return self.state["round"] >= self.config.rounds or bool(self.state.get("target_reached_at"))

    # ------------------------------------------------------------------ messaging
    def next_id(self) -> int:
        self._msg_id += 1
        return self._msg_id

    def run_info(self) -> dict[str, Any]:
        """The ``run`` map of the welcome message."""
        return {"run_id": self.state["run_id"], "model": self.spec.to_wire(), "strategy": self.strategy.name,
                "rounds": self.config.rounds, "heartbeat_interval_s": self.config.heartbeat_interval_s,
                "liveness_s": self.config.liveness_s, "max_message_bytes": self.config.max_message_bytes,
                "chunk_above": self.config.chunk_above, "chunk_bytes": self.config.chunk_bytes}

    async def send(self, identity: bytes, msg: Message, tensor_frames: list[bytes] | None = None) -> bool:
        frames = encode(msg, tensor_frames)
        sent = await self.transport.send(identity, frames)
        if sent:
            self.bytes_out_by_type[msg.type] = self.bytes_out_by_type.get(msg.type, 0) + payload_bytes(frames)
        return sent

    async def reply(self, identity: bytes, request: Message, mtype: str, tensors: Params | None = None,
                    **fields: Any) -> bool:
        return await self.send(identity, make(mtype, self.next_id(), re=request.id, tensors=tensors, **fields))

    async def send_done(self, record: WorkerRecord, re: int | None = None) -> None:
        record.pending_pull = None
        await self.send(record.identity, make(C.DONE, self.next_id(), re=re, round=self.state["round"],
                                              version=self.store.version, reason="the run is complete"))

    def drop(self, record: WorkerRecord, why: str) -> None:
        """Forget a worker (left or expired) and stop waiting for it in the open round."""
        self.registry.remove(record.worker)
        self.policy.worker_gone(record.worker)
        log.info("worker %s %s; %d connected", record.worker, why, len(self.registry))
        self.changed.set()

    async def refuse(self, identity: bytes, err: ProtocolError, re: int | None) -> None:
        """Count, log (at most once a second per code) and answer a refused message; ``re`` is the id it answers."""
        key = ErrorCode(err.code).name if err.code in ErrorCode._value2member_map_ else str(err.code)
        self.rejected[key] = self.rejected.get(key, 0) + 1
        now = self.now()
        if now - self._last_refusal_log.get(key, -1e9) >= 1.0:  # at most one line per code and second
            self._last_refusal_log[key] = now
            log.warning("refused a message from %s: %s (code %d %s; %d refused so far)", identity.hex()[:12],
                        err.message, err.code, key, self.rejected[key])
        else:
            log.debug("refused a message from %s: %s (code %d %s)", identity.hex()[:12], err.message, err.code, key)
        await self.send(identity, make(C.ERROR, self.next_id(), re=re, code=err.code, reason=err.message[:1000],
                                       fix=(err.fix or None)))

    async def handle(self, identity: bytes, frames: list[bytes]) -> None:
        """Decode, validate and dispatch one message; a bad one is refused and changes nothing."""
        try:
            msg = decode(frames, C.WORKER_TO_BROKER)
            self.current_frames = frames  # read by on_push before its first await (durable copy of a push)
            self.bytes_in_by_type[msg.type] = self.bytes_in_by_type.get(msg.type, 0) + payload_bytes(frames)
            record = self.registry.by_identity(identity)
            if record is not None:
                self.registry.touch(record, self.now())
            await handlers.HANDLERS[msg.type](self, identity, msg)
        except ProtocolError as err:
            await self.refuse(identity, err, peek_id(frames[0]) if frames else None)

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
                    await self.handle(*ready)
                else:
                    backlog.append(ready)
                    backlog_bytes += payload_bytes(ready[1])
            identity, frames = backlog.popleft()
            backlog_bytes -= payload_bytes(frames)
            await self.handle(identity, frames)
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
            while not self.durable_queue.empty() and len(batch) < 256:
                batch.append(self.durable_queue.get_nowait())
            try:
                await asyncio.to_thread(self.pending.save_updates,
                                        [(u, m["round"], m["seq"], f) for _, m, u, f in batch])
            except OSError as exc:  # no ack: the workers resend after reconnecting, or the round goes on
                log.error("could not make %d update(s) durable (%s); not acknowledged", len(batch), exc)
                continue
            for identity, msg, _, _ in batch:
                await self.reply(identity, msg, C.ACK, round=msg["round"], seq=msg["seq"], status="accepted")

    async def _reaper(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_s)
            for record in self.registry.expired(self.now()):
                self.drop(record, f"lost (no message for {self.config.liveness_s:g} s)")
            transfers.expire_inbound(self, self.now())

    async def run(self) -> dict[str, Any]:
        """Run every round, tell the workers the run is done, and return a summary."""
        log.info("broker on %s: model %s (%d parameters), strategy %s, policy %s, %d %s", self.endpoint,
                 self.spec.name, self.spec.num_params, self.strategy.name, self.policy.name, self.config.rounds,
                 "rounds" if isinstance(self.policy, SyncRoundPolicy) else "model versions")
        try:
            async with asyncio.TaskGroup() as tg:
                reader = tg.create_task(self._reader())
                reaper = tg.create_task(self._reaper())
                writer = tg.create_task(self._durable_writer()) if self.pending is not None else None
                driver = RoundDriver(self) if isinstance(self.policy, SyncRoundPolicy) else ClockDriver(self)
                summary = await driver.run()
                await self._finish()
                reader.cancel()
                reaper.cancel()
                if writer is not None:
                    writer.cancel()
        finally:
            for task in list(self.transfer_tasks):  # model transfers still waiting for credits
                task.cancel()
            for inbound in self.inbound.values():
                inbound.abort()
            self.inbound.clear()
            self.transport.close()
        return summary

    async def _finish(self) -> None:
        """Tell every worker the run is done, then linger until they leave or the linger time passes."""
        while not self.durable_queue.empty():  # acks of the last durable writes go out first
            await asyncio.sleep(0.01)
        self.finished = True
        for record in self.registry.all():
            await self.send_done(record, re=record.pending_pull)
        deadline = self.now() + self.config.done_linger_s
        while len(self.registry) and self.now() < deadline:
            self.changed.clear()
            try:
                async with asyncio.timeout(max(deadline - self.now(), 0.01)):
                    await self.changed.wait()
            except TimeoutError:
                break
