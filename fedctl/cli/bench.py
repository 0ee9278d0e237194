"""``fedctl bench``: experiments that write JSON, markdown and PNG results (``fedctl bench fl --preset ...``)."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from fedctl.api.inputs import missing_dataset_fix
from fedctl.broker.config import BrokerConfig
from fedctl.broker.policy import SyncConfig
from fedctl.broker.store import Checkpointer
from fedctl.cli.bench_metrics import bench_metrics
from fedctl.cli.bench_noniid import bench_noniid
from fedctl.cli.bench_policies import bench_heartbeat, bench_policies
from fedctl.cli.bench_privacy import bench_privacy
from fedctl.cli.bench_round import bench_round
from fedctl.cli.simulate import console, ensure_partition, quiet_workers, run_with_progress
from fedctl.data.datasets import DATASETS
from fedctl.data.shards import read_manifest
from fedctl.errors import ConfigError, FedctlError
from fedctl.fsio import check_writable_dir
from fedctl.sim.baseline import run_centralized
from fedctl.sim.metrics import summarize, summarize_centralized
from fedctl.sim.presets import PRESETS, Preset, get_preset
from fedctl.sim.report import merge_results, write_report
from fedctl.sim.runner import SimConfig
from fedctl.strategies import TaskConfig

log = logging.getLogger(__name__)


def _row(p: Preset, records: list[dict[str, Any]], summary: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    return {"preset": p.name, "label": p.label(), "model": p.model, "strategy": p.strategy, "epochs": p.epochs,
            "batch_size": p.batch_size, "fraction": p.fraction, "lr": p.lr, "partition": p.partition,
            "target": p.target, "paper_rounds": p.paper_rounds, "paper_note": p.paper_note,
            "command": f"fedctl bench fl --preset {p.name}", "records": records, "summary": summary, **extra}


def run_central(p: Preset, source_dir: Path | None, max_epochs: int, parallel: int) -> dict[str, Any]:
    with console.status(f"[bold]{p.name}[/]: centralised SGD") as status:
        def on_eval(rec: dict[str, Any]) -> None:
            status.update(f"[bold]{p.name}[/]: epoch {rec['epoch']:.2f}  accuracy {rec['test_accuracy']:.4f}")

        records = run_centralized(p.model, p.dataset, source_dir, batch_size=p.batch_size, lr=p.lr,
                                  max_epochs=max_epochs, target=p.target, threads=parallel, on_eval=on_eval,
                                  lr_decay=p.lr_decay)
    return _row(p, records, summarize_centralized(records, p.target), {"peak_rss_mb": None, "workers": 1})


def run_federated(p: Preset, out: Path, source_dir: Path | None, max_rounds: int, parallel: int,
                  stop_at_target: bool) -> dict[str, Any]:
    data = ensure_partition(None, p.dataset, p.clients, p.shards_per_client, source_dir, 0, out / "partitions",
                            dirichlet=p.dirichlet)
    sampled = max(math.floor(p.fraction * p.clients + 1e-9), 1)
    state = out / "runs" / p.name
    config = BrokerConfig(model=p.model, strategy=p.strategy, rounds=max_rounds,
                          task=TaskConfig(p.epochs, p.batch_size, p.lr, p.lr_decay, dict(p.options)),
                          sync=SyncConfig(p.fraction, sampled, 900.0),
                          seed=0, state_dir=state, eval_every=p.eval_every,
                          target_accuracy=p.target if stop_at_target else None, done_linger_s=2.0)
    summary, _ = run_with_progress(config, SimConfig(data, backend="torch", parallel=parallel), "torch", p.name)
    records = Checkpointer(state).read_metrics()
    return _row(p, records, summarize(records, p.target, p.fraction, p.epochs),
                {"peak_rss_mb": summary["peak_rss_mb"], "workers": summary["workers"],
                 "dataset": read_manifest(data).get("dataset")})


def _lr_grid(ctx: click.Context, param: click.Parameter, text: str | None) -> tuple[float, ...] | None:
    """``--lr-grid 0.05,0.1,0.2``: two or more distinct rates above 0, in increasing order."""
    if text is None:
        return None
    try:
        grid = tuple(sorted({float(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers; pass e.g. 0.05,0.1,0.2") \
            from None
    if len(grid) < 2 or not all(math.isfinite(g) and g > 0 for g in grid):
        raise click.BadParameter(f"{text!r}: a grid needs two or more distinct finite rates above 0, e.g. "
                                 "0.05,0.1,0.2")
    return grid


def _known_presets(ctx: click.Context, param: click.Parameter, names: tuple[str, ...]) -> tuple[str, ...]:
    """Every ``--preset`` names a preset (a close match is suggested otherwise)."""
    for name in names:
        try:
            get_preset(name)
        except ConfigError as err:
            raise click.BadParameter(f"{err.message}; {err.fix}") from None
    return names


@click.group("bench")
def bench_group() -> None:
    """Benchmarks and experiments; results go to --out as JSON, markdown and PNG."""


@bench_group.command("fl")
@click.option("--preset", "presets", multiple=True, callback=_known_presets, metavar="NAME",
              help="Experiment to run (repeatable); `--list` prints them, docs/results.md describes them.")
@click.option("--list", "list_presets", is_flag=True, help="Print every preset with what it runs, and exit.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("bench/results"),
              show_default=True, help="Directory for the results (JSON, markdown, PNG) and the runs' state.")
@click.option("--source-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the MNIST IDX files are (otherwise the usual search path).")
@click.option("--max-rounds", type=click.IntRange(min=1), default=None,
              help="Override the preset's round budget (epochs for centralised presets).")
@click.option("--parallel", type=click.IntRange(min=1), default=2, show_default=True, help="Training threads.")
@click.option("--stop-at-target/--full-budget", default=True, show_default=True,
              help="End a run at its target accuracy, or run the whole round budget.")
@click.option("--skip-existing", is_flag=True, help="Skip presets that already have a row in OUT/fl.json.")
@click.option("--lr-grid", callback=_lr_grid, metavar="ETA,ETA[,...]", default=None,
              help="The paper's method: run each preset at each of these workers' learning rates (a multiplicative "
                   "grid, e.g. 0.05,0.1,0.2; each point its own resumable run) and keep the best as its row: the "
                   "fewest rounds to the target, else the best accuracy.")
def bench_fl(presets: tuple[str, ...], list_presets: bool, out: Path, source_dir: Path | None,
             max_rounds: int | None, parallel: int, stop_at_target: bool, skip_existing: bool,
             lr_grid: tuple[float, ...] | None) -> None:
    """Federated-learning experiments of the seed (McMahan et al. on MNIST): rounds, bytes and wall time to the
    target accuracy, beside the centralised baseline. Rows accumulate in OUT/fl.json; a stopped run resumes."""
    if list_presets:
        for p in PRESETS.values():
            click.echo(f"{p.name:42s} {p.label()}, {p.dataset} {p.partition}, {p.max_rounds} rounds")
        return
    if not presets:
        raise ConfigError("no --preset given", "name at least one, e.g. --preset lenet5-fedavg-e5-b10-iid "
                          "(`fedctl bench fl --help` lists them)")
    check_writable_dir(out, "--out")
    quiet_workers()
    with missing_dataset_fix(has_download=False):
        _bench_fl(presets, out, source_dir, max_rounds, parallel, stop_at_target, skip_existing, lr_grid)


def _grid_row(p: Preset, grid: tuple[float, ...], out: Path, source_dir: Path | None, budget: int, parallel: int,
              stop_at_target: bool) -> dict[str, Any]:
    """Run ``p`` at every workers' rate of ``grid`` (runs ``<preset>@lr<η>``) and return the best as ``p``'s row,
    with every point's outcome in ``lr_grid``.

    The rule is the fewest rounds to the target: once a point has reached it in R rounds, the points still to run
    stop after ⌈R⌉ + 1 rounds (they cannot win with more), and say so. The preset's own rate, when ``fl.json``
    already has its row, is taken first, so that its R bounds the others."""
    measured = {r["preset"]: r for r in merge_results(out / "fl.json", [])}.get(p.name)
    known = (measured is not None and not measured.get("lr_grid") and measured.get("lr") == p.lr and p.lr in grid
             and (measured["summary"].get("rounds_to_target") is not None
                  or measured["summary"].get("rounds_run") == budget))
    order = sorted(grid, key=lambda eta: (not (known and eta == p.lr), eta))
    found: dict[float, dict[str, Any]] = {}
    for eta in order:
        if known and measured is not None and eta == p.lr:
            found[eta] = measured  # the preset's own rate, already measured to the target or the budget
            console.print(f"  {p.name} η={eta:g}: the preset's row in {out / 'fl.json'}")
            continue
        reached = [r["summary"]["rounds_to_target"] for r in found.values()
                   if r["summary"].get("rounds_to_target") is not None]
        cap = min(budget, math.ceil(min(reached)) + 1) if reached and stop_at_target else budget
        point = replace(p, name=f"{p.name}@lr{eta:g}", lr=eta)
        found[eta] = run_federated(point, out, source_dir, cap, parallel, stop_at_target)
        s = found[eta]["summary"]
        stopped = cap < budget and s.get("rounds_to_target") is None
        if stopped:  # (a run resumed from an earlier, uncapped try may already be past the cap)
            found[eta]["stopped_after"] = max(cap, int(s.get("rounds_run") or 0))
        why = f" by round {found[eta]['stopped_after']} (another rate got there sooner)" if stopped else ""
        console.print(f"  {p.name} η={eta:g}: to target {s.get('rounds_to_target') or 'not reached'}{why}, best "
                      f"{s.get('best_accuracy')}")
    points = [found[eta] for eta in grid]

    def rank(row: Any) -> tuple[bool, float, float]:
        s = row["summary"]
        return (s.get("rounds_to_target") is None, s.get("rounds_to_target") or 0.0, -(s.get("best_accuracy") or 0.0))

    best = dict(min(points, key=rank))
    best["preset"] = p.name
    best["lr_grid"] = [{"lr": r["lr"], "rounds_to_target": r["summary"].get("rounds_to_target"),
                        "best_accuracy": r["summary"].get("best_accuracy"),
                        "rounds_run": r["summary"].get("rounds_run"),
                        **({"stopped_after": r["stopped_after"]} if "stopped_after" in r else {})} for r in points]
    best["command"] = f"fedctl bench fl --preset {p.name} --lr-grid {','.join(f'{g:g}' for g in grid)}"
    return best


def _current_notes(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with their preset's current paper note (rows measured before a note was corrected keep their numbers)."""
    for r in rows:
        if r.get("preset") in PRESETS:
            r["paper_note"] = PRESETS[r["preset"]].paper_note
    return rows


def _bench_fl(presets: tuple[str, ...], out: Path, source_dir: Path | None, max_rounds: int | None, parallel: int,
              stop_at_target: bool, skip_existing: bool, lr_grid: tuple[float, ...] | None = None) -> None:
    done = {r["preset"] for r in merge_results(out / "fl.json", [])} if skip_existing else set()
    for name in presets:
        if name in done:
            console.print(f"[bold]{name}[/]: already in {out / 'fl.json'}; skipped")
            continue
        p = get_preset(name)
        budget = max_rounds or p.max_rounds
        if p.strategy == "central":
            row = run_central(p, source_dir, budget, parallel)
        elif lr_grid:
            row = _grid_row(p, lr_grid, out, source_dir, budget, parallel, stop_at_target)
        else:
            row = run_federated(p, out, source_dir, budget, parallel, stop_at_target)
        rows = _current_notes(merge_results(out / "fl.json", [row]))
        files = write_report(rows, out, "fl")
        s = row["summary"]
        reached = s.get("rounds_to_target", s.get("epochs_to_target"))
        console.print(f"[bold]{name}[/]: best accuracy {s.get('best_accuracy')}, to target "
                      f"{'not reached' if reached is None else f'{reached:.1f}'}; table in {files['markdown']}")


COMM_SUITE = ("lenet5-fedsgd-iid", "lenet5-dgc-999-iid", "lenet5-dgc-99-iid", "mlp-ssgd-u1", "mlp-ssgd-u01",
              "mlp-ssgd-u001", "mlp-ssgd-u001-dp10", "lenet5-ssgd-u1", "lenet5-ssgd-u01", "lenet5-ssgd-u001")
"""The presets of `fedctl bench comm` by default: dense references first (ratios are taken against them)."""


@bench_group.command("comm")
@click.option("--preset", "presets", multiple=True, callback=_known_presets, metavar="NAME",
              help=f"Run (repeatable) [default: {', '.join(COMM_SUITE)}]; `fedctl bench fl --list` prints them.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("bench/results"),
              show_default=True, help="Directory for the results (JSON, markdown, PNG) and the runs' state.")
@click.option("--source-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the MNIST IDX files are (otherwise the usual search path).")
@click.option("--max-rounds", type=click.IntRange(min=1), default=None, help="Override the presets' round budget.")
@click.option("--parallel", type=click.IntRange(min=1), default=2, show_default=True, help="Training threads.")
@click.option("--stop-at-target/--full-budget", default=True, show_default=True,
              help="End a run at its target accuracy, or run the whole round budget.")
@click.option("--skip-existing", is_flag=True, help="Skip presets that already have a row in OUT/comm.json.")
@click.option("--topk/--no-topk", default=True, show_default=True,
              help="Also time sampled vs exact top-k selection on 1M and 10M elements.")
def bench_comm(presets: tuple[str, ...], out: Path, source_dir: Path | None, max_rounds: int | None, parallel: int,
               stop_at_target: bool, skip_existing: bool, topk: bool) -> None:
    """Communication savings: dense FedSGD vs DGC vs Selective SGD on the same model, data, clients and rounds;
    uplink and downlink bytes counted on the broker's socket, per round and to the target accuracy."""
    import json

    import numpy as np

    from fedctl.compress.topk import time_selection
    from fedctl.sim import comm

    central = [name for name in presets if get_preset(name).strategy == "central"]
    if central:
        raise ConfigError(f"--preset {central[0]} is a centralised baseline; bench comm compares federated runs",
                          "leave it out (run it with `fedctl bench fl`)")
    check_writable_dir(out, "--out")
    quiet_workers()
    path = out / "comm.json"
    old = json.loads(path.read_text()) if path.is_file() else {"results": [], "topk": []}
    done = {r["preset"] for r in old["results"]} if skip_existing else set()
    rows = old["results"]
    for name in presets or COMM_SUITE:
        if name in done:
            console.print(f"[bold]{name}[/]: already in {path}; skipped")
            continue
        p = get_preset(name)
        with missing_dataset_fix(has_download=False):
            row = run_federated(p, out, source_dir, max_rounds or p.max_rounds, parallel, stop_at_target)
        row.update(command=f"fedctl bench comm --preset {p.name}", reference=p.reference, options=dict(p.options))
        rows = [r for r in rows if r["preset"] != name] + [row]
        comm.write(rows, old["topk"], out)
    timings = old["topk"]
    if topk:
        rng = np.random.default_rng(0)
        with console.status("[bold]top-k[/]: sampled vs exact selection at density 0.001"):
            timings = [time_selection(n, 0.001, 7, rng) for n in (1_000_000, 10_000_000)]
    files = comm.write(rows, timings, out)
    for t in timings:
        console.print(f"top-k on {t['numel']:,} elements: exact {t['exact_s'] * 1e3:.1f} ms, sampled "
                      f"{t['sampled_s'] * 1e3:.2f} ms ({t['speedup']:.1f}×), selected {t['selected']:,} of "
                      f"k={t['k']:,}")
    console.print(f"table in {files['markdown']}, plot in {files['plot']}")


@bench_group.command("scale")
@click.option("--workers", "counts", multiple=True, type=click.IntRange(min=10), default=(100, 1000),
              show_default=True, help="Numbers of connected virtual workers to measure (repeatable).")
@click.option("--sampled", type=click.IntRange(min=1), default=10, show_default=True,
              help="Workers sampled per round (C = sampled / K).")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True,
              help="Rounds per run (with --edges, 10 or more lets the heartbeat histograms fill).")
@click.option("--dataset", type=click.Choice(list(DATASETS)), default="mnist-sample", show_default=True,
              help="Dataset the K clients' IID partition is made from.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("bench/results"),
              show_default=True, help="Directory for the results (JSON, markdown, PNG) and the runs' state.")
@click.option("--edges", "edge_counts", multiple=True, type=click.IntRange(min=0), default=(),
              help="Measure brokers instead of one simulate process: a flat broker (0) and/or a root over this many "
                   "edge brokers (repeatable), every broker and worker group its own process; results in "
                   "OUT/scale_brokers.{json,md,png}.")
@click.option("--model", "models", multiple=True, type=click.Choice(["mlp", "wide5m"]), default=(),
              help="With --edges: the dense model (mlp 437 KB, wide5m 5.2 MB; repeatable) [default: both].")
def bench_scale(counts: tuple[int, ...], sampled: int, rounds: int, dataset: str, out: Path,
                edge_counts: tuple[int, ...], models: tuple[str, ...]) -> None:
    """Peak RSS and round time of one `fedctl simulate` process as the number of connected workers grows
    (each K in a fresh process, so its peak RSS is its own); with --edges, of brokers: flat against a root with
    edge brokers (docs/results.md)."""
    if edge_counts:
        _bench_scale_brokers(counts, sampled, rounds, out, edge_counts, models or ("mlp", "wide5m"))
        return
    if models:
        raise ConfigError("--model is for the broker benchmark", "pass --edges 0 --edges 10 with it, or drop it")
    if sampled > min(counts):
        raise ConfigError(f"--sampled {sampled} is more than --workers {min(counts)}",
                          f"pass --sampled {min(counts)} or less, or more --workers")
    check_writable_dir(out, "--out")
    rows = [_scale_run(k, sampled, rounds, dataset, out / "runs" / f"scale-{k}") for k in counts]
    write_scale_report(rows, out)


def _bench_scale_brokers(counts: tuple[int, ...], sampled: int, rounds: int, out: Path, edge_counts: tuple[int, ...],
                         models: tuple[str, ...]) -> None:
    from fedctl.sim.scale_brokers import Cell, run_cell, write_report

    for k in counts:
        for e in edge_counts:
            if e and (k % e or sampled % e or sampled // e > k // e):
                raise ConfigError(f"--edges {e} must divide --workers {k} and --sampled {sampled}",
                                  "e.g. --workers 1000 --workers 10000 --edges 10 --sampled 100")
        if sampled > k:
            raise ConfigError(f"--sampled {sampled} is more than --workers {k}", f"pass --sampled {k} or less")
    if rounds < 2:
        raise ConfigError("--rounds must be at least 2 with --edges (the first round is left out)", "pass --rounds 5")
    check_writable_dir(out, "--out")
    path = out / "scale_brokers.json"
    rows = json.loads(path.read_text())["results"] if path.is_file() else []
    for model in models:
        for k in counts:
            for e in edge_counts:
                cell = Cell(k, model, e, sampled, rounds)
                row = run_cell(cell, out / "runs" / "scale-brokers", console.print)
                rows = [r for r in rows if r["cell"] != row["cell"]] + [row]
                files = write_report(rows, out)
                console.print(f"{cell.name}: median round {row['round_s_median']:.3f} s, root CPU "
                              f"{row['root']['cpu_s_per_round']:.2f} s/round; table in {files['markdown']}")


def _scale_run(k: int, sampled: int, rounds: int, dataset: str, state_root: Path) -> dict[str, Any]:
    import json
    import shlex
    import shutil
    import subprocess
    import sys

    shutil.rmtree(state_root / "state", ignore_errors=True)
    cmd = [sys.executable, "-m", "fedctl", "-q", "simulate", "--dataset", dataset, "--clients", str(k),
           "--fraction", str(sampled / k), "--min-workers", str(sampled), "--rounds", str(rounds), "--model", "mlp",
           "--state-dir", str(state_root / "state"), "--backend", "torch"]
    with console.status(f"[bold]scale[/]: {k} workers, {sampled} sampled per round"):
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {done.returncode}"
        raise FedctlError(f"simulate with {k} workers failed: {last.removeprefix('error: ')}",
                          f"run it alone to see all its output: {shlex.join(['fedctl', *cmd[4:]])}")
    summary = json.loads((state_root / "state" / "simulate.json").read_text())
    records = Checkpointer(state_root / "state").read_metrics()
    durations = sorted(r["duration_s"] for r in records[1:]) or [records[0]["duration_s"]]
    row = {"workers": k, "sampled": sampled, "rounds": rounds, "peak_rss_mb": round(summary["peak_rss_mb"], 1),
           "round_s_median": durations[len(durations) // 2], "wall_s": round(summary["wall_s"], 2),
           "workers_that_trained": summary["workers_that_trained"], "command": " ".join(["fedctl", *cmd[4:]])}
    console.print(f"{k} workers: peak RSS {row['peak_rss_mb']:.0f} MiB, median round {row['round_s_median']:.3f} s")
    return row


def write_scale_report(rows: list[dict[str, Any]], out: Path) -> None:
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps({"results": rows}, indent=1))
    lines = ["# Simulation scale: one process, K connected virtual workers", "",
             "Each K runs in a fresh `fedctl simulate` process (MLP, FedAvg E=1 B=10, real TCP sockets, one DEALER "
             "per worker); idle workers heartbeat, only the sampled ones train.", "",
             "| connected workers K | sampled per round | peak RSS (MiB) | median round (s) | wall (s) "
             "| workers that trained |",
             "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['workers']} | {r['sampled']} | {r['peak_rss_mb']:.0f} | {r['round_s_median']:.3f} | "
              f"{r['wall_s']:.1f} | {r['workers_that_trained']} |" for r in rows]
    lines += ["", "Commands:", ""] + [f"    {r['command']}" for r in rows]
    (out / "scale.md").write_text("\n".join(lines) + "\n")


bench_group.add_command(bench_policies)
bench_group.add_command(bench_heartbeat)
bench_group.add_command(bench_privacy)
bench_group.add_command(bench_round)
bench_group.add_command(bench_metrics)
bench_group.add_command(bench_noniid)
