"""The core's chunked transfers (docs/protocol.md §7.1), sans-IO: pushes received chunk by chunk into spool files,
and the credit windows of models sent in chunks. Part of the broker core: no socket, no file, no clock of its own —
it says what to do with the spool files as effects, and takes the time as an argument.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedctl.broker.effects import CloseTransfer, Credited, Effect, OpenTransfer, WriteChunk
from fedctl.errors import ProtocolError
from fedctl.wire import chunks
from fedctl.wire.constants import ErrorCode
from fedctl.wire.messages import Message

log = logging.getLogger(__name__)
ITEM = chunks.CHUNK_DTYPE.itemsize


@dataclass
class Inbound:
    """A chunked push being received: its header, where it stands, and the spool file its tensors go to."""

    header: Message
    header_frames: list[bytes]
    cursor: chunks.Cursor
    spool: str
    started: float
    last: float


@dataclass
class Outbound:
    """A chunked model being sent to one worker: how far its credits reach and how fast they come."""

    worker: str
    window: chunks.Window
    received: int = 0
    last_credit: float = 0.0


@dataclass
class Received:
    """What one chunk did to its transfer: the effects, whether the push is complete, or why it was refused (then
    the transfer is closed and the refusal answers the push)."""

    inbound: Inbound
    effects: list[Effect] = field(default_factory=list)
    done: bool = False
    refused: ProtocolError | None = None


class Transfers:
    """The open chunked transfers of one broker, keyed by (routing identity, transfer id)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], chunk_bytes: int) -> None:
        self.shapes = dict(shapes)
        self.chunk_bytes = chunk_bytes
        self.inbound: dict[tuple[bytes, int], Inbound] = {}
        self.outbound: dict[tuple[bytes, int], Outbound] = {}
        self._spools = itertools.count(1)
        self._token = secrets.token_hex(6)  # a restarted broker never reuses a spool name

    # -- pushes in -----------------------------------------------------------------------------------------------
    def open_push(self, identity: bytes, header: Message, frames: list[bytes], now: float) -> list[Effect]:
        """Start receiving the admitted push ``header`` (it replaces an open transfer of the same id)."""
        effects: list[Effect] = []
        old = self.inbound.pop((identity, header.id), None)
        if old is not None:
            effects.append(CloseTransfer(old.spool, delete=True))
        cursor = chunks.Cursor(self.shapes, int(header["chunks"]))
        spool = f"spool-{self._token}-{next(self._spools):08d}.f4"
        self.inbound[(identity, header.id)] = Inbound(header, list(frames[:1]), cursor, spool, now, now)
        effects.append(OpenTransfer(spool, cursor.total * ITEM))
        return effects

    def receive(self, identity: bytes, msg: Message, now: float) -> Received:
        """Check chunk ``msg`` against its transfer and say where its slices go; UNKNOWN_TRANSFER when none is open.
        A complete transfer is closed (its spool kept) and no longer open."""
        key = (identity, msg["xfer"])
        inbound = self.inbound.get(key)
        if inbound is None:
            raise ProtocolError(ErrorCode.UNKNOWN_TRANSFER, f"chunk {msg['index']} of transfer {msg['xfer']}, "
                                "which is not open (it finished, failed or expired)", "push the update again")
        try:
            pieces = inbound.cursor.accept(msg["index"], msg.slices)
        except ProtocolError as err:
            del self.inbound[key]
            return Received(inbound, [CloseTransfer(inbound.spool, delete=True)], refused=err)
        inbound.last = now
        got = Received(inbound, [WriteChunk(inbound.spool, [(at * ITEM, p.values) for _, p, at in pieces])])
        if inbound.cursor.done:
            del self.inbound[key]
            got.done = True
        return got

    def drop_undecoded(self, identity: bytes, header: Mapping[str, Any] | None) -> Received | None:
        """A message that failed validation whose header names an open push transfer of its sender (a chunk with a
        bad slice frame): that transfer is closed, and the refusal answers its push."""
        if header is None or header.get("type") != "chunk" or not isinstance(header.get("xfer"), int):
            return None
        inbound = self.inbound.pop((identity, header["xfer"]), None)
        if inbound is None:
            return None
        return Received(inbound, [CloseTransfer(inbound.spool, delete=True)])

    def expire(self, now: float, liveness_s: float) -> list[Effect]:
        """Drop pushes stalled for ``liveness_s`` (the worker resends the update after reconnecting)."""
        effects: list[Effect] = []
        for key, inbound in list(self.inbound.items()):
            if now - inbound.last > liveness_s:
                log.warning("chunked push %d stalled at chunk %d of %d for %g s; dropped", inbound.header.id,
                            inbound.cursor.received, inbound.cursor.chunks, liveness_s)
                del self.inbound[key]
                effects.append(CloseTransfer(inbound.spool, delete=True))
        return effects

    # -- models out ----------------------------------------------------------------------------------------------
    def open_model(self, identity: bytes, xfer: int, worker: str, now: float) -> None:
        self.outbound[(identity, xfer)] = Outbound(worker, chunks.Window(self.chunk_bytes), last_credit=now)

    def credit(self, identity: bytes, xfer: int, received: int, now: float) -> list[Effect]:
        """The worker has ``received`` chunks of model transfer ``xfer``; UNKNOWN_TRANSFER when none is open."""
        out = self.outbound.get((identity, xfer))
        if out is None:
            raise ProtocolError(ErrorCode.UNKNOWN_TRANSFER, f"credit for transfer {xfer}, which is not open")
        if received <= out.received:
            return []
        out.window.credited(received - out.received, now - out.last_credit)
        out.received, out.last_credit = received, now
        return [Credited(identity, xfer)]

    def forget_worker(self, worker: str) -> None:
        """The worker is gone: its model transfers end (their senders stop)."""
        for key in [k for k, out in self.outbound.items() if out.worker == worker]:
            del self.outbound[key]
