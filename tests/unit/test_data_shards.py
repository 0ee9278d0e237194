"""Loading shards back: normalisation, verification against the manifest, and errors people can act on."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from fedctl.data.datasets import load_dataset
from fedctl.data.idx import sha256_file
from fedctl.data.partition import save_npz, write_partition
from fedctl.data.shards import Shard, list_shards, load_shard, load_split_as_shard
from fedctl.errors import ChecksumError, DataError

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def partition_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("part")
    write_partition("mnist-sample", out, 10, "iid", None, 0)
    return out


@pytest.fixture
def own_partition(tmp_path: Path) -> Path:
    """A private partition directory a test may damage."""
    write_partition("mnist-sample", tmp_path, 4, "iid", None, 0)
    return tmp_path


def _rewrite_manifest_digest(directory: Path, name: str) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    for entry in manifest["shards"]:
        if entry["name"] == name:
            entry["sha256"] = sha256_file(directory / entry["file"])
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_load_shard_normalised(partition_dir: Path) -> None:
    shard = load_shard(partition_dir, "shard3")
    assert isinstance(shard, Shard)
    assert shard.name == "shard3" and shard.dataset == "mnist-sample" and shard.num_examples == 1000
    assert shard.x.shape == (1000, 1, 28, 28) and shard.x.dtype == np.float32
    assert shard.y.shape == (1000,) and shard.y.dtype == np.int64
    with np.load(partition_dir / "shard3.npz") as npz:
        raw_x, raw_y = npz["x"], npz["y"]
    np.testing.assert_allclose(shard.x[:, 0], (raw_x / 255.0 - 0.1307) / 0.3081, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(shard.y, raw_y)
    assert abs(float(shard.x.mean())) < 0.1 and 0.9 < float(shard.x.std()) < 1.1
    assert shard.x.flags.c_contiguous


def test_shards_are_the_training_split(partition_dir: Path) -> None:
    _, y = load_dataset("mnist-sample", "train")
    shards = [load_shard(partition_dir, k) for k in range(10)]
    assert sum(s.num_examples for s in shards) == len(y)
    assert np.bincount(np.concatenate([s.y for s in shards])).tolist() == np.bincount(y).tolist()


def test_load_test_and_numeric_names(partition_dir: Path) -> None:
    assert load_shard(partition_dir, "test").num_examples == 2000
    assert load_shard(partition_dir, "7").name == "shard7"
    assert load_shard(partition_dir, 7).name == "shard7"


def test_list_shards(partition_dir: Path) -> None:
    assert list_shards(partition_dir) == [f"shard{k}" for k in range(10)]
    assert list_shards(partition_dir, include_test=True)[-1] == "test"


def test_missing_shard_lists_available(partition_dir: Path) -> None:
    with pytest.raises(DataError) as info:
        load_shard(partition_dir, "shard10")
    message = str(info.value)
    assert "shard10" in message and "shard0 … shard9, test" in message


def test_missing_directory_says_how_to_create_it(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_shard(tmp_path / "nowhere", "shard0")
    assert "does not exist" in str(info.value) and "fedctl partition" in str(info.value)
    with pytest.raises(DataError, match="manifest.json not found"):
        load_shard(tmp_path, "shard0")  # exists but is not a partition directory


def test_corrupted_shard_detected(own_partition: Path) -> None:
    path = own_partition / "shard1.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError) as info:
        load_shard(own_partition, "shard1")
    assert str(path) in str(info.value) and "fedctl partition" in str(info.value)
    load_shard(own_partition, "shard2")  # the others are fine


def test_deleted_shard_file(own_partition: Path) -> None:
    (own_partition / "shard2.npz").unlink()
    with pytest.raises(DataError, match="missing"):
        load_shard(own_partition, "shard2")


def test_pickled_payload_refused(own_partition: Path) -> None:
    # A matching digest is not enough: object arrays would need pickle, which is never allowed.
    path = own_partition / "shard0.npz"
    np.savez(path, x=np.array([{"evil": 1}], dtype=object), y=np.zeros(1, np.uint8))
    _rewrite_manifest_digest(own_partition, "shard0")
    with pytest.raises(DataError, match="object array, which only unpickling could load"):
        load_shard(own_partition, "shard0")


def _replace_shard(directory: Path, data: bytes) -> Path:
    path = directory / "shard0.npz"
    path.write_bytes(data)
    _rewrite_manifest_digest(directory, "shard0")  # past the digest check: only the content can refuse it
    return path


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@pytest.mark.parametrize(("content", "needle"), [
    (b"not a zip archive at all", r"is not a \.npz archive \(not a zip file, or cut short\)"),
    (b"", r"is not a \.npz archive"),
    (b"\x93NUMPY" + bytes(100), r"is not a \.npz archive"),  # a bare .npy, not an archive
    (_npz_bytes(a=np.zeros(2), b=np.ones(2)), r"holds the arrays a, b, not a shard's x and y"),
    (_npz_bytes(x=np.zeros((1, 28, 28), np.uint8)), r"holds the arrays x, not a shard's x and y"),
])
def test_not_a_shard_says_what_it_is(own_partition: Path, content: bytes, needle: str) -> None:
    _replace_shard(own_partition, content)
    with pytest.raises(DataError, match=needle) as info:
        load_shard(own_partition, "shard0")
    message = str(info.value)
    assert "pickle" not in message and "\n" not in message, message
    assert "fedctl partition" in message


def test_truncated_shard(own_partition: Path) -> None:
    whole = (own_partition / "shard0.npz").read_bytes()
    _replace_shard(own_partition, whole[: len(whole) // 2])
    with pytest.raises(DataError, match="not a .npz archive") as info:
        load_shard(own_partition, "shard0")
    assert "pickle" not in str(info.value)


def test_damaged_member_of_a_shard(own_partition: Path) -> None:
    whole = bytearray((own_partition / "shard0.npz").read_bytes())
    middle = len(whole) // 3
    whole[middle:middle + 64] = bytes(64)  # the zip directory is intact, the compressed data is not
    _replace_shard(own_partition, bytes(whole))
    with pytest.raises(DataError, match="damaged .npz archive") as info:
        load_shard(own_partition, "shard0")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("x", "y", "needle"), [
    (np.zeros((3, 28, 28), np.float32), np.zeros(3, np.uint8), "x is float32"),
    (np.zeros((3, 14, 14), np.uint8), np.zeros(3, np.uint8), r"\(3, 14, 14\)"),
    (np.zeros((3, 28, 28), np.uint8), np.zeros(2, np.uint8), "y is uint8"),
    (np.zeros((3, 28, 28), np.uint8), np.full(3, 10, np.uint8), "label 10 out of range"),
    (np.zeros((3, 28, 28), np.uint8), np.zeros(3, np.uint8), "manifest says 2500"),  # 4 clients x 2500
])
def test_malformed_shard_refused(own_partition: Path, x: np.ndarray, y: np.ndarray, needle: str) -> None:
    save_npz(own_partition / "shard0.npz", x=x, y=y)
    _rewrite_manifest_digest(own_partition, "shard0")
    with pytest.raises(DataError, match=needle):
        load_shard(own_partition, "shard0")


def test_manifest_cannot_point_outside(own_partition: Path) -> None:
    manifest = json.loads((own_partition / "manifest.json").read_text())
    manifest["shards"][0]["file"] = "../elsewhere.npz"
    (own_partition / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="not a valid"):
        load_shard(own_partition, "shard1")


def test_damaged_manifest(own_partition: Path) -> None:
    (own_partition / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        list_shards(own_partition)


def test_load_split_as_shard() -> None:
    shard = load_split_as_shard("mnist-sample", "test")
    assert shard.name == "mnist-sample:test" and shard.num_examples == 2000
    assert shard.x.shape == (2000, 1, 28, 28) and shard.x.dtype == np.float32 and shard.y.dtype == np.int64
    assert shard.y[:5].tolist() == [7, 2, 1, 0, 4]
