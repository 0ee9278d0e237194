"""``fedctl simulate``: one broker and K virtual workers in this process, on the deployment code path."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fedctl.broker.config import BrokerConfig
from fedctl.broker.store import Checkpointer
from fedctl.cli.common import make_evaluator, missing_dataset_fix, resolve_backend
from fedctl.cli.options import broker_config, run_options
from fedctl.cli.tasking import broker_model, model_given, resolve_task, task_option
from fedctl.data.datasets import DATASETS
from fedctl.data.partition import write_partition
from fedctl.data.shards import list_shards, load_shard
from fedctl.errors import ConfigError
from fedctl.fsio import check_writable_dir, removed_if_empty_on_error
from fedctl.models import get_model
from fedctl.sim.runner import SimConfig, simulate
from fedctl.tasks import Task

log = logging.getLogger(__name__)
console = Console(stderr=True)


def ensure_partition(data_dir: Path | None, dataset: str, clients: int, shards_per_client: int | None,
                     source_dir: Path | None, seed: int, cache_root: Path) -> Path:
    """Use ``data_dir`` if given, else partition the dataset once into ``cache_root`` and reuse it."""
    if data_dir is not None:
        return data_dir
    scheme = "iid" if shards_per_client is None else f"shards{shards_per_client}"
    out = cache_root / f"{dataset}-{clients}-{scheme}-seed{seed}"
    if not (out / "manifest.json").is_file():
        announced: list[bool] = []

        def announce(done: int, total: int) -> None:  # once the data is loaded and cut: a mistake prints nothing
            if not announced:
                announced.append(True)
                console.print(f"partitioning {dataset} into {clients} clients ({scheme}) → {out}")

        write_partition(dataset, out, clients=clients, scheme="iid" if shards_per_client is None else "shards",
                        shards_per_client=shards_per_client, seed=seed, source_dir=source_dir, on_progress=announce)
    return out


def quiet_workers() -> None:
    """A hundred virtual workers logging every round drown the progress display: keep their warnings only."""
    if logging.getLogger().level > logging.DEBUG:
        for name in ("fedctl.worker", "fedctl.broker"):
            logging.getLogger(name).setLevel(logging.WARNING)


def run_with_progress(config: BrokerConfig, sim: SimConfig, eval_backend: str, title: str,
                      task: Task | None = None) -> tuple[dict, float]:
    """Simulate with a progress bar (round, accuracy, ETA); returns the summary and wall seconds. A user ``task``
    is evaluated on the partition's test shard when it has one."""
    model = broker_model(task, config.seed) if task is not None else None
    evaluator = None
    if model is None:
        evaluator = make_evaluator(resolve_backend(eval_backend), get_model(config.model),
                                   load_shard(sim.data_dir, "test"), threads=1)
    elif "test" in list_shards(sim.data_dir, include_test=True):
        evaluator = make_evaluator("torch", model[0], load_shard(sim.data_dir, "test"), threads=1, task=task)
    with Progress(TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[acc]}"),
                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                  transient=False) as progress:
        bar = progress.add_task("rounds", total=config.rounds, acc="starting")

        def on_round(rec: dict[str, Any]) -> None:
            acc = rec.get("test_accuracy")
            progress.update(bar, completed=rec["round"],
                            acc=progress.tasks[bar].fields["acc"] if acc is None else f"accuracy {acc:.4f}")

        started = time.perf_counter()
        summary = asyncio.run(simulate(config, sim, evaluator, on_round=on_round, task=task, model=model))
    return summary, time.perf_counter() - started


@click.command("simulate")
@run_options
@task_option
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="A partition from `fedctl partition`; otherwise one is made from --dataset and cached.")
@click.option("--dataset", type=click.Choice(list(DATASETS)), default="mnist", show_default=True,
              help="Dataset to partition when no --data-dir is given (mnist-sample ships with fedctl).")
@click.option("--source-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory holding the dataset's four IDX files (.gz or raw); otherwise searched in "
                   "$FEDCTL_DATA_DIR/<dataset>, system packages and ~/.cache/fedctl/<dataset>.")
@click.option("--clients", type=click.IntRange(min=1), default=100, show_default=True,
              help="Clients (shards) of the partition made from --dataset.")
@click.option("--shards-per-client", type=click.IntRange(min=1), default=None,
              help="Non-IID partition (McMahan et al.); IID when absent.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Virtual workers [default: one per shard].")
@click.option("--backend", type=click.Choice(["auto", "torch", "mxnet"]), default="auto", show_default=True,
              help="Framework the virtual workers train with (auto: the first one installed).")
@click.option("--parallel", type=click.IntRange(min=1), default=2, show_default=True,
              help="Training threads shared by the virtual workers.")
@click.option("--transport", type=click.Choice(["tcp", "inproc"]), default="tcp", show_default=True,
              help="tcp: real loopback sockets, as in a deployment; inproc: in-process ZeroMQ, less overhead.")
@click.option("--slow-fraction", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Emulate heterogeneous devices: this fraction of the workers is --slowdown times slower.")
@click.option("--slowdown", type=click.FloatRange(min=1), default=1.0, show_default=True,
              help="How many times slower the --slow-fraction workers are.")
@click.option("--delay", "delay_s", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Emulated device seconds added to every update (before the slowdown factor).")
@click.option("--holdout", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Fraction of each shard kept out of training, on which the workers evaluate the model for "
                   "--fed-eval-every [default: 0.1 with --fed-eval-every, else 0].")
def simulate_cmd(data_dir: Path | None, dataset: str, source_dir: Path | None, clients: int,
                 shards_per_client: int | None, workers: int | None, backend: str, parallel: int, transport: str,
                 slow_fraction: float, slowdown: float, delay_s: float, holdout: float | None, task_ref: str | None,
                 **run: Any) -> None:
    """Run a federation of many virtual workers in this process (same broker, worker, sockets and codec as
    `fedctl serve` + `fedctl join`). Ctrl-C stops it; the same command resumes from --state-dir."""
    quiet_workers()
    task = resolve_task(task_ref, run["model"], model_given(click.get_current_context()))
    run["model"] = task.name
    if not task.is_builtin and backend not in ("auto", "torch"):
        raise ConfigError(f"task {task.name} is a PyTorch task; --backend {backend} cannot train it",
                          "pass --backend torch")
    config = broker_config(run, done_linger_s=2.0)
    check_writable_dir(config.state_dir, "--state-dir")  # the partition cache goes beside it
    Checkpointer(config.state_dir).check_resumable(config.model, config.strategy)  # before any display starts
    with missing_dataset_fix(has_download=False):
        data = ensure_partition(data_dir, dataset, clients, shards_per_client, source_dir, config.seed,
                                Path(config.state_dir).parent / "partitions")
    shards = len(list_shards(data))  # a bad partition fails here, before the progress display starts
    if workers is not None and workers > shards:
        raise ConfigError(f"--workers {workers} is more than the {shards} shards of {data}",
                          f"pass --workers {shards} or fewer, or a partition with more clients")
    sim = SimConfig(data, workers, resolve_backend(backend), parallel=parallel, transport=transport,
                    slow_fraction=slow_fraction, slowdown=slowdown, delay_s=delay_s,
                    holdout=holdout if holdout is not None else (0.1 if config.fed_eval_every else 0.0))
    try:
        with removed_if_empty_on_error(config.state_dir):
            summary, wall = run_with_progress(config, sim, backend, f"{config.model} {config.strategy}",
                                              None if task.is_builtin else task)
    except KeyboardInterrupt:
        click.echo(f"interrupted; the completed rounds are saved in {config.state_dir} — run the same command "
                   "again to resume", err=True)
        sys.exit(130)
    last = summary["last"]
    acc = last.get("test_accuracy") if last else None
    (Path(config.state_dir) / "simulate.json").write_text(json.dumps({**summary, "wall_s": wall}, indent=1))
    click.echo(f"simulated {summary['workers']} workers ({summary['workers_that_trained']} trained): "
               f"{summary['rounds']} rounds" + (f", test accuracy {acc:.4f}" if acc is not None else "")
               + f", {wall:.0f} s, peak RSS {summary['peak_rss_mb']:.0f} MiB; metrics in "
               f"{config.state_dir}/metrics.jsonl")
