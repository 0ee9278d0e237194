"""Messages of wire protocol v1: one msgpack header frame plus one frame per tensor (docs/protocol.md §3).

``encode`` and ``decode`` work on lists of bytes and never touch a socket. ``decode`` validates the version,
the type, every header field against :data:`SCHEMA` and every tensor frame before returning a :class:`Message`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from fedctl.errors import ProtocolError
from fedctl.wire import constants as C
from fedctl.wire.constants import ErrorCode
from fedctl.wire.frames import MSGPACK_ERRORS, decode_tensor, encode_tensor
from fedctl.wire.tensors import Tensor, TensorSlice

Check = Callable[[Any], bool]


def _int(lo: int = 0) -> Check:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v < 2**63


def _str(max_chars: int) -> Check:
    return lambda v: isinstance(v, str) and len(v) <= max_chars


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _seconds(v: Any) -> bool:
    """A duration in seconds: a finite number, 0 or more."""
    return _num(v) and math.isfinite(v) and v >= 0


def _one_of(values: frozenset[str]) -> Check:
    return lambda v: isinstance(v, str) and v in values


def _metrics(v: Any) -> bool:
    return isinstance(v, dict) and len(v) <= C.MAX_METRICS and all(isinstance(k, str) and _num(x)
                                                                    for k, x in v.items())


def _finite_metrics(v: Any) -> bool:
    """An evaluation's metrics: as a push's, and finite (they are averaged into metrics.jsonl)."""
    return _metrics(v) and all(math.isfinite(x) for x in v.values())


def _chunks(v: Any) -> bool:
    return _int(1)(v) and v <= C.MAX_CHUNKS


def _signature(v: Any) -> bool:
    """A model signature: a list of [name, shape, dtype] (docs/protocol.md §5, join)."""
    return isinstance(v, list) and 0 < len(v) <= C.MAX_MODEL_TENSORS and all(
        isinstance(e, list) and len(e) == 3 and _str(C.MAX_NAME_CHARS)(e[0]) and isinstance(e[1], list)
        and len(e[1]) <= C.MAX_NDIM and all(_int(0)(d) for d in e[1]) and _str(16)(e[2]) for e in v)


def _map(v: Any) -> bool:
    return isinstance(v, dict)


def _bin(lo: int, hi: int) -> Check:
    return lambda v: isinstance(v, bytes) and lo <= len(v) <= hi


def _index_list(v: Any) -> bool:
    return isinstance(v, list) and len(v) <= C.MAX_SECAGG_PEERS and all(_int(0)(i) for i in v) \
        and len(set(v)) == len(v)


def _indexed(*checks: Check) -> Check:
    """A list of [index, value...] entries (≤ MAX_SECAGG_PEERS, distinct indices) whose values pass ``checks``."""
    def check(v: Any) -> bool:
        return isinstance(v, list) and len(v) <= C.MAX_SECAGG_PEERS and all(
            isinstance(e, list) and len(e) == 1 + len(checks) and _int(0)(e[0])
            and all(c(x) for c, x in zip(checks, e[1:])) for e in v) and len({e[0] for e in v}) == len(v)
    return check


def _secagg(v: Any) -> bool:
    """A model's ``secagg`` map: the attempt, the clipping range, the field's input bound, the weight reference."""
    return isinstance(v, dict) and set(v) == {"attempt", "clip", "max_inputs", "weight_ref"} \
        and _int(0)(v["attempt"]) and _num(v["clip"]) and math.isfinite(v["clip"]) and v["clip"] > 0 \
        and _int(1)(v["max_inputs"]) and v["max_inputs"] <= 2**24 and _int(1)(v["weight_ref"])


def _dp(v: Any) -> bool:
    """A model's ``dp`` map (distributed DP under secure aggregation): the L2 clip and each worker's noise std."""
    return isinstance(v, dict) and set(v) == {"clip", "noise"} and _num(v["clip"]) and _num(v["noise"]) \
        and math.isfinite(v["clip"]) and v["clip"] > 0 and math.isfinite(v["noise"]) and v["noise"] >= 0


_KEY = _bin(32, 32)
_SEALED = _bin(1, C.MAX_SEALED_BYTES)
_ATTEMPT = {"round": (_int(0), True), "attempt": (_int(0), True)}


# For each message type: field -> (check, required). "v", "type", "id", "re" and "tensors" are common fields.
SCHEMA: dict[str, dict[str, tuple[Check, bool]]] = {
    C.JOIN: {"worker": (_str(C.MAX_ID_CHARS), True), "backend": (_str(C.MAX_BACKEND_CHARS), True),
             "num_examples": (_int(0), True), "model": (_str(C.MAX_MODEL_NAME_CHARS), False),
             "host": (_str(C.MAX_HOST_CHARS), False), "device": (_str(C.MAX_BACKEND_CHARS), False),
             "params": (_signature, False)},
    C.WELCOME: {"worker": (_str(C.MAX_ID_CHARS), True), "run": (_map, True)},
    C.PULL: {"version": (_int(0), False), "link_bps": (_int(1), False)},
    C.MODEL: {"round": (_int(0), True), "version": (_int(0), True), "task": (_map, True), "base": (_int(0), False),
              "chunks": (_chunks, False), "secagg": (_secagg, False), "dp": (_dp, False)},
    C.PUSH: {"round": (_int(0), True), "base_version": (_int(0), True), "seq": (_int(0), True),
             "kind": (_one_of(C.UPDATE_KINDS), True),
             "num_examples": (_int(1), True), "metrics": (_metrics, False), "chunks": (_chunks, False)},
    C.CHUNK: {"xfer": (_int(0), True), "index": (_int(0), True)},
    C.CREDIT: {"xfer": (_int(0), True), "received": (_int(0), True)},
    C.ACK: {"round": (_int(0), True), "seq": (_int(0), True), "status": (_one_of(C.ACK_STATUSES), True)},
    C.ERROR: {"code": (_int(0), True), "reason": (_str(C.MAX_REASON_CHARS), True),
              "fix": (_str(C.MAX_REASON_CHARS), False)},
    C.HEARTBEAT: {"t": (_num, False), "rtt": (_seconds, False)},
    C.LEAVE: {"reason": (_str(C.MAX_REASON_CHARS), False)},
    C.FAILED: {"round": (_int(0), True), "reason": (_str(C.MAX_REASON_CHARS), True)},
    C.DONE: {"round": (_int(0), True), "version": (_int(0), True), "reason": (_str(C.MAX_REASON_CHARS), False)},
    C.EVALUATE: {"round": (_int(0), True), "version": (_int(0), True), "base": (_int(0), False),
                 "chunks": (_chunks, False)},
    C.EVALUATION: {"version": (_int(0), True), "num_examples": (_int(0), True),
                   "metrics": (_finite_metrics, False)},
    C.SA_KEYS: {**_ATTEMPT, "c": (_KEY, True), "s": (_KEY, True)},
    C.SA_PEERS: {**_ATTEMPT, "index": (_int(0), True), "threshold": (_int(1), True),
                 "peers": (_indexed(_KEY, _KEY), True)},
    C.SA_SHARES: {**_ATTEMPT, "shares": (_indexed(_SEALED), True)},
    C.SA_INBOX: {**_ATTEMPT, "shares": (_indexed(_SEALED), True)},
    C.SA_INPUT: {**_ATTEMPT, "base_version": (_int(0), True), "num_examples": (_int(1), True),
                 "weight": (lambda v: _num(v) and 0 < v <= 1, True), "metrics": (_metrics, False)},
    C.SA_UNMASK: {**_ATTEMPT, "survivors": (_index_list, True), "dropped": (_index_list, True)},
    C.SA_REVEAL: {**_ATTEMPT, "seeds": (_indexed(_bin(16, 16)), True), "keys": (_indexed(_KEY), True)},
    C.STATUS: {"workers": (lambda v: isinstance(v, bool), False)},
    C.STATUS_REPLY: {"status": (_map, True)},
}
CARRIES_TENSORS = frozenset({C.MODEL, C.PUSH, C.CHUNK, C.EVALUATE, C.SA_INPUT})
CARRIES_BIN = frozenset({C.SA_KEYS, C.SA_PEERS, C.SA_SHARES, C.SA_INBOX, C.SA_REVEAL})
"""The only types whose headers may hold msgpack bin values (keys, sealed shares, revealed shares)."""
COMMON = frozenset({"v", "type", "id", "re", "tensors"})


@dataclass(frozen=True)
class Message:
    """One protocol message: its type, sender-chosen ``id``, optional ``re`` (id it answers), fields, tensors."""

    type: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    tensors: Mapping[str, Tensor] = field(default_factory=dict)
    id: int = 0
    re: int | None = None
    slices: Mapping[str, TensorSlice] = field(default_factory=dict)
    """Only in ``chunk`` messages: the pieces of the transfer this chunk carries."""

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


def _fail(code: ErrorCode, message: str) -> ProtocolError:
    return ProtocolError(code, message)


def _check_fields(mtype: str, fields: Mapping[str, Any]) -> None:
    schema = SCHEMA[mtype]
    for name, (check, required) in schema.items():
        if name not in fields or fields[name] is None:
            if required:
                raise _fail(ErrorCode.MISSING_FIELD, f"{mtype} message lacks required field {name!r}")
            continue
        if not check(fields[name]):
            raise _fail(ErrorCode.BAD_FIELD, f"{mtype} field {name!r} has an invalid value")
    unknown = [k for k in fields if k not in schema]
    if unknown:
        raise _fail(ErrorCode.BAD_FIELD, f"{mtype} message has unknown fields {sorted(unknown)[:5]}")


def make(mtype: str, msg_id: int = 0, re: int | None = None, tensors: Mapping[str, Tensor] | None = None,
         slices: Mapping[str, TensorSlice] | None = None, **fields: Any) -> Message:
    """Build a message, checking it against the schema so fedctl never sends what it would refuse."""
    if mtype not in SCHEMA:
        raise _fail(ErrorCode.UNKNOWN_TYPE, f"unknown message type {mtype!r}")
    fields = {k: v for k, v in fields.items() if v is not None}
    _check_fields(mtype, fields)
    if tensors and (mtype not in CARRIES_TENSORS or mtype == C.CHUNK):
        raise _fail(ErrorCode.BAD_FIELD, f"{mtype} messages carry no whole tensors")
    if slices and mtype != C.CHUNK:
        raise _fail(ErrorCode.BAD_FIELD, f"only chunk messages carry tensor slices, not {mtype}")
    return Message(mtype, fields, dict(tensors or {}), msg_id, re, dict(slices or {}))


def encode_tensors(tensors: Mapping[str, Tensor], compress: bool = False) -> list[bytes]:
    """The tensor frames of a message, for callers that send the same tensors to many peers (``compress``: zlib
    for sparse tensors where it saves bytes, docs/protocol.md §4)."""
    return [encode_tensor(name, t, compress) for name, t in tensors.items()]


def encode(msg: Message, tensor_frames: list[bytes] | None = None) -> list[bytes]:
    """Frames of ``msg``: the msgpack header, then one frame per tensor in order.

    ``tensor_frames``, when given, are ``encode_tensors(msg.tensors)`` computed once by the caller.
    """
    header: dict[str, Any] = {"v": C.PROTOCOL_VERSION, "type": msg.type, "id": msg.id, **msg.fields}
    if msg.re is not None:
        header["re"] = msg.re
    parts: Mapping[str, Any] = msg.slices if msg.type == C.CHUNK else msg.tensors
    if parts:
        header["tensors"] = len(parts)
    # A push's only floats are its metrics: float32 (5 bytes, not 9) is plenty for a loss or a time, and the push
    # of a 99.9%-sparse DGC update is a few hundred bytes, so its header counts.
    frames = [msgpack.packb(header, use_bin_type=True, use_single_float=msg.type == C.PUSH)]
    if tensor_frames is None:
        tensor_frames = [encode_tensor(name, t) for name, t in parts.items()]
    elif len(tensor_frames) != len(parts):
        raise ValueError("one pre-encoded frame per tensor is required")
    frames.extend(tensor_frames)
    return frames


def _header(frame: bytes | memoryview) -> dict[str, Any]:
    if len(frame) > C.MAX_HEADER_BYTES:
        raise _fail(ErrorCode.TOO_LARGE, f"header frame of {len(frame)} bytes exceeds {C.MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(frame, raw=False, strict_map_key=True, max_bin_len=C.MAX_HEADER_BYTES,
                                 max_ext_len=0)
    except MSGPACK_ERRORS as exc:
        raise _fail(ErrorCode.MALFORMED, f"header frame is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise _fail(ErrorCode.MALFORMED, "header frame is not a msgpack map")
    return header


def peek_id(frame: bytes | memoryview) -> int | None:
    """Best-effort request id of a header frame, so an error reply can name the request it refuses."""
    if len(frame) > C.MAX_HEADER_BYTES:
        return None
    try:
        header = msgpack.unpackb(frame, raw=False, max_bin_len=C.MAX_HEADER_BYTES, max_ext_len=0)
    except MSGPACK_ERRORS:  # a malformed frame has no id; the error reply goes without one
        return None
    msg_id = header.get("id") if isinstance(header, dict) else None
    return msg_id if isinstance(msg_id, int) and not isinstance(msg_id, bool) and 0 <= msg_id < 2**63 else None


def peek(frame: bytes | memoryview) -> dict[str, Any] | None:
    """Best-effort header map of a header frame, unvalidated (for scheduling and for routing a refusal only)."""
    if len(frame) > C.MAX_HEADER_BYTES:
        return None
    try:
        header = msgpack.unpackb(frame, raw=False, max_bin_len=C.MAX_HEADER_BYTES, max_ext_len=0)
    except MSGPACK_ERRORS:
        return None
    return header if isinstance(header, dict) else None


def peek_type(frame: bytes | memoryview) -> str | None:
    """Best-effort message type of a header frame (for scheduling only: the message is validated when handled)."""
    mtype = (peek(frame) or {}).get("type")
    return mtype if isinstance(mtype, str) else None


def decode(frames: Sequence[bytes | memoryview], allowed: Iterable[str] = C.MESSAGE_TYPES) -> Message:
    """Decode and validate a multipart message (without any routing identity frame).

    Raises
    ------
    ProtocolError
        with the error code of the first rule the message breaks (docs/protocol.md §6).
    """
    if not frames:
        raise _fail(ErrorCode.MALFORMED, "empty message")
    if len(frames) > C.MAX_TENSORS + 1:
        raise _fail(ErrorCode.TOO_LARGE, f"message has {len(frames)} frames; at most {C.MAX_TENSORS + 1} allowed")
    header = _header(frames[0])
    version = header.get("v")
    if type(version) is not int or version != C.PROTOCOL_VERSION:  # 1.0 and True compare equal to 1
        raise _fail(ErrorCode.UNSUPPORTED_VERSION,
                    f"protocol version {version!r} is not supported (this peer speaks v{C.PROTOCOL_VERSION})")
    mtype = header.get("type")
    if not isinstance(mtype, str) or mtype not in SCHEMA or mtype not in set(allowed):
        raise _fail(ErrorCode.UNKNOWN_TYPE, f"message type {mtype!r} is not accepted here")
    msg_id: Any = header.get("id")
    re: Any = header.get("re")
    if not _int(0)(msg_id) or (re is not None and not _int(0)(re)):
        raise _fail(ErrorCode.BAD_FIELD, "header fields 'id' and 're' must be non-negative integers")
    declared = header.get("tensors", 0)
    if not _int(0)(declared) or declared != len(frames) - 1:
        raise _fail(ErrorCode.BAD_FIELD, f"header declares {declared!r} tensor frames but {len(frames) - 1} follow")
    if declared and mtype not in CARRIES_TENSORS:
        raise _fail(ErrorCode.BAD_FIELD, f"{mtype} messages carry no tensors")
    fields = {k: v for k, v in header.items() if k not in COMMON}
    if mtype not in CARRIES_BIN and _has_bin(header):
        raise _fail(ErrorCode.BAD_FIELD, f"a {mtype} header holds binary values; only secure-aggregation "
                                         "messages do (§7.4)")
    _check_fields(mtype, fields)
    if mtype == C.SA_INPUT and declared != 1:
        raise _fail(ErrorCode.BAD_FIELD, f"an sa_input carries exactly one frame (the masked input), not {declared}")
    tensors: dict[str, Tensor] = {}
    slices: dict[str, TensorSlice] = {}
    for frame in frames[1:]:
        name, tensor = decode_tensor(frame, C.FIELD_DTYPES if mtype == C.SA_INPUT else C.ALLOWED_DTYPES)
        if name in tensors or name in slices:
            raise _fail(ErrorCode.BAD_TENSOR, f"tensor {name!r} appears twice")
        if isinstance(tensor, TensorSlice) != (mtype == C.CHUNK):
            raise _fail(ErrorCode.BAD_TENSOR, f"tensor {name!r}: a chunk message carries slices only"
                        if mtype == C.CHUNK else f"tensor {name!r}: a {mtype} message carries no slices")
        if isinstance(tensor, TensorSlice):
            slices[name] = tensor
        else:
            tensors[name] = tensor
    return Message(mtype, fields, tensors, msg_id, re, slices)


def _has_bin(value: Any) -> bool:
    if isinstance(value, bytes):
        return True
    if isinstance(value, dict):
        return any(_has_bin(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_bin(v) for v in value)
    return False


def payload_bytes(frames: Iterable[bytes | memoryview]) -> int:
    """Bytes of a message on the wire, not counting routing identities or ZMTP framing."""
    return sum(len(f) for f in frames)
