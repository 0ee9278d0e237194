"""Sparse tensor frames (docs/protocol.md §4): index encodings, the encoder's choice, and hostile sparse frames.

The vectorised codec is checked against a few-line pure-Python LEB128 and bitmap reference (the oracle here).
"""

from __future__ import annotations

import math
import time
import zlib
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedctl.errors import ProtocolError
from fedctl.wire import constants as C
from fedctl.wire import decode, encode, make
from fedctl.wire.constants import ErrorCode
from fedctl.wire.frames import COMPACT_SPARSE_FIELDS, decode_tensor, encode_tensor
from fedctl.wire.indices import index_encoding, sparse_nbytes
from fedctl.wire.tensors import PACKED_NAME, SparseTensor, pack_sparse, unpack_sparse

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
E = ErrorCode


# ----------------------------------------------------------------------------------------------- reference codec
def ref_varint(indices: list[int]) -> bytes:
    """Unsigned LEB128 of the gaps, one element at a time: the specification, written plainly."""
    out, prev = bytearray(), -1
    for i in indices:
        gap, prev = i - prev - 1, i
        while True:
            byte, gap = gap & 0x7F, gap >> 7
            out.append(byte | (0x80 if gap else 0))
            if not gap:
                break
    return bytes(out)


def ref_bitmap(indices: list[int], numel: int) -> bytes:
    out = bytearray((numel + 7) // 8)
    for i in indices:
        out[i >> 3] |= 1 << (i & 7)
    return bytes(out)


def body_of(frame: bytes) -> dict[str, Any]:
    """The frame's fields by name, whichever layout (map, or the compact positional array) it uses."""
    body = msgpack.unpackb(frame, raw=False)
    return dict(zip(COMPACT_SPARSE_FIELDS, body)) if isinstance(body, list) else body


def round_trip(t: SparseTensor, name: str = "w") -> SparseTensor:
    got_name, got = decode_tensor(encode_tensor(name, t))
    assert got_name == name and isinstance(got, SparseTensor)
    return got


def assert_same(got: SparseTensor, want: SparseTensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype and got.nnz == want.nnz
    assert got.indices.dtype == (np.uint32 if want.numel < 2**32 else np.int64)
    assert np.array_equal(got.indices.astype(np.int64), want.indices.astype(np.int64))
    assert got.values.tobytes() == want.values.tobytes()


def sparse(shape: tuple[int, ...], indices: list[int], dtype: str = "<f2",
           index_dtype: Any = np.uint32) -> SparseTensor:
    return SparseTensor(shape, np.array(indices, index_dtype), np.arange(1, len(indices) + 1).astype(dtype))


# ----------------------------------------------------------------------------------------------- round trips
@st.composite
def random_sparse(draw: st.DrawFn) -> SparseTensor:
    shape = tuple(draw(st.lists(st.integers(0, 40), min_size=0, max_size=3)))
    numel = math.prod(shape)
    density = draw(st.sampled_from([0.0, 0.001, 0.05, 0.3, 0.9, 1.0]) | st.floats(0, 1))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    idx = np.flatnonzero(rng.random(numel) < density)
    dtype = draw(st.sampled_from(["<f2", "<f4", "<f8"]))
    values = (rng.standard_normal(idx.size) * 100).astype(dtype)
    return SparseTensor(shape, idx.astype(draw(st.sampled_from([np.uint32, np.uint64, np.int64]))), values)


@FAST
@given(t=random_sparse())
def test_round_trip_matches_the_reference_encoding(t: SparseTensor) -> None:
    frame = encode_tensor("w", t)
    body = body_of(frame)
    idx = [int(i) for i in t.indices]
    sizes = {"varint": len(ref_varint(idx)), "bitmap": (t.numel + 7) // 8, "raw": 4 * t.nnz}
    assert body["index_enc"] == index_encoding(t)
    assert sizes[body["index_enc"]] == min(sizes.values())
    if body["index_enc"] == "varint":
        assert body["indices"] == ref_varint(idx)
    elif body["index_enc"] == "bitmap":
        assert body["indices"] == ref_bitmap(idx, t.numel)
    assert sparse_nbytes(t) == len(body["indices"]) + t.values.nbytes
    got = round_trip(t)
    assert_same(got, t)
    assert np.array_equal(got.to_dense(), t.to_dense())


@FAST
@given(gaps=st.lists(st.integers(0, 2**35) | st.integers(0, 300), min_size=1, max_size=20),
       slack=st.integers(0, 2**30), dtype=st.sampled_from(["<f2", "<f4"]))
def test_multibyte_gaps_round_trip_without_allocating_numel(gaps: list[int], slack: int, dtype: str) -> None:
    """Indices with gaps of up to 6 LEB128 bytes in tensors of up to ~2**40 elements (only nnz-sized arrays)."""
    indices = list(np.cumsum(np.array(gaps, np.int64) + 1) - 1)
    numel = int(indices[-1]) + 1 + slack
    t = SparseTensor((numel,), np.array(indices, np.int64), np.ones(len(indices), dtype))
    if numel > 64 * len(indices):  # a bitmap would be larger than any varint encoding
        assert index_encoding(t) in ("varint", "raw")
    if index_encoding(t) == "varint":
        assert body_of(encode_tensor("w", t))["indices"] == ref_varint([int(i) for i in indices])
    assert_same(round_trip(t), t)


@pytest.mark.parametrize("t", [
    sparse((5,), []),
    sparse((0,), []),
    sparse((3, 0), [], "<f4"),
    sparse((1,), [0]),
    sparse((), [0], "<f8"),
    sparse((7,), [6]),
    sparse((8,), [7]),
    sparse((9,), [0, 8]),
    sparse((2, 3), list(range(6)), "<f4"),
    sparse((2**32 - 1,), [0, 2**32 - 2], index_dtype=np.uint64),
    sparse((2**33,), [0, 5, 2**32, 2**33 - 1], index_dtype=np.uint64),
    sparse((2**20, 2**20), [2**40 - 1], index_dtype=np.int64),
    sparse((2**40,), [0, 2**40 - 1], "<f8", index_dtype=np.uint64),
], ids=["nnz0", "numel0", "numel0-2d", "numel1", "scalar", "last-of-7", "last-of-8", "ends-of-9", "full",
        "last-u32", "numel-2^33", "max-numel-2d", "max-numel"])
def test_round_trip_edge_cases(t: SparseTensor) -> None:
    got = round_trip(t)
    assert_same(got, t)
    if t.numel <= 2**20:
        assert np.array_equal(got.to_dense(), t.to_dense())


def test_huge_tensor_with_few_indices_is_a_few_bytes() -> None:
    t = sparse((2**40,), [0, 2**40 - 1], index_dtype=np.uint64)
    body = body_of(encode_tensor("w", t))
    assert body["index_enc"] == "varint" and body["indices"] == b"\x00" + ref_varint([2**40 - 2])
    assert len(body["indices"]) == 1 + 6
    assert round_trip(t).indices.dtype == np.int64


def test_message_round_trip_and_to_dense_dtype() -> None:
    t = sparse((4, 4), [1, 5, 15], "<f2")
    msg = make(C.PUSH, 1, tensors={"g": t}, round=1, base_version=0, seq=0, kind="gradient", num_examples=1)
    got = decode(encode(msg)).tensors["g"]
    assert isinstance(got, SparseTensor)
    dense = got.to_dense(np.float32)
    assert dense.dtype == np.float32 and dense.shape == (4, 4)
    assert dense.reshape(-1)[[1, 5, 15]].tolist() == [1.0, 2.0, 3.0] and dense.sum() == 6.0
    assert got.to_dense().dtype == np.float16


def test_old_raw_frames_still_decode() -> None:
    for index_dtype in ("<u4", "<u8", "<i8"):
        frame = msgpack.packb({"name": "s", "enc": "sparse", "dtype": "<f4", "shape": [2, 3], "nnz": 2,
                               "index_dtype": index_dtype, "indices": np.array([1, 5], index_dtype).tobytes(),
                               "values": np.array([1, 2], "<f4").tobytes()})
        _, got = decode_tensor(frame)
        assert isinstance(got, SparseTensor)
        assert got.indices.tolist() == [1, 5] and got.indices.dtype == np.uint32
        assert got.to_dense().tolist() == [[0, 1, 0], [0, 0, 2]]


# ----------------------------------------------------------------------------------------------- the encoder's choice
def random_tensor(numel: int, density: float, seed: int = 0) -> SparseTensor:
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(numel, int(numel * density), replace=False)).astype(np.uint32)
    return SparseTensor((numel,), idx, rng.standard_normal(idx.size).astype(np.float16))


def test_very_sparse_is_varint_and_dense_is_bitmap() -> None:
    assert index_encoding(random_tensor(100_000, 0.001)) == "varint"
    assert index_encoding(random_tensor(100_000, 0.1)) == "varint"
    assert index_encoding(random_tensor(100_000, 0.2)) == "bitmap"
    assert index_encoding(random_tensor(100_000, 0.5)) == "bitmap"
    assert index_encoding(random_tensor(100_000, 1.0)) == "bitmap"
    assert index_encoding(sparse((10,), [])) == "varint"


def test_raw_wins_only_when_gaps_need_five_byte_varints() -> None:
    t = sparse((2**32 - 1,), [2**31, 2**32 - 2], index_dtype=np.uint64)
    body = body_of(encode_tensor("w", t))
    assert body["index_enc"] == "raw" and body["index_dtype"] == "<u4" and len(body["indices"]) == 8
    assert_same(round_trip(t), t)


def test_bytes_per_kept_element_beats_dgc_reference() -> None:
    """DGC's reference sends 12 bytes per kept element; fp16 values with varint gaps stay under 4 at 0.1%."""
    t = random_tensor(1_000_000, 0.001)
    assert index_encoding(t) == "varint"
    assert sparse_nbytes(t) / t.nnz < 4.0
    assert len(encode_tensor("features.0.weight", t)) / t.nnz < 4.0
    assert sparse_nbytes(random_tensor(1_000_000, 0.01)) / 10_000 < 3.5
    assert sparse_nbytes(random_tensor(1_000_000, 0.1)) / 100_000 < 3.1


def test_frame_carries_only_the_needed_fields() -> None:
    for t in (random_tensor(1000, 0.01), random_tensor(1000, 0.5)):
        frame = encode_tensor("conv1.weight", t)
        assert set(body_of(frame)) == {"name", "enc", "dtype", "shape", "nnz", "index_enc", "indices", "values"}
        assert len(frame) - sparse_nbytes(t) <= 100  # msgpack keys and headers of one small frame


def test_encoder_refuses_invalid_sparse_tensors() -> None:
    bad = [sparse((6,), [3, 1]), sparse((6,), [2, 2]), sparse((6,), [6]), sparse((6,), [-1, 2], index_dtype=np.int64),
           sparse((6,), [2**64 - 1, 3], index_dtype=np.uint64),
           SparseTensor((6,), np.array([1, 2], np.uint32), np.ones(3, np.float32)),
           SparseTensor((6,), np.array([1.0, 2.0]), np.ones(2, np.float32))]
    for t in bad:
        with pytest.raises(ProtocolError) as e:
            encode_tensor("w", t)
        assert e.value.code == E.BAD_TENSOR and "'w'" in e.value.message


@pytest.mark.timeout(60)
@pytest.mark.parametrize("numel", [10_000_000, 10**9])
def test_codec_is_vectorised(numel: int) -> None:
    """1M indices: 1-byte gaps (10M elements) and 2-byte gaps (10**9); a per-element Python loop takes seconds."""
    rng = np.random.default_rng(1)
    idx = np.unique(rng.integers(0, numel, 1_000_000)).astype(np.uint32)
    t = SparseTensor((numel,), idx, np.ones(idx.size, np.float16))
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        got = round_trip(t)
        best = min(best, time.perf_counter() - start)
    assert np.array_equal(got.indices, idx)
    assert best < 1.0, f"encode+decode of 1M indices took {best:.2f}s"


# ----------------------------------------------------------------------------------------------- hostile frames
F4 = np.dtype("<f4")


def sframe(index_enc: Any = "varint", indices: Any = b"\x01\x00", nnz: Any = 2, shape: Any = (2, 3),
           values: Any = None, **extra: Any) -> bytes:
    """A sparse float32 frame named "s" with the given index encoding; defaults decode to indices [1, 2]."""
    body: dict[str, Any] = {"name": "s", "enc": "sparse", "dtype": "<f4", "shape": list(shape), "nnz": nnz,
                            "index_enc": index_enc, "indices": indices,
                            "values": np.ones(nnz if isinstance(nnz, int) and 0 <= nnz < 100 else 0, F4).tobytes()
                            if values is None else values}
    body.update(extra)
    return msgpack.packb({k: v for k, v in body.items() if v is not DROP}, use_bin_type=True)


DROP = object()
NAN, INF = float("nan"), float("inf")


def vals(*xs: float, dtype: str = "<f4") -> bytes:
    return np.array(xs, dtype).tobytes()


HOSTILE: list[tuple[str, bytes, ErrorCode]] = [
    # nnz
    ("nnz missing", sframe(nnz=DROP, values=b""), E.BAD_TENSOR),
    ("nnz a string", sframe(nnz="2", values=vals(1, 1)), E.BAD_TENSOR),
    ("nnz a float", sframe(nnz=2.0, values=vals(1, 1)), E.BAD_TENSOR),
    ("nnz a bool", sframe(nnz=True, indices=b"\x01", values=vals(1)), E.BAD_TENSOR),
    ("nnz negative", sframe(nnz=-1, indices=b"", values=b""), E.BAD_TENSOR),
    ("nnz above numel", sframe(nnz=7, indices=b"\x00" * 7), E.BAD_TENSOR),
    ("nnz huge, few bytes", sframe(nnz=2**40, shape=[2**40], values=b"", indices=b"\x00"), E.BAD_TENSOR),
    # index_enc
    ("index_enc unknown", sframe(index_enc="rle"), E.BAD_TENSOR),
    ("index_enc an int", sframe(index_enc=1), E.BAD_TENSOR),
    ("index_enc binary", sframe(index_enc=b"varint"), E.BAD_TENSOR),
    ("index_enc nil", sframe(index_enc=None), E.BAD_TENSOR),
    # varint
    ("varint indices missing", sframe(indices=DROP), E.BAD_TENSOR),
    ("varint indices a string", sframe(indices="\x01\x00"), E.BAD_TENSOR),
    ("varint indices a list", sframe(indices=[1, 0]), E.BAD_TENSOR),
    ("varint fewer than nnz", sframe(indices=b"\x01"), E.BAD_TENSOR),
    ("varint more than nnz", sframe(indices=b"\x01\x00\x00"), E.BAD_TENSOR),
    ("varint bytes with nnz 0", sframe(nnz=0, indices=b"\x00"), E.BAD_TENSOR),
    ("varint dangling byte with nnz 0", sframe(nnz=0, indices=b"\x80"), E.BAD_TENSOR),
    ("varint truncated", sframe(indices=b"\x01\x81"), E.BAD_TENSOR),
    ("varint truncated mid-stream", sframe(indices=b"\x01\x80\x80"), E.BAD_TENSOR),
    ("varint of 7 bytes", sframe(nnz=1, indices=b"\x80" * 6 + b"\x00", shape=[2**40]), E.BAD_TENSOR),
    ("varint of 11 bytes (2**64 overflow)", sframe(nnz=1, indices=b"\xff" * 10 + b"\x01", shape=[2**40]),
     E.BAD_TENSOR),
    ("varint of 10 bytes wrapping to 0 in 64 bits", sframe(nnz=1, indices=b"\x80" * 9 + b"\x02"), E.BAD_TENSOR),
    ("varint not minimal", sframe(indices=b"\x01\x80\x00"), E.BAD_TENSOR),
    ("varint gap reaches numel", sframe(nnz=1, indices=b"\x06"), E.BAD_TENSOR),
    ("varint 6-byte gap beyond 2**40", sframe(nnz=1, indices=b"\xff" * 5 + b"\x3f", shape=[2**40]), E.BAD_TENSOR),
    ("varint cumulative index == numel", sframe(indices=b"\x02\x03"), E.BAD_TENSOR),
    ("varint cumulative past numel, each gap below it", sframe(shape=[2**40], indices=ref_varint([2**39, 2**40 + 5])),
     E.BAD_TENSOR),
    # bitmap
    ("bitmap one byte short", sframe("bitmap", b"\x06", shape=[3, 4]), E.BAD_TENSOR),
    ("bitmap one byte long", sframe("bitmap", b"\x06\x00"), E.BAD_TENSOR),
    ("bitmap empty for 2**40 elements", sframe("bitmap", b"", nnz=1, shape=[2**40]), E.BAD_TENSOR),
    ("bitmap popcount above nnz", sframe("bitmap", b"\x07"), E.BAD_TENSOR),
    ("bitmap popcount below nnz", sframe("bitmap", b"\x04"), E.BAD_TENSOR),
    ("bitmap padding bit set", sframe("bitmap", b"\x42", nnz=2), E.BAD_TENSOR),
    ("bitmap top padding bit set", sframe("bitmap", b"\x81"), E.BAD_TENSOR),
    ("bitmap indices a string", sframe("bitmap", "\x06"), E.BAD_TENSOR),
    ("bitmap indices missing", sframe("bitmap", DROP), E.BAD_TENSOR),
    # raw (explicit and legacy)
    ("raw unsorted", sframe("raw", np.array([2, 1], "<u4").tobytes(), index_dtype="<u4"), E.BAD_TENSOR),
    ("raw duplicate", sframe("raw", np.array([2, 2], "<u4").tobytes(), index_dtype="<u4"), E.BAD_TENSOR),
    ("raw index == numel", sframe("raw", np.array([1, 6], "<u4").tobytes(), index_dtype="<u4"), E.BAD_TENSOR),
    ("raw negative", sframe("raw", np.array([-1, 2], "<i8").tobytes(), index_dtype="<i8"), E.BAD_TENSOR),
    ("raw without index_dtype", sframe("raw", np.array([1, 2], "<u4").tobytes()), E.BAD_TENSOR),
    ("raw float index_dtype", sframe("raw", np.array([1, 2], "<f4").tobytes(), index_dtype="<f4"), E.BAD_TENSOR),
    ("raw short indices", sframe("raw", np.array([1], "<u4").tobytes(), index_dtype="<u4"), E.BAD_TENSOR),
    ("legacy unsorted", sframe(DROP, np.array([2, 1], "<u8").tobytes(), index_dtype="<u8"), E.BAD_TENSOR),
    # values
    ("values short", sframe(values=vals(1)), E.BAD_TENSOR),
    ("values long", sframe(values=vals(1, 2, 3)), E.BAD_TENSOR),
    ("values one byte long", sframe(values=vals(1, 2) + b"\x00"), E.BAD_TENSOR),
    ("values missing", sframe(values=DROP), E.BAD_TENSOR),
    ("values a string", sframe(values="\x00" * 8), E.BAD_TENSOR),
    ("values for nnz 0", sframe(nnz=0, indices=b"", values=vals(1)), E.BAD_TENSOR),
    ("values NaN", sframe(values=vals(1, NAN)), E.NON_FINITE),
    ("values +inf (bitmap)", sframe("bitmap", b"\x06", values=vals(INF, 1)), E.NON_FINITE),
    ("values -inf f8", sframe(dtype="<f8", values=vals(1, -INF, dtype="<f8")), E.NON_FINITE),
    ("values NaN f16", sframe(dtype="<f2", values=vals(NAN, 1, dtype="<f2")), E.NON_FINITE),
    ("values inf f16", sframe(dtype="<f2", values=vals(1, INF, dtype="<f2")), E.NON_FINITE),
    # other field types
    ("dtype int", sframe(dtype=4), E.BAD_TENSOR),
    ("dtype int64", sframe(dtype="<i8", values=vals(1, 2, dtype="<i8")), E.BAD_TENSOR),
    ("shape a string", sframe(shape="6"), E.BAD_TENSOR),
    ("shape negative", sframe(shape=[-6]), E.BAD_TENSOR),
    ("shape over 2**40 elements", sframe(shape=[2**40 + 1]), E.BAD_TENSOR),
]


@pytest.mark.parametrize("frame, code", [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_decode_refuses_hostile_sparse_frames(frame: bytes, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as e:
        decode_tensor(frame)
    assert e.value.code == code, f"{ErrorCode(e.value.code).name}: {e.value}"
    assert "'s'" in e.value.message  # the message names the tensor


@pytest.mark.timeout(60)
def test_varint_sum_that_wraps_uint64_is_refused() -> None:
    """2**22 + 2**10 gaps of 2**42 - 1 (each a valid 6-byte varint) sum past 2**64 and wrap to a last index of 1023,
    below numel = 2**40; only bounding every gap by numel keeps the cumulative sum from wrapping."""
    zeros, big = 2**10, 2**22
    indices = b"\x00" * zeros + np.tile(np.frombuffer(b"\xff" * 5 + b"\x7f", np.uint8), big).tobytes()
    nnz = zeros + big
    with pytest.raises(ProtocolError) as e:
        decode_tensor(sframe(nnz=nnz, shape=[2**40], indices=indices, dtype="<f2", values=bytes(2 * nnz)))
    assert e.value.code == E.BAD_TENSOR and "'s'" in e.value.message


@pytest.mark.parametrize("frame, indices", [
    (sframe(), [1, 2]),
    (sframe(indices=b"\x00\x04"), [0, 5]),
    (sframe(nnz=0, indices=b""), []),
    (sframe("bitmap", b"\x06"), [1, 2]),
    (sframe("bitmap", b"\x21"), [0, 5]),
    (sframe("bitmap", b"\x80", nnz=1, shape=[8]), [7]),
    (sframe("raw", np.array([1, 2], "<u4").tobytes(), index_dtype="<u4"), [1, 2]),
    (sframe(DROP, np.array([0, 5], "<i8").tobytes(), index_dtype="<i8"), [0, 5]),
    (sframe(nnz=1, indices=b"\xff" * 5 + b"\x1f", shape=[2**40]), [2**40 - 1]),
    (sframe(indices=b"\x80\x01\x00", shape=[130]), [128, 129]),
    (sframe(values=vals(1, -0.0)), [1, 2]),
], ids=["varint", "varint-ends", "nnz0", "bitmap", "bitmap-ends", "bitmap-last", "raw", "legacy", "max-gap",
        "2-byte-gap", "negative-zero"])
def test_hostile_builders_decode_once_repaired(frame: bytes, indices: list[int]) -> None:
    """Guard against the table passing for the wrong reason: the builders' valid frames decode as expected."""
    _, got = decode_tensor(frame)
    assert isinstance(got, SparseTensor)
    assert got.indices.tolist() == indices and got.nnz == len(indices)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), enc=st.sampled_from(["varint", "bitmap"]))
def test_mutated_frames_decode_to_valid_tensors_or_raise_protocol_error(data: st.DataObject, enc: str) -> None:
    """Flip, drop or append bytes of a valid index payload: whatever is accepted satisfies every invariant."""
    numel = data.draw(st.integers(1, 300))
    idx = sorted(data.draw(st.sets(st.integers(0, numel - 1), max_size=12)))
    payload = bytearray(ref_varint(idx) if enc == "varint" else ref_bitmap(idx, numel))
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["set", "drop", "append"]))
        if op == "set" and payload:
            payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
        elif op == "drop" and payload:
            del payload[data.draw(st.integers(0, len(payload) - 1))]
        else:
            payload.append(data.draw(st.integers(0, 255)))
    nnz = data.draw(st.sampled_from([len(idx), max(len(idx) - 1, 0), len(idx) + 1]))
    try:
        _, got = decode_tensor(sframe(enc, bytes(payload), nnz=nnz, shape=[numel], values=np.ones(nnz, F4).tobytes()))
    except ProtocolError as err:
        assert err.code == E.BAD_TENSOR
        return
    assert isinstance(got, SparseTensor)
    ind = got.indices.astype(np.int64)
    assert ind.size == nnz and (ind.size == 0 or (ind[0] >= 0 and ind[-1] < numel and (np.diff(ind) > 0).all()))
    expected = ref_varint(ind.tolist()) if enc == "varint" else ref_bitmap(ind.tolist(), numel)
    assert expected == bytes(payload)  # only canonical payloads are accepted


def test_varint_and_bitmap_frames_use_the_compact_layout_and_maps_still_decode() -> None:
    sparse = random_tensor(100_000, 0.001)
    frame = encode_tensor("fc1.weight", sparse)
    assert isinstance(msgpack.unpackb(frame, raw=False), list)
    as_map = msgpack.packb(body_of(frame), use_bin_type=True)
    assert len(frame) + 40 < len(as_map), "the positional layout drops the keys"
    for f in (frame, as_map):
        name, got = decode_tensor(f)
        assert name == "fc1.weight" and isinstance(got, SparseTensor)
        assert np.array_equal(got.indices, sparse.indices) and np.array_equal(got.values, sparse.values)


@pytest.mark.parametrize("body", [
    ["sparse", "w", "<f4", [4], 1, "varint", b"\x00"],  # 7 fields
    ["dense", "w", "<f4", [4], 1, "varint", b"\x00", b"\x00\x00\x00\x00"],  # not sparse
    ["sparse", "w", "<f4", [4], 1, "raw", b"\x00\x00\x00\x00", b"\x00\x00\x00\x00"],  # raw needs the map
    ["sparse", "w", "<f4", [4], 2, "varint", b"\x00", b"\x00\x00\x00\x00"],  # nnz vs values
])
def test_malformed_compact_frames_are_refused(body: list[Any]) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_tensor(msgpack.packb(body, use_bin_type=True))
    assert info.value.code == ErrorCode.BAD_TENSOR


# ----------------------------------------------------------------------------------------------- packed frames
SHAPES = {"a.weight": (3, 4), "a.bias": (3,), "b.weight": (2, 5)}  # flat offsets 0, 12, 15; 25 in all


@given(st.lists(st.sets(st.integers(0, 24), max_size=25), min_size=1, max_size=1))
@FAST
def test_packed_frame_round_trips_every_tensor_it_touches(picks: list[set[int]]) -> None:
    rng = np.random.default_rng(len(picks[0]))
    flat = sorted(picks[0])
    tensors, offset = {}, 0
    for name, shape in SHAPES.items():
        n = math.prod(shape)
        idx = np.array([i - offset for i in flat if offset <= i < offset + n], np.int64)
        tensors[name] = SparseTensor(shape, idx, rng.normal(size=len(idx)).astype(np.float16))
        offset += n
    packed = pack_sparse(tensors, SHAPES)
    assert list(packed) == [PACKED_NAME] and packed[PACKED_NAME].shape == (25,)
    name, frame = decode_tensor(encode_tensor(PACKED_NAME, packed[PACKED_NAME]))
    got = unpack_sparse({name: frame}, SHAPES)
    kept = {k: t for k, t in tensors.items() if t.nnz}
    assert sorted(got) == sorted(kept), "tensors without a kept element are left out"
    for k, t in kept.items():
        g = got[k]
        assert isinstance(g, SparseTensor) and g.shape == t.shape
        assert g.indices.tolist() == t.indices.tolist() and g.values.tolist() == t.values.tolist()


def test_packing_saves_the_per_frame_overhead_and_leaves_mixed_updates_alone() -> None:
    tensors = {k: SparseTensor(s, np.array([1], np.int64), np.array([0.5], np.float16)) for k, s in SHAPES.items()}
    per_tensor = sum(len(encode_tensor(k, t)) for k, t in tensors.items())
    packed = sum(len(encode_tensor(k, t)) for k, t in pack_sparse(tensors, SHAPES).items())
    assert packed < per_tensor - 40, (packed, per_tensor)
    mixed = {**tensors, "a.bias": np.zeros(3, np.float32)}
    assert pack_sparse(mixed, SHAPES).keys() == mixed.keys(), "a dense tensor keeps the per-tensor layout"
    fp32 = {**tensors, "a.bias": SparseTensor((3,), np.array([0], np.int64), np.array([1.0], np.float32))}
    assert pack_sparse(fp32, SHAPES).keys() == fp32.keys(), "values of two dtypes are not packed"
    one = {"a.weight": tensors["a.weight"]}
    assert pack_sparse(one, SHAPES) == one


@pytest.mark.parametrize("tensors", [
    {PACKED_NAME: SparseTensor((24,), np.array([1], np.int64), np.array([1.0], np.float32))},
    {PACKED_NAME: SparseTensor((25,), np.array([1], np.int64), np.array([1.0], np.float32)),
     "a.bias": np.zeros(3, np.float32)},
    {PACKED_NAME: np.zeros(25, np.float32)},
], ids=["wrong-length", "with-another-tensor", "dense"])
def test_a_malformed_packed_frame_is_a_model_mismatch(tensors: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError) as err:
        unpack_sparse(tensors, SHAPES)
    assert err.value.code == ErrorCode.MODEL_MISMATCH and "packed" in str(err.value)


# ----------------------------------------------------------------------------------------------- zlib codec
@FAST
@given(t=random_sparse())
def test_compressed_frames_round_trip_and_are_never_larger(t: SparseTensor) -> None:
    plain, packed = encode_tensor("w", t), encode_tensor("w", t, compress=True)
    assert len(packed) <= len(plain)
    _, got = decode_tensor(packed)
    assert isinstance(got, SparseTensor) and got.shape == t.shape and got.values.dtype == t.values.dtype
    assert got.indices.tolist() == t.indices.tolist()
    assert got.values.tobytes() == t.values.tobytes()


def test_a_downlink_like_delta_shrinks_by_a_sixth() -> None:
    rng = np.random.default_rng(3)
    weights = (rng.standard_normal(60_000) * 0.05).astype(np.float32)
    idx = np.sort(rng.choice(weights.size, 6_000, replace=False))
    t = SparseTensor(weights.shape, idx, weights[idx])
    plain, packed = encode_tensor("*", t), encode_tensor("*", t, compress=True)
    assert body_of(packed)["codec"] == "zlib"
    assert len(packed) < 0.85 * len(plain), (len(packed), len(plain))


def zframe(values: bytes | None = None, indices: bytes | None = None, nnz: int = 2, **extra: Any) -> bytes:
    """A zlib sparse frame that decodes to indices [1, 2] with values [1, 1] unless a part is replaced."""
    val = zlib.compress(np.ones(2, F4).view(np.uint8).reshape(-1, 4).T.tobytes()) if values is None else values
    return sframe("varint", zlib.compress(b"\x01\x00") if indices is None else indices, nnz=nnz, values=val,
                  **{"codec": "zlib", **extra})


def test_a_valid_zlib_frame_decodes() -> None:
    _, got = decode_tensor(zframe())
    assert isinstance(got, SparseTensor) and got.indices.tolist() == [1, 2] and got.values.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("frame", [
    zframe(codec="lzma"),
    zframe(values=b"not zlib at all"),
    zframe(values=zlib.compress(np.ones(2, F4).tobytes())[:-3]),
    zframe(values=zlib.compress(np.ones(2, F4).tobytes()) + b"x"),
    zframe(values=zlib.compress(np.ones(3, F4).tobytes())),
    zframe(values=zlib.compress(np.ones(1, F4).tobytes())),
    zframe(indices=zlib.compress(b"\x00" * 4096)),
    zframe(indices=zlib.compress(b"\x01\x00\x00")),
    zframe(nnz=2_000_000, values=zlib.compress(b"\x00" * 8_000_000), shape=(10**7,)),
], ids=["unknown-codec", "not-zlib", "truncated", "trailing-bytes", "too-long", "too-short",
        "index-bomb", "index-extra-varint", "values-bomb"])
def test_hostile_zlib_frames_are_refused(frame: bytes) -> None:
    with pytest.raises(ProtocolError) as err:
        decode_tensor(frame)
    assert err.value.code == ErrorCode.BAD_TENSOR


def test_a_compressed_dense_frame_round_trips_bit_for_bit_and_is_smaller() -> None:
    rng = np.random.default_rng(5)
    weights = (rng.standard_normal((120, 400)) * 0.05).astype(np.float32)
    plain, packed = encode_tensor("fc1.weight", weights), encode_tensor("fc1.weight", weights, compress=True)
    assert body_of(packed)["codec"] == "zlib" and len(packed) < 0.92 * len(plain)
    name, got = decode_tensor(packed)
    assert name == "fc1.weight" and isinstance(got, np.ndarray) and got.tobytes() == weights.tobytes()
    bits = rng.integers(0, 2**32, 1000, dtype=np.uint64).astype(np.uint32) & np.uint32(0xBFFFFFFF)  # finite
    noise = bits.view(np.float32)  # random bits in every byte plane: zlib gains nothing
    assert "codec" not in body_of(encode_tensor("n", noise, compress=True)), "sent plain when zlib does not help"


def dframe(data: bytes, shape: tuple[int, ...] = (2, 3), **extra: Any) -> bytes:
    return msgpack.packb({"name": "d", "enc": "dense", "dtype": "<f4", "shape": list(shape), "data": data,
                          "codec": "zlib", **extra}, use_bin_type=True)


def test_a_valid_zlib_dense_frame_decodes() -> None:
    ones = np.ones(6, "<f4")
    _, got = decode_tensor(dframe(zlib.compress(ones.view(np.uint8).reshape(-1, 4).T.tobytes())))
    assert isinstance(got, np.ndarray) and got.shape == (2, 3) and got.tolist() == [[1.0] * 3] * 2


@pytest.mark.parametrize("frame", [
    dframe(zlib.compress(np.ones(5, "<f4").tobytes())),
    dframe(zlib.compress(np.ones(7, "<f4").tobytes())),
    dframe(zlib.compress(np.ones(6, "<f4").tobytes()) + b"!"),
    dframe(b"garbage"),
    dframe(zlib.compress(b"\x00" * 4 * 10**6), shape=(10**6,)),
    dframe(zlib.compress(np.ones(6, "<f4").tobytes()), codec="gzip"),
    dframe(zlib.compress(np.full(6, np.inf, "<f4").view(np.uint8).reshape(-1, 4).T.tobytes())),
], ids=["short", "long", "trailing", "not-zlib", "bomb", "unknown-codec", "inf"])
def test_hostile_zlib_dense_frames_are_refused(frame: bytes) -> None:
    with pytest.raises(ProtocolError) as err:
        decode_tensor(frame)
    assert err.value.code in (ErrorCode.BAD_TENSOR, ErrorCode.NON_FINITE)
