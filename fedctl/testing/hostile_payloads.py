"""Hostile payloads, built from bytes alone (msgpack and numpy, no sockets): pushes whose headers declare sizes
far beyond what they carry, break the wire limits or nest deeply, and well-formed sparse updates for rogue pushes.
:mod:`fedctl.testing.hostile` sends them; the tests feed them to the decoder directly.
"""

from __future__ import annotations

import random
from typing import Any

import msgpack
import numpy as np

from fedctl.wire import constants as C
from fedctl.wire.tensors import SparseTensor, Tensor

Frames = list[bytes]


def _packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _push_header(n_tensors: int, **extra: Any) -> bytes:
    return _packb({"v": C.PROTOCOL_VERSION, "type": C.PUSH, "id": 7, "round": 1, "base_version": 0, "seq": 0,
                   "kind": C.KIND_WEIGHTS, "num_examples": 1, **({"tensors": n_tensors} if n_tensors else {}),
                   **extra})


def _tensor(shape: list[int], **fields: Any) -> bytes:
    return _packb({"name": "fc3.bias", "enc": "dense", "dtype": "<f4", "shape": shape, **fields})


def _sparse(shape: list[int], nnz: int, index_enc: str, indices: bytes, values: bytes, **extra: Any) -> bytes:
    return _tensor(shape, enc="sparse", nnz=nnz, index_enc=index_enc, indices=indices, values=values, **extra)


def hostile_tensor_cases() -> list[tuple[str, Frames]]:
    """Pushes with hostile headers: sizes declared far beyond the bytes sent, limits exceeded, deep nesting."""
    one = bytes(4)
    frames: list[tuple[str, bytes]] = [
        ("dense 2^40 elements in 4 bytes", _tensor([2**20, 2**20], data=one)),
        ("dense shape product overflows", _tensor([2**62, 2**62, 2**62], data=one)),
        ("negative dimension", _tensor([-1, 10], data=one)),
        ("nine dimensions", _tensor([1] * 9, data=one)),
        ("sparse nnz 2^40, 1 value", _sparse([2**40], 2**40, "varint", b"\x00", one)),
        ("bitmap for 2^40 elements in 16 bytes", _sparse([2**40], 1, "bitmap", bytes(16), one)),
        ("varint of 8 bytes", _sparse([2**40], 1, "varint", b"\xff" * 7 + b"\x01", one)),
        ("raw index beyond numel", _sparse([10], 1, "raw", (99).to_bytes(4, "little"), one, index_dtype="<u4")),
        ("compact layout with raw indices", _packb(["sparse", "fc3.bias", "<f4", [10], 1, "raw", b"\0" * 4, one])),
        ("dtype object", _tensor([1], dtype="|O", data=bytes(8))),
        ("NaN value", _tensor([1], data=np.array([np.nan], np.float32).tobytes())),
        ("17-entry map", _packb({f"k{i}": i for i in range(17)})),
        ("2000-character name", _tensor([1], name="n" * 2000, data=one)),
        ("tensor frame nested 100000 deep", b"\x91" * 100_000 + b"\xc0"),
    ]
    cases = [(name, [_push_header(1), frame]) for name, frame in frames]
    cases += [
        ("header nested 60000 deep", [b"\x91" * 60_000 + b"\xc0"]),
        ("header of 70 KiB", [_push_header(0, metrics={"pad": 0}, pad="x" * 70_000)]),
        ("300 frames", [_push_header(299), *([b""] * 299)]),
        ("declares 5 tensors, sends 1", [_push_header(5), _tensor([1], data=one)]),
        ("push with a map for a round", [_packb({"v": 1, "type": "push", "id": 1, "round": {"a": [1] * 1000}})]),
    ]
    return cases


def sparse_update(params: dict[str, np.ndarray], rng: random.Random) -> dict[str, Tensor]:
    """A well-formed sparse weights update of the model: a few kept elements per tensor."""
    out: dict[str, Tensor] = {}
    for name, w in params.items():
        idx = np.unique(np.array([rng.randrange(w.size) for _ in range(4)], np.uint32))
        out[name] = SparseTensor(w.shape, idx, w.reshape(-1)[idx])
    return out
