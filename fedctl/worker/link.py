"""The throughput of a worker's TCP connection, as the kernel measures it (Linux ``TCP_INFO``).

``tcpi_delivery_rate`` is the kernel's estimate of the rate at which the peer acknowledged this socket's data
(the rate sample that TCP BBR uses): on loopback gigabytes per second, on a 10 Mbit/s link 1.2 MB/s — measured
here on emulated links — and, unlike timing a push to its ``ack``, untouched by how long the broker took to read,
store and acknowledge it (the broker's queueing under load looked like a slow link). fedctl uses it to decide
whether compressing pays (docs/protocol.md §4.4).

The socket is libzmq's: its descriptor comes from the connection's monitor (``EVENT_CONNECTED``); it is read
through a duplicate, never used otherwise.
"""

from __future__ import annotations

import socket
import struct
import sys

TCP_INFO_BYTES = 232
DELIVERY_RATE_OFFSET = 160
"""``tcpi_delivery_rate`` (u64, bytes/s) in ``struct tcp_info`` (linux/tcp.h; Linux ≥ 4.9)."""


def delivery_rate(fd: int) -> int | None:
    """The delivery rate (bytes/s) of the TCP socket ``fd``; None where unknown (not Linux, not a TCP socket any
    more, no sample yet)."""
    if not sys.platform.startswith("linux") or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        sock = socket.socket(fileno=_dup(fd))
    except OSError:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_BYTES)
    except OSError:
        return None
    finally:
        sock.close()
    if len(info) < DELIVERY_RATE_OFFSET + 8:
        return None
    rate = int(struct.unpack_from("<Q", info, DELIVERY_RATE_OFFSET)[0])
    return rate or None


def _dup(fd: int) -> int:
    import os

    return os.dup(fd)
