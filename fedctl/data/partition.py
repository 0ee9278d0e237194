"""Partitioning a dataset among clients (IID, McMahan et al.'s label shards) and writing the shard directory.

The partitioners are pure functions of their inputs and an explicit ``numpy.random.Generator``. A shard
directory holds ``shard0.npz … shard{K-1}.npz`` (arrays ``x`` uint8 [n, 28, 28] and ``y`` uint8 [n]),
``test.npz`` (the dataset's test split) and ``manifest.json`` (written last, so a directory with a manifest is
complete). Shard files are deterministic zip archives, so the same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import fedctl
from fedctl.data.datasets import NUM_CLASSES, get_dataset, load_dataset
from fedctl.data.idx import atomic_output, sha256_file, write_bytes_atomic
from fedctl.errors import ConfigError

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "fedctl-partition/1"
TEST_NAME = "test"
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def iid(num_examples: int, clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle the example indices and split them into ``clients`` equal parts.

    Parameters
    ----------
    num_examples:
        Size of the dataset.
    clients:
        Number of parts; when it does not divide ``num_examples`` part sizes differ by at most one.
    rng:
        Source of randomness.

    Returns
    -------
    list of numpy.ndarray
        One sorted int64 index array per client; disjoint, together covering ``range(num_examples)``.
    """
    _check_counts(num_examples, clients, 1)
    parts = np.array_split(rng.permutation(num_examples), clients)
    return [np.sort(p).astype(np.int64) for p in parts]


def by_label_shards(labels: np.ndarray, clients: int, shards_per_client: int,
                    rng: np.random.Generator) -> list[np.ndarray]:
    """Pathological non-IID split of McMahan et al. (2017): sorted-by-label shards, a few per client.

    The examples are sorted by label (stable), cut into ``clients * shards_per_client`` contiguous shards of
    equal size (sizes differ by at most one when it does not divide), and each client receives
    ``shards_per_client`` shards drawn at random without replacement. For MNIST, 100 clients x 2 gives 200
    shards of 300 examples, and most clients see only two digits.

    Parameters
    ----------
    labels:
        One integer label per example.
    clients, shards_per_client:
        Positive counts with ``clients * shards_per_client <= len(labels)``.
    rng:
        Source of randomness.

    Returns
    -------
    list of numpy.ndarray
        One sorted int64 index array per client; disjoint, together covering every example.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ConfigError(f"labels must be one-dimensional, got shape {labels.shape}", fix="pass y, not x")
    _check_counts(len(labels), clients, shards_per_client)
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, clients * shards_per_client)
    assignment = rng.permutation(len(shards)).reshape(clients, shards_per_client)
    return [np.sort(np.concatenate([shards[s] for s in row])).astype(np.int64) for row in assignment]


def _check_counts(num_examples: int, clients: int, shards_per_client: int) -> None:
    if clients < 1:
        raise ConfigError(f"--clients must be at least 1, got {clients}", fix="pass --clients N with N >= 1")
    if shards_per_client < 1:
        raise ConfigError(f"--shards-per-client must be at least 1, got {shards_per_client}",
                          fix="pass --shards-per-client N with N >= 1")
    if clients * shards_per_client > num_examples:
        raise ConfigError(f"cannot cut {num_examples} examples into {clients * shards_per_client} non-empty "
                          f"shards ({clients} clients x {shards_per_client})",
                          fix="use fewer clients or fewer shards per client")


def _iid_scheme(labels: np.ndarray, clients: int, shards_per_client: int | None,
                rng: np.random.Generator) -> list[np.ndarray]:
    if shards_per_client is not None:
        raise ConfigError("the iid scheme takes no shards per client", fix="drop --shards-per-client or --iid")
    return iid(len(labels), clients, rng)


def _shards_scheme(labels: np.ndarray, clients: int, shards_per_client: int | None,
                   rng: np.random.Generator) -> list[np.ndarray]:
    if shards_per_client is None:
        raise ConfigError("the shards scheme needs a number of shards per client",
                          fix="pass --shards-per-client N (McMahan et al. use 2)")
    return by_label_shards(labels, clients, shards_per_client, rng)


#: Scheme name -> partitioner taking (labels, clients, shards_per_client, rng).
SCHEMES: dict[str, Callable[[np.ndarray, int, int | None, np.random.Generator], list[np.ndarray]]] = {
    "iid": _iid_scheme,
    "shards": _shards_scheme,
}


def save_npz(path: str | os.PathLike[str], **arrays: np.ndarray) -> str:
    """Write arrays as a compressed ``.npz`` atomically and reproducibly; return the file's SHA-256.

    Readable with ``numpy.load(path, allow_pickle=False)``, like :func:`numpy.savez_compressed`, but with
    fixed zip timestamps so identical arrays give identical bytes.
    """
    with atomic_output(path) as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, array in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
    return sha256_file(path)


def _entry(name: str, file: str, sha256: str, y: np.ndarray) -> dict[str, Any]:
    return {"name": name, "file": file, "num_examples": len(y), "sha256": sha256,
            "label_histogram": np.bincount(y, minlength=NUM_CLASSES).tolist()}


def write_partition(dataset_name: str, out_dir: str | os.PathLike[str], clients: int, scheme: str,
                    shards_per_client: int | None = None, seed: int = 0,
                    source_dir: str | os.PathLike[str] | None = None, download: bool = False,
                    on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Partition a dataset's training split among clients and write the shard directory.

    Parameters
    ----------
    dataset_name:
        Registered dataset name.
    out_dir:
        Output directory (created if needed). Shard files listed by a previous manifest there and not
        part of the new partition are removed.
    clients:
        Number of client shards.
    scheme:
        ``"iid"`` or ``"shards"`` (label shards; needs ``shards_per_client``).
    shards_per_client:
        Label shards per client for the ``"shards"`` scheme; must be None for ``"iid"``.
    seed:
        Seed of the ``numpy.random.Generator`` that drives the partition.
    source_dir, download:
        Where to find the dataset, as for :func:`fedctl.data.datasets.locate_dataset`.
    on_progress:
        Called as ``on_progress(done, total)`` after each file is written.

    Returns
    -------
    dict
        The manifest, as written to ``out_dir/manifest.json``.
    """
    spec = get_dataset(dataset_name)
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown partition scheme {scheme!r}", fix=f"choose one of: {', '.join(SCHEMES)}")
    x, y = load_dataset(dataset_name, "train", source_dir, download)
    parts = SCHEMES[scheme](y, clients, shards_per_client, np.random.default_rng(seed))
    x_test, y_test = load_dataset(dataset_name, "test", source_dir, download)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = _previous_files(out)
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # the directory is incomplete until the new manifest lands
    total = clients + 1
    shards = []
    for k, idx in enumerate(parts):
        file = f"shard{k}.npz"
        shards.append(_entry(f"shard{k}", file, save_npz(out / file, x=x[idx], y=y[idx]), y[idx]))
        if on_progress is not None:
            on_progress(k + 1, total)
    test = _entry(TEST_NAME, "test.npz", save_npz(out / "test.npz", x=x_test, y=y_test), y_test)
    if on_progress is not None:
        on_progress(total, total)
    manifest = {
        "format": MANIFEST_FORMAT, "fedctl_version": fedctl.__version__, "dataset": spec.name,
        "scheme": scheme, "clients": clients, "shards_per_client": shards_per_client, "seed": seed,
        "num_classes": NUM_CLASSES, "normalization": {"mean": spec.mean, "std": spec.std},
        "shards": shards, "test": test,
    }
    for file in stale - {s["file"] for s in shards} - {"test.npz"}:
        (out / file).unlink(missing_ok=True)
    write_bytes_atomic(out / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())
    log.info("wrote %d %s shards of %s to %s", clients, scheme, spec.name, out)
    return manifest


def _previous_files(out: Path) -> set[str]:
    """Shard files named by an existing manifest in ``out`` (only plain names, never paths)."""
    try:
        old = json.loads((out / MANIFEST_NAME).read_text())
        files = {str(s["file"]) for s in old["shards"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {f for f in files if f == Path(f).name and f.endswith(".npz")}
