"""Partitioning a dataset among clients (IID, label shards, Dirichlet label skew, quantity skew) and writing it.

The partitioners are pure functions of their inputs and an explicit ``numpy.random.Generator``; each returns
one sorted index array per client, disjoint, covering every example, none empty. A shard directory holds
``shard0.npz … shard{K-1}.npz``, ``test.npz`` and ``manifest.json`` (written last, so a directory with a manifest
is complete; each entry records its size, ``label_histogram`` and SHA-256). Two formats:

* ``fedctl-partition/1``, a registered dataset: ``x`` uint8 [n, 28, 28], ``y`` uint8 [n], ``test.npz`` the
  dataset's test split, and the normalisation constants in the manifest.
* ``fedctl-partition/2``, a local dataset (:func:`write_local_partition`): ``x`` float32 [n, ...] as in the
  source, ``y`` int64 [n], ``test.npz`` a held-out fraction; the manifest adds ``classes``, ``feature_shape``
  and ``source``.

Shard files are deterministic zip archives, so the same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import fedctl
from fedctl.data.datasets import NUM_CLASSES, get_dataset, load_dataset
from fedctl.data.idx import atomic_output, sha256_file, write_bytes_atomic
from fedctl.data.local import LocalData, split_holdout
from fedctl.errors import ConfigError

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "fedctl-partition/1"
LOCAL_FORMAT = "fedctl-partition/2"
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
    labels = _check_labels(labels)
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


def dirichlet_label_skew(labels: np.ndarray, clients: int, alpha: float,
                         rng: np.random.Generator) -> list[np.ndarray]:
    """Label-skewed split of Hsu et al. (2019): each class is divided among the clients in proportions ~ Dir(α).

    For every class in turn, its examples are shuffled, proportions ``p ~ Dir(α · 1_K)`` are drawn over the
    ``K = clients`` clients, and the class is cut at the cumulative proportions. Small α (0.1) gives most clients
    a few dominant classes; large α (100 and up) approaches an IID split. A client that receives no example at
    all (likely for small α and many clients) is then given one example, taken at random from the client that
    holds the most; a WARNING says how many needed it. So every client is non-empty, and every example is
    used exactly once.

    Parameters
    ----------
    labels:
        One integer label per example.
    clients:
        Number of clients, at most ``len(labels)``.
    alpha:
        Concentration of the Dirichlet distribution, > 0.
    rng:
        Source of randomness.

    Returns
    -------
    list of numpy.ndarray
        One sorted int64 index array per client; disjoint, together covering every example.
    """
    labels = _check_labels(labels)
    _check_counts(len(labels), clients, 1)
    _check_concentration(alpha, "--dirichlet")
    pieces: list[list[np.ndarray]] = [[] for _ in range(clients)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        proportions = rng.dirichlet(np.full(clients, alpha))
        cuts = np.round(np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
        for k, piece in enumerate(np.split(members, cuts)):
            pieces[k].append(piece)
    parts = [np.concatenate(p) for p in pieces]
    filled = _fill_empty(parts, rng)
    if filled:
        log.warning("Dirichlet split (alpha %g): %d of %d clients drew no example and were given one each from "
                    "the largest client; a larger alpha or fewer clients gives fuller clients", alpha, filled, clients)
    return [np.sort(p).astype(np.int64) for p in parts]


def _fill_empty(parts: list[np.ndarray], rng: np.random.Generator) -> int:
    """Move one random example from the largest part into each empty one; return how many were empty.

    With at least as many examples as parts, the largest part holds two or more whenever one is empty.
    """
    empty = [k for k, p in enumerate(parts) if not len(p)]
    for k in empty:
        donor = int(np.argmax([len(p) for p in parts]))
        pick = int(rng.integers(len(parts[donor])))
        parts[k] = parts[donor][pick:pick + 1]
        parts[donor] = np.delete(parts[donor], pick)
    return len(empty)


def quantity_skew(num_examples: int, clients: int, beta: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Quantity-skewed split (Li et al., 2022): client sizes in proportions ~ Dir(β), labels IID.

    Every client gets one example first; the other ``num_examples - clients`` are shared out in proportions
    ``q ~ Dir(β · 1_K)`` (cut at the rounded cumulative proportions), and the examples are dealt in a random
    order, so each client's labels follow the dataset's. Small β (0.5) gives a few large clients and many
    small ones; large β approaches equal sizes.

    Returns
    -------
    list of numpy.ndarray
        One sorted int64 index array per client, each non-empty; disjoint, together covering
        ``range(num_examples)``.
    """
    _check_counts(num_examples, clients, 1)
    _check_concentration(beta, "--quantity-skew")
    rest = num_examples - clients
    cuts = np.round(np.cumsum(rng.dirichlet(np.full(clients, beta)))[:-1] * rest).astype(np.int64)
    sizes = 1 + np.diff(np.concatenate([[0], cuts, [rest]]))
    parts = np.split(rng.permutation(num_examples), np.cumsum(sizes)[:-1])
    return [np.sort(p).astype(np.int64) for p in parts]


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ConfigError(f"labels must be one-dimensional, got shape {labels.shape}", fix="pass y, not x")
    return labels


def _check_concentration(value: float, option: str) -> None:
    if not (np.isfinite(value) and value > 0):
        raise ConfigError(f"{option} must be a positive number, got {value}",
                          fix=f"pass {option} with a value above 0 (0.5 is common; smaller is more skewed)")


@dataclass(frozen=True)
class SchemeSpec:
    """A partition scheme: its command-line flag, the one parameter it takes (or None), its partitioner, its
    one-line description."""

    option: str
    param: str | None
    split: Callable[[np.ndarray, int, Any, np.random.Generator], list[np.ndarray]]
    describe: Callable[[Any], str]


#: Scheme name -> how to split; the parameter is one of write_partition's shards_per_client, alpha or beta.
SCHEMES: dict[str, SchemeSpec] = {
    "iid": SchemeSpec("--iid", None, lambda y, k, _, rng: iid(len(y), k, rng), lambda _: "IID"),
    "shards": SchemeSpec("--shards-per-client", "shards_per_client", by_label_shards,
                         lambda n: f"{n} label shards each"),
    "dirichlet": SchemeSpec("--dirichlet", "alpha", dirichlet_label_skew,
                            lambda a: f"Dirichlet label skew, alpha {a:g}"),
    "quantity": SchemeSpec("--quantity-skew", "beta", lambda y, k, b, rng: quantity_skew(len(y), k, b, rng),
                           lambda b: f"quantity skew, beta {b:g}"),
}
_PARAM_WORDS = {"shards_per_client": ("shards per client", "--shards-per-client N (McMahan et al. use 2)"),
                "alpha": ("Dirichlet alpha", "--dirichlet ALPHA (0.5 is common)"),
                "beta": ("quantity-skew beta", "--quantity-skew BETA (0.5 is common)")}


def scheme_parameter(scheme: str, **params: float | None) -> float | None:
    """The parameter ``scheme`` takes, from ``params`` (shards_per_client, alpha, beta), after checking that it
    is given and that no other one is.

    Raises
    ------
    ConfigError
        Unknown scheme, its parameter missing, or another scheme's parameter given.
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown partition scheme {scheme!r}", fix=f"choose one of: {', '.join(SCHEMES)}")
    wanted = SCHEMES[scheme].param
    for name, value in params.items():
        if value is not None and name != wanted:
            words, option = _PARAM_WORDS[name]
            raise ConfigError(f"the {scheme} scheme takes no {words}",
                              fix=f"drop {option.split()[0]} or {SCHEMES[scheme].option}")
    if wanted is not None and params.get(wanted) is None:
        words, option = _PARAM_WORDS[wanted]
        raise ConfigError(f"the {scheme} scheme needs a {'number of ' if wanted == 'shards_per_client' else ''}"
                          f"{words}", fix=f"pass {option}")
    return params.get(wanted) if wanted is not None else None


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


def _entry(name: str, file: str, sha256: str, y: np.ndarray, num_classes: int) -> dict[str, Any]:
    return {"name": name, "file": file, "num_examples": len(y), "sha256": sha256,
            "label_histogram": np.bincount(y, minlength=num_classes).tolist()}


def write_partition(dataset_name: str, out_dir: str | os.PathLike[str], clients: int, scheme: str,
                    shards_per_client: int | None = None, seed: int = 0,
                    source_dir: str | os.PathLike[str] | None = None, download: bool = False,
                    on_progress: Callable[[int, int], None] | None = None, *, alpha: float | None = None,
                    beta: float | None = None) -> dict[str, Any]:
    """Partition a registered dataset's training split among clients and write the shard directory.

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
        A name in :data:`SCHEMES`: ``"iid"``, ``"shards"`` (label shards; needs ``shards_per_client``),
        ``"dirichlet"`` (label skew; needs ``alpha``) or ``"quantity"`` (size skew; needs ``beta``).
    shards_per_client, alpha, beta:
        The scheme's parameter; the others must be None.
    seed:
        Seed of the ``numpy.random.Generator`` that drives the partition.
    source_dir, download:
        Where to find the dataset, as for :func:`fedctl.data.datasets.locate_dataset`.
    on_progress:
        Called as ``on_progress(done, total)`` after each file is written.

    Returns
    -------
    dict
        The manifest (format ``fedctl-partition/1``), as written to ``out_dir/manifest.json``.
    """
    spec = get_dataset(dataset_name)
    param = scheme_parameter(scheme, shards_per_client=shards_per_client, alpha=alpha, beta=beta)
    x, y = load_dataset(dataset_name, "train", source_dir, download)
    parts = SCHEMES[scheme].split(y, clients, param, np.random.default_rng(seed))
    x_test, y_test = load_dataset(dataset_name, "test", source_dir, download)
    header = {
        "format": MANIFEST_FORMAT, "fedctl_version": fedctl.__version__, "dataset": spec.name,
        "scheme": scheme, "clients": clients, "shards_per_client": shards_per_client, "seed": seed,
        **_scheme_fields(alpha, beta),
        "num_classes": NUM_CLASSES, "normalization": {"mean": spec.mean, "std": spec.std},
    }
    return _write_directory(Path(out_dir), header, (x, y), parts, (x_test, y_test), on_progress)


def write_local_partition(data: LocalData, out_dir: str | os.PathLike[str], clients: int, scheme: str,
                          shards_per_client: int | None = None, seed: int = 0, *, alpha: float | None = None,
                          beta: float | None = None, test_fraction: float = 0.1,
                          on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Partition a local dataset among clients and write the shard directory (format ``fedctl-partition/2``).

    A seeded, stratified ``test_fraction`` of the examples is set aside first as ``test.npz`` (for
    ``fedctl serve --eval-data test``; empty when 0), and the rest is split by ``scheme`` as in
    :func:`write_partition`. Shards hold x float32 ``[n, ...]`` (the features as they are) and y int64; the
    manifest adds ``classes``, ``feature_shape`` and ``source``, and has ``normalization`` null.

    Returns
    -------
    dict
        The manifest, as written to ``out_dir/manifest.json``.
    """
    param = scheme_parameter(scheme, shards_per_client=shards_per_client, alpha=alpha, beta=beta)
    train, test = split_holdout(data, test_fraction, seed, option="--test-fraction")
    parts = SCHEMES[scheme].split(train.y, clients, param, np.random.default_rng(seed))
    header = {
        "format": LOCAL_FORMAT, "fedctl_version": fedctl.__version__, "dataset": Path(data.source).name,
        "source": data.source, "scheme": scheme, "clients": clients, "shards_per_client": shards_per_client,
        "seed": seed, **_scheme_fields(alpha, beta), "test_fraction": test_fraction,
        "num_classes": len(data.classes), "classes": list(data.classes),
        "feature_shape": list(data.x.shape[1:]), "normalization": None,
    }
    return _write_directory(Path(out_dir), header, (train.x, train.y), parts, (test.x, test.y), on_progress)


def _scheme_fields(alpha: float | None, beta: float | None) -> dict[str, float]:
    """The Dirichlet parameters, recorded only when used (so registered datasets' IID/label-shard manifests
    stay as they were)."""
    return {k: v for k, v in (("alpha", alpha), ("beta", beta)) if v is not None}


def _write_directory(out: Path, header: dict[str, Any], train: tuple[np.ndarray, np.ndarray],
                     parts: list[np.ndarray], test: tuple[np.ndarray, np.ndarray],
                     on_progress: Callable[[int, int], None] | None) -> dict[str, Any]:
    """Write ``shard{k}.npz`` for each index array of ``parts``, ``test.npz``, then the manifest (last)."""
    (x, y), (x_test, y_test), num_classes = train, test, header["num_classes"]
    out.mkdir(parents=True, exist_ok=True)
    stale = _previous_files(out)
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # the directory is incomplete until the new manifest lands
    total = len(parts) + 1
    shards = []
    for k, idx in enumerate(parts):
        file = f"shard{k}.npz"
        shards.append(_entry(f"shard{k}", file, save_npz(out / file, x=x[idx], y=y[idx]), y[idx], num_classes))
        if on_progress is not None:
            on_progress(k + 1, total)
    test_entry = _entry(TEST_NAME, "test.npz", save_npz(out / "test.npz", x=x_test, y=y_test), y_test, num_classes)
    if on_progress is not None:
        on_progress(total, total)
    manifest = {**header, "shards": shards, "test": test_entry}
    for file in stale - {s["file"] for s in shards} - {"test.npz"}:
        (out / file).unlink(missing_ok=True)
    write_bytes_atomic(out / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())
    log.info("wrote %d shards (%s) of %s to %s", len(parts), header["scheme"], header["dataset"], out)
    return manifest


def _previous_files(out: Path) -> set[str]:
    """Shard files named by an existing manifest in ``out`` (only plain names, never paths)."""
    try:
        old = json.loads((out / MANIFEST_NAME).read_text())
        files = {str(s["file"]) for s in old["shards"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {f for f in files if f == Path(f).name and f.endswith(".npz")}
