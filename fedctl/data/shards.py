"""Loading one client's shard (or the test split) from a partition directory, verified and normalised.

Trusts nothing in the directory: the manifest is validated, file names must be plain names, each file's
SHA-256 must match the manifest, ``.npz`` files are opened with ``allow_pickle=False``, and shapes, dtypes,
labels and counts are checked before the data is handed out.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedctl.data.datasets import IMAGE_SHAPE, NUM_CLASSES, get_dataset, load_dataset
from fedctl.data.idx import sha256_file
from fedctl.data.partition import MANIFEST_FORMAT, MANIFEST_NAME, TEST_NAME
from fedctl.errors import ChecksumError, DataError

log = logging.getLogger(__name__)



def _partition_fix(directory: Path) -> str:
    return f"create it with `fedctl partition --dataset mnist --clients 100 --iid --out {directory}`"


@dataclass(frozen=True, eq=False)
class Shard:
    """One client's examples, ready for training.

    Attributes
    ----------
    name:
        ``"shard3"``, ``"test"``, or ``"<dataset>:<split>"`` for a split loaded directly.
    dataset:
        Registered dataset name.
    x:
        float32 ``[n, 1, 28, 28]``, C-contiguous, normalised as ``(pixel / 255 - mean) / std``.
    y:
        int64 ``[n]`` labels in ``0..9``.
    num_examples:
        ``n``.
    """

    name: str
    dataset: str
    x: np.ndarray
    y: np.ndarray
    num_examples: int


def normalize(images: np.ndarray, mean: float, std: float) -> np.ndarray:
    """Turn uint8 images ``[n, H, W]`` into float32 ``[n, 1, H, W]`` scaled as ``(x / 255 - mean) / std``."""
    x = images.astype(np.float32)[:, None, :, :]
    x /= np.float32(255.0)
    x -= np.float32(mean)
    x /= np.float32(std)
    return x


def _make_shard(name: str, dataset: str, images: np.ndarray, labels: np.ndarray, mean: float,
                std: float) -> Shard:
    # Arrays stay writable: torch.from_numpy warns on read-only arrays, and each Shard owns fresh copies.
    y = labels.astype(np.int64)
    return Shard(name=name, dataset=dataset, x=normalize(images, mean, std), y=y, num_examples=len(y))


def read_manifest(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate ``data_dir/manifest.json``.

    Raises
    ------
    DataError
        The directory or manifest is missing, or the manifest is malformed.
    """
    directory = Path(data_dir)
    if not directory.is_dir():
        raise DataError(f"data directory {directory} does not exist", fix=_partition_fix(directory))
    path = directory / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} not found: {directory} is not a (complete) partition directory",
                        fix=_partition_fix(directory)) from None
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is not valid JSON: {err}", fix=_partition_fix(directory)) from err
    _check_manifest(path, manifest)
    return manifest


def _check_manifest(path: Path, manifest: Any) -> None:
    fix = "the manifest is damaged or from another tool; partition again with `fedctl partition`"
    try:
        ok = manifest["format"] == MANIFEST_FORMAT
        entries = [*manifest["shards"], manifest["test"]]
        norm = manifest["normalization"]
        ok = ok and float(norm["std"]) > 0 and isinstance(manifest["dataset"], str)
        for e in entries:
            ok = ok and isinstance(e["name"], str) and isinstance(e["sha256"], str)
            ok = ok and isinstance(e["file"], str) and e["file"] == Path(e["file"]).name
            ok = ok and isinstance(e["num_examples"], int) and e["num_examples"] >= 0
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise DataError(f"{path} is not a valid {MANIFEST_FORMAT} manifest", fix=fix)


def list_shards(data_dir: str | os.PathLike[str], include_test: bool = False) -> list[str]:
    """Names of the client shards in a partition directory (``shard0`` …), optionally followed by ``test``."""
    manifest = read_manifest(data_dir)
    names = [e["name"] for e in manifest["shards"]]
    return [*names, TEST_NAME] if include_test else names


def _available(names: list[str]) -> str:
    shards = [n for n in names if n != TEST_NAME]
    listed = ", ".join(shards) if len(shards) <= 3 else f"{shards[0]} … {shards[-1]}"
    return f"{listed}, {TEST_NAME}" if TEST_NAME in names else listed


def _find_entry(manifest: dict[str, Any], name: str, data_dir: Path) -> dict[str, Any]:
    entries = {e["name"]: e for e in [*manifest["shards"], manifest["test"]]}
    if name.isdigit():
        name = f"shard{int(name)}"
    if name not in entries:
        raise DataError(f"no shard named {name!r} in {data_dir} (available: {_available(list(entries))})",
                        fix="pick one of the available names, or partition again with more --clients")
    return entries[name]


def load_shard(data_dir: str | os.PathLike[str], name: str | int) -> Shard:
    """Load one shard of a partition directory, verified against the manifest and normalised.

    Parameters
    ----------
    data_dir:
        Directory written by ``fedctl partition``.
    name:
        ``"shard3"``, ``3`` or ``"3"`` for a client shard, ``"test"`` for the test split.

    Returns
    -------
    Shard
        x float32 ``[n, 1, 28, 28]`` normalised with the manifest's mean/std, y int64 ``[n]``.

    Raises
    ------
    DataError
        Directory, manifest or shard missing (the message lists the available names), or the file is
        malformed.
    ChecksumError
        The file's SHA-256 differs from the manifest's.
    """
    directory = Path(data_dir)
    manifest = read_manifest(directory)
    entry = _find_entry(manifest, str(name), directory)
    path = directory / entry["file"]
    if not path.is_file():
        raise DataError(f"{path} is listed in the manifest but missing", fix=_partition_fix(directory))
    actual = sha256_file(path)
    if actual != entry["sha256"]:
        raise ChecksumError(f"{path}: SHA-256 is {actual}, the manifest expects {entry['sha256']}",
                            fix="the file is corrupt or was modified; partition again with `fedctl partition`")
    images, labels = _read_npz(path)
    if len(labels) != entry["num_examples"]:
        raise DataError(f"{path} holds {len(labels)} examples, the manifest says {entry['num_examples']}",
                        fix="partition again with `fedctl partition`")
    norm = manifest["normalization"]
    log.debug("loaded %s (%d examples) from %s", entry["name"], len(labels), directory)
    return _make_shard(entry["name"], manifest["dataset"], images, labels, float(norm["mean"]),
                       float(norm["std"]))


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    fix = "the file is not a fedctl shard; partition again with `fedctl partition`"
    # np.load takes anything that is not a zip or .npy file for a pickle and says so; check the format first.
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path} is not a .npz archive (not a zip file, or cut short)", fix=fix)
    try:
        with np.load(path, allow_pickle=False) as npz:
            held = sorted(npz.files)
            arrays = [npz[key] for key in ("x", "y") if key in held]
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise DataError(f"{path} holds an object array, which only unpickling could load (never done)",
                            fix=fix) from None
        raise DataError(f"{path} is a damaged .npz archive ({_reason(err)})", fix=fix) from err
    except (OSError, zipfile.BadZipFile, EOFError, zlib.error) as err:
        raise DataError(f"{path} is a damaged .npz archive ({_reason(err)})", fix=fix) from err
    if len(arrays) != 2:
        raise DataError(f"{path} holds the arrays {', '.join(held) or '(none)'}, not a shard's x and y", fix=fix)
    images, labels = arrays
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{path}: x is {images.dtype} {images.shape}, expected uint8 [n, 28, 28]", fix=fix)
    if labels.dtype != np.uint8 or labels.shape != (len(images),):
        raise DataError(f"{path}: y is {labels.dtype} {labels.shape}, expected uint8 [{len(images)}]", fix=fix)
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise DataError(f"{path}: label {int(labels.max())} out of range 0..{NUM_CLASSES - 1}", fix=fix)
    return images, labels


def _reason(err: BaseException) -> str:
    """The first line of an exception's text: numpy's errors run over several lines."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def load_split_as_shard(dataset: str, split: str, source_dir: str | os.PathLike[str] | None = None,
                        download: bool = False) -> Shard:
    """Load a whole split of a registered dataset as a Shard (for centralised evaluation, ``--eval-data test``).

    The files are located and SHA-256-verified as by :func:`fedctl.data.datasets.load_dataset`, and
    normalised with the dataset's registered mean/std. The shard is named ``"<dataset>:<split>"``.
    """
    spec = get_dataset(dataset)
    images, labels = load_dataset(dataset, split, source_dir, download)
    return _make_shard(f"{spec.name}:{split}", spec.name, images, labels, spec.mean, spec.std)
