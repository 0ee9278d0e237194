"""The broker's ROUTER socket: binds, receives (identity, frames), sends, and counts payload bytes.

Transport only: it moves bytes and identities and knows nothing of message types.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import zmq
import zmq.asyncio

from fedctl.errors import TransportError

log = logging.getLogger(__name__)
LISTEN_BACKLOG = 4096


@dataclass
class ByteCounters:
    """Payload bytes (all frames but the routing identity) received and sent since start."""

    bytes_in: int = 0
    bytes_out: int = 0
    messages_in: int = 0
    messages_out: int = 0


class RouterTransport:
    """An asyncio ZeroMQ ROUTER socket bound to ``bind``.

    Parameters
    ----------
    ctx:
        The asyncio context to create the socket in.
    bind:
        ZeroMQ endpoint, e.g. ``tcp://*:5555`` or ``tcp://127.0.0.1:*`` (then read :attr:`endpoint`).
    max_message_bytes:
        ZMQ_MAXMSGSIZE: libzmq drops the connection of a peer sending a larger frame.
    """

    def __init__(self, ctx: zmq.asyncio.Context, bind: str, max_message_bytes: int) -> None:
        self._sock = ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self._sock.setsockopt(zmq.SNDHWM, 10_000)
        self._sock.setsockopt(zmq.RCVHWM, 10_000)
        # Hundreds of workers connect at once when a run starts; libzmq's default listen backlog of 100 makes the
        # kernel drop the rest of the SYNs, and their retries back off for minutes. The kernel caps this value.
        self._sock.setsockopt(zmq.BACKLOG, LISTEN_BACKLOG)
        self.counters = ByteCounters()
        try:
            self._sock.bind(bind)
        except zmq.ZMQError as exc:
            self._sock.close(0)
            if exc.errno == zmq.EADDRINUSE:
                raise TransportError(f"cannot bind {bind}: the address is already in use",
                                     "stop the other process on that port or pass another --bind port") from None
            raise TransportError(f"cannot bind {bind}: {exc.strerror}",
                                 "pass an endpoint like tcp://*:5555 or tcp://127.0.0.1:5555") from None
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        log.debug("ROUTER bound to %s", self.endpoint)

    async def recv(self) -> tuple[bytes, list[bytes]]:
        """Wait for the next message; returns the sender's routing identity and its frames."""
        parts = await self._sock.recv_multipart(copy=True)
        payload = parts[1:]
        self.counters.bytes_in += sum(len(p) for p in payload)
        self.counters.messages_in += 1
        return parts[0], payload

    async def send(self, identity: bytes, frames: list[bytes]) -> bool:
        """Send frames to ``identity``; False when that peer is no longer connected."""
        try:
            await self._sock.send_multipart([identity, *frames], copy=False)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                log.debug("peer %s is gone; message dropped", identity.hex())
                return False
            raise
        self.counters.bytes_out += sum(len(f) for f in frames)
        self.counters.messages_out += 1
        return True

    def close(self) -> None:
        self._sock.close(0)
