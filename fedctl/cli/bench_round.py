"""``fedctl bench round``: round cost with the broker and every worker as separate processes, beside Flower 1.42
doing the same work in the same run; results in OUT/round.{json,md,png} (docs/results.md)."""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedctl.cli.simulate import console
from fedctl.fsio import check_writable_dir
from fedctl.models import MODELS
from fedctl.sim import round_bench as rb
from fedctl.sim.round_report import write_round_report


def _ints(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None


def _models(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise click.BadParameter(f"unknown model {unknown[0] if unknown else value!r}; choose from "
                                 f"{', '.join(sorted(MODELS))} (mlp is 437 KB, wide5m 5.2 MB)")
    return names


def _default_venv() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "fedctl" / "flwr-1.42.0"


@click.command("round")
@click.option("--workers", default="10,50,100", show_default=True, callback=_ints,
              help="Worker counts N, comma-separated; every worker trains every round.")
@click.option("--model", "models", default="mlp,wide5m", show_default=True, callback=_models,
              help="Models, comma-separated (mlp: 437 KB; wide5m: 5.2 MB; lenet5: 247 KB; 2nn: 797 KB; cnn: 6.7 MB).")
@click.option("--rounds", type=click.IntRange(min=3), default=20, show_default=True,
              help="Rounds per run; round 1 (connections, first allocations) is left out.")
@click.option("--processes", type=click.IntRange(min=1), default=None,
              help="fedctl worker processes [default: one per worker]; fewer puts several workers on one event "
                   "loop (the broker's overhead without the workers' cost, not a deployment shape; no Flower row).")
@click.option("--flower/--no-flower", default=True, show_default=True,
              help="Run Flower 1.42 with the same workload beside each fedctl cell.")
@click.option("--flower-venv", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Flower's own virtual environment, made and filled from PyPI on first use "
                   "[default: ~/.cache/fedctl/flwr-1.42.0].")
@click.option("--serve-opt", "serve_args", multiple=True, metavar="OPTION",
              help="An extra `fedctl serve` option for the fedctl runs (repeatable, e.g. --serve-opt=--history-mb=0).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("bench/results"),
              show_default=True, help="Directory for round.{json,md,png} and the runs' logs.")
def bench_round(workers: tuple[int, ...], models: tuple[str, ...], rounds: int, processes: int | None, flower: bool,
                flower_venv: Path | None, serve_args: tuple[str, ...], out: Path) -> None:
    """Round cost in the deployment shape: `fedctl serve` and N worker processes (no-op training: w + noise),
    beside Flower's gRPC server and N clients doing the same FedAvg in the same run. Reports s/round, server CPU
    and peak RSS, worker CPU and RSS, and wire bytes against the raw payload."""
    check_writable_dir(out, "--out")
    bench = rb.RoundBench(workers, models, rounds, processes, flower and processes is None,
                          tuple(a for s in serve_args for a in s.split("=", 1)))
    python = rb.ensure_flower(flower_venv or _default_venv(), console.print) if bench.flower else None
    env = (f"{time.strftime('%Y-%m-%d')} · {platform.machine()} · {os.cpu_count()} CPUs · Python "
           f"{platform.python_version()}")
    started = time.perf_counter()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        bar = progress.add_task("starting", total=rounds)

        def on_cell(title: str) -> None:
            progress.reset(bar, description=title, total=rounds)

        command = ("fedctl bench round " + " ".join(shlex.quote(a) for a in sys.argv[3:])).strip()

        def on_row(row: dict[str, Any]) -> None:  # the report grows cell by cell: a stopped run keeps its rows
            write_round_report(out, {"environment": env, "command": command, "rows": [row]})
            if row.get("error"):
                console.print(f"[yellow]{row['system']}, {row['workers']} workers, {row['model']}: {row['error']}")

        rb.run(bench, out, python, on_cell, lambda n: progress.update(bar, completed=n), on_row)
    click.echo(f"results in {out / 'round.md'} (and .json, .png); {time.perf_counter() - started:.0f} s")
