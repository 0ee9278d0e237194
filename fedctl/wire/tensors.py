"""Tensor payloads of wire protocol v1: one msgpack map per tensor frame, dense or sparse (indices + values).

Pure: numpy and msgpack only. Every decoded frame is checked against the rules of docs/protocol.md §4 before a
numpy array is built; nothing from the network is unpickled or trusted for a size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

import msgpack
import numpy as np

from fedctl.errors import ProtocolError
from fedctl.wire.constants import (
    ALLOWED_DTYPES,
    ALLOWED_INDEX_DTYPES,
    ENC_DENSE,
    ENC_SPARSE,
    MAX_NAME_CHARS,
    MAX_NDIM,
    MAX_TENSOR_ELEMENTS,
    ErrorCode,
)


@dataclass(frozen=True)
class SparseTensor:
    """A tensor of ``shape`` whose only non-zero entries are ``values`` at flat, sorted, unique ``indices``."""

    shape: tuple[int, ...]
    indices: np.ndarray
    values: np.ndarray

    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))

    @property
    def nnz(self) -> int:
        return int(self.indices.size)

    @property
    def dtype(self) -> np.dtype:
        return self.values.dtype

    def to_dense(self) -> np.ndarray:
        out = np.zeros(self.numel, dtype=self.values.dtype)
        out[self.indices] = self.values
        return out.reshape(self.shape)


Tensor = Union[np.ndarray, SparseTensor]  # noqa: UP007 - a runtime alias, valid on Python 3.10

MSGPACK_ERRORS = (ValueError, TypeError, OverflowError, msgpack.exceptions.UnpackException)
"""What msgpack raises for malformed or over-limit input (ExtraData, FormatError, StackError are among them)."""


def densify(tensors: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
    """Dense arrays of a message's tensors: sparse payloads are a wire encoding, not different values."""
    return {k: t.to_dense() if isinstance(t, SparseTensor) else t for k, t in tensors.items()}


def _bad(message: str, code: ErrorCode = ErrorCode.BAD_TENSOR) -> ProtocolError:
    return ProtocolError(code, message)


def _as_buffer(arr: np.ndarray) -> memoryview:
    # A byte view of the flat array: memoryview.cast refuses shapes with a zero, e.g. an empty (3, 0) tensor.
    return memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))  # type: ignore[arg-type]


def _dtype_str(arr: np.ndarray) -> str:
    return arr.dtype.newbyteorder("<").str if arr.dtype.byteorder == "=" else arr.dtype.str


def encode_tensor(name: str, tensor: Tensor) -> bytes:
    """Encode one named tensor as a msgpack map (docs/protocol.md §4)."""
    if isinstance(tensor, SparseTensor):
        body: dict[str, Any] = {
            "name": name,
            "enc": ENC_SPARSE,
            "dtype": _dtype_str(tensor.values),
            "shape": list(tensor.shape),
            "nnz": tensor.nnz,
            "index_dtype": _dtype_str(tensor.indices),
            "indices": _as_buffer(tensor.indices),
            "values": _as_buffer(tensor.values),
        }
    else:
        arr = np.asarray(tensor)
        body = {"name": name, "enc": ENC_DENSE, "dtype": _dtype_str(arr), "shape": list(arr.shape),
                "data": _as_buffer(arr)}
    return msgpack.packb(body, use_bin_type=True)


def _field(body: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in body:
        raise _bad(f"tensor frame lacks field {key!r}")
    value = body[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _bad(f"tensor field {key!r} has the wrong type {type(value).__name__}")
    return value


def _shape(body: Mapping[str, Any]) -> tuple[int, ...]:
    raw = _field(body, "shape", list)
    if len(raw) > MAX_NDIM or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw):
        raise _bad(f"tensor shape {raw!r} is not a list of at most {MAX_NDIM} non-negative integers")
    if math.prod(max(d, 1) for d in raw) > MAX_TENSOR_ELEMENTS:
        raise _bad(f"tensor shape {raw!r} exceeds {MAX_TENSOR_ELEMENTS} elements")
    return tuple(raw)


def _dtype(body: Mapping[str, Any], key: str, allowed: frozenset[str]) -> np.dtype:
    name = _field(body, key, str)
    if name not in allowed:
        raise _bad(f"tensor {key} {name!r} is not allowed (allowed: {', '.join(sorted(allowed))})")
    return np.dtype(name)


def _array(buf: Any, dtype: np.dtype, count: int, what: str) -> np.ndarray:
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise _bad(f"tensor {what} is not a binary field")
    expected = count * dtype.itemsize
    if len(buf) != expected:
        raise _bad(f"tensor {what} holds {len(buf)} bytes but its header declares {expected}")
    return np.frombuffer(buf, dtype=dtype, count=count)


def _check_finite(name: str, values: np.ndarray) -> None:
    if values.size and not np.isfinite(values).all():
        raise _bad(f"tensor {name!r} contains NaN or infinite values", ErrorCode.NON_FINITE)


def _decode_sparse(name: str, body: Mapping[str, Any], shape: tuple[int, ...], dtype: np.dtype) -> SparseTensor:
    numel = math.prod(shape)
    nnz = _field(body, "nnz", int)
    if not 0 <= nnz <= numel:
        raise _bad(f"sparse tensor {name!r} declares nnz={nnz} for {numel} elements")
    index_dtype = _dtype(body, "index_dtype", ALLOWED_INDEX_DTYPES)
    indices = _array(body.get("indices"), index_dtype, nnz, "indices")
    values = _array(body.get("values"), dtype, nnz, "values")
    # Compare in the index dtype (a cast of u8 to i8 would wrap) and bound the ends as Python ints.
    if nnz and (int(indices[-1]) >= numel or not (indices[1:] > indices[:-1]).all()):
        raise _bad(f"sparse tensor {name!r} indices must be strictly increasing and below {numel}")
    if nnz and int(indices[0]) < 0:
        raise _bad(f"sparse tensor {name!r} has a negative index")
    _check_finite(name, values)
    return SparseTensor(shape, indices, values)


def decode_tensor(frame: bytes | memoryview) -> tuple[str, Tensor]:
    """Decode and validate one tensor frame; raise ProtocolError (BAD_TENSOR, NON_FINITE) on any violation."""
    try:
        body = msgpack.unpackb(frame, raw=False, strict_map_key=True, max_array_len=MAX_NDIM,
                               max_map_len=16, max_str_len=1024, max_ext_len=0)
    except MSGPACK_ERRORS as exc:
        raise _bad(f"tensor frame is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(body, dict):
        raise _bad("tensor frame is not a msgpack map")
    name = _field(body, "name", str)
    if not 0 < len(name) <= MAX_NAME_CHARS:
        raise _bad(f"tensor name must have 1..{MAX_NAME_CHARS} characters")
    enc = _field(body, "enc", str)
    shape = _shape(body)
    dtype = _dtype(body, "dtype", ALLOWED_DTYPES)
    if enc == ENC_SPARSE:
        return name, _decode_sparse(name, body, shape, dtype)
    if enc != ENC_DENSE:
        raise _bad(f"tensor {name!r} has unknown encoding {enc!r} (expected 'dense' or 'sparse')")
    arr = _array(body.get("data"), dtype, math.prod(shape), "data").reshape(shape)
    _check_finite(name, arr)
    return name, arr


def check_against_spec(tensors: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]],
                       dtypes: frozenset[str] = frozenset({"<f4"})) -> None:
    """Require exactly the expected tensor names with the expected shapes and an allowed dtype.

    Raises
    ------
    ProtocolError
        with code MODEL_MISMATCH naming the first offending tensor.
    """
    missing = [n for n in expected if n not in tensors]
    extra = [n for n in tensors if n not in expected]
    if missing or extra:
        raise ProtocolError(ErrorCode.MODEL_MISMATCH,
                            f"tensor names do not match the model: missing {missing[:5]}, unexpected {extra[:5]}",
                            "join with the model the broker announced in its welcome")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name]):
            raise ProtocolError(ErrorCode.MODEL_MISMATCH,
                                f"tensor {name!r} has shape {tuple(tensor.shape)}, "
                                f"the model needs {tuple(expected[name])}")
        if _dtype_str(np.empty(0, tensor.dtype)) not in dtypes:
            raise ProtocolError(ErrorCode.MODEL_MISMATCH, f"tensor {name!r} has dtype {tensor.dtype}, expected float32")
