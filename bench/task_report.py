"""The report of ``bench/task_overhead.py`` (``make bench``, tasks): bench/results/task.md, the PNG's three panels
and the console table, from the measured results (a dict, as written to task.json)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

RATIO_TARGET = 1.02  # bytes per worker per round per direction / model float32 bytes


def _ratio_cells(w: dict[str, Any]) -> str:
    return " | ".join(f"{w[key]['round1']:.4f}× / {w[key]['median_later']:.4f}×"
                      for key in ("uplink_push", "uplink_all", "downlink_model", "downlink_all"))


def markdown(res: dict[str, Any]) -> str:
    env, m = res["environment"], res["resnet"]["model"]
    lines = ["# A user task on the wire: ResNet-18-sized model, and task vs built-in", "",
             (f"{env['date']} · {env['cpus']} CPUs ({env['processor']}) · Python {env['python']} · pyzmq "
              f"{env['pyzmq']} / libzmq {env['libzmq']} · fedctl {env['fedctl']} · load average "
              f"{env['load_average_1min']} at start, {res['load_average_1min_end']} at the end · "
              f"{res['wall_s']:.0f} s in all"), "",
             f"## `{m['name']}` (bench/tasks/resnet18_like.py), {res['resnet']['workers']} no-op workers, FedAvg", "",
             (f"{m['values']:,} float32 values ({m['float32_bytes']:,} bytes) in {m['tensors']} tensors "
              f"({m['parameter_tensors']} parameters + {m['buffer_tensors']} BatchNorm running statistics; the integer "
              f"`num_batches_tracked` buffers stay local): {'within' if m['fits_one_message'] else 'OVER'} a "
              f"message's {m['max_tensors']} tensors. {m['float32_bytes'] / 2**20:.1f} MiB is below the default "
              f"64 MiB `chunk_above`, so the model and every update travel whole, not in chunks."), "",
             ("| run | rounds measured | duration median | duration p90 | cycle median | cycle p90 | load before | "
              "all participated |"), "|---|---:|---:|---:|---:|---:|---:|:---:|"]
    for label, r in res["resnet"]["runs"].items():
        d, c = r["duration_s"], r["cycle_s"]
        lines.append(f"| {label} | {r['measured_rounds']} | {d['median']:.3f} s | {d['p90']:.3f} s | "
                     f"{c['median']:.3f} s | {c['p90']:.3f} s | {r['load_average_1min_before']} | "
                     f"{'yes' if r['all_participated'] else 'no'} |")
    enc = res["resnet"]["downlink_encode"]
    lines += ["", (f"Outside the broker: FedAvg of {res['resnet']['workers']} updates "
                   f"{res['resnet']['aggregation_alone_s']:.3f} s; encoding the dense model's frames "
                   f"{enc['plain_s']:.3f} s plain, {enc['zlib_s']:.3f} s with zlib (to {enc['zlib_ratio']:.4f}× "
                   f"of its float32 bytes). Durable updates (fsync of every push before its ack): "
                   f"{'on' if res['resnet']['durable_updates'] else 'off'}."),
              "", ("Bytes per worker per round / model float32 bytes, round 1 / median of rounds 2…N. *push* and "
                   "*model* are the payloads of those messages; *all* is everything on the broker's socket "
                   "(pulls, heartbeats, acks too)."), "",
              f"| run | uplink push | uplink all | downlink model | downlink all | ≤ {RATIO_TARGET}× |",
              "|---|---:|---:|---:|---:|:---:|"]
    for label, w in res["resnet"]["wire"].items():
        ok = all(w["pass"].values())
        lines.append(f"| {label} | {_ratio_cells(w)} | {'pass' if ok else '**FAIL**'} |")
    lines += ["", _downlink_note(res), "",
              "## The built-in `mlp` vs the same MLP as a task (bench/tasks/mlp_task.py)", "",
              ("Same tensors (fc1/fc2/fc3, 109,386 values), no-op workers, runs alternated built-in / task, "
               f"{res['comparison'][0]['repeats']} of each per K; medians over all measured rounds of the repeats."),
              "", ("| workers | built-in duration | task duration | ratio | built-in cycle | task cycle | ratio | "
                   "per-repeat duration ratios |"), "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for c in res["comparison"]:
        b, t = c["pooled"]["built-in"], c["pooled"]["task"]
        pairs = ", ".join(f"{p:.2f}" for p in c["pair_ratios"])
        lines.append(f"| {c['workers']} | {b['duration_s']['median'] * 1e3:.1f} ms | "
                     f"{t['duration_s']['median'] * 1e3:.1f} ms | {c['ratio_duration']:.3f} | "
                     f"{b['cycle_s']['median'] * 1e3:.1f} ms | {t['cycle_s']['median'] * 1e3:.1f} ms | "
                     f"{c['ratio_cycle']:.3f} | {pairs} |")
    spread = [p for c in res["comparison"] for p in c["pair_ratios"]]
    ratios = ", ".join(f"{c['ratio_duration']:.3f} at K={c['workers']}" for c in res["comparison"])
    lines += ["", (f"Ratios task / built-in of the pooled medians: {ratios}. "
                   f"Single repeat pairs range from {min(spread):.2f} to {max(spread):.2f}: a difference smaller than "
                   "that spread is not measurable on this machine.")]
    return "\n".join(lines) + "\n"


def _downlink_note(res: dict[str, Any]) -> str:
    """What the defaults run sent after round 1 (an empty delta: no-op workers leave the model bit-identical)."""
    later = res["resnet"]["runs"]["defaults"]["per_round"][1:]
    per_worker = statistics.median(r["model_bytes_out"] / r["participants"] for r in later)
    return (f"With the defaults, rounds 2…N sent each worker {per_worker:.0f} bytes of `model`: FedAvg of identical "
            "no-op updates leaves the model bit for bit as it was, so a worker holding the previous version gets an "
            "empty delta. With real training every weight changes, the delta is no smaller than the whole model, and "
            "the broker sends the model dense, as in the `dense downlink` run (`history_mb=0`).")


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, (label, r) in enumerate(res["resnet"]["runs"].items()):
        ax1.plot(range(2, 2 + len(r["durations"])), r["durations"], marker="o", ms=3, color=f"C{i}",
                 label=f"{label}: duration")
        ax1.plot(range(3, 3 + len(r["cycles"])), r["cycles"], ls=":", color=f"C{i}", label=f"{label}: cycle")
    ax1.set_xlabel("round")
    ax1.set_ylabel("seconds")
    ax1.set_ylim(bottom=0)
    ax1.set_title(f"{res['resnet']['model']['name']}, {res['resnet']['workers']} no-op workers")
    ax1.legend(fontsize=7)

    keys = ("uplink_all", "downlink_all")
    bars = [(f"{label}\n{phase}", [w[k][key] for k in keys]) for label, w in res["resnet"]["wire"].items()
            for phase, key in (("round 1", "round1"), ("rounds 2…N", "median_later"))]
    x = np.arange(len(keys))
    width = 0.8 / len(bars)
    for i, (label, vals) in enumerate(bars):
        b = ax2.bar(x + (i - (len(bars) - 1) / 2) * width, vals, width, label=label.replace("\n", ", "))
        ax2.bar_label(b, fmt="%.3f", fontsize=6, padding=2, rotation=90)
    ax2.axhline(RATIO_TARGET, color="tab:red", ls="--", lw=1, label=f"target ≤ {RATIO_TARGET}×")
    ax2.set_xticks(x, ["uplink (all messages)", "downlink (all messages)"])
    ax2.set_ylabel("bytes per worker per round / model float32 bytes")
    ax2.set_title("Bytes on the wire per worker")
    ax2.set_ylim(0, 1.6)
    ax2.legend(fontsize=6, loc="upper center", ncol=2)

    for offset, label, colour in ((-0.2, "built-in", "tab:blue"), (0.2, "task", "tab:orange")):
        xs = np.arange(len(res["comparison"]))
        med = [c["pooled"][label]["duration_s"]["median"] * 1e3 for c in res["comparison"]]
        bars2 = ax3.bar(xs + offset, med, 0.4, color=colour, label=f"{label} (median; dots: each run)")
        ax3.bar_label(bars2, fmt="%.1f ms", fontsize=7, padding=2)
        for i, c in enumerate(res["comparison"]):
            runs = [r["duration_s"]["median"] * 1e3 for r in c["runs"][label]]
            ax3.scatter(np.full(len(runs), i + offset), runs, color="black", s=8, zorder=3)
    ax3.set_xticks(np.arange(len(res["comparison"])), [f"K={c['workers']}" for c in res["comparison"]])
    ax3.set_ylabel("broker duration per round (ms)")
    ax3.set_title("mlp: built-in vs the same model as a task")
    ax3.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_table(res: dict[str, Any]) -> Table:
    table = Table(title="user tasks: per-round cost")
    for col in ("measure", "value", "target"):
        table.add_column(col)
    for label, r in res["resnet"]["runs"].items():
        table.add_row(f"resnet18-like round, {label}", f"median {r['duration_s']['median']:.3f} s, "
                      f"cycle {r['cycle_s']['median']:.3f} s", "")
    for label, w in res["resnet"]["wire"].items():
        for d in ("uplink", "downlink"):
            table.add_row(f"{d} per worker, {label}", f"{max(w[f'{d}_all'].values()):.4f}× model",
                          f"{'pass' if w['pass'][d] else 'FAIL'} (≤ {RATIO_TARGET}×)")
    for c in res["comparison"]:
        table.add_row(f"mlp task / built-in, K={c['workers']}", f"{c['ratio_duration']:.3f} (duration), "
                      f"{c['ratio_cycle']:.3f} (cycle)", "")
    return table


