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


def _v(row: dict[str, Any] | None, key: str, fmt: str, unit: str = "") -> str:
    return "—" if row is None or key not in row else format(row[key], fmt) + unit


def _lo(row: dict[str, Any] | None) -> str:
    if row is None or "loopback_bytes_per_round" not in row:
        return "—"
    return f"{row['loopback_bytes_per_round'] / row['raw_payload_per_round']:.3f}×"


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
    notes: list[str] = []
    for f, w in _pairs(res):
        for r in (f, w):
            if r is not None and r.get("error"):
                notes.append(f"* {r['system']}, {r['workers']} workers, {r['model']}: {r['error']} "
                             f"({r.get('completed_rounds', 0)} of {r['rounds']} rounds; figures, if any, from those)")
        ratio = (f"{f['s_per_round'] / w['s_per_round']:.2f}" if w is not None and "s_per_round" in w
                 and "s_per_round" in f else "—")
        wire = (f"{f['wire_bytes_per_round'] / f['raw_payload_per_round']:.3f}" if "wire_bytes_per_round" in f
                and "raw_payload_per_round" in f else "—")
        lines.append(
            f"| {f['workers']} | {f['model']} ({_mb(f['model_bytes'])}) | {_v(f, 's_per_round', '.3f')} | "
            f"{_v(w, 's_per_round', '.3f')} | {ratio} | {_v(f, 'server_cpu_s_per_round', '.3f')} | "
            f"{_v(w, 'server_cpu_s_per_round', '.3f')} | {_v(f, 'server_peak_rss_mb', '.0f', ' MB')} | "
            f"{_v(w, 'server_peak_rss_mb', '.0f', ' MB')} | {_v(f, 'worker_cpu_ms_per_round', '.1f')} | "
            f"{_v(w, 'worker_cpu_ms_per_round', '.1f')} | {_v(f, 'worker_peak_rss_mb', '.0f', ' MB')} | "
            f"{_v(w, 'worker_peak_rss_mb', '.0f', ' MB')} | {wire} |")
    if notes:
        lines += ["", "Cells that did not finish:", "", *notes]
    shared = [r for r in res["rows"] if r["system"] == "fedctl" and r.get("processes") != r["workers"]]
    if shared:
        lines += ["", "Workers sharing processes (the broker's overhead without the workers' own cost: not a "
                  "deployment shape):", "", "| N | model | processes | fedctl s/round | server CPU s/round |",
                  "|---:|---|---:|---:|---:|"]
        lines += [f"| {r['workers']} | {r['model']} | {r['processes']} | {_v(r, 's_per_round', '.3f')} | "
                  f"{_v(r, 'server_cpu_s_per_round', '.3f')} |" for r in shared]
    lines += ["", "Loopback bytes per round (TCP/IP included) against the raw payload 2·N·model:", "",
              "| N | model | fedctl | Flower |", "|---:|---|---:|---:|"]
    for f, w in _pairs(res):
        lines.append(f"| {f['workers']} | {f['model']} | {_lo(f)} | {_lo(w)} |")
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
        ax.bar(x - 0.2, [f.get(key, 0) for f, _ in pairs], 0.4, label="fedctl")
        ax.bar(x + 0.2, [w.get(key, 0) if w else 0 for _, w in pairs], 0.4, label="Flower 1.42")
        ax.set_xticks(x, labels)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle("Round cost, workers as separate processes (workers × model)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
