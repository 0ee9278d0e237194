"""Wire protocol v1 with bytes alone: round trips of every message type and a table of hostile frames."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import msgpack
import numpy as np
import pytest

from fedctl.errors import ProtocolError
from fedctl.wire import SparseTensor, check_against_spec, decode, encode, make, peek_id
from fedctl.wire import constants as C
from fedctl.wire.constants import ErrorCode
from fedctl.wire.tensors import TensorSlice

ALL = C.MESSAGE_TYPES


def header(mtype: str = C.PULL, **fields: Any) -> bytes:
    base: dict[str, Any] = {"v": C.PROTOCOL_VERSION, "type": mtype, "id": 1}
    base.update(fields)
    return msgpack.packb({k: v for k, v in base.items() if v is not _DROP}, use_bin_type=True)


_DROP = object()
"""Marker: leave this key out of the header."""


def tframe(**overrides: Any) -> bytes:
    """A dense float32 tensor frame of shape (2,), with any field replaced (or dropped with _DROP)."""
    body: dict[str, Any] = {"name": "a", "enc": "dense", "dtype": "<f4", "shape": [2],
                            "data": np.array([1.0, 2.0], "<f4").tobytes()}
    body.update(overrides)
    return msgpack.packb({k: v for k, v in body.items() if v is not _DROP}, use_bin_type=True)


def sframe(indices: list[int], values: list[float] | None = None, index_dtype: str = "<u4", **overrides: Any) -> bytes:
    """A sparse float32 tensor frame of shape (2, 3)."""
    vals = np.array(values if values is not None else [1.0] * len(indices), "<f4")
    body: dict[str, Any] = {"name": "s", "enc": "sparse", "dtype": "<f4", "shape": [2, 3], "nnz": len(indices),
                            "index_dtype": index_dtype,
                            "indices": np.array(indices, index_dtype).tobytes(), "values": vals.tobytes()}
    body.update(overrides)
    return msgpack.packb(body, use_bin_type=True)


def push_header(n: int = 1, **fields: Any) -> bytes:
    base = {"round": 1, "base_version": 0, "seq": 0, "kind": "weights", "num_examples": 5, "tensors": n}
    base.update(fields)
    return header(C.PUSH, **base)


def with_tensors(*frames: bytes) -> list[bytes]:
    return [push_header(len(frames)), *frames]


# ----------------------------------------------------------------------------------------------- round trips
DENSE = {
    "f32": np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5,
    "f16": np.array([0.5, -1.0, 65504.0], dtype=np.float16),
    "f64": np.array([[1e-300, -1e300]], dtype=np.float64),
    "empty": np.zeros((0,), dtype=np.float32),
    "empty2d": np.zeros((3, 0), dtype=np.float32),
    "scalar": np.array(3.25, dtype=np.float32),
    "4d": np.ones((1, 2, 1, 3), dtype=np.float32),
}


def assert_same_tensors(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert list(got) == list(want)
    for name, w in want.items():
        g = got[name]
        if isinstance(w, SparseTensor):
            assert isinstance(g, SparseTensor)
            assert g.shape == w.shape and g.dtype == w.dtype
            assert np.array_equal(g.indices, w.indices)
            assert g.indices.dtype == (np.uint32 if w.numel < 2**32 else np.int64)  # decoded index dtype
            assert np.array_equal(g.values, w.values)
            assert np.array_equal(g.to_dense(), w.to_dense())
        else:
            assert isinstance(g, np.ndarray)
            assert g.dtype == w.dtype and g.shape == w.shape
            assert g.tobytes() == w.tobytes()


MESSAGES = [
    make(C.JOIN, 1, worker="w0", backend="numpy", num_examples=600, model="mlp", host="h"),
    make(C.JOIN, 2, worker="w1", backend="torch", num_examples=0),
    make(C.WELCOME, 3, re=1, worker="w0", run={"run_id": "abc", "rounds": 3, "model": {"name": "mlp"}}),
    make(C.PULL, 4),
    make(C.PULL, 5, version=7),
    make(C.MODEL, 6, re=4, tensors=DENSE, round=1, version=0, task={"lr": 0.1, "epochs": 1}),
    make(C.PUSH, 7, tensors={"g": DENSE["f32"]}, round=1, base_version=0, seq=0, kind="gradient",
         num_examples=10, metrics={"train_loss": 0.5, "steps": 3}),
    make(C.PUSH, 8, tensors={"s": SparseTensor((2, 3), np.array([0, 4], np.uint32), np.array([1, -2], np.float32)),
                             "z": SparseTensor((5,), np.zeros(0, np.int64), np.zeros(0, np.float32)),
                             "u": SparseTensor((4,), np.array([3], np.uint64), np.array([9.0], np.float64))},
         round=2, base_version=1, seq=1, kind="delta", num_examples=1),
    make(C.ACK, 9, re=7, round=1, seq=0, status="accepted"),
    make(C.ERROR, 10, re=7, code=int(ErrorCode.STALE_UPDATE), reason="round 1 is not open", fix="pull again"),
    make(C.ERROR, 11, code=500, reason="x"),
    make(C.HEARTBEAT, 12, t=1234.5),
    make(C.HEARTBEAT, 13),
    make(C.LEAVE, 14, reason="bye"),
    make(C.DONE, 15, round=3, version=3, reason="the run is complete"),
    make(C.PUSH, 16, round=2, base_version=1, seq=2, kind="weights", num_examples=5, chunks=3),
    make(C.CHUNK, 17, slices={"f32": TensorSlice((2, 3), 1, np.array([1.5, -2.0], np.float32))}, xfer=16, index=0),
    make(C.CREDIT, 18, xfer=16, received=1),
    make(C.EVALUATE, 19, re=3, tensors=DENSE, round=2, version=2),
    make(C.EVALUATE, 20, re=3, round=2, version=2, base=1, chunks=4),
    make(C.EVALUATION, 21, version=2, num_examples=150, metrics={"accuracy": 0.75, "loss": 0.5}),
    make(C.EVALUATION, 22, version=2, num_examples=0),
    make(C.FAILED, 23, round=4, reason="ZeroDivisionError: division by zero"),
    make(C.MODEL, 24, re=4, tensors=DENSE, round=1, version=0, task={"lr": 0.1},
         secagg={"attempt": 2**61, "clip": 4.0, "max_inputs": 100, "weight_ref": 600}, dp={"clip": 1.0, "noise": 0.1}),
    make(C.SA_KEYS, 25, round=1, attempt=9, c=b"c" * 32, s=b"s" * 32),
    make(C.SA_PEERS, 26, re=25, round=1, attempt=9, index=3, threshold=2,
         peers=[[0, b"a" * 32, b"b" * 32], [5, b"c" * 32, b"d" * 32]]),
    make(C.SA_SHARES, 27, round=1, attempt=9, shares=[[0, b"x" * 88], [5, b"y" * 88]]),
    make(C.SA_INBOX, 28, re=27, round=1, attempt=9, shares=[[5, b"z" * 88]]),
    make(C.SA_INPUT, 29, tensors={"masked": np.array([0, 2**32 - 1, 7], np.uint32)}, round=1, attempt=9,
         base_version=0, num_examples=60, weight=0.1, metrics={"train_loss": 0.5}),
    make(C.SA_UNMASK, 30, re=29, round=1, attempt=9, survivors=[5], dropped=[0]),
    make(C.SA_REVEAL, 31, round=1, attempt=9, seeds=[[5, b"q" * 16]], keys=[[0, b"k" * 32]]),
    make(C.STATUS, 32, workers=False),
    make(C.STATUS_REPLY, 33, re=32, status={"round": 3, "version": 3, "workers_connected": 0, "workers": []}),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: f"{m.type}-{m.id}")
def test_round_trip_every_message_type(msg: Any) -> None:
    frames = encode(msg)
    assert len(frames) == 1 + len(msg.tensors) + len(msg.slices)
    got = decode(frames, ALL)
    assert (got.type, got.id, got.re) == (msg.type, msg.id, msg.re)
    assert dict(got.fields) == dict(msg.fields)
    assert_same_tensors(dict(got.tensors), dict(msg.tensors))
    assert {k: (s.shape, s.start, s.values.tobytes()) for k, s in got.slices.items()} == {
        k: (s.shape, s.start, s.values.tobytes()) for k, s in msg.slices.items()}


def test_every_message_type_is_round_tripped() -> None:
    assert {m.type for m in MESSAGES} == set(C.MESSAGE_TYPES)


def test_decode_accepts_memoryviews() -> None:
    frames = [memoryview(f) for f in encode(MESSAGES[5])]
    assert_same_tensors(dict(decode(frames, ALL).tensors), DENSE)


def test_make_refuses_what_decode_would_refuse() -> None:
    with pytest.raises(ProtocolError) as e:
        make(C.JOIN, 1, worker="w", backend="numpy")
    assert e.value.code == ErrorCode.MISSING_FIELD
    with pytest.raises(ProtocolError) as e:
        make(C.PULL, 1, tensors={"a": np.zeros(1, np.float32)})
    assert e.value.code == ErrorCode.BAD_FIELD
    with pytest.raises(ProtocolError) as e:
        make("gossip", 1)
    assert e.value.code == ErrorCode.UNKNOWN_TYPE


def test_peek_id() -> None:
    assert peek_id(header(C.PUSH, id=42)) == 42
    assert peek_id(b"\xc1garbage") is None
    assert peek_id(msgpack.packb([1, 2])) is None
    assert peek_id(header(id=-3)) is None
    assert peek_id(header(id=True)) is None


# ----------------------------------------------------------------------------------------------- hostile frames
E = ErrorCode
HOSTILE: list[tuple[str, list[bytes], frozenset[str], ErrorCode]] = [
    # framing and header
    ("empty message", [], ALL, E.MALFORMED),
    ("not msgpack", [b"\xc1\xc1\xc1"], ALL, E.MALFORMED),
    ("truncated msgpack", [header(C.JOIN, worker="w", backend="numpy", num_examples=1)[:-4]], ALL, E.MALFORMED),
    ("trailing bytes", [header() + b"\x00"], ALL, E.MALFORMED),
    ("header is a list", [msgpack.packb([1, "pull", 0])], ALL, E.MALFORMED),
    ("header is an int", [msgpack.packb(1)], ALL, E.MALFORMED),
    ("header has int keys", [msgpack.packb({1: 1, "v": 1, "type": "pull", "id": 0})], ALL, E.MALFORMED),
    ("ext type in header", [header(x=msgpack.ExtType(1, b"\x80\x04N."))], ALL, E.MALFORMED),
    ("bin (pickle) in header", [header(x=b"\x80\x04\x95N.")], ALL, E.BAD_FIELD),
    ("bin in a leave header", [header(C.LEAVE, reason=b"bye")], ALL, E.BAD_FIELD),
    ("secagg: a short key", [header(C.SA_KEYS, round=1, attempt=1, c=b"c" * 31, s=b"s" * 32)], ALL, E.BAD_FIELD),
    ("secagg: a share for one peer twice", [header(C.SA_SHARES, round=1, attempt=1,
                                                   shares=[[3, b"x"], [3, b"y"]])], ALL, E.BAD_FIELD),
    ("secagg: an input without its frame", [header(C.SA_INPUT, round=1, attempt=1, base_version=0, num_examples=1,
                                                   weight=1.0)], ALL, E.BAD_FIELD),
    ("secagg: a weight above 1", [header(C.SA_INPUT, round=1, attempt=1, base_version=0, num_examples=1,
                                         weight=1.5, tensors=1), tframe(name="masked", dtype="<u4")], ALL,
     E.BAD_FIELD),
    ("field elements outside sa_input", [push_header(1), tframe(dtype="<u4")], ALL, E.BAD_TENSOR),
    ("oversized header", [header(C.LEAVE, reason="x" * (C.MAX_HEADER_BYTES + 1))], ALL, E.TOO_LARGE),
    ("too many frames", [push_header(C.MAX_TENSORS + 1)] + [tframe(name=f"t{i}") for i in range(C.MAX_TENSORS + 1)],
     ALL, E.TOO_LARGE),
    # version
    ("wrong version", [header(v=2)], ALL, E.UNSUPPORTED_VERSION),
    ("version 0", [header(v=0)], ALL, E.UNSUPPORTED_VERSION),
    ("missing version", [header(v=_DROP)], ALL, E.UNSUPPORTED_VERSION),
    ("version as string", [header(v="1")], ALL, E.UNSUPPORTED_VERSION),
    ("version as float", [header(v=1.0)], ALL, E.UNSUPPORTED_VERSION),
    ("version as bool", [header(v=True)], ALL, E.UNSUPPORTED_VERSION),
    # type
    ("unknown type", [header("gossip")], ALL, E.UNKNOWN_TYPE),
    ("missing type", [header(type=_DROP)], ALL, E.UNKNOWN_TYPE),
    ("type is a list", [header(type=["push"])], ALL, E.UNKNOWN_TYPE),
    ("type is a map", [header(type={"a": 1})], ALL, E.UNKNOWN_TYPE),
    ("broker decodes welcome", [header(C.WELCOME, worker="w", run={})], C.WORKER_TO_BROKER, E.UNKNOWN_TYPE),
    ("broker decodes model", [header(C.MODEL, round=1, version=0, task={})], C.WORKER_TO_BROKER, E.UNKNOWN_TYPE),
    ("worker decodes push", [push_header(0, tensors=_DROP)], C.BROKER_TO_WORKER, E.UNKNOWN_TYPE),
    ("worker decodes join", [header(C.JOIN, worker="w", backend="b", num_examples=1)], C.BROKER_TO_WORKER,
     E.UNKNOWN_TYPE),
    # common fields
    ("missing id", [header(id=_DROP)], ALL, E.BAD_FIELD),
    ("negative id", [header(id=-1)], ALL, E.BAD_FIELD),
    ("bool id", [header(id=True)], ALL, E.BAD_FIELD),
    ("string re", [header(re="1")], ALL, E.BAD_FIELD),
    ("id beyond 63 bits", [header(id=2**63)], ALL, E.BAD_FIELD),
    # schema
    ("missing required field", [header(C.JOIN, worker="w", backend="numpy")], ALL, E.MISSING_FIELD),
    ("required field nil", [header(C.JOIN, worker="w", backend="numpy", num_examples=None)], ALL,
     E.MISSING_FIELD),
    ("wrong field type", [header(C.JOIN, worker="w", backend="numpy", num_examples="ten")], ALL, E.BAD_FIELD),
    ("float where int expected", [header(C.JOIN, worker="w", backend="numpy", num_examples=1.5)], ALL,
     E.BAD_FIELD),
    ("bool where int expected", [header(C.JOIN, worker="w", backend="numpy", num_examples=True)], ALL,
     E.BAD_FIELD),
    ("negative count", [header(C.JOIN, worker="w", backend="numpy", num_examples=-1)], ALL, E.BAD_FIELD),
    ("id too long", [header(C.JOIN, worker="w" * (C.MAX_ID_CHARS + 1), backend="b", num_examples=1)], ALL,
     E.BAD_FIELD),
    ("unknown field", [header(C.PULL, extra=1)], ALL, E.BAD_FIELD),
    ("unknown push kind", [push_header(0, tensors=_DROP, kind="poison")], ALL, E.BAD_FIELD),
    ("push kind is a list", [push_header(0, tensors=_DROP, kind=["weights"])], ALL, E.BAD_FIELD),
    ("push num_examples 0", [push_header(0, tensors=_DROP, num_examples=0)], ALL, E.BAD_FIELD),
    ("metrics not numbers", [push_header(0, tensors=_DROP, metrics={"loss": "low"})], ALL, E.BAD_FIELD),
    ("metrics with bool", [push_header(0, tensors=_DROP, metrics={"ok": True})], ALL, E.BAD_FIELD),
    ("welcome run not a map", [header(C.WELCOME, worker="w", run=[1])], ALL, E.BAD_FIELD),
    # tensor count
    ("declares 2 tensors, sends 1", [push_header(2), tframe()], ALL, E.BAD_FIELD),
    ("declares 1 tensor, sends 2", [push_header(1), tframe(name="a"), tframe(name="b")], ALL, E.BAD_FIELD),
    ("undeclared tensor frame", [push_header(0, tensors=_DROP), tframe()], ALL, E.BAD_FIELD),
    ("tensor count is a string", [push_header("1"), tframe()], ALL, E.BAD_FIELD),
    ("tensors on heartbeat", [header(C.HEARTBEAT, tensors=1), tframe()], ALL, E.BAD_FIELD),
    ("tensors on join", [header(C.JOIN, worker="w", backend="b", num_examples=1, tensors=1), tframe()], ALL,
     E.BAD_FIELD),
    # dense tensor frames
    ("tensor frame not msgpack", with_tensors(b"\xc1"), ALL, E.BAD_TENSOR),
    ("tensor frame not a map", with_tensors(msgpack.packb([1, 2])), ALL, E.BAD_TENSOR),
    ("tensor frame with ext", with_tensors(tframe(data=msgpack.ExtType(3, b"xx"))), ALL, E.BAD_TENSOR),
    ("tensor without name", with_tensors(tframe(name=_DROP)), ALL, E.BAD_TENSOR),
    ("tensor with empty name", with_tensors(tframe(name="")), ALL, E.BAD_TENSOR),
    ("tensor name too long", with_tensors(tframe(name="n" * (C.MAX_NAME_CHARS + 1))), ALL, E.BAD_TENSOR),
    ("unknown encoding", with_tensors(tframe(enc="rle")), ALL, E.BAD_TENSOR),
    ("dtype object", with_tensors(tframe(dtype="|O")), ALL, E.BAD_TENSOR),
    ("dtype int64", with_tensors(tframe(dtype="<i8", data=np.array([1, 2], "<i8").tobytes())), ALL, E.BAD_TENSOR),
    ("dtype big-endian f4", with_tensors(tframe(dtype=">f4", data=np.array([1, 2], ">f4").tobytes())), ALL,
     E.BAD_TENSOR),
    ("dtype complex", with_tensors(tframe(dtype="<c8", data=np.zeros(2, "<c8").tobytes())), ALL, E.BAD_TENSOR),
    ("dtype pickle-ish", with_tensors(tframe(dtype="V8")), ALL, E.BAD_TENSOR),
    ("dtype not a string", with_tensors(tframe(dtype=4)), ALL, E.BAD_TENSOR),
    ("negative dim", with_tensors(tframe(shape=[-2])), ALL, E.BAD_TENSOR),
    ("float dim", with_tensors(tframe(shape=[2.0])), ALL, E.BAD_TENSOR),
    ("string dim", with_tensors(tframe(shape=["2"])), ALL, E.BAD_TENSOR),
    ("bool dim", with_tensors(tframe(shape=[True, 2])), ALL, E.BAD_TENSOR),
    ("shape not a list", with_tensors(tframe(shape=2)), ALL, E.BAD_TENSOR),
    ("ndim 9", with_tensors(tframe(shape=[1] * 8 + [2])), ALL, E.BAD_TENSOR),
    ("huge dims around a zero", with_tensors(tframe(shape=[0, 2**64 - 1], data=b"")), ALL, E.BAD_TENSOR),
    ("dims overflowing numpy", with_tensors(tframe(shape=[0, 2**62, 2**62], data=b"")), ALL, E.BAD_TENSOR),
    ("data short", with_tensors(tframe(data=b"\x00" * 7)), ALL, E.BAD_TENSOR),
    ("data long", with_tensors(tframe(data=b"\x00" * 9)), ALL, E.BAD_TENSOR),
    ("data missing", with_tensors(tframe(data=_DROP)), ALL, E.BAD_TENSOR),
    ("data as a string", with_tensors(tframe(data="\x00" * 8)), ALL, E.BAD_TENSOR),
    ("NaN", with_tensors(tframe(data=np.array([1.0, np.nan], "<f4").tobytes())), ALL, E.NON_FINITE),
    ("+inf", with_tensors(tframe(data=np.array([np.inf, 0], "<f4").tobytes())), ALL, E.NON_FINITE),
    ("-inf f64", with_tensors(tframe(dtype="<f8", data=np.array([0, -np.inf], "<f8").tobytes())), ALL,
     E.NON_FINITE),
    ("NaN f16", with_tensors(tframe(dtype="<f2", data=np.array([np.nan, 1], "<f2").tobytes())), ALL,
     E.NON_FINITE),
    ("NaN in a 0-d tensor", with_tensors(tframe(shape=[], data=np.array([np.nan], "<f4").tobytes())), ALL,
     E.NON_FINITE),
    ("duplicate tensor names", with_tensors(tframe(), tframe()), ALL, E.BAD_TENSOR),
    # sparse tensor frames
    ("sparse nnz > numel", with_tensors(sframe([0, 1, 2, 3, 4, 5, 6])), ALL, E.BAD_TENSOR),
    ("sparse negative nnz", with_tensors(sframe([], nnz=-1)), ALL, E.BAD_TENSOR),
    ("sparse unsorted", with_tensors(sframe([3, 1])), ALL, E.BAD_TENSOR),
    ("sparse duplicate index", with_tensors(sframe([2, 2])), ALL, E.BAD_TENSOR),
    ("sparse index == numel", with_tensors(sframe([1, 6])), ALL, E.BAD_TENSOR),
    ("sparse index out of range (single)", with_tensors(sframe([100])), ALL, E.BAD_TENSOR),
    ("sparse negative index", with_tensors(sframe([-1, 2], index_dtype="<i8")), ALL, E.BAD_TENSOR),
    ("sparse u8 index that wraps to -1", with_tensors(sframe([2**64 - 1, 3], index_dtype="<u8")), ALL,
     E.BAD_TENSOR),
    ("sparse float indices", with_tensors(sframe([1, 2], index_dtype="<f4")), ALL, E.BAD_TENSOR),
    ("sparse indices shorter than nnz", with_tensors(sframe([1, 2], nnz=3, values=[1.0, 1.0])), ALL, E.BAD_TENSOR),
    ("sparse values shorter than indices", with_tensors(sframe([1, 2], values=[1.0])), ALL, E.BAD_TENSOR),
    ("sparse values longer than indices", with_tensors(sframe([1, 2], values=[1.0, 2.0, 3.0])), ALL, E.BAD_TENSOR),
    ("sparse nnz missing", with_tensors(msgpack.packb({"name": "s", "enc": "sparse", "dtype": "<f4",
                                                        "shape": [2]})), ALL, E.BAD_TENSOR),
    ("sparse NaN value", with_tensors(sframe([1, 2], values=[1.0, float("nan")])), ALL, E.NON_FINITE),
]


@pytest.mark.parametrize("frames, allowed, code", [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_decode_refuses_hostile_frames(frames: list[bytes], allowed: frozenset[str], code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as e:
        decode(frames, allowed)
    assert e.value.code == code, f"{ErrorCode(e.value.code).name}: {e.value}"
    assert e.value.message


def test_hostile_table_frames_are_fine_once_repaired() -> None:
    """Guard against the table passing for the wrong reason: the unmodified builders decode."""
    msg = decode(with_tensors(tframe(), sframe([0, 5])), ALL)
    assert np.array_equal(msg.tensors["a"], [1.0, 2.0])
    assert np.array_equal(msg.tensors["s"].to_dense(), [[1, 0, 0], [0, 0, 1]])
    assert decode([header()], ALL).type == C.PULL
    assert decode(with_tensors(sframe([2**32 - 2], index_dtype="<u8", shape=[2**32 - 1])), ALL)


# ----------------------------------------------------------------------------------------------- spec checks
SPEC = {"w": (2, 3), "b": (3,)}


def test_check_against_spec_accepts_the_model() -> None:
    check_against_spec({"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}, SPEC)
    check_against_spec({"w": SparseTensor((2, 3), np.zeros(0, np.uint32), np.zeros(0, np.float32)),
                        "b": np.zeros(3, np.float32)}, SPEC)


@pytest.mark.parametrize("tensors", [
    {"w": np.zeros((2, 3), np.float32)},
    {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32), "extra": np.zeros(1, np.float32)},
    {"w": np.zeros((3, 2), np.float32), "b": np.zeros(3, np.float32)},
    {"w": np.zeros((6,), np.float32), "b": np.zeros(3, np.float32)},
    {"w": np.zeros((2, 3), np.float64), "b": np.zeros(3, np.float32)},
    {"w": np.zeros((2, 3), np.float16), "b": np.zeros(3, np.float32)},
], ids=["missing", "extra", "transposed", "flattened", "float64", "float16"])
def test_check_against_spec_refuses_other_models(tensors: dict[str, np.ndarray]) -> None:
    with pytest.raises(ProtocolError) as e:
        check_against_spec(tensors, SPEC)
    assert e.value.code == ErrorCode.MODEL_MISMATCH


# ----------------------------------------------------------------------------------------------- no unpickling
@pytest.mark.timeout(60)
def test_decode_does_not_need_msgpack_numpy() -> None:
    """Decoding imports nothing that can unpickle: with msgpack_numpy and pickle blocked it still works."""
    code = textwrap.dedent("""
        import sys
        sys.modules["msgpack_numpy"] = None
        import numpy as np
        from fedctl.wire import decode, encode, make
        frames = encode(make("model", 1, tensors={"w": np.ones((2, 2), np.float32)}, round=1, version=0,
                             task={"lr": 0.1}))
        import pickle
        pickle.loads = pickle.load = None
        msg = decode(frames)
        assert msg.tensors["w"].sum() == 4.0
        assert "msgpack_numpy" not in sys.modules or sys.modules["msgpack_numpy"] is None
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_msgpack_numpy_payload_is_refused() -> None:
    """A peer using msgpack_numpy (arrays as bin + dtype maps, possibly pickled objects) is refused, not parsed."""
    msgpack_numpy = pytest.importorskip("msgpack_numpy")
    packed = msgpack.packb({"v": 1, "type": "pull", "id": 1, "x": np.array([object()], dtype=object)},
                           default=lambda o: msgpack_numpy.encode(o), use_bin_type=True)
    with pytest.raises(ProtocolError) as e:
        decode([packed], ALL)
    assert e.value.code == ErrorCode.MALFORMED
    frame = msgpack.packb({"name": "a", "enc": "dense", "dtype": "|O", "shape": [1], "data": b"\x80\x04N."})
    with pytest.raises(ProtocolError) as e:
        decode(with_tensors(frame), ALL)
    assert e.value.code == ErrorCode.BAD_TENSOR
