"""A hostile client for reliability tests and ``scripts/hostile_run.py``: it attacks a broker endpoint with garbage,
truncated and oversized frames, hostile tensor headers, a flood of valid joins and heartbeats from many identities,
half-open TCP connections and pushes for rounds it was never given, and counts what it sent and what came back.

Each behaviour is an asyncio loop on its own bare DEALER sockets (or raw TCP streams), paced by ``burst`` messages
every ``interval_s``; every socket that expects replies has a reader task draining them, so the attacker is never
a slow reader by accident. ``slow_reader`` (never drain the replies) is opt-in: see docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import zmq
import zmq.asyncio

from fedctl.errors import ConfigError, ProtocolError
from fedctl.models import get_model, init_params
from fedctl.testing.hostile_payloads import hostile_tensor_cases, sparse_update
from fedctl.wire import constants as C
from fedctl.wire import decode, encode, make
from fedctl.wire.constants import DEFAULT_MAX_MESSAGE_BYTES, ErrorCode
from fedctl.wire.tensors import Tensor

log = logging.getLogger(__name__)
Frames = list[bytes]
Behaviour = Callable[["HostileClient"], Coroutine[Any, Any, None]]
BEHAVIOURS: dict[str, Behaviour] = {}
"""Registry of attack behaviours by name."""
DEFAULT_BEHAVIOURS = ("garbage", "truncated", "oversized", "hostile_tensors", "flood", "half_open", "rogue_push")
"""What a broker must shrug off. ``slow_reader`` is left out: today it kills the broker (docs/reliability.md)."""
ZMTP_PARTIAL_GREETING = b"\xff" + bytes(8) + b"\x7f\x03"
"""The first 11 of ZMTP 3's 64 greeting bytes: signature and major version, then nothing more."""


def behaviour(name: str) -> Callable[[Behaviour], Behaviour]:
    def register(fn: Behaviour) -> Behaviour:
        BEHAVIOURS[name] = fn
        return fn
    return register


@dataclass(frozen=True)
class HostileConfig:
    """What to attack and how hard.

    Parameters
    ----------
    endpoint:
        The broker's ZeroMQ endpoint (``half_open`` needs a ``tcp://`` one and is skipped otherwise).
    behaviours:
        Names from :data:`BEHAVIOURS`, run concurrently.
    identities:
        DEALER sockets (each a routing identity and a joined worker ``mallory-N``) of the ``flood``.
    half_open:
        Raw TCP connections held open: half send a partial ZMTP greeting, half send nothing.
    max_message_bytes:
        The broker's ZMQ_MAXMSGSIZE; each ``oversized`` frame is 1 KiB above it.
    burst, interval_s:
        Each behaviour sends ``burst`` messages, then sleeps ``interval_s``.
    """

    endpoint: str
    behaviours: tuple[str, ...] = DEFAULT_BEHAVIOURS
    identities: int = 200
    half_open: int = 50
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    model: str = "mlp"
    burst: int = 5
    interval_s: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.behaviours) - set(BEHAVIOURS))
        if unknown:
            raise ConfigError(f"unknown hostile behaviours {unknown}", f"choose from {', '.join(sorted(BEHAVIOURS))}")
        if self.identities < 1 or self.half_open < 0 or self.burst < 1 or not self.interval_s > 0:
            raise ConfigError("identities and burst must be >= 1, half_open >= 0 and interval_s > 0")


@dataclass
class HostileStats:
    """What the attacker did and what came back, each counted by behaviour (replies by type or error code)."""

    sent: Counter[str] = field(default_factory=Counter)
    bytes_sent: Counter[str] = field(default_factory=Counter)
    replies: Counter[str] = field(default_factory=Counter)
    """Replies by ``behaviour:type``, errors as ``behaviour:error:CODE_NAME``."""
    connections: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    """Connections the broker closed (oversized frames, half-open connections at the handshake timeout)."""
    errors: Counter[str] = field(default_factory=Counter)

    def replies_to(self, name: str) -> dict[str, int]:
        """The replies one behaviour got, by type or error code."""
        return {k.split(":", 1)[1]: n for k, n in self.replies.items() if k.split(":", 1)[0] == name}

    def to_dict(self) -> dict[str, Any]:
        return {"messages": sum(self.sent.values()), "bytes": sum(self.bytes_sent.values()),
                "sent": dict(self.sent), "bytes_sent": dict(self.bytes_sent),
                "replies": dict(sorted(self.replies.items())), "connections": dict(self.connections),
                "dropped": dict(self.dropped), "errors": dict(self.errors)}


def reply_key(frames: Frames) -> str:
    """``type`` of a broker reply, ``error:CODE_NAME`` for an error, ``undecodable`` when it breaks the protocol."""
    try:
        msg = decode(frames, C.BROKER_TO_WORKER)
    except ProtocolError:
        return "undecodable"
    if msg.type != C.ERROR:
        return msg.type
    code = msg["code"]
    return f"error:{ErrorCode(code).name if code in ErrorCode._value2member_map_ else code}"


class HostileClient:
    """Runs the configured behaviours against one broker until :meth:`stop` or a duration.

    Parameters
    ----------
    config:
        The attack.
    ctx:
        The asyncio ZeroMQ context for its sockets (all closed with linger 0 when :meth:`run` returns).
    """

    def __init__(self, config: HostileConfig, ctx: zmq.asyncio.Context | None = None) -> None:
        self.config = config
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.stats = HostileStats()
        self.spec = get_model(config.model)
        self._ids = itertools.count(1)
        self._sockets: list[zmq.asyncio.Socket] = []
        self._readers: list[asyncio.Task[None]] = []
        self._tg: asyncio.TaskGroup | None = None
        self._stop = asyncio.Event()
        self._ready = asyncio.Event()
        self._unready = set(config.behaviours)

    # ------------------------------------------------------------------ control
    def stop(self) -> None:
        """End the attack: :meth:`run` cancels every behaviour, closes every socket and returns."""
        self._stop.set()

    async def wait_ready(self) -> None:
        """Wait until every behaviour is under way (the flood joined, the half-open connections are held)."""
        await self._ready.wait()

    async def run(self, duration_s: float | None = None) -> HostileStats:
        """Attack until :meth:`stop` is called or ``duration_s`` passes; returns the counts."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tasks = [tg.create_task(BEHAVIOURS[name](self), name=f"hostile-{name}")
                         for name in self.config.behaviours]
                try:
                    await asyncio.wait_for(self._stop.wait(), duration_s)
                except TimeoutError:
                    pass
                for task in [*tasks, *self._readers]:
                    task.cancel()
        finally:
            self._tg = None
            for sock in self._sockets:
                sock.close(0)
            self._sockets.clear()
        return self.stats

    def set_up(self, name: str) -> None:
        """Behaviour ``name`` is under way."""
        self._unready.discard(name)
        if not self._unready:
            self._ready.set()

    # ------------------------------------------------------------------ sockets
    def dealer(self, name: str, read: bool = True, **options: int) -> zmq.asyncio.Socket:
        """A DEALER connected to the broker; with ``read``, a reader task counts its replies under ``name``."""
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        for option, value in options.items():
            sock.setsockopt(getattr(zmq, option), value)
        sock.connect(self.config.endpoint)
        self._sockets.append(sock)
        self.stats.connections[name] += 1
        if read and self._tg is not None:
            self._readers.append(self._tg.create_task(self._drain(name, sock)))
        return sock

    def discard(self, sock: zmq.asyncio.Socket) -> None:
        self._sockets.remove(sock)
        sock.close(0)

    async def _drain(self, name: str, sock: zmq.asyncio.Socket) -> None:
        # Runs until run() cancels it; a reply lost to that cancellation is never needed.
        while True:
            self.stats.replies[f"{name}:{reply_key(await sock.recv_multipart())}"] += 1

    async def send(self, name: str, sock: zmq.asyncio.Socket, frames: Frames) -> None:
        await sock.send_multipart(frames)
        self.stats.sent[name] += 1
        self.stats.bytes_sent[name] += sum(len(f) for f in frames)

    async def pace(self, name: str, sock: zmq.asyncio.Socket, make_frames: Callable[[], Frames]) -> None:
        """Send ``make_frames()`` in bursts, forever (until cancelled)."""
        while True:
            for _ in range(self.config.burst):
                await self.send(name, sock, make_frames())
            await asyncio.sleep(self.config.interval_s)

    # ------------------------------------------------------------------ messages
    def msg(self, mtype: str, tensors: dict[str, Tensor] | None = None, **fields: Any) -> Frames:
        return encode(make(mtype, next(self._ids), tensors=tensors, **fields))

    def join(self, worker: str) -> Frames:
        return self.msg(C.JOIN, worker=worker, backend="hostile", num_examples=100)

    def push(self, round_no: int, tensors: dict[str, Tensor], kind: str = C.KIND_WEIGHTS, base: int = 0) -> Frames:
        return self.msg(C.PUSH, tensors, round=round_no, base_version=base, seq=next(self._ids), kind=kind,
                        num_examples=100)


# ---------------------------------------------------------------------------------------------- payloads
def truncated(client: HostileClient, rng: random.Random) -> Frames:
    """A valid message cut short: in its header (MALFORMED) or in its tensor frame (BAD_TENSOR)."""
    frames = client.push(1, {"fc3.bias": np.zeros(10, np.float32)}) if rng.random() < 0.5 else client.join("cut")
    last = len(frames) - 1
    return [*frames[:last], frames[last][:rng.randrange(len(frames[last]))]]


# ---------------------------------------------------------------------------------------------- behaviours
@behaviour("garbage")
async def _garbage(client: HostileClient) -> None:
    sock, rng = client.dealer("garbage"), random.Random(client.config.seed + 1)
    client.set_up("garbage")
    await client.pace("garbage", sock, lambda: [rng.randbytes(rng.randrange(257)) for _ in range(rng.randint(1, 3))])


@behaviour("truncated")
async def _truncated(client: HostileClient) -> None:
    sock, rng = client.dealer("truncated"), random.Random(client.config.seed + 2)
    client.set_up("truncated")
    await client.pace("truncated", sock, lambda: truncated(client, rng))


@behaviour("hostile_tensors")
async def _hostile_tensors(client: HostileClient) -> None:
    sock, cases = client.dealer("hostile_tensors"), itertools.cycle(hostile_tensor_cases())
    client.set_up("hostile_tensors")
    await client.pace("hostile_tensors", sock, lambda: next(cases)[1])


@behaviour("oversized")
async def _oversized(client: HostileClient) -> None:
    """One frame above ZMQ_MAXMSGSIZE per fresh connection; libzmq must drop it, which the monitor sees."""
    frame = bytes(client.config.max_message_bytes + 1024)
    client.set_up("oversized")
    while True:
        sock = client.dealer("oversized", read=False)
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            await client.send("oversized", sock, [frame])
            if await monitor.poll(5000):
                client.stats.dropped["oversized"] += 1
        finally:
            sock.disable_monitor()
            monitor.close(0)
            client.discard(sock)
        await asyncio.sleep(client.config.interval_s * client.config.burst)


@behaviour("flood")
async def _flood(client: HostileClient) -> None:
    """Many identities join as distinct workers, then send valid heartbeats round-robin (they never pull)."""
    socks = [client.dealer("flood") for _ in range(client.config.identities)]
    for i, sock in enumerate(socks):
        await client.send("flood", sock, client.join(f"mallory-{i}"))
    client.set_up("flood")
    turn = itertools.cycle(socks)
    while True:
        for _ in range(client.config.burst):
            await client.send("flood", next(turn), client.msg(C.HEARTBEAT, t=0.0))
        await asyncio.sleep(client.config.interval_s)


@behaviour("rogue_push")
async def _rogue_push(client: HostileClient) -> None:
    """A joined worker that never pulls pushes valid-looking updates for rounds 0..9: it was given none of them."""
    sock, rng = client.dealer("rogue_push"), random.Random(client.config.seed + 3)
    params = init_params(client.spec, client.config.seed)
    await client.send("rogue_push", sock, client.join("mallory-rogue"))
    client.set_up("rogue_push")
    count = itertools.count()

    def frames() -> Frames:
        n = next(count)
        tensors: dict[str, Tensor] = dict(params) if n % 20 == 0 else sparse_update(params, rng)
        return client.push(n % 10, tensors, C.KIND_GRADIENT if n % 7 == 3 else C.KIND_WEIGHTS, base=n % 3)

    await client.pace("rogue_push", sock, frames)


@behaviour("half_open")
async def _half_open(client: HostileClient) -> None:
    """Hold raw TCP connections that never finish the ZMTP handshake; reconnect when the broker drops one."""
    parts = urlsplit(client.config.endpoint)
    if parts.scheme != "tcp" or parts.hostname is None or parts.port is None:
        log.warning("half_open needs a tcp:// endpoint, not %s; skipped", client.config.endpoint)
        client.set_up("half_open")
        return
    host = "127.0.0.1" if parts.hostname == "*" else parts.hostname
    held = asyncio.Semaphore(0)
    async with asyncio.TaskGroup() as tg:
        for i in range(client.config.half_open):
            tg.create_task(_hold(client, host, parts.port, ZMTP_PARTIAL_GREETING if i % 2 else b"", held))
        for _ in range(client.config.half_open):
            await held.acquire()
        client.set_up("half_open")


async def _hold(client: HostileClient, host: str, port: int, greeting: bytes, held: asyncio.Semaphore) -> None:
    first = True
    while True:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            client.stats.errors["half_open"] += 1
            await asyncio.sleep(0.5)
            continue
        client.stats.connections["half_open"] += 1
        try:
            if greeting:
                writer.write(greeting)
                await writer.drain()
                client.stats.sent["half_open"] += 1
                client.stats.bytes_sent["half_open"] += len(greeting)
            if first:
                first = False
                held.release()
            while await reader.read(4096):  # the broker's own greeting; b"" when it closes the connection
                pass
            client.stats.dropped["half_open"] += 1
        except OSError:
            client.stats.dropped["half_open"] += 1
        finally:
            writer.close()


@behaviour("slow_reader")
async def _slow_reader(client: HostileClient) -> None:
    """Garbage from a DEALER that never reads the error replies, with the smallest receive buffers it can ask for."""
    sock = client.dealer("slow_reader", read=False, RCVHWM=1, RCVBUF=4096)
    client.set_up("slow_reader")
    await client.pace("slow_reader", sock, lambda: [b"\xc1"])
