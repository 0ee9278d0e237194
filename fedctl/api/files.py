"""Files in and out of a run from Python: :func:`export_model` (``fedctl export``) writes a run's model for a
framework, :func:`partition` (``fedctl partition``) cuts a dataset into client shards."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedctl.api.results import Exported, Partition
from fedctl.errors import ConfigError
from fedctl.fsio import check_writable_dir

PathLike = str | os.PathLike[str]


def export_model(state_dir: PathLike = "runs/default", *, format: str | None = None, out: PathLike | None = None,
                 round: int | None = None, best: bool = False, task: PathLike | None = None) -> Exported:
    """Write a model of a run's state dir as a file a framework loads as it is: the tensors keyed by the model's
    parameter names, each in its model dtype.

    Parameters
    ----------
    state_dir:
        The run's state dir (``run.state_dir``).
    format:
        ``"pt"`` (``torch.save`` state dict), ``"safetensors"``, ``"npz"`` or ``"params"`` (MXNet Gluon); default:
        from the suffix of ``out``, else ``"pt"``.
    out:
        The file to write, or an existing directory (or a name ending in ``/``) for the default name in it;
        default: ``MODEL-roundN.FORMAT`` in the current directory.
    round:
        The model after this round, if the run kept it (``keep_models``); default: the last checkpoint's.
    best:
        The best model by the run's ``best_metric`` instead.
    task:
        The run's task: checked against the state dir; with ``pt``, the tensors the federation does not average
        come from a fresh ``model()``, so a strict ``load_state_dict`` takes the file.

    Returns
    -------
    Exported
        What was written; path-like: ``model.load_state_dict(torch.load(exported))``.

    Raises
    ------
    ConfigError
        No checkpoint, an unknown format, a round not kept, no best model, an unwritable ``out``, another task.
    BackendUnavailable
        The format's library (PyTorch for ``pt``, safetensors) is not installed.
    """
    from fedctl import exporting as files
    from fedctl.api.config import task_ref

    out_text = None if out is None else os.fspath(out)
    suffix = "" if out_text is None or out_text.endswith("/") or Path(out_text).is_dir() else Path(out_text).suffix
    fmt = format or files.SUFFIXES.get(suffix, "pt")
    if suffix in files.SUFFIXES and files.SUFFIXES[suffix] != fmt:
        raise ConfigError(f"--out {out_text} has the suffix of --format {files.SUFFIXES[suffix]}, not of --format "
                          f"{fmt}", f"pass --out with {files.FORMATS[fmt].suffix}, or --format "
                          f"{files.SUFFIXES[suffix]}")
    done = files.export(Path(state_dir), fmt, out_text, files.Choice(round, best), task_ref(task))
    return Exported(**done)


def partition(out: PathLike, *, dataset: str = "mnist", input: PathLike | None = None, clients: int = 100,
              scheme: str = "iid", shards_per_client: int | None = None, alpha: float | None = None,
              beta: float | None = None, seed: int = 0, source_dir: PathLike | None = None, download: bool = False,
              label_column: str = "label", test_fraction: float = 0.1, image_size: tuple[int, int] | None = None,
              on_progress: Callable[[int, int], None] | None = None) -> Partition:
    """Cut a dataset into ``clients`` shard files plus ``test.npz`` and ``manifest.json`` in ``out``.

    Parameters
    ----------
    out:
        The directory to write (created if needed).
    dataset:
        A registered dataset's training split (its test split becomes ``test.npz``): ``"mnist"``, or
        ``"mnist-sample"``, which ships with fedctl.
    input:
        Your own dataset instead (``.npz`` with x and y, CSV/TSV/Parquet with ``label_column``, an image folder
        of class sub-folders, resized to ``image_size`` (height, width) when given); a ``test_fraction`` of it becomes
        ``test.npz``.
    clients, seed:
        How many shards, and the seed of the split.
    scheme:
        ``"iid"``, ``"shards"`` (McMahan et al.'s label shards; ``shards_per_client``), ``"dirichlet"`` (label skew,
        ``alpha``) or ``"quantity"`` (size skew, ``beta``).
    source_dir, download:
        Where a registered dataset's files are, and whether to download them (verified by SHA-256).
    on_progress:
        Called as ``on_progress(done, total)`` after each file.

    Returns
    -------
    Partition
        The directory and its manifest; path-like: ``fedctl.simulate(data=partition)``.
    """
    from fedctl.data.partition import write_local_partition, write_partition

    params: dict[str, Any] = {"shards_per_client": shards_per_client, "alpha": alpha, "beta": beta}
    check_writable_dir(Path(out), "--out")
    if input is None:
        manifest = write_partition(dataset, out, clients, scheme, seed=seed, source_dir=source_dir,
                                   download=download, on_progress=on_progress, **params)
    else:
        from fedctl.data.local import load_local

        data = load_local(Path(input), label_column=label_column, image_size=image_size)
        manifest = write_local_partition(data, out, clients, scheme, seed=seed, test_fraction=test_fraction,
                                         on_progress=on_progress, **params)
    return Partition(Path(out), manifest)


export = export_model
"""``fedctl.export``: the same function (``export_model`` is its older name)."""

__all__ = ["export", "export_model", "partition"]
