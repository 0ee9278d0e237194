"""Communication results (``fedctl bench comm``): bytes counted on the broker's socket per run, compared with the
dense reference of the same model, plus the cost of top-k selection.

Bytes come from the broker's per-round records: ``update_bytes_in`` (the push messages, header and tensor frames,
as received) and ``model_bytes_out`` (the model messages sent). Records written before those counters existed
fall back to ``bytes_in`` / ``bytes_out`` (all traffic; for a dense run the heartbeats and pulls are < 0.1%).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedctl.sim.metrics import cumulative_at, rounds_to_target
from fedctl.sim.report import Result, _json_default

MODEL_PARAMS = {"mlp": 109_386, "lenet5": 61_706, "2nn": 199_210, "cnn": 1_663_370}


def reference_preset(row: Result) -> str | None:
    """The dense run a row is compared with (its preset's ``reference``: dense FedSGD for DGC, θ_u = 1 for
    Selective SGD)."""
    return row.get("reference")


def _series(records: Sequence[dict[str, Any]], key: str, fallback: str) -> list[float]:
    return [float(r.get(key, r.get(fallback)) or 0) for r in records]


def _accuracy(records: Sequence[dict[str, Any]]) -> list[float | None]:
    return [None if r.get("test_accuracy") is None else float(r["test_accuracy"]) for r in records]


def bytes_to_accuracy(row: Result, accuracy: float) -> dict[str, float | None]:
    """Rounds, uplink and downlink bytes until ``accuracy`` is first reached (McMahan interpolation)."""
    records = row["records"]
    rounds = [float(r["round"]) for r in records]
    rtt = rounds_to_target(rounds, _accuracy(records), accuracy)
    if rtt is None:
        return {"rounds": None, "up": None, "down": None}
    return {"rounds": rtt, "up": cumulative_at(rounds, _series(records, "update_bytes_in", "bytes_in"), rtt),
            "down": cumulative_at(rounds, _series(records, "model_bytes_out", "bytes_out"), rtt)}


def comm_summary(row: Result, reference: Result | None) -> dict[str, Any]:
    """Per-round and to-accuracy bytes of ``row``, and its ratios to ``reference`` at the same accuracy."""
    records = row["records"]
    up = _series(records, "update_bytes_in", "bytes_in")
    down = _series(records, "model_bytes_out", "bytes_out")
    updates = sum(int(r.get("participants") or 0) for r in records)
    kept = [_kept(r) for r in records]
    kept_total = float(np.nansum(kept)) if any(np.isfinite(kept)) else None
    numel = MODEL_PARAMS.get(row["model"])
    best = row["summary"].get("best_accuracy")
    out: dict[str, Any] = {
        "rounds_run": len(records), "best_accuracy": best, "final_accuracy": row["summary"].get("final_accuracy"),
        "up_per_round": float(np.mean(up)) if up else None, "down_per_round": float(np.mean(down)) if down else None,
        "up_per_update": sum(up) / updates if updates else None,
        "density": kept_total / (updates * numel) if kept_total and numel and updates else None,
        "bytes_per_kept": sum(up) / kept_total if kept_total else None,
    }
    target = float(row["target"])
    out["to_target"] = bytes_to_accuracy(row, target)
    if reference is not None and reference is not row and best is not None:
        ref_best = reference["summary"].get("best_accuracy") or 0.0
        level = min(target, float(best), float(ref_best))
        mine, ref = bytes_to_accuracy(row, level), bytes_to_accuracy(reference, level)
        ratio = (ref["up"] / mine["up"]) if mine["up"] and ref["up"] else None
        ref_records = reference["records"]
        ref_up = float(np.mean(_series(ref_records, "update_bytes_in", "bytes_in")))
        ref_down = float(np.mean(_series(ref_records, "model_bytes_out", "bytes_out")))
        out["vs_reference"] = {
            "reference": reference["preset"], "accuracy": level, "rounds": mine["rounds"],
            "reference_rounds": ref["rounds"], "up": mine["up"], "reference_up": ref["up"], "up_ratio": ratio,
            "up_ratio_per_round": ref_up / out["up_per_round"] if out["up_per_round"] else None,
            "down_ratio_per_round": ref_down / out["down_per_round"] if out["down_per_round"] else None,
            "reference_rounds_run": len(ref_records),
            "reference_accuracy_at_same_rounds": _best_until(reference, len(records)),
        }
    return out


def _kept(record: dict[str, Any]) -> float:
    """Elements the round's pushes carried: DGC reports ``kept`` per update, Selective SGD ``uploaded_nnz``."""
    per_update = (record.get("update_metrics") or {}).get("kept")
    if per_update is not None:
        return float(per_update) * int(record.get("participants") or 0)
    uploaded = (record.get("strategy") or {}).get("uploaded_nnz")
    return float(uploaded) if uploaded is not None else float("nan")


def _best_until(row: Result, rounds: int) -> float | None:
    accs = [a for r, a in zip(row["records"], _accuracy(row["records"])) if a is not None and r["round"] <= rounds]
    return max(accs) if accs else None


def _fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _size(v: float | None) -> str:
    if v is None:
        return "–"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if v >= scale:
            return f"{v / scale:.2f} {unit}"
    return f"{v:.0f} B"


def markdown(rows: Sequence[Result], topk: Sequence[dict[str, Any]]) -> str:
    lines = ["# Communication: bytes on the socket (`fedctl bench comm`)", "",
             "Uplink = push messages received by the broker, downlink = model messages it sent, both counted on "
             "its socket (headers and tensor frames). Ratios compare with the dense reference at the same accuracy "
             "(the lower of the target, this run's best and the reference's best).", "",
             "| setting | rounds | best acc. | uplink / round | downlink / round | kept density | bytes / kept "
             "element | accuracy compared | rounds (ref.) | uplink to it (ref.) | uplink ratio | downlink ratio "
             "/ round |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        c = r["comm"]
        v = c.get("vs_reference") or {}
        ref = "" if not v else f" ({_fmt(v.get('reference_rounds'), '.0f')})"
        ref_up = "" if not v else f" ({_size(v.get('reference_up'))})"
        lines.append(
            f"| {r['label']} | {c['rounds_run']} | {_fmt(c['best_accuracy'], '.4f')} | {_size(c['up_per_round'])} | "
            f"{_size(c['down_per_round'])} | {_fmt(c['density'], '.4%')} | {_fmt(c['bytes_per_kept'], '.2f')} | "
            f"{_fmt(v.get('accuracy'), '.4f')} | {_fmt(v.get('rounds'), '.1f')}{ref} | {_size(v.get('up'))}{ref_up} "
            f"| {_fmt(v.get('up_ratio'), '.0f')}× | {_fmt(v.get('down_ratio_per_round'), '.1f')}× |")
    if topk:
        lines += ["", "## Top-k selection cost (`fedctl.compress.sampled_topk` vs exact `np.argpartition`)", "",
                  "| elements | k | exact (ms) | sampled (ms) | speed-up | selected (min–max over repeats) |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for t in topk:
            lines.append(f"| {t['numel']:,} | {t['k']:,} | {t['exact_s'] * 1e3:.1f} | {t['sampled_s'] * 1e3:.2f} | "
                         f"{t['exact_s'] / t['sampled_s']:.1f}× | {t['selected']:,} ({t['selected_min']:,}–"
                         f"{t['selected_max']:,}) |")
    lines += ["", "Commands:", ""] + [f"    fedctl bench comm --preset {r['preset']}" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[Result], path: Path) -> None:
    """Test accuracy vs cumulative uplink bytes (log x), one panel per model, one curve per run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = sorted({r["model"] for r in rows}) or ["(no runs)"]
    fig = Figure(figsize=(7 * len(models), 5), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, model in zip(fig.subplots(1, len(models), squeeze=False)[0], models):
        low = 1.0
        for r in (r for r in rows if r["model"] == model):
            up = np.cumsum(_series(r["records"], "update_bytes_in", "bytes_in"))
            pts = [(float(b), float(rec["test_accuracy"])) for b, rec in zip(up, r["records"])
                   if rec.get("test_accuracy") is not None and b > 0]
            if pts:
                ax.plot(*zip(*pts), linewidth=1.2, label=r["label"])
                low = min(low, max(a for _, a in pts))
        ax.axhline(float(rows[0]["target"]) if rows else 0.99, color="black", linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_ylim(max(0.0, min(0.8, low - 0.1)), 1.0)
        ax.set_title(model)
        ax.set_xlabel("cumulative uplink bytes (on the broker's socket)")
        ax.set_ylabel("test accuracy")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.savefig(path, dpi=110)


def plot_theta(rows: Sequence[Result], path: Path) -> bool:
    """Selective SGD: best test accuracy and uplink bytes per round against θ_u (log x), one line per model.
    False (nothing written) when there are no Selective SGD rows."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    by_model: dict[str, list[tuple[float, float, float]]] = {}
    for r in rows:
        theta = (r.get("options") or {}).get("theta_u")
        if r["strategy"] != "ssgd" or theta is None or r["comm"].get("best_accuracy") is None:
            continue
        by_model.setdefault(r["model"], []).append((float(theta), float(r["comm"]["best_accuracy"]),
                                                    float(r["comm"]["up_per_round"] or 0)))
    if not by_model:
        return False
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    acc_ax, bytes_ax = fig.subplots(1, 2)
    for model, pts in sorted(by_model.items()):
        pts.sort()
        thetas = [p[0] for p in pts]
        acc_ax.plot(thetas, [p[1] for p in pts], marker="o", label=model)
        bytes_ax.plot(thetas, [p[2] for p in pts], marker="o", label=model)
    for ax, ylabel in ((acc_ax, "best test accuracy"), (bytes_ax, "uplink bytes per round (socket)")):
        ax.set_xscale("log")
        ax.set_xlabel("θ_u (fraction of the update uploaded)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
    bytes_ax.set_yscale("log")
    acc_ax.set_title("Selective SGD: accuracy vs θ_u")
    bytes_ax.set_title("Selective SGD: uplink vs θ_u")
    fig.savefig(path, dpi=110)
    return True


def write(rows: Sequence[Result], topk: Sequence[dict[str, Any]], out: Path) -> dict[str, Path]:
    """comm.json (rows with their records and comm summary, top-k timings), comm.md, comm.png and (with
    Selective SGD rows) comm_ssgd_theta.png."""
    by_name = {r["preset"]: r for r in rows}
    for r in rows:
        ref_name = reference_preset(r)
        r["comm"] = comm_summary(r, by_name.get(ref_name) if ref_name else None)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "comm.json", "markdown": out / "comm.md", "plot": out / "comm.png"}
    paths["json"].write_text(json.dumps({"results": list(rows), "topk": list(topk)}, indent=1,
                                        default=_json_default))
    paths["markdown"].write_text(markdown(rows, topk))
    plot(rows, paths["plot"])
    if plot_theta(rows, out / "comm_ssgd_theta.png"):
        paths["theta_plot"] = out / "comm_ssgd_theta.png"
    return paths
