"""Tensor values of wire protocol v1 (docs/protocol.md §4): the types, the byte views the codecs share, the packed
``*`` sparse vector and the check of a message's tensors against the run's model.

The frame codec (:mod:`fedctl.wire.frames`), the index encodings (:mod:`fedctl.wire.indices`) and the zlib codec
(:mod:`fedctl.wire.zlib_planes`) build on this module. Pure: numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import numpy.typing as npt

from fedctl.errors import ProtocolError
from fedctl.wire.constants import EXTRA_SEPARATOR, MAX_TENSOR_ELEMENTS, ErrorCode


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

    def to_dense(self, dtype: npt.DTypeLike | None = None) -> np.ndarray:
        """The dense array, of ``dtype`` (default: the values' dtype)."""
        out = np.zeros(self.numel, dtype=self.values.dtype if dtype is None else dtype)
        out[self.indices] = self.values
        return out.reshape(self.shape)


Tensor = Union[np.ndarray, SparseTensor]  # noqa: UP007 - a runtime alias, valid on Python 3.10


@dataclass(frozen=True)
class TensorSlice:
    """Elements ``[start, start + len(values))`` of the flat (C-order) tensor of ``shape``: one piece of a chunked
    transfer (docs/protocol.md §4 (slice frames)). Only ``chunk`` messages carry slices."""

    shape: tuple[int, ...]
    start: int
    values: np.ndarray

    @property
    def stop(self) -> int:
        return self.start + int(self.values.size)


def densify(tensors: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
    """Dense arrays of a message's tensors: sparse payloads are a wire encoding, not different values."""
    return {k: t.to_dense() if isinstance(t, SparseTensor) else t for k, t in tensors.items()}


# ----------------------------------------------------------------------------------------------- shared by the codecs
BINARY = (bytes, bytearray, memoryview)
"""Python types of a msgpack ``bin`` value as the decoders may see it."""


def bad_tensor(message: str, code: ErrorCode = ErrorCode.BAD_TENSOR) -> ProtocolError:
    return ProtocolError(code, message)


def as_buffer(arr: np.ndarray) -> memoryview:
    """A byte view of the flat array (no copy when it is contiguous), for msgpack's ``bin``."""
    # memoryview.cast refuses shapes with a zero, e.g. an empty (3, 0) tensor: view the flat bytes instead.
    return memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))  # type: ignore[arg-type]


def dtype_str(arr: np.ndarray) -> str:
    """The little-endian numpy dtype string of ``arr`` as the wire names it (``<f4``)."""
    return arr.dtype.newbyteorder("<").str if arr.dtype.byteorder == "=" else arr.dtype.str


def array_of(buf: Any, dtype: np.dtype, count: int, what: str) -> np.ndarray:
    """``count`` elements of ``dtype`` viewing ``buf``, which must be binary of exactly that many bytes."""
    if not isinstance(buf, BINARY):
        raise bad_tensor(f"{what} is not a binary field")
    expected = count * dtype.itemsize
    if len(buf) != expected:
        raise bad_tensor(f"{what} holds {len(buf)} bytes but its header declares {expected}")
    return np.frombuffer(buf, dtype=dtype, count=count)


# ----------------------------------------------------------------------------------------------- model-level rules
def check_against_spec(tensors: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]],
                       dtypes: frozenset[str] = frozenset({"<f4"}), partial: bool = False) -> None:
    """Require exactly the expected tensor names (a subset of them when ``partial``) with the expected shapes and
    an allowed dtype.

    Raises
    ------
    ProtocolError
        with code MODEL_MISMATCH naming the first offending tensor.
    """
    missing = [] if partial else [n for n in expected if n not in tensors]
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
        if dtype_str(np.empty(0, tensor.dtype)) not in dtypes:
            raise ProtocolError(ErrorCode.MODEL_MISMATCH, f"tensor {name!r} has dtype {tensor.dtype}, expected float32")


def split_extras(tensors: Mapping[str, Tensor], prefixes: tuple[str, ...], expected: Mapping[str, tuple[int, ...]],
                 ) -> tuple[dict[str, Tensor], dict[str, np.ndarray]]:
    """Separate a message's extra tensors — ``<prefix>/<model tensor>`` for a prefix in ``prefixes`` (those the run's
    strategy declares) — from its model tensors (docs/protocol.md §5.6).

    Each extra tensor must be dense float32 of the shape of the model tensor it shadows, and for each prefix the
    message must carry one for every model tensor of ``expected``. Names under no declared prefix stay with the
    model tensors, where :func:`check_against_spec` refuses any that is not the model's. With no prefixes, nothing
    is separated (and nothing is allocated).

    Raises
    ------
    ProtocolError
        MODEL_MISMATCH naming the first offending extra tensor.
    """
    if not prefixes:
        return dict(tensors), {}
    model: dict[str, Tensor] = {}
    extras: dict[str, np.ndarray] = {}
    for name, tensor in tensors.items():
        prefix, sep, shadowed = name.partition(EXTRA_SEPARATOR)
        if not sep or prefix not in prefixes:
            model[name] = tensor
            continue
        if shadowed not in expected:
            raise ProtocolError(ErrorCode.MODEL_MISMATCH, f"extra tensor {name!r} shadows no tensor of the model",
                                "name extra tensors <prefix>/<model tensor name>")
        if isinstance(tensor, SparseTensor) or dtype_str(np.empty(0, tensor.dtype)) != "<f4":
            raise ProtocolError(ErrorCode.MODEL_MISMATCH, f"extra tensor {name!r} must be a dense float32 frame")
        if tuple(tensor.shape) != tuple(expected[shadowed]):
            raise ProtocolError(ErrorCode.MODEL_MISMATCH, f"extra tensor {name!r} has shape {tuple(tensor.shape)}, "
                                f"the model's {shadowed} {tuple(expected[shadowed])}")
        extras[name] = tensor
    for prefix in prefixes:
        missing = [n for n in expected if f"{prefix}{EXTRA_SEPARATOR}{n}" not in extras]
        if missing:
            raise ProtocolError(ErrorCode.MODEL_MISMATCH, f"the message lacks the extra tensors "
                                f"{[prefix + EXTRA_SEPARATOR + n for n in missing[:3]]} the run's strategy needs",
                                f"send {prefix}{EXTRA_SEPARATOR}<name> for every tensor of the model")
    return model, extras


PACKED_NAME = "*"
"""Name of a packed sparse frame: one sparse vector over the whole model, flat in the model's tensor order."""


def pack_sparse(tensors: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """Pack an all-sparse update into one frame named :data:`PACKED_NAME` (docs/protocol.md §4, packed sparse frame).

    Every tensor frame costs ~35 bytes of name, shape and framing; a 99.9%-sparse LeNet-5 push keeps ~60 values
    spread over several tensors, so one packed frame saves a quarter of the push. Index ``i`` of the packed vector
    is element ``i - offset(t)`` of tensor ``t``, offsets following the order of ``shapes`` (the model's order).
    Returns ``tensors`` unchanged unless there are two or more, all sparse, of one dtype and all in ``shapes``.
    """
    sparse = [t for t in tensors.values() if isinstance(t, SparseTensor)]
    if len(tensors) < 2 or len(sparse) != len(tensors):
        return dict(tensors)
    if len({t.values.dtype for t in sparse}) != 1 or any(n not in shapes for n in tensors):
        return dict(tensors)
    total = sum(math.prod(s) for s in shapes.values())
    if total > MAX_TENSOR_ELEMENTS:
        return dict(tensors)
    indices, values, offset = [], [], 0
    for name, shape in shapes.items():
        t = tensors.get(name)
        if t is not None:
            assert isinstance(t, SparseTensor)
            indices.append(np.asarray(t.indices, np.int64) + offset)
            values.append(t.values)
        offset += math.prod(shape)
    return {PACKED_NAME: SparseTensor((total,), np.concatenate(indices), np.concatenate(values))}


def unpack_sparse(tensors: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """Split a packed frame back into one sparse tensor per model tensor it touches (others are left out);
    tensors without a packed frame are returned unchanged.

    Raises
    ------
    ProtocolError
        MODEL_MISMATCH when a packed frame comes with other tensors or its length is not the model's size.
    """
    packed = tensors.get(PACKED_NAME)
    if packed is None:
        return dict(tensors)
    total = sum(math.prod(s) for s in shapes.values())
    if len(tensors) != 1 or not isinstance(packed, SparseTensor) or tuple(packed.shape) != (total,):
        raise ProtocolError(ErrorCode.MODEL_MISMATCH,
                            f"a packed {PACKED_NAME!r} frame must be the only tensor, sparse, of shape ({total},) "
                            f"(the model's size); got shape {tuple(packed.shape)} with {len(tensors) - 1} other(s)",
                            "join with the model the broker announced in its welcome")
    sizes = [math.prod(s) for s in shapes.values()]
    bounds = np.cumsum([0, *sizes])
    cuts = np.searchsorted(packed.indices, bounds)  # indices are sorted and unique (checked when decoded)
    out: dict[str, Tensor] = {}
    for i, (name, shape) in enumerate(shapes.items()):
        lo, hi = int(cuts[i]), int(cuts[i + 1])
        if hi > lo:
            out[name] = SparseTensor(tuple(shape), packed.indices[lo:hi] - bounds[i], packed.values[lo:hi])
    return out

