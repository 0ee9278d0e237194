"""The IDX file format (MNIST's container): a validating reader, a writer, and the file-level helpers around it.

IDX layout: two zero bytes, a type code, the number of dimensions, then one big-endian uint32 per dimension,
then the payload in C order, big-endian. Files may be gzip-compressed; compression is recognised by the
gzip magic bytes (``1f 8b``), never by the file name. Digests in fedctl always cover the *uncompressed*
content, so a raw mirror and a gzipped mirror of the same file have the same SHA-256.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import logging
import math
import os
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fedctl.errors import DataError

log = logging.getLogger(__name__)

GZIP_MAGIC = b"\x1f\x8b"

#: IDX type code -> big-endian numpy dtype (the IDX specification's full list).
IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_TYPE_OF_KIND = {(dt.kind, dt.itemsize): code for code, dt in IDX_TYPES.items()}

#: Refuse to inflate more than this many bytes (full MNIST train images are 47 MB uncompressed).
DEFAULT_MAX_BYTES = 1 << 30


def is_gzip(path: str | os.PathLike[str]) -> bool:
    """Return whether the file starts with the gzip magic bytes."""
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def read_uncompressed(path: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Read a file's content, inflating it first if it is gzip (detected by magic bytes).

    Parameters
    ----------
    path:
        The file to read.
    max_bytes:
        Upper bound on the uncompressed size; a guard against decompression bombs.

    Raises
    ------
    DataError
        The file is missing, the gzip stream is corrupt, or the content exceeds ``max_bytes``.
    """
    path = Path(path)
    try:
        if is_gzip(path):
            with gzip.open(path, "rb") as f:
                data = f.read(max_bytes + 1)
        else:
            with open(path, "rb") as f:
                data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise DataError(f"{path} does not exist", fix="check the path or re-download the dataset") from None
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path} is not a readable gzip file: {err}",
                        fix="delete it and download it again") from err
    if len(data) > max_bytes:
        raise DataError(f"{path} is larger than {max_bytes} bytes uncompressed",
                        fix="check that this is the right file")
    return data


def sha256_uncompressed(path: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """SHA-256 hex digest of a file's content after gzip inflation (raw files are hashed as they are)."""
    return hashlib.sha256(read_uncompressed(path, max_bytes)).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file's bytes exactly as stored (no inflation)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode uncompressed IDX bytes into an array in native byte order.

    Parameters
    ----------
    data:
        The whole uncompressed IDX content.
    source:
        Name used in error messages (usually the file path).

    Raises
    ------
    DataError
        Bad magic, unknown type code, zero dimensions, or a payload whose size differs from the header's.
    """
    fix = "the file is not a valid IDX file; delete it and download it again"
    if len(data) < 4:
        raise DataError(f"{source}: IDX header truncated ({len(data)} bytes, need at least 4)", fix=fix)
    if data[0] != 0 or data[1] != 0:
        raise DataError(f"{source}: bad IDX magic {data[:4].hex()} (must start with 0000)", fix=fix)
    type_code, ndim = data[2], data[3]
    if type_code not in IDX_TYPES:
        raise DataError(f"{source}: unsupported IDX type code 0x{type_code:02x} "
                        f"(supported: {', '.join(f'0x{c:02x}' for c in IDX_TYPES)})", fix=fix)
    if ndim == 0:
        raise DataError(f"{source}: IDX header declares 0 dimensions", fix=fix)
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"{source}: IDX header truncated (declares {ndim} dimensions, "
                        f"file has {len(data)} bytes)", fix=fix)
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_TYPES[type_code]
    expected = math.prod(shape) * dtype.itemsize
    actual = len(data) - header_len
    if actual != expected:
        raise DataError(f"{source}: IDX payload is {actual} bytes but the header {shape} of "
                        f"{dtype.name} needs {expected}", fix=fix)
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Read an IDX file, gzip-compressed or raw, into a numpy array (native byte order).

    Parameters
    ----------
    path:
        The file. Compression is detected from the magic bytes, not the extension.
    max_bytes:
        Upper bound on the uncompressed size.

    Returns
    -------
    numpy.ndarray
        The array with the dimensions and element type declared in the header.

    Raises
    ------
    DataError
        The file is missing, corrupt, or violates the IDX format.
    """
    return parse_idx(read_uncompressed(path, max_bytes), source=str(path))


def encode_idx(array: np.ndarray) -> bytes:
    """Encode an array as uncompressed IDX bytes.

    Raises
    ------
    DataError
        The dtype has no IDX type code, the array is 0-d, or has more than 255 dimensions or a dimension
        that does not fit in uint32.
    """
    array = np.asarray(array)
    code = _TYPE_OF_KIND.get((array.dtype.kind, array.dtype.itemsize))
    if code is None:
        raise DataError(f"cannot write dtype {array.dtype} as IDX",
                        fix="convert to uint8, int8, int16, int32, float32 or float64")
    if not 1 <= array.ndim <= 255 or any(d >= 2**32 for d in array.shape):
        raise DataError(f"cannot write shape {array.shape} as IDX",
                        fix="IDX needs 1 to 255 dimensions, each below 2**32")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(array, dtype=IDX_TYPES[code]).tobytes()


def write_idx(path: str | os.PathLike[str], array: np.ndarray, gzip: bool = True) -> Path:
    """Write an array as an IDX file, atomically (temp file + rename).

    Parameters
    ----------
    path:
        Destination file.
    array:
        Any array whose dtype has an IDX type code.
    gzip:
        Compress with gzip (mtime 0 and no embedded name, so the output is byte-reproducible).

    Returns
    -------
    pathlib.Path
        The written path.
    """
    payload = encode_idx(array)
    with atomic_output(path) as f:
        if gzip:
            with _gzip_writer(f) as gz:
                gz.write(payload)
        else:
            f.write(payload)
    return Path(path)


def _gzip_writer(f: BinaryIO) -> gzip.GzipFile:
    return gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open a temp file beside ``path`` for writing; rename it over ``path`` only if the block succeeds.

    Readers never see a half-written file, and a failure leaves no temp file behind.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)  # reopened by name so that ``f.name`` is the temp path (callers may re-read it)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; data files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_output(path) as f:
        f.write(data)


def gzip_bytes(data: bytes) -> bytes:
    """Gzip ``data`` reproducibly (mtime 0, no embedded name)."""
    buf = io.BytesIO()
    with _gzip_writer(buf) as gz:
        gz.write(data)
    return buf.getvalue()
