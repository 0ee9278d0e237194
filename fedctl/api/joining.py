"""A worker from Python: :class:`Participant` checks the options and loads the local data and the framework;
:func:`join` takes part in a run to its end, :func:`join_background` in a thread. ``fedctl join`` calls these."""

from __future__ import annotations

import functools
import itertools
import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedctl.api.background import Started, WorkerHandle, private_context, run_blocking
from fedctl.api.config import takes_parameters_of
from fedctl.api.results import JoinResult
from fedctl.data.shards import Shard, with_holdout
from fedctl.errors import ConfigError
from fedctl.fsio import check_writable_dir
from fedctl.models import get_model
from fedctl.security import check_join_security
from fedctl.tasks import Task, load_task
from fedctl.wire.constants import MAX_ID_CHARS
from fedctl.worker.client import Worker, WorkerConfig, trainer_evaluator
from fedctl.worker.frameworks import create_trainer
from fedctl.worker.threads import worker_threads

log = logging.getLogger(__name__)
PathLike = str | os.PathLike[str]
Data = PathLike | tuple[Any, Any]
_ARRAYS = itertools.count()


class Participant:
    """A worker ready to join a run: options checked, local data loaded, the framework built once on two examples
    (so data the model does not take fails here, before any broker is contacted).

    Parameters
    ----------
    task:
        The run's task (file, module or built-in name), the same as the broker's; None: a built-in model, which the
        broker names.
    data:
        The local examples: the path of a dataset (``.npz`` with arrays x and y, CSV/Parquet with a ``label``
        column, an image folder; or what the task's ``load_data(path)`` reads), a shard of a partition (its file,
        or its name in ``data_dir``: ``"shard3"``), a dataset split (``"mnist-sample:test"``), or a pair of arrays
        ``(x, y)`` (numpy, or anything ``numpy.asarray`` takes): features ``[n, ...]`` and integer labels ``[n]``.
    connect:
        The broker's endpoint (``serve_background(...).endpoint``).
    data_dir:
        A partition directory (``fedctl.partition``), for a shard name in ``data``.
    holdout:
        Fraction of the examples kept out of training for federated evaluation (default: 0.1 for a local dataset
        or arrays, 0 for a shard or a split).
    label_column:
        A CSV/Parquet dataset's label column (default ``"label"``).
    classes:
        The run's class names in id order, the same list on every worker (a table's label values, an image
        folder's sub-folder names), so that a data holder without some class still numbers the others as the
        rest do; default: the dataset's own names in sorted order (:func:`fedctl.data.local.with_classes`).
    backend, device, worker_id, threads, connect_timeout, state_dir, slowdown, server_key, secret_key, compress:
        As for ``fedctl join`` (``threads``: ``"auto"`` or a count; ``connect_timeout`` in seconds; ``compress``:
        ``"auto"``, ``"always"`` or ``"never"``).
    metrics_bind, metrics_token, metrics_insecure:
        Serve this worker's Prometheus metrics at ``http://HOST:PORT/metrics`` (docs/observability.md), as ``fedctl
        join --metrics-bind`` does; the bound URL is ``metrics_url`` once the worker runs.

    Raises
    ------
    ConfigError, DataError, BackendUnavailable
        An option, the data or the framework is wrong.
    """

    def __init__(self, task: PathLike | None = None, *, data: Data, connect: str = "tcp://127.0.0.1:5555",
                 data_dir: PathLike | None = None, holdout: float | None = None, backend: str = "auto",
                 device: str = "cpu", worker_id: str | None = None, threads: int | str = "auto",
                 connect_timeout: float = 60.0, state_dir: PathLike | None = None, slowdown: float = 1.0,
                 server_key: str | None = None, secret_key: PathLike | None = None, label_column: str | None = None,
                 classes: Sequence[str] | None = None, compress: str = "auto", metrics_bind: str | None = None,
                 metrics_token: PathLike | None = None, metrics_insecure: bool = False) -> None:
        from fedctl.api.inputs import check_endpoint, resolve_backend
        from fedctl.observe.bind import parse_http_bind

        check_endpoint(connect, "--connect", bind=False)
        self.metrics_bind = None if metrics_bind is None else parse_http_bind(
            metrics_bind, None if metrics_token is None else Path(metrics_token), metrics_insecure)
        self.metrics_url: str | None = None
        """``http://HOST:PORT`` of this worker's metrics listener once it listens (``metrics_bind``), else None."""
        curve = check_join_security(server_key, None if secret_key is None else Path(secret_key))
        if state_dir is not None:
            check_writable_dir(Path(state_dir), "--state-dir")
        name = worker_id or f"{_data_name(data)}@{socket.gethostname()}"
        if len(name) > MAX_ID_CHARS:  # the broker would refuse the join
            raise ConfigError(f"the worker id ({'--worker-id' if worker_id else 'DATA@HOSTNAME'}) is longer than the "
                              f"{MAX_ID_CHARS} characters the protocol allows", "pass a shorter --worker-id")
        self.task = load_task(os.fspath(task)) if task is not None else None
        self.shard = _local_data(self.task, data, data_dir, holdout, label_column, classes)
        backend = resolve_backend(backend)
        spec = _worker_spec(self.task)  # sent with join: the broker checks it too
        self.config = WorkerConfig(connect=connect, worker_id=name, backend=backend,
                                   num_examples=self.shard.num_examples, connect_timeout_s=connect_timeout,
                                   state_dir=None if state_dir is None else Path(state_dir), slowdown=slowdown,
                                   server_key=curve[0].decode("ascii") if curve else None,
                                   secret_key=None if secret_key is None else Path(secret_key), spec=spec,
                                   compress=compress, device=device)
        self._build(device, str(threads))

    def _build(self, device: str, threads: str) -> None:
        """The trainer factories; the framework built once up front, so a missing backend or GPU, or data that does
        not fit the task's model, fails before contacting the broker."""
        shard, task, backend = self.shard, self.task, self.config.backend
        self.budget = worker_threads(threads, os.environ)  # registers among this machine's workers while it lives
        self._make = functools.partial(create_trainer, backend, x=shard.x, y=shard.y, device=device,
                                       threads=self.budget, task=task)
        create_trainer(backend, self.config.spec or get_model("mlp"), shard.x[:2], shard.y[:2], device=device,
                       threads=self.budget, task=task)
        log.info("worker %s: %d examples from %s, %s on %s", self.config.worker_id, shard.num_examples, shard.name,
                 backend, device)
        log.info("%s CPU threads: %s", backend, self.budget.describe())
        self._evaluator = None  # federated evaluation (`fedctl serve --fed-eval-every`) on the held-out examples
        if shard.holdout_x is not None and shard.holdout_y is not None and len(shard.holdout_y):
            self._evaluator = trainer_evaluator(functools.partial(self._make, x=shard.holdout_x, y=shard.holdout_y),
                                                len(shard.holdout_y))
            log.info("%d held-out examples for federated evaluation", len(shard.holdout_y))

    async def _main(self, started: Started) -> JoinResult:
        async with private_context() as ctx:
            worker = Worker(self.config, self._make, ctx=ctx, evaluator=self._evaluator)
            listener = None
            try:
                if self.metrics_bind is not None:
                    from fedctl.observe.http import MetricsServer  # (aiohttp: only when asked for)
                    from fedctl.observe.worker_metrics import worker_registry

                    listener = MetricsServer(worker_registry(worker), self.metrics_bind)
                    self.metrics_url = await listener.start()
                started(None)
                summary = await worker.serve()
            finally:
                if listener is not None:
                    await listener.stop()
        return JoinResult(self.config.worker_id, int(summary["rounds_trained"]), int(summary["final_round"]),
                          int(summary["version"]), int(summary["bytes_in"]), int(summary["bytes_out"]))

    def run(self) -> JoinResult:
        """Join the broker and take part until it says the run is complete (waiting up to ``connect_timeout`` for it
        to answer; a restarted broker is joined again)."""
        return run_blocking(self._main, f"fedctl-worker-{self.config.worker_id}")

    def start(self) -> WorkerHandle:
        """Take part in a background thread; ``wait()`` returns the :class:`~fedctl.api.results.JoinResult`."""
        return WorkerHandle(self._main, f"fedctl-worker-{self.config.worker_id}")


def _data_name(data: Data) -> str:
    if isinstance(data, tuple):
        return f"arrays{next(_ARRAYS)}"
    return os.fspath(data)


def _worker_spec(task: Task | None) -> Any:
    from fedctl.api.tasking import worker_spec

    return worker_spec(task) if task is not None else None


def _local_data(task: Task | None, data: Data, data_dir: PathLike | None, holdout: float | None,
                label_column: str | None, classes: Sequence[str] | None) -> Shard:
    """The worker's examples: arrays as they are, the task's ``load_data(path)``, or fedctl's loaders."""
    from fedctl.api.inputs import LOCAL_HOLDOUT, load_data
    from fedctl.api.tasking import load_task_data, uses_task_loader

    given = [flag for flag, value in (("--label-column", label_column), ("--classes", classes)) if value is not None]
    if isinstance(data, tuple) and given:
        raise ConfigError(f"{given[0]} applies to a dataset file or folder, not to arrays",
                          "pass the arrays' labels as class ids 0..C-1")
    if isinstance(data, tuple):
        return with_holdout(arrays_shard(data), LOCAL_HOLDOUT if holdout is None else holdout, seed=0)
    path, directory = os.fspath(data), None if data_dir is None else Path(data_dir)
    if task is not None and uses_task_loader(task, path, directory):
        if given:
            raise ConfigError(f"{given[0]} applies to the datasets fedctl reads, not to task {task.name}'s "
                              "load_data()", f"drop {given[0]}: your load_data(path) returns the labels")
        return load_task_data(task, path, holdout)  # type: ignore[no-any-return]
    return load_data(path, directory, holdout=holdout, label_column=label_column, classes=classes)


def arrays_shard(data: tuple[Any, Any]) -> Shard:
    """``(x, y)`` as a shard: x float32 ``[n, ...]``, y int64 ``[n]``; ConfigError when they do not pair up."""
    if len(data) != 2:
        raise ConfigError(f"data=(...) holds {len(data)} items, not (x, y)", "pass data=(features, labels)")
    x, y = (np.asarray(a) for a in data)
    if y.ndim != 1 or x.ndim < 1 or len(x) != len(y) or not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"data=(x, y): {len(x) if x.ndim else 0} examples of shape {x.shape[1:]} and labels of "
                          f"shape {y.shape} ({y.dtype})", "pass features [n, ...] and one integer label per example")
    if len(y) == 0:
        raise ConfigError("data=(x, y) holds no examples", "pass a non-empty dataset")
    if y.min() < 0:
        raise ConfigError(f"data=(x, y): label {int(y.min())} is negative", "pass labels 0..C-1")
    classes = tuple(str(c) for c in range(int(y.max()) + 1))
    return Shard("arrays", "arrays", np.ascontiguousarray(x, dtype=np.float32), y.astype(np.int64), len(y), classes)


@takes_parameters_of(Participant)
def join(*args: Any, **kwargs: Any) -> JoinResult:
    """Take part in a run until the broker says it is complete and return the
    :class:`~fedctl.api.results.JoinResult` (parameters: those of :class:`Participant`).

    >>> fedctl.join(task="my_task.py", data="hospital3.csv", connect="tcp://127.0.0.1:5555")  # doctest: +SKIP
    """
    return Participant(*args, **kwargs).run()


@takes_parameters_of(Participant)
def join_background(*args: Any, **kwargs: Any) -> WorkerHandle:
    """Take part in a run from a background thread (parameters: those of :class:`Participant`); the handle's
    ``wait(timeout)`` returns the :class:`~fedctl.api.results.JoinResult`, ``stop()`` makes the worker leave."""
    return Participant(*args, **kwargs).start()


__all__ = ["Participant", "arrays_shard", "join", "join_background"]
