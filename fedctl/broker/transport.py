"""The broker's ROUTER socket: binds, receives (identity, frames), sends, and counts payload bytes; with keys, a
CURVE server whose ZAP handler admits only the allowed worker keys.

Transport only: it moves bytes and identities and knows nothing of message types.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from fedctl.errors import ConfigError, TransportError
from fedctl.security import WARN_AGAIN_S, AllowedKeys, load_key_pair
from fedctl.zerocopy import frames_of

log = logging.getLogger(__name__)
LISTEN_BACKLOG = 4096
MAX_REMEMBERED_REFUSALS = 10_000
MAX_SEEN_PEERS = 65_536
"""Routing identities remembered as already reported to :attr:`RouterTransport.peer_seen` (oldest forgotten)."""


def _peer_address(frame: zmq.Frame) -> str | None:
    """The network address a message came from (libzmq's ``Peer-Address`` property), when the transport has one."""
    try:
        address = frame.get("Peer-Address")
    except (zmq.ZMQError, KeyError, ValueError):
        return None
    return address if isinstance(address, str) else None


@dataclass
class ByteCounters:
    """Payload bytes (all frames but the routing identity) received and sent since start."""

    bytes_in: int = 0
    bytes_out: int = 0
    messages_in: int = 0


class WorkerKeyAuthenticator(AsyncioAuthenticator):
    """The ZAP handler of a CURVE broker: admits a worker whose public key is allowed and logs each refusal.

    A credentials callback rather than ``configure_curve(location=DIR)``, so a refusal is logged at WARNING (with
    the key and the peer's address) and a key file copied into the directory while the broker runs is honoured.
    A refused key that keeps reconnecting is logged again at most every ``WARN_AGAIN_S`` seconds.
    """

    def __init__(self, ctx: zmq.asyncio.Context, allowed: AllowedKeys) -> None:
        super().__init__(ctx, log=log)  # pyzmq's own ZAP trace goes to fedctl's logger at DEBUG (-v)
        self.allowed = allowed
        self._peer = "?"
        self._warned: dict[bytes, float] = {}
        self.configure_curve_callback("*", credentials_provider=self)

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        # The credentials callback is not told the peer's address; requests are handled one at a time.
        self._peer = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "?"
        await super().handle_zap_message(msg)

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's credentials-provider hook: may the CURVE client with Z85 public ``key`` connect?"""
        if self.allowed.allows(key):
            log.debug("admitted worker key %s from %s", key.decode("ascii", "replace"), self._peer)
            return True
        now = time.monotonic()
        if now - self._warned.get(key, -WARN_AGAIN_S) >= WARN_AGAIN_S:
            if len(self._warned) >= MAX_REMEMBERED_REFUSALS:
                self._warned.clear()
            self._warned[key] = now
            log.warning("refused worker key %s from %s: it is not in %s", key.decode("ascii", "replace"),
                        self._peer, self.allowed.directory)
        return False


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
    secret_key, allowed_keys:
        Both or neither. With them the socket is a CURVE server (traffic encrypted, the broker authenticated by
        its key pair from the ``NAME.key_secret`` file ``secret_key``) and a ZAP handler on ``ctx`` admits only
        workers whose public key is a ``*.key`` file in the directory ``allowed_keys``. Needs a running event
        loop, and one CURVE transport per context (ZeroMQ has one ZAP endpoint per context).
    """

    def __init__(self, ctx: zmq.asyncio.Context, bind: str, max_message_bytes: int, *,
                 secret_key: Path | None = None, allowed_keys: Path | None = None) -> None:
        if (secret_key is None) != (allowed_keys is None):
            raise ConfigError("CURVE needs both a secret key and an allowed-keys directory",
                              "pass both --secret-key and --allowed-keys, or neither")
        keys = load_key_pair(secret_key) if secret_key is not None else None
        allowed = AllowedKeys(allowed_keys) if allowed_keys is not None else None
        self.public_key: bytes | None = keys.public if keys is not None else None
        """The broker's Z85 public key when it is a CURVE server (workers pass it as ``--server-key``)."""
        self.authenticator: WorkerKeyAuthenticator | None = None
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
        self.peer_seen: Callable[[bytes, str | None], None] | None = None
        """Told the routing identity and network address of each new peer (its first message)."""
        self._seen: dict[bytes, None] = {}
        try:
            if keys is not None and allowed is not None:
                self.authenticator = _start_authenticator(ctx, allowed)
                self._sock.curve_secretkey = keys.secret
                self._sock.curve_publickey = keys.public
                self._sock.curve_server = True
        except BaseException:
            self.close()
            raise
        try:
            self._sock.bind(bind)
        except zmq.ZMQError as exc:
            self.close()
            if exc.errno == zmq.EADDRINUSE:
                raise TransportError(f"cannot bind {bind}: the address is already in use",
                                     "stop the other process on that port or pass another --bind port") from None
            raise TransportError(f"cannot bind {bind}: {exc.strerror}",
                                 "pass an endpoint like tcp://*:5555 or tcp://127.0.0.1:5555") from None
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        log.debug("ROUTER bound to %s", self.endpoint)
        if allowed is not None and self.public_key is not None:
            log.info("CURVE on %s: broker public key %s (workers pass it as --server-key); %d worker key(s) "
                     "allowed from %s", self.endpoint, self.public_key.decode("ascii"), len(allowed.keys),
                     allowed.directory)

    async def recv(self) -> tuple[bytes, list[bytes]]:
        """Wait for the next message; returns the sender's routing identity and its frames."""
        return self._received(await self._sock.recv_multipart(copy=False))

    async def recv_ready(self) -> tuple[bytes, list[bytes]] | None:
        """The next message if one is already queued, else None (never waits)."""
        try:
            parts = await self._sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        return self._received(parts)

    def _received(self, parts: list[zmq.Frame]) -> tuple[bytes, list[bytes]]:
        """Identity and frames of a message received without copying its tensors (:mod:`fedctl.zerocopy`)."""
        identity, *payload = frames_of(parts)
        if identity not in self._seen and self.peer_seen is not None:
            self._seen[identity] = None
            if len(self._seen) > MAX_SEEN_PEERS:
                del self._seen[next(iter(self._seen))]
            self.peer_seen(identity, _peer_address(parts[0]))
        self.counters.bytes_in += sum(len(p) for p in payload)
        self.counters.messages_in += 1
        return identity, payload

    async def send(self, identity: bytes, frames: list[bytes]) -> bool:
        """Send frames to ``identity``; False when that peer is no longer connected."""
        try:
            # Never wait on one peer: a client that does not read its replies fills its pipe (SNDHWM messages),
            # and waiting for it would stop the broker for everyone.
            await self._sock.send_multipart([identity, *frames], flags=zmq.DONTWAIT, copy=False)
        except zmq.Again:
            log.debug("peer %s does not read its messages (send queue full); message dropped", identity.hex())
            return False
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                log.debug("peer %s is gone; message dropped", identity.hex())
                return False
            raise
        self.counters.bytes_out += sum(len(f) for f in frames)
        return True

    def close(self) -> None:
        self._sock.close(0)
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None


def _start_authenticator(ctx: zmq.asyncio.Context, allowed: AllowedKeys) -> WorkerKeyAuthenticator:
    asyncio.get_running_loop()  # RuntimeError now, rather than a ZAP handler that never runs
    if not zmq.has("curve"):
        raise TransportError("this libzmq was built without CURVE", "install pyzmq from its wheels (CURVE built in)")
    auth = WorkerKeyAuthenticator(ctx, allowed)
    try:
        auth.start()
    except zmq.ZMQError as exc:
        auth.stop()
        if exc.errno == zmq.EADDRINUSE:
            raise TransportError("another ZAP handler (CURVE broker) already runs on this ZeroMQ context",
                                 "run one CURVE broker per context") from None
        raise
    return auth
