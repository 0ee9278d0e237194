"""The worker's DEALER connection: one reader task, replies matched to requests by id, liveness bookkeeping.

Transport + protocol glue only: it encodes and decodes messages but has no idea what training is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import zmq
import zmq.asyncio

from fedctl.errors import ProtocolError
from fedctl.wire import constants as C
from fedctl.wire import decode, encode, make
from fedctl.wire.messages import Message

log = logging.getLogger(__name__)


class Connection:
    """One DEALER socket connected to a broker.

    Replies (messages whose ``re`` names a request) resolve that request's future; a ``done`` message sets
    :attr:`done`; anything else unsolicited lands in :attr:`inbox`. :attr:`last_heard` is the monotonic time of
    the last message from the broker, which the heartbeat task uses to judge the broker's liveness.
    """

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, max_message_bytes: int) -> None:
        self.endpoint = endpoint
        self._sock = ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self._sock.setsockopt(zmq.RECONNECT_IVL, 200)
        self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        self._sock.connect(endpoint)
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._next_id = 0
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.done = asyncio.Event()
        self.done_msg: Message | None = None
        self.last_heard = time.monotonic()
        self.bytes_out = 0
        self.bytes_in = 0
        self._reader = asyncio.get_running_loop().create_task(self._read())

    def next_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def _read(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            self.bytes_in += sum(len(f) for f in frames)
            self.last_heard = time.monotonic()
            try:
                msg = decode(frames, C.BROKER_TO_WORKER)
            except ProtocolError as err:
                log.error("ignored an invalid message from the broker: %s", err)
                continue
            if msg.type == C.DONE:
                self.done_msg = msg
                self.done.set()
            future = self._pending.pop(msg.re, None) if msg.re is not None else None
            if future is not None and not future.done():
                future.set_result(msg)
            elif msg.type != C.DONE:
                self.inbox.put_nowait(msg)

    async def send(self, mtype: str, tensors: Any = None, **fields: Any) -> int:
        """Send a message without waiting for a reply; returns its id."""
        msg = make(mtype, self.next_id(), tensors=tensors, **fields)
        frames = encode(msg)
        self.bytes_out += sum(len(f) for f in frames)
        await self._sock.send_multipart(frames, copy=False)
        return msg.id

    async def request(self, mtype: str, tensors: Any = None, **fields: Any) -> asyncio.Future[Message]:
        """Send a message and return the future of its reply (the caller decides how long to wait)."""
        msg_id = self.next_id()
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        frames = encode(make(mtype, msg_id, tensors=tensors, **fields))
        self.bytes_out += sum(len(f) for f in frames)
        await self._sock.send_multipart(frames, copy=False)
        return future

    def close(self) -> None:
        self._reader.cancel()
        for future in self._pending.values():
            future.cancel()
        self._sock.close(0)
