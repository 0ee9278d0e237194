"""The broker's protocol core: a sans-IO state machine (in the spirit of h11 and ps-lite's KVServer).

:meth:`BrokerCore.handle` takes one received message — the peer's routing identity, its frames and the time —
and returns effects (:mod:`fedctl.broker.effects`): messages to send, updates to make durable, spool files to
open, write or close, drivers to wake. :meth:`BrokerCore.tick` does the same for the passing of time (liveness,
stalled transfers). The core owns the worker registry, the consistency policy, admission of updates, the inbound
chunked transfers, the credit state of outbound ones and the one refusal path; it imports neither zmq nor asyncio
and does no file IO (``tests/unit/test_layers.py`` checks), so every conversation is tested without a socket.

The drivers (:mod:`fedctl.broker.rounds`, :mod:`fedctl.broker.clocks`) query it — who waits, open a round, take
the accepted updates, install the aggregate — and the shell (:mod:`fedctl.broker.service`) feeds it.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from fedctl.broker.chunking import Transfers
from fedctl.broker.config import BrokerConfig
from fedctl.broker.dp import PrivateRounds, check_budget
from fedctl.broker.effects import (
    Effect,
    Send,
    StartModelTransfer,
    Wake,
)
from fedctl.broker.evaluation import Evaluations
from fedctl.broker.events import EventLog
from fedctl.broker.intake import PushIntake
from fedctl.broker.params import ParameterStore
from fedctl.broker.policy import ClockPolicy, OpenRound, SyncRoundPolicy
from fedctl.broker.registry import WorkerRecord, WorkerRegistry
from fedctl.errors import ConfigError, ProtocolError
from fedctl.models import ModelSpec, first_difference
from fedctl.strategies.base import Strategy, Update
from fedctl.wire import chunks, decode, encode, make, payload_bytes, peek_id
from fedctl.wire import constants as C
from fedctl.wire.compression import CodecCost, worth_compressing
from fedctl.wire.constants import EXTRA_SEPARATOR, ErrorCode
from fedctl.wire.messages import Message, peek
from fedctl.wire.tensors import Tensor

if TYPE_CHECKING:
    from fedctl.broker.secure import Reply, SecureAggregation

log = logging.getLogger(__name__)
MAX_UNJOINED_PEERS = 1024
REFUSAL_LOG_EVERY_S = 1.0
"""Refusals are logged at WARNING at most once per error code in this many seconds (the rest at DEBUG)."""
SpoolOpener = Callable[[str, bool], Mapping[str, np.ndarray]]
"""``(spool name, owned) -> tensors``: the shell's reader of a completed chunked push (``owned``: delete the file
when the update is dropped; False when the pending store keeps it)."""


class Downlink(NamedTuple):
    """What a worker holding some model version is sent: tensors, their encoded frames, whether they are a delta,
    and the same frames through the zlib codec when some worker's link makes that worth it (None otherwise).

    ``extra``: how many of the tensors (and frames), at the end, are the strategy's extra tensors (docs/protocol.md
    §5.6): a ``model`` carries them, an ``evaluate`` leaves them out."""

    tensors: dict[str, Tensor]
    frames: list[bytes]
    is_delta: bool
    zframes: list[bytes] | None = None
    extra: int = 0

    def without_extra(self) -> Downlink:
        """The same downlink without the strategy's extra tensors."""
        if not self.extra:
            return self
        keep = len(self.frames) - self.extra
        return Downlink(dict(list(self.tensors.items())[:keep]), self.frames[:keep], self.is_delta,
                        None if self.zframes is None else self.zframes[:keep])


def check_extra_tensors(config: BrokerConfig, spec: ModelSpec, strategy: Strategy) -> None:
    """A strategy with extra tensors (docs/protocol.md §5.6) sends each message whole, with one extra tensor per
    model tensor and prefix: the model must fit one message that many times over (``--chunk-above-mb``; chunked
    transfers carry the model only), in the tensor frames a message may have, under names of at most
    MAX_NAME_CHARS. ConfigError otherwise, at start."""
    prefixes = {*strategy.extra_downlink, *strategy.extra_uplink}
    if not prefixes:
        return
    copies = 1 + max(len(strategy.extra_downlink), len(strategy.extra_uplink))
    if copies * spec.nbytes > config.chunk_above:
        raise ConfigError(f"strategy {strategy.name!r} sends the model with {copies - 1} extra tensor(s) of its size "
                          f"in one message ({copies * spec.nbytes:,} bytes), above --chunk-above-mb "
                          f"({config.chunk_above:,} bytes), and its extra tensors cannot travel in chunks",
                          f"raise --chunk-above-mb (and --max-message-mb) above {copies * spec.nbytes:,} bytes")
    if copies * len(spec.params) > C.MAX_TENSORS:
        raise ConfigError(f"strategy {strategy.name!r} sends {copies} tensors per model tensor: "
                          f"{copies * len(spec.params)} frames, above the {C.MAX_TENSORS} a message may carry",
                          "use a model with fewer tensors, or another strategy")
    names = {p.name for p in spec.params}
    for prefix in sorted(prefixes):
        for p in spec.params:
            name = f"{prefix}{EXTRA_SEPARATOR}{p.name}"
            if len(name) > C.MAX_NAME_CHARS or name in names:
                raise ConfigError(f"strategy {strategy.name!r} cannot name its extra tensor {name!r}: longer than "
                                  f"{C.MAX_NAME_CHARS} characters or a tensor of the model",
                                  "shorten the model's tensor names, or use another strategy")


class BrokerCore(PushIntake):
    """The protocol state of one broker (see the module docstring).

    Parameters
    ----------
    config:
        The run configuration.
    spec, strategy, policy:
        The model, the algorithm (its update kind and round tasks) and the consistency policy.
    store, state:
        The global model and the run state (``round``, ``run_id``...), loaded or created by the shell.
    open_spool:
        How the shell reads back a completed chunked push (see :data:`SpoolOpener`).
    durable:
        Whether accepted updates are durable before they are acknowledged: written under ``pending/``
        (:class:`Persist`, clock policies) or, in sync rounds, held in the round's checkpoint (``hold_acks``).
    """

    def __init__(self, config: BrokerConfig, spec: ModelSpec, strategy: Strategy,
                 policy: SyncRoundPolicy | ClockPolicy, store: ParameterStore, state: dict[str, Any], *,
                 open_spool: SpoolOpener, durable: bool) -> None:
        self.config = config
        self.spec = spec
        self.strategy = strategy
        self.policy = policy
        self.store = store
        self.state = state
        self.shapes = {p.name: p.shape for p in spec.params}
        self.registry = WorkerRegistry(config.liveness_s)
        self.rng = np.random.default_rng([config.seed, state["round"]])
        self._gathered = config.gather <= 0
        self.codec = CodecCost()
        """This broker's measured deflate speed and ratio (the shell's downlink builds update it)."""
        self.durable = durable
        self.hold_acks = durable and policy.driver == "rounds"
        self.held = {}
        self.round_task: Mapping[str, Any] | None = None
        """An edge broker's open round: the task map its parent handed it, given to each worker with a seed of this
        broker's (None: the strategy's own :meth:`~fedctl.strategies.base.Strategy.task_for_round`)."""
        self.last_round: dict[str, Any] = {}
        """The last committed round's (or version's) metrics record, as in metrics.jsonl (the drivers set it)."""
        self.open_spool = open_spool
        self.updates: list[Update] = []
        """Accepted updates of the open round (sync) or buffer (ssp/async), until a driver takes them."""
        self.transfers = Transfers(self.shapes, config.chunk_bytes)
        self.inbound = self.transfers.inbound
        """Chunked pushes being received, by (routing identity, push id)."""
        self.outbound = self.transfers.outbound
        """Chunked models being sent, by (routing identity, model message id)."""
        self.rejected: dict[str, int] = {}
        """Refused messages by error code name."""
        self.bytes_in_by_type: dict[str, int] = {}
        """Payload bytes of decoded messages by type (the transport counts every byte received)."""
        self.applied_total = 0
        self.finished = False
        self.applying = False
        """True between :meth:`start_apply` and :meth:`finish_apply`: what is admitted meanwhile is applied on top
        of the version being made, so admission counts one more version of staleness."""
        self.evaluations = Evaluations(config.fed_eval_fraction, config.sync.round_timeout_s)
        """Federated evaluation (docs/protocol.md §7.2): the open one, if any."""
        check_extra_tensors(config, spec, strategy)
        self.secure = self._secure_aggregation(config, spec)
        self.dp = self._private_rounds(config, state)
        """DP-FedAvg (docs/privacy.md), when the run uses it: its accountant, clipping bound and noise."""
        """Secure aggregation (docs/protocol.md §7.4), when the run uses it: its open attempt, if any."""
        self._ids = itertools.count(1)
        self._last_refusal_log: dict[str, float] = {}
        self.events = EventLog()
        """Recent joins, leaves, refusals, rounds and checkpoints (:mod:`fedctl.broker.events`), for the live view."""
        self.addresses: dict[bytes, str] = {}
        """Network address of each new peer the shell saw (:meth:`peer_seen`), taken by its join."""
        self.observer: Callable[[str, float], None] | None = None
        """Told each measurement worth a distribution (``"push_latency_s"``, ``"heartbeat_rtt_s"``): the metrics
        histograms, when they are on."""
        self._handlers: dict[str, Callable[[bytes, Message, list[bytes], float], list[Effect]]] = {
            C.JOIN: self._on_join, C.PULL: self._on_pull, C.PUSH: self._on_push, C.CHUNK: self._on_chunk,
            C.CREDIT: self._on_credit, C.HEARTBEAT: self._on_heartbeat, C.LEAVE: self._on_leave,
            C.EVALUATION: self._on_evaluation, C.FAILED: self._on_failed, C.STATUS: self._on_status,
            **{mtype: self._on_secure for mtype in (C.SA_KEYS, C.SA_SHARES, C.SA_INPUT, C.SA_REVEAL)}}

    @staticmethod
    def _private_rounds(config: BrokerConfig, state: dict[str, Any]) -> PrivateRounds | None:
        dp = config.dp_config()
        if dp is None:
            return None
        check_budget(dp, state.get("dp"), int(state.get("round", 0)))
        return PrivateRounds(dp, state.get("dp"))

    def _secure_aggregation(self, config: BrokerConfig, spec: ModelSpec) -> SecureAggregation | None:
        if not config.secure_aggregation:
            return None
        if spec.nbytes > config.chunk_above:
            raise ConfigError(f"--secure-aggregation sums each update in one message; the model ({spec.nbytes:,} "
                              f"bytes) goes in chunks above --chunk-above-mb ({config.chunk_above:,} bytes)",
                              "raise --max-message-mb and --chunk-above-mb above the model's size")
        from fedctl.broker.secure import EXTRA as SECURE_EXTRA  # (imported only when used: its crypto costs 8 MB)
        from fedctl.broker.secure import SecureAggregation

        dp = None if config.dp_noise_multiplier is None else (config.dp_noise_multiplier, config.dp_clip)
        return SecureAggregation(spec.num_params + len(SECURE_EXTRA), config.secagg_clip, config.secagg_neighbours,
                                 config.secagg_threshold, dp)

    # ------------------------------------------------------------------ inputs
    def handle(self, identity: bytes, frames: list[bytes], now: float) -> list[Effect]:
        """Decode, validate and act on one message; a bad one is refused and changes nothing."""
        try:
            msg = decode(frames, C.WORKER_TO_BROKER)
        except ProtocolError as err:
            return self._refuse_undecoded(identity, frames, err, now)
        return self.dispatch(identity, msg, frames, now)

    def _refuse_undecoded(self, identity: bytes, frames: list[bytes], err: ProtocolError,
                          now: float) -> list[Effect]:
        """Refuse a message that failed validation. A bad chunk of an open push transfer (e.g. a NaN slice) answers
        the push and closes the transfer, like any refused chunk (docs/protocol.md §6.1)."""
        dropped = self.transfers.drop_undecoded(identity, peek(frames[0]) if frames else None)
        if dropped is not None:
            return [*dropped.effects, *self._refuse(identity, err, dropped.inbound.header.id, now)]
        return self._refuse(identity, err, peek_id(frames[0]) if frames else None, now)

    def dispatch(self, identity: bytes, msg: Message, frames: list[bytes], now: float) -> list[Effect]:
        """Act on a decoded message (``frames`` are the message as received: a push is stored as it came)."""
        size = payload_bytes(frames)
        self.bytes_in_by_type[msg.type] = self.bytes_in_by_type.get(msg.type, 0) + size
        record = self.registry.by_identity(identity)
        if record is not None:
            record.last_seen = now
            record.bytes_in += size
        try:
            return self._handlers[msg.type](identity, msg, frames, now)
        except ProtocolError as err:
            return self._refuse(identity, err, msg.id, now)

    def tick(self, now: float) -> list[Effect]:
        """The passing of time: forget workers not heard from for ``liveness_s``, drop stalled chunked pushes."""
        effects: list[Effect] = []
        for record in self.registry.expired(now):
            effects += self.drop(record.worker, f"lost (no message for {self.config.liveness_s:g} s)", now, "lost")
        effects += self.transfers.expire(now, self.config.liveness_s)
        return effects

    # ------------------------------------------------------------------ the one refusal path
    def _refuse(self, identity: bytes, err: ProtocolError, re: int | None, now: float) -> list[Effect]:
        """Count, log (at most once a second per code) and answer a refused message; ``re`` is the id answered."""
        key = ErrorCode(err.code).name if err.code in ErrorCode._value2member_map_ else str(err.code)
        self.rejected[key] = self.rejected.get(key, 0) + 1
        record = self.registry.by_identity(identity)
        who = record.worker if record is not None else identity.hex()[:12]
        self.events.add(now, "refused", f"{who}: {err.message[:200]}", worker=who, code=key)
        if now - self._last_refusal_log.get(key, -1e18) >= REFUSAL_LOG_EVERY_S:
            self._last_refusal_log[key] = now
            log.warning("refused a message from %s: %s (code %d %s; %d refused so far)", identity.hex()[:12],
                        err.message, err.code, key, self.rejected[key])
        else:
            log.debug("refused a message from %s: %s (code %d %s)", identity.hex()[:12], err.message, err.code, key)
        return [self._send(identity, make(C.ERROR, self.next_id(), re=re, code=err.code,
                                          reason=err.message[:1000], fix=(err.fix or None)))]

    # ------------------------------------------------------------------ messages
    def next_id(self) -> int:
        return next(self._ids)

    @staticmethod
    def _send(identity: bytes, msg: Message, frames: list[bytes] | None = None, worker: str | None = None) -> Send:
        return Send(identity, encode(msg, frames), msg.type, worker)

    def _reply(self, identity: bytes, request: Message, mtype: str, **fields: Any) -> Send:
        return self._send(identity, make(mtype, self.next_id(), re=request.id, **fields))

    def run_info(self) -> dict[str, Any]:
        """The ``run`` map of the welcome message."""
        return {"run_id": self.state["run_id"], "model": self.spec.to_wire(), "strategy": self.strategy.name,
                "rounds": self.config.rounds, "heartbeat_interval_s": self.config.heartbeat_interval_s,
                "liveness_s": self.config.liveness_s, "max_message_bytes": self.config.max_message_bytes,
                "chunk_above": self.config.chunk_above, "chunk_bytes": self.config.chunk_bytes}

    def _joined(self, identity: bytes, msg: Message) -> WorkerRecord:
        record = self.registry.by_identity(identity)
        if record is None:
            raise ProtocolError(ErrorCode.NOT_JOINED, f"{msg.type} from a worker that has not joined",
                                "send join first (the broker may have restarted)")
        return record

    def _on_join(self, identity: bytes, msg: Message, frames: list[bytes], now: float) -> list[Effect]:
        model = msg.get("model")
        if model is not None and model != self.config.model:
            raise ProtocolError(ErrorCode.MODEL_MISMATCH,
                                f"this run trains model {self.config.model!r}, the worker asked for {model!r}",
                                f"join without --model or with --model {self.config.model}")
        params = msg.get("params")
        diff = None if params is None else first_difference(self.spec.signature(), params, "broker", "worker")
        if diff is not None:
            raise ProtocolError(ErrorCode.MODEL_MISMATCH, f"the worker's model differs from this run's "
                                f"{self.spec.name!r}: {diff}", "join with the task the broker was started with")
        known = self.registry.get(msg["worker"])
        if (known is not None and known.identity == identity and known.backend == msg["backend"]
                and known.num_examples == msg["num_examples"]):
            # A retried join on the connection that already joined (the worker's welcome was late: a broker busy
            # with thousands of joins). Welcome it again and change nothing: treating it as a rejoin would drop the
            # pull it may have sent since, and under load every retry would undo the last.
            known.last_seen = now
            log.debug("worker %s: join retried on its connection; welcomed again", known.worker)
            return [self._reply(identity, msg, C.WELCOME, worker=known.worker, run=self.run_info())]
        record = WorkerRecord(msg["worker"], identity, msg["backend"], msg["num_examples"], now,
                              device=msg.get("device"), host=msg.get("host"), address=self.addresses.get(identity),
                              joined_at=now)
        again = self.registry.add(record)
        self.policy.join(record.worker)
        self.events.add(now, "rejoin" if again else "join", f"{record.worker} {'rejoined' if again else 'joined'} "
                        f"({record.backend}, {record.num_examples} examples)", worker=record.worker)
        log.info("worker %s %s (%s, %d examples, %d connected)", record.worker, "rejoined" if again else "joined",
                 record.backend, record.num_examples, len(self.registry))
        return [self._reply(identity, msg, C.WELCOME, worker=record.worker, run=self.run_info()), Wake()]

    def _on_pull(self, identity: bytes, msg: Message, frames: list[bytes], now: float) -> list[Effect]:
        record = self._joined(identity, msg)
        if self.finished:
            return [self._done(record, re=msg.id)]
        # A worker that pulls again before pushing (it restarted) will not push the work it was given, nor answer
        # an evaluation it was asked for.
        self.policy.pulled(record.worker)
        self.evaluations.gone(record.worker)
        record.pending_pull = msg.id
        record.holds_version = msg.get("version")
        record.link_bps = msg.get("link_bps", record.link_bps)
        return [Wake()]

    def _on_heartbeat(self, identity: bytes, msg: Message, frames: list[bytes], now: float) -> list[Effect]:
        record = self._joined(identity, msg)
        rtt = msg.get("rtt")
        if rtt is not None:
            record.rtt_s = float(rtt)
            if self.observer is not None:
                self.observer("heartbeat_rtt_s", float(rtt))
        return [self._reply(identity, msg, C.HEARTBEAT, t=msg.get("t"))]

    def _on_status(self, identity: bytes, msg: Message, frames: list[bytes], now: float) -> list[Effect]:
        """An operator's read-only question (``fedctl status``, docs/protocol.md §7.5): no join needed, nothing
        changes; the answer is :meth:`status`."""
        return [self._reply(identity, msg, C.STATUS_REPLY, status=self.status(now, bool(msg.get("workers", True))))]

    def status(self, now: float, workers: bool = True, events: int = C.MAX_STATUS_EVENTS) -> dict[str, Any]:
        """The run as an operator sees it: round and model, the open round, the last round's figures, bytes by
        message type, refusals by code, the last ``events`` events and (``workers``) the first MAX_STATUS_WORKERS
        workers (docs/protocol.md §7.5)."""
        current = getattr(self.policy, "current", None)
        last = {k: v for k, v in self.last_round.items() if isinstance(v, (int, float, str)) or v is None}
        out: dict[str, Any] = {
            "run_id": self.state["run_id"], "model": self.spec.name, "strategy": self.strategy.name,
            "policy": self.policy.name, "rounds": self.config.rounds, "round": int(self.state.get("round", 0)),
            "version": self.store.version, "finished": self.finished, "workers_connected": len(self.registry),
            "workers_waiting": len(self.registry.waiting()),
            "open_round": None if current is None else {"round": current.number, "sampled": len(current.selected),
                                                        "received": len(current.received),
                                                        "seconds_left": max(current.deadline - now, 0.0)},
            "transfers": self.transfer_progress(),
            "last_round": last, "bytes_in_by_type": dict(self.bytes_in_by_type), "refused": dict(self.rejected),
            "applied_updates": self.applied_total,
            "dp_epsilon": None if self.dp is None else self.dp.epsilon(),
            "events": self.events.recent(events, now),
        }
        if workers:
            records = self.registry.all()
            out["workers_total"] = len(records)
            out["workers"] = [self.worker_status(r, now) for r in records[:C.MAX_STATUS_WORKERS]]
        return out

    def worker_status(self, r: WorkerRecord, now: float) -> dict[str, Any]:
        """One worker's entry in :meth:`status` (docs/protocol.md §7.5)."""
        return {"worker": r.worker, "backend": r.backend, "device": r.device, "address": r.address,
                "num_examples": r.num_examples, "state": self.worker_state(r),
                "silent_s": round(max(now - r.last_seen, 0.0), 3),
                "connected_s": round(max(now - r.joined_at, 0.0), 1),
                "waiting": r.pending_pull is not None, "holds_version": r.holds_version,
                "link_bps": None if r.link_bps is None else int(r.link_bps), "updates": r.updates,
                "bytes_in": r.bytes_in, "bytes_out": r.bytes_out, "staleness": r.staleness,
                "rtt_s": None if r.rtt_s is None else round(r.rtt_s, 6)}

    def worker_state(self, r: WorkerRecord) -> str:
        """``uploading`` (a chunked push coming in), ``downloading`` (a chunked model going out), ``waiting`` (a
        pull waits for work), ``training`` (handed a model, not pushed yet) or ``idle``."""
        if any(identity == r.identity for identity, _ in self.inbound):
            return "uploading"
        if any(identity == r.identity for identity, _ in self.outbound):
            return "downloading"
        if r.pending_pull is not None:
            return "waiting"
        if r.handed_at is not None:
            return "training"
        return "idle"

    def transfer_progress(self) -> dict[str, Any]:
        """Chunked pushes being received (count; float32 bytes received of their total) and chunked models being
        sent (count)."""
        inbound = [t.cursor for t in self.inbound.values()]
        return {"inbound": len(inbound), "inbound_bytes": sum(c.position for c in inbound) * 4,
                "inbound_total_bytes": sum(c.total for c in inbound) * 4, "outbound": len(self.outbound)}

    def _on_evaluation(self, identity: bytes, msg: Message, frames: list[bytes], now: float) -> list[Effect]:
        """A worker's metrics on its held-out data (never answered unless refused; a repeat is ignored)."""
        record = self._joined(identity, msg)
        taken = self.evaluations.admit(record.worker, msg["version"], msg["num_examples"], msg.get("metrics", {}))
        return [Wake()] if taken else []

    def _on_failed(self, identity: bytes, msg: Message, frames: list[bytes], now: float) -> list[Effect]:
        """The worker could not train on the model it was handed: logged, and the round goes on without it (never
        answered; the worker pulls again)."""
        record = self._joined(identity, msg)
        counted = self.policy.failed(record.worker, msg["round"])
        if counted and self.secure is not None:
            self.secure.gone(record.worker)  # its input will not come: the attempt does not wait for it
        log.warning("worker %s could not train round %d%s: %s", record.worker, msg["round"],
                    "" if counted else " (no open work of it; ignored)", msg["reason"])
        return [Wake()] if counted else []

    def _on_secure(self, identity: bytes, msg: Message, frames: list[bytes], now: float) -> list[Effect]:
        """A secure-aggregation message of the open attempt: kept until the driver closes its stage, which answers
        it (refused ``SECAGG_REFUSED`` when out of step, ``UNKNOWN_TYPE`` when the run does not use it)."""
        record = self._joined(identity, msg)
        if self.secure is None:
            raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"{msg.type}: this run does not use secure aggregation",
                                "start the broker with --secure-aggregation")
        answer = self.secure.receive(record.worker, identity, msg)
        if answer is not None:
            return self.secure_effects([answer])
        if msg.type == C.SA_INPUT:
            self.policy.record(record.worker)
        return [Wake()]

    def secure_effects(self, replies: Sequence[Reply]) -> list[Effect]:
        """The messages a secure-aggregation stage closed with."""
        return [self._send(r.identity, make(r.type, self.next_id(), re=r.re, **r.fields)) for r in replies]

    def _on_leave(self, identity: bytes, msg: Message, frames: list[bytes], now: float) -> list[Effect]:
        record = self.registry.by_identity(identity)
        if record is None:
            return []
        return self.drop(record.worker, f"left ({msg.get('reason') or 'no reason given'})", now, "leave")

    # ------------------------------------------------------------------ workers
    def drop(self, worker: str, why: str, now: float, kind: str) -> list[Effect]:
        """Forget a worker (left, expired, unreachable) and stop waiting for it in the open round; ``kind`` is its
        event's (``leave`` or ``lost``)."""
        record = self.registry.remove(worker)
        if record is None:
            return []
        self.events.add(now, kind, f"{worker} {why}", worker=worker)
        self.policy.worker_gone(worker)
        self.evaluations.gone(worker)
        if self.secure is not None:
            self.secure.gone(worker)
        self.transfers.forget_worker(worker)
        log.info("worker %s %s; %d connected", worker, why, len(self.registry))
        return [Wake()]

    def peer_seen(self, identity: bytes, address: str | None) -> None:
        """The shell saw a new peer (routing identity) connect from ``address``; its join (and a join again on the
        same connection) reads it. The table keeps the newest peers, :data:`MAX_UNJOINED_PEERS` more than are
        joined (status clients and scanners come and go)."""
        if address:
            self.addresses[identity] = address
            while len(self.addresses) > MAX_UNJOINED_PEERS + len(self.registry):
                del self.addresses[next(iter(self.addresses))]

    def unreachable(self, worker: str, now: float) -> list[Effect]:
        """The shell could not deliver a model to ``worker`` (its connection is gone)."""
        return self.drop(worker, "is unreachable (its connection is gone)", now, "lost")

    def _done(self, record: WorkerRecord, re: int | None) -> Send:
        record.pending_pull = None
        return self._send(record.identity, make(C.DONE, self.next_id(), re=re, round=self.state["round"],
                                                version=self.store.version, reason="the run is complete"))

    def finish(self) -> list[Effect]:
        """The run is over: every worker hears ``done`` (as the answer to its waiting pull, if any)."""
        self.finished = True
        return [self._done(r, re=r.pending_pull) for r in self.registry.all()]

    def is_complete(self) -> bool:
        """True when the state holds a finished run: every round done, or the target accuracy reached."""
        return (self.state["round"] >= self.config.rounds or bool(self.state.get("target_reached_at"))
                or self.state.get("dp_budget_spent_at") is not None)

    # ------------------------------------------------------------------ what the drivers ask
    def try_open_round(self, round_no: int, now: float) -> OpenRound | None:
        """Sync rounds: open round ``round_no`` with a sample of the workers whose pulls wait, if the policy
        lets it start now; any update left from before is discarded."""
        assert isinstance(self.policy, SyncRoundPolicy)
        # In id order, not arrival order: with the seed, the sample depends only on who waits, so a run whose workers
        # join in another order (other processes, Ray actors) samples the same ones.
        ready = sorted(r.worker for r in self.registry.waiting())
        if not self._gathered:
            if len(ready) < self.config.gather:
                return None
            self._gathered = True  # later rounds sample whoever waits then
        opened = self.policy.try_start(round_no, ready, len(self.registry), now, self.rng)
        if opened is not None:
            self.updates = []
        return opened

    def chunked_model(self) -> int:
        """The number of chunks the dense model goes in, or 0 when it goes in one message."""
        if self.spec.nbytes <= self.config.chunk_above:
            return 0
        return chunks.count(self.shapes, self.config.chunk_bytes)

    def hand_out(self, jobs: Sequence[tuple[WorkerRecord, int]], downlinks: Mapping[int | None, Downlink],
                 now: float) -> list[Effect]:
        """Answer each worker's waiting pull with the model for round (or clock tick) ``n``: ``downlinks`` has
        what to send a worker holding each version (see :func:`fedctl.broker.downlink.build`)."""
        effects: list[Effect] = []
        secagg = None if self.secure is None else self.secure.model_fields()
        dp = None if self.secure is None else self.secure.dp_fields()
        for record, number in jobs:
            seed = int(self.rng.integers(2**31))
            task = (self.strategy.task_for_round(number, seed) if self.round_task is None
                    else {**self.round_task, "seed": seed})
            effects += self._answer_with_weights(record, downlinks, now, C.MODEL, round=number,
                                                 version=self.store.version, task=task, secagg=secagg, dp=dp)
        return effects

    def open_evaluation(self, number: int, records: Sequence[WorkerRecord],
                        downlinks: Mapping[int | None, Downlink], now: float) -> list[Effect]:
        """Open the federated evaluation of the current model after round ``number``: each of ``records`` (see
        :meth:`Evaluations.sample`) whose pull still waits is answered with ``evaluate`` (docs/protocol.md §7.2)."""
        asked = [r for r in records if self.registry.get(r.worker) is r and r.pending_pull is not None]
        self.evaluations.open(number, self.store.version, [r.worker for r in asked], now)
        effects: list[Effect] = []
        for record in asked:
            effects += self._answer_with_weights(record, downlinks, now, C.EVALUATE, round=number,
                                                 version=self.store.version)
        return effects

    def _answer_with_weights(self, record: WorkerRecord, downlinks: Mapping[int | None, Downlink], now: float,
                             mtype: str, **fields: Any) -> list[Effect]:
        """Answer ``record``'s pull with ``mtype`` carrying the weights: the delta on its version, or the dense model
        (in chunks, paced by the worker's credits, when large)."""
        chosen = downlinks[record.holds_version]
        tensors, frames, is_delta, zframes, _ = chosen if mtype == C.MODEL else chosen.without_extra()
        if zframes is not None and self.compress_for(record, frames):
            frames = zframes
        in_chunks = self.chunked_model() if not is_delta else 0
        msg = make(mtype, self.next_id(), re=record.pending_pull, tensors=None if in_chunks else tensors, **fields,
                   base=record.holds_version if is_delta else None, chunks=in_chunks or None)
        record.pending_pull = None
        if mtype == C.MODEL:
            record.handed_at, record.handed_round = now, fields["round"]
        effects: list[Effect] = [self._send(record.identity, msg, None if in_chunks else frames, record.worker)]
        if in_chunks:
            self.transfers.open_model(record.identity, msg.id, record.worker, now)
            effects.append(StartModelTransfer(record.identity, record.worker, msg.id))
        return effects

    def compress_for(self, record: WorkerRecord, frames: Sequence[bytes]) -> bool:
        """Whether ``record``'s model goes through the zlib codec: by --compress, and under ``auto`` by its link's
        measured throughput against this broker's measured deflate cost (:mod:`fedctl.wire.compression`)."""
        return worth_compressing(sum(map(len, frames)), record.link_bps, self.codec, self.config.compress)

    def chunk_message(self, xfer: int, index: int, piece: Mapping[str, Any]) -> list[bytes]:
        """The frames of chunk ``index`` of model transfer ``xfer``."""
        return encode(make(C.CHUNK, self.next_id(), slices=piece, xfer=xfer, index=index))

    def take_updates(self) -> list[Update]:
        """The accepted updates (the drivers aggregate them); the core starts a new list."""
        updates, self.updates = self.updates, []
        return updates

    def start_apply(self) -> list[Update]:
        """Clock policies: take the buffered updates to apply; until :meth:`finish_apply`, admission counts the
        version being made."""
        self.applying = True
        return self.take_updates()

    def finish_apply(self, weights: Mapping[str, np.ndarray] | None, applied: int) -> None:
        """Install the aggregate (None: nothing changed, e.g. a failed aggregation) of ``applied`` updates."""
        self.applying = False
        if weights is not None:
            self.store.replace(dict(weights))
            self.applied_total += applied

    def restore(self, updates: list[Update]) -> None:
        """Updates acknowledged before a restart and not yet applied (see the policies' ``restore``)."""
        self.updates = list(updates)
