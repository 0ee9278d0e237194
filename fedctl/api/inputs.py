"""What the commands and the Python API take as input, checked: a worker's data (a shard, a dataset split or a data
holder's own files, with a held-out split), endpoints, backends and the broker's evaluator."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedctl.data.local import FORMATS, describe_formats, load_local
from fedctl.data.partition import MANIFEST_NAME
from fedctl.data.shards import Shard, load_shard, load_split_as_shard, read_manifest, shard_from_local, with_holdout
from fedctl.errors import ConfigError, DataError, DatasetNotFound
from fedctl.models import ModelSpec
from fedctl.worker.frameworks import create_trainer, default_backend
from fedctl.worker.frameworks.base import Params

log = logging.getLogger(__name__)


LOCAL_HOLDOUT = 0.1
"""The fraction of a local dataset (``--data PATH``) ``fedctl join`` keeps out of training for evaluation by default."""


def load_data(name: str, data_dir: Path | None, option: str = "--data", *, holdout: float | None = 0.0,
              holdout_seed: int = 0, label_column: str | None = None, classes: Sequence[str] | None = None) -> Shard:
    """The examples ``name`` stands for, with an optional held-out part for evaluation.

    Parameters
    ----------
    name:
        With ``data_dir``: a shard of that partition directory (``shard3``, ``3``, ``test``). Without, in this
        order: the path of an existing file or folder (a local dataset read by
        :func:`fedctl.data.local.load_local`, its features as they are; a shard file of a partition directory is
        loaded as that shard, normalised); ``DATASET:SPLIT`` (``mnist:test``); a shard of the current directory
        when it is a partition directory.
    data_dir:
        A directory written by ``fedctl partition``, or None.
    option:
        The flag ``name`` came from, for messages.
    holdout:
        Fraction of the examples held out of training into ``Shard.holdout_x``/``holdout_y`` (seeded by
        ``holdout_seed``, stratified, the same on every start); None: :data:`LOCAL_HOLDOUT` for a local dataset,
        none for a shard or a dataset split (whose examples stay as they always were).
    label_column, classes:
        For a local dataset: a table's label column (default ``"label"``) and the class names in id order
        (:func:`fedctl.data.local.load_local`); refused for a shard or a split, whose labels are ids already.

    Raises
    ------
    ConfigError
        ``name`` is none of the above, or the holdout would leave no training example.
    DataError
        The data is missing, damaged or empty.
    """
    shard, local = _resolve_data(name, data_dir, option, label_column, classes)
    if shard.num_examples == 0:
        raise DataError(f"{option} {name!r} holds no examples",
                        fix="pick another shard, or partition again (with --test-fraction above 0 for a test split)")
    fraction = holdout if holdout is not None else (LOCAL_HOLDOUT if local else 0.0)
    shard = with_holdout(shard, fraction, holdout_seed)
    if shard.num_holdout:
        log.info("%s: %d examples for training, %d held out for evaluation (--holdout %g)", shard.name,
                 shard.num_examples, shard.num_holdout, fraction)
    return shard


def _resolve_data(name: str, data_dir: Path | None, option: str, label_column: str | None,
                  classes: Sequence[str] | None) -> tuple[Shard, bool]:
    """The shard ``name`` stands for, and whether it is a local dataset (not a partition's shard or a split)."""
    path = Path(name)
    shard = None if data_dir is not None or not path.exists() else _partition_file(path)
    if data_dir is None and path.exists() and shard is None:
        data = load_local(path, label_column=label_column or "label", classes=classes)
        return shard_from_local(data, path.name), True
    given = [flag for flag, value in (("--label-column", label_column), ("--classes", classes)) if value is not None]
    if given:
        raise ConfigError(f"{given[0]} applies to a dataset file or folder (--data PATH), not to {option} {name!r}",
                          f"drop {given[0]}: the labels of a partition's shard or a dataset split are class ids")
    if data_dir is not None:
        return load_shard(data_dir, name), False
    if shard is not None:
        return shard, False
    if ":" in name:
        dataset, split = name.split(":", 1)
        return load_split_as_shard(dataset, split), False
    if Path(MANIFEST_NAME).is_file():
        return load_shard(Path("."), name), False
    raise _unknown_data(name, option)


def _partition_file(path: Path) -> Shard | None:
    """The shard when ``path`` is a shard file listed in its directory's manifest, else None."""
    if not (path.is_file() and path.suffix == ".npz" and (path.parent / MANIFEST_NAME).is_file()):
        return None
    entries = [*(manifest := read_manifest(path.parent))["shards"], manifest["test"]]
    names = [e["name"] for e in entries if e["file"] == path.name]
    return load_shard(path.parent, names[0]) if names else None


def _unknown_data(name: str, option: str) -> ConfigError:
    path = Path(name)
    suffix = path.suffix.lower()
    if suffix in FORMATS or len(path.parts) > 1:
        if suffix in FORMATS and suffix != ".npz":
            fix = f"pass the path of an existing dataset ({describe_formats()})"
        else:  # perhaps a shard file's path: say how to name it
            fix = (f"name the directory and the shard apart: --data-dir {path.parent} {option} {path.stem}, or "
                   "pass the path of an existing dataset")
        return ConfigError(f"{option} {name!r}: no such file or folder (and no --data-dir was given)", fix)
    fix = (f"pass --data-dir DIR written by `fedctl partition`, a dataset split such as {option} mnist-sample:test, "
           "or the path of a local dataset (.npz, CSV, Parquet, image folder)")
    return ConfigError(f"{option} {name!r} names a shard of a partition directory, but no --data-dir was given "
                       "and the current directory is not one", fix)


def source_dir_fix(err: DatasetNotFound, has_download: bool) -> DatasetNotFound:
    """``err`` with a fix naming the options of a command that has ``--source-dir`` (and maybe ``--download``)."""
    fix = "pass --source-dir DIR holding its four IDX files (.gz or raw)"
    if not err.downloadable:
        fix += " (this dataset cannot be downloaded)"
    elif has_download:
        fix += ", or add --download"
    else:
        fix += f", or download them once with `fedctl partition --dataset {err.dataset} --download --iid --out DIR`"
    err.fix = fix
    return err


@contextmanager
def missing_dataset_fix(has_download: bool) -> Iterator[None]:
    """Around the work of a command that has ``--source-dir``: a missing dataset's fix names that option."""
    try:
        yield
    except DatasetNotFound as err:
        raise source_dir_fix(err, has_download) from None


TRANSPORTS = ("tcp", "ipc", "inproc")
"""The ZeroMQ transports a broker and its workers can use (ROUTER/DEALER)."""


def check_endpoint(endpoint: str, option: str, bind: bool) -> str:
    """Refuse an endpoint ZeroMQ would reject with a cryptic error, or take other than meant.

    It needs a transport (``tcp://``, ``ipc://``, ``inproc://``); a tcp endpoint needs HOST:PORT with a port in
    1..65535 (libzmq would silently take 99999 as 99999 % 65536), ``*`` as the port only for ``--bind`` (any free
    port), and ``*`` as the host only for ``--bind`` (every interface).
    """
    scheme, sep, rest = endpoint.partition("://")
    example = "tcp://127.0.0.1:5555" + (", or tcp://127.0.0.1:* for any free port" if bind else "")
    if not sep:
        raise ConfigError(f"{option} {endpoint!r} lacks a transport", f"pass {_with_scheme(endpoint)}")
    if scheme not in TRANSPORTS:
        raise ConfigError(f"{option} {endpoint!r}: {scheme}:// is not a ZeroMQ transport fedctl can use",
                          f"pass tcp://HOST:PORT (e.g. {_with_scheme(rest)}), ipc://PATH or inproc://NAME")
    if scheme != "tcp":
        return endpoint
    host, sep, port = rest.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{option} {endpoint!r} lacks HOST:PORT", f"pass e.g. {example}")
    if not bind and host == "*":
        raise ConfigError(f"{option} {endpoint!r}: * (every interface) is for binding, not connecting",
                          f"pass the broker's address, e.g. tcp://127.0.0.1:{port}")
    if bind and port == "*":
        return endpoint
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{option} {endpoint!r}: port {port!r} is not a number in 1..65535", f"pass e.g. {example}")
    return endpoint


def _with_scheme(address: str) -> str:
    """``address`` as a tcp endpoint: ``5555`` → tcp://127.0.0.1:5555, ``host`` → tcp://host:5555."""
    if address.isdigit():
        return f"tcp://127.0.0.1:{address}"
    return f"tcp://{address}" if ":" in address else f"tcp://{address or '127.0.0.1'}:5555"


def resolve_backend(backend: str) -> str:
    return default_backend() if backend == "auto" else backend


def make_evaluator(backend: str, spec: ModelSpec, shard: Shard, device: str = "cpu",
                   threads: int | None = None, task: Any = None) -> Callable[[Params], dict[str, float]]:
    """Centralised evaluation on ``shard``; the framework is imported here, only when evaluation is asked for."""
    trainer = create_trainer(backend, spec, shard.x, shard.y, device=device, threads=threads, task=task)
    return lambda weights: trainer.evaluate(weights)
