"""``fedctl join``: take part in a federated run with one local shard."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
from pathlib import Path

import click

from fedctl.cli.common import check_endpoint, load_data, resolve_backend
from fedctl.cli.tasking import load_task_data, task_option, uses_task_loader, worker_spec
from fedctl.errors import ConfigError
from fedctl.fsio import check_writable_dir
from fedctl.security import check_join_security
from fedctl.tasks import load_task
from fedctl.wire.constants import MAX_ID_CHARS
from fedctl.worker.client import Worker, WorkerConfig, trainer_evaluator
from fedctl.worker.frameworks import create_trainer
from fedctl.worker.threads import worker_threads

log = logging.getLogger(__name__)


@click.command("join")
@task_option
@click.option("--connect", default="tcp://127.0.0.1:5555", show_default=True, help="The broker's endpoint.")
@click.option("--data", required=True,
              help="Shard name in --data-dir (e.g. shard3), DATASET:SPLIT, or the path of a local dataset: .npz "
                   "(arrays x, y), CSV/Parquet (a column named label, numeric features) or a folder with one "
                   "sub-folder of PNG/JPEG images per class.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory written by `fedctl partition`.")
@click.option("--holdout", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Fraction of the examples kept out of training for evaluation (seeded, stratified by class, the "
                   "same on every start). [default: 0.1 for a local dataset (--data PATH), 0 for a shard or a split]")
@click.option("--backend", type=click.Choice(["auto", "torch", "mxnet"]), default="auto", show_default=True,
              help="Framework that trains the model (auto: the first one installed).")
@click.option("--device", default="cpu", show_default=True, help="cpu or gpu:N.")
@click.option("--worker-id", default=None, help="Stable identity of this worker [default: DATA@HOSTNAME].")
@click.option("--threads", default="auto", show_default=True, metavar="auto|N",
              help="Framework CPU threads. auto: this machine's CPUs divided among the live `fedctl join` processes "
                   "of this user, at most those other processes left free, recounted every round (an explicit "
                   "OMP_NUM_THREADS wins); N: exactly N.")
@click.option("--connect-timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Give up if no broker answers within this many seconds.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the worker's state here (held model, compression residuals) so a restart resumes it.")
@click.option("--slowdown", type=click.FloatRange(min=1), default=1.0, show_default=True,
              help="Emulate a slower device (benchmarks): each update takes this many times longer.")
@click.option("--server-key", default=None, metavar="PATH|Z85",
              help="The broker's CURVE public key: its NAME.key file or the 40-character key it prints. "
                   "With --secret-key, the connection is encrypted and authenticated.")
@click.option("--secret-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="This worker's NAME.key_secret (`fedctl keygen`); its NAME.key must be in the broker's "
                   "--allowed-keys directory.")
def join_cmd(task_ref: str | None, connect: str, data: str, data_dir: Path | None, backend: str, device: str,
             worker_id: str | None, threads: str, connect_timeout: float, state_dir: Path | None, slowdown: float,
             server_key: str | None, secret_key: Path | None, holdout: float | None) -> None:
    """Join a run: pull the model, train on the local shard, push updates; exit when the broker says done."""
    check_endpoint(connect, "--connect", bind=False)
    curve = check_join_security(server_key, secret_key)  # bad keys fail before data and framework load
    if state_dir is not None:
        check_writable_dir(state_dir, "--state-dir")
    if len(worker_id or f"{data}@{socket.gethostname()}") > MAX_ID_CHARS:  # the broker would refuse the join
        raise ConfigError(f"the worker id ({'--worker-id' if worker_id else 'DATA@HOSTNAME'}) is longer than the "
                          f"{MAX_ID_CHARS} characters the protocol allows", "pass a shorter --worker-id")
    task = load_task(task_ref) if task_ref is not None else None
    shard = (load_task_data(task, data, holdout) if task is not None and uses_task_loader(task, data, data_dir)
             else load_data(data, data_dir, holdout=holdout))
    backend = resolve_backend(backend)
    spec = worker_spec(task) if task is not None else None  # sent with join: the broker checks it too
    config = WorkerConfig(connect=connect, worker_id=worker_id or f"{data}@{socket.gethostname()}",
                          backend=backend, num_examples=shard.num_examples, connect_timeout_s=connect_timeout,
                          state_dir=state_dir, slowdown=slowdown,
                          server_key=curve[0].decode("ascii") if curve else None, secret_key=secret_key,
                          spec=spec)
    budget = worker_threads(threads, os.environ)  # registers this process among the local workers
    make = functools.partial(create_trainer, backend, x=shard.x, y=shard.y, device=device, threads=budget,
                             task=task)
    # Build the framework once up front so a missing backend or GPU, or data that does not fit the task's model,
    # fails before contacting the broker.
    from fedctl.models import get_model

    create_trainer(backend, spec or get_model("mlp"), shard.x[:2], shard.y[:2], device=device, threads=budget,
                   task=task)
    log.info("worker %s: %d examples from %s, %s on %s", config.worker_id, shard.num_examples, shard.name,
             backend, device)
    log.info("%s CPU threads: %s", backend, budget.describe())
    evaluator = None  # federated evaluation (`fedctl serve --fed-eval-every`) on the held-out examples, if any
    if shard.holdout_x is not None and shard.holdout_y is not None and len(shard.holdout_y):
        evaluator = trainer_evaluator(functools.partial(make, x=shard.holdout_x, y=shard.holdout_y),
                                      len(shard.holdout_y))
        log.info("%d held-out examples for federated evaluation", len(shard.holdout_y))
    summary = asyncio.run(Worker(config, make, evaluator=evaluator).serve())
    click.echo(f"done: trained {summary['rounds_trained']} rounds; run finished at round {summary['final_round']}")
