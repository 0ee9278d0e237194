"""The throughput of a worker's TCP connection, as the kernel measures it (Linux ``TCP_INFO``).

Two kernel figures, read once a push is acknowledged (:class:`PushMeter`):

* ``tcpi_delivery_rate``, the kernel's latest rate sample (the one TCP BBR uses): gigabytes per second on loopback,
  and untouched by how long the broker took to read, store and acknowledge the push (timing a push to its
  ``ack`` made a loaded broker on loopback look like a 1 MB/s link). On an emulated 1 Mbit/s link, though, single
  samples ranged from 0.04 to 5 MB/s (token-bucket bursts, bunched acks).
* The push's own average: the bytes the peer acknowledged (``tcpi_bytes_acked``) since the push was sent, over the
  time until the last acknowledgement arrived (``tcpi_last_ack_recv``): 0.03–0.10 MB/s on that link. It can only
  read low, never high: on a loaded machine libzmq's I/O thread may start writing late, and a heartbeat
  acknowledged after the push stretches the interval (100 worker processes on 2 cores read loopback as a few MB/s).

The link's throughput is taken as max(average, latest sample / 4): the average, unless the kernel's own sample
says the link is much faster — which on loopback (≥ 0.4 GB/s, so ≥ 100 MB/s) it always does, and on the 1 Mbit/s
link (at most 5.4 MB/s, so ≤ 1.4 MB/s) it never did. Either way the decision that matters (above or below the
~27 MB/s where compressing starts to pay, docs/protocol.md §4.4) came out right in every measured case.

The socket is libzmq's: its descriptor comes from the connection's monitor (``EVENT_CONNECTED``); it is read
through a duplicate, never used otherwise.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time
from dataclasses import dataclass

TCP_INFO_BYTES = 232
LAST_ACK_RECV_OFFSET = 56
"""``tcpi_last_ack_recv`` (u32, milliseconds since the last acknowledgement arrived) in ``struct tcp_info``."""
BYTES_ACKED_OFFSET = 120
"""``tcpi_bytes_acked`` (u64, Linux ≥ 4.1)."""
DELIVERY_RATE_OFFSET = 160
"""``tcpi_delivery_rate`` (u64, bytes/s; Linux ≥ 4.9), in ``struct tcp_info`` (linux/tcp.h)."""


@dataclass(frozen=True)
class TcpSample:
    at: float
    """``time.monotonic()`` when read."""
    bytes_acked: int
    last_ack_s: float
    """Seconds since the last acknowledgement arrived."""
    delivery_rate: int


def sample(fd: int) -> TcpSample | None:
    """The TCP socket ``fd``'s counters now; None where unknown (not Linux, not a TCP socket any more)."""
    if not sys.platform.startswith("linux") or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        sock = socket.socket(fileno=os.dup(fd))
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
    return TcpSample(time.monotonic(), int(struct.unpack_from("<Q", info, BYTES_ACKED_OFFSET)[0]),
                     struct.unpack_from("<I", info, LAST_ACK_RECV_OFFSET)[0] / 1000,
                     int(struct.unpack_from("<Q", info, DELIVERY_RATE_OFFSET)[0]))


SAMPLE_TRUST = 4
"""The kernel's latest rate sample counts for a quarter of its value (it overshot 43× on a token-bucket link)."""


def throughput(before: TcpSample, after: TcpSample) -> int | None:
    """The link's throughput (bytes/s) over a push sent at ``before`` and acknowledged by ``after``:
    max(the push's own average, the kernel's latest rate sample / 4) (see the module docstring); None when
    unknown."""
    acked = after.bytes_acked - before.bytes_acked
    took = (after.at - after.last_ack_s) - before.at
    average = int(acked / took) if acked > 0 and took > 0 else 0
    best = max(average, after.delivery_rate // SAMPLE_TRUST)
    return best or None
