"""Chunked transfers (docs/protocol.md §4, slice frames, and §7.1): a dense float32 model or update too large for
one message goes as a header message (``push`` or ``model`` with ``chunks: n``) and n ``chunk`` messages of tensor
slices, in the model's flat order, paced by the receiver's ``credit`` messages.

Pure: numpy only. The sender splits with :func:`split`; the receiver checks each chunk with a :class:`Cursor`,
which accepts exactly the slices that continue where the previous chunk ended, so a finished transfer covers
every element of the model once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import numpy as np

from fedctl.errors import ProtocolError
from fedctl.wire.constants import MAX_CHUNKS, ErrorCode
from fedctl.wire.tensors import TensorSlice

CHUNK_DTYPE = np.dtype("<f4")
"""Slices of a chunked transfer are float32: chunking is for dense models and updates."""


def flat_offsets(shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, int], int]:
    """Where each tensor starts in the model laid flat, in the order of ``shapes``, and the model's length."""
    offsets, total = {}, 0
    for name, shape in shapes.items():
        offsets[name] = total
        total += math.prod(shape)
    return offsets, total


def count(shapes: Mapping[str, tuple[int, ...]], chunk_bytes: int) -> int:
    """Number of chunks :func:`split` makes of a model of ``shapes``."""
    per_chunk = max(chunk_bytes // CHUNK_DTYPE.itemsize, 1)
    return math.ceil(sum(math.prod(s) for s in shapes.values()) / per_chunk)


def split(tensors: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]],
          chunk_bytes: int) -> Iterator[dict[str, TensorSlice]]:
    """The chunks of a dense model: each a dict of slices (views, no copies) of about ``chunk_bytes`` in all,
    covering the tensors in the order of ``shapes``, each flattened in C order."""
    per_chunk = max(chunk_bytes // CHUNK_DTYPE.itemsize, 1)
    chunk: dict[str, TensorSlice] = {}
    room = per_chunk
    for name, shape in shapes.items():
        flat = np.ascontiguousarray(tensors[name], dtype=CHUNK_DTYPE).reshape(-1)
        start = 0
        while start < flat.size:
            take = min(room, flat.size - start)
            chunk[name] = TensorSlice(tuple(shape), start, flat[start:start + take])
            start += take
            room -= take
            if room == 0:
                yield chunk
                chunk, room = {}, per_chunk
    if chunk:
        yield chunk


class Cursor:
    """The receiving end of one transfer: where the next slice must start, and how many chunks came."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], chunks: int) -> None:
        if not 1 <= chunks <= MAX_CHUNKS:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"a transfer needs 1..{MAX_CHUNKS} chunks, not {chunks}")
        self.shapes = dict(shapes)
        self.offsets, self.total = flat_offsets(self.shapes)
        self.chunks = chunks
        self.received = 0
        self.position = 0
        """Flat model element the next slice must start at."""

    @property
    def done(self) -> bool:
        return self.received == self.chunks

    def accept(self, index: int, slices: Mapping[str, TensorSlice]) -> list[tuple[str, TensorSlice, int]]:
        """Check chunk ``index`` and return its slices as (name, slice, flat model offset), in order.

        Raises
        ------
        ProtocolError
            BAD_FIELD for a chunk out of order or past the end; MODEL_MISMATCH for a slice of a tensor the model
            lacks, of another shape or dtype, or that does not start where the transfer stands; BAD_TENSOR for an
            empty chunk or a last chunk that leaves elements uncovered.
        """
        if index != self.received or self.done:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"chunk {index} arrived, expected chunk {self.received} of "
                                f"{self.chunks}")
        if not slices:
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"chunk {index} carries no slices")
        out = []
        for name, piece in sorted(slices.items(), key=lambda kv: (self.offsets.get(kv[0], -1), kv[1].start)):
            if name not in self.shapes or tuple(piece.shape) != tuple(self.shapes[name]):
                raise ProtocolError(ErrorCode.MODEL_MISMATCH, f"chunk {index} has a slice of {name!r} "
                                    f"{tuple(piece.shape)}, which is not a tensor of the model",
                                    "join with the model the broker announced in its welcome")
            if piece.values.dtype != CHUNK_DTYPE:
                raise ProtocolError(ErrorCode.MODEL_MISMATCH, f"chunk {index}: slice of {name!r} is "
                                    f"{piece.values.dtype}; chunked transfers carry float32")
            at = self.offsets[name] + piece.start
            if at != self.position:
                raise ProtocolError(ErrorCode.MODEL_MISMATCH, f"chunk {index}: slice of {name!r} starts at model "
                                    f"element {at}, the transfer stands at {self.position}")
            self.position += piece.values.size
            out.append((name, piece, at))
        self.received += 1
        if self.done and self.position != self.total:
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"the last chunk ends at model element {self.position} of "
                                f"{self.total}: the transfer does not cover the model")
        return out


class Window:
    """The sender's pace: how many chunks may be unanswered. It grows while credits come back quickly and keeps
    about ``target_s`` of data in flight, so a heartbeat queued behind the chunks on a slow link waits no longer
    than that (at 1 Mbit/s and 256 KiB chunks that is one chunk: ~2 s)."""

    def __init__(self, chunk_bytes: int, target_s: float = 0.25, limit: int = 64) -> None:
        self.chunk_bytes = chunk_bytes
        self.target_s = target_s
        self.limit = limit
        self.size = 2
        self._rate: float | None = None

    def credited(self, chunks: int, seconds: float) -> None:
        """``chunks`` more were credited ``seconds`` after the previous credit."""
        if chunks <= 0 or seconds <= 0:
            return
        rate = chunks * self.chunk_bytes / seconds
        self._rate = rate if self._rate is None else 0.8 * self._rate + 0.2 * rate
        self.size = int(min(self.limit, max(1, self._rate * self.target_s / self.chunk_bytes)))
