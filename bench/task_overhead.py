"""``make bench`` (tasks): a user task on the wire — an 11 M-parameter model, and the task path against the built-in.

Usage: ``.venv/bin/python bench/task_overhead.py [--rounds 21] [--dense-rounds 11] [--workers 10,100] [--repeats 3]``.
Writes bench/results/task.{json,md,png}. Targets are reported, never asserted.

1. ``bench/tasks/resnet18_like.py`` (ResNet-18 with BatchNorm, 11.2 M values in 102 tensors, 44.7 MB as float32)
   served as a task (``Broker(config, model=task_spec(task))``) to 10 no-op workers over loopback TCP, FedAvg, all
   10 in every round, as ``broker_overhead.py`` runs the MLP: the broker's ``duration_s`` and the cycle between
   round completions (round 1 left out), and the bytes per worker per round in each direction against the model's
   float32 size. Twice: with the broker's defaults (a worker holding an older version is sent only what changed)
   and with ``history_mb=0`` (the whole model every round, zlib-compressed when that is smaller, protocol §4.4).
2. The built-in ``mlp`` (``Broker(config)``) against the same MLP as a task (``bench/tasks/mlp_task.py``) at
   K = 10 and 100, alternating built-in / task runs in this one process; medians over all measured rounds of the
   repeats and their ratio.

No-op workers (``NoOpTrainer``: the weights they were given, back at once) need no framework; a task's workers are
given its spec (``WorkerConfig.spec``), as ``fedctl join --task`` does, since a task's name is no built-in model.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq
import zmq.asyncio
from broker_overhead import EXAMPLES_PER_WORKER, _stats
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from run import environment
from task_report import RATIO_TARGET, markdown, plot, summary_table

from fedctl.broker.config import BrokerConfig
from fedctl.broker.policy import SyncConfig
from fedctl.broker.service import Broker
from fedctl.models import ModelSpec
from fedctl.sim.noop_worker import serve as noop_workers
from fedctl.strategies import TaskConfig, Update, get_strategy
from fedctl.wire.constants import MAX_TENSORS
from fedctl.wire.messages import encode_tensors
from fedctl.worker.frameworks.base import Params

HERE = Path(__file__).resolve().parent
TASKS, RESULTS = HERE / "tasks", HERE / "results"
console = Console()
if not console.is_terminal:
    console.width = 110
OnRound = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Arm:
    """One way the broker gets its model: a built-in name (``served`` None) or a task's spec and weights."""

    label: str
    model: str
    served: tuple[ModelSpec, Params] | None = None

    @property
    def worker_spec(self) -> ModelSpec | None:
        return None if self.served is None else self.served[0]


def load_arm(label: str, path: Path) -> Arm:
    """A task file as an arm: its spec and seeded initial weights, built once with PyTorch (imported here only)."""
    from fedctl.tasks import load_task
    from fedctl.worker.frameworks.torch_task import task_spec

    task = load_task(str(path))
    return Arm(label, task.name, task_spec(task, 0))


# ---------------------------------------------------------------------------------------------- worker process
def worker_process(endpoint: str, k: int, spec: ModelSpec | None) -> None:
    """Entry point of the child process: K no-op workers (with the task's spec, if any) until the broker is done."""
    logging.basicConfig(level=logging.WARNING, format="[workers] %(levelname)s %(name)s: %(message)s")
    asyncio.run(noop_workers(endpoint, "noop", k, spec=spec, noise=0.0, connect_timeout_s=60, max_backoff_s=10.0))


# ---------------------------------------------------------------------------------------------- broker side
async def _serve(arm: Arm, k: int, rounds: int, state_dir: Path, on_round: OnRound, history_mb: float | None,
                 durable: bool) -> tuple[dict[str, Any], list[float], int | None]:
    ctx = zmq.asyncio.Context()
    extra: dict[str, Any] = {"durable_updates": durable}
    if history_mb is not None:
        extra["history_mb"] = history_mb
    config = BrokerConfig(bind="tcp://127.0.0.1:*", model=arm.model, strategy="fedavg", rounds=rounds,
                          task=TaskConfig(1, 10, 0.1), sync=SyncConfig(1.0, k, 60.0), state_dir=state_dir,
                          heartbeat_interval_s=1.0, liveness_s=30.0, done_linger_s=2.0, **extra)
    completed: list[float] = []

    def record(rec: dict[str, Any]) -> None:
        completed.append(time.perf_counter())
        on_round(rec)

    broker = Broker(config, None, on_round=record, ctx=ctx, model=arm.served)
    child = mp.get_context("spawn").Process(target=worker_process, args=(broker.endpoint, k, arm.worker_spec),
                                            daemon=True)
    child.start()
    try:
        summary = await broker.run()
    finally:
        ctx.destroy(linger=0)
        await asyncio.to_thread(child.join, 30)
        if child.is_alive():
            child.kill()
            child.join(5)
    return summary, [b - a for a, b in itertools.pairwise(completed)], child.exitcode


_KEYS = ("participants", "duration_s", "bytes_in", "bytes_out", "update_bytes_in", "model_bytes_out")


def run_arm(arm: Arm, k: int, rounds: int, on_round: OnRound, history_mb: float | None = None,
            durable: bool = True) -> dict[str, Any]:
    """``rounds`` rounds of ``arm`` with K no-op workers; statistics over rounds 2..rounds (round 1 is warm-up)."""
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix=f"fedctl-bench-task-k{k}-") as tmp:
        state_dir = Path(tmp) / "state"
        started = time.perf_counter()
        summary, cycles, exitcode = asyncio.run(_serve(arm, k, rounds, state_dir, on_round, history_mb, durable))
        wall_s = time.perf_counter() - started
        records = [json.loads(line) for line in (state_dir / "metrics.jsonl").read_text().splitlines() if line]
    durations = [r["duration_s"] for r in records[1:]]
    return {"arm": arm.label, "model": arm.model, "workers": k, "rounds": rounds, "history_mb": history_mb,
            "durable_updates": durable,
            "measured_rounds": len(durations), "duration_s": _stats(durations),
            "cycle_s": _stats(cycles[1:]), "durations": durations, "cycles": cycles[1:],
            "warmup_round_s": records[0]["duration_s"] if records else None,
            "per_round": [{key: r.get(key) for key in ("round", *_KEYS)} for r in records],
            "all_participated": all(r["participants"] == k for r in records),
            "rounds_completed": summary["rounds"], "rejected": summary["rejected"],
            "worker_process_exit": exitcode, "wall_s": wall_s, "load_average_1min_before": round(load, 2)}


# ---------------------------------------------------------------------------------------------- analysis
def wire_ratios(res: dict[str, Any], model_bytes: int) -> dict[str, Any]:
    """Bytes per worker per round in each direction / the model's float32 bytes: round 1 and the median of 2..N."""
    def ratio(rec: dict[str, Any], key: str) -> float:
        return rec[key] / rec["participants"] / model_bytes

    first, later = res["per_round"][0], res["per_round"][1:]
    out: dict[str, Any] = {}
    for name, key in (("uplink_push", "update_bytes_in"), ("uplink_all", "bytes_in"),
                      ("downlink_model", "model_bytes_out"), ("downlink_all", "bytes_out")):
        out[name] = {"round1": ratio(first, key), "median_later": statistics.median(ratio(r, key) for r in later)}
    out["pass"] = {d: max(out[f"{d}_all"].values()) <= RATIO_TARGET for d in ("uplink", "downlink")}
    return out


def aggregation_alone(weights: Params, k: int, repeats: int = 3) -> float:
    """Median seconds of one FedAvg of K copies of ``weights``, outside the broker (for the breakdown)."""
    updates = [Update(f"w{i}", EXAMPLES_PER_WORKER, weights, "weights", 0, {}) for i in range(k)]
    strategy = get_strategy("fedavg", TaskConfig(1, 10, 0.1))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        strategy.aggregate(weights, updates, {}, np.random.default_rng(0))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def downlink_encode(weights: Params, repeats: int = 3) -> dict[str, float]:
    """Median seconds to encode the dense model's frames with and without zlib (what the broker does once per
    round for every worker that needs the whole model), and the compressed size / float32 bytes."""
    out: dict[str, float] = {}
    for label, compress in (("plain_s", False), ("zlib_s", True)):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            frames = encode_tensors(weights, compress=compress)
            times.append(time.perf_counter() - t0)
        out[label] = statistics.median(times)
    out["zlib_ratio"] = sum(map(len, frames)) / sum(w.nbytes for w in weights.values())
    return out


def describe_model(arm: Arm) -> dict[str, Any]:
    assert arm.served is not None
    spec, weights = arm.served
    kinds = [p.kind for p in spec.params]
    return {"name": spec.name, "tensors": len(spec.params), "parameter_tensors": kinds.count("param"),
            "buffer_tensors": kinds.count("buffer"), "values": spec.num_params,
            "float32_bytes": sum(w.nbytes for w in weights.values()), "max_tensors": MAX_TENSORS,
            "fits_one_message": len(spec.params) <= MAX_TENSORS}


def compare(builtin: Arm, task: Arm, ks: list[int], repeats: int, rounds: int,
            on_run: Callable[[str, int], OnRound]) -> list[dict[str, Any]]:
    """Built-in and task arms alternated (A B A B ...) at each K; pooled medians and their ratio task / built-in."""
    run_arm(builtin, ks[0], 3, on_run("warm-up (not counted)", 3))  # first imports and allocations of the process
    out = []
    for k in ks:
        runs: dict[str, list[dict[str, Any]]] = {builtin.label: [], task.label: []}
        for rep in range(repeats):
            for arm in (builtin, task):
                on_round = on_run(f"mlp K={k:<3} {arm.label:<8} #{rep + 1}", rounds)
                runs[arm.label].append(run_arm(arm, k, rounds, on_round))
        pooled = {label: {"duration_s": _stats([v for r in rs for v in r["durations"]]),
                          "cycle_s": _stats([v for r in rs for v in r["cycles"]])} for label, rs in runs.items()}
        a, b = pooled[builtin.label], pooled[task.label]
        out.append({"workers": k, "repeats": repeats, "pooled": pooled,
                    "ratio_duration": b["duration_s"]["median"] / a["duration_s"]["median"],
                    "ratio_cycle": b["cycle_s"]["median"] / a["cycle_s"]["median"],
                    "pair_ratios": [y["duration_s"]["median"] / x["duration_s"]["median"]
                                    for x, y in zip(runs[builtin.label], runs[task.label], strict=True)],
                    "runs": {label: [{key: v for key, v in r.items() if key != "per_round"} for r in rs]
                             for label, rs in runs.items()}})
    return out


# ---------------------------------------------------------------------------------------------- main
def measure(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    def on_run(description: str, total: int) -> OnRound:
        task = progress.add_task(description, total=total, last="connecting")

        def on_round(rec: dict[str, Any]) -> None:
            progress.update(task, advance=1, last=f"round {rec['round']}: {rec['duration_s']:.3f} s")
        return on_round

    builtin, mlp_task = Arm("built-in", "mlp"), load_arm("task", TASKS / "mlp_task.py")
    comparison = compare(builtin, mlp_task, [int(k) for k in args.workers.split(",")], args.repeats, args.rounds,
                         on_run)
    resnet = load_arm("resnet18-like", TASKS / "resnet18_like.py")
    model = describe_model(resnet)
    runs = {"defaults": run_arm(resnet, args.resnet_workers, args.rounds,
                                on_run(f"resnet18-like K={args.resnet_workers}, defaults", args.rounds),
                                durable=args.durable)}
    if args.dense_rounds >= 2:
        runs["dense downlink"] = run_arm(resnet, args.resnet_workers, args.dense_rounds,
                                         on_run(f"resnet18-like K={args.resnet_workers}, history_mb=0",
                                                args.dense_rounds), history_mb=0.0, durable=args.durable)
    assert resnet.served is not None
    return {"comparison": comparison, "resnet": {
        "model": model, "workers": args.resnet_workers, "durable_updates": args.durable,
        "runs": runs, "wire": {label: wire_ratios(r, model["float32_bytes"]) for label, r in runs.items()},
        "aggregation_alone_s": aggregation_alone(resnet.served[1], args.resnet_workers),
        "downlink_encode": downlink_encode(resnet.served[1])}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21, help="rounds per run; the first is warm-up")
    parser.add_argument("--dense-rounds", type=int, default=6,
                        help="rounds of the ResNet run with history_mb=0 (dense downlink every round); 0: skip it")
    parser.add_argument("--workers", default="10,100", help="worker counts of the built-in vs task comparison")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each arm per worker count")
    parser.add_argument("--resnet-workers", type=int, default=10)
    parser.add_argument("--name", default="task", help="results file stem under bench/results/")
    parser.add_argument("--no-durable", dest="durable", action="store_false",
                        help="durable_updates=False for the ResNet runs (no fsync of every update)")
    args = parser.parse_args(argv)
    if args.rounds < 3:
        parser.error("--rounds must be at least 3 (round 1 is warm-up)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    env, started = environment(), time.perf_counter()
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[last]}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        res = {"environment": env, **measure(args, progress)}
    res["wall_s"] = time.perf_counter() - started
    res["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(res))
    plot(res, RESULTS / f"{args.name}.png")
    console.print(summary_table(res))
    console.print(f"results in {RESULTS / args.name}.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
