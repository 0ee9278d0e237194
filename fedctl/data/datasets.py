"""The dataset registry (MNIST, Fashion-MNIST, the bundled MNIST sample): where files live, their digests, loading.

Every dataset is four IDX files with the standard MNIST names; a directory counts as holding a dataset
when each file is present either gzipped (``train-images-idx3-ubyte.gz``) or raw (``train-images-idx3-ubyte``).
Digests are SHA-256 of the *uncompressed* content, so both forms verify against the same table.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedctl.data.idx import parse_idx, read_uncompressed
from fedctl.errors import ChecksumError, ConfigError, DataError, DatasetNotFound

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
#: split -> (images file, labels file), without the ``.gz`` suffix.
SPLIT_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FILE_NAMES = tuple(name for pair in SPLIT_FILES.values() for name in pair)
BUNDLED_ROOT = Path(__file__).resolve().parent / "bundled"
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10


@dataclass(frozen=True)
class DatasetSpec:
    """One registered dataset.

    Parameters
    ----------
    name:
        Registry name (``--dataset``).
    sha256:
        File name (without ``.gz``) -> SHA-256 of its uncompressed content.
    sizes:
        Split -> number of examples.
    mean, std:
        Normalisation constants for pixels scaled to [0, 1].
    base_url:
        Where ``<file>.gz`` can be downloaded from; ``None`` when the dataset cannot be downloaded.
    system_dir:
        A directory a system package installs the files to (Debian), or ``None``.
    bundled:
        Whether the files ship inside the fedctl package.
    """

    name: str
    sha256: dict[str, str]
    sizes: dict[str, int]
    mean: float
    std: float
    base_url: str | None = None
    system_dir: Path | None = None
    bundled: bool = False

    def __post_init__(self) -> None:
        if set(self.sha256) != set(FILE_NAMES) or set(self.sizes) != set(SPLITS):
            raise ValueError(f"dataset {self.name}: digests for {FILE_NAMES} and sizes for {SPLITS} required")
        if self.std <= 0:
            raise ValueError(f"dataset {self.name}: std must be positive")


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="mnist",
            sha256={
                "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
            },
            sizes={"train": 60_000, "test": 10_000},
            mean=0.1307,
            std=0.3081,
            base_url="https://ossci-datasets.s3.amazonaws.com/mnist/",
        ),
        DatasetSpec(
            name="fashion-mnist",
            sha256={
                "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            },
            sizes={"train": 60_000, "test": 10_000},
            mean=0.2860,
            std=0.3530,
            base_url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            system_dir=Path("/usr/share/datasets/fashion-mnist"),
        ),
        DatasetSpec(
            # The first 10,000 training and 2,000 test examples of MNIST; see bundled/mnist-sample/README.md.
            # Normalised with MNIST's constants so models move freely between the two.
            name="mnist-sample",
            sha256={
                "train-images-idx3-ubyte": "2889698e6bc3614913e76901316712919d1998fc2b44512451bfe65bc1e668b1",
                "train-labels-idx1-ubyte": "651e38e2ac0632f5113ec18f1df4977117f953197819034009971a6675a0df78",
                "t10k-images-idx3-ubyte": "3f6bd66dee48df299584c67669bceee490faa25f931496bd7473b42106d7daed",
                "t10k-labels-idx1-ubyte": "7b098e5f6a3065807cebeabf36fb1724a8aff19f2673ac08b4923e0e8c715bce",
            },
            sizes={"train": 10_000, "test": 2_000},
            mean=0.1307,
            std=0.3081,
            bundled=True,
        ),
    )
}


def get_dataset(name: str) -> DatasetSpec:
    """Return the registered dataset called ``name``.

    Raises
    ------
    ConfigError
        No dataset has that name; the message lists the known ones.
    """
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}",
                          fix=f"choose one of: {', '.join(DATASETS)}") from None


def find_file(directory: Path, stem: str) -> Path | None:
    """Return ``directory/stem.gz`` or ``directory/stem`` (in that order), whichever exists."""
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def has_dataset(directory: Path) -> bool:
    """Whether ``directory`` holds all four IDX files (gzipped or raw)."""
    return all(find_file(directory, stem) is not None for stem in FILE_NAMES)


def cache_dir(name: str) -> Path:
    """Per-user download cache for a dataset: ``$XDG_CACHE_HOME/fedctl/<name>`` (default ``~/.cache``)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "fedctl" / name


def search_dirs(name: str, source_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The directories searched for a dataset, in order.

    An explicit ``source_dir`` is authoritative: when given, only it (and ``source_dir/<name>``) is searched.
    Otherwise: ``$FEDCTL_DATA_DIR/<name>``, the system package directory, the user cache, the bundled copy.
    """
    spec = get_dataset(name)
    if source_dir is not None:
        return [Path(source_dir), Path(source_dir) / name]
    dirs: list[Path] = []
    if os.environ.get("FEDCTL_DATA_DIR"):
        dirs.append(Path(os.environ["FEDCTL_DATA_DIR"]) / name)
    if spec.system_dir is not None:
        dirs.append(spec.system_dir)
    dirs.append(cache_dir(name))
    if spec.bundled:
        dirs.append(BUNDLED_ROOT / name)
    return dirs


def locate_dataset(name: str, source_dir: str | os.PathLike[str] | None = None, download: bool = False) -> Path:
    """Find the directory holding a dataset's four IDX files, downloading them if asked.

    Parameters
    ----------
    name:
        Registered dataset name.
    source_dir:
        Explicit directory; when given, no other place is searched and downloads go there.
    download:
        When the files are not found, download them (into ``source_dir``, else ``$FEDCTL_DATA_DIR/<name>``,
        else the user cache).

    Raises
    ------
    DatasetNotFound
        Not found and ``download`` is false (the message lists where it looked), or the dataset cannot be
        downloaded.
    """
    spec = get_dataset(name)
    dirs = search_dirs(name, source_dir)
    for directory in dirs:
        if has_dataset(directory):
            log.debug("dataset %s found in %s", name, directory)
            return directory
    if download and spec.base_url is not None:
        # Imported here: download.py needs this registry, so a top-level import would be circular.
        from fedctl.data.download import fetch_dataset

        return fetch_dataset(name, _download_dir(name, source_dir))
    looked = ", ".join(str(d) for d in dirs)
    raise DatasetNotFound(f"dataset {name!r} not found (looked in: {looked})", fix=_not_found_fix(spec),
                          dataset=name, downloadable=spec.base_url is not None)


def _not_found_fix(spec: DatasetSpec) -> str:
    """How to provide a missing dataset, naming no option: the command that failed may have none."""
    where = f"put its four IDX files (.gz or raw) in {_download_dir(spec.name, None)}"
    if spec.base_url is None:
        return f"{where} (this dataset cannot be downloaded)"
    return f"{where}, or download them once with `fedctl partition --dataset {spec.name} --download --iid --out DIR`"


def _download_dir(name: str, source_dir: str | os.PathLike[str] | None) -> Path:
    if source_dir is not None:
        return Path(source_dir)
    if os.environ.get("FEDCTL_DATA_DIR"):
        return Path(os.environ["FEDCTL_DATA_DIR"]) / name
    return cache_dir(name)


def read_verified(path: Path, expected_sha256: str | None) -> bytes:
    """Read a file's uncompressed content and check its SHA-256.

    Raises
    ------
    ChecksumError
        The digest differs; the message names the file and both digests.
    """
    data = read_uncompressed(path)
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256:
            raise ChecksumError(
                f"{path}: SHA-256 of the uncompressed content is {actual}, expected {expected_sha256}",
                fix=f"the file is corrupt or from another dataset: delete {path} and put a good copy there (or "
                    "fetch one with `fedctl partition --download`)")
    return data


def load_dataset(name: str, split: str = "train", source_dir: str | os.PathLike[str] | None = None,
                 download: bool = False, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of a dataset as uint8 arrays, verifying the files' SHA-256.

    Parameters
    ----------
    name:
        Registered dataset name.
    split:
        ``"train"`` or ``"test"``.
    source_dir, download:
        As for :func:`locate_dataset`.
    verify:
        Check the uncompressed SHA-256 of both files against the registry.

    Returns
    -------
    tuple of numpy.ndarray
        ``images`` uint8 ``[N, 28, 28]`` and ``labels`` uint8 ``[N]``.

    Raises
    ------
    ConfigError
        Unknown dataset or split.
    DataError, ChecksumError
        Files missing, malformed or not matching their digests.
    """
    spec = get_dataset(name)
    if split not in SPLIT_FILES:
        raise ConfigError(f"unknown split {split!r}", fix=f"choose one of: {', '.join(SPLITS)}")
    directory = locate_dataset(name, source_dir, download)
    arrays = []
    for stem in SPLIT_FILES[split]:
        path = find_file(directory, stem)
        if path is None:  # removed between locate and load
            raise DataError(f"{directory / stem}(.gz) disappeared", fix="run the command again")
        data = read_verified(path, spec.sha256[stem] if verify else None)
        arrays.append(parse_idx(data, source=str(path)))
    images, labels = arrays
    _check_split(directory, images, labels)
    return images, labels


def _check_split(directory: Path, images: np.ndarray, labels: np.ndarray) -> None:
    fix = f"the files in {directory} are not an MNIST-style dataset: replace them with the right IDX files"
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{directory}: images are {images.dtype} {images.shape}, expected uint8 [N, 28, 28]",
                        fix=fix)
    if labels.dtype != np.uint8 or labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{directory}: labels are {labels.dtype} {labels.shape}, expected uint8 "
                        f"[{len(images)}]", fix=fix)
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise DataError(f"{directory}: label {int(labels.max())} out of range 0..{NUM_CLASSES - 1}", fix=fix)
