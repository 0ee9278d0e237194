"""``fedctl status``: ask a running broker how its run stands, over the ZeroMQ protocol (docs/protocol.md §7.5).

A read-only ``status`` request from a DEALER that never joins, answered with ``status_reply``. Over CURVE the client
presents a key pair the broker admits (``--allowed-keys``), like a worker; a broker that does not answer within the
timeout is down, elsewhere, or refused the keys (CURVE refusals are silent by design).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import zmq

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
        sock.connect(connect)
        request = next(_ids)
        sock.send_multipart(encode(make(C.STATUS, request, workers=workers)))
        while sock.poll(int(timeout * 1000), zmq.POLLIN):
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
        sock.close(0)
        ctx.term()
