"""The report of `fedctl bench round`: OUT/round.{json,md,png}."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _key(r: dict[str, Any]) -> tuple[str, int, str, int]:
    return (r["model"], r["workers"], r["system"], r.get("processes", r["workers"]))


def write_round_report(out: Path, results: dict[str, Any]) -> None:
    """Merge ``results`` into OUT/round.json (a rerun of a cell replaces it) and rewrite the markdown and PNG."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "round.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    rows = {_key(r): r for r in old.get("rows", [])}
    rows.update({_key(r): r for r in results["rows"]})
    merged = {**old, **results, "rows": sorted(rows.values(), key=_key)}
    path.write_text(json.dumps(merged, indent=1))
    (out / "round.md").write_text(markdown(merged))
    plot(merged, out / "round.png")


def _mb(b: float) -> str:
    return f"{b / 1e6:.1f} MB" if b >= 1e6 else f"{b / 1e3:.0f} KB"


def _pairs(res: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
    flower = {(r["model"], r["workers"]): r for r in res["rows"] if r["system"] == "flower"}
    return [(r, flower.get((r["model"], r["workers"]))) for r in res["rows"]
            if r["system"] == "fedctl" and r.get("processes") == r["workers"]]


def markdown(res: dict[str, Any]) -> str:
    lines = ["# Round cost: broker and workers as separate processes, against Flower", "",
             f"{res.get('environment', '')}", "",
             "Each worker is its own OS process (`fedctl serve` + N worker processes running fedctl's real worker; "
             "Flower 1.42: `start_server` + N `start_client` processes, from its own virtual environment). Dense "
             "FedAvg, all N workers every round, no-op training (w + fixed small noise), no evaluation; round 1 "
             "is left out. Server CPU and RSS are the server process's; worker CPU is per worker per round.", "",
             "| N | model | fedctl s/round | Flower s/round | fedctl ÷ Flower | fedctl server CPU s/round | "
             "Flower server CPU s/round | fedctl server peak RSS | Flower server peak RSS | fedctl worker CPU "
             "ms/round | Flower worker CPU ms/round | fedctl worker RSS | Flower worker RSS | fedctl wire ÷ raw "
             "payload |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for f, w in _pairs(res):
        def fl(key: str, fmt: str) -> str:
            return "—" if w is None else format(w[key], fmt)

        ratio = "—" if w is None else f"{f['s_per_round'] / w['s_per_round']:.2f}"
        lines.append(
            f"| {f['workers']} | {f['model']} ({_mb(f['model_bytes'])}) | {f['s_per_round']:.3f} | "
            f"{fl('s_per_round', '.3f')} | {ratio} | {f['server_cpu_s_per_round']:.3f} | "
            f"{fl('server_cpu_s_per_round', '.3f')} | {f['server_peak_rss_mb']:.0f} MB | "
            f"{'—' if w is None else format(w['server_peak_rss_mb'], '.0f') + ' MB'} | "
            f"{f['worker_cpu_ms_per_round']:.1f} | {fl('worker_cpu_ms_per_round', '.1f')} | "
            f"{f['worker_peak_rss_mb']:.0f} MB | {'—' if w is None else format(w['worker_peak_rss_mb'], '.0f') + ' MB'}"
            f" | {f['wire_bytes_per_round'] / f['raw_payload_per_round']:.3f} |")
    shared = [r for r in res["rows"] if r["system"] == "fedctl" and r.get("processes") != r["workers"]]
    if shared:
        lines += ["", "Workers sharing processes (the broker's overhead without the workers' own cost: not a "
                  "deployment shape):", "", "| N | model | processes | fedctl s/round | server CPU s/round |",
                  "|---:|---|---:|---:|---:|"]
        lines += [f"| {r['workers']} | {r['model']} | {r['processes']} | {r['s_per_round']:.3f} | "
                  f"{r['server_cpu_s_per_round']:.3f} |" for r in shared]
    lines += ["", "Loopback bytes per round (TCP/IP included) against the raw payload 2·N·model:", "",
              "| N | model | fedctl | Flower |", "|---:|---|---:|---:|"]
    for f, w in _pairs(res):
        lines.append(f"| {f['workers']} | {f['model']} | {f['loopback_bytes_per_round'] / f['raw_payload_per_round']:.3f}× | "
                     f"{'—' if w is None else format(w['loopback_bytes_per_round'] / w['raw_payload_per_round'], '.3f') + '×'} |")
    lines += ["", f"Command: `{res.get('command', 'fedctl bench round')}`", ""]
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    pairs = _pairs(res)
    if not pairs:
        return
    labels = [f"{f['workers']}\n{f['model']}" for f, _ in pairs]
    x = np.arange(len(pairs))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("s_per_round", "seconds per round"), ("server_cpu_s_per_round", "server CPU s per round"),
              ("server_peak_rss_mb", "server peak RSS (MB)")]
    for ax, (key, title) in zip(axes, panels):
        ax.bar(x - 0.2, [f[key] for f, _ in pairs], 0.4, label="fedctl")
        ax.bar(x + 0.2, [w[key] if w else 0 for _, w in pairs], 0.4, label="Flower 1.42")
        ax.set_xticks(x, labels)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle("Round cost, workers as separate processes (workers × model)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
