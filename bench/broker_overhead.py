"""Broker overhead per round: an in-process Broker and K no-op workers over loopback TCP.

The broker (fedctl.broker.service.Broker, FedAvg on the MLP, no evaluator) runs in this process; all K workers
(fedctl.worker.client.Worker with NoOpTrainer, which returns the weights it was given instantly) run in one
separate process, so the two sides do not share a GIL. Every round moves K dense MLP models down and K up.

Per round we report the broker's own ``duration_s`` from metrics.jsonl (model hand-out → every push received →
aggregation) and the cycle time between consecutive round completions (adds the checkpoint write and the wait for
all K workers to pull again). Round 1 is warm-up (connections, first allocations) and is left out.
"""

from __future__ import annotations

import asyncio
import cProfile
import io
import itertools
import json
import logging
import multiprocessing as mp
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from fedctl.broker.config import BrokerConfig
from fedctl.broker.policy import SyncConfig
from fedctl.broker.service import Broker
from fedctl.models import get_model, init_params
from fedctl.sim.noop_worker import EXAMPLES
from fedctl.sim.noop_worker import serve as noop_workers
from fedctl.strategies import TaskConfig, Update, get_strategy

TARGET_ROUND_S = 0.3  # at 100 workers
EXAMPLES_PER_WORKER = EXAMPLES  # what each no-op worker reports


# ---------------------------------------------------------------------------------------------- worker process
def worker_process(endpoint: str, k: int) -> None:
    """Entry point of the child process: K no-op workers in one event loop until the broker says done."""
    logging.basicConfig(level=logging.WARNING, format="[workers] %(levelname)s %(name)s: %(message)s")
    asyncio.run(noop_workers(endpoint, "noop", k, noise=0.0, connect_timeout_s=60, max_backoff_s=10.0))


# ---------------------------------------------------------------------------------------------- broker side
def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"median": float("nan"), "p90": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(values), "p90": float(np.percentile(values, 90)), "min": min(values),
            "max": max(values), "n": len(values)}


async def _run_broker(k: int, rounds: int, state_dir: Path, on_round: Callable[[dict[str, Any]], None],
                      profiler: cProfile.Profile | None) -> tuple[dict[str, Any], list[float], int | None]:
    ctx = zmq.asyncio.Context()
    config = BrokerConfig(bind="tcp://127.0.0.1:*", model="mlp", strategy="fedavg", rounds=rounds,
                          task=TaskConfig(1, 10, 0.1), sync=SyncConfig(1.0, k, 60.0), state_dir=state_dir,
                          heartbeat_interval_s=1.0, liveness_s=30.0, done_linger_s=2.0)
    completed: list[float] = []

    def record(rec: dict[str, Any]) -> None:
        completed.append(time.perf_counter())
        on_round(rec)

    broker = Broker(config, None, on_round=record, ctx=ctx)
    child = mp.get_context("spawn").Process(target=worker_process, args=(broker.endpoint, k), daemon=True)
    child.start()
    try:
        if profiler is not None:
            profiler.enable()
        summary = await broker.run()
    finally:
        if profiler is not None:
            profiler.disable()
        ctx.destroy(linger=0)
        await asyncio.to_thread(child.join, 30)
        if child.is_alive():
            child.kill()
            child.join(5)
    cycles = [b - a for a, b in itertools.pairwise(completed)]
    return summary, cycles, child.exitcode


def time_aggregation(k: int, repeats: int = 5) -> float:
    """Median seconds of one FedAvg aggregation of K MLP updates, outside the broker (for the breakdown)."""
    spec = get_model("mlp")
    weights = init_params(spec, 0)
    updates = [Update(f"w{i}", EXAMPLES_PER_WORKER, init_params(spec, i + 1), "weights", 0, {}) for i in range(k)]
    strategy = get_strategy("fedavg", TaskConfig(1, 10, 0.1))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        strategy.aggregate(weights, updates, {}, np.random.default_rng(0))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(k: int, rounds: int, on_round: Callable[[dict[str, Any]], None] = lambda rec: None,
        profile_to: Path | None = None) -> dict[str, Any]:
    """Run ``rounds`` rounds with K no-op workers; statistics over rounds 2..rounds (round 1 is warm-up)."""
    profiler = cProfile.Profile() if profile_to is not None else None
    with tempfile.TemporaryDirectory(prefix=f"fedctl-bench-k{k}-") as tmp:
        state_dir = Path(tmp) / "state"
        started = time.perf_counter()
        summary, cycles, exitcode = asyncio.run(_run_broker(k, rounds, state_dir, on_round, profiler))
        wall_s = time.perf_counter() - started
        records = [json.loads(line) for line in (state_dir / "metrics.jsonl").read_text().splitlines() if line]
    measured = records[1:]
    duration = _stats([r["duration_s"] for r in measured])
    result = {
        "workers": k, "rounds": rounds, "measured_rounds": len(measured),
        "duration_s": duration, "cycle_s": _stats(cycles[1:] if len(cycles) > 1 else cycles),
        "warmup_round_s": records[0]["duration_s"] if records else None,
        "bytes_in_per_round": statistics.median(r["bytes_in"] for r in measured) if measured else None,
        "bytes_out_per_round": statistics.median(r["bytes_out"] for r in measured) if measured else None,
        "all_participated": all(r["participants"] == k for r in records),
        "rounds_completed": summary["rounds"], "rejected": summary["rejected"], "worker_process_exit": exitcode,
        "aggregation_alone_s": time_aggregation(k), "wall_s": wall_s,
    }
    if k >= 100:
        result["target"] = {"what": f"median broker round at {k} workers", "seconds": TARGET_ROUND_S,
                            "pass": duration["median"] <= TARGET_ROUND_S}
    if profiler is not None and profile_to is not None:
        result["profile"] = str(profile_to)
        _write_profile(profiler, profile_to, k, rounds)
    return result


def _write_profile(profiler: cProfile.Profile, path: Path, k: int, rounds: int) -> None:
    """Top functions of the broker's event-loop thread (aggregation and checkpoints run in other threads)."""
    out = io.StringIO()
    out.write(f"cProfile of the broker's event-loop thread, {k} no-op workers, {rounds} rounds\n\n")
    for key in ("tottime", "cumulative"):
        out.write(f"==== sorted by {key} ====\n")
        pstats.Stats(profiler, stream=out).strip_dirs().sort_stats(key).print_stats(30)
    path.write_text(out.getvalue())
