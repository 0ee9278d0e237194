"""Index encodings of sparse tensor frames (docs/protocol.md §4.3): LEB128 gaps ("varint"), a bitmap, or raw
integers; the encoder's choice of the smallest, and decoders that check every rule before building an index array.

Pure: numpy only. Decoders take the received bytes and raise ProtocolError (BAD_TENSOR); they never trust a size
that the bytes do not back.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedctl.wire.constants import INDEX_BITMAP, INDEX_ENCODINGS, INDEX_RAW, INDEX_VARINT, MAX_VARINT_BYTES
from fedctl.wire.tensors import BINARY, SparseTensor, array_of, bad_tensor


def index_dtype(numel: int) -> np.dtype:
    """The dtype of decoded indices: compact when it can address every element, else numpy's own index type."""
    return np.dtype(np.uint32) if numel < 2**32 else np.dtype(np.int64)


def raw_dtype(numel: int) -> np.dtype:
    """The ``index_dtype`` an encoder uses for raw indices of a tensor of ``numel`` elements."""
    return np.dtype("<u4") if numel <= 2**32 else np.dtype("<u8")


# ----------------------------------------------------------------------------------------------- encoding
_VARINT_STEPS = [np.uint64(1 << (7 * k)) for k in range(1, MAX_VARINT_BYTES)]
"""A gap takes one LEB128 byte plus one for each of these it reaches (numel ≤ 2**40 bounds it to 6 bytes)."""


def gaps_of(name: str, t: SparseTensor) -> np.ndarray:
    """The uint64 gaps of ``t``'s indices (indices[0], then indices[i] - indices[i-1] - 1), checking the tensor."""
    idx, numel = t.indices, t.numel
    if idx.ndim != 1 or idx.dtype.kind not in "iu" or t.values.shape != idx.shape:
        raise bad_tensor(f"sparse tensor {name!r} needs 1-d integer indices and as many 1-d values")
    if not idx.size:
        return np.zeros(0, np.uint64)
    if not (0 <= int(idx[0]) < numel and 0 <= int(idx[-1]) < numel):
        raise bad_tensor(f"sparse tensor {name!r} has an index outside 0..{numel - 1}")
    # Ends in range and strictly increasing in int64 => every index is in range (a wrapped u8 would decrease).
    flat = idx.astype(np.int64, copy=False)
    gaps = np.empty(idx.size, np.int64)
    gaps[0] = flat[0]
    np.subtract(flat[1:], flat[:-1], out=gaps[1:])
    if idx.size > 1 and gaps[1:].min() < 1:
        raise bad_tensor(f"sparse tensor {name!r} indices must be strictly increasing")
    gaps[1:] -= 1
    return gaps.view(np.uint64)


def _varint_nbytes(gaps: np.ndarray) -> int:
    if not gaps.size:
        return 0
    top = gaps.max()
    return gaps.size + sum(int(np.count_nonzero(gaps >= step)) for step in _VARINT_STEPS if top >= step)


def encode_varint(gaps: np.ndarray, nbytes: int) -> np.ndarray:
    """Unsigned LEB128 of every gap, concatenated (``nbytes`` in all): a (gaps × longest) byte matrix, one
    vectorised column per byte position (at most 6), then its row-major bytes that lie within each varint's length."""
    if nbytes == gaps.size:  # every gap < 128: the bytes are the gaps
        return gaps.astype(np.uint8)
    top = gaps.max()
    lengths = np.ones(gaps.size, np.uint8)
    for step in _VARINT_STEPS:
        if top < step:
            break
        lengths += (gaps >= step).view(np.uint8)
    width = int(lengths.max())
    rest = gaps.astype(np.uint32) if top < 2**32 else gaps  # narrower temporaries are faster
    matrix = np.empty((gaps.size, width), np.uint8)
    for j in range(width):
        matrix[:, j] = (rest & 0x7F).astype(np.uint8) | ((lengths > j + 1).view(np.uint8) << 7)
        rest = rest >> 7
    return matrix[np.arange(width, dtype=np.uint8) < lengths[:, None]]


def encode_bitmap(t: SparseTensor) -> np.ndarray:
    """``ceil(numel / 8)`` bytes, least significant bit first, bit set where an element is stored."""
    bits = np.zeros(t.numel, np.bool_)
    bits[t.indices] = True
    return np.packbits(bits, bitorder="little")  # pads the last byte with zero bits


def plan(name: str, t: SparseTensor) -> tuple[str, int, np.ndarray]:
    """The smallest index encoding of ``t``: (index_enc, index bytes, gaps); ties go in INDEX_ENCODINGS order."""
    gaps = gaps_of(name, t)
    sizes = {INDEX_VARINT: _varint_nbytes(gaps), INDEX_BITMAP: (t.numel + 7) // 8,
             INDEX_RAW: t.nnz * raw_dtype(t.numel).itemsize}
    enc = min(INDEX_ENCODINGS, key=sizes.__getitem__)
    return enc, sizes[enc], gaps


def index_encoding(t: SparseTensor) -> str:
    """The ``index_enc`` the encoder chooses for ``t``: "varint", "bitmap" or "raw"."""
    return plan("<sparse>", t)[0]


def sparse_nbytes(t: SparseTensor) -> int:
    """Payload bytes of ``t`` on the wire: index bytes of the chosen encoding plus value bytes (no msgpack framing).

    ``sparse_nbytes(t) / t.nnz`` is the "bytes per kept element" of a compressor.
    """
    return plan("<sparse>", t)[1] + t.values.nbytes


# ----------------------------------------------------------------------------------------------- decoding
def _index_bytes(name: str, buf: Any) -> np.ndarray:
    if not isinstance(buf, BINARY):
        raise bad_tensor(f"sparse tensor {name!r} field 'indices' is missing or not binary")
    return np.frombuffer(buf, np.uint8)


def decode_raw(name: str, buf: Any, dtype: np.dtype, numel: int, nnz: int) -> np.ndarray:
    """``nnz`` little-endian integers of ``dtype`` (an allowed ``index_dtype``), strictly increasing, in range."""
    indices = array_of(buf, dtype, nnz, f"sparse tensor {name!r} indices")
    # Compare in the index dtype (a cast of u8 to i8 would wrap) and bound the ends as Python ints.
    if nnz and (int(indices[-1]) >= numel or not (indices[1:] > indices[:-1]).all()):
        raise bad_tensor(f"sparse tensor {name!r} indices must be strictly increasing and below {numel}")
    if nnz and int(indices[0]) < 0:
        raise bad_tensor(f"sparse tensor {name!r} has a negative index")
    return indices.astype(index_dtype(numel), copy=False)


def _varint_gaps(name: str, buf: np.ndarray, nnz: int) -> np.ndarray:
    """The uint64 values of ``nnz`` concatenated canonical LEB128 varints of at most MAX_VARINT_BYTES bytes."""
    ends = np.flatnonzero(buf < 0x80)  # a byte without the continuation bit ends a varint
    if ends.size != nnz or (buf.size and (not ends.size or ends[-1] != buf.size - 1)):
        raise bad_tensor(f"sparse tensor {name!r} varint indices hold {ends.size} complete varints "
                         f"({buf.size - (int(ends[-1]) + 1 if ends.size else 0)} trailing bytes), nnz declares {nnz}")
    if ends.size == buf.size:  # every varint is one byte
        return buf.astype(np.uint64)
    lengths = np.diff(ends, prepend=-1)
    if lengths.max() > MAX_VARINT_BYTES:
        raise bad_tensor(f"sparse tensor {name!r} has a varint longer than {MAX_VARINT_BYTES} bytes")
    if ((buf[ends] == 0) & (lengths > 1)).any():
        raise bad_tensor(f"sparse tensor {name!r} has a non-minimal varint (a multi-byte varint ending in 0x00)")
    # Branch-free: gather byte j of every varint (zero-padded past the end), masked where the varint is shorter.
    starts = ends - lengths + 1
    low = np.zeros(buf.size + MAX_VARINT_BYTES, np.uint8)
    np.bitwise_and(buf, 0x7F, out=low[:buf.size])
    gaps = low[starts].astype(np.uint64)
    for j in range(1, int(lengths.max())):
        gaps |= (low[starts + j] * (lengths > j).view(np.uint8)).astype(np.uint64) << np.uint64(7 * j)
    return gaps


def decode_varint(name: str, buf: Any, numel: int, nnz: int) -> np.ndarray:
    """``nnz`` minimal LEB128 gaps of at most 6 bytes each, filling ``buf`` exactly, every index below ``numel``."""
    gaps = _varint_gaps(name, _index_bytes(name, buf), nnz)
    if not nnz:
        return np.zeros(0, index_dtype(numel))
    # Each gap is below numel, so a uint64 cumulative sum of nnz terms cannot wrap while nnz * numel < 2**64;
    # beyond that a wrap would show as a decrease, which the order check catches.
    if int(gaps.max()) >= numel:
        raise bad_tensor(f"sparse tensor {name!r} has a varint gap beyond its {numel} elements")
    indices = np.cumsum(gaps, dtype=np.uint64)
    indices += np.arange(nnz, dtype=np.uint64)
    if int(indices[-1]) >= numel or (nnz * numel >= 2**64 and not (indices[1:] > indices[:-1]).all()):
        raise bad_tensor(f"sparse tensor {name!r} varint indices run past its {numel} elements")
    return indices.astype(index_dtype(numel))


_POPCOUNT = np.array([bin(b).count("1") for b in range(256)], np.uint8)


def decode_bitmap(name: str, buf: Any, numel: int, nnz: int) -> np.ndarray:
    """Exactly ``ceil(numel / 8)`` bytes, zero padding bits, ``nnz`` bits set."""
    bitmap = _index_bytes(name, buf)
    if bitmap.size != (numel + 7) // 8:  # checked before any allocation sized by numel
        raise bad_tensor(f"sparse tensor {name!r} bitmap holds {bitmap.size} bytes, {numel} elements need "
                         f"{(numel + 7) // 8}")
    if numel % 8 and bitmap[-1] >> (numel % 8):
        raise bad_tensor(f"sparse tensor {name!r} bitmap has padding bits set after element {numel - 1}")
    count = int(_POPCOUNT[bitmap].sum(dtype=np.int64))
    if count != nnz:
        raise bad_tensor(f"sparse tensor {name!r} bitmap has {count} bits set, nnz declares {nnz}")
    bits = np.unpackbits(bitmap, count=numel, bitorder="little").view(np.bool_)  # nonzero is faster on bools
    return np.flatnonzero(bits).astype(index_dtype(numel), copy=False)
