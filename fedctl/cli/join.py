"""``fedctl join``: take part in a federated run with one local shard."""

from __future__ import annotations

from pathlib import Path

import click

from fedctl.api.joining import join
from fedctl.cli.options import class_list, metrics_options
from fedctl.cli.tasking import task_option


@click.command("join")
@task_option
@click.option("--connect", default="tcp://127.0.0.1:5555", show_default=True, help="The broker's endpoint.")
@click.option("--data", required=True,
              help="Shard name in --data-dir (e.g. shard3), DATASET:SPLIT, or the path of a local dataset: .npz "
                   "(arrays x, y), CSV/Parquet (a label column, numeric features) or a folder with one "
                   "sub-folder of PNG/JPEG images per class.")
@click.option("--label-column", default=None, metavar="NAME",
              help="--data PATH table: the label column.  [default: label]")
@click.option("--classes", default=None, callback=class_list, metavar="NAME,NAME,...",
              help="--data PATH: the run's class names in id order, the same on every worker (label values of a "
                   "table, sub-folder names of an image folder), so a data holder without some class numbers the "
                   "others as the rest do. [default: this dataset's names, sorted]")
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
@click.option("--compress", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              help="Updates sent to the broker through zlib: auto (only where this worker's measured link is slow "
                   "enough that the bytes saved outweigh deflating and inflating; docs/protocol.md §4.4), always "
                   "or never.")
@click.option("--server-key", default=None, metavar="PATH|Z85",
              help="The broker's CURVE public key: its NAME.key file or the 40-character key it prints. "
                   "With --secret-key, the connection is encrypted and authenticated.")
@click.option("--secret-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="This worker's NAME.key_secret (`fedctl keygen`); its NAME.key must be in the broker's "
                   "--allowed-keys directory.")
@metrics_options
def join_cmd(task_ref: str | None, connect: str, data: str, data_dir: Path | None, backend: str, device: str,
             worker_id: str | None, threads: str, connect_timeout: float, state_dir: Path | None, slowdown: float,
             server_key: str | None, secret_key: Path | None, holdout: float | None, label_column: str | None,
             classes: tuple[str, ...] | None, compress: str, metrics_bind: str | None, metrics_token: Path | None,
             metrics_insecure: bool) -> None:
    """Join a run: pull the model, train on the local shard, push updates; exit when the broker says done."""
    done = join(task_ref, data=data, connect=connect, data_dir=data_dir, holdout=holdout, backend=backend,
                device=device, worker_id=worker_id, threads=threads, connect_timeout=connect_timeout,
                state_dir=state_dir, slowdown=slowdown, server_key=server_key, secret_key=secret_key,
                label_column=label_column, classes=classes, compress=compress, metrics_bind=metrics_bind,
                metrics_token=metrics_token, metrics_insecure=metrics_insecure)
    click.echo(f"done: trained {done.rounds_trained} rounds; run finished at round {done.final_round}")
