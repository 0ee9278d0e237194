"""A data holder's own dataset: the formats fedctl reads (.npz, CSV/TSV, Parquet, image folders) and the held-out split.

``load_local`` detects the format from the path: a directory is an image folder (one sub-folder per class), a file
is chosen by its suffix in :data:`FORMATS`. Every loader returns a :class:`LocalData`: float32 features as they are
in the file (an image folder's pixels scaled to [0, 1]; nothing else is normalised, that is the task's business),
int64 labels ``0..C-1`` and the class names. Every refusal is a :class:`~fedctl.errors.DataError` naming the file,
the cause and the fix. Parquet needs pyarrow and image folders need Pillow (``pip install 'fedctl[data]'``); both
are imported only when such a file is read.
"""

from __future__ import annotations

import logging
import os
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedctl.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: Refuse more classes than this: a label column with more distinct ids is almost surely not a class label.
MAX_CLASSES = 10_000
PARTITION_MANIFEST = "manifest.json"  # partition.MANIFEST_NAME; not imported, partition imports this module


@dataclass(frozen=True, eq=False)
class LocalData:
    """A dataset in memory, ready to split or train on.

    Attributes
    ----------
    x:
        float32 ``[n, ...]``: ``[n, F]`` for a table, ``[n, C, H, W]`` for images, as stored for ``.npz``.
    y:
        int64 ``[n]`` labels in ``0..len(classes)-1``.
    classes:
        Class names; label ``i`` is ``classes[i]``.
    source:
        Where the data came from (the path as given).
    skipped:
        Files that could not be read and were left out (image folders only).
    """

    x: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]
    source: str
    skipped: int = 0

    def __post_init__(self) -> None:
        if self.x.dtype != np.float32 or self.x.ndim < 2:
            raise DataError(f"{self.source}: features are {self.x.dtype} {self.x.shape}, expected float32 [n, ...]")
        if self.y.dtype != np.int64 or self.y.shape != (len(self.x),):
            raise DataError(f"{self.source}: labels are {self.y.dtype} {self.y.shape}, expected int64 [{len(self.x)}]")
        if self.y.size and not 0 <= int(self.y.min()) <= int(self.y.max()) < len(self.classes):
            raise DataError(f"{self.source}: labels outside 0..{len(self.classes) - 1}")

    @property
    def num_examples(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray) -> LocalData:
        """The examples at ``index`` (fresh arrays), same classes and source."""
        return LocalData(np.ascontiguousarray(self.x[index]), self.y[index], self.classes, self.source, self.skipped)


def load_local(path: str | os.PathLike[str], *, label_column: str = "label",
               image_size: tuple[int, int] | None = None, classes: Sequence[str] | None = None) -> LocalData:
    """Load a dataset a data holder already has.

    Parameters
    ----------
    path:
        An ``.npz`` file (arrays ``x`` and integer ``y``), a CSV (``.csv``, ``.tsv``) or Parquet (``.parquet``,
        ``.pq``) table with a label column and numeric feature columns, or a directory with one sub-folder of
        PNG/JPEG images per class.
    label_column:
        The label column of a table; every other column is a feature.
    image_size:
        ``(height, width)`` to resize every image to; without it, images of different sizes are refused.
    classes:
        The class names in id order, the same list on every data holder (a table's label values, an image
        folder's sub-folder names, an ``.npz``'s ids as ``"0"``, ``"1"``, …): label ``classes[i]`` becomes id
        ``i`` whichever classes this dataset happens to hold. Without it, names are numbered in sorted order of
        what this dataset holds (see :func:`with_classes`).

    Returns
    -------
    LocalData

    Raises
    ------
    DataError
        Missing path, unknown format, or a file that is not a usable dataset; the message says which and why.
    """
    path = Path(path)
    if path.is_dir():
        if (path / PARTITION_MANIFEST).is_file():
            raise DataError(f"{path} is a partition directory written by `fedctl partition`, not a dataset",
                            fix=f"pick one of its shards: --data-dir {path} --data shard0")
        from fedctl.data.images import load_image_folder

        data = load_image_folder(path, image_size=image_size)
    elif not path.exists():
        raise DataError(f"{path} does not exist", fix=f"pass an existing file or folder ({describe_formats()})")
    else:
        loader = FORMATS.get(path.suffix.lower())
        if loader is None:
            raise DataError(f"{path}: unknown dataset format {path.suffix or '(no suffix)'!r}",
                            fix=f"convert it to one fedctl reads ({describe_formats()})")
        data = loader(path, label_column)
    if classes is not None:
        data = with_classes(data, classes)
    _check_usable(data)
    log.debug("%s: %d examples, features %s, %d classes", path, data.num_examples, data.x.shape[1:],
              len(data.classes))
    return data


def with_classes(data: LocalData, classes: Sequence[str]) -> LocalData:
    """``data`` with its labels renumbered by ``classes`` (names in id order, agreed by every data holder), so that
    a holder without some class, or whose names sort differently, still gives each class the federation's id.

    Raises
    ------
    DataError
        A label of ``data`` that ``classes`` does not name, or a name given twice.
    """
    names = [str(c).strip() for c in classes]
    twice = [n for i, n in enumerate(names) if n in names[:i]]
    fix = "list every class name once, comma-separated, in the order of their ids"
    if not names or not all(names):
        raise DataError(f"the class list {','.join(names)!r} has an empty name", fix=fix)
    if twice:
        raise DataError(f"the class list names {twice[0]!r} twice", fix=fix)
    check_num_classes(len(names), data.source)
    index = {n: i for i, n in enumerate(names)}
    used = sorted({int(v) for v in np.unique(data.y)})
    unknown = [data.classes[i] for i in used if data.classes[i] not in index]
    if unknown:
        raise DataError(f"{data.source}: label {unknown[0]!r} is not in the class list ({', '.join(names[:8])}"
                        f"{', …' if len(names) > 8 else ''})", fix="add it to --classes (the same list on every "
                        "data holder), or relabel the data")
    remap = np.array([index.get(name, -1) for name in data.classes], dtype=np.int64)
    log.info("%s: classes %s", data.source, ", ".join(f"{n}={i}" for i, n in enumerate(names[:10]))
             + (", …" if len(names) > 10 else ""))
    return LocalData(data.x, remap[data.y], tuple(names), data.source, data.skipped)


def describe_formats() -> str:
    return ".npz with x and y, CSV or Parquet with a label column, or a folder of PNG/JPEG images per class"


def _check_usable(data: LocalData) -> None:
    if data.num_examples == 0:
        raise DataError(f"{data.source} holds no examples", fix="pass a dataset with at least one example")
    bad = np.size(data.x) - int(np.count_nonzero(np.isfinite(data.x)))
    if bad:
        first = int(np.flatnonzero(~np.isfinite(data.x).reshape(len(data.x), -1).all(axis=1))[0])
        raise DataError(f"{data.source}: {bad} feature values are NaN or infinite (the first in example {first})",
                        fix="fill or drop the missing values before training")


def read_npz_arrays(path: Path, fix: str, what: str = "x and y") -> tuple[np.ndarray, np.ndarray]:
    """Arrays ``x`` and ``y`` of an ``.npz`` file, read without unpickling; anything else is one DataError."""
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
        raise DataError(f"{path} is a damaged .npz archive ({first_line(err)})", fix=fix) from err
    except (OSError, zipfile.BadZipFile, EOFError, zlib.error) as err:
        raise DataError(f"{path} is a damaged .npz archive ({first_line(err)})", fix=fix) from err
    if len(arrays) != 2:
        raise DataError(f"{path} holds the arrays {', '.join(held) or '(none)'}, not {what}", fix=fix)
    return arrays[0], arrays[1]


def first_line(err: BaseException) -> str:
    """The first line of an exception's text: numpy's errors run over several lines."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def load_npz(path: Path, label_column: str = "label") -> LocalData:
    """An ``.npz`` file with a numeric array ``x`` ``[n, ...]`` and an integer array ``y`` ``[n]``.

    ``x`` is used as it is (cast to float32; a 1-D ``x`` is one feature per example); labels must be
    non-negative integers and are kept as they are, so ``classes`` is ``"0" .. str(max(y))``.
    ``label_column`` is ignored.
    """
    fix = "save it with numpy.savez(PATH, x=features, y=labels): x numeric [n, ...], y integer class ids [n]"
    x, y = read_npz_arrays(path, fix)
    if x.dtype.kind not in "biuf" or x.ndim == 0:
        raise DataError(f"{path}: x is {x.dtype} {x.shape}, not a numeric array [n, ...]", fix=fix)
    if y.dtype.kind not in "biu":
        raise DataError(f"{path}: y is {y.dtype}, but labels must be integers (class ids 0..C-1)",
                        fix="store the class ids as integers, e.g. y.astype(numpy.int64) if they are whole numbers")
    if y.shape != (len(x),):
        raise DataError(f"{path}: y has shape {y.shape}, expected [{len(x)}] (one label per row of x)", fix=fix)
    if y.size and int(y.min()) < 0:
        raise DataError(f"{path}: label {int(y.min())} is negative", fix="store class ids 0..C-1 in y")
    num_classes = int(y.max()) + 1 if y.size else 0
    check_num_classes(num_classes, str(path))
    features = x.reshape(len(x), -1) if x.ndim == 1 else x
    return LocalData(np.ascontiguousarray(features, dtype=np.float32), y.astype(np.int64),
                     tuple(str(i) for i in range(num_classes)), str(path))


def check_num_classes(num_classes: int, source: str) -> None:
    if num_classes > MAX_CLASSES:
        raise DataError(f"{source}: labels up to {num_classes - 1} would make {num_classes} classes, more than "
                        f"the {MAX_CLASSES} fedctl accepts", fix="use class ids 0..C-1, or check the label column")


def _load_table(path: Path, label_column: str) -> LocalData:
    from fedctl.data.tables import load_table  # its own module: CSV and Parquet parsing

    return load_table(path, label_column)


#: File suffix -> loader ``(path, label_column) -> LocalData``. Image folders are recognised as directories.
FORMATS: dict[str, Callable[[Path, str], LocalData]] = {
    ".npz": load_npz,
    ".csv": _load_table,
    ".tsv": _load_table,
    ".parquet": _load_table,
    ".pq": _load_table,
}


def split_holdout(data: LocalData, fraction: float, seed: int, *,
                  option: str = "--holdout") -> tuple[LocalData, LocalData]:
    """Hold out a seeded, stratified fraction of the examples (for evaluation); return ``(train, holdout)``.

    The holdout has ``max(1, round(fraction * n))`` examples (none for ``fraction == 0``), shared among the
    classes in proportion to their sizes (largest remainders), drawn at random within each class by
    ``numpy.random.default_rng(seed)``: the same data and seed always give the same split. Both parts keep
    the original order of the examples.

    Raises
    ------
    ConfigError
        ``fraction`` outside ``[0, 1)``, or so large that no training example would remain (``option`` names
        the flag in the message).
    """
    if not 0 <= fraction < 1:
        raise ConfigError(f"{option} {fraction} is outside [0, 1)", fix=f"pass {option} F with 0 <= F < 1")
    n = data.num_examples
    k = 0 if fraction == 0 else max(1, round(fraction * n))
    if k >= n:
        raise ConfigError(f"{option} {fraction} of {n} examples would leave no training example",
                          fix=f"pass a smaller {option} (0 keeps every example for training)")
    counts = np.bincount(data.y, minlength=len(data.classes))
    quota = k * counts / n
    take = np.floor(quota).astype(np.int64)
    extra = np.argsort(-(quota - take), kind="stable")[: k - int(take.sum())]
    take[extra] += 1  # each extra goes to a class with a fractional quota, so take <= counts
    rng = np.random.default_rng(seed)
    held = [rng.choice(np.flatnonzero(data.y == c), size=int(t), replace=False)
            for c, t in enumerate(take) if t]
    mask = np.zeros(n, dtype=bool)
    if held:
        mask[np.concatenate(held)] = True
    return data.subset(np.flatnonzero(~mask)), data.subset(np.flatnonzero(mask))
