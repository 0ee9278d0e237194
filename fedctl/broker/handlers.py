"""Per-message handlers of the broker: join, pull, push, heartbeat, leave. Each validates, then acts.

Handlers run in the reader task, never block, and touch only in-memory state; the round driver in
:mod:`fedctl.broker.service` is woken through ``Broker.changed`` when something it waits for happened.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fedctl.broker import transfers
from fedctl.broker.policy import Admission
from fedctl.broker.registry import WorkerRecord
from fedctl.errors import ProtocolError
from fedctl.strategies.base import Update
from fedctl.wire import check_against_spec, unpack_sparse
from fedctl.wire import constants as C
from fedctl.wire.constants import ErrorCode
from fedctl.wire.messages import Message, make

if TYPE_CHECKING:
    from fedctl.broker.service import Broker

log = logging.getLogger(__name__)
UPDATE_DTYPES = frozenset({"<f4", "<f2"})
"""Value dtypes an update may carry: float32, or float16 to halve the bytes of kept values (e.g. DGC)."""


def _require_joined(broker: Broker, identity: bytes, msg: Message) -> WorkerRecord:
    record = broker.registry.by_identity(identity)
    if record is None:
        raise ProtocolError(ErrorCode.NOT_JOINED, f"{msg.type} from a worker that has not joined",
                            "send join first (the broker may have restarted)")
    return record


async def on_join(broker: Broker, identity: bytes, msg: Message) -> None:
    model = msg.get("model")
    if model is not None and model != broker.config.model:
        raise ProtocolError(ErrorCode.MODEL_MISMATCH,
                            f"this run trains model {broker.config.model!r}, the worker asked for {model!r}",
                            f"join without --model or with --model {broker.config.model}")
    record = WorkerRecord(msg["worker"], identity, msg["backend"], msg["num_examples"], msg.get("host", ""),
                          broker.now())
    again = broker.registry.add(record)
    broker.policy.join(record.worker)
    log.info("worker %s %s (%s, %d examples, %d connected)", record.worker, "rejoined" if again else "joined",
             record.backend, record.num_examples, len(broker.registry))
    await broker.reply(identity, msg, C.WELCOME, worker=record.worker, run=broker.run_info())
    broker.changed.set()


async def on_pull(broker: Broker, identity: bytes, msg: Message) -> None:
    record = _require_joined(broker, identity, msg)
    if broker.finished:
        await broker.send_done(record, re=msg.id)
        return
    # A worker that pulls again before pushing (it restarted) will not push the work it was given.
    broker.policy.pulled(record.worker)
    record.pending_pull = msg.id
    record.holds_version = msg.get("version")
    broker.changed.set()


async def on_push(broker: Broker, identity: bytes, msg: Message) -> None:
    record = _require_joined(broker, identity, msg)
    if broker.finished:
        raise ProtocolError(ErrorCode.RUN_FINISHED, "the run has finished; the update was not used")
    # What the update is (kind, tensor names and shapes) is checked before where it fits (round, selection),
    # so a malformed update is refused as such whatever the round's state.
    if msg["kind"] != broker.strategy.update_kind:
        raise ProtocolError(ErrorCode.WRONG_KIND, f"strategy {broker.strategy.name} needs "
                            f"{broker.strategy.update_kind!r} updates, got {msg['kind']!r}")
    chunked = msg.get("chunks") is not None
    if chunked and msg.tensors:
        raise ProtocolError(ErrorCode.BAD_FIELD, "a push with 'chunks' carries its tensors in chunk messages",
                            "send the push header alone, then the chunks")
    tensors = unpack_sparse(msg.tensors, broker.expected_shapes)  # a packed sparse frame, split per tensor
    if not chunked:  # (a chunked push's slices are checked as they come: wire.chunks.Cursor)
        # a gradient or delta may leave out tensors it does not change (zero); weights carry every tensor
        check_against_spec(tensors, broker.expected_shapes, UPDATE_DTYPES, partial=msg["kind"] != C.KIND_WEIGHTS)
    admission = _admit(broker, record, msg)
    if admission.duplicate:
        await broker.reply(identity, msg, C.ACK, round=msg["round"], seq=msg["seq"], status="duplicate")
        return
    if admission.code is not None:
        if admission.code == ErrorCode.STALE_UPDATE:
            broker.stale_refused += 1
        raise ProtocolError(admission.code, admission.reason)
    if msg["kind"] == C.KIND_WEIGHTS and broker.store.at(msg["base_version"]) is None:
        # Applied out of round, a weights update becomes the change from its base, which must still be kept.
        broker.policy.pulled(record.worker)
        raise ProtocolError(ErrorCode.STALE_UPDATE, f"update is based on model version {msg['base_version']}, "
                            "which this broker no longer keeps", "raise --history-mb or lower --max-staleness")
    if chunked:
        key = (identity, msg.id)
        if key in broker.inbound:
            broker.inbound.pop(key).abort()
        broker.inbound[key] = transfers.open_inbound(broker, msg, broker.current_frames or [])
        await broker.send(identity, make(C.CREDIT, broker.next_id(), xfer=msg.id, received=0))
        return
    # Sparse (and fp16) updates stay as they came: the strategy's kernels scatter them into one accumulator.
    update = Update(record.worker, msg["num_examples"], tensors, msg["kind"], msg["base_version"],
                    dict(msg.get("metrics") or {}), msg["round"], msg["seq"])
    await _accept(broker, identity, msg, record, update, broker.current_frames)


def _admit(broker: Broker, record: WorkerRecord, header: Message) -> Admission:
    """The policy's decision on a push (header) from ``record``. While updates are being applied, what arrives now
    is applied on top of the next version: it is counted so."""
    version = broker.store.version + (1 if broker.applying else 0)
    return broker.policy.admit(record.worker, header["round"], header["base_version"], version)


async def _accept(broker: Broker, identity: bytes, msg: Message, record: WorkerRecord, update: Update,
                  frames: list[bytes] | None) -> None:
    """Count an admitted update and acknowledge it, once durable when the broker keeps updates on disk."""
    broker.updates.append(update)
    broker.policy.record(record.worker)
    record.rounds_done += 1
    broker.changed.set()
    if broker.pending is None:
        await broker.reply(identity, msg, C.ACK, round=msg["round"], seq=msg["seq"], status="accepted")
        return
    # Durable before acknowledged (a crash after the ack loses nothing): the broker's writer task stores queued
    # updates in groups (one sync per group) off the reader, then sends their acks.
    broker.durable_queue.put_nowait((identity, msg, update, frames))


async def on_chunk(broker: Broker, identity: bytes, msg: Message) -> None:
    """A chunk of a push (written to its spool file), or of nothing this broker is receiving."""
    record = _require_joined(broker, identity, msg)
    key = (identity, msg["xfer"])
    inbound = broker.inbound.get(key)
    if inbound is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TRANSFER, f"chunk {msg['index']} of transfer {msg['xfer']}, which is "
                            "not open (it finished, failed or expired)", "push the update again")
    header = inbound.header
    try:
        inbound.write(inbound.cursor.accept(msg["index"], msg.slices))
    except ProtocolError as err:
        inbound.abort()
        del broker.inbound[key]
        await broker.refuse(identity, err, re=header.id)  # answers the push: the worker waits on that
        return
    inbound.last = broker.now()
    await broker.send(identity, make(C.CREDIT, broker.next_id(), xfer=msg["xfer"], received=inbound.cursor.received))
    if not inbound.cursor.done:
        return
    del broker.inbound[key]
    inbound.close()
    admission = _admit(broker, record, header)
    if not admission.admitted:  # the round closed (or the update went stale) while the chunks came
        inbound.abort()
        if admission.duplicate:
            await broker.reply(identity, header, C.ACK, round=header["round"], seq=header["seq"], status="duplicate")
        else:
            await broker.reply(identity, header, C.ERROR, code=int(admission.code or ErrorCode.STALE_UPDATE),
                               reason=admission.reason[:1000])
        return
    tensors = transfers.SpoolTensors(inbound.path, broker.expected_shapes, owned=broker.pending is None)
    update = Update(record.worker, header["num_examples"], tensors, header["kind"], header["base_version"],
                    dict(header.get("metrics") or {}), header["round"], header["seq"])
    log.info("worker %s pushed %.1f MB in %d chunks in %.1f s", record.worker, tensors.total * 4 / 1e6,
             inbound.cursor.chunks, broker.now() - inbound.started)
    await _accept(broker, identity, header, record, update, inbound.header_frames)


async def on_credit(broker: Broker, identity: bytes, msg: Message) -> None:
    _require_joined(broker, identity, msg)
    if not transfers.credit(broker, identity, msg):
        raise ProtocolError(ErrorCode.UNKNOWN_TRANSFER, f"credit for transfer {msg['xfer']}, which is not open")


async def on_heartbeat(broker: Broker, identity: bytes, msg: Message) -> None:
    _require_joined(broker, identity, msg)
    await broker.reply(identity, msg, C.HEARTBEAT, t=msg.get("t"))


async def on_leave(broker: Broker, identity: bytes, msg: Message) -> None:
    record = broker.registry.by_identity(identity)
    if record is not None:
        broker.drop(record, f"left ({msg.get('reason') or 'no reason given'})")


HANDLERS = {C.JOIN: on_join, C.PULL: on_pull, C.PUSH: on_push, C.HEARTBEAT: on_heartbeat, C.LEAVE: on_leave,
            C.CHUNK: on_chunk, C.CREDIT: on_credit}
