"""Chunked transfers, protocol side (docs/protocol.md §7.1): splitting, the receiver's cursor, the window."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedctl.errors import ProtocolError
from fedctl.wire import chunks, decode, encode, make
from fedctl.wire import constants as C
from fedctl.wire.constants import ErrorCode
from fedctl.wire.frames import decode_tensor, encode_tensor
from fedctl.wire.tensors import TensorSlice


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 300), min_size=1, max_size=5), chunk_elems=st.integers(1, 200))
def test_split_covers_the_model_once_in_order_and_reassembles(sizes: list[int], chunk_elems: int) -> None:
    shapes = {f"t{i}": (n,) for i, n in enumerate(sizes)}
    rng = np.random.default_rng(len(sizes))
    tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    pieces = list(chunks.split(tensors, shapes, chunk_elems * 4))
    assert len(pieces) == chunks.count(shapes, chunk_elems * 4)
    assert all(sum(p.values.size for p in piece.values()) <= chunk_elems for piece in pieces)
    cursor = chunks.Cursor(shapes, len(pieces))
    out = {k: np.full(s, np.nan, np.float32) for k, s in shapes.items()}
    for i, piece in enumerate(pieces):
        msg = decode(encode(make(C.CHUNK, i + 1, slices=piece, xfer=9, index=i)))
        for name, part, _ in cursor.accept(i, msg.slices):
            out[name][part.start:part.stop] = part.values
    assert cursor.done and all(np.array_equal(out[k], tensors[k]) for k in shapes)


SHAPES = {"a": (2, 3), "b": (4,)}


def sl(name: str, start: int, n: int, dtype: str = "<f4") -> dict[str, TensorSlice]:
    return {name: TensorSlice(SHAPES.get(name, (9,)), start, np.ones(n, dtype))}


@pytest.mark.parametrize("steps, code", [
    ([(0, sl("a", 0, 6)), (0, sl("b", 0, 4))], ErrorCode.BAD_FIELD),            # index repeated
    ([(1, sl("a", 0, 6))], ErrorCode.BAD_FIELD),                                # index skipped
    ([(0, sl("a", 1, 5))], ErrorCode.MODEL_MISMATCH),                           # gap at the start
    ([(0, sl("b", 0, 4))], ErrorCode.MODEL_MISMATCH),                           # tensors out of order
    ([(0, sl("c", 0, 4))], ErrorCode.MODEL_MISMATCH),                           # not in the model
    ([(0, sl("a", 0, 6, "<f2"))], ErrorCode.MODEL_MISMATCH),                    # not float32
    ([(0, {})], ErrorCode.BAD_TENSOR),                                          # empty chunk
    ([(0, sl("a", 0, 6)), (1, sl("b", 0, 3))], ErrorCode.BAD_TENSOR),           # last chunk short
    ([(0, sl("a", 0, 6)), (1, sl("b", 0, 4)), (2, sl("b", 0, 1))], ErrorCode.BAD_FIELD),  # past the end
], ids=["repeat", "skip", "gap", "order", "unknown", "fp16", "empty", "short", "extra"])
def test_cursor_refuses_every_chunk_that_does_not_continue_the_model(steps: list, code: ErrorCode) -> None:
    cursor = chunks.Cursor(SHAPES, 2)
    with pytest.raises(ProtocolError) as err:
        for index, slices in steps:
            cursor.accept(index, slices)
    assert err.value.code == code


@pytest.mark.parametrize("body", [
    {"start": -1}, {"start": 6}, {"start": 5, "data": np.ones(2, "<f4").tobytes()},
    {"data": b""}, {"data": b"\x00\x00\x80"}, {"data": np.array([np.nan], "<f4").tobytes()}, {"start": "0"},
], ids=["negative", "past-end", "overflows", "empty", "partial-element", "nan", "start-not-int"])
def test_hostile_slice_frames_are_refused(body: dict) -> None:
    frame = {"name": "a", "enc": "slice", "dtype": "<f4", "shape": [2, 3], "start": 0,
             "data": np.ones(1, "<f4").tobytes(), **body}
    with pytest.raises(ProtocolError) as err:
        decode_tensor(msgpack.packb(frame, use_bin_type=True))
    assert err.value.code in (ErrorCode.BAD_TENSOR, ErrorCode.NON_FINITE)


def test_slices_travel_only_in_chunk_messages() -> None:
    piece = TensorSlice((6,), 2, np.ones(3, np.float32))
    header = msgpack.packb({"v": 1, "type": "push", "id": 1, "round": 1, "base_version": 0, "seq": 0,
                            "kind": "weights", "num_examples": 1, "tensors": 1})
    with pytest.raises(ProtocolError) as err:
        decode([header, encode_tensor("a", piece)])
    assert err.value.code == ErrorCode.BAD_TENSOR and "no slices" in err.value.message
    with pytest.raises(ProtocolError) as err:
        make(C.PUSH, 1, slices={"a": piece}, round=1, base_version=0, seq=0, kind="weights", num_examples=1)
    assert err.value.code == ErrorCode.BAD_FIELD
    with pytest.raises(ProtocolError):
        make(C.CHUNK, 1, tensors={"a": np.ones(3, np.float32)}, xfer=1, index=0)


def test_window_keeps_about_a_quarter_second_in_flight() -> None:
    window = chunks.Window(256 * 1024)
    assert window.size == 2
    for _ in range(20):  # 100 Mbit/s: a 256 KiB chunk credited every 21 ms
        window.credited(1, 256 * 1024 / 12.5e6)
    assert 10 <= window.size <= 13
    slow = chunks.Window(256 * 1024)
    for _ in range(20):  # 1 Mbit/s: one chunk every 2.1 s
        slow.credited(1, 256 * 1024 / 125e3)
    assert slow.size == 1
