"""``fedctl simulate``: one broker and K virtual workers in this process, on the deployment code path."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fedctl.api import simulation as api
from fedctl.broker.config import BrokerConfig
from fedctl.cli.options import dp_phrase, run_options
from fedctl.cli.tasking import model_given, task_option
from fedctl.data.datasets import DATASETS
from fedctl.sim.runner import SimConfig
from fedctl.tasks import Task

console = Console(stderr=True)


def ensure_partition(data_dir: Path | None, dataset: str, clients: int, shards_per_client: int | None,
                     source_dir: Path | None, seed: int, cache_root: Path, dirichlet: float | None = None) -> Path:
    """Use ``data_dir`` if given, else partition the dataset once into ``cache_root`` and reuse it (announced on
    the console)."""
    return api.ensure_partition(data_dir, dataset, clients, shards_per_client, source_dir, seed, cache_root,
                                announce=console.print, dirichlet=dirichlet)


def quiet_workers() -> None:
    """A hundred virtual workers logging every round drown the progress display: keep their warnings only."""
    if logging.getLogger().level > logging.DEBUG:
        for name in ("fedctl.worker", "fedctl.broker"):
            logging.getLogger(name).setLevel(logging.WARNING)


@contextmanager
def progress_bar(rounds: int, title: str) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A progress display (round, accuracy, ETA) while the block runs; yields the ``on_round`` that updates it."""
    with Progress(TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[acc]}"),
                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                  transient=False) as progress:
        bar = progress.add_task("rounds", total=rounds, acc="starting")

        def on_round(rec: dict[str, Any]) -> None:
            acc = rec.get("test_accuracy")
            progress.update(bar, completed=rec["round"],
                            acc=progress.tasks[bar].fields["acc"] if acc is None else f"accuracy {acc:.4f}")

        yield on_round


def run_with_progress(config: BrokerConfig, sim: SimConfig, eval_backend: str, title: str,
                      task: Task | None = None) -> tuple[dict, float]:
    """Simulate with a progress bar (round, accuracy, ETA); returns the summary and wall seconds. A user ``task``
    is evaluated on the partition's test shard when it has one."""
    evaluator, model = api.simulation_model(config, sim, eval_backend, task)
    with progress_bar(config.rounds, title) as on_round:
        return api.run_simulation(config, sim, evaluator, model, task, on_round)


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
@click.option("--dirichlet", type=click.FloatRange(min=0, min_open=True), default=None, metavar="ALPHA",
              help="Non-IID partition with Dirichlet(ALPHA) label skew (Hsu et al.; 0.1: a few classes per client).")
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
@click.option("--ray", "ray_address", default=None, metavar="auto|HOST:PORT",
              help="Host the virtual workers as Ray actors on this running cluster (`ray start --head` makes one "
                   "here: then auto); the broker stays in this process. Needs fedctl[ray].")
@click.option("--ray-workers-per-actor", type=click.IntRange(min=1), default=25, show_default=True,
              help="Virtual workers each Ray actor hosts.")
@click.option("--ray-cpus", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="CPUs Ray reserves for each actor (its training threads: this, rounded down, at least 1).")
@click.option("--ray-gpus", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="GPUs per actor; a fraction shares one GPU among actors (their workers train on it).")
def simulate_cmd(data_dir: Path | None, dataset: str, source_dir: Path | None, clients: int,
                 shards_per_client: int | None, dirichlet: float | None,
                 workers: int | None, backend: str, parallel: int, transport: str,
                 slow_fraction: float, slowdown: float, delay_s: float, holdout: float | None,
                 ray_address: str | None, ray_workers_per_actor: int, ray_cpus: float, ray_gpus: float,
                 task_ref: str | None, **run: Any) -> None:
    """Run a federation of many virtual workers in this process (same broker, worker, sockets and codec as
    `fedctl serve` + `fedctl join`). Ctrl-C stops it; the same command resumes from --state-dir."""
    quiet_workers()
    model = run.pop("model")
    given = model_given(click.get_current_context())
    simulation = api.Simulation(task_ref, data=data_dir, model=model if given else None, dataset=dataset,
                                source_dir=source_dir, clients=clients, shards_per_client=shards_per_client,
                                dirichlet=dirichlet,
                                workers=workers, backend=backend, parallel=parallel, transport=transport,
                                slow_fraction=slow_fraction, slowdown=slowdown, delay=delay_s, holdout=holdout,
                                ray=ray_address, ray_workers_per_actor=ray_workers_per_actor, ray_cpus=ray_cpus,
                                ray_gpus=ray_gpus, on_partition=console.print, **run)
    config = simulation.config
    try:
        with progress_bar(config.rounds, f"{config.model} {config.strategy}") as on_round:
            done = simulation.run(on_round)
    except KeyboardInterrupt:
        click.echo(f"interrupted; the completed rounds are saved in {config.state_dir} — run the same command "
                   "again to resume", err=True)
        sys.exit(130)
    summary, wall = done.summary, done.wall_s or 0.0
    last = summary["last"]
    acc = last.get("test_accuracy") if last else None
    click.echo(f"simulated {summary['workers']} workers ({summary['workers_that_trained']} trained): "
               f"{summary['rounds']} rounds" + (f", test accuracy {acc:.4f}" if acc is not None else "")
               + dp_phrase(summary)
               + (f" in {summary['ray']['actors']} Ray actors" if summary.get("ray") else "")
               + f", {wall:.0f} s, peak RSS {summary['peak_rss_mb']:.0f} MiB; metrics in "
               f"{config.state_dir}/metrics.jsonl")
