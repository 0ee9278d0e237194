"""An asyncio TCP relay that adds a one-way delay per direction and can cut a connection mid-transfer
(:class:`DelayProxy`, :class:`CutPlan`): with the ``tbf`` links of :mod:`fedctl.testing.wan` it emulates a WAN
path on one machine, whose kernel has no ``netem``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from fedctl.errors import ConfigError

log = logging.getLogger(__name__)
CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True)
class CutPlan:
    """When :class:`DelayProxy` resets a connection (RST both sides), to emulate a link dropping mid-transfer.

    Parameters
    ----------
    after_bytes:
        Cut a connection once this many bytes went through it in ``direction``.
    at_s:
        Cut a connection this many seconds after it opened.
    times:
        Connections to cut in all; later ones pass untouched.
    direction:
        ``"down"`` (target → client) or ``"up"`` (client → target), for ``after_bytes``.
    """

    after_bytes: int | None = None
    at_s: float | None = None
    times: int = 1
    direction: str = "down"

    def __post_init__(self) -> None:
        if self.after_bytes is None and self.at_s is None:
            raise ConfigError("a cut needs after_bytes or at_s", "e.g. CutPlan(after_bytes=100_000)")
        if self.times < 1 or self.direction not in ("down", "up"):
            raise ConfigError("a cut needs times >= 1 and direction 'down' or 'up'", "e.g. CutPlan(at_s=5)")


class _Cut(Exception):
    """Internal: the plan says this connection ends now."""


@dataclass
class _Conn:
    number: int
    opened: float
    writers: tuple[asyncio.StreamWriter, asyncio.StreamWriter]
    sent: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})
    last: dict[str, float] = field(default_factory=dict)


class DelayProxy:
    """Relay TCP connections from ``listen_host:listen_port`` to ``target``, each byte delayed by ``delay_up_s``
    (client → target) or ``delay_down_s`` (target → client), order preserved; optionally cut per ``cut``.

    Each direction is a reader that stamps every chunk with its due time and a writer that sleeps until then, so
    the delay adds to (not multiplies) the time a transfer takes; at most ``max_queued_chunks`` wait per direction,
    after which the reader stops reading (back-pressure). TCP's own acknowledgements are not delayed: the delay
    is seen by the application's messages, not by TCP's congestion window.
    """

    def __init__(self, target: tuple[str, int], *, listen_host: str = "127.0.0.1", listen_port: int = 0,
                 delay_up_s: float = 0.0, delay_down_s: float = 0.0, cut: CutPlan | None = None,
                 max_queued_chunks: int = 64) -> None:
        if delay_up_s < 0 or delay_down_s < 0 or max_queued_chunks < 1:
            raise ConfigError("proxy delays must be >= 0 and the queue >= 1 chunk", "e.g. delay_down_s=0.3")
        self.target, self.listen = target, (listen_host, listen_port)
        self.delay_s = {"up": delay_up_s, "down": delay_down_s}
        self.cut, self.cuts_left = cut, cut.times if cut else 0
        self.max_queued_chunks = max_queued_chunks
        self.connections = 0
        self.bytes = {"up": 0, "down": 0}
        self.max_gap_s = {"up": 0.0, "down": 0.0}
        """Longest silence within one connection, per direction (e.g. between heartbeats)."""
        self.cut_events: list[dict[str, Any]] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    async def start(self) -> tuple[str, int]:
        """Start listening; returns the bound (host, port)."""
        self._server = await asyncio.start_server(self._handle, *self.listen)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.listen = (host, port)
        return host, port

    @property
    def endpoint(self) -> str:
        """``tcp://HOST:PORT`` of the listening side (after :meth:`start`)."""
        return f"tcp://{self.listen[0]}:{self.listen[1]}"

    async def close(self) -> None:
        """Stop listening and reset every open connection."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> DelayProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def stats(self) -> dict[str, Any]:
        """Connections, bytes per direction, longest in-connection silence and the cuts made."""
        return {"connections": self.connections, "bytes_up": self.bytes["up"], "bytes_down": self.bytes["down"],
                "max_gap_up_s": round(self.max_gap_s["up"], 3), "max_gap_down_s": round(self.max_gap_s["down"], 3),
                "delay_up_s": self.delay_s["up"], "delay_down_s": self.delay_s["down"], "cuts": self.cut_events}

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        number = self.connections
        try:
            try:
                server_r, server_w = await asyncio.open_connection(*self.target)
            except OSError as err:
                log.warning("proxy %s: target %s:%d refused connection %d: %s", self.endpoint, *self.target,
                            number, err)
                _reset(client_w)
                return
            conn = _Conn(number, time.monotonic(), (client_w, server_w))
            timer = asyncio.ensure_future(self._cut_at(conn)) if self.cut and self.cut.at_s is not None else None
            try:
                await _together(self._relay(client_r, server_w, "up", conn),
                                self._relay(server_r, client_w, "down", conn))
            except (_Cut, OSError):
                pass  # a planned cut, or a peer that went away: both sides are reset below
            finally:
                if timer is not None:
                    timer.cancel()
                    await asyncio.gather(timer, return_exceptions=True)  # the timer ends with its connection
                _reset(client_w)
                _reset(server_w)
        except asyncio.CancelledError:
            if not self._closing:
                raise
            # Cancelled by close(): end quietly (asyncio logs a cancelled client_connected_cb as an error).
        finally:
            self._tasks.discard(task)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str,
                     conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(self.max_queued_chunks)
        delay_s = self.delay_s[direction]

        async def receive() -> None:
            while True:
                data = await reader.read(CHUNK_BYTES)
                await queue.put((loop.time() + delay_s, data))
                if not data:
                    return

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                if not data:
                    if writer.can_write_eof() and not writer.is_closing():
                        writer.write_eof()
                    return
                await self._forward(writer, data, direction, conn)

        await _together(receive(), deliver())

    async def _forward(self, writer: asyncio.StreamWriter, data: bytes, direction: str, conn: _Conn) -> None:
        now = time.monotonic()
        gap = now - conn.last.get(direction, conn.opened)
        conn.last[direction] = now
        self.max_gap_s[direction] = max(self.max_gap_s[direction], gap)
        plan = self.cut
        if plan is not None and plan.after_bytes is not None and plan.direction == direction and self.cuts_left:
            room = plan.after_bytes - conn.sent[direction]
            if room <= len(data):
                writer.write(data[:room])
                self._count(conn, direction, room)
                self._note_cut(conn, f"after {plan.after_bytes} bytes {direction}")
                raise _Cut()
        writer.write(data)
        self._count(conn, direction, len(data))
        await writer.drain()

    def _count(self, conn: _Conn, direction: str, nbytes: int) -> None:
        conn.sent[direction] += nbytes
        self.bytes[direction] += nbytes

    def _note_cut(self, conn: _Conn, why: str) -> None:
        self.cuts_left -= 1
        event = {"connection": conn.number, "after_s": round(time.monotonic() - conn.opened, 3),
                 "bytes_up": conn.sent["up"], "bytes_down": conn.sent["down"], "why": why}
        self.cut_events.append(event)
        log.warning("proxy %s: cut connection %d %s (%d bytes up, %d down)", self.endpoint, conn.number, why,
                    conn.sent["up"], conn.sent["down"])

    async def _cut_at(self, conn: _Conn) -> None:
        assert self.cut is not None and self.cut.at_s is not None
        await asyncio.sleep(self.cut.at_s)
        if self.cuts_left:
            self._note_cut(conn, f"at {self.cut.at_s:g} s")
            for writer in conn.writers:
                _reset(writer)


async def _together(*coros: Coroutine[Any, Any, None]) -> None:
    """Run ``coros`` until all end or one raises; that exception propagates and the others are cancelled."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            error = None if task.cancelled() else task.exception()
            if error is not None:
                raise error
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), as a dropped link looks to the peer, without waiting for queued data."""
    if writer.transport.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
