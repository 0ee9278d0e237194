"""Chunked transfers on the broker (docs/protocol.md §7.1): updates too large for one message arrive as chunks that
go straight to a spool file, and models too large for one message leave as chunks paced by the worker's credits.

Memory stays near one model: an incoming update is never held whole (its chunks are written where they belong in
a file of the model's flat float32 layout), and aggregation reads it back one tensor at a time
(:class:`SpoolTensors`). An outgoing model is sent as views of the current weights.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import secrets
import time
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedctl.wire import chunks
from fedctl.wire import constants as C
from fedctl.wire.messages import Message, make
from fedctl.wire.tensors import TensorSlice

if TYPE_CHECKING:
    from fedctl.broker.registry import WorkerRecord
    from fedctl.broker.service import Broker

log = logging.getLogger(__name__)
_names = itertools.count(1)
_token = secrets.token_hex(6)


class SpoolTensors(Mapping[str, np.ndarray]):
    """A dense float32 update kept in a file of the model's flat layout; each tensor is read when asked for."""

    def __init__(self, path: Path, shapes: Mapping[str, tuple[int, ...]], owned: bool = False) -> None:
        self.path = Path(path)
        self.shapes = dict(shapes)
        self.offsets, self.total = chunks.flat_offsets(self.shapes)
        if owned:  # not kept by the pending store: delete the file with the last reference
            weakref.finalize(self, _unlink, self.path)

    def __getitem__(self, name: str) -> np.ndarray:
        shape = self.shapes[name]
        return np.fromfile(self.path, dtype=chunks.CHUNK_DTYPE, count=math.prod(shape),
                           offset=self.offsets[name] * chunks.CHUNK_DTYPE.itemsize).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def spool_name() -> str:
    return f"spool-{_token}-{next(_names):08d}.f4"


@dataclass
class Inbound:
    """A chunked push being received: its header message, where it stands, and its spool file."""

    header: Message
    header_frames: list[bytes]
    cursor: chunks.Cursor
    path: Path
    fd: int
    started: float
    last: float

    def write(self, pieces: list[tuple[str, TensorSlice, int]]) -> None:
        for _, piece, at in pieces:
            os.pwrite(self.fd, piece.values.tobytes(), at * chunks.CHUNK_DTYPE.itemsize)

    def close(self) -> None:
        """All chunks are written (the durable writer syncs the file before the push is acknowledged)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def abort(self) -> None:
        self.close()
        _unlink(self.path)


def open_inbound(broker: Broker, msg: Message, frames: list[bytes]) -> Inbound:
    """Start receiving a chunked push: a spool file of the model's size (sparse on disk until written)."""
    directory = broker.spool_dir
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / spool_name()
    cursor = chunks.Cursor(broker.expected_shapes, int(msg["chunks"]))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(fd, cursor.total * chunks.CHUNK_DTYPE.itemsize)
    now = broker.now()
    return Inbound(msg, list(frames[:1]), cursor, path, fd, now, now)


@dataclass
class Outbound:
    """A chunked model being sent to one worker, paced by its credits."""

    record: WorkerRecord
    xfer: int
    window: chunks.Window
    received: int = 0
    credited: asyncio.Event = field(default_factory=asyncio.Event)
    last_credit: float = field(default_factory=time.monotonic)


async def send_model_chunks(broker: Broker, out: Outbound, weights: Mapping[str, np.ndarray]) -> None:
    """Send ``weights`` to ``out.record`` as chunks of transfer ``out.xfer``, at most ``window`` unanswered.
    Gives up (the worker pulls again) when no credit comes for ``liveness_s``."""
    shapes = broker.expected_shapes
    total = chunks.count(shapes, broker.config.chunk_bytes)

    async def credited_below(limit: int, index: int) -> bool:
        """Wait until fewer than ``limit`` chunks are unanswered; False when no credit came for liveness_s."""
        while index - out.received >= limit:
            out.credited.clear()
            try:
                async with asyncio.timeout(broker.config.liveness_s):
                    await out.credited.wait()
            except TimeoutError:
                log.warning("worker %s sent no credit for %g s; model transfer %d stopped at chunk %d of %d",
                            out.record.worker, broker.config.liveness_s, out.xfer, out.received, total)
                return False
        return True

    try:
        for index, piece in enumerate(chunks.split(weights, shapes, broker.config.chunk_bytes)):
            if not await credited_below(out.window.size, index):
                return
            sent = await broker.send(out.record.identity, make(C.CHUNK, broker.next_id(), slices=piece,
                                                               xfer=out.xfer, index=index))
            if not sent:
                log.info("worker %s is unreachable; model transfer %d stopped", out.record.worker, out.xfer)
                return
        await credited_below(1, total)  # the transfer stays open for the credits still on their way
    finally:
        broker.outbound.pop((out.record.identity, out.xfer), None)


def credit(broker: Broker, identity: bytes, msg: Message) -> bool:
    """Apply a worker's credit to the model transfer it names; False when there is none."""
    out = broker.outbound.get((identity, msg["xfer"]))
    if out is None:
        return False
    if msg["received"] > out.received:
        now = time.monotonic()
        out.window.credited(msg["received"] - out.received, now - out.last_credit)
        out.received, out.last_credit = msg["received"], now
        out.credited.set()
    return True


def expire_inbound(broker: Broker, now: float) -> None:
    """Drop chunked pushes that stalled for ``liveness_s`` (the worker resends the update after reconnecting)."""
    for key, inbound in list(broker.inbound.items()):
        if now - inbound.last > broker.config.liveness_s:
            log.warning("chunked push %d stalled at chunk %d of %d for %g s; dropped", inbound.header.id,
                        inbound.cursor.received, inbound.cursor.chunks, broker.config.liveness_s)
            inbound.abort()
            del broker.inbound[key]


def model_chunks(broker: Broker) -> dict[str, Any]:
    """``{"chunks": n}`` when the dense model must go in chunks, else nothing."""
    if broker.spec.nbytes <= broker.config.chunk_above:
        return {}
    return {"chunks": chunks.count(broker.expected_shapes, broker.config.chunk_bytes)}
