"""The zlib codec of tensor frames (docs/protocol.md §4.4, ``codec: "zlib"``): values as byte planes, deflated;
and the bounded inflate every decoder uses, which refuses streams that would grow past a declared size or
MAX_INFLATE_RATIO times their own length (decompression bombs).

Pure: numpy and zlib only. Works on bytes; the frame codec (:mod:`fedctl.wire.frames`) decides which fields go
through it.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from fedctl.wire.constants import MAX_INFLATE_RATIO
from fedctl.wire.tensors import BINARY, bad_tensor

CODEC_FIELD_BYTES = 12
"""What ``"codec": "zlib"`` costs in a msgpack map: compression must save more than this to be worth it."""


def planes(values: np.ndarray) -> bytes:
    """The values' bytes as byte planes (byte 0 of every value, then byte 1, ...): exponent and sign bytes of
    similar floats repeat, which zlib then finds."""
    raw = np.ascontiguousarray(values).reshape(-1).view(np.uint8)
    return raw.reshape(-1, values.dtype.itemsize).T.tobytes()


def unplanes(buf: bytes, dtype: np.dtype, count: int) -> bytes:
    """The element bytes of ``count`` values of ``dtype`` whose byte planes are ``buf`` (the inverse of planes)."""
    return np.frombuffer(buf, np.uint8).reshape(dtype.itemsize, count).T.tobytes()


def deflate_dense(arr: np.ndarray) -> bytes | None:
    """One zlib stream (level 1: most of the gain at a third of level 6's time) of ``arr``'s byte planes, or None
    when it would not save more than the ``codec`` field costs or would break the decoder's inflate-ratio bound."""
    if not arr.size:
        return None
    deflated = zlib.compress(planes(arr), 1)
    if len(deflated) + CODEC_FIELD_BYTES < arr.nbytes and arr.nbytes <= MAX_INFLATE_RATIO * len(deflated):
        return deflated
    return None


def deflate_sparse(index_bytes: bytes, values: np.ndarray) -> tuple[bytes, bytes] | None:
    """The zlib streams (level 6) of a sparse tensor's index bytes and of its values' byte planes, or None when
    they would not save bytes or would break the decoder's inflate-ratio bound."""
    value_bytes = values.nbytes
    packed_idx = zlib.compress(index_bytes, 6)
    packed_val = zlib.compress(planes(values), 6)
    if any(raw > MAX_INFLATE_RATIO * len(packed) for raw, packed in
           ((len(index_bytes), packed_idx), (value_bytes, packed_val))):
        return None
    if len(packed_idx) + len(packed_val) + CODEC_FIELD_BYTES >= len(index_bytes) + value_bytes:
        return None
    return packed_idx, packed_val


def inflate(name: str, what: str, buf: Any, limit: int) -> bytes:
    """One zlib stream that inflates to at most ``limit`` bytes and MAX_INFLATE_RATIO times its length, with
    nothing after its end.

    Raises
    ------
    ProtocolError
        BAD_TENSOR for a field that is not binary, not a valid zlib stream, inflates past the bound, is truncated
        or has bytes after its end.
    """
    if not isinstance(buf, BINARY):
        raise bad_tensor(f"sparse tensor {name!r} field {what!r} is missing or not binary")
    cap = min(limit, MAX_INFLATE_RATIO * len(buf))
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(buf, cap + 1)
    except zlib.error:
        raise bad_tensor(f"sparse tensor {name!r} field {what!r} is not a valid zlib stream") from None
    if len(out) > cap or inflater.unconsumed_tail:
        raise bad_tensor(f"sparse tensor {name!r} field {what!r} inflates past {cap} bytes "
                         f"(its declared size, or {MAX_INFLATE_RATIO}× its {len(buf)} bytes)")
    if not inflater.eof or inflater.unused_data:
        raise bad_tensor(f"sparse tensor {name!r} field {what!r} is a truncated zlib stream or has bytes after its end")
    return out
