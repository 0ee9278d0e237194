"""The worker: join the broker, then pull → train → push until the broker says the run is done.

Heartbeats run in their own task, independent of training (training runs in a thread), so a long local epoch
is never mistaken for death and a lost broker is noticed within the liveness interval. Each connection is one
:func:`~fedctl.worker.transport.background` block: its reader and heartbeat end with it. Chunked transfers are
in :mod:`fedctl.worker.chunked`.
"""

from __future__ import annotations

import asyncio
import dataclasses
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

from fedctl.errors import ConfigError, ModelMismatch, ProtocolError, RemoteError, TrainingFailed, TransportError
from fedctl.models import ModelSpec, first_difference, get_model
from fedctl.security import check_z85_key
from fedctl.strategies import ClientResult, Strategy, TaskConfig, get_strategy
from fedctl.strategies.base import EXTRA_TENSORS
from fedctl.wire import (
    PACKED_NAME,
    SparseTensor,
    check_against_spec,
    densify,
    pack_sparse,
    split_extras,
    unpack_sparse,
)
from fedctl.wire import constants as C
from fedctl.wire.compression import CodecCost, check_mode, worth_compressing
from fedctl.wire.constants import DEFAULT_MAX_MESSAGE_BYTES, ErrorCode
from fedctl.wire.messages import Message, encode_tensors
from fedctl.worker.chunked import push_chunks, receive_model, wants_chunks
from fedctl.worker.frameworks.base import Params, Trainer, local_state, set_local_state
from fedctl.worker.link import throughput
from fedctl.worker.secure import Vanished, secure_round
from fedctl.worker.state import WorkerState
from fedctl.worker.transport import BrokerLost, Connection, Rejoin, background

log = logging.getLogger(__name__)
TrainerFactory = Callable[[ModelSpec], Trainer]
MAX_FAILURES = 3
INLINE_TRAIN_S = 0.002
"""A training this quick (its previous run) runs on the event loop, not in a thread (see :meth:`Worker.train`)."""
"""A worker whose training raises in this many rounds in a row stops (exit non-zero) rather than fail forever."""
Evaluate = Callable[[Params, Params], tuple[Mapping[str, float], int]]
"""Federated evaluation on the worker's held-out data: ``(weights, local tensors) -> (metrics, examples)``, in a
thread; the local tensors are the training model's (:func:`local_state`), so a FedBN model is evaluated with this
worker's own BatchNorm statistics."""
EvaluatorFactory = Callable[[ModelSpec], Evaluate]
"""Builds the worker's :data:`Evaluate` for the run's model, the first time the broker asks for an evaluation."""


def trainer_evaluator(make_trainer: TrainerFactory, num_examples: int) -> EvaluatorFactory:
    """Federated evaluation by a framework trainer bound to held-out data (``make_trainer`` builds it on first use):
    its ``evaluate`` metrics (accuracy, loss) on ``num_examples`` examples."""

    def build(spec: ModelSpec) -> Evaluate:
        trainer = make_trainer(spec)

        def evaluate(weights: Params, local: Params) -> tuple[Mapping[str, float], int]:
            set_local_state(trainer, local)
            return trainer.evaluate(weights), num_examples

        return evaluate

    return build


@dataclass
class Push:
    """An update as sent: its tensors, header fields and the strategy result (whose state is committed on ack)."""

    tensors: dict[str, Any]
    fields: dict[str, Any]
    result: ClientResult
    local: Params
    """The trainer's local tensors after this training (:func:`local_state`), committed with the strategy state."""


@dataclass(frozen=True)
class WorkerConfig:
    """Options of ``fedctl join``."""

    connect: str
    worker_id: str
    backend: str
    num_examples: int
    model: str | None = None
    spec: ModelSpec | None = None
    """The model of this worker's task (``fedctl join --task``): sent with ``join`` so the broker names the first
    difference from its own, and checked against the broker's. None: a built-in model, looked up by name."""
    device: str | None = None
    """What the trainer runs on (``cpu``, ``cuda:0``), told to the broker in ``join`` for its status."""
    connect_timeout_s: float = 60.0
    max_backoff_s: float = 10.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    state_dir: Path | None = None
    """Where the worker keeps its state (held model, strategy residuals) across restarts; None: in memory only."""
    slowdown: float = 1.0
    """Emulate a slower device: each update takes ``slowdown`` × (training time + ``delay_s``) (benchmarks)."""
    delay_s: float = 0.0
    vanish_before: tuple[str, int] | None = None
    """Emulate a device lost mid-round (benchmarks): ``(message type, round)`` — in the first secure round at or
    after that round, the worker's process stops just before sending that ``sa_*`` message (its socket closes;
    the broker notices only by the missing answer and heartbeats)."""
    server_key: str | None = None
    """The broker's CURVE public key (40 Z85 characters); with ``secret_key``, the connection is CURVE."""
    secret_key: Path | None = None
    """This worker's ``NAME.key_secret`` file (``fedctl keygen``); only with ``server_key``."""
    compress: str = "auto"
    """Pushes through the zlib codec: ``auto`` (when the measured link is slow enough, docs/protocol.md §4.4),
    ``always`` or ``never``."""

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
        check_mode(self.compress)


def check_spec(announced: dict[str, Any], local: ModelSpec | None = None) -> ModelSpec:
    """This worker's spec of the model the broker announced (``local``: its task's; else the built-in model of
    that name); ModelMismatch naming the first difference when they disagree."""
    spec = local if local is not None else get_model(str(announced.get("name")))
    theirs = [[p.get("name"), list(p.get("shape", [])), p.get("dtype", "float32")]
              for p in announced.get("params", []) if isinstance(p, dict)]
    diff = first_difference(spec.signature(), theirs, "worker", "broker")
    if diff is not None:
        raise ModelMismatch(f"the broker's model {announced.get('name')!r} differs from this worker's "
                            f"{spec.name!r}: {diff}",
                            "run the same task (or built-in model) and fedctl version on the broker and the workers")
    return spec


class Worker:
    """One federated participant bound to one shard and one framework adapter."""

    def __init__(self, config: WorkerConfig, make_trainer: TrainerFactory,
                 ctx: zmq.asyncio.Context | None = None, evaluator: EvaluatorFactory | None = None) -> None:
        self.config = config
        self.make_trainer = make_trainer
        self.make_evaluator = evaluator
        """Federated evaluation on held-out data (docs/protocol.md §7.2); None: the worker has none and answers
        ``evaluate`` with 0 examples."""
        self._evaluate: Evaluate | None = None
        self.failures = 0
        """Rounds in a row whose training raised (reported with ``failed``)."""
        self._last_train_s = math.inf
        """How long the last training took (the first one runs in a thread)."""
        self._next_pull: asyncio.Future[Message] | None = None
        """A pull already sent with the last push, whose answer the session loop waits for."""
        self.last_training: dict[str, float] | None = None
        """The last local training: its round, seconds and examples trained (its metrics, `--metrics-bind`)."""
        self._warned_metrics = False
        self.evaluations = 0
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.trainer: Trainer | None = None
        """Built on the first round the worker is sampled for, so idle workers hold no framework model."""
        self.spec: ModelSpec | None = None
        self.run: dict[str, Any] = {}
        self.rounds_trained = 0
        self.conn: Connection | None = None
        self.link_bps: int | None = None
        """The link's throughput as measured from the kernel's TCP counters around the last push
        (:func:`fedctl.worker.link.throughput`), told to the broker in each pull so it can judge whether compressing
        this worker's model pays (docs/protocol.md §4.4)."""
        self.codec = CodecCost()
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
                                  host=socket.gethostname(), device=self.config.device,
                                  params=None if self.config.spec is None else self.config.spec.signature())

    async def _join(self, conn: Connection) -> None:
        """Join with capped, jittered exponential backoff until welcomed or ``connect_timeout_s`` passes.

        One socket serves every attempt (ZeroMQ reconnects it by itself); a retry resends ``join`` on it and a
        welcome answering any attempt counts, so a slow broker is not answered with a storm of new connections.
        """
        started, attempt, wait_s = time.monotonic(), 0, 1.0
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
        if reply.type == C.ERROR:
            raise RemoteError(reply["code"], reply["reason"], reply.get("fix"))
        self.run = dict(reply["run"])
        spec = self.spec = check_spec(self.run["model"], self.config.spec)
        self.state = self.state.for_run(str(self.run["run_id"]))
        log.info("joined run %s as %s: model %s, strategy %s, %d rounds", self.run["run_id"], reply["worker"],
                 spec.name, self.run["strategy"], self.run["rounds"])

    @property
    def _liveness_s(self) -> float:
        return float(self.run.get("liveness_s", 10.0))

    def check_error(self, reply: Message) -> None:
        if reply.type != C.ERROR:
            return
        if reply["code"] == ErrorCode.NOT_JOINED:
            raise Rejoin()
        raise RemoteError(reply["code"], reply["reason"], reply.get("fix"))

    def _train(self, strategy: Strategy, weights: dict[str, Any],
               task: dict[str, Any]) -> tuple[ClientResult, Params]:
        """Runs in a worker thread: build the framework model on first use (with the local tensors a previous
        process left in the state dir), then the strategy's client rule; returns its result and the local tensors
        after it."""
        if self.trainer is None:
            assert self.spec is not None
            self.trainer = self.make_trainer(self.spec)
            set_local_state(self.trainer, self.state.local)
        result = strategy.client_update(weights, self.trainer, task, self.state.strategy)
        for name, tensor in result.tensors.items():
            values = tensor.values if isinstance(tensor, SparseTensor) else np.asarray(tensor)
            if not np.isfinite(values).all():
                raise FloatingPointError(f"training diverged: the update's {name} holds NaN or infinite values "
                                         "(lower --lr, or check the data)")
        return result, local_state(self.trainer)

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        assert self.spec is not None
        return {p.name: p.shape for p in self.spec.params}

    def _split_extras(self, model: Message, strategy: Strategy) -> tuple[Message, dict[str, np.ndarray]]:
        """The model message without its extra tensors, and those (every one the strategy declares, each checked
        against the tensor it shadows, docs/protocol.md §5.6); ProtocolError otherwise — also for a model in chunks,
        which cannot carry them."""
        if not strategy.extra_downlink:
            return model, {}
        shapes = self._shapes()
        if model.get("chunks"):
            split_extras({}, strategy.extra_downlink, shapes)  # (refuses: the extras are missing)
        if PACKED_NAME in model.tensors:
            unpack_sparse(model.tensors, shapes)  # (refuses: a packed frame is a message's only tensor, §4.7)
        rest, extras = split_extras(model.tensors, strategy.extra_downlink, shapes)
        return dataclasses.replace(model, tensors=rest), extras

    def _weights_of(self, model: Message) -> Params:
        """The weights a model message gives: the dense model, or replacements applied to the held version."""
        shapes = self._shapes()
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

    async def _report_failure(self, round_no: int, exc: Exception) -> None:
        """Training raised: tell the broker (the round goes on without this worker) and pull again; after
        ``MAX_FAILURES`` rounds in a row, stop with the error."""
        assert self.conn is not None
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:1000]
        log.warning("round %d: training failed (%s); the broker goes on without this update", round_no, reason)
        log.debug("training failed", exc_info=exc)
        await self.conn.send(C.FAILED, round=round_no, reason=reason)
        self.failures += 1
        if self.failures >= MAX_FAILURES:
            raise TrainingFailed(f"training failed in {self.failures} rounds in a row: {reason}",
                                 "fix the task (run `fedctl join -v` for the traceback)",
                                 diverged=isinstance(exc, FloatingPointError))

    async def train(self, strategy: Strategy, weights: Params, task: dict[str, Any],
                    round_no: int) -> tuple[ClientResult, Params, dict[str, float]] | None:
        """The strategy's local training in a thread (with ``--slowdown`` emulated): its result, the local tensors
        after it and the metrics to report; None when the task raised (reported to the broker with ``failed``).

        A training whose last run took under :data:`INLINE_TRAIN_S` runs on the event loop instead: handing it to
        a thread and back costs more than that (0.3–0.6 ms of CPU per round, measured with `fedctl bench round`),
        and blocking the loop that long delays no heartbeat. Real training (an epoch of data) stays threaded."""
        started = time.perf_counter()
        try:
            if self._last_train_s < INLINE_TRAIN_S:
                result, local = self._train(strategy, weights, task)
            else:
                result, local = await asyncio.to_thread(self._train, strategy, weights, task)
        except Exception as exc:  # noqa: BLE001 - the task's own code (model, loss, optimiser) may raise anything
            await self._report_failure(round_no, exc)
            return None
        self.failures = 0
        trained_s = self._last_train_s = time.perf_counter() - started
        emulated = self.config.slowdown * (trained_s + self.config.delay_s)
        if emulated > trained_s:  # an emulated slower device (heartbeats keep flowing meanwhile)
            await asyncio.sleep(emulated - trained_s)
        metrics = {k: float(v) for k, v in result.metrics.items()}
        metrics["train_time_s"] = time.perf_counter() - started
        epochs = max(int(task.get("epochs", 1) or 1), 1)
        self.last_training = {"round": float(round_no), "seconds": trained_s,
                              "examples": float(result.num_examples * epochs)}
        return result, local, metrics

    async def committed(self, result: ClientResult, local: Params) -> None:
        """The broker took this worker's update for its round: keep the strategy's state and local tensors (saved in
        ``--state-dir``) and count the round."""
        self.rounds_trained += 1
        self.state.strategy, self.state.seq = dict(result.state), self.state.seq + 1
        self.state.local = local
        if self.config.state_dir is not None:
            await asyncio.to_thread(self.state.save, self.config.state_dir)

    async def _round(self, model: Message) -> Message | None:
        """Train on the model the broker handed out and push the update; returns the broker's answer, or None when
        training failed (reported to the broker; the worker pulls again)."""
        assert self.conn is not None
        task = dict(model["task"])
        strategy = get_strategy(task["strategy"], TaskConfig(int(task["epochs"]), int(task["batch_size"]),
                                                               float(task["lr"]),
                                                               options=dict(task.get("options") or {})))
        try:  # the strategy's extra tensors (docs/protocol.md §5.6) go to its client rule, not into the weights
            model, task[EXTRA_TENSORS] = self._split_extras(model, strategy)
        except ProtocolError as err:
            await self._report_failure(int(model["round"]), err)
            return None
        if model.get("chunks"):
            weights = await receive_model(self.conn, model, self._shapes(), self._liveness_s)
        else:
            weights = self._weights_of(model)
        self.state.model, self.state.version = weights, int(model["version"])
        if model.get("secagg") is not None:
            return await secure_round(self, model, strategy, task, weights)
        trained = await self.train(strategy, weights, task, int(model["round"]))
        if trained is None:
            return None
        result, local, metrics = trained
        push = Push(dict(result.tensors), {"round": model["round"], "base_version": model["version"],
                                           "seq": self.state.seq, "kind": result.kind,
                                           "num_examples": result.num_examples, "metrics": metrics}, result, local)
        self.unacked = push  # resent after a reconnect if no answer comes (the broker may have kept it)
        return await self._push(push)

    def _run_evaluation(self, weights: Params) -> tuple[dict[str, float], int]:
        """Runs in a worker thread: the evaluation on held-out data (built on first use), finite metrics only."""
        if self.make_evaluator is None:
            return {}, 0
        if self._evaluate is None:
            assert self.spec is not None
            self._evaluate = self.make_evaluator(self.spec)
        # The model as this worker uses it: the global weights with its own local tensors (FedBN's statistics).
        metrics, n = self._evaluate(weights, local_state(self.trainer) if self.trainer else self.state.local)
        finite = {k: float(v) for k, v in metrics.items() if k != "num_examples" and isinstance(v, (int, float))
                  and not isinstance(v, bool) and np.isfinite(v)}
        if len(finite) > C.MAX_METRICS and not self._warned_metrics:
            self._warned_metrics = True
            log.warning("the evaluation reports %d metrics; a message carries at most %d, so only the first %d by "
                        "name are sent (%s ... left out)", len(finite), C.MAX_METRICS, C.MAX_METRICS,
                        sorted(finite)[C.MAX_METRICS])
        return dict(sorted(finite.items())[:C.MAX_METRICS]), max(int(n), 0) if finite else 0

    async def _evaluate_model(self, msg: Message) -> None:
        """Evaluate the model the broker sent (``evaluate``) on the held-out data and send the ``evaluation``."""
        assert self.conn is not None
        version = int(msg["version"])
        try:
            if msg.get("chunks"):
                weights = await receive_model(self.conn, msg, self._shapes(), self._liveness_s)
            else:
                weights = self._weights_of(msg)
        except ProtocolError as err:  # e.g. changes on a version this worker does not hold: evaluate nothing
            log.warning("could not apply the model version %d to evaluate: %s", version, err)
            metrics: dict[str, float] = {}
            n = 0
        else:
            self.state.model, self.state.version = weights, version
            try:
                metrics, n = await asyncio.to_thread(self._run_evaluation, weights)
            except Exception as exc:  # noqa: BLE001 - the task's own evaluation code may raise anything
                log.warning("round %d: evaluation failed (%s: %s); answering with 0 examples", msg["round"],
                            type(exc).__name__, exc)
                log.debug("evaluation failed", exc_info=exc)
                metrics, n = {}, 0
        await self.conn.send(C.EVALUATION, version=version, num_examples=n, metrics=metrics)
        self.evaluations += 1
        log.info("round %d: evaluated model version %d on %d held-out examples%s", msg["round"], version, n,
                 "".join(f", {k} {v:.4f}" for k, v in metrics.items() if k in ("accuracy", "loss")))

    async def _push(self, push: Push) -> Message:
        """Send an update and act on the answer: commit the worker state on ``ack``, drop it when refused."""
        assert self.conn is not None
        before = self.conn.tcp_sample()
        if wants_chunks(push.tensors, self.run.get("chunk_above")):
            reply = await push_chunks(self.conn, push.tensors, push.fields, self._shapes(),
                                      int(self.run.get("chunk_bytes", C.DEFAULT_CHUNK_BYTES)), self._liveness_s)
        else:
            tensors = pack_sparse(push.tensors, self._shapes())
            frames = encode_tensors(tensors)
            raw = sum(map(len, frames))
            if worth_compressing(raw, self.link_bps, self.codec, self.config.compress):
                start = time.perf_counter()
                frames = encode_tensors(tensors, compress=True)
                self.codec.observe(raw, sum(map(len, frames)), time.perf_counter() - start)
            answer = await self.conn.request(C.PUSH, tensors=tensors, tensor_frames=frames, **push.fields)
            # The next pull goes out with the push (docs/protocol.md §6): the broker hands out the next round while
            # it still writes the checkpoint that acknowledges this one. Nothing is trained on before the ack. (Not
            # before the link is first measured: that pull says how fast it is, for the broker's compression.)
            if self.link_bps is not None or before is None:
                self._next_pull = await self._pull(self.conn)
            reply = await self.conn.wait_reply(answer)
        after = self.conn.tcp_sample()  # the link, measured on what was just acknowledged
        if before is not None and after is not None:
            self.link_bps = throughput(before, after) or self.link_bps
        self.unacked = None
        round_no = push.fields["round"]
        if reply.type == C.ACK:
            await self.committed(push.result, push.local)
            log.info("round %d: pushed %s (%s; loss %.4f, %.2f s; link %s)", round_no, push.result.kind,
                     reply["status"], push.fields["metrics"].get("train_loss", float("nan")),
                     push.fields["metrics"]["train_time_s"],
                     "not measured" if self.link_bps is None else f"{self.link_bps / 1e6:.2f} MB/s")
        elif reply.type == C.ERROR and reply["code"] in (ErrorCode.STALE_UPDATE, ErrorCode.NOT_SELECTED,
                                                          ErrorCode.RUN_FINISHED):
            log.warning("round %d: the broker did not use the update: %s", round_no, reply["reason"])
            return reply
        elif reply.type == C.ERROR and reply["code"] == ErrorCode.NOT_JOINED:
            self.unacked = push  # the broker restarted between our rejoin and this push: rejoin, resend
        self.check_error(reply)
        return reply

    async def _pull(self, conn: Connection) -> asyncio.Future[Message]:
        """Ask for work, saying which model version this worker holds and its measured link."""
        held = self.state.version if self.state.model else None
        return await conn.request(C.PULL, version=held, link_bps=self.link_bps)

    async def _session(self, conn: Connection) -> Message:
        """Pull → train → push on a joined connection until done; raises BrokerLost or Rejoin."""
        self._next_pull = None  # (one sent on a previous connection is answered on none)
        if self.unacked is not None:
            push, self.unacked = self.unacked, None
            log.info("resending the update for round %d that the broker had not acknowledged", push.fields["round"])
            answer = await self._push(push)
            if answer.type == C.DONE:
                return answer
        while True:
            pull, self._next_pull = self._next_pull, None
            reply = await conn.wait_reply(pull if pull is not None else await self._pull(conn))
            if reply.type == C.DONE:
                return reply
            self.check_error(reply)
            if reply.type == C.MODEL:
                outcome = await self._round(reply)
                if outcome is not None and outcome.type == C.DONE:
                    return outcome
            elif reply.type == C.EVALUATE:
                await self._evaluate_model(reply)

    async def _attend(self) -> Message:
        """One connection: join on it, then take part until done, then leave; raises BrokerLost or Rejoin.

        The connection's reader and the heartbeat run in a :func:`background` block that this call owns: they end
        with it, and a failure of either ends it. The socket is closed on every way out (an open DEALER would
        keep its context from terminating).
        """
        conn = self.conn = Connection(self.ctx, self.config.connect, self.config.max_message_bytes,
                                      server_key=self.config.server_key, secret_key=self.config.secret_key)
        try:
            async with background() as tasks:
                conn.start(tasks)
                await self._join(conn)
                heartbeat = tasks.start(conn.heartbeat(float(self.run.get("heartbeat_interval_s", 1.0)),
                                                       self._liveness_s), name="heartbeat")
                try:
                    done = await self._session(conn)
                except ConfigError as err:  # this worker gives up (its task keeps failing): the broker hears why
                    await _stopped(heartbeat)
                    await conn.send(C.LEAVE, reason=str(err.message)[:1000])
                    await asyncio.sleep(0.05)
                    raise
                await _stopped(heartbeat)  # (a heartbeat after the leave would be refused as NOT_JOINED)
                await conn.send(C.LEAVE, reason="run complete")
                await asyncio.sleep(0.05)  # let the socket take the leave out before it closes (linger 0)
            return done
        finally:
            self._close()

    async def serve(self) -> dict[str, Any]:
        """Join and take part until the broker says the run is done; returns a summary.

        Raises TransportError when no broker answers within ``connect_timeout_s`` and RemoteError when the broker
        refuses the join; a lost or restarted broker is joined again.
        """
        while True:
            try:
                done = await self._attend()
                break
            except Vanished as gone:
                log.warning("emulated loss of this worker before its %s", gone)
                return {"rounds_trained": self.rounds_trained, "final_round": -1, "version": -1, "vanished": True,
                        "bytes_out": self.bytes_out, "bytes_in": self.bytes_in}
            except (BrokerLost, Rejoin) as why:
                log.warning("%s; reconnecting", "lost the broker" if isinstance(why, BrokerLost) else
                            "the broker does not know this worker (restarted?)")
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


async def _stopped(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it has ended (a background task: its group reports its failures)."""
    task.cancel()
    await asyncio.wait([task])
