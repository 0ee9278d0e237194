"""Loading one client's shard (or the test split) from a partition directory, verified and normalised.

Trusts nothing in the directory: the manifest is validated, file names must be plain names, each file's
SHA-256 must match the manifest, ``.npz`` files are opened with ``allow_pickle=False``, and shapes, dtypes,
labels and counts are checked before the data is handed out. A registered dataset's shards
(``fedctl-partition/1``) hold uint8 images that are normalised here; a local dataset's (``fedctl-partition/2``)
hold float32 features that are handed out as they are.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedctl.data.datasets import IMAGE_SHAPE, NUM_CLASSES, get_dataset, load_dataset
from fedctl.data.idx import sha256_file
from fedctl.data.local import LocalData, read_npz_arrays, split_holdout
from fedctl.data.partition import LOCAL_FORMAT, MANIFEST_FORMAT, MANIFEST_NAME, TEST_NAME
from fedctl.errors import ChecksumError, DataError

log = logging.getLogger(__name__)

DIGITS = tuple(str(i) for i in range(NUM_CLASSES))


def _partition_fix(directory: Path) -> str:
    return f"create it with `fedctl partition --dataset mnist --clients 100 --iid --out {directory}`"


@dataclass(frozen=True, eq=False)
class Shard:
    """One client's examples, ready for training.

    Attributes
    ----------
    name:
        ``"shard3"``, ``"test"``, ``"<dataset>:<split>"`` for a split loaded directly, or a local dataset's file
        or folder name.
    dataset:
        Registered dataset name, or the name of the local dataset a partition was cut from, or its path.
    x:
        float32 ``[n, ...]``, C-contiguous: a registered dataset's images ``[n, 1, 28, 28]`` normalised as
        ``(pixel / 255 - mean) / std``; a local dataset's features as they are in its files.
    y:
        int64 ``[n]`` labels in ``0..len(classes)-1``.
    num_examples:
        ``n``, the training examples (the holdout not included).
    classes:
        Class names (``"0" .. "9"`` for MNIST).
    holdout_x, holdout_y:
        Examples held out of training for evaluation (``fedctl join --holdout``), or None when none are.
    """

    name: str
    dataset: str
    x: np.ndarray
    y: np.ndarray
    num_examples: int
    classes: tuple[str, ...] = DIGITS
    holdout_x: np.ndarray | None = None
    holdout_y: np.ndarray | None = None

    @property
    def num_holdout(self) -> int:
        """Examples held out for evaluation (0 when none)."""
        return 0 if self.holdout_y is None else len(self.holdout_y)


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
        ok = manifest["format"] in (MANIFEST_FORMAT, LOCAL_FORMAT) and isinstance(manifest["dataset"], str)
        entries = [*manifest["shards"], manifest["test"]]
        ok = ok and (_local_ok(manifest) if manifest["format"] == LOCAL_FORMAT
                     else float(manifest["normalization"]["std"]) > 0)
        for e in entries:
            ok = ok and isinstance(e["name"], str) and isinstance(e["sha256"], str)
            ok = ok and isinstance(e["file"], str) and e["file"] == Path(e["file"]).name
            ok = ok and isinstance(e["num_examples"], int) and e["num_examples"] >= 0
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise DataError(f"{path} is not a valid {MANIFEST_FORMAT} or {LOCAL_FORMAT} manifest", fix=fix)


def _local_ok(manifest: dict[str, Any]) -> bool:
    """A local dataset's partition: class names, their count and the feature shape are stated and consistent."""
    classes, shape = manifest["classes"], manifest["feature_shape"]
    return (isinstance(classes, list) and all(isinstance(c, str) for c in classes) and len(classes) >= 1
            and manifest["num_classes"] == len(classes) and isinstance(shape, list)
            and all(isinstance(d, int) and d > 0 for d in shape))


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
    local = manifest["format"] == LOCAL_FORMAT
    x, labels = _read_local_npz(path, manifest) if local else _read_npz(path)
    if len(labels) != entry["num_examples"]:
        raise DataError(f"{path} holds {len(labels)} examples, the manifest says {entry['num_examples']}",
                        fix="partition again with `fedctl partition`")
    log.debug("loaded %s (%d examples) from %s", entry["name"], len(labels), directory)
    if local:
        return Shard(entry["name"], manifest["dataset"], x, labels.astype(np.int64), len(labels),
                     tuple(manifest["classes"]))
    norm = manifest["normalization"]
    return _make_shard(entry["name"], manifest["dataset"], x, labels, float(norm["mean"]), float(norm["std"]))


_SHARD_FIX = "the file is not a fedctl shard; partition again with `fedctl partition`"


def _shard_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    return read_npz_arrays(path, _SHARD_FIX, what="a shard's x and y")


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    fix = _SHARD_FIX
    images, labels = _shard_arrays(path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{path}: x is {images.dtype} {images.shape}, expected uint8 [n, 28, 28]", fix=fix)
    if labels.dtype != np.uint8 or labels.shape != (len(images),):
        raise DataError(f"{path}: y is {labels.dtype} {labels.shape}, expected uint8 [{len(images)}]", fix=fix)
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise DataError(f"{path}: label {int(labels.max())} out of range 0..{NUM_CLASSES - 1}", fix=fix)
    return images, labels


def _read_local_npz(path: Path, manifest: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """A local dataset's shard: float32 ``[n, *feature_shape]`` features and int64 labels below num_classes."""
    x, y = _shard_arrays(path)
    shape, num_classes = tuple(manifest["feature_shape"]), manifest["num_classes"]
    if x.dtype != np.float32 or x.shape[1:] != shape:
        raise DataError(f"{path}: x is {x.dtype} {x.shape}, expected float32 [n, {', '.join(map(str, shape))}]",
                        fix=_SHARD_FIX)
    if y.dtype != np.int64 or y.shape != (len(x),):
        raise DataError(f"{path}: y is {y.dtype} {y.shape}, expected int64 [{len(x)}]", fix=_SHARD_FIX)
    if y.size and not 0 <= int(y.min()) <= int(y.max()) < num_classes:
        raise DataError(f"{path}: labels outside 0..{num_classes - 1}", fix=_SHARD_FIX)
    return np.ascontiguousarray(x), y


def shard_from_local(data: LocalData, name: str) -> Shard:
    """A local dataset as a Shard (features as they are), named ``name``; no holdout yet (see with_holdout)."""
    return Shard(name, data.source, data.x, data.y, data.num_examples, data.classes)


def with_holdout(shard: Shard, fraction: float, seed: int, option: str = "--holdout") -> Shard:
    """``shard`` with a seeded, stratified ``fraction`` of its examples moved into ``holdout_x``/``holdout_y``.

    ``fraction == 0`` returns the shard unchanged (no holdout). See
    :func:`fedctl.data.local.split_holdout`, which raises ConfigError for a fraction that leaves no training
    example.
    """
    if fraction == 0:
        return shard
    whole = LocalData(shard.x, shard.y, shard.classes, shard.name)
    train, held = split_holdout(whole, fraction, seed, option=option)
    return dataclasses.replace(shard, x=train.x, y=train.y, num_examples=train.num_examples, holdout_x=held.x,
                               holdout_y=held.y)


def load_split_as_shard(dataset: str, split: str, source_dir: str | os.PathLike[str] | None = None,
                        download: bool = False) -> Shard:
    """Load a whole split of a registered dataset as a Shard (for centralised evaluation, ``--eval-data test``).

    The files are located and SHA-256-verified as by :func:`fedctl.data.datasets.load_dataset`, and
    normalised with the dataset's registered mean/std. The shard is named ``"<dataset>:<split>"``.
    """
    spec = get_dataset(dataset)
    images, labels = load_dataset(dataset, split, source_dir, download)
    return _make_shard(f"{spec.name}:{split}", spec.name, images, labels, spec.mean, spec.std)
