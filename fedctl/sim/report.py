"""The results report: one JSON file with every run's data, a markdown table and three comparison plots.

A result is one row of the table: the preset's settings, the exact command that produced it, its records
(the broker's ``metrics.jsonl`` records, or the baseline's records for strategy ``"central"``) and the
summary from :mod:`fedctl.sim.metrics`. Results accumulate across invocations through :func:`merge_results`,
keyed by preset name, so presets can be run one at a time. matplotlib is imported lazily (Agg canvas, no
pyplot state), so importing this module costs nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["merge_results", "write_report"]

log = logging.getLogger(__name__)

Result = dict[str, Any]
FORMAT = "fedctl-results/1"
DASH = "—"
CENTRAL = "central"
_MB = 1e6


def write_report(results: Sequence[Result], out_dir: str | Path, name: str = "fl") -> dict[str, Path]:
    """Write ``{name}.json``, ``{name}.md`` and the three ``{name}_accuracy_vs_*.png`` plots into ``out_dir``.

    Parameters
    ----------
    results:
        One dict per row: ``preset``, ``label``, ``model``, ``strategy`` (``"central"`` for the baseline),
        ``epochs``, ``batch_size``, ``fraction``, ``lr``, ``partition``, ``target``, ``paper_rounds``,
        ``paper_note``, ``command``, ``records``, ``summary``, ``peak_rss_mb``, ``workers``.
    out_dir:
        Directory to write into (created if missing).
    name:
        Stem of every file.

    Returns
    -------
    dict of str to Path
        ``json``, ``markdown``, ``accuracy_vs_round``, ``accuracy_vs_bytes``, ``accuracy_vs_epochs``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / f"{name}.json",
        "markdown": out / f"{name}.md",
        "accuracy_vs_round": out / f"{name}_accuracy_vs_round.png",
        "accuracy_vs_bytes": out / f"{name}_accuracy_vs_bytes.png",
        "accuracy_vs_epochs": out / f"{name}_accuracy_vs_epochs.png",
    }
    rows = list(results)
    paths["json"].write_text(json.dumps({"format": FORMAT, "results": rows}, indent=1, default=_json_default))
    paths["markdown"].write_text(markdown_table(rows, name))
    _plot(rows, paths["accuracy_vs_round"], _round_curve, "round", log_x=False)
    _plot(rows, paths["accuracy_vs_bytes"], _bytes_curve, "cumulative uplink bytes (broker received)", log_x=True)
    _plot(rows, paths["accuracy_vs_epochs"], _epochs_curve, "epochs of computation (rounds × C × E; centralised: "
          "epochs)", log_x=True)
    log.info("report written: %s", ", ".join(str(p) for p in paths.values()))
    return paths


def merge_results(path_json: str | Path, new_results: Sequence[Result]) -> list[Result]:
    """The results of an existing ``{name}.json`` with ``new_results`` replacing rows of the same preset.

    Rows keep their order; presets not seen before are appended. A missing file counts as empty.
    """
    path = Path(path_json)
    old: list[Result] = []
    if path.is_file():
        data = json.loads(path.read_text())
        old = list(data["results"] if isinstance(data, dict) else data)
    fresh = {r["preset"]: r for r in new_results}
    merged = [fresh.pop(r["preset"], r) for r in old]
    return merged + list(fresh.values())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


# -- markdown ------------------------------------------------------------------------------------------------------

_HEADER = ("setting", "partition", "η", "rounds to target", "paper rounds", "epochs of computation to target",
           "uplink MB to target", "downlink MB to target", "wall s to target", "best accuracy (rounds run)")


def fmt(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``, or a dash for a missing value (a table cell)."""
    return DASH if value is None else format(value, spec)


def _mb(value: float | None) -> str:
    return DASH if value is None else f"{value / _MB:.1f}"


def _row(r: Result) -> list[str]:
    s = r["summary"]
    grid = r.get("lr_grid")
    tried = ", ".join(f"{g['lr']:g}" for g in grid or [])
    eta = f"{r['lr']:g}" if not grid else f"{r['lr']:g} (best of {tried})"
    common = [r["label"], r["partition"], eta]
    if r["strategy"] == CENTRAL:
        best = f"{fmt(s.get('best_accuracy'), '.4f')} ({fmt(s.get('epochs_run'), 'g')} epochs)"
        return common + [DASH, DASH, fmt(s.get("epochs_to_target"), ".2f"), DASH, DASH,
                         fmt(s.get("wall_s_to_target"), ".1f"), best]
    paper = DASH if r.get("paper_rounds") is None else str(r["paper_rounds"])
    best = f"{fmt(s.get('best_accuracy'), '.4f')} ({s.get('rounds_run', 0)} rounds)"
    return common + [fmt(s.get("rounds_to_target"), ".1f"), paper,
                     fmt(s.get("epochs_of_computation_to_target"), ".2f"), _mb(s.get("bytes_up_to_target")),
                     _mb(s.get("bytes_down_to_target")), fmt(s.get("wall_s_to_target"), ".1f"), best]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(results: Sequence[Result], name: str = "fl") -> str:
    """The report as markdown: the table, the paper notes and the exact command of each row."""
    lines = [f"# {name}: accuracy targets, rounds and costs", "",
             "Rounds to target follow McMahan et al. 2017: best-so-far accuracy, linear interpolation between "
             "evaluated rounds. Uplink = bytes the broker received; downlink = bytes it sent.", "",
             "| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
    lines += ["| " + " | ".join(_cell(c) for c in _row(r)) + " |" for r in results]
    notes = [f"- {r['label']}: {r['paper_note']}" for r in results if r.get("paper_note")]
    if notes:
        lines += ["", "## Paper references", "", *notes]
    lines += ["", "## Commands", ""]
    for r in results:
        extra = f" — peak RSS {r['peak_rss_mb']:.0f} MB" if r.get("peak_rss_mb") is not None else ""
        workers = f", {r['workers']} workers" if r.get("workers") else ""
        lines += [f"**{r['label']}** (`{r['preset']}`{workers}{extra})", "", "```", str(r.get("command", "")),
                  "```", ""]
    return "\n".join(lines)


# -- plots ---------------------------------------------------------------------------------------------------------

Curve = tuple[list[float], list[float]]


def _evaluated(records: Sequence[dict[str, Any]], key: str) -> list[tuple[dict[str, Any], float]]:
    return [(rec, float(rec["test_accuracy"])) for rec in records if rec.get("test_accuracy") is not None
            and key in rec]


def _round_curve(r: Result) -> Curve | None:
    if r["strategy"] == CENTRAL:
        return None
    pts = _evaluated(r["records"], "round")
    return [float(rec["round"]) for rec, _ in pts], [a for _, a in pts]


def _bytes_curve(r: Result) -> Curve | None:
    if r["strategy"] == CENTRAL:
        return None
    records = r["records"]
    cumulative = np.cumsum([float(rec.get("bytes_in") or 0) for rec in records])
    xs, ys = [], []
    for total, rec in zip(cumulative, records):
        if rec.get("test_accuracy") is not None and total > 0:
            xs.append(float(total))
            ys.append(float(rec["test_accuracy"]))
    return xs, ys


def _epochs_curve(r: Result) -> Curve | None:
    if r["strategy"] == CENTRAL:
        pts = _evaluated(r["records"], "epoch")
        xs = [float(rec["epoch"]) for rec, _ in pts]
    else:
        pts = _evaluated(r["records"], "round")
        xs = [float(rec["round"]) * float(r["fraction"]) * float(r["epochs"]) for rec, _ in pts]
    keep = [i for i, x in enumerate(xs) if x > 0]  # log scale: the initial model (x = 0) has no place
    return [xs[i] for i in keep], [pts[i][1] for i in keep]


def _y_bottom(curves: Sequence[Curve]) -> float:
    """0.8, or lower when some curve's best accuracy would not show above it."""
    bests = [max(ys) for _, ys in curves if ys]
    low = min(bests, default=1.0)
    return 0.8 if low >= 0.82 else max(0.0, low - 0.05)


def _plot(results: Sequence[Result], path: Path, curve: Callable[[Result], Curve | None], xlabel: str,
          log_x: bool) -> None:
    """One subplot per model: a curve per result that ``curve`` gives, and the model's target line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    by_model: dict[str, list[tuple[Result, Curve]]] = {}
    for r in results:
        c = curve(r)
        if c is not None:
            by_model.setdefault(r["model"], []).append((r, c))
    models = sorted(by_model) or ["(no runs)"]
    fig = Figure(figsize=(7 * len(models), 5), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, model in zip(fig.subplots(1, len(models), squeeze=False)[0], models):
        _draw_model(ax, model, by_model.get(model, []), xlabel, log_x)
    fig.savefig(path, dpi=110)


def _draw_model(ax: Any, model: str, runs: Sequence[tuple[Result, Curve]], xlabel: str, log_x: bool) -> None:
    for r, (xs, ys) in runs:
        ax.plot(xs, ys, marker="." if len(xs) < 40 else None, linewidth=1.2, label=r["label"])
    for target in sorted({float(r["target"]) for r, _ in runs}):
        ax.axhline(target, color="black", linestyle="--", linewidth=0.8, label=f"target {target:g}")
    if log_x and any(xs for _, (xs, _) in runs):
        ax.set_xscale("log")
    ax.set_ylim(_y_bottom([c for _, c in runs]), 1.0)
    ax.set_title(model)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    ax.grid(True, alpha=0.3)
    if runs:
        ax.legend(fontsize=7, loc="lower right")
