"""Shared CLI plumbing: logging setup and the evaluator/trainer factories the commands wire together."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedctl.data.partition import MANIFEST_NAME
from fedctl.data.shards import Shard, load_shard, load_split_as_shard
from fedctl.errors import ConfigError, DatasetNotFound
from fedctl.models import ModelSpec
from fedctl.worker.frameworks import create_trainer, default_backend
from fedctl.worker.frameworks.base import Params, Trainer


def setup_logging(verbose: int, quiet: bool = False) -> None:
    """Log to stderr: INFO by default, DEBUG with -v, WARNING with --quiet; rich formatting on a terminal."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    if sys.stderr.isatty() and not os.environ.get("FEDCTL_PLAIN_LOGS"):
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, log_time_format="%H:%M:%S")
        fmt = "%(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", handlers=[handler], force=True)


def load_data(name: str, data_dir: Path | None, option: str = "--data") -> Shard:
    """A shard of a partition directory (``shard3``, ``test``) or, without --data-dir, a dataset split
    written as ``DATASET:SPLIT`` (e.g. ``mnist:test``, ``mnist-sample:test``)."""
    if data_dir is None and ":" in name:
        dataset, split = name.split(":", 1)
        return load_split_as_shard(dataset, split)
    if data_dir is None and not Path(MANIFEST_NAME).is_file():
        path = Path(name)
        if len(path.parts) > 1 or path.suffix == ".npz":  # a shard file's path: say how to name it
            fix = f"name the directory and the shard apart: --data-dir {path.parent} {option} {path.stem}"
        else:
            fix = ("pass --data-dir DIR written by `fedctl partition`, or a dataset split such as "
                   f"{option} mnist-sample:test")
        raise ConfigError(f"{option} {name!r} names a shard of a partition directory, but no --data-dir was given "
                          "and the current directory is not one", fix)
    return load_shard(data_dir if data_dir is not None else Path("."), name)


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


def trainer_factory(backend: str, shard: Shard, device: str, threads: int | None) -> Callable[[ModelSpec], Trainer]:
    def make(spec: ModelSpec) -> Trainer:
        return create_trainer(backend, spec, shard.x, shard.y, device=device, threads=threads)

    return make


def make_evaluator(backend: str, spec: ModelSpec, shard: Shard, device: str = "cpu",
                   threads: int | None = None, task: Any = None) -> Callable[[Params], dict[str, float]]:
    """Centralised evaluation on ``shard``; the framework is imported here, only when evaluation is asked for."""
    trainer = create_trainer(backend, spec, shard.x, shard.y, device=device, threads=threads, task=task)
    return lambda weights: trainer.evaluate(weights)
