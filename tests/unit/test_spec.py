"""docs/protocol.md against the code: its tables (error codes, message types, fields, limits) match
fedctl.wire.constants and fedctl.wire.messages.SCHEMA, and every worked example of §11 decodes to what it states."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from fedctl.errors import ProtocolError
from fedctl.wire import (
    PACKED_NAME,
    SCHEMA,
    SparseTensor,
    TensorSlice,
    decode,
    encode,
    unpack_sparse,
)
from fedctl.wire import constants as C
from fedctl.wire.constants import ErrorCode
from fedctl.wire.frames import COMPACT_SPARSE_FIELDS, decode_tensor

SPEC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
TEXT = SPEC.read_text(encoding="utf-8")
REQUIRED_EXAMPLES = {"join", "model-dense", "push-sparse", "push-packed", "model-delta-zlib", "chunk", "error"}


# ----------------------------------------------------------------------------------------------- markdown
def section(heading: str) -> str:
    """The text of the section whose heading line starts with ``heading``, up to the next heading of any level."""
    match = re.search(rf"^{re.escape(heading)}.*?\n(.*?)(?=^#)", TEXT + "\n#", re.S | re.M)
    assert match, f"docs/protocol.md has no section {heading!r}"
    return match.group(1)


def tables(text: str) -> list[list[list[str]]]:
    """Every markdown table in ``text``: rows of cells, the header row first, the separator row left out."""
    out: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                current.append(cells)
        elif current:
            out.append(current)
            current = []
    return out


def table(heading: str, first_header: str) -> list[list[str]]:
    """The rows (without the header row) of the table in section ``heading`` whose first column is ``first_header``."""
    for rows in tables(section(heading)):
        if rows[0][0] == first_header:
            return rows[1:]
    raise AssertionError(f"no table starting with column {first_header!r} in {heading!r}")


def plain(cell: str) -> str:
    return cell.replace("`", "").strip()


def number(cell: str) -> int:
    """``65,536`` or ``2^40``."""
    text = plain(cell).replace(",", "")
    base, _, power = text.partition("^")
    return int(base) ** int(power) if power else int(base)


# ----------------------------------------------------------------------------------------------- tables
def test_error_code_table_is_the_enum() -> None:
    rows = table("## 6. Error codes", "code")
    documented = {int(code): plain(name) for code, name, *_ in rows}
    assert documented == {e.value: e.name for e in ErrorCode}
    assert [int(r[0]) for r in rows] == sorted(int(r[0]) for r in rows), "codes listed in order"


def test_message_type_table_is_the_constants() -> None:
    rows = table("## 5. Message types", "type")
    direction = {plain(t): d for t, d, *_ in rows}
    assert set(direction) == set(C.MESSAGE_TYPES) == set(SCHEMA)
    assert {t for t, d in direction.items() if d in ("W→B", "both")} == set(C.WORKER_TO_BROKER)
    assert {t for t, d in direction.items() if d in ("B→W", "both")} == set(C.BROKER_TO_WORKER)


def test_field_table_is_the_schema() -> None:
    """Every field of every type, in the order the decoder checks them, required or not."""
    rows = table("## 5. Message types", "message")
    documented: dict[str, list[tuple[str, bool]]] = {}
    for mtype, field, required, _ in rows:
        assert required in ("yes", "no"), required
        documented.setdefault(plain(mtype), []).append((plain(field), required == "yes"))
    schema = {t: [(f, req) for f, (_, req) in fields.items()] for t, fields in SCHEMA.items() if fields}
    assert documented == schema


def probes(rule: str) -> tuple[list[Any], list[Any]]:
    """Values the documented ``rule`` accepts and values it refuses."""
    if rule.startswith("str:"):  # an enumeration: "str: `a`, `b` or `c`"
        return re.findall(r"`([^`]+)`", rule), ["other", 1]
    rule = plain(rule)
    if m := re.match(r"str ≤ (\d+)", rule):
        n = int(m.group(1))
        return ["", "é" * n], ["x" * (n + 1), 1, b"x", 1.5]
    if m := re.match(r"int ≥ (\d+)", rule):
        k = int(m.group(1))
        return [k, k + 1, 2**63 - 1], [k - 1, 2**63, True, float(k), str(k)]
    if m := re.match(r"int (\d+)\.\.2\^(\d+)", rule):
        lo, hi = int(m.group(1)), 2 ** int(m.group(2))
        return [lo, hi], [lo - 1, hi + 1, True]
    if m := re.match(r"list of ≤ (\d+) \[name, shape, dtype\]", rule):
        n = int(m.group(1))
        entry = ["fc.weight", [2, 3], "float32"]
        return [[entry], [entry] * n, [["b", [], "bfloat16"]]], [
            [], [entry] * (n + 1), [["a", [2], "float32", 1]], [["a", [-1], "float32"]], [[1, [2], "float32"]],
            [["a", [2] * 9, "float32"]], [["a", [2], "x" * 17]], "x", [("a", [2], "float32")]]
    if rule.startswith("map, exactly the keys clip"):  # model.dp
        ok = {"clip": 1.0, "noise": 0.0}
        return [ok, {"clip": 1e-9, "noise": 5}], [{}, {**ok, "x": 1}, {"clip": 1.0}, {**ok, "clip": 0},
                                                  {**ok, "noise": -0.1}, {**ok, "noise": float("nan")}, []]
    if rule.startswith("map, exactly the keys attempt"):  # model.secagg
        ok = {"attempt": 0, "clip": 4.0, "max_inputs": 1, "weight_ref": 1}
        return [ok, {**ok, "attempt": 2**63 - 1, "clip": 1e-9, "max_inputs": 2**24}], [
            {}, {**ok, "extra": 1}, {k: v for k, v in ok.items() if k != "clip"}, {**ok, "clip": 0},
            {**ok, "clip": float("inf")}, {**ok, "max_inputs": 0}, {**ok, "max_inputs": 2**24 + 1},
            {**ok, "weight_ref": 0}, {**ok, "attempt": -1}, []]
    if m := re.match(r"bin of (\d+) bytes", rule):
        n = int(m.group(1))
        return [b"x" * n], [b"x" * (n - 1), b"x" * (n + 1), "x" * n, None]
    if m := re.match(r"number in \(0, 1\]", rule):
        return [1, 1.0, 0.25, 1e-9], [0, -0.5, 1.5, True, "1"]
    if m := re.match(r"list of ≤ (\d+) distinct ints ≥ 0", rule):
        n = int(m.group(1))
        return [[], [0, 7], list(range(n))], [[1, 1], [-1], ["a"], list(range(n + 1)), [True], "x"]
    if m := re.match(r"list of ≤ (\d+) \[(index, c, s|index, sealed|index, bin (\d+))\]", rule):
        n = int(m.group(1))
        kind = m.group(2)
        size = 32 if kind == "index, c, s" else int(m.group(3)) if m.group(3) else 88
        values = 2 if kind == "index, c, s" else 1
        entry = lambda i: [i, *([b"k" * size] * values)]  # noqa: E731
        bad_size = b"k" * (size - 1) if kind != "index, sealed" else b""
        return [[], [entry(0), entry(3)], [entry(i) for i in range(n)]], [
            [entry(1), entry(1)], [entry(i) for i in range(n + 1)], [[-1, *entry(0)[1:]]],
            [[0, *([bad_size] * values)]], [entry(0)[:-1]], [[0, *(["k" * size] * values)]], "x"]
    if rule.startswith("map of ≤"):
        n = int(re.match(r"map of ≤ (\d+)", rule).group(1))  # type: ignore[union-attr]
        return [{}, {f"m{i}": 0.5 for i in range(n)}, {"a": 1}], [{f"m{i}": 0.5 for i in range(n + 1)},
                                                                 {"a": True}, {"a": "x"}, {1: 1.0}, []]
    if rule.startswith("map"):
        return [{}, {"a": 1}], [[], "map"]
    if rule.startswith("finite number ≥ 0"):
        return [0, 0.0, 1.5, 3], [-1e-9, float("nan"), float("inf"), True, "1", [1]]
    if rule.startswith("number"):
        return [0, -1, 1.5], [True, "1", [1]]
    if rule.startswith("bool"):
        return [True, False], [1, 0, "true", None]
    raise AssertionError(f"no probe for the documented rule {rule!r}")


def test_field_rules_match_the_checks() -> None:
    """The documented value rule of every field, probed at its bounds against the decoder's check."""
    rows = table("## 5. Message types", "message")
    raw_rules = {(plain(t), plain(f)): v for t, f, _, v in rows}
    enum_rows = {("push", "kind"): C.UPDATE_KINDS, ("ack", "status"): C.ACK_STATUSES}
    for (mtype, field), rule in raw_rules.items():
        check = SCHEMA[mtype][field][0]
        good, bad = probes(rule if rule.startswith("str:") else rule.split(":", 1)[0])
        if (mtype, field) in enum_rows:
            assert set(good) == set(enum_rows[mtype, field]), (mtype, field, good)
        for value in good:
            assert check(value), (mtype, field, rule, value)
        for value in bad:
            assert not check(value), (mtype, field, rule, value)


LIMIT_NAMES = re.compile(r"^(MAX|DEFAULT)_[A-Z_]+$")


def test_limits_table_is_the_constants() -> None:
    rows = table("### 3.4 Limits", "constant")
    documented = {plain(name): number(value) for name, value, *_ in rows}
    for name, value in documented.items():
        assert getattr(C, name) == value, name
    assert set(documented) == {n for n in vars(C) if LIMIT_NAMES.match(n)}


def test_compact_layout_table_is_the_codec() -> None:
    rows = table("### 4.2 Sparse frame", "position")
    assert [plain(r[1]) for r in rows] == list(COMPACT_SPARSE_FIELDS)
    assert [int(r[0]) for r in rows] == list(range(len(COMPACT_SPARSE_FIELDS)))


def test_annotated_bytes_are_the_example_frame() -> None:
    """The byte-by-byte walk through a compact sparse frame in §4.2 is frame 1 of example push-sparse."""
    rows = table("### 4.2 Sparse frame", "bytes")
    annotated = bytes.fromhex("".join(plain(r[0]) for r in rows))
    assert annotated == examples()["push-sparse"][1]


# ----------------------------------------------------------------------------------------------- examples
def examples() -> dict[str, list[bytes]]:
    """The frames of every ``frames:NAME`` block: ``frame N: ...`` starts a frame, ``OFFSET: hex`` lines fill it."""
    out: dict[str, list[bytes]] = {}
    for name, body in re.findall(r"^```frames:(\S+)\n(.*?)^```", TEXT, re.S | re.M):
        frames: list[bytearray] = []
        for line in body.splitlines():
            if line.startswith("frame "):
                frames.append(bytearray())
            elif line.strip():
                offset, _, hexbytes = line.partition(":")
                assert frames and int(offset, 16) == len(frames[-1]), (name, line)
                frames[-1] += bytes.fromhex(hexbytes)
        assert name not in out, f"example {name} appears twice"
        out[name] = [bytes(f) for f in frames]
    return out


def expectations() -> dict[str, dict[str, Any]]:
    return {name: json.loads(body) for name, body in re.findall(r"^```expect:(\S+)\n(.*?)^```", TEXT, re.S | re.M)}


def test_every_example_has_an_expectation() -> None:
    assert set(examples()) == set(expectations())
    assert REQUIRED_EXAMPLES <= set(examples())


def stated(spec: Any) -> list[Any]:
    if isinstance(spec, dict) and "arange" in spec:
        return list(range(*spec["arange"]))
    if isinstance(spec, dict) and "full" in spec:
        count, value = spec["full"]
        return [value] * count
    return list(spec)


def check_tensor(where: str, tensor: Any, want: dict[str, Any]) -> None:
    kind = {"dense": np.ndarray, "sparse": SparseTensor, "slice": TensorSlice}[want["enc"]]
    assert isinstance(tensor, kind), where
    values = tensor if isinstance(tensor, np.ndarray) else tensor.values
    assert values.dtype.str == want["dtype"], where
    assert list(tensor.shape) == want["shape"], where
    assert np.reshape(values, -1).tolist() == stated(want["values"]), where
    if isinstance(tensor, SparseTensor):
        assert tensor.indices.tolist() == stated(want["indices"]), where
    if isinstance(tensor, TensorSlice):
        assert tensor.start == want["start"], where


def check_frame_layout(where: str, frame: bytes, want: dict[str, Any]) -> None:
    """What the frame's raw msgpack says: compact array or map, index encoding, codec."""
    body = msgpack.unpackb(frame, raw=False)
    if isinstance(body, list):
        assert want.get("layout") == "compact", where
        body = dict(zip(COMPACT_SPARSE_FIELDS, body))
    else:
        assert want.get("layout", "map") == "map", where
    assert body.get("index_enc") == want.get("index_enc"), where
    assert body.get("codec") == want.get("codec"), where


@pytest.mark.parametrize("name", sorted(examples()))
def test_example_decodes_to_what_the_spec_states(name: str) -> None:
    frames, want = examples()[name], expectations()[name]
    msg = decode(frames)
    assert (msg.type, msg.id, msg.re) == (want["type"], want["id"], want["re"])
    assert dict(msg.fields) == want["fields"]
    assert list(msg.tensors) == list(want.get("tensors", {}))
    assert list(msg.slices) == list(want.get("slices", {}))
    parts = {**msg.tensors, **msg.slices}
    for (tname, tensor), frame in zip(parts.items(), frames[1:]):
        tw = {**want.get("tensors", {}), **want.get("slices", {})}[tname]
        check_tensor(f"{name}/{tname}", tensor, tw)
        check_frame_layout(f"{name}/{tname}", frame, tw)
    if "unpacked" in want:
        assert list(msg.tensors) == [PACKED_NAME]
        shapes = {k: tuple(v) for k, v in want["model"].items()}
        unpacked = unpack_sparse(msg.tensors, shapes)
        assert list(unpacked) == list(want["unpacked"])
        for tname, tensor in unpacked.items():
            check_tensor(f"{name}/{tname}", tensor, want["unpacked"][tname])


@pytest.mark.parametrize("name", sorted(examples()))
def test_example_is_what_the_encoder_sends(name: str) -> None:
    """Re-encoded, a decoded example gives its own bytes (zlib streams aside: another zlib may deflate otherwise)."""
    frames = examples()[name]
    again = encode(decode(frames))
    assert again[0] == frames[0]
    for frame, other in zip(frames[1:], again[1:]):
        if "codec" not in msgpack.unpackb(frame, raw=False):
            assert other == frame
    assert len(again) == len(frames)


def test_frame_sizes_in_the_spec_are_right() -> None:
    """``frame N: ..., B bytes`` lines state each frame's length."""
    for name, body in re.findall(r"^```frames:(\S+)\n(.*?)^```", TEXT, re.S | re.M):
        sizes = [int(m) for m in re.findall(r"^frame \d+: .*?(\d+) bytes$", body, re.M)]
        assert sizes == [len(f) for f in examples()[name]], name


def test_the_python_recipe_for_a_dense_frame_is_a_valid_frame() -> None:
    """§4.8's one-line recipe for Python peers without fedctl, and msgpack-numpy's own layout, which is refused."""
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    frame = msgpack.packb({"name": "w", "enc": "dense", "dtype": a.dtype.str, "shape": list(a.shape),
                           "data": a.tobytes()})
    msg = decode([msgpack.packb({"v": 1, "type": "push", "id": 1, "round": 0, "base_version": 0, "seq": 0,
                                 "kind": "weights", "num_examples": 1, "tensors": 1}), frame])
    assert np.array_equal(msg.tensors["w"], a)
    ndarray_map = {b"nd": True, b"type": "<f4", b"kind": b"", b"shape": [2, 3], b"data": a.tobytes()}
    with pytest.raises(ProtocolError) as e:
        decode_tensor(msgpack.packb(ndarray_map, use_bin_type=True))
    assert e.value.code == ErrorCode.BAD_TENSOR
