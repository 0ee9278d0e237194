"""An in-memory transport: a ROUTER-like endpoint and DEALER-like peers in one event loop, without sockets.

:class:`MemoryRouter` has the methods the broker's shell uses of
:class:`fedctl.broker.transport.RouterTransport` (``recv``, ``recv_ready``, ``send``, ``close``, ``counters``,
``endpoint``), so ``Broker(config, transport=MemoryRouter())`` runs a whole federation in memory; peers made with
:meth:`MemoryRouter.connect` send and receive frames like a DEALER. Frames are copied as bytes, as ZeroMQ would.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass

_names = itertools.count(1)


@dataclass
class MemoryCounters:
    """Payload bytes and messages through the router, as :class:`RouterTransport`'s counters."""

    bytes_in: int = 0
    bytes_out: int = 0
    messages_in: int = 0


class MemoryRouter:
    """The broker's end: messages from every peer in one queue, replies routed by identity."""

    def __init__(self) -> None:
        self.endpoint = f"inproc://memory-{next(_names)}"
        self.public_key: bytes | None = None
        self.counters = MemoryCounters()
        self._inbox: asyncio.Queue[tuple[bytes, list[bytes]]] = asyncio.Queue()
        self._peers: dict[bytes, MemoryDealer] = {}
        self.closed = False

    def connect(self, identity: bytes | None = None) -> MemoryDealer:
        """A new peer (its routing identity chosen like ZeroMQ's when not given)."""
        peer = MemoryDealer(self, identity or b"\x00" + next(_names).to_bytes(4, "big"))
        self._peers[peer.identity] = peer
        return peer

    def _deliver(self, identity: bytes, frames: list[bytes]) -> None:
        self.counters.bytes_in += sum(len(f) for f in frames)
        self.counters.messages_in += 1
        self._inbox.put_nowait((identity, [bytes(f) for f in frames]))

    async def recv(self) -> tuple[bytes, list[bytes]]:
        return await self._inbox.get()

    async def recv_ready(self) -> tuple[bytes, list[bytes]] | None:
        try:
            return self._inbox.get_nowait()
        except asyncio.QueueEmpty:
            return None

    async def send(self, identity: bytes, frames: list[bytes]) -> bool:
        """Queue ``frames`` for the peer; False when it has disconnected (like ROUTER_MANDATORY's EHOSTUNREACH)."""
        peer = self._peers.get(identity)
        if peer is None or self.closed:
            return False
        self.counters.bytes_out += sum(len(f) for f in frames)
        peer.inbox.put_nowait([bytes(f) for f in frames])
        return True

    def close(self) -> None:
        self.closed = True


class MemoryDealer:
    """A worker's end: ``send`` to the router, ``recv`` what it routed here."""

    def __init__(self, router: MemoryRouter, identity: bytes) -> None:
        self.router = router
        self.identity = identity
        self.inbox: asyncio.Queue[list[bytes]] = asyncio.Queue()

    def send(self, frames: list[bytes]) -> None:
        if self.router.closed:
            raise ConnectionError("the router is closed")
        self.router._deliver(self.identity, frames)

    async def recv(self, timeout_s: float = 5.0) -> list[bytes]:
        async with asyncio.timeout(timeout_s):
            return await self.inbox.get()

    def disconnect(self) -> None:
        self.router._peers.pop(self.identity, None)
