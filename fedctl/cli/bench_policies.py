"""``fedctl bench policies`` and ``fedctl bench heartbeat``: consistency policies with stragglers, and the heartbeat
round trip under load."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from fedctl.api.inputs import missing_dataset_fix
from fedctl.broker.store import Checkpointer
from fedctl.cli.simulate import console, ensure_partition, quiet_workers, run_with_progress
from fedctl.data.datasets import DATASETS
from fedctl.data.shards import read_manifest
from fedctl.fsio import check_writable_dir
from fedctl.models import MODELS
from fedctl.strategies import TaskConfig, strategy_names


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


@click.command("policies")
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
    from fedctl.api.inputs import resolve_backend
    from fedctl.sim.policies import add_ratios, write_policies_report

    bench = _policy_bench(policies, options)
    check_writable_dir(out, "--out")
    _quiet_refusals()
    with missing_dataset_fix(has_download=False):
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
    from fedctl.api.inputs import make_evaluator, resolve_backend
    from fedctl.data.shards import load_shard
    from fedctl.models import get_model, init_params

    spec = get_model(bench.model)
    evaluate = make_evaluator(resolve_backend(backend), spec, load_shard(data, "test"), threads=1)
    return float(evaluate(init_params(spec, bench.seed))["accuracy"])


def _run_policy(bench: Any, policy: str, data: Path, out: Path, backend: str, parallel: int,
                start: float) -> dict[str, Any]:
    import shutil

    from fedctl.api.inputs import resolve_backend
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


@click.command("heartbeat")
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
@click.option("--metrics", is_flag=True,
              help="Serve /metrics and the dashboard on the broker's loop (as --metrics-bind does), scrape /metrics "
                   "every second and keep the dashboard's event stream open (report as heartbeat-metrics.{json,md}).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("bench/results"),
              show_default=True, help="Directory for the results (JSON, markdown, PNG) and the runs' state.")
def bench_heartbeat(workers: int, model: str, duration_s: float, interval_ms: float, budget_ms: float,
                    durable: bool, idle: bool, metrics: bool, out: Path) -> None:
    """Heartbeat round-trip under load: an async FedAvg broker in this process, WORKERS no-op workers in a child
    process pushing dense updates, and a probe thread timing a heartbeat every --interval-ms. Writes
    OUT/heartbeat.json (every RTT) and OUT/heartbeat.md."""
    import asyncio
    import shutil

    from fedctl.sim.heartbeat import HeartbeatBench, measure_heartbeat, write_heartbeat_report

    bench = HeartbeatBench(workers, model, duration_s, interval_ms / 1000, budget_ms, idle=idle, durable=durable,
                           metrics=metrics)
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
