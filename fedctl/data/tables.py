"""Tables as datasets: CSV/TSV (standard library) and Parquet (pyarrow), one label column, numeric feature columns.

Labels become class ids by one rule for both formats (:func:`encode_labels`): whole numbers that are all
non-negative are kept as they are (so data holders with different subsets of the classes agree on the ids);
anything else (names, negative numbers) is mapped to ``0..C-1`` in sorted order *of this file's values*, which
is the same on every data holder only if every holder has every class. Numbers that are not whole are refused:
fedctl trains classifiers.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedctl.data.local import LocalData, check_num_classes
from fedctl.errors import DataError

log = logging.getLogger(__name__)

DELIMITERS = {".csv": ",", ".tsv": "\t"}
_NUMERIC_FIX = "encode them as numbers or drop them: every column but the label column is a feature"


def load_table(path: Path, label_column: str) -> LocalData:
    """A CSV/TSV or Parquet file as :class:`LocalData`: x float32 ``[n, F]`` in column order, y from the labels."""
    if path.suffix.lower() in DELIMITERS:
        header, label_values, columns = _read_csv(path, label_column)
    else:
        header, label_values, columns = _read_parquet(path, label_column)
    features = [name for name in header if name != label_column]
    if not features:
        raise DataError(f"{path} has no feature columns, only the label column {label_column!r}",
                        fix="add numeric feature columns")
    y, classes = encode_labels(label_values, label_column, str(path))
    if not len(y):
        return LocalData(np.zeros((0, len(features)), np.float32), y, classes, str(path))
    x = np.stack([columns[name] for name in features], axis=1).astype(np.float32)
    return LocalData(np.ascontiguousarray(x), y, classes, str(path))


def _read_csv(path: Path, label_column: str) -> tuple[list[str], list[Any], dict[str, np.ndarray]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [row for row in csv.reader(f, delimiter=DELIMITERS[path.suffix.lower()]) if row]
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path} is not a readable text table ({err})",
                        fix="save it as UTF-8 CSV with a header row") from None
    if not rows:
        raise DataError(f"{path} is empty (not even a header row)", fix="pass a CSV with a header row and data rows")
    header, body = [name.strip() for name in rows[0]], rows[1:]
    _check_label_column(path, header, label_column)
    for number, row in enumerate(body, start=1):
        if len(row) != len(header):
            raise DataError(f"{path}: row {number} has {len(row)} fields, the header has {len(header)}",
                            fix="give every row one value per column")
    cells = list(zip(*body)) if body else [()] * len(header)
    label_index = header.index(label_column)
    labels = [cell.strip() or None for cell in cells[label_index]]
    bad: list[str] = []
    columns: dict[str, np.ndarray] = {}
    for name, values in zip(header, cells):
        if name != label_column:
            try:
                columns[name] = np.array(values, dtype=np.float64) if values else np.zeros(0)
            except ValueError:
                bad.append(_first_bad_cell(name, values))
    if bad:
        raise DataError(f"{path}: feature columns are not numeric: {'; '.join(bad)}", fix=_NUMERIC_FIX)
    return header, labels, columns


def _first_bad_cell(name: str, values: Sequence[str]) -> str:
    for number, value in enumerate(values, start=1):
        try:
            float(value)
        except ValueError:
            return f"{name} ({'empty cell' if not value.strip() else repr(value)} in row {number})"
    return name


def _check_label_column(path: Path, header: list[str], label_column: str) -> None:
    if label_column not in header:
        shown = ", ".join(header[:12]) + (f", … ({len(header)} in all)" if len(header) > 12 else "")
        fix = ("rename the label column to 'label', or name it with --label-column NAME"
               if label_column == "label" else "pass --label-column one of its columns")
        raise DataError(f"{path} has no label column {label_column!r} (its columns: {shown})", fix=fix)


def _read_parquet(path: Path, label_column: str) -> tuple[list[str], list[Any], dict[str, np.ndarray]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} (Parquet) needs pyarrow, which is not installed",
                        fix="pip install 'fedctl[data]', or save the table as CSV") from None
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path} is not a readable Parquet file ({str(err).splitlines()[0]})",
                        fix="pass a Parquet file (pandas, pyarrow and Spark write them), or save it as CSV") from None
    header = [str(name) for name in table.column_names]
    _check_label_column(path, header, label_column)
    bad: list[str] = []
    columns: dict[str, np.ndarray] = {}
    for name, column in zip(header, table.columns):
        if name == label_column:
            continue
        kind = column.type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
            bad.append(f"{name} ({kind})")
        elif column.null_count:
            bad.append(f"{name} ({column.null_count} missing values)")
        else:
            columns[name] = np.asarray(column.to_numpy(), dtype=np.float64)
    if bad:
        raise DataError(f"{path}: feature columns are not numeric: {'; '.join(bad)}", fix=_NUMERIC_FIX)
    return header, table.column(label_column).to_pylist(), columns


def encode_labels(values: Sequence[Any], column: str, source: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """Class ids int64 ``[n]`` and class names for a label column's values (see the module docstring).

    Raises
    ------
    DataError
        Empty cells, numbers that are not whole, or more than :data:`~fedctl.data.local.MAX_CLASSES` classes.
    """
    missing = [i for i, v in enumerate(values, start=1) if v is None or (isinstance(v, str) and not v.strip())]
    if missing:
        raise DataError(f"{source}: the label column {column!r} has {len(missing)} empty cells (the first in row "
                        f"{missing[0]})", fix="give every row a label, or drop the unlabelled rows")
    numbers = _as_numbers(values)
    if numbers is None:
        return _map_sorted([str(v).strip() for v in values], column, source)
    fractional = next((v for v in numbers if not (math.isfinite(v) and v == int(v))), None)
    if fractional is not None:
        raise DataError(f"{source}: the label column {column!r} holds numbers that are not class ids (e.g. "
                        f"{fractional:g}); fedctl trains classifiers", fix="label the rows with class ids or names "
                        "(a column of whole numbers or of words)")
    ids = np.array([int(v) for v in numbers], dtype=np.int64)
    if ids.size and int(ids.min()) < 0:
        return _map_sorted([int(v) for v in ids], column, source)
    num_classes = int(ids.max()) + 1 if ids.size else 0
    check_num_classes(num_classes, source)
    return ids, tuple(str(i) for i in range(num_classes))


def _as_numbers(values: Sequence[Any]) -> list[float] | None:
    """Every value as a number, or None when one is not (then the labels are names)."""
    numbers: list[float] = []
    for v in values:
        if isinstance(v, bool | int | float):
            numbers.append(float(v))
            continue
        try:
            numbers.append(float(str(v).strip()))
        except ValueError:
            return None
    return numbers


def _map_sorted(values: Sequence[Any], column: str, source: str) -> tuple[np.ndarray, tuple[str, ...]]:
    distinct = sorted(set(values))
    check_num_classes(len(distinct), source)
    index = {v: i for i, v in enumerate(distinct)}
    classes = tuple(str(v) for v in distinct)
    shown = ", ".join(f"{name}={i}" for i, name in enumerate(classes[:10])) + (", …" if len(classes) > 10 else "")
    log.info("%s: labels of column %r mapped in sorted order (%s); if another data holder may lack a class, give "
             "every holder the same --classes", source, column, shown)
    return np.array([index[v] for v in values], dtype=np.int64), classes
