"""``fedctl demo``: a real local federation — bundled MNIST sample, one broker, worker processes on loopback."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedctl.api.inputs import make_evaluator
from fedctl.api.tasking import broker_model, resolve_task
from fedctl.broker.config import BrokerConfig
from fedctl.broker.policy import SyncConfig
from fedctl.broker.service import Broker
from fedctl.cli.options import fed_eval_options
from fedctl.cli.tasking import model_given, task_option
from fedctl.data.partition import write_partition
from fedctl.data.shards import load_shard
from fedctl.errors import BackendUnavailable, ConfigError, FedctlError
from fedctl.fsio import check_writable_dir
from fedctl.models import get_model
from fedctl.strategies import TaskConfig, strategy_names
from fedctl.tasks import Task
from fedctl.worker.frameworks import BACKENDS, available_backends

console = Console(stderr=False)
DEMO_HOLDOUT = 0.1
"""With --fed-eval-every, each worker keeps this fraction of its shard for federated evaluation (join --holdout)."""


def _spawn_workers(endpoint: str, data_dir: Path, log_dir: Path, backends: list[str],
                   task: Task, holdout: float = 0.0) -> list[subprocess.Popen]:
    procs = []
    shards = sorted(p.stem for p in data_dir.glob("shard*.npz"))
    for i, shard in enumerate(sorted(shards, key=lambda s: int(s[5:]))):
        backend = backends[i % len(backends)]
        log = open(log_dir / f"worker{i}-{backend}.log", "w")  # noqa: SIM115 - lives as long as the process
        cmd = [sys.executable, "-m", "fedctl", "join", "--connect", endpoint, "--data", shard, "--data-dir",
               str(data_dir), "--backend", backend, "--worker-id", f"demo-{i}-{backend}",
               "--connect-timeout", "30", *([] if task.is_builtin else ["--task", str(Path(task.ref).resolve())
                                                                           if task.ref.endswith(".py") else task.ref]),
               *(["--holdout", f"{holdout:g}"] if holdout else [])]
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env()))
    return procs


def _env() -> dict[str, str]:
    import os

    # No OMP_NUM_THREADS here: `fedctl join --threads auto` shares the CPUs among the workers by itself.
    return {**os.environ, "FEDCTL_PLAIN_LOGS": "1"}


async def _run_broker(config: BrokerConfig, evaluator: Any, data_dir: Path, log_dir: Path,
                      backends: list[str], task: Task,
                      model: tuple[Any, Any] | None) -> tuple[dict[str, Any], list[subprocess.Popen]]:
    with Progress(TextColumn("[bold]federated rounds"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console) as progress:
        bar = progress.add_task("rounds", total=config.rounds, status="waiting for workers")

        def on_round(rec: dict[str, Any]) -> None:
            progress.console.print(
                f"round {rec['round']:>3}  accuracy {rec['test_accuracy']:.4f}  loss {rec['test_loss']:.4f}  "
                f"{rec['participants']} workers  up {rec['bytes_in'] / 1e6:.1f} MB  "
                f"down {rec['bytes_out'] / 1e6:.1f} MB  {rec['duration_s']:.2f} s"
                + (f"  fed-eval accuracy {rec['fed_eval_accuracy']:.4f} on {rec['fed_eval_examples']} held out"
                   if rec.get("fed_eval_accuracy") is not None else ""))
            progress.update(bar, advance=1, status=f"accuracy {rec['test_accuracy']:.4f}")

        broker = Broker(config, evaluator, on_round=on_round, model=model)
        procs = _spawn_workers(broker.endpoint, data_dir, log_dir, backends, task,
                               DEMO_HOLDOUT if config.fed_eval_every else 0.0)
        return await broker.run(), procs


@click.command("demo")
@click.option("--workers", type=click.IntRange(min=1, max=50), default=5, show_default=True,
              help="Worker processes, each with its own shard of the sample (IID unless --dirichlet).")
@click.option("--dirichlet", type=click.FloatRange(min=0, min_open=True), default=None, metavar="ALPHA",
              help="Give the workers non-IID shards: Dirichlet(ALPHA) label skew (0.1: a few classes each).")
@click.option("--rounds", type=click.IntRange(min=1), default=8, show_default=True, help="Federated rounds.")
@click.option("--model", type=click.Choice(["mlp", "lenet5", "2nn", "cnn"]), default="mlp", show_default=True,
              help="The model the workers train.")
@click.option("--strategy", type=click.Choice(strategy_names()), default="fedavg", show_default=True,
              help="The algorithm (`fedctl strategies` lists them).")
@click.option("--epochs", "-E", type=click.IntRange(min=1), default=1, show_default=True, help="Local epochs E.")
@click.option("--batch-size", "-B", type=click.IntRange(min=0), default=10, show_default=True,
              help="Local batch size B (0 = the whole shard).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.1, show_default=True,
              help="Learning rate η.")
@click.option("--backends", default="auto", show_default=True,
              help="Comma-separated backends the workers cycle through; auto = every installed framework.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where data, logs and the run state go [default: runs/demo-TIMESTAMP].")
@task_option
@fed_eval_options
def demo_cmd(workers: int, dirichlet: float | None, rounds: int, model: str, strategy: str, epochs: int,
             batch_size: int, lr: float,
             backends: str, out: Path | None, task_ref: str | None, fed_eval_every: int = 0,
             fed_eval_fraction: float = 1.0) -> None:
    """Run a complete federation on this machine: partition the bundled MNIST sample, start a broker and
    WORKERS worker processes over TCP loopback, train, and print accuracy per round and a summary."""
    if logging.getLogger().level > logging.DEBUG:  # the progress display replaces the broker's round log
        logging.getLogger("fedctl.broker").setLevel(logging.WARNING)
    task = resolve_task(task_ref, model, model_given(click.get_current_context()))
    model = task.name
    chosen = _backends(backends)
    if not task.is_builtin:  # a user task trains on the frameworks it defines a model for
        can = {"torch": task.model is not None, "mxnet": task.gluon_model is not None}
        refused = [b for b in chosen if not can.get(b, False)]
        if backends != "auto" and refused:
            fn = "model()" if refused[0] == "torch" else "gluon_model()"
            raise ConfigError(f"task {task.name} defines no {fn}; --backends {refused[0]} cannot train it",
                              "pass --backends with the frameworks the task defines a model for (docs/tasks.md)")
        chosen = [b for b in chosen if can.get(b, False)] or ["torch"]
    out = out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    # Every input is checked before the first file is written.
    config = BrokerConfig(bind="tcp://127.0.0.1:*", model=model, strategy=strategy, rounds=rounds,
                          task=TaskConfig(epochs, batch_size, lr), sync=SyncConfig(1.0, workers, 60.0),
                          state_dir=out / "state", done_linger_s=5.0, fed_eval_every=fed_eval_every,
                          fed_eval_fraction=fed_eval_fraction)
    check_writable_dir(out, "--out")
    data_dir, log_dir = out / "data", out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]fedctl demo[/]: {workers} workers ({', '.join(chosen)}"
                  f"{'' if dirichlet is None else f'; Dirichlet({dirichlet:g}) shards'}), model {model}, {strategy}, "
                  f"{rounds} rounds, E={epochs} B={batch_size} η={lr}; files in {out}")
    write_partition("mnist-sample", data_dir, clients=workers, scheme="iid" if dirichlet is None else "dirichlet",
                    alpha=dirichlet, seed=0)
    built = broker_model(task, config.seed)
    evaluator = make_evaluator(chosen[0], get_model(model) if built is None else built[0],
                               load_shard(data_dir, "test"), threads=1, task=task)
    started = time.perf_counter()
    summary, procs = asyncio.run(_run_broker(config, evaluator, data_dir, log_dir, chosen, task, built))
    codes = [p.wait(timeout=30) for p in procs]
    _summary(summary, codes, time.perf_counter() - started, out)
    if any(codes):
        raise FedctlError(f"{sum(1 for c in codes if c)} worker(s) exited with an error",
                          f"see the logs in {log_dir}")


def _backends(option: str) -> list[str]:
    """The backends named by --backends (auto: every installed one), each known and installed."""
    installed = available_backends()
    if option == "auto":
        if not installed:
            raise BackendUnavailable("no deep-learning framework is installed",
                                     "pip install 'fedctl[torch]' or run make install")
        return installed
    chosen = [b.strip() for b in option.split(",") if b.strip()]
    if not chosen:
        raise ConfigError(f"--backends {option!r} names no backend", "pass e.g. --backends torch, or auto")
    for name in chosen:
        if name not in BACKENDS:
            raise ConfigError(f"--backends: unknown backend {name!r}",
                              f"choose from: {', '.join(sorted(BACKENDS))}, or auto")
        if name not in installed:
            raise BackendUnavailable(f"--backends: {name} is not installed",
                                     f"{BACKENDS[name].fix}, or leave it out (installed: "
                                     f"{', '.join(installed) or 'none'})")
    return chosen


def _summary(summary: dict[str, Any], codes: list[int], elapsed: float, out: Path) -> None:
    last = summary["last"]
    table = Table(title="fedctl demo: summary", show_header=False)
    table.add_row("rounds", str(summary["rounds"]))
    table.add_row("final test accuracy", f"{last['test_accuracy']:.4f}")
    table.add_row("final test loss", f"{last['test_loss']:.4f}")
    table.add_row("workers exited 0", f"{codes.count(0)}/{len(codes)}")
    table.add_row("wall time", f"{elapsed:.1f} s")
    table.add_row("metrics", str(out / "state" / "metrics.jsonl"))
    console.print(table)
