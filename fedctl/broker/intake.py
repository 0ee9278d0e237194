"""The core's intake of updates: ``push`` (whole, or the header of a chunked one), its ``chunk``s and the ``credit``s
of models going out — admission by the policy, acceptance, acknowledgement once durable.

When is an update durable? With clock policies (SSP, async), once it is written under ``pending/`` (the shell's
writer, :class:`~fedctl.broker.effects.Persist`). With sync rounds, once the round's checkpoint holds it: the ack
is *held* until the driver has written that checkpoint (:meth:`PushIntake.release_acks`) — the only durable
write a round then makes is its model, instead of every update's bytes (docs/reliability.md). A sync worker waits
for the next round's model anyway, so holding its ack costs it nothing but the checkpoint's write.

A part of :class:`fedctl.broker.core.BrokerCore` (a mixin it inherits), split out along the update path so that
each module stays small; sans-IO like the rest of the core.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fedctl.broker.chunking import Transfers
from fedctl.broker.config import BrokerConfig
from fedctl.broker.effects import CloseTransfer, Effect, Persist, Send, Wake
from fedctl.broker.params import ParameterStore
from fedctl.broker.policy import Admission, ClockPolicy, SyncRoundPolicy
from fedctl.broker.registry import WorkerRecord
from fedctl.errors import ProtocolError
from fedctl.strategies.base import Strategy, Update
from fedctl.wire import check_against_spec, make, split_extras, unpack_sparse
from fedctl.wire import constants as C
from fedctl.wire.constants import ErrorCode
from fedctl.wire.messages import Message

log = logging.getLogger(__name__)
UPDATE_DTYPES = frozenset({"<f4", "<f2"})
"""Value dtypes an update may carry: float32, or float16 to halve the bytes of kept values (e.g. DGC)."""


class PushIntake:
    """Handlers of the update path; the attributes and helpers below are the core's."""

    config: BrokerConfig
    strategy: Strategy
    policy: SyncRoundPolicy | ClockPolicy
    store: ParameterStore
    shapes: dict[str, tuple[int, ...]]
    transfers: Transfers
    updates: list[Update]
    durable: bool
    hold_acks: bool
    """Sync rounds with durable updates: acks wait for the round's checkpoint (see the module docstring)."""
    held: dict[int, dict[str, tuple[bytes, Message, str]]]
    """Held acks: round → worker → (routing identity, push header, ack status) of its latest push (a resend from a
    new connection replaces the first)."""
    finished: bool
    applying: bool
    open_spool: Callable[[str, bool], Any]
    _joined: Callable[[bytes, Message], WorkerRecord]
    _reply: Callable[..., Send]
    _send: Callable[..., Send]
    _refuse: Callable[[bytes, ProtocolError, int | None, float], list[Effect]]
    observer: Callable[[str, float], None] | None
    next_id: Callable[[], int]

    def _on_push(self, identity: bytes, msg: Message, frames: list[bytes], now: float) -> list[Effect]:
        record = self._joined(identity, msg)
        if self.finished:
            raise ProtocolError(ErrorCode.RUN_FINISHED, "the run has finished; the update was not used")
        # What the update is (kind, tensor names and shapes) is checked before where it fits (round, selection),
        # so a malformed update is refused as such whatever the round's state.
        if msg["kind"] != self.strategy.update_kind:
            raise ProtocolError(ErrorCode.WRONG_KIND, f"strategy {self.strategy.name} needs "
                                f"{self.strategy.update_kind!r} updates, got {msg['kind']!r}")
        chunked = msg.get("chunks") is not None
        if chunked and msg.tensors:
            raise ProtocolError(ErrorCode.BAD_FIELD, "a push with 'chunks' carries its tensors in chunk messages",
                                "send the push header alone, then the chunks")
        if chunked and self.strategy.extra_uplink:  # chunks cover the model only: the extra tensors could not come
            raise ProtocolError(ErrorCode.BAD_FIELD, f"strategy {self.strategy.name}'s pushes carry extra tensors, "
                                "so they travel whole, never in chunks", "send the push with its tensors")
        tensors = unpack_sparse(msg.tensors, self.shapes)  # a packed sparse frame, split per tensor
        if not chunked:  # (a chunked push's slices are checked as they come: wire.chunks.Cursor)
            # The strategy's extra tensors (docs/protocol.md §5.6) are checked against the tensors they shadow and
            # stay in the update; without declared prefixes any such name is refused below as not the model's.
            model, _ = split_extras(tensors, self.strategy.extra_uplink, self.shapes)
            # a gradient or delta may leave out tensors it does not change (zero); weights carry every tensor
            check_against_spec(model, self.shapes, UPDATE_DTYPES, partial=msg["kind"] != C.KIND_WEIGHTS)
        admission = self._admit(record, msg)
        if admission.duplicate:
            return self._duplicate(identity, msg, record)
        if admission.code is not None:
            raise ProtocolError(admission.code, admission.reason)
        if msg["kind"] == C.KIND_WEIGHTS and self.store.at(msg["base_version"]) is None:
            # Applied out of round, a weights update becomes the change from its base, which must still be kept.
            self.policy.pulled(record.worker)
            raise ProtocolError(ErrorCode.STALE_UPDATE, f"update is based on model version {msg['base_version']}, "
                                "which this broker no longer keeps", "raise --history-mb or lower --max-staleness")
        if chunked:
            return self._open_inbound(identity, msg, frames, now)
        # Sparse (and fp16) updates stay as they came: the strategy's kernels scatter them into one accumulator.
        return self._accept(identity, msg, record, Update.from_push(record.worker, msg, tensors), frames, None, now)

    def _admit(self, record: WorkerRecord, header: Message) -> Admission:
        """The policy's decision on a push (header) from ``record``."""
        version = self.store.version + (1 if self.applying else 0)
        return self.policy.admit(record.worker, header["round"], header["base_version"], version)

    def _accept(self, identity: bytes, msg: Message, record: WorkerRecord, update: Update, frames: list[bytes],
                spool: str | None, now: float) -> list[Effect]:
        """Count an admitted update and acknowledge it — once durable, when the broker keeps updates on disk (the
        shell's writer stores queued updates in groups, one sync per group, then sends their acks)."""
        self.updates.append(update)
        self.policy.record(record.worker)
        record.updates += 1
        record.staleness = max(self.store.version - int(msg["base_version"]), 0)
        if record.handed_at is not None and record.handed_round == msg["round"]:
            if self.observer is not None:
                self.observer("push_latency_s", now - record.handed_at)
            record.handed_at = record.handed_round = None
        log.debug("update of round %d from %s accepted", msg["round"], record.worker)
        if self.hold_acks:
            self.held.setdefault(int(msg["round"]), {})[record.worker] = (identity, msg, "accepted")
            return [Wake()]
        ack = self._reply(identity, msg, C.ACK, round=msg["round"], seq=msg["seq"], status="accepted")
        if not self.durable:
            return [ack, Wake()]
        return [Persist(update, list(frames), (ack,), spool), Wake()]

    def _duplicate(self, identity: bytes, msg: Message, record: WorkerRecord) -> list[Effect]:
        """A push the broker already has (a worker resending after a reconnect): its ack answers this push — held
        like the first one's while the round's checkpoint is not yet written, at once otherwise."""
        waiting = self.held.get(int(msg["round"]), {})
        if record.worker in waiting:
            waiting[record.worker] = (identity, msg, "duplicate")
            return []
        return [self._reply(identity, msg, C.ACK, round=msg["round"], seq=msg["seq"], status="duplicate")]

    def release_acks(self, round_no: int) -> list[Effect]:
        """The held acks of round ``round_no``, whose checkpoint is now durable."""
        return [self._reply(identity, msg, C.ACK, round=msg["round"], seq=msg["seq"], status=status)
                for identity, msg, status in self.held.pop(round_no, {}).values()]

    def refuse_held(self, round_no: int, reason: str) -> list[Effect]:
        """Round ``round_no`` failed: its held pushes are answered ``STALE_UPDATE`` (their updates were accepted,
        then not used; not counted as refused messages)."""
        return [self._send(identity, make(C.ERROR, self.next_id(), re=msg.id, code=ErrorCode.STALE_UPDATE,
                                          reason=reason[:1000]))
                for identity, msg, _ in self.held.pop(round_no, {}).values()]

    # ------------------------------------------------------------------ chunked pushes (docs/protocol.md §7.1)
    def _open_inbound(self, identity: bytes, msg: Message, frames: list[bytes], now: float) -> list[Effect]:
        return [*self.transfers.open_push(identity, msg, frames, now),
                self._send(identity, make(C.CREDIT, self.next_id(), xfer=msg.id, received=0))]

    def _on_chunk(self, identity: bytes, msg: Message, frames: list[bytes], now: float) -> list[Effect]:
        """A chunk of a push (written to its spool file), or of nothing this broker is receiving."""
        record = self._joined(identity, msg)
        got = self.transfers.receive(identity, msg, now)
        header = got.inbound.header
        if got.refused is not None:  # answers the push: the worker waits on that
            return [*got.effects, *self._refuse(identity, got.refused, header.id, now)]
        effects = [*got.effects, self._send(identity, make(C.CREDIT, self.next_id(), xfer=msg["xfer"],
                                                           received=got.inbound.cursor.received))]
        if not got.done:
            return effects
        spool, cursor = got.inbound.spool, got.inbound.cursor
        admission = self._admit(record, header)
        if not admission.admitted:  # the round closed (or the update went stale) while the chunks came
            effects.append(CloseTransfer(spool, delete=True))
            if admission.duplicate:
                return [*effects, *self._duplicate(identity, header, record)]
            late = ProtocolError(admission.code or ErrorCode.STALE_UPDATE, admission.reason)
            return [*effects, *self._refuse(identity, late, header.id, now)]
        effects.append(CloseTransfer(spool, delete=False))
        log.info("worker %s pushed %.1f MB in %d chunks in %.1f s", record.worker, cursor.total * 4 / 1e6,
                 cursor.chunks, now - got.inbound.started)
        update = Update.from_push(record.worker, header, self.open_spool(spool, self.hold_acks or not self.durable))
        return [*effects, *self._accept(identity, header, record, update, got.inbound.header_frames, spool, now)]

    def _on_credit(self, identity: bytes, msg: Message, frames: list[bytes], now: float) -> list[Effect]:
        self._joined(identity, msg)
        return self.transfers.credit(identity, msg["xfer"], msg["received"], now)
