"""Receiving ZeroMQ messages without copying their tensors (both ends' transports).

pyzmq's ``recv_multipart(copy=True)`` copies every frame out of the buffer libzmq received it in. For a 5.2 MB
model that copy is a millisecond or two of CPU per message, held under the GIL; ``copy=False`` hands back the
frames themselves, and a tensor frame is then read through a memoryview (numpy's ``frombuffer`` views it, as it
views bytes). Small frames (routing identity, msgpack header) are copied out: bytes are cheaper to keep than a
frame object.
"""

from __future__ import annotations

import zmq

ZERO_COPY_BYTES = 65536
"""Frames at least this large are kept in libzmq's buffer (pyzmq's own threshold for zero-copy sends)."""


def frames_of(parts: list[zmq.Frame]) -> list[bytes]:
    """The frames of a message received with ``copy=False``: memoryviews for large ones, bytes for the rest."""
    return [p.buffer if len(p) >= ZERO_COPY_BYTES else p.bytes for p in parts]  # type: ignore[misc]
