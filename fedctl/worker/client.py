"""The worker: join the broker, then pull → train → push until the broker says the run is done.

Heartbeats run in their own task, independent of training (training runs in a thread), so a long local epoch
is never mistaken for death and a lost broker is noticed within the liveness interval.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from fedctl.errors import ConfigError, ModelMismatch, ProtocolError, RemoteError, TransportError
from fedctl.models import ModelSpec, get_model
from fedctl.security import check_z85_key
from fedctl.strategies import ClientResult, Strategy, TaskConfig, get_strategy
from fedctl.wire import check_against_spec, chunks, densify, pack_sparse, unpack_sparse
from fedctl.wire import constants as C
from fedctl.wire.constants import DEFAULT_MAX_MESSAGE_BYTES, ErrorCode
from fedctl.wire.messages import Message
from fedctl.wire.tensors import SparseTensor
from fedctl.worker.frameworks.base import Params, Trainer
from fedctl.worker.state import WorkerState
from fedctl.worker.transport import Connection

log = logging.getLogger(__name__)
TrainerFactory = Callable[[ModelSpec], Trainer]


@dataclass
class Push:
    """An update as sent: its tensors, header fields and the strategy result (whose state is committed on ack)."""

    tensors: dict[str, Any]
    fields: dict[str, Any]
    result: ClientResult


class BrokerLost(Exception):
    """Internal signal: the broker stopped answering heartbeats; reconnect."""


class Rejoin(Exception):
    """Internal signal: the broker does not know this worker (it restarted); join again."""


@dataclass(frozen=True)
class WorkerConfig:
    """Options of ``fedctl join``."""

    connect: str
    worker_id: str
    backend: str
    num_examples: int
    model: str | None = None
    connect_timeout_s: float = 60.0
    max_backoff_s: float = 10.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    state_dir: Path | None = None
    """Where the worker keeps its state (held model, strategy residuals) across restarts; None: in memory only."""
    slowdown: float = 1.0
    """Emulate a slower device: each update takes ``slowdown`` × (training time + ``delay_s``) (benchmarks)."""
    delay_s: float = 0.0
    server_key: str | None = None
    """The broker's CURVE public key (40 Z85 characters); with ``secret_key``, the connection is CURVE."""
    secret_key: Path | None = None
    """This worker's ``NAME.key_secret`` file (``fedctl keygen``); only with ``server_key``."""

    def __post_init__(self) -> None:
        if not self.connect.startswith(("tcp://", "ipc://", "inproc://")):
            raise ConfigError(f"--connect {self.connect!r} is not a ZeroMQ endpoint", "use e.g. tcp://HOST:5555")
        if self.num_examples < 1:
            raise ConfigError("the shard holds no examples", "check --data and --data-dir")
        if self.slowdown < 1.0 or self.delay_s < 0:
            raise ConfigError("--slowdown must be >= 1 and --delay >= 0", "e.g. --slowdown 5 for a 5x slower device")
        if (self.server_key is None) != (self.secret_key is None):
            raise ConfigError("CURVE needs both --server-key and --secret-key", "pass both, or neither")
        if self.server_key is not None:
            check_z85_key(self.server_key, "--server-key")


def check_spec(announced: dict[str, Any]) -> ModelSpec:
    """The local spec of the model the broker announced; ModelMismatch when they disagree."""
    spec = get_model(str(announced.get("name")))
    local = {p.name: list(p.shape) for p in spec.params}
    remote = {p["name"]: list(p["shape"]) for p in announced.get("params", [])}
    if local != remote:
        diff = sorted(n for n in set(local) | set(remote) if local.get(n) != remote.get(n))
        raise ModelMismatch(f"the broker's model {spec.name!r} differs from this worker's at {diff[:3]}",
                            "run the same fedctl version on the broker and the workers")
    return spec


class Worker:
    """One federated participant bound to one shard and one framework adapter."""

    def __init__(self, config: WorkerConfig, make_trainer: TrainerFactory,
                 ctx: zmq.asyncio.Context | None = None) -> None:
        self.config = config
        self.make_trainer = make_trainer
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.trainer: Trainer | None = None
        """Built on the first round the worker is sampled for, so idle workers hold no framework model."""
        self.spec: ModelSpec | None = None
        self.run: dict[str, Any] = {}
        self.rounds_trained = 0
        self.conn: Connection | None = None
        self.bytes_out = 0
        self.bytes_in = 0
        self.unacked: Push | None = None
        """An update sent without an answer yet; resent (same round and seq) after a reconnect."""
        self.state = WorkerState.load(config.state_dir) if config.state_dir is not None else WorkerState()
        if self.state.run_id is not None:
            log.info("loaded worker state of run %s from %s (model version %s, %d strategy arrays)",
                     self.state.run_id, config.state_dir, self.state.version, len(self.state.strategy))

    async def _send_join(self, conn: Connection) -> asyncio.Future[Message]:
        return await conn.request(C.JOIN, worker=self.config.worker_id, backend=self.config.backend,
                                  num_examples=self.config.num_examples, model=self.config.model,
                                  host=socket.gethostname())

    async def join(self) -> None:
        """Join with capped, jittered exponential backoff until welcomed or ``connect_timeout_s`` passes.

        One socket serves every attempt (ZeroMQ reconnects it by itself); a retry resends ``join`` on it and a
        welcome answering any attempt counts, so a slow broker is not answered with a storm of new connections.
        """
        started, attempt, wait_s = time.monotonic(), 0, 1.0
        conn = Connection(self.ctx, self.config.connect, self.config.max_message_bytes,
                          server_key=self.config.server_key, secret_key=self.config.secret_key)
        self.conn = conn
        try:
            attempts: set[asyncio.Future[Message]] = set()
            while True:
                attempt += 1
                attempts.add(await self._send_join(conn))
                # No attempt outlasts the overall deadline: --connect-timeout 0.5 gives up after 0.5 s, not 1 s.
                left = self.config.connect_timeout_s - (time.monotonic() - started)
                answered, _ = await asyncio.wait(attempts, timeout=max(min(wait_s, left), 0.01),
                                                 return_when=asyncio.FIRST_COMPLETED)
                if answered:
                    reply = answered.pop().result()
                    break
                waited = time.monotonic() - started
                if waited >= self.config.connect_timeout_s:
                    raise TransportError(f"no broker answered at {self.config.connect} within {waited:.0f} s",
                                         "check that `fedctl serve` runs there and the port is reachable "
                                         "(address, firewall), or raise --connect-timeout; if the broker uses "
                                         "CURVE, check --server-key and that this worker's public key is in its "
                                         "--allowed-keys directory")
                log.warning("waiting for the broker at %s (attempt %d, no answer yet; retrying)",
                            self.config.connect, attempt)
                wait_s = min(wait_s * 2, self.config.max_backoff_s) * random.uniform(0.8, 1.2)
        except BaseException:  # given up or cancelled: the socket must not outlive the attempt
            self._close()
            raise
        try:
            if reply.type == C.ERROR:
                raise RemoteError(reply["code"], reply["reason"], reply.get("fix"))
            self.run = dict(reply["run"])
            spec = self.spec = check_spec(self.run["model"])
            self.state = self.state.for_run(str(self.run["run_id"]))
        except BaseException:
            self._close()  # a refused join must not leave its socket open
            raise
        log.info("joined run %s as %s: model %s, strategy %s, %d rounds", self.run["run_id"], reply["worker"],
                 spec.name, self.run["strategy"], self.run["rounds"])

    async def _heartbeat(self, conn: Connection, lost: asyncio.Event) -> None:
        interval = float(self.run.get("heartbeat_interval_s", 1.0))
        liveness = float(self.run.get("liveness_s", 10.0))
        while True:
            await asyncio.sleep(interval)
            if time.monotonic() - conn.last_heard > liveness:
                log.warning("the broker has not answered for %.0f s", time.monotonic() - conn.last_heard)
                lost.set()
                return
            await conn.send(C.HEARTBEAT, t=time.time())

    async def _wait(self, future: asyncio.Future[Message], lost: asyncio.Event) -> Message:
        """The reply to a request, or BrokerLost / the broker's done message, whichever comes first."""
        assert self.conn is not None
        lost_task = asyncio.ensure_future(lost.wait())
        done_task = asyncio.ensure_future(self.conn.done.wait())
        forgotten_task = asyncio.ensure_future(self.conn.forgotten.wait())
        try:
            waiting: set[asyncio.Future[Any]] = {future, lost_task, done_task, forgotten_task}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost_task.cancel()
            done_task.cancel()
            forgotten_task.cancel()
        if future.done():
            return future.result()
        if self.conn.done_msg is not None:
            return self.conn.done_msg
        if self.conn.forgotten.is_set():
            raise Rejoin()
        raise BrokerLost()

    def _check_error(self, reply: Message) -> None:
        if reply.type != C.ERROR:
            return
        if reply["code"] == ErrorCode.NOT_JOINED:
            raise Rejoin()
        raise RemoteError(reply["code"], reply["reason"], reply.get("fix"))

    def _train(self, strategy: Strategy, weights: dict[str, Any], task: dict[str, Any]) -> ClientResult:
        """Runs in a worker thread: build the framework model on first use, then the strategy's client rule."""
        if self.trainer is None:
            assert self.spec is not None
            self.trainer = self.make_trainer(self.spec)
        return strategy.client_update(weights, self.trainer, task, self.state.strategy)

    def _weights_of(self, model: Message) -> Params:
        """The weights a model message gives: the dense model, or replacements applied to the held version."""
        assert self.spec is not None
        shapes = {p.name: p.shape for p in self.spec.params}
        base = model.get("base")
        if base is None:
            check_against_spec(model.tensors, shapes)
            return {k: np.asarray(v, dtype=np.float32) for k, v in densify(model.tensors).items()}
        if base != self.state.version or not self.state.model:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"the broker sent changes on model version {base}, "
                                f"this worker holds {self.state.version}")
        tensors = unpack_sparse(model.tensors, shapes)
        check_against_spec(tensors, {k: shapes[k] for k in tensors if k in shapes})
        weights = dict(self.state.model)
        for name, tensor in tensors.items():
            if isinstance(tensor, SparseTensor):
                updated = weights[name].copy()
                updated.reshape(-1)[tensor.indices] = tensor.values
                weights[name] = updated
            else:
                weights[name] = np.array(tensor, dtype=np.float32)
        return weights

    async def _round(self, model: Message, lost: asyncio.Event) -> Message:
        """Train on the model the broker handed out and push the update; returns the broker's answer."""
        assert self.conn is not None
        task = dict(model["task"])
        strategy = get_strategy(task["strategy"], TaskConfig(int(task["epochs"]), int(task["batch_size"]),
                                                               float(task["lr"]),
                                                               options=dict(task.get("options") or {})))
        weights = await self._receive_chunks(model, lost) if model.get("chunks") else self._weights_of(model)
        self.state.model, self.state.version = weights, int(model["version"])
        started = time.perf_counter()
        result = await asyncio.to_thread(self._train, strategy, weights, task)
        trained_s = time.perf_counter() - started
        emulated = self.config.slowdown * (trained_s + self.config.delay_s)
        if emulated > trained_s:  # an emulated slower device (heartbeats keep flowing meanwhile)
            await asyncio.sleep(emulated - trained_s)
        metrics = {k: float(v) for k, v in result.metrics.items()}
        metrics["train_time_s"] = time.perf_counter() - started
        push = Push(dict(result.tensors), {"round": model["round"], "base_version": model["version"],
                                           "seq": self.state.seq, "kind": result.kind,
                                           "num_examples": result.num_examples, "metrics": metrics}, result)
        self.unacked = push  # resent after a reconnect if no answer comes (the broker may have kept it)
        return await self._push(push, lost)

    async def _next_of(self, queue: asyncio.Queue[Message], lost: asyncio.Event, what: str) -> Message:
        """The next chunk or credit of a transfer; BrokerLost when none comes within the broker's liveness."""
        try:
            async with asyncio.timeout(float(self.run.get("liveness_s", 10.0))):
                return await self._wait(asyncio.ensure_future(queue.get()), lost)
        except TimeoutError:
            raise BrokerLost(f"no {what} from the broker for {self.run.get('liveness_s', 10.0)} s") from None

    async def _receive_chunks(self, model: Message, lost: asyncio.Event) -> Params:
        """The weights of a model that comes in chunks (docs/protocol.md §7.1): each written in place, then
        credited, so the broker sends the next ones."""
        assert self.conn is not None and self.spec is not None
        shapes = {p.name: p.shape for p in self.spec.params}
        cursor = chunks.Cursor(shapes, int(model["chunks"]))
        flat = {name: np.empty(math.prod(shape), np.float32) for name, shape in shapes.items()}
        queue = self.conn.transfers.setdefault(model.id, asyncio.Queue())
        started = time.monotonic()
        try:
            while not cursor.done:
                msg = await self._next_of(queue, lost, "model chunk")
                if msg.type != C.CHUNK:
                    if msg.type == C.DONE:
                        raise BrokerLost("the run ended while the model was coming")
                    continue
                for name, piece, _ in cursor.accept(msg["index"], msg.slices):
                    flat[name][piece.start:piece.stop] = piece.values
                await self.conn.send(C.CREDIT, xfer=model.id, received=cursor.received)
        finally:
            self.conn.transfers.pop(model.id, None)
        log.info("received the model (%.1f MB) in %d chunks in %.1f s", cursor.total * 4 / 1e6, cursor.chunks,
                 time.monotonic() - started)
        return {name: flat[name].reshape(shape) for name, shape in shapes.items()}

    async def _push_chunks(self, push: Push, lost: asyncio.Event) -> Message:
        """Send a dense update larger than the broker's ``chunk_above`` as a push header and chunks of slices, at
        most ``window`` unanswered (the window keeps ~0.25 s of data in flight, so heartbeats behind it are not held
        long on a slow link); returns the broker's answer to the push."""
        assert self.conn is not None and self.spec is not None
        shapes = {p.name: p.shape for p in self.spec.params}
        chunk_bytes = int(self.run.get("chunk_bytes", C.DEFAULT_CHUNK_BYTES))
        n = chunks.count(shapes, chunk_bytes)
        push_id = self.conn.next_id()
        credits = self.conn.transfers.setdefault(push_id, asyncio.Queue())
        window = chunks.Window(chunk_bytes)
        started = time.monotonic()
        try:
            answer = await self.conn.request(C.PUSH, msg_id=push_id, chunks=n, **push.fields)
            go = await self._wait_credit(credits, answer, lost)  # the header was admitted: send the chunks
            if go is None:  # the broker answered the push itself: refused (or a duplicate)
                return await self._wait(answer, lost)
            received, last = go["received"], time.monotonic()
            pieces = chunks.split({k: np.asarray(v) for k, v in push.tensors.items()}, shapes, chunk_bytes)
            for index, piece in enumerate(pieces):
                if answer.done():  # refused (or acknowledged as a duplicate) mid-way: stop sending
                    break
                while index - received >= window.size:
                    credit = await self._wait_credit(credits, answer, lost)
                    if credit is None:
                        return await self._wait(answer, lost)
                    now = time.monotonic()
                    window.credited(credit["received"] - received, now - last)
                    received, last = max(received, credit["received"]), now
                await self.conn.send(C.CHUNK, slices=piece, xfer=push_id, index=index)
            reply = await self._wait(answer, lost)
        finally:
            self.conn.transfers.pop(push_id, None)
        log.info("pushed %.1f MB in %d chunks in %.1f s", sum(t.nbytes for t in push.tensors.values()) / 1e6, n,
                 time.monotonic() - started)
        return reply

    async def _wait_credit(self, credits: asyncio.Queue[Message], answer: asyncio.Future[Message],
                           lost: asyncio.Event) -> Message | None:
        """The next credit, or None when the push was answered first."""
        getter = asyncio.ensure_future(credits.get())
        try:
            async with asyncio.timeout(float(self.run.get("liveness_s", 10.0))):
                await asyncio.wait({getter, answer}, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            raise BrokerLost(f"no credit from the broker for {self.run.get('liveness_s', 10.0)} s") from None
        finally:
            if not getter.done():
                getter.cancel()
        if lost.is_set():
            raise BrokerLost()
        if getter.done() and not getter.cancelled():
            return getter.result()
        return None

    def _chunked(self, tensors: Mapping[str, Any]) -> bool:
        """Whether an update must travel in chunks: dense and larger than the broker's ``chunk_above``."""
        limit = self.run.get("chunk_above")
        if limit is None or any(isinstance(t, SparseTensor) for t in tensors.values()):
            return False
        return sum(np.asarray(t).nbytes for t in tensors.values()) > int(limit)

    async def _push(self, push: Push, lost: asyncio.Event) -> Message:
        """Send an update and act on the answer: commit the worker state on ``ack``, drop it when refused."""
        assert self.conn is not None
        assert self.spec is not None
        if self._chunked(push.tensors):
            reply = await self._push_chunks(push, lost)
        else:
            tensors = pack_sparse(push.tensors, {p.name: p.shape for p in self.spec.params})
            reply = await self._wait(await self.conn.request(C.PUSH, tensors=tensors, **push.fields), lost)
        self.unacked = None
        round_no = push.fields["round"]
        if reply.type == C.ACK:
            self.rounds_trained += 1
            self.state.strategy, self.state.seq = dict(push.result.state), self.state.seq + 1
            if self.config.state_dir is not None:
                await asyncio.to_thread(self.state.save, self.config.state_dir)
            log.info("round %d: pushed %s (%s; loss %.4f, %.2f s)", round_no, push.result.kind, reply["status"],
                     push.fields["metrics"].get("train_loss", float("nan")), push.fields["metrics"]["train_time_s"])
        elif reply.type == C.ERROR and reply["code"] in (ErrorCode.STALE_UPDATE, ErrorCode.NOT_SELECTED,
                                                          ErrorCode.RUN_FINISHED):
            log.warning("round %d: the broker did not use the update: %s", round_no, reply["reason"])
            return reply
        elif reply.type == C.ERROR and reply["code"] == ErrorCode.NOT_JOINED:
            self.unacked = push  # the broker restarted between our rejoin and this push: rejoin, resend
        self._check_error(reply)
        return reply

    async def _session(self) -> Message:
        """One connected session: heartbeat + pull/train/push until done; raises BrokerLost or Rejoin."""
        assert self.conn is not None
        lost = asyncio.Event()
        beat = asyncio.ensure_future(self._heartbeat(self.conn, lost))
        try:
            if self.unacked is not None:
                push, self.unacked = self.unacked, None
                log.info("resending the update for round %d that the broker had not acknowledged",
                         push.fields["round"])
                answer = await self._push(push, lost)
                if answer.type == C.DONE:
                    return answer
            while True:
                held = self.state.version if self.state.model else None
                reply = await self._wait(await self.conn.request(C.PULL, version=held), lost)
                if reply.type == C.DONE:
                    return reply
                self._check_error(reply)
                if reply.type == C.MODEL:
                    answer = await self._round(reply, lost)
                    if answer.type == C.DONE:
                        return answer
        finally:
            beat.cancel()

    async def serve(self) -> dict[str, Any]:
        """Join and take part until the broker says the run is done; returns a summary."""
        try:
            await self.join()
            while True:
                try:
                    done = await self._session()
                    break
                except (BrokerLost, Rejoin) as why:
                    log.warning("%s; reconnecting", "lost the broker" if isinstance(why, BrokerLost) else
                                "the broker does not know this worker (restarted?)")
                    self._close()
                    await self.join()
            assert self.conn is not None
            await self.conn.send(C.LEAVE, reason="run complete")
            await asyncio.sleep(0.05)
        finally:
            # Also on an error or cancellation: an open DEALER would keep its context from terminating.
            self._close()
        log.info("run complete after round %d (model version %d); trained %d rounds", done["round"],
                 done["version"], self.rounds_trained)
        return {"rounds_trained": self.rounds_trained, "final_round": done["round"], "version": done["version"],
                "bytes_out": self.bytes_out, "bytes_in": self.bytes_in}

    def _close(self) -> None:
        if self.conn is not None:
            self.bytes_out += self.conn.bytes_out
            self.bytes_in += self.conn.bytes_in
            self.conn.close()
            self.conn = None
