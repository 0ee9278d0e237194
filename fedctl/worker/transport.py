"""The worker's DEALER connection: one reader task, replies matched to requests by id, liveness bookkeeping.

Transport + protocol glue only: it encodes and decodes messages but has no idea what training is. Its tasks (the
reader, the CURVE handshake watcher, the heartbeat) run in a task group its owner holds (:func:`background`), so
none outlives the code that uses the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from fedctl.errors import ProtocolError, TransportError
from fedctl.security import check_join_security
from fedctl.wire import constants as C
from fedctl.wire import decode, encode, make
from fedctl.wire.constants import ErrorCode
from fedctl.wire.messages import Message
from fedctl.worker.link import TcpSample, sample
from fedctl.zerocopy import frames_of

log = logging.getLogger(__name__)
INBOX_MESSAGES = 1024
"""Unsolicited messages kept for a reader of :attr:`Connection.inbox` (the oldest go first): the worker itself
reads none of them (heartbeat echoes, mostly), so an unbounded queue would grow for the whole run."""


class BrokerLost(Exception):
    """Internal signal: the broker stopped answering heartbeats; reconnect."""


class Rejoin(Exception):
    """Internal signal: the broker does not know this worker (it restarted); join again."""


class Background:
    """The tasks serving one block of code, in the block's :class:`asyncio.TaskGroup` (see :func:`background`)."""

    def __init__(self, group: asyncio.TaskGroup) -> None:
        self._group = group
        self._tasks: list[asyncio.Task[Any]] = []

    def start(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = self._group.create_task(coro, name=name)
        self._tasks.append(task)
        return task

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()


@contextlib.asynccontextmanager
async def background() -> AsyncIterator[Background]:
    """A task group for tasks that serve the block inside it (a socket's reader, a heartbeat loop).

    They are cancelled when the block ends, however it ends, and waited for, so none outlives it; one that fails
    cancels the block (its error comes out in an ExceptionGroup). An error of the block itself comes out as itself,
    after the tasks ended, so callers still catch BrokerLost or RemoteError by type.
    """
    failure: Exception | None = None
    async with asyncio.TaskGroup() as group:
        tasks = Background(group)
        try:
            yield tasks
        except Exception as exc:  # noqa: BLE001 - re-raised below: inside the group it would come out wrapped
            failure = exc
        finally:
            tasks.cancel()
    if failure is not None:
        raise failure


class Connection:
    """One DEALER socket connected to a broker.

    Replies (messages whose ``re`` names a request) resolve that request's future; a ``done`` message is kept in
    :attr:`done_msg`; anything else unsolicited lands in :attr:`inbox`. :attr:`last_heard` is the monotonic time
    of the last message from the broker, which :meth:`heartbeat` uses to judge the broker's liveness.
    :meth:`wait_reply` ends early when the run is done, the broker forgot this worker or went silent.

    Nothing is read until :meth:`start` runs the reader in the owner's :func:`background` group.

    With ``server_key`` (the broker's Z85 public key) and ``secret_key`` (this worker's ``NAME.key_secret`` file)
    the socket is a CURVE client: traffic is encrypted and the broker must hold that key pair. A broker that does
    not admit this worker's public key never answers; libzmq then ends the connection for good, and the next
    :meth:`request` raises TransportError naming the cause.
    """

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, max_message_bytes: int, *,
                 server_key: str | bytes | None = None, secret_key: Path | None = None) -> None:
        self.endpoint = endpoint
        curve = check_join_security(server_key.decode() if isinstance(server_key, bytes) else server_key,
                                    secret_key)
        self._sock = ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self._sock.setsockopt(zmq.RECONNECT_IVL, 200)
        self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        self.failure: tuple[str, str] | None = None
        """Why the connection is gone for good (cause, fix), when a CURVE handshake told."""
        self._monitor: zmq.asyncio.Socket | None = None
        self._tcp_fd: int | None = None
        """libzmq's TCP socket of the current connection (from the monitor), for :meth:`link_bps`."""
        self._public_key = ""
        self._warned_handshake = False
        try:
            if curve is not None:
                server_public, pair = curve
                self._sock.curve_secretkey = pair.secret
                self._sock.curve_publickey = pair.public
                self._sock.curve_serverkey = server_public
                self._public_key = pair.public.decode("ascii")
            events = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED if endpoint.startswith("tcp://") else 0
            if curve is not None:
                events |= (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                           | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
            if events:
                self._monitor = self._sock.get_monitor_socket(events)
            self._sock.connect(endpoint)
        except BaseException:
            if self._monitor is not None:
                self._sock.disable_monitor()
                self._monitor.close(0)
            self._sock.close(0)
            raise
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._next_id = 0
        self.inbox: asyncio.Queue[Message] = asyncio.Queue(INBOX_MESSAGES)
        self.transfers: dict[int, asyncio.Queue[Message]] = {}
        """Chunked transfers in progress, by the id of the model or push message they belong to: the ``chunk``
        messages of an incoming model, or the ``credit`` messages for an outgoing push."""
        self.forgotten = False
        """Set when the broker answers anything (a heartbeat, say) with NOT_JOINED: it no longer knows us."""
        self.lost = False
        """Set by :meth:`heartbeat` when the broker has been silent for longer than its liveness."""
        self.done_msg: Message | None = None
        self._interrupted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        """Resolved on the first of done, forgotten and lost: no reply will come after that."""
        self.last_heard = time.monotonic()
        self.rtt_s: float | None = None
        """The last heartbeat's round trip (seconds), sent with the next heartbeat for the broker's metrics."""
        self.bytes_out = 0
        self.bytes_in = 0

    def start(self, tasks: Background) -> None:
        """Run the reader (and, over TCP or with CURVE, the connection-event watcher) among the owner's background
        tasks."""
        tasks.start(self._read(), name=f"read {self.endpoint}")
        if self._monitor is not None:
            tasks.start(self._watch_events(self._monitor), name=f"watch connection {self.endpoint}")

    def tcp_sample(self) -> TcpSample | None:
        """The TCP connection's counters now (``TCP_INFO``, :mod:`fedctl.worker.link`); None over ipc or inproc."""
        return None if self._tcp_fd is None else sample(self._tcp_fd)

    def _interrupt(self) -> None:
        if not self._interrupted.done():
            self._interrupted.set_result(None)

    async def heartbeat(self, interval_s: float, liveness_s: float) -> None:
        """Send a heartbeat every ``interval_s``; return, marking the connection lost, once the broker has been
        silent for more than ``liveness_s`` (the replies to heartbeats keep it heard while training runs)."""
        while True:
            await asyncio.sleep(interval_s)
            if time.monotonic() - self.last_heard > liveness_s:
                log.warning("the broker has not answered for %.0f s", time.monotonic() - self.last_heard)
                self.lost = True
                self._interrupt()
                return
            rtt = None if self.rtt_s is None else round(self.rtt_s, 6)
            await self.send(C.HEARTBEAT, t=time.time(), rtt=rtt)

    async def wait_reply(self, future: asyncio.Future[Message]) -> Message:
        """The reply ``future`` brings, or the broker's ``done`` message, whichever comes first; raises Rejoin when
        the broker forgot this worker and BrokerLost when it went silent."""
        waiting: set[asyncio.Future[Any]] = {future, self._interrupted}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if future.done():
            return future.result()
        if self.done_msg is not None:
            return self.done_msg
        if self.forgotten:
            raise Rejoin()
        raise BrokerLost()

    async def wait_transfer(self, queue: asyncio.Queue[Message], what: str, timeout_s: float) -> Message:
        """The next chunk or credit of a transfer from its ``queue`` (as :meth:`wait_reply`); BrokerLost when none
        comes within ``timeout_s``."""
        getter = asyncio.ensure_future(queue.get())
        try:
            async with asyncio.timeout(timeout_s):
                return await self.wait_reply(getter)
        except TimeoutError:
            raise BrokerLost(f"no {what} from the broker for {timeout_s} s") from None
        finally:
            getter.cancel()

    def next_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def _read(self) -> None:
        while True:
            frames = frames_of(await self._sock.recv_multipart(copy=False))
            self.bytes_in += sum(len(f) for f in frames)
            self.last_heard = time.monotonic()
            try:
                msg = decode(frames, C.BROKER_TO_WORKER)
            except ProtocolError as err:
                log.error("ignored an invalid message from the broker: %s", err)
                continue
            if msg.type == C.HEARTBEAT and msg.re is not None and msg.get("t") is not None:
                rtt = time.time() - msg["t"]
                if 0 <= rtt < 3600:  # (an echo of our own send time; a clock step makes it meaningless)
                    self.rtt_s = rtt
            if msg.type == C.DONE:
                self.done_msg = msg
                self._interrupt()
            if msg.type == C.ERROR and msg.get("code") == ErrorCode.NOT_JOINED:
                self.forgotten = True  # the broker restarted: whatever we wait for will not come
                self._interrupt()
            if msg.type in (C.CHUNK, C.CREDIT):
                queue = self.transfers.get(msg["xfer"])
                if queue is None:
                    log.debug("ignored a %s of transfer %d, which is not open here", msg.type, msg["xfer"])
                else:
                    queue.put_nowait(msg)
                continue
            if msg.type in (C.MODEL, C.EVALUATE) and msg.get("chunks") is not None:
                self.transfers[msg.id] = asyncio.Queue()  # before its chunks, which follow on this connection
            future = self._pending.pop(msg.re, None) if msg.re is not None else None
            if future is not None and not future.done():
                future.set_result(msg)
            elif msg.type != C.DONE:
                if self.inbox.full():
                    self.inbox.get_nowait()
                self.inbox.put_nowait(msg)

    async def _watch_events(self, monitor: zmq.asyncio.Socket) -> None:
        """Keep the TCP connection's descriptor (for :meth:`link_bps`), and note why a CURVE handshake failed:
        libzmq gives up on a refused key for good, retries a wrong server key."""
        while True:
            event = await recv_monitor_message(monitor)
            if event["event"] == zmq.EVENT_CONNECTED:
                self._tcp_fd = int(event["value"])
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self._tcp_fd = None
            elif event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.failure = (f"the broker at {self.endpoint} refused this worker's CURVE key "
                                f"{self._public_key} (ZAP status {event['value']})",
                                "copy this worker's NAME.key into the broker's --allowed-keys directory, "
                                "then join again")
                log.warning("%s", self.failure[0])
            elif event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                self.failure = (f"the broker at {self.endpoint} does not accept CURVE (handshake protocol error "
                                f"{event['value']:#x}: it may serve plaintext)",
                                "start the broker with --secret-key and --allowed-keys, or join without "
                                "--server-key and --secret-key")
                log.warning("%s", self.failure[0])
            elif not self._warned_handshake:  # EVENT_HANDSHAKE_FAILED_NO_DETAIL: libzmq keeps retrying
                self._warned_handshake = True
                log.warning("the CURVE handshake with %s failed; is --server-key the broker's public key? "
                            "(retrying)", self.endpoint)

    async def _send_now(self, frames: list[bytes]) -> bool:
        """Queue ``frames`` without waiting; False when the socket takes no more (its session is gone)."""
        try:
            await self._sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        self.bytes_out += sum(len(f) for f in frames)
        return True

    async def send(self, mtype: str, tensors: Any = None, slices: Any = None, **fields: Any) -> int:
        """Send a message without waiting for a reply; returns its id. A message the socket cannot take is dropped
        (the broker's silence then shows in :attr:`last_heard`)."""
        msg = make(mtype, self.next_id(), tensors=tensors, slices=slices, **fields)
        if not await self._send_now(encode(msg)):
            log.debug("dropped a %s message: the connection to %s takes no more", mtype, self.endpoint)
        return msg.id

    async def request(self, mtype: str, tensors: Any = None, msg_id: int | None = None,
                      tensor_frames: list[bytes] | None = None, **fields: Any) -> asyncio.Future[Message]:
        """Send a message and return the future of its reply (the caller decides how long to wait).

        Raises TransportError when the socket takes no more messages: libzmq ended the connection for good, as it
        does when the handshake fails (CURVE refused, or CURVE at one end only); otherwise sends would block forever.
        """
        if self.failure is not None:
            raise TransportError(*self.failure)
        msg_id = self.next_id() if msg_id is None else msg_id
        frames = encode(make(mtype, msg_id, tensors=tensors, **fields), tensor_frames)
        if not await self._send_now(frames):
            raise TransportError(*(self.failure or (
                f"the connection to {self.endpoint} was closed and takes no more messages (a failed handshake?)",
                "if the broker uses CURVE, pass --server-key and --secret-key (see `fedctl keygen`); if it does "
                "not, drop them")))
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        return future

    def close(self) -> None:
        """Close the socket (its tasks end with the owner's :func:`background` block) and cancel pending requests."""
        for future in self._pending.values():
            future.cancel()
        if self._sock.closed:  # closed already (a second close is a no-op)
            return
        if self._monitor is not None:
            self._sock.disable_monitor()
            self._monitor.close(0)
            self._monitor = None
        self._tcp_fd = None
        self._sock.close(0)
