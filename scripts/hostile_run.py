"""The same seeded federation twice, undisturbed and under attack by fedctl.testing.hostile; prints a JSON summary.

Usage: ``.venv/bin/python scripts/hostile_run.py [--workers 4] [--rounds 5] [--identities 200] [--half-open 50]
[--max-message-mb 1] [--behaviours garbage,flood,...] [--out runs/hostile.json]``.

Each federation (an in-process broker: MLP, FedAvg, sync rounds with C = 1, plus the honest numpy workers) runs in a
fresh child process, so its peak RSS (VmHWM) is its own; the attacker runs in a third process for the whole
attacked run, and the honest workers start only once it is under way (the flood joined, half-open connections
held). The run is seeded and the broker aggregates in worker order, so the final model must be bit-identical.
Exit status 0 when the broker survived, the models match and RSS stayed within 2x the undisturbed peak + 200 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import multiprocessing as mp
import os
import queue
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq.asyncio

from fedctl.broker.config import BrokerConfig
from fedctl.broker.policy import SyncConfig
from fedctl.broker.service import Broker
from fedctl.models import get_model
from fedctl.strategies import TaskConfig
from fedctl.testing.hostile import BEHAVIOURS, DEFAULT_BEHAVIOURS, HostileClient, HostileConfig
from fedctl.testing.trainers import NumpyMLPTrainer, synthetic_digits
from fedctl.worker.client import Worker, WorkerConfig

RSS_FACTOR, RSS_SLACK_MB = 2.0, 200.0


def proc_status_mb(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def broker_config(args: argparse.Namespace, state_dir: Path) -> BrokerConfig:
    return BrokerConfig(bind="tcp://127.0.0.1:*", model="mlp", strategy="fedavg", rounds=args.rounds,
                        task=TaskConfig(1, 10, 0.05), sync=SyncConfig(1.0, args.workers, 120.0), seed=args.seed,
                        state_dir=state_dir, heartbeat_interval_s=0.5, liveness_s=10.0, done_linger_s=0.5,
                        max_message_bytes=int(args.max_message_mb * 2**20))


def honest_worker(ctx: zmq.asyncio.Context, endpoint: str, index: int) -> Worker:
    x, y = synthetic_digits(200, seed=index)
    return Worker(WorkerConfig(endpoint, f"w{index}", "numpy", len(y)), lambda spec: NumpyMLPTrainer(spec, x, y),
                  ctx=ctx)


def digest(weights: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode() + weights[name].tobytes())
    return h.hexdigest()


async def federate(args: argparse.Namespace, state_dir: Path, endpoint_q: Any, attack_ready: Any) -> dict[str, Any]:
    ctx = zmq.asyncio.Context()
    x, y = synthetic_digits(300, seed=99)
    broker = Broker(broker_config(args, state_dir), evaluator=NumpyMLPTrainer(get_model("mlp"), x, y).evaluate,
                    ctx=ctx)
    workers = [honest_worker(ctx, broker.endpoint, i) for i in range(args.workers)]
    rss_idle = proc_status_mb("VmRSS")
    try:
        started = time.monotonic()
        async with asyncio.TaskGroup() as tg:
            run = tg.create_task(broker.run())
            if attack_ready is not None:
                endpoint_q.put(broker.endpoint)
                if not await asyncio.to_thread(attack_ready.wait, 120):
                    raise RuntimeError("the attacker never got under way")
            crew = [tg.create_task(w.serve()) for w in workers]
        summary = run.result()
        rejected = summary["rejected"]
        return {"broker_survived": True, "rounds": summary["rounds"], "version": summary["version"],
                "rejected": dict(sorted(rejected.items())), "rejected_total": sum(rejected.values()),
                "final_accuracy": summary["last"].get("test_accuracy"), "weights_sha256": digest(broker.store.weights),
                "workers_finished": sum(t.result()["final_round"] == args.rounds for t in crew),
                "duration_s": round(time.monotonic() - started, 2), "rss_idle_mb": round(rss_idle, 1),
                "peak_rss_mb": round(proc_status_mb("VmHWM"), 1), "transport": vars(broker.transport.counters)}
    finally:
        ctx.destroy(linger=0)


def describe(exc: BaseException) -> str:
    """The leaf exceptions of ``exc`` (TaskGroups wrap what ended them in exception groups)."""
    group = getattr(exc, "exceptions", None)  # an ExceptionGroup
    if isinstance(group, tuple):
        return "; ".join(describe(e) for e in group)
    return f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"


def federation_main(args: argparse.Namespace, endpoint_q: Any, attack_ready: Any, result_q: Any) -> None:
    """Child process: one federation; puts its result (or the error that ended it) on ``result_q``."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("fedctl.broker.service").setLevel(logging.ERROR)  # one WARNING per refused message
    with tempfile.TemporaryDirectory() as tmp:
        try:
            result_q.put(asyncio.run(federate(args, Path(tmp), endpoint_q, attack_ready)))
        except Exception as exc:  # noqa: BLE001 - a broker that died is the finding: the parent reports it
            logging.getLogger("hostile_run").exception("the federation failed")
            result_q.put({"broker_survived": False, "error": describe(exc)})


async def attack(args: argparse.Namespace, endpoint: str, ready: Any, stop: Any) -> dict[str, Any]:
    ctx = zmq.asyncio.Context()
    client = HostileClient(HostileConfig(endpoint, tuple(args.behaviours), args.identities, args.half_open,
                                         int(args.max_message_mb * 2**20), burst=args.burst,
                                         interval_s=args.interval, seed=args.seed), ctx)

    async def control() -> None:
        await client.wait_ready()
        ready.set()
        await asyncio.to_thread(stop.wait, args.timeout)
        client.stop()

    try:
        started = time.monotonic()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(control())
            stats = await client.run()
        return {**stats.to_dict(), "duration_s": round(time.monotonic() - started, 2),
                "peak_rss_mb": round(proc_status_mb("VmHWM"), 1)}
    finally:
        ctx.destroy(linger=0)


def attack_main(args: argparse.Namespace, endpoint: str, ready: Any, stop: Any, result_q: Any) -> None:
    logging.basicConfig(level=logging.WARNING)
    result_q.put(asyncio.run(attack(args, endpoint, ready, stop)))


def run_once(args: argparse.Namespace, attacked: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
    spawn = mp.get_context("spawn")
    endpoint_q, result_q, attack_q = spawn.Queue(), spawn.Queue(), spawn.Queue()
    ready, stop = (spawn.Event(), spawn.Event()) if attacked else (None, None)
    fed = spawn.Process(target=federation_main, args=(args, endpoint_q, ready, result_q))
    fed.start()
    attacker = None
    if attacked:
        attacker = spawn.Process(target=attack_main, args=(args, endpoint_q.get(timeout=60), ready, stop, attack_q))
        attacker.start()
    try:
        result = result_q.get(timeout=args.timeout)
    except queue.Empty:
        result = {"broker_survived": False, "error": f"the federation did not end within {args.timeout:g} s"}
    attack_result = None
    if attacker is not None and stop is not None:
        stop.set()
        attack_result = attack_q.get(timeout=60)
    for proc in (fed, attacker):
        if proc is not None:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    return result, attack_result


def summarise(clean: dict[str, Any], attacked: dict[str, Any], attack_stats: dict[str, Any] | None,
              args: argparse.Namespace) -> dict[str, Any]:
    bound = RSS_FACTOR * clean.get("peak_rss_mb", 0.0) + RSS_SLACK_MB
    same = attacked.get("weights_sha256") == clean.get("weights_sha256")
    checks = {"broker_survived": bool(clean.get("broker_survived") and attacked.get("broker_survived")),
              "model_bit_identical": same and "weights_sha256" in clean,
              "honest_workers_finished": attacked.get("workers_finished") == args.workers,
              "rss_bounded": attacked.get("peak_rss_mb", float("inf")) <= bound}
    return {"ok": all(checks.values()), "checks": checks, "rss_bound_mb": round(bound, 1),
            "settings": {k: v for k, v in vars(args).items() if k != "out"}, "cpus": os.cpu_count(),
            "load_average_1min": round(os.getloadavg()[0], 2), "undisturbed": clean, "attacked": attacked,
            "attack": attack_stats}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=4, help="honest workers (all sampled: C = 1)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--identities", type=int, default=200, help="DEALERs of the join/heartbeat flood")
    p.add_argument("--half-open", type=int, default=50, help="raw TCP connections held mid-handshake")
    p.add_argument("--max-message-mb", type=float, default=1.0, help="the broker's --max-message-mb")
    p.add_argument("--behaviours", type=lambda s: s.split(","), default=list(DEFAULT_BEHAVIOURS),
                   help=f"comma-separated, from {','.join(sorted(BEHAVIOURS))}")
    p.add_argument("--burst", type=int, default=5, help="messages per behaviour per interval")
    p.add_argument("--interval", type=float, default=0.01, help="seconds between bursts")
    p.add_argument("--timeout", type=float, default=600.0, help="give up on a federation after this many seconds")
    p.add_argument("--out", type=Path, help="also write the JSON summary here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    clean, _ = run_once(args, attacked=False)
    attacked, stats = run_once(args, attacked=True)
    report = summarise(clean, attacked, stats, args)
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
