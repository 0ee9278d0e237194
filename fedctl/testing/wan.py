"""Emulated WAN links on one machine: a network namespace joined to the root namespace by a veth pair, rate-limited
by ``tbf`` at both ends, and measurements over them (round-trip time, transfer time). The one-way delay and the
cuts come from :class:`fedctl.testing.delay_proxy.DelayProxy` (the kernel here has no ``netem``).

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
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

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
