"""Coverage-guided fuzzing (atheris / libFuzzer) of the wire decoder: ``decode``, ``decode_tensor`` and ``peek_id``.

An input is one selector byte, then frames, each a 2-byte little-endian length and that many bytes (the last one
may be short), read with atheris' FuzzedDataProvider. The selector picks the target:

* 0: every frame goes to ``fedctl.wire.frames.decode_tensor``;
* 1, 2, 3: the frames go to ``fedctl.wire.decode`` with the worker-to-broker, broker-to-worker or every type.

``peek_id`` (which the broker calls on frames it has already refused) sees the first frame and must never raise.
The decoders may raise only ``fedctl.errors.ProtocolError``; anything else is a crash, as is a hang or a large
allocation (run with ``-timeout=5 -rss_limit_mb=2048``). What they accept must hold every invariant of
docs/protocol.md §4 (allowed dtypes, finite values, sorted unique in-range indices) and survive a round trip
through the encoder. Usage (``make fuzz`` runs it for ``FUZZ_SECONDS``)::

    python fuzz/fuzz_decode.py -max_total_time=300 -timeout=5 -rss_limit_mb=2048 runs/fuzz/corpus
    python fuzz/fuzz_decode.py runs/fuzz/crash-1234abcd       # replay one input

A corpus directory that is missing or empty is first seeded with valid frames of every message type and payload
encoding (dense f4/f2/f8, sparse varint/bitmap/raw in the map and the compact array layouts).
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import atheris
import msgpack
import numpy as np
from atheris.version_dependent import CMP_OP_SHIFT_AMOUNT

with atheris.instrument_imports(include=["fedctl"]):
    from fedctl.errors import ProtocolError
    from fedctl.wire import constants as C
    from fedctl.wire.constants import ALLOWED_DTYPES
    from fedctl.wire.frames import decode_tensor, encode_tensor
    from fedctl.wire.messages import decode, encode, make, peek_id
    from fedctl.wire.tensors import SparseTensor, TensorSlice

MAX_FRAMES = C.MAX_TENSORS + 4
"""A few more than a message may carry, so the frame-count limit is exercised too."""
TARGETS: tuple[frozenset[str] | None, ...] = (None, C.WORKER_TO_BROKER, C.BROKER_TO_WORKER, C.MESSAGE_TYPES)
"""By selector byte modulo 4: None means "each frame is a tensor frame"."""


# ------------------------------------------------------------------------------------------- atheris workaround
_COMPARE = (operator.lt, operator.le, operator.eq, operator.ne, operator.gt, operator.ge)
_native_trace_cmp: list[Any] = []


def _trace_cmp(left: Any, right: Any, op: int, counter: int, is_const: bool) -> Any:
    """Instrumented comparisons call ``atheris._trace_cmp``. While fuzzing, atheris 3.0's native one leaks ~150
    bytes each time an operand is a numpy array (here ~1-2 KB per input: a false out-of-memory after ~1 M runs).
    Array comparisons give libFuzzer no useful feedback anyway: evaluate those directly, trace the rest."""
    if isinstance(left, (np.ndarray, np.generic)) or isinstance(right, (np.ndarray, np.generic)):
        return _COMPARE[op >> CMP_OP_SHIFT_AMOUNT](left, right)
    return _native_trace_cmp[0](left, right, op, counter, is_const)


def _wrap_trace_cmp() -> None:
    # atheris.Fuzz() binds its libFuzzer-backed _trace_cmp when it starts, so wrap it from inside the first run.
    if atheris._trace_cmp is not _trace_cmp:
        _native_trace_cmp[:] = [atheris._trace_cmp]
        atheris._trace_cmp = _trace_cmp


# ------------------------------------------------------------------------------------------- input layout
def split(data: bytes) -> tuple[int, list[bytes]]:
    """The target index and the 1..MAX_FRAMES frames of one fuzzer input."""
    fdp = atheris.FuzzedDataProvider(data)
    target = fdp.ConsumeBytes(1)
    frames: list[bytes] = []
    while fdp.remaining_bytes() and len(frames) < MAX_FRAMES:
        size = int.from_bytes(fdp.ConsumeBytes(2), "little")
        frames.append(fdp.ConsumeBytes(size))
    return (target[0] if target else 0) % len(TARGETS), frames or [b""]


def join(target: int, frames: Sequence[bytes]) -> bytes:
    """The fuzzer input that :func:`split` reads as ``(target, frames)`` (for seeds and regression inputs)."""
    out = bytearray([target])
    for frame in frames:
        if len(frame) > 0xFFFF:
            raise ValueError(f"a seed frame of {len(frame)} bytes does not fit the 2-byte length")
        out += len(frame).to_bytes(2, "little") + frame
    return bytes(out)


# ------------------------------------------------------------------------------------------- oracle
def check_tensor(name: str, tensor: Any) -> None:
    """Everything an accepted tensor must satisfy, then the same tensor after encode → decode."""
    if isinstance(tensor, TensorSlice):
        numel = int(np.prod(tensor.shape))
        assert tensor.values.ndim == 1 and tensor.values.size >= 1, (name, tensor.values.shape)
        assert 0 <= tensor.start and tensor.stop <= numel, (name, tensor.start, tensor.stop, numel)
        assert np.isfinite(tensor.values.astype(np.float64)).all(), f"{name}: non-finite value accepted"
        again_name, again = decode_tensor(encode_tensor(name, tensor))
        assert isinstance(again, TensorSlice) and (again.shape, again.start) == (tensor.shape, tensor.start)
        assert again.values.tobytes() == tensor.values.tobytes()
        return
    if isinstance(tensor, SparseTensor):
        idx, values = tensor.indices, tensor.values
        assert idx.ndim == 1 and values.shape == idx.shape, (name, idx.shape, values.shape)
        assert idx.dtype.kind in "iu" and values.dtype.str in ALLOWED_DTYPES, (idx.dtype, values.dtype)
        if idx.size:
            assert 0 <= int(idx[0]) and int(idx[-1]) < tensor.numel, (name, idx[0], idx[-1], tensor.numel)
            assert (idx[1:] > idx[:-1]).all(), f"{name}: indices not strictly increasing"
        assert np.isfinite(values.astype(np.float64)).all(), f"{name}: non-finite value accepted"
    else:
        assert isinstance(tensor, np.ndarray) and tensor.dtype.str in ALLOWED_DTYPES, (name, type(tensor))
        assert np.isfinite(tensor.astype(np.float64)).all(), f"{name}: non-finite value accepted"
    again_name, again = decode_tensor(encode_tensor(name, tensor))
    assert again_name == name and type(again) is type(tensor), (name, again_name, type(again))
    if isinstance(tensor, SparseTensor):
        assert isinstance(again, SparseTensor) and again.shape == tensor.shape
        assert np.array_equal(again.indices, tensor.indices) and again.values.tobytes() == tensor.values.tobytes()
    else:
        assert isinstance(again, np.ndarray) and again.shape == tensor.shape and again.tobytes() == tensor.tobytes()


def check_message(frames: Sequence[bytes], allowed: frozenset[str]) -> None:
    msg = decode(frames, allowed)
    parts: dict[str, Any] = {**msg.tensors, **msg.slices}
    assert msg.type in allowed and len(parts) == len(frames) - 1, (msg.type, len(parts))
    assert not msg.slices or (msg.type == C.CHUNK and not msg.tensors), "slices outside a chunk message"
    for name, tensor in parts.items():
        check_tensor(name, tensor)
    again = decode(encode(msg), allowed)
    assert (again.type, again.id, again.re) == (msg.type, msg.id, msg.re)
    assert msgpack.packb(dict(again.fields)) == msgpack.packb(dict(msg.fields)), "fields changed in a round trip"
    assert list(again.tensors) == list(msg.tensors) and list(again.slices) == list(msg.slices)


def test_one_input(data: bytes) -> None:
    _wrap_trace_cmp()
    target, frames = split(data)
    msg_id = peek_id(frames[0])  # must never raise: the broker calls it outside its ProtocolError handler
    assert msg_id is None or (type(msg_id) is int and 0 <= msg_id < 2**63), msg_id
    allowed = TARGETS[target]
    try:
        if allowed is None:
            for frame in frames:
                name, tensor = decode_tensor(frame)
                check_tensor(name, tensor)
        else:
            check_message(frames, allowed)
    except ProtocolError:
        pass


# ------------------------------------------------------------------------------------------- seeds
def _tensors() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(3, 4)).astype(np.float32)
    big = 1000
    return {
        "dense.f4": dense, "dense.f2": dense.astype(np.float16), "dense.f8": dense[0].astype(np.float64),
        "dense.scalar": np.float32(1.5).reshape(()), "dense.empty": np.zeros((2, 0), np.float32),
        # The encoder picks the smallest index encoding: few far-apart indices → varint, many → bitmap,
        # gaps beyond 2**28 → raw (4 bytes each, against 5 for a varint).
        "sparse.varint": SparseTensor((big,), np.array([3, 130, 999], np.uint32), np.ones(3, np.float32)),
        "sparse.varint.f2": SparseTensor((40, 25), np.array([0, 1, 17, 200], np.uint32), np.full(4, 0.5, np.float16)),
        "sparse.bitmap": SparseTensor((4, 4), np.arange(0, 16, 2, dtype=np.uint32), np.arange(8, dtype=np.float32)),
        "sparse.raw": SparseTensor((2**31,), np.array([2**29, 2**30 + 2**29], np.uint32), np.ones(2, np.float32)),
        "sparse.varint.2e40": SparseTensor((2**20, 2**20), np.array([2**36, 2**40 - 1], np.uint64),
                                           np.ones(2, np.float32)),
        "sparse.empty": SparseTensor((5,), np.zeros(0, np.uint32), np.zeros(0, np.float32)),
    }


def _raw_map(index_dtype: str) -> bytes:
    """A raw-index sparse frame in the map layout with an explicit index dtype (<u4, <u8 or <i8)."""
    indices = np.array([1, 5, 7], np.dtype(index_dtype))
    return msgpack.packb({"name": f"raw{index_dtype}", "enc": "sparse", "dtype": "<f4", "shape": [8], "nnz": 3,
                          "index_enc": "raw", "index_dtype": index_dtype, "indices": indices.tobytes(),
                          "values": np.ones(3, np.float32).tobytes()}, use_bin_type=True)


def _messages(tensors: dict[str, Any]) -> Iterator[tuple[int, list[bytes]]]:
    small = {k: v for k, v in tensors.items() if k in ("dense.f4", "sparse.varint", "sparse.bitmap")}
    w2b, b2w = 1, 2
    yield w2b, encode(make(C.JOIN, 1, worker="w0", backend="numpy", num_examples=100, model="mlp", host="h"))
    yield w2b, encode(make(C.PULL, 2, version=3))
    yield w2b, encode(make(C.PUSH, 3, tensors=small, round=1, base_version=0, seq=0, kind="weights",
                           num_examples=10, metrics={"train_loss": 0.5}))
    yield w2b, encode(make(C.PUSH, 4, tensors={"fp16": tensors["sparse.varint.f2"]}, round=2, base_version=1,
                           seq=1, kind="delta", num_examples=10))
    yield w2b, encode(make(C.HEARTBEAT, 5, t=1.25))
    yield w2b, encode(make(C.LEAVE, 6, reason="bye"))
    yield b2w, encode(make(C.WELCOME, 7, re=1, worker="w0", run={"run_id": "ab", "rounds": 3}))
    yield b2w, encode(make(C.MODEL, 8, re=2, tensors=small, round=1, version=0, task={"epochs": 1}, base=0))
    yield b2w, encode(make(C.ACK, 9, re=3, round=1, seq=0, status="accepted"))
    yield b2w, encode(make(C.ERROR, 10, re=4, code=int(C.ErrorCode.STALE_UPDATE), reason="round 9 is not open",
                           fix="pull again"))
    yield b2w, encode(make(C.DONE, 11, round=3, version=3, reason="the run is complete"))
    # Chunked transfers (§7.1): headers with chunks, chunks of slices, credits, both directions.
    piece = {"a": TensorSlice((3, 4), 5, np.arange(7, dtype=np.float32)), "b": TensorSlice((6,), 0, np.ones(2, "<f4"))}
    yield w2b, encode(make(C.PUSH, 12, round=1, base_version=0, seq=0, kind="weights", num_examples=10, chunks=27))
    yield w2b, encode(make(C.CHUNK, 13, slices=piece, xfer=12, index=0))
    yield w2b, encode(make(C.CREDIT, 14, xfer=8, received=3))
    yield b2w, encode(make(C.MODEL, 15, re=2, round=1, version=0, task={"epochs": 1}, chunks=4))
    yield b2w, encode(make(C.CHUNK, 16, slices=piece, xfer=15, index=1))
    yield b2w, encode(make(C.CREDIT, 17, xfer=12, received=0))
    # Federated evaluation (§7.2).
    yield b2w, encode(make(C.EVALUATE, 18, re=2, tensors=small, round=2, version=2, base=1))
    yield w2b, encode(make(C.EVALUATION, 19, version=2, num_examples=50, metrics={"accuracy": 0.75, "loss": 0.5}))


def _zlib_frames() -> Iterator[bytes]:
    """Sparse frames with ``codec: "zlib"`` (what the broker sends as downlink deltas)."""
    rng = np.random.default_rng(1)
    idx = np.sort(rng.choice(4000, 400, replace=False)).astype(np.uint32)
    yield encode_tensor("z.bitmap", SparseTensor((4000,), idx, (rng.normal(size=400) * 0.05).astype(np.float32)),
                        compress=True)
    yield encode_tensor("z.varint", SparseTensor((4000,), idx[:40], np.full(40, 0.25, np.float32)), compress=True)


def _near_misses() -> Iterator[bytes]:
    """Inputs one rule away from valid, for the checks random mutation reaches slowly."""
    one = np.ones(1, np.float32).tobytes()
    yield join(0, [msgpack.packb(["sparse", "c", "<f4", [8], 1, "raw", b"\x01\x00\x00\x00", one])])
    yield join(0, [msgpack.packb(["sparse", "p", "<f4", [5], 1, "bitmap", b"\x21", one])])  # bit 5 is padding
    yield join(0, [msgpack.packb({"name": "", "enc": "dense", "dtype": "<f4", "shape": [1], "data": one})])
    beat = msgpack.packb({"v": 1, "type": "heartbeat", "id": 1, "tensors": 1})
    yield join(1, [beat, encode_tensor("t", np.ones(1, np.float32))])
    many = msgpack.packb({"v": 1, "type": "push", "id": 1, "tensors": C.MAX_TENSORS + 1})
    yield join(1, [many, *[b""] * (C.MAX_TENSORS + 1)])


def seeds() -> Iterator[bytes]:
    """Valid inputs of every message type and tensor encoding, in the layout :func:`split` reads, and a few
    near misses."""
    tensors = _tensors()
    for name, tensor in tensors.items():
        yield join(0, [encode_tensor(name, tensor)])
    yield join(0, [_raw_map(d) for d in sorted(C.ALLOWED_INDEX_DTYPES)])
    yield join(0, list(_zlib_frames()))
    for target, frames in _messages(tensors):
        yield join(target, frames)
        yield join(3, frames)
    yield from _near_misses()


def seed_corpus(argv: Sequence[str]) -> None:
    """Write the seeds into the first corpus directory named on the command line when it is missing or empty."""
    dirs = [a for a in argv[1:] if not a.startswith("-")]
    if not dirs or Path(dirs[0]).is_file():
        return
    corpus = Path(dirs[0])
    corpus.mkdir(parents=True, exist_ok=True)
    if any(corpus.iterdir()):
        return
    for i, seed in enumerate(seeds()):
        (corpus / f"seed-{i:03d}").write_bytes(seed)


def main() -> None:
    seed_corpus(sys.argv)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
