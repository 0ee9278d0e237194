"""Chunked transfers on the worker's side (docs/protocol.md §7.1): a model that comes in chunks, assembled in place
and credited chunk by chunk, and a dense update larger than the broker's ``chunk_above`` pushed as a header and
chunks of slices, paced by the broker's credits.

The chunk and credit messages of a transfer reach these functions through the connection's per-transfer queue
(:attr:`fedctl.worker.transport.Connection.transfers`); a silent broker ends a transfer with BrokerLost.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedctl.wire import SparseTensor, chunks
from fedctl.wire import constants as C
from fedctl.wire.messages import Message
from fedctl.worker.frameworks.base import Params
from fedctl.worker.transport import BrokerLost, Connection

log = logging.getLogger(__name__)
Shapes = Mapping[str, tuple[int, ...]]


def wants_chunks(tensors: Mapping[str, Any], chunk_above: int | None) -> bool:
    """Whether an update must travel in chunks: dense and larger than the broker's ``chunk_above`` (None: never)."""
    if chunk_above is None or any(isinstance(t, SparseTensor) for t in tensors.values()):
        return False
    return sum(np.asarray(t).nbytes for t in tensors.values()) > int(chunk_above)


async def receive_model(conn: Connection, model: Message, shapes: Shapes, liveness_s: float) -> Params:
    """The weights of a model that comes in chunks: each written in place, then credited, so the broker sends the
    next ones."""
    cursor = chunks.Cursor(shapes, int(model["chunks"]))
    flat = {name: np.empty(math.prod(shape), np.float32) for name, shape in shapes.items()}
    queue = conn.transfers.setdefault(model.id, asyncio.Queue())
    started = time.monotonic()
    try:
        while not cursor.done:
            msg = await conn.wait_transfer(queue, "model chunk", liveness_s)
            if msg.type != C.CHUNK:
                if msg.type == C.DONE:
                    raise BrokerLost("the run ended while the model was coming")
                continue
            for name, piece, _ in cursor.accept(msg["index"], msg.slices):
                flat[name][piece.start:piece.stop] = piece.values
            await conn.send(C.CREDIT, xfer=model.id, received=cursor.received)
    finally:
        conn.transfers.pop(model.id, None)
    log.info("received the model (%.1f MB) in %d chunks in %.1f s", cursor.total * 4 / 1e6, cursor.chunks,
             time.monotonic() - started)
    return {name: flat[name].reshape(shape) for name, shape in shapes.items()}


async def push_chunks(conn: Connection, tensors: Mapping[str, Any], fields: Mapping[str, Any], shapes: Shapes,
                      chunk_bytes: int, liveness_s: float) -> Message:
    """Send a dense update as a push header (``fields``) and chunks of slices, at most ``window`` unanswered (the
    window keeps ~0.25 s of data in flight, so heartbeats behind it are not held long on a slow link); returns the
    broker's answer to the push."""
    n = chunks.count(shapes, chunk_bytes)
    push_id = conn.next_id()
    credits = conn.transfers.setdefault(push_id, asyncio.Queue())
    window = chunks.Window(chunk_bytes)
    started = time.monotonic()
    try:
        answer = await conn.request(C.PUSH, msg_id=push_id, chunks=n, **fields)
        go = await _wait_credit(conn, credits, answer, liveness_s)  # the header was admitted: send the chunks
        if go is None:  # the broker answered the push itself: refused (or a duplicate)
            return await conn.wait_reply(answer)
        received, last = go["received"], time.monotonic()
        pieces = chunks.split({k: np.asarray(v) for k, v in tensors.items()}, shapes, chunk_bytes)
        for index, piece in enumerate(pieces):
            if answer.done():  # refused (or acknowledged as a duplicate) mid-way: stop sending
                break
            while index - received >= window.size:
                credit = await _wait_credit(conn, credits, answer, liveness_s)
                if credit is None:
                    return await conn.wait_reply(answer)
                now = time.monotonic()
                window.credited(credit["received"] - received, now - last)
                received, last = max(received, credit["received"]), now
            await conn.send(C.CHUNK, slices=piece, xfer=push_id, index=index)
        reply = await conn.wait_reply(answer)
    finally:
        conn.transfers.pop(push_id, None)
    log.info("pushed %.1f MB in %d chunks in %.1f s", sum(np.asarray(t).nbytes for t in tensors.values()) / 1e6, n,
             time.monotonic() - started)
    return reply


async def _wait_credit(conn: Connection, credits: asyncio.Queue[Message], answer: asyncio.Future[Message],
                       liveness_s: float) -> Message | None:
    """The next credit, or None when the push was answered first."""
    getter = asyncio.ensure_future(credits.get())
    try:
        async with asyncio.timeout(liveness_s):
            await asyncio.wait({getter, answer}, return_when=asyncio.FIRST_COMPLETED)
    except TimeoutError:
        raise BrokerLost(f"no credit from the broker for {liveness_s} s") from None
    finally:
        if not getter.done():
            getter.cancel()
    if conn.lost:
        raise BrokerLost()
    if getter.done() and not getter.cancelled():
        return getter.result()
    return None
