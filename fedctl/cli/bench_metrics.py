"""``fedctl bench metrics``: what serving and scraping ``/metrics``, with the dashboard open, costs a round
(docs/observability.md).

The deployment-shape cell of ``fedctl bench round`` (``fedctl serve`` and N worker processes, no-op training), run
in alternating pairs: without the metrics listener, then with ``--metrics-bind``, ``/metrics`` scraped every
``--every`` seconds and the dashboard's event stream held open and read (one viewer, as a browser tab). Results in
OUT/metrics_overhead.{json,md,png}; the ratio is the median of the pairs' ratios.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedctl.cli.simulate import console
from fedctl.fsio import atomic_write, check_writable_dir
from fedctl.models import MODELS
from fedctl.sim import round_bench as rb

GOAL = 1.05
"""Issue 15: a round with /metrics scraped every second and the dashboard open costs at most 1.05× one without."""


def write_report(out: Path, result: dict[str, Any]) -> None:
    atomic_write(out / "metrics_overhead.json", lambda fh: fh.write(json.dumps(result, indent=1).encode()))
    pairs = result["pairs"]
    lines = ["# Round cost with /metrics scraped and the dashboard open", "", result["environment"], "",
             f"`fedctl serve` + {result['workers']} worker processes, model {result['model']}, "
             f"{result['rounds']} rounds per run (round 1 left out), no-op training; with: `--metrics-bind` and "
             f"`/metrics` scraped every {result['every_s']:g} s and the dashboard's event stream held open and "
             "read. Pairs alternate (without, with).", "",
             "| pair | without s/round | with s/round | with ÷ without | scrapes | scrape ms (median / max) | "
             "dashboard updates read | broker CPU s/round without / with |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, p in enumerate(pairs, 1):
        w, m = p["without"], p["with"]
        lines.append(f"| {i} | {w['s_per_round']:.3f} | {m['s_per_round']:.3f} | {p['ratio']:.3f} | "
                     f"{m.get('scrapes', 0)} ({m.get('scrape_failures', 0)} failed) | "
                     f"{m.get('scrape_ms_median') or 0:.1f} / {m.get('scrape_ms_max') or 0:.1f} | "
                     f"{m.get('dashboard_updates', 0)} | "
                     f"{w['server_cpu_s_per_round']:.3f} / {m['server_cpu_s_per_round']:.3f} |")
    verdict = "met" if result["median_ratio"] <= GOAL else "not met"
    lines += ["", f"Median ratio: **{result['median_ratio']:.3f}** (goal ≤ {GOAL}: {verdict}).", "",
              f"Command: `{result['command']}`", ""]
    atomic_write(out / "metrics_overhead.md", lambda fh: fh.write("\n".join(lines).encode()))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = range(1, len(pairs) + 1)
    ax.bar([x - 0.2 for x in xs], [p["without"]["s_per_round"] for p in pairs], 0.4, label="without listener")
    ax.bar([x + 0.2 for x in xs], [p["with"]["s_per_round"] for p in pairs], 0.4,
           label=f"scraped every {result['every_s']:g} s, dashboard open")
    ax.set_xlabel("pair")
    ax.set_ylabel("s per round")
    ax.set_xticks(list(xs))
    ax.set_title(f"{result['workers']} workers, {result['model']}: median ratio {result['median_ratio']:.3f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "metrics_overhead.png", dpi=120)
    plt.close(fig)


@click.command("metrics")
@click.option("--workers", type=click.IntRange(min=1), default=100, show_default=True, help="Worker processes N.")
@click.option("--model", type=click.Choice(sorted(MODELS)), default="mlp", show_default=True, help="The model.")
@click.option("--rounds", type=click.IntRange(min=3), default=20, show_default=True, help="Rounds per run.")
@click.option("--pairs", type=click.IntRange(min=1), default=3, show_default=True,
              help="Alternating pairs of runs (without, with).")
@click.option("--every", type=click.FloatRange(min=0.05), default=1.0, show_default=True,
              help="Seconds between scrapes of /metrics.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("bench/results"),
              show_default=True, help="Directory for metrics_overhead.{json,md,png} and the runs' logs.")
def bench_metrics(workers: int, model: str, rounds: int, pairs: int, every: float, out: Path) -> None:
    """What serving and scraping /metrics costs a round: alternating runs without and with it."""
    check_writable_dir(out, "--out")
    plain = rb.RoundBench((workers,), (model,), rounds, None, False)
    scraped = replace(plain, scrape_every_s=every)
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        bar = progress.add_task("starting", total=rounds)

        def on_round(done: int) -> None:
            progress.update(bar, completed=done)

        for i in range(pairs):
            pair = {}
            for label, bench in (("without", plain), ("with", scraped)):
                progress.update(bar, description=f"pair {i + 1}/{pairs}: {label} /metrics", completed=0)
                cell = out / "runs" / "metrics" / f"{label}-{i}"
                figures = rb.run_fedctl(workers, model, bench, cell, on_round)
                if "s_per_round" not in figures:
                    raise click.ClickException(f"the run {label} /metrics did not finish: {figures.get('error')}; "
                                               f"see {cell}/serve.log")
                pair[label] = figures
            pair["ratio"] = pair["with"]["s_per_round"] / pair["without"]["s_per_round"]
            results.append(pair)
    result = {"environment": f"{time.strftime('%Y-%m-%d')} · {platform.machine()} · {os.cpu_count()} CPUs · "
                             f"Python {platform.python_version()}",
              "command": f"fedctl bench metrics --workers {workers} --model {model} --rounds {rounds} --pairs "
                         f"{pairs} --every {every:g}",
              "workers": workers, "model": model, "rounds": rounds, "every_s": every, "pairs": results,
              "median_ratio": statistics.median(p["ratio"] for p in results), "goal": GOAL}
    write_report(out, result)
    console.print(f"median ratio {result['median_ratio']:.3f} (goal ≤ {GOAL}); results in "
                  f"{out}/metrics_overhead.md (and .json, .png); {time.perf_counter() - started:.0f} s")
