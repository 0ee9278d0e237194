"""``fedctl status``: ask a running broker how its run stands, over the ZeroMQ protocol (docs/protocol.md §7.5).

A read-only ``status`` request from a DEALER that never joins, answered with ``status_reply``. Over CURVE the client
presents a key pair the broker admits (``--allowed-keys``), like a worker; a broker that does not answer within the
timeout is down, elsewhere, or refused the keys (CURVE refusals are silent by design).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from fedctl.api.inputs import check_endpoint
from fedctl.errors import ProtocolError, TransportError
from fedctl.security import check_join_security
from fedctl.wire import constants as C
from fedctl.wire import decode, encode, make

_ids = itertools.count(1)


def status(connect: str, *, server_key: str | None = None, secret_key: str | Path | None = None,
           timeout: float = 5.0, workers: bool = True) -> dict[str, Any]:
    """The broker's ``status`` map (its fields: docs/protocol.md §7.5).

    Raises
    ------
    ConfigError
        A malformed endpoint or key.
    TransportError
        No answer within ``timeout`` seconds.
    """
    check_endpoint(connect, "--connect", bind=False)
    curve = check_join_security(server_key, None if secret_key is None else Path(secret_key))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.linger = 0
        if curve is not None:
            server_public, pair = curve
            sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = pair.secret, pair.public, server_public
        monitor = sock.get_monitor_socket(_HANDSHAKE_FAILED) if connect.startswith("tcp://") else None
        sock.connect(connect)
        request = next(_ids)
        sock.send_multipart(encode(make(C.STATUS, request, workers=workers)))
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if monitor is not None:
            poller.register(monitor, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready = dict(poller.poll(int(left * 1000) + 1))
            if monitor is not None and monitor in ready:
                _refuse_handshake(recv_monitor_message(monitor), connect, curve is not None)
            if sock not in ready:
                continue
            try:
                reply = decode(sock.recv_multipart(), C.BROKER_TO_WORKER)
            except ProtocolError:
                continue
            if reply.re != request:
                continue
            if reply.type == C.ERROR:
                raise TransportError(f"the broker at {connect} refused the status request: {reply['reason']}",
                                     "upgrade the broker to a fedctl that answers status (§7.5)")
            if reply.type == C.STATUS_REPLY:
                return dict(reply["status"])
        hint = ("are --server-key and --secret-key the broker's key and an admitted worker key?" if curve
                else "does the broker use CURVE keys (pass --server-key and --secret-key)?")
        raise TransportError(f"no answer from {connect} within {timeout:g} s: is a broker running there? {hint}",
                             "start `fedctl serve` there, or check the address and keys")
    finally:
        if monitor is not None:
            sock.disable_monitor()
            monitor.close(0)
        sock.close(0)
        ctx.term()


_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def _refuse_handshake(event: Mapping[str, Any], connect: str, curve: bool) -> None:
    """Raise the one-line cause and fix of a failed ZMTP handshake (a monitor event of :data:`_HANDSHAKE_FAILED`)."""
    if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        raise TransportError(f"the broker at {connect} refused this client's CURVE key",
                             "copy the public NAME.key of --secret-key's pair into the broker's --allowed-keys "
                             "directory, or use an admitted pair")
    if curve:
        raise TransportError(f"the CURVE handshake with {connect} failed: the broker serves plaintext, or "
                             "--server-key is not its public key",
                             "pass the broker's NAME.key as --server-key, or leave out --server-key and "
                             "--secret-key for a plaintext broker")
    raise TransportError(f"the handshake with {connect} failed: the broker uses CURVE keys",
                         "pass --server-key (the broker's public key) and --secret-key (an admitted key pair)")
