"""Properties of the wire codec: exact round trips of arbitrary tensors; decode never fails but with ProtocolError."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedctl.errors import ProtocolError
from fedctl.wire import SparseTensor, decode, encode, make
from fedctl.wire import constants as C
from fedctl.wire.messages import SCHEMA, Message

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

finite_f32 = hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
                        elements=st.floats(width=32, allow_nan=False, allow_infinity=False))


@FAST
@given(arrays=st.lists(finite_f32, min_size=1, max_size=4))
def test_dense_float32_round_trip_is_exact(arrays: list[np.ndarray]) -> None:
    tensors = {f"t{i}": a for i, a in enumerate(arrays)}
    msg = make(C.PUSH, 3, tensors=tensors, round=1, base_version=0, seq=0, kind="weights", num_examples=1)
    got = decode(encode(msg))
    for name, a in tensors.items():
        g = got.tensors[name]
        assert g.dtype == np.float32 and g.shape == a.shape
        assert g.tobytes() == a.tobytes()  # bit-exact, -0.0 and subnormals included


@st.composite
def sparse_tensors(draw: st.DrawFn) -> SparseTensor:
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    numel = int(np.prod(shape))
    idx = sorted(draw(st.sets(st.integers(0, numel - 1), max_size=numel)))
    dtype = draw(st.sampled_from([np.uint32, np.uint64, np.int64]))
    values = draw(hnp.arrays(np.float32, len(idx), elements=st.floats(-1e6, 1e6, width=32)))
    return SparseTensor(shape, np.array(idx, dtype=dtype), values)


@FAST
@given(tensor=sparse_tensors())
def test_sparse_round_trip_is_exact(tensor: SparseTensor) -> None:
    msg = make(C.PUSH, 1, tensors={"s": tensor}, round=1, base_version=0, seq=0, kind="delta", num_examples=1)
    got = decode(encode(msg)).tensors["s"]
    assert isinstance(got, SparseTensor)
    assert got.shape == tensor.shape and np.array_equal(got.indices, tensor.indices)
    assert got.values.tobytes() == tensor.values.tobytes()


def _decode_or_protocol_error(frames: list[bytes]) -> None:
    try:
        msg = decode(frames)
    except ProtocolError as err:
        assert err.code in C.ErrorCode._value2member_map_
        return
    assert isinstance(msg, Message)


@settings(max_examples=500, deadline=None)
@given(frames=st.lists(st.binary(max_size=256), min_size=0, max_size=4))
def test_decode_of_arbitrary_bytes_raises_only_protocol_error(frames: list[bytes]) -> None:
    _decode_or_protocol_error(frames)


# Structured fuzzing: valid msgpack whose shape is close to a real message reaches far deeper than random bytes.
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(),
                    st.text(max_size=8), st.binary(max_size=16))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                      max_leaves=10)
field_names = st.sampled_from(sorted({f for schema in SCHEMA.values() for f in schema} | {"v", "type", "id", "re",
                                                                                          "tensors", "x"}))


@st.composite
def near_headers(draw: st.DrawFn) -> dict[str, Any]:
    mtype = draw(st.one_of(st.sampled_from(sorted(SCHEMA)), values))
    header: dict[str, Any] = {"v": draw(st.one_of(st.just(1), values)), "type": mtype,
                              "id": draw(st.one_of(st.integers(0, 10), values))}
    header.update(draw(st.dictionaries(field_names, values, max_size=6)))
    return header


@st.composite
def near_tensor_frames(draw: st.DrawFn) -> bytes:
    body: dict[str, Any] = {
        "name": draw(st.one_of(st.sampled_from(["a", "b"]), values)),
        "enc": draw(st.one_of(st.sampled_from(["dense", "sparse"]), values)),
        "dtype": draw(st.one_of(st.sampled_from(["<f4", "<f2", "<f8", "|O", ">f4"]), values)),
        "shape": draw(st.one_of(st.lists(st.integers(-2, 2**64 - 1), max_size=9), values)),
        "data": draw(st.one_of(st.binary(max_size=64), values)),
        "nnz": draw(st.one_of(st.integers(-2, 20), values)),
        "index_dtype": draw(st.one_of(st.sampled_from(["<u4", "<u8", "<i8"]), values)),
        "indices": draw(st.one_of(st.binary(max_size=64), values)),
        "values": draw(st.one_of(st.binary(max_size=64), values)),
    }
    keep = draw(st.sets(st.sampled_from(sorted(body))))
    return msgpack.packb({k: v for k, v in body.items() if k in keep}, use_bin_type=True)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=near_headers(), tensor_frames=st.lists(near_tensor_frames(), max_size=3))
def test_decode_of_near_valid_messages_raises_only_protocol_error(header: dict[str, Any],
                                                                   tensor_frames: list[bytes]) -> None:
    if tensor_frames and "tensors" not in header:
        header["tensors"] = len(tensor_frames)
    _decode_or_protocol_error([msgpack.packb(header, use_bin_type=True), *tensor_frames])
