"""Emulated WAN links on one machine: a network namespace joined to the root namespace by a veth pair, rate-limited
by ``tbf`` at both ends, and :class:`DelayProxy`, an asyncio TCP relay that adds a one-way delay per direction (the
kernel here has no ``netem``) and can cut a connection mid-transfer.

Used by ``tests/e2e/test_wan.py`` and ``scripts/wan_run.py``; docs/reliability.md ("WAN links") shows the setup.
Links need root and iproute2 (``ip``, ``tc``); :func:`netns_unavailable` says why they cannot be made here.
Every namespace and veth carries a random suffix and is removed by :func:`close_link` (also on failure).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

from fedctl.errors import ConfigError, TransportError

log = logging.getLogger(__name__)
SUBNET = "10.77"
"""Links get 10.77.X.1 (root side) and 10.77.X.2 (namespace side), X unused in the root namespace."""
NAME_PREFIX = "fedwan-"
CHUNK_BYTES = 64 * 1024


# ---------------------------------------------------------------------------------------------- links (iproute2)
@dataclass(frozen=True)
class LinkConfig:
    """A rate limit applied with ``tbf`` to both directions of a link.

    Parameters
    ----------
    rate_kbit:
        Rate of each direction in kbit/s (1000 bit/s), as ``tc`` counts it: link-layer bytes, headers included.
    burst_bytes:
        Token bucket depth: bytes that may leave at line rate before the rate applies.
    queue_ms:
        ``tbf latency``: the longest a packet may wait in the queue; it sizes the queue (more is dropped).
    """

    rate_kbit: float
    burst_bytes: int = 16 * 1024
    queue_ms: float = 200.0

    def __post_init__(self) -> None:
        if self.rate_kbit <= 0 or self.queue_ms <= 0:
            raise ConfigError("a link needs a positive rate and queue time", "e.g. LinkConfig(rate_kbit=1000)")
        if self.burst_bytes < 1600:
            raise ConfigError(f"tbf burst {self.burst_bytes} B is below one frame", "use at least 1600 bytes")

    def seconds_for(self, nbytes: int) -> float:
        """Lower bound on the time ``nbytes`` of payload take at this rate once the burst is spent."""
        return max(nbytes - self.burst_bytes, 0) * 8 / (self.rate_kbit * 1000)


@dataclass(frozen=True)
class Link:
    """A namespace with one veth pair to the root namespace; processes run inside with :meth:`exec_prefix`."""

    namespace: str
    host_if: str
    ns_if: str
    host_addr: str
    """The root namespace's end (bind servers or proxies here); the namespace reaches it through the veth."""
    ns_addr: str
    config: LinkConfig

    def exec_prefix(self) -> list[str]:
        """Prefix of a command that runs inside the namespace: ``ip netns exec NAME``."""
        return ["ip", "netns", "exec", self.namespace]


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        raise TransportError(f"could not set up an emulated link: `{' '.join(cmd)}` failed: {done.stderr.strip()}",
                             "run as root on a kernel with network namespaces, veth and sch_tbf")
    return done


def _free_octet() -> int:
    """A third octet X with no 10.77.X.0/24 address in the root namespace (random, so parallel runs rarely meet)."""
    listing = _run("ip", "-o", "-4", "addr", "show").stdout
    used = {int(m) for m in re.findall(rf"inet {re.escape(SUBNET)}\.(\d+)\.", listing)}
    free = [x for x in range(1, 255) if x not in used]
    if not free:
        raise TransportError(f"every {SUBNET}.X.0/24 subnet is in use", "delete stale links: scripts/wan_run.py "
                             "--cleanup")
    return free[secrets.randbelow(len(free))]


def open_link(config: LinkConfig) -> Link:
    """Create a namespace, a veth pair with addresses 10.77.X.1/24 (root) and .2 (namespace), and ``tbf`` on both
    ends; everything made so far is removed again when a step fails."""
    tag = secrets.token_hex(3)
    octet = _free_octet()
    link = Link(f"{NAME_PREFIX}{tag}", f"fw{tag}h", f"fw{tag}n", f"{SUBNET}.{octet}.1", f"{SUBNET}.{octet}.2",
                config)
    ns = link.exec_prefix()
    tbf = ["root", "tbf", "rate", f"{config.rate_kbit:g}kbit", "burst", str(config.burst_bytes),
           "latency", f"{config.queue_ms:g}ms"]
    try:
        _run("ip", "netns", "add", link.namespace)
        _run("ip", "link", "add", link.host_if, "type", "veth", "peer", "name", link.ns_if, "netns", link.namespace)
        _run("ip", "addr", "add", f"{link.host_addr}/24", "dev", link.host_if)
        _run("ip", "link", "set", link.host_if, "up")
        _run(*ns, "ip", "addr", "add", f"{link.ns_addr}/24", "dev", link.ns_if)
        _run(*ns, "ip", "link", "set", link.ns_if, "up")
        _run(*ns, "ip", "link", "set", "lo", "up")
        _run("tc", "qdisc", "add", "dev", link.host_if, *tbf)
        _run(*ns, "tc", "qdisc", "add", "dev", link.ns_if, *tbf)
    except BaseException:
        close_link(link)
        raise
    log.info("link %s: %s <-> %s, %g kbit/s each way", link.namespace, link.host_addr, link.ns_addr,
             config.rate_kbit)
    return link


def close_link(link: Link) -> None:
    """Remove the veth pair (both ends) and the namespace; parts already gone are skipped."""
    _run("ip", "link", "del", link.host_if, check=False)
    _run("ip", "netns", "del", link.namespace, check=False)


@contextlib.contextmanager
def wan_link(config: LinkConfig) -> Iterator[Link]:
    """:func:`open_link` for the duration of a ``with`` block, closed however the block ends."""
    link = open_link(config)
    try:
        yield link
    finally:
        close_link(link)


def netns_unavailable() -> str | None:
    """Why links cannot be emulated here (not root, no iproute2, namespaces or tbf refused), or None if they can."""
    if os.geteuid() != 0:
        return "emulated links need root (network namespaces, veth pairs, tc qdiscs)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"iproute2 is not installed (no {', '.join(missing)})"
    try:
        with wan_link(LinkConfig(rate_kbit=1000)):
            return None
    except TransportError as err:
        return err.message


def remove_stale_links() -> list[str]:
    """Delete the namespaces a killed run left (names ``fedwan-*``) and their veth pairs; returns their names."""
    listing = _run("ip", "netns", "list", check=False).stdout
    names = [line.split()[0] for line in listing.splitlines() if line.startswith(NAME_PREFIX)]
    for name in names:
        tag = name[len(NAME_PREFIX):]
        _run("ip", "link", "del", f"fw{tag}h", check=False)
        _run("ip", "netns", "del", name, check=False)
    return names


# ---------------------------------------------------------------------------------------------- delay proxy
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


# ---------------------------------------------------------------------------------------------- measurements
async def start_echo_server(host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
    """A TCP server that sends back whatever it receives (a target for :func:`measure_rtt`)."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(CHUNK_BYTES):
                writer.write(data)
                await writer.drain()
        writer.close()

    return await asyncio.start_server(echo, host, port)


async def measure_rtt(host: str, port: int, samples: int = 5) -> list[float]:
    """Round-trip times (seconds) of one-byte pings to an echo server at ``host:port``, one at a time."""
    reader, writer = await asyncio.open_connection(host, port)
    times = []
    try:
        for _ in range(samples):
            started = time.perf_counter()
            writer.write(b"p")
            await writer.drain()
            await reader.readexactly(1)
            times.append(time.perf_counter() - started)
    finally:
        writer.close()
    return times


_PEER = """
import socket, sys
host, port, n, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
s = socket.create_connection((host, port), timeout=120)
if mode == "down":
    got = 0
    while got < n:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += len(chunk)
else:
    s.sendall(bytes(n))
    s.shutdown(socket.SHUT_WR)
    s.recv(1)
s.close()
"""


async def measure_transfer(link: Link, nbytes: int, direction: str = "down", timeout_s: float = 120.0) -> float:
    """Seconds to move ``nbytes`` over ``link`` by TCP: ``down`` from the root namespace into the link's namespace,
    ``up`` the other way. Timed in the root namespace, from the peer's connection until the last byte is through."""
    if direction not in ("down", "up"):
        raise ConfigError(f"direction {direction!r}", "use 'down' or 'up'")
    took: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        started = time.perf_counter()
        if direction == "down":
            writer.write(bytes(nbytes))
            await writer.drain()
        while await reader.read(CHUNK_BYTES):  # "up": the payload; "down": the peer's EOF after the last byte
            pass
        if not took.done():
            took.set_result(time.perf_counter() - started)
        writer.close()

    server = await asyncio.start_server(serve, link.host_addr, 0)
    port = server.sockets[0].getsockname()[1]
    peer = await asyncio.create_subprocess_exec(*link.exec_prefix(), sys.executable, "-c", _PEER, link.host_addr,
                                                str(port), str(nbytes), direction)
    try:
        return await asyncio.wait_for(took, timeout_s)
    finally:
        if peer.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                peer.kill()
        await peer.wait()
        server.close()
