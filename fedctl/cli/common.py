"""Shared CLI plumbing: logging setup and the evaluator/trainer factories the commands wire together."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from fedctl.data.shards import Shard, load_shard, load_split_as_shard
from fedctl.errors import ConfigError
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


def load_data(name: str, data_dir: Path | None) -> Shard:
    """A shard of a partition directory (``shard3``, ``test``) or, without --data-dir, a dataset split
    written as ``DATASET:SPLIT`` (e.g. ``mnist:test``, ``mnist-sample:test``)."""
    if data_dir is None and ":" in name:
        dataset, split = name.split(":", 1)
        return load_split_as_shard(dataset, split)
    return load_shard(data_dir if data_dir is not None else Path("."), name)


def check_endpoint(endpoint: str, option: str, bind: bool) -> str:
    """Refuse a tcp endpoint whose port is not a port: libzmq would silently take 99999 as 99999 % 65536.

    ``*`` (any free port) is accepted for ``--bind`` only; other transports are left to ZeroMQ.
    """
    if not endpoint.startswith("tcp://"):
        return endpoint
    host, sep, port = endpoint[len("tcp://"):].rpartition(":")
    example = "tcp://127.0.0.1:5555" + (", or tcp://127.0.0.1:* for any free port" if bind else "")
    if not sep or not host:
        raise ConfigError(f"{option} {endpoint!r} lacks HOST:PORT", f"pass e.g. {example}")
    if bind and port == "*":
        return endpoint
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{option} {endpoint!r}: port {port!r} is not a number in 1..65535", f"pass e.g. {example}")
    return endpoint


def resolve_backend(backend: str) -> str:
    return default_backend() if backend == "auto" else backend


def trainer_factory(backend: str, shard: Shard, device: str, threads: int | None) -> Callable[[ModelSpec], Trainer]:
    def make(spec: ModelSpec) -> Trainer:
        return create_trainer(backend, spec, shard.x, shard.y, device=device, threads=threads)

    return make


def make_evaluator(backend: str, spec: ModelSpec, shard: Shard, device: str = "cpu",
                   threads: int | None = None) -> Callable[[Params], dict[str, float]]:
    """Centralised evaluation on ``shard``; the framework is imported here, only when evaluation is asked for."""
    trainer = create_trainer(backend, spec, shard.x, shard.y, device=device, threads=threads)
    return lambda weights: trainer.evaluate(weights)
