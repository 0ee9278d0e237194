"""Framework threads when workers share a machine: the same local training alone and in concurrent worker processes.

Every worker is a process of its own, built as ``fedctl join`` builds one (the framework adapter, the bundled MNIST
sample, training in an executor thread), minus the broker. Cases:

a. one worker with ``join``'s default, ``--threads auto``;
b. K workers at once with ``--threads auto`` (the CPUs divided among the live workers);
c. K workers at once with the framework's own default: one thread per CPU for PyTorch (the behaviour before
   ``--threads auto``; for MXNet, half the CPUs on x86);
d. for reference, one worker with ``--threads 1``: what case a gains, or loses, from its extra threads.

All workers of a case load and warm up first, then start training at the same moment; each reports the wall time of
its own training. Writes ``bench/results/threads.{json,md,png}``.

Usage: ``.venv/bin/python bench/threads.py [--workers 5] [--steps 60] [--batch-size 10] [--rounds 3]
[--backends torch] [--timeout 120]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import select
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
CASES = (("a", "1 worker, default (auto)", 1, "auto"),
         ("b", "K workers, default (auto)", None, "auto"),
         ("c", "K workers, framework default (old behaviour)", None, "framework"),
         ("d", "1 worker, --threads 1 (reference)", 1, "1"))


# -- one worker process --------------------------------------------------------------------------------------------


def child(args: argparse.Namespace) -> int:
    """One worker: build the trainer, warm up, say ready, wait for go, train, print the timings as JSON."""
    from fedctl.data.shards import load_split_as_shard
    from fedctl.models import get_model
    from fedctl.models.zoo import init_params
    from fedctl.worker.frameworks import create_trainer
    from fedctl.worker.threads import SharedThreads, worker_threads

    shard = load_split_as_shard("mnist-sample", "train")
    n = args.steps * args.batch_size
    lo = (args.index * n) % max(1, len(shard.y) - n)
    x, y = shard.x[lo : lo + n], shard.y[lo : lo + n]
    # mode: auto, a count, or "framework" (no budget: the framework's default, as before --threads auto)
    budget = None if args.mode == "framework" else worker_threads(args.mode, {}, directory=Path(args.registry))
    if isinstance(budget, SharedThreads) and budget.workers.path is None:
        raise SystemExit("the worker could not register; the auto case would measure nothing")
    spec = get_model("mlp")
    weights = init_params(spec, seed=0)
    pool = ThreadPoolExecutor(1)  # like the worker, which trains in an executor thread
    trainer = pool.submit(create_trainer, args.backend, spec, x, y, threads=budget).result()
    pool.submit(trainer.fit, weights, 1, args.batch_size, 0.05, 0).result()  # warm-up: allocations, oneDNN kernels
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()  # "go"

    def train() -> dict[str, Any]:
        rounds, per_round, others, cpu0 = [], [], [], time.process_time()
        for r in range(args.rounds):
            t0 = time.perf_counter()
            trainer.fit(weights, 1, args.batch_size, 0.05, r + 1)
            rounds.append(time.perf_counter() - t0)
            per_round.append(budget.last if budget is not None else _framework_threads(args.backend))
            others.append(getattr(budget, "others", None))
        return {"round_s": rounds, "train_s": sum(rounds), "cpu_s": time.process_time() - cpu0,
                "threads": per_round[-1], "threads_per_round": per_round, "others_busy_cpus": others}

    print(json.dumps(pool.submit(train).result()), flush=True)
    return 0


def _framework_threads(backend: str) -> int | None:
    if backend == "torch":
        import torch

        return int(torch.get_num_threads())  # in the training thread: its OpenMP pool
    from fedctl.worker.frameworks.mxnet import _default_cap

    return _default_cap()  # MXNet has no getter; this is its rule (half the CPUs on x86)


# -- the driver ----------------------------------------------------------------------------------------------------


def run_case(args: argparse.Namespace, backend: str, workers: int, mode: str) -> dict[str, Any]:
    """Start ``workers`` processes, release them together, and collect each one's timings."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONWARNINGS"] = "ignore"
    with tempfile.TemporaryDirectory(prefix="fedctl-bench-threads-") as registry:
        cmd = [sys.executable, __file__, "--child", "--backend", backend, "--mode", mode, "--registry", registry,
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--rounds", str(args.rounds)]
        procs = [subprocess.Popen([*cmd, "--index", str(i)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  env=env, text=True) for i in range(workers)]
        try:
            deadline = time.monotonic() + args.timeout
            for p in procs:
                _expect(p, deadline, "ready")
            started = time.perf_counter()
            for p in procs:
                assert p.stdin is not None
                p.stdin.write("go\n")
                p.stdin.flush()
            results = [_expect(p, deadline, "train_s") for p in procs]
            elapsed = time.perf_counter() - started
            for p in procs:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    times = [r["train_s"] for r in results]
    return {"backend": backend, "workers": workers, "mode": mode, "threads": [r["threads"] for r in results],
            "threads_per_round": [r["threads_per_round"] for r in results],
            "others_busy_cpus": [r["others_busy_cpus"] for r in results],
            "train_s": {"min": min(times), "median": statistics.median(times), "max": max(times)},
            "per_worker_s": times, "cpu_s": [r["cpu_s"] for r in results], "wall_all_s": elapsed}


def _expect(proc: subprocess.Popen, deadline: float, key: str) -> dict[str, Any]:
    assert proc.stdout is not None
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
            raise TimeoutError(f"a worker gave no {key!r} within the timeout (raise --timeout)")
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a worker exited (code {proc.wait()}) before {key!r}")
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue  # a framework's own output
        if key in msg:
            return dict(msg)


def environment() -> dict[str, Any]:
    from fedctl.worker.threads import available_cpus

    return {"date": dt.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
            "platform": platform.platform(), "cpus": os.cpu_count(), "available_cpus": available_cpus(),
            "load_average_1min_at_start": round(os.getloadavg()[0], 2)}


def markdown(res: dict[str, Any]) -> str:
    env, work = res["environment"], res["work"]
    lines = ["# Framework threads with several workers on one machine", "",
             (f"{env['date']} · {env['available_cpus']} CPUs · Python {env['python']} · load average "
              f"{env['load_average_1min_at_start']} at start, {env['load_average_1min_at_end']} at the end"), "",
             (f"Each worker: {work['rounds']} × `fit` of one epoch = {work['steps']} SGD steps at B = "
              f"{work['batch_size']} on its own {work['steps'] * work['batch_size']} images of the bundled MNIST "
              "sample (MLP), in its own process, all workers released together after a warm-up. Time = that "
              "worker's own training wall time."), "",
             "| backend | case | workers | threads per worker | min | median | max | median / case a | load before |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    summaries = []
    for backend, cases in res["backends"].items():
        base = cases["a"]["train_s"]["median"]
        for key, label, _, _ in CASES:
            c = cases[key]
            t = c["train_s"]
            threads = sorted({str(n) for per_worker in c["threads_per_round"] for n in per_worker})
            lines.append(f"| {backend} | {key}. {label.replace('K', str(c['workers']))} | {c['workers']} | "
                         f"{', '.join(threads)} | {t['min']:.3f} s | {t['median']:.3f} s | {t['max']:.3f} s | "
                         f"{t['median'] / base:.1f}× | {c['load_average_1min_before']} |")
        b, c = cases["b"]["train_s"], cases["c"]["train_s"]
        summaries.append(f"{backend}: with {cases['b']['workers']} workers, the framework's default threads take "
                         f"{c['median'] / b['median']:.1f}× the median and {c['max'] / b['max']:.1f}× the slowest "
                         "worker's time of `--threads auto`.")
    lines += ["", ("Threads per worker: every count a worker used in its rounds (`--threads auto` recounts before "
                   "each). `load before`: the machine's 1-minute load average before the case."), ""]
    lines += [f"* {line}" for line in summaries]
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(res["backends"])
    fig, axes = plt.subplots(1, len(backends), figsize=(5.5 * len(backends), 4.2), squeeze=False)
    for ax, backend in zip(axes[0], backends):
        cases = res["backends"][backend]
        labels, med, lo, hi = [], [], [], []
        for key, _, _, mode in CASES:
            t = cases[key]["train_s"]
            k = cases[key]["workers"]
            short = {"auto": "auto", "framework": "framework\ndefault"}.get(mode, f"--threads {mode}")
            labels.append(f"{key}. {k} worker{'s' if k > 1 else ''}\n{short}")
            med.append(t["median"])
            lo.append(t["median"] - t["min"])
            hi.append(t["max"] - t["median"])
        colours = ["tab:blue", "tab:green", "tab:red", "tab:gray"]
        bars = ax.bar(range(len(med)), med, yerr=[lo, hi], capsize=5, color=colours[: len(med)])
        ax.bar_label(bars, fmt="%.2f s", padding=8, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylim(min(med) / 2, max(m + h for m, h in zip(med, hi)) * 3)
        ax.set_xticks(range(len(med)), labels, fontsize=8)
        ax.set_ylabel("training time per worker, s\n(median; whiskers: min, max)")
        ax.set_title(f"{backend}: {res['work']['rounds'] * res['work']['steps']} MLP steps per worker")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=5, help="K, the concurrent workers of cases b and c")
    parser.add_argument("--steps", type=int, default=60, help="SGD steps per round (the shard is steps × B images)")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="timed fit calls per worker")
    parser.add_argument("--backends", default="auto", help="comma-separated torch, mxnet; auto: those installed")
    parser.add_argument("--timeout", type=float, default=120.0, help="per case, seconds")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="torch", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--registry", default="", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"environment": environment(), "backends": {},
                           "work": {"steps": args.steps, "batch_size": args.batch_size, "rounds": args.rounds,
                                    "model": "mlp", "workers": args.workers}}
    if args.backends == "auto":
        from fedctl.worker.frameworks import available_backends

        args.backends = ",".join(b for b in ("torch", "mxnet") if b in available_backends())
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        cases = {}
        for key, label, workers, mode in CASES:
            k = workers or args.workers
            print(f"{backend}: {key}. {label.replace('K', str(k))} ...", end=" ", flush=True)
            load = round(os.getloadavg()[0], 2)
            cases[key] = run_case(args, backend, k, mode)
            cases[key]["load_average_1min_before"] = load
            t = cases[key]["train_s"]
            print(f"min {t['min']:.3f} s, median {t['median']:.3f} s, max {t['max']:.3f} s; threads "
                  f"{cases[key]['threads']}", flush=True)
        res["backends"][backend] = cases
    res["environment"]["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    (RESULTS / "threads.json").write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / "threads.md").write_text(markdown(res))
    plot(res, RESULTS / "threads.png")
    print(markdown(res))
    print(f"results in {RESULTS}/threads.json, threads.md, threads.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
