"""``make bench``: codec throughput and broker overhead per round; writes bench/results/core.{json,md,png}.

Usage: ``.venv/bin/python bench/run.py [--rounds 21] [--workers 10,100] [--repeats 200] [--profile auto]``.
Targets are reported as pass/fail, never asserted: a slow machine still gets its numbers written.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import broker_overhead
import codec
import numpy as np
import zmq
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import fedctl

RESULTS = Path(__file__).resolve().parent / "results"
console = Console()
if not console.is_terminal:  # piped into a log: don't squeeze the summary into 80 columns
    console.width = 110


def environment() -> dict[str, Any]:
    return {"date": dt.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "numpy": np.__version__, "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version(), "fedctl": fedctl.__version__,
            "load_average_1min": round(os.getloadavg()[0], 2)}


def run_broker(workers: list[int], rounds: int, profile: str) -> list[dict[str, Any]]:
    results = []
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[last]}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        for k in workers:
            task = progress.add_task(f"broker, {k:>3} no-op workers", total=rounds, last="connecting")

            def on_round(rec: dict[str, Any], task: Any = task) -> None:
                progress.update(task, advance=1, last=f"round {rec['round']}: {rec['duration_s']:.3f} s")

            result = broker_overhead.run(k, rounds, on_round)
            missed = not result.get("target", {}).get("pass", True)
            if k >= 100 and (profile == "always" or (profile == "auto" and missed)):
                # A separate run under cProfile (its timings are inflated and not the ones reported above).
                progress.update(task, last="profiling")
                path = RESULTS / f"profile_k{k}.txt"
                result["profiled_run_duration_s"] = broker_overhead.run(k, rounds, profile_to=path)["duration_s"]
                result["profile"] = str(path.relative_to(RESULTS.parent.parent))
            progress.update(task, last=f"median {result['duration_s']['median']:.3f} s")
            results.append(result)
    return results


def markdown(codec_res: dict[str, Any], broker_res: list[dict[str, Any]], env: dict[str, Any]) -> str:
    lines = ["# fedctl core benchmarks", "",
             (f"{env['date']} · {env['cpus']} CPUs ({env['processor']}) · Python {env['python']} · "
              f"numpy {env['numpy']} · pyzmq {env['pyzmq']} / libzmq {env['libzmq']} · fedctl {env['fedctl']} · "
              f"load average {env['load_average_1min']} at start"), "",
             "## Codec: dense `push` of a whole model (make + encode, decode with validation)", "",
             ("Throughput = float32 tensor bytes / median time. Each regime runs in a fresh process with glibc "
              "malloc pinned by environment: *warm* = freed message buffers stay in the heap and are reused; "
              "*trimmed* = the heap top goes back to the OS after every message and is page-faulted in again (what a "
              "real process falls into depending on its allocation history; see README)."), "",
             ("| regime | model | parameters | tensor bytes | encode | decode | round trip | round-trip time "
              "| page faults / round trip |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for regime, res in codec_res["regimes"].items():
        for name, r in res["models"].items():
            enc, dec, rt = r["encode"], r["decode"], r["roundtrip"]
            lines.append(f"| {regime} | {name} | {r['params']:,} | {r['tensor_bytes']:,} | "
                         f"{enc['MB_per_s']:,.0f} MB/s ({enc['GB_per_s']:.2f} GB/s) | "
                         f"{dec['MB_per_s']:,.0f} MB/s ({dec['GB_per_s']:.2f} GB/s) | "
                         f"{rt['MB_per_s']:,.0f} MB/s ({rt['GB_per_s']:.2f} GB/s) | {rt['median_us']:.0f} µs | "
                         f"{r['page_faults_per_roundtrip']:.0f} |")
    t = codec_res["target"]
    verdicts = "; ".join(f"{regime} {gbps:.2f} GB/s **{'pass' if t['pass'][regime] else 'FAIL'}**"
                         for regime, gbps in t["measured_GB_per_s"].items())
    lines += ["", f"Target: {t['what']} ≥ {t['GB_per_s']:g} GB/s — {verdicts}.", "",
              "## Broker overhead per round (no-op workers, dense MLP updates, loopback TCP)", "",
              ("`duration` is the broker's metrics.jsonl `duration_s` (hand-out → all pushes in → FedAvg); `cycle` "
               "is completion to completion (adds checkpoint write and the wait for every worker to pull again). "
               "Round 1 is warm-up and left out."), "",
              ("| workers | rounds measured | duration median | duration p90 | cycle median | cycle p90 | "
               "in per round | out per round | FedAvg alone | all participated |"),
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for r in broker_res:
        d, c = r["duration_s"], r["cycle_s"]
        lines.append(f"| {r['workers']} | {r['measured_rounds']} | {d['median']:.3f} s | {d['p90']:.3f} s | "
                     f"{c['median']:.3f} s | {c['p90']:.3f} s | {r['bytes_in_per_round'] / 1e6:.1f} MB | "
                     f"{r['bytes_out_per_round'] / 1e6:.1f} MB | {r['aggregation_alone_s'] * 1e3:.1f} ms | "
                     f"{'yes' if r['all_participated'] else 'no'} |")
    for r in broker_res:
        if "target" in r:
            t = r["target"]
            lines += ["", (f"Target: {t['what']} ≤ {t['seconds']:g} s — measured {r['duration_s']['median']:.3f} s: "
                           f"**{'pass' if t['pass'] else 'FAIL'}**.")]
        if "profile" in r:
            lines += ["", f"Profile of the {r['workers']}-worker run: `{Path(r['profile']).name}`."]
    return "\n".join(lines) + "\n"


def plot(codec_res: dict[str, Any], broker_res: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = [f"K={r['workers']}" for r in broker_res]
    x = np.arange(len(broker_res))
    for offset, key, colour in ((-0.2, "duration_s", "tab:blue"), (0.2, "cycle_s", "tab:gray")):
        med = [r[key]["median"] for r in broker_res]
        p90 = [r[key]["p90"] for r in broker_res]
        bars = ax1.bar(x + offset, med, 0.4, color=colour, label=f"{key[:-2]} (median, whisker p90)",
                       yerr=[np.zeros(len(med)), np.maximum(np.subtract(p90, med), 0)], capsize=4)
        ax1.bar_label(bars, fmt="%.3f s", padding=6, fontsize=8)
    ax1.axhline(broker_overhead.TARGET_ROUND_S, color="tab:red", ls="--", lw=1, label="target at K=100")
    ax1.set_xticks(x, labels)
    ax1.set_ylabel("seconds per round")
    ax1.set_title("Broker overhead per round (no-op workers, MLP)")
    ax1.legend(fontsize=8)

    parts = ("encode", "decode", "roundtrip")
    bars = [(regime, name, r) for regime, res in codec_res["regimes"].items() for name, r in res["models"].items()]
    xs = np.arange(len(parts))
    width = 0.8 / len(bars)
    for i, (regime, name, r) in enumerate(bars):
        vals = [r[p]["GB_per_s"] for p in parts]
        ax2.bar(xs + (i - (len(bars) - 1) / 2) * width, vals, width, label=f"{name}, {regime} heap",
                hatch="//" if regime != "warm" else None, color=f"C{i % 2}", alpha=1.0 if regime == "warm" else 0.6)
    ax2.axhline(codec.TARGET_ROUNDTRIP_GBPS, color="tab:red", ls="--", lw=1, label="round-trip target (MLP)")
    ax2.set_xticks(xs, ["encode", "decode", "round trip"])
    ax2.set_ylabel("GB/s (float32 tensor bytes)")
    ax2.set_title("Codec throughput, dense push")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_table(codec_res: dict[str, Any], broker_res: list[dict[str, Any]]) -> Table:
    table = Table(title="fedctl core benchmarks")
    for col in ("measure", "value", "target"):
        table.add_column(col)
    target = codec_res["target"]
    for regime, res in codec_res["regimes"].items():
        for name, r in res["models"].items():
            verdict = ""
            if name == "mlp":
                verdict = f"{'pass' if target['pass'][regime] else 'FAIL'} (≥ {target['GB_per_s']:g} GB/s)"
            table.add_row(f"codec round trip {name} ({regime})", f"{r['roundtrip']['GB_per_s']:.2f} GB/s",
                          verdict)
    for r in broker_res:
        t = r.get("target")
        verdict = f"{'pass' if t['pass'] else 'FAIL'} (≤ {t['seconds']:g} s)" if t else ""
        table.add_row(f"broker round, K={r['workers']}",
                      f"median {r['duration_s']['median']:.3f} s, p90 {r['duration_s']['p90']:.3f} s", verdict)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21, help="rounds per broker run; the first is warm-up")
    parser.add_argument("--workers", default="10,100", help="comma-separated worker counts")
    parser.add_argument("--repeats", type=int, default=200, help="timed codec iterations per model")
    parser.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                        help="cProfile the broker at K>=100: auto = only when it misses its target")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 is warm-up)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = environment()
    with console.status("codec throughput"):
        codec_res = codec.run(args.repeats)
    broker_res = run_broker([int(k) for k in args.workers.split(",")], args.rounds, args.profile)
    results = {"environment": env, "codec": codec_res, "broker": broker_res}
    (RESULTS / "core.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "core.md").write_text(markdown(codec_res, broker_res, env))
    plot(codec_res, broker_res, RESULTS / "core.png")
    console.print(summary_table(codec_res, broker_res))
    console.print(f"results in {RESULTS}/core.json, core.md, core.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
