"""``fedctl bench``: experiments that write JSON, markdown and PNG results (``fedctl bench fl --preset ...``)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from fedctl.broker.config import BrokerConfig
from fedctl.broker.policy import SyncConfig
from fedctl.broker.store import Checkpointer
from fedctl.cli.common import source_dir_fix
from fedctl.cli.simulate import console, ensure_partition, quiet_workers, run_with_progress
from fedctl.data.datasets import DATASETS
from fedctl.data.shards import read_manifest
from fedctl.errors import ConfigError, DatasetNotFound, FedctlError
from fedctl.fsio import check_writable_dir
from fedctl.models import MODELS
from fedctl.sim.baseline import run_centralized
from fedctl.sim.metrics import summarize, summarize_centralized
from fedctl.sim.presets import PRESETS, Preset, get_preset
from fedctl.sim.report import merge_results, write_report
from fedctl.sim.runner import SimConfig
from fedctl.strategies import TaskConfig, strategy_names

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
    data = ensure_partition(None, p.dataset, p.clients, None if p.iid else 2, source_dir, 0, out / "partitions")
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


@contextmanager
def _dataset_fix() -> Iterator[None]:
    """A missing dataset's fix names --source-dir, which these commands have (but not --download)."""
    try:
        yield
    except DatasetNotFound as err:
        raise source_dir_fix(err, has_download=False) from None


@click.group("bench")
def bench_group() -> None:
    """Benchmarks and experiments; results go to --out as JSON, markdown and PNG."""


@bench_group.command("fl")
@click.option("--preset", "presets", multiple=True, type=click.Choice(list(PRESETS)),
              help="Experiment to run (repeatable); see docs/results.md.")
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
def bench_fl(presets: tuple[str, ...], out: Path, source_dir: Path | None, max_rounds: int | None, parallel: int,
             stop_at_target: bool, skip_existing: bool) -> None:
    """Federated-learning experiments of the seed (McMahan et al. on MNIST): rounds, bytes and wall time to the
    target accuracy, beside the centralised baseline. Rows accumulate in OUT/fl.json; a stopped run resumes."""
    if not presets:
        raise ConfigError("no --preset given", "name at least one, e.g. --preset lenet5-fedavg-e5-b10-iid "
                          "(`fedctl bench fl --help` lists them)")
    check_writable_dir(out, "--out")
    quiet_workers()
    with _dataset_fix():
        _bench_fl(presets, out, source_dir, max_rounds, parallel, stop_at_target, skip_existing)


def _bench_fl(presets: tuple[str, ...], out: Path, source_dir: Path | None, max_rounds: int | None, parallel: int,
              stop_at_target: bool, skip_existing: bool) -> None:
    done = {r["preset"] for r in merge_results(out / "fl.json", [])} if skip_existing else set()
    for name in presets:
        if name in done:
            console.print(f"[bold]{name}[/]: already in {out / 'fl.json'}; skipped")
            continue
        p = get_preset(name)
        budget = max_rounds or p.max_rounds
        row = (run_central(p, source_dir, budget, parallel) if p.strategy == "central"
               else run_federated(p, out, source_dir, budget, parallel, stop_at_target))
        rows = merge_results(out / "fl.json", [row])
        files = write_report(rows, out, "fl")
        s = row["summary"]
        reached = s.get("rounds_to_target", s.get("epochs_to_target"))
        console.print(f"[bold]{name}[/]: best accuracy {s.get('best_accuracy')}, to target "
                      f"{'not reached' if reached is None else f'{reached:.1f}'}; table in {files['markdown']}")


COMM_SUITE = ("lenet5-fedsgd-iid", "lenet5-dgc-999-iid", "lenet5-dgc-99-iid", "mlp-ssgd-u1", "mlp-ssgd-u01",
              "mlp-ssgd-u001", "mlp-ssgd-u001-dp10", "lenet5-ssgd-u1", "lenet5-ssgd-u01", "lenet5-ssgd-u001")
"""The presets of `fedctl bench comm` by default: dense references first (ratios are taken against them)."""


@bench_group.command("comm")
@click.option("--preset", "presets", multiple=True, type=click.Choice(list(PRESETS)),
              help=f"Run (repeatable) [default: {', '.join(COMM_SUITE)}].")
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
        with _dataset_fix():
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
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True, help="Rounds per run.")
@click.option("--dataset", type=click.Choice(list(DATASETS)), default="mnist-sample", show_default=True,
              help="Dataset the K clients' IID partition is made from.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("bench/results"),
              show_default=True, help="Directory for the results (JSON, markdown, PNG) and the runs' state.")
def bench_scale(counts: tuple[int, ...], sampled: int, rounds: int, dataset: str, out: Path) -> None:
    """Peak RSS and round time of one `fedctl simulate` process as the number of connected workers grows
    (each K in a fresh process, so its peak RSS is its own)."""
    if sampled > min(counts):
        raise ConfigError(f"--sampled {sampled} is more than --workers {min(counts)}",
                          f"pass --sampled {min(counts)} or less, or more --workers")
    check_writable_dir(out, "--out")
    rows = [_scale_run(k, sampled, rounds, dataset, out / "runs" / f"scale-{k}") for k in counts]
    write_scale_report(rows, out)


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


# -- consistency policies with stragglers; heartbeat round-trip under load ------------------------------------------


def _quiet_refusals() -> None:
    """Updates refused as stale, or pushed after a run ended, are counted in the reports; a warning for each
    would drown the progress display (-v keeps them)."""
    quiet_workers()
    if logging.getLogger().level > logging.DEBUG:
        for name in ("fedctl.broker.service", "fedctl.worker.client"):
            logging.getLogger(name).setLevel(logging.ERROR)


def _command_line() -> str:
    import shlex
    import sys

    return " ".join(["fedctl", *map(shlex.quote, sys.argv[1:])])


@bench_group.command("policies")
@click.option("--policies", "--policy", "policies", multiple=True, metavar="sync|ssp:S|async",
              help="Policy to run (repeatable) [default: sync, ssp:1, ssp:4, async].")
@click.option("--workers", type=click.IntRange(min=1), default=20, show_default=True,
              help="K workers: the first K shards of the partition.")
@click.option("--dataset", type=click.Choice(list(DATASETS)), default="mnist", show_default=True,
              help="mnist, or mnist-sample for a smoke run.")
@click.option("--clients", type=click.IntRange(min=1), default=100, show_default=True,
              help="Clients of the IID partition the workers are taken from (as in bench fl).")
@click.option("--model", type=click.Choice(sorted(MODELS)), default="lenet5", show_default=True,
              help="The model every worker trains.")
@click.option("--strategy", type=click.Choice(strategy_names()), default="fedavg", show_default=True,
              help="The algorithm (`fedctl strategies` lists them).")
@click.option("--epochs", "-E", type=click.IntRange(min=1), default=1, show_default=True, help="Local epochs E.")
@click.option("--batch-size", "-B", type=click.IntRange(min=0), default=50, show_default=True,
              help="Local batch size B (0 = the whole shard).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.05, show_default=True,
              help="Learning rate η.")
@click.option("--slow-fraction", type=click.FloatRange(0, 1), default=0.2, show_default=True,
              help="This fraction of the workers (the first shards) is --slowdown times slower.")
@click.option("--slowdown", type=click.FloatRange(min=1), default=5.0, show_default=True,
              help="How many times slower the --slow-fraction workers are.")
@click.option("--delay", "delay_s", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Emulated device seconds added to every update (before the slowdown).")
@click.option("--target", type=click.FloatRange(0, 1, min_open=True), default=0.985, show_default=True,
              help="Test accuracy whose wall time to reach the report compares.")
@click.option("--max-updates", type=click.IntRange(min=1), default=4000, show_default=True,
              help="Budget in applied updates: sync runs ⌈N/K⌉ rounds, ssp/async ⌈N/buffer⌉ model versions.")
@click.option("--eval-every", type=click.IntRange(min=1), default=None,
              help="Evaluate every N applied updates [default: K, i.e. every sync round, every K async versions].")
@click.option("--quorum", type=click.IntRange(min=1), default=None,
              help="Sync: updates a round needs [default: K − max(1, K // 10), so a dead worker does not stop the "
                   "run]; every live worker is still waited for until --round-timeout.")
@click.option("--round-timeout", "round_timeout_s", type=click.FloatRange(min=0, min_open=True), default=300.0,
              show_default=True, help="Sync round deadline (only a hung worker should ever meet it).")
@click.option("--max-staleness", type=click.IntRange(min=0), default=None,
              help="ssp/async: refuse updates more than this many versions old [default: 10·K, above what a 5× "
                   "straggler reaches, so the staleness weighting rather than refusal handles it].")
@click.option("--staleness-exponent", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="ssp/async: weigh an update τ versions old by (1+τ)^-a (0: no weighting).")
@click.option("--buffer", type=click.IntRange(min=1), default=1, show_default=True,
              help="ssp/async: apply updates in groups of this many arrivals.")
@click.option("--server-lr", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="ssp/async: factor on every update's weight (FedBuff's server learning rate).")
@click.option("--stop-at-target/--full-budget", default=True, show_default=True,
              help="End each run at --target, or spend the whole --max-updates budget.")
@click.option("--backend", type=click.Choice(["auto", "torch", "mxnet"]), default="auto", show_default=True,
              help="Framework the workers train with (auto: the first one installed).")
@click.option("--parallel", type=click.IntRange(min=1), default=2, show_default=True, help="Training threads.")
@click.option("--source-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the MNIST IDX files are (otherwise the usual search path).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("bench/results"),
              show_default=True, help="Directory for the results (JSON, markdown, PNG) and the runs' state.")
def bench_policies(policies: tuple[str, ...], dataset: str, clients: int, backend: str, parallel: int,
                   source_dir: Path | None, out: Path, **options: Any) -> None:
    """Sync vs SSP vs async with stragglers: the same model, data, K workers and speed profile under each policy
    (fresh state in OUT/runs/policies-NAME). Writes OUT/policies.json, .md, .png and policies_staleness.png."""
    from fedctl.cli.common import resolve_backend
    from fedctl.sim.policies import add_ratios, write_policies_report

    bench = _policy_bench(policies, options)
    check_writable_dir(out, "--out")
    _quiet_refusals()
    with _dataset_fix():
        data = ensure_partition(None, dataset, clients, None, source_dir, 0, out / "partitions")
    start = _start_accuracy(bench, data, backend)
    rows = [_run_policy(bench, p, data, out, backend, parallel, start) for p in bench.policies]
    add_ratios({r["policy"]: r["summary"] for r in rows})
    setup = {"bench": bench.describe(), "dataset": read_manifest(data).get("dataset", dataset), "clients": clients,
             "backend": resolve_backend(backend), "parallel": parallel}
    files = write_policies_report(setup, rows, out, _command_line())
    for r in rows:
        s = r["summary"]
        wall = s["wall_s_to_target"]
        console.print(f"[bold]{r['policy']}[/]: {'target not reached' if wall is None else f'target in {wall:.1f} s'}"
                      f", best accuracy {s['best_accuracy']}, {s['total_updates']} updates "
                      f"({s['updates_per_s'] or 0:.2f}/s), staleness p90 {s['staleness']['p90']}")
    console.print(f"table in {files['markdown']}, plots in {files['plot']} and {files['staleness']}")


def _policy_bench(policies: tuple[str, ...], o: dict[str, Any]) -> Any:
    from fedctl.broker.policy import ClockConfig
    from fedctl.sim.policies import PolicyBench

    max_staleness = o["max_staleness"] if o["max_staleness"] is not None else 10 * o["workers"]
    return PolicyBench(policies=tuple(dict.fromkeys(policies)) or PolicyBench.policies, workers=o["workers"],
                       model=o["model"], strategy=o["strategy"], task=TaskConfig(o["epochs"], o["batch_size"], o["lr"]),
                       slow_fraction=o["slow_fraction"], slowdown=o["slowdown"], delay_s=o["delay_s"],
                       target=o["target"], max_updates=o["max_updates"], eval_every=o["eval_every"],
                       quorum=o["quorum"], round_timeout_s=o["round_timeout_s"],
                       clock=ClockConfig(max_staleness=max_staleness, staleness_exponent=o["staleness_exponent"],
                                         buffer=o["buffer"], server_lr=o["server_lr"]),
                       stop_at_target=o["stop_at_target"])


def _start_accuracy(bench: Any, data: Path, backend: str) -> float:
    """Test accuracy of the initial model every policy starts from (the origin of the time-to-target curve)."""
    from fedctl.cli.common import make_evaluator, resolve_backend
    from fedctl.data.shards import load_shard
    from fedctl.models import get_model, init_params

    spec = get_model(bench.model)
    evaluate = make_evaluator(resolve_backend(backend), spec, load_shard(data, "test"), threads=1)
    return float(evaluate(init_params(spec, bench.seed))["accuracy"])


def _run_policy(bench: Any, policy: str, data: Path, out: Path, backend: str, parallel: int,
                start: float) -> dict[str, Any]:
    import shutil

    from fedctl.cli.common import resolve_backend
    from fedctl.sim.policies import summarize_policy

    state = out / "runs" / f"policies-{policy.replace(':', '')}"
    shutil.rmtree(state, ignore_errors=True)  # every policy starts from the same fresh model
    config = bench.broker_config(policy, state)
    summary, wall = run_with_progress(config, bench.sim_config(data, resolve_backend(backend), parallel), backend,
                                      policy)
    records = Checkpointer(state).read_metrics()
    return {"policy": policy, "state_dir": str(state), "steps_budget": config.rounds, "eval_every": config.eval_every,
            "workers": summary["workers"], "run_wall_s": wall, "records": records,
            "summary": summarize_policy(records, bench.target, start)}


@bench_group.command("heartbeat")
@click.option("--workers", type=click.IntRange(min=1), default=100, show_default=True,
              help="Load workers pushing dense updates as fast as the broker takes them.")
@click.option("--model", type=click.Choice(sorted(MODELS)), default="lenet5", show_default=True,
              help="The model whose dense updates the load workers push.")
@click.option("--duration", "duration_s", type=click.FloatRange(min=0, min_open=True), default=20.0,
              show_default=True, help="Seconds of probing.")
@click.option("--interval-ms", type=click.FloatRange(min=0, min_open=True), default=20.0, show_default=True,
              help="The probe's heartbeat period.")
@click.option("--budget-ms", type=click.FloatRange(min=0, min_open=True), default=100.0, show_default=True,
              help="The p99 round-trip the report checks against.")
@click.option("--durable/--no-durable", default=True, show_default=True,
              help="Write each acknowledged update to disk before acking it (the broker's default).")
@click.option("--idle", is_flag=True,
              help="Load test instead: sync rounds sample 10 workers, the others only heartbeat and wait "
                   "(report as heartbeat-idle.{json,md}).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("bench/results"),
              show_default=True, help="Directory for the results (JSON, markdown, PNG) and the runs' state.")
def bench_heartbeat(workers: int, model: str, duration_s: float, interval_ms: float, budget_ms: float,
                    durable: bool, idle: bool, out: Path) -> None:
    """Heartbeat round-trip under load: an async FedAvg broker in this process, WORKERS no-op workers in a child
    process pushing dense updates, and a probe thread timing a heartbeat every --interval-ms. Writes
    OUT/heartbeat.json (every RTT) and OUT/heartbeat.md."""
    import asyncio
    import shutil

    from fedctl.sim.heartbeat import HeartbeatBench, measure_heartbeat, write_heartbeat_report

    bench = HeartbeatBench(workers, model, duration_s, interval_ms / 1000, budget_ms, idle=idle, durable=durable)
    check_writable_dir(out, "--out")
    _quiet_refusals()
    state = out / "runs" / "heartbeat"
    shutil.rmtree(state, ignore_errors=True)
    with console.status(f"[bold]heartbeat[/]: {workers} workers pushing {model} updates, probing for "
                        f"{duration_s:g} s"):
        result = asyncio.run(measure_heartbeat(bench, state))
    files = write_heartbeat_report(result, out, _command_line())
    ms = {k: "—" if result[f"rtt_ms_{k}"] is None else f"{result[f'rtt_ms_{k}']:.2f}" for k in ("p50", "p99", "max")}
    console.print(f"heartbeat RTT p50 {ms['p50']} ms, p99 {ms['p99']} ms, max {ms['max']} ms over "
                  f"{result['heartbeats']} beats ({result['unanswered']} unanswered); {result['updates_per_s']:.1f} "
                  f"updates applied/s; report in {files['markdown']}")
