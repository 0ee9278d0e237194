"""IDX reader/writer: round trips, gzip detection by magic bytes, and refusal of malformed or hostile files."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest

from fedctl.data.idx import encode_idx, read_idx, sha256_uncompressed, write_idx
from fedctl.errors import DataError

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("compress", [True, False])
def test_round_trip(tmp_path: Path, dtype: type, compress: bool) -> None:
    rng = np.random.default_rng(1)
    array: np.ndarray = (rng.standard_normal((5, 3, 4)) * 100).astype(dtype)
    path = write_idx(tmp_path / "a.idx", array, gzip=compress)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    np.testing.assert_array_equal(back, array)
    assert path.read_bytes()[:2] == (b"\x1f\x8b" if compress else b"\x00\x00")


def test_header_layout_is_big_endian(tmp_path: Path) -> None:
    data = encode_idx(np.arange(6, dtype=np.int32).reshape(2, 3))
    assert data[:4] == bytes([0, 0, 0x0C, 2])
    assert struct.unpack(">II", data[4:12]) == (2, 3)
    assert struct.unpack(">6i", data[12:]) == tuple(range(6))


def test_gzip_detected_by_magic_not_extension(tmp_path: Path) -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw_named_gz = tmp_path / "raw.gz"
    raw_named_gz.write_bytes(encode_idx(array))
    gz_named_raw = tmp_path / "compressed-idx3-ubyte"
    gz_named_raw.write_bytes(gzip.compress(encode_idx(array)))
    np.testing.assert_array_equal(read_idx(raw_named_gz), array)
    np.testing.assert_array_equal(read_idx(gz_named_raw), array)


def test_digest_covers_uncompressed_content(tmp_path: Path) -> None:
    array = np.arange(100, dtype=np.uint8)
    expected = hashlib.sha256(encode_idx(array)).hexdigest()
    assert sha256_uncompressed(write_idx(tmp_path / "a.gz", array, gzip=True)) == expected
    assert sha256_uncompressed(write_idx(tmp_path / "a", array, gzip=False)) == expected


def test_gzip_output_is_reproducible(tmp_path: Path) -> None:
    array = np.arange(1000, dtype=np.uint8)
    a = write_idx(tmp_path / "a.gz", array).read_bytes()
    b = write_idx(tmp_path / "b.gz", array).read_bytes()
    assert a == b


def test_write_leaves_no_temp_files(tmp_path: Path) -> None:
    write_idx(tmp_path / "a.gz", np.zeros((2, 2), np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == ["a.gz"]
    assert (tmp_path / "a.gz").stat().st_mode & 0o777 == 0o644


def _header(type_code: int, *dims: int) -> bytes:
    return bytes([0, 0, type_code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", "truncated"),
        (b"\x00\x00", "truncated"),
        (b"\x01\x02\x08\x01" + struct.pack(">I", 1) + b"\x00", "magic"),
        (_header(0x07, 2) + b"\x00\x00", "unsupported IDX type code 0x07"),
        (bytes([0, 0, 0x08, 0]), "0 dimensions"),
        (bytes([0, 0, 0x08, 3]) + struct.pack(">I", 2), "header truncated"),
        (_header(0x08, 2, 3) + bytes(5), "payload is 5 bytes"),
        (_header(0x08, 2, 3) + bytes(7), "payload is 7 bytes"),
        (_header(0x0C, 4) + bytes(15), "needs 16"),
        (_header(0x08, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF) + bytes(8), "payload is 8 bytes"),
    ],
)
@pytest.mark.parametrize("compress", [False, True])
def test_hostile_files_rejected(tmp_path: Path, content: bytes, needle: str, compress: bool) -> None:
    path = tmp_path / "bad"
    path.write_bytes(gzip.compress(content) if compress else content)
    with pytest.raises(DataError, match=needle) as info:
        read_idx(path)
    assert str(path) in str(info.value) and info.value.fix


def test_corrupt_gzip_stream_rejected(tmp_path: Path) -> None:
    good = gzip.compress(encode_idx(np.arange(1000, dtype=np.uint8)))
    truncated = tmp_path / "truncated.gz"
    truncated.write_bytes(good[: len(good) // 2])
    garbage = tmp_path / "garbage.gz"
    garbage.write_bytes(b"\x1f\x8b" + b"not deflate at all" * 10)
    for path in (truncated, garbage):
        with pytest.raises(DataError, match="gzip"):
            read_idx(path)


def test_decompression_limit(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "big.gz", np.zeros(100_000, np.uint8))
    with pytest.raises(DataError, match="larger than 1000 bytes"):
        read_idx(path, max_bytes=1000)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_idx(tmp_path / "nope")


@pytest.mark.parametrize("array", [np.zeros(3, np.uint64), np.zeros(3, np.complex64), np.array(5, np.uint8)])
def test_write_refuses_what_idx_cannot_hold(tmp_path: Path, array: np.ndarray) -> None:
    with pytest.raises(DataError, match="cannot write"):
        write_idx(tmp_path / "x", array)
    assert not list(tmp_path.iterdir())
