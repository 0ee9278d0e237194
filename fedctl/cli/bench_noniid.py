"""``fedctl bench noniid``: FedAvg against FedAvgM, FedAdagrad, FedAdam, FedYogi, FedProx and SCAFFOLD on non-IID
data, each tuned on the same grid budget (the method: :mod:`fedctl.sim.noniid`).

Results in OUT/noniid.{json,md} and OUT/noniid_<setting>.png (accuracy against the round and against the bytes on
the wire). Every run is a ``fedctl bench fl`` preset under OUT/runs/: an interrupted comparison resumes where it
stopped, and a grid point already run is not run again.
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any

import click

from fedctl.cli.simulate import console, quiet_workers
from fedctl.errors import FedctlError, TrainingFailed
from fedctl.fsio import atomic_write, check_writable_dir
from fedctl.sim.metrics import rounds_to_target
from fedctl.sim.noniid import (
    BATCH,
    CLIENT_LR,
    CONTENDERS,
    DEFAULT_SETTINGS,
    EPOCHS,
    FRACTION,
    REFERENCE,
    SETTINGS,
    Contender,
    Setting,
    preset,
)

RESULTS = "noniid.json"


def _best_until(records: list[dict[str, Any]], last_round: int) -> float:
    """The best test accuracy over the rounds up to ``last_round`` (0.0 when none was evaluated)."""
    seen = [r["test_accuracy"] for r in records if r["round"] <= last_round and r.get("test_accuracy") is not None]
    return max(seen, default=0.0)


def _run(setting: Setting, contender: Contender, value: float, rounds: int, out: Path, source_dir: Path | None,
         parallel: int, stop_at_target: bool = False) -> dict[str, Any]:
    from fedctl.cli.bench import run_federated  # (imports the simulation stack: only when running)

    p = preset(setting, contender, value)
    source = source_dir if setting.dataset == "mnist" else None
    return run_federated(p, out, source, rounds, parallel, stop_at_target=stop_at_target)


def _attempt(setting: Setting, contender: Contender, value: float, rounds: int, out: Path, source_dir: Path | None,
             parallel: int) -> tuple[dict[str, Any], int | None]:
    """:func:`_run`, where a run whose training diverges (NaN) is a result: its row from the records it left, and
    the round it diverged in (None when it did not)."""
    from fedctl.broker.store import Checkpointer

    try:
        return _run(setting, contender, value, rounds, out, source_dir, parallel), None
    except TrainingFailed as err:
        if not err.diverged:
            raise
    p = preset(setting, contender, value)
    records = Checkpointer(out / "runs" / p.name).read_metrics()
    diverged = records[-1]["round"] + 1 if records else 1
    console.print(f"  {contender.strategy} {contender.knob}={value:g}: diverged (NaN) in round {diverged}")
    return {"records": records, "preset": p.name, "label": p.label()}, diverged


def _to_target(records: list[dict[str, Any]], target: float) -> float | None:
    return rounds_to_target([r["round"] for r in records], [r.get("test_accuracy") for r in records], target)


def compare(setting: Setting, contender: Contender, out: Path, source_dir: Path | None,
            parallel: int) -> dict[str, Any]:
    """Tune ``contender`` on ``setting`` (every grid point to ``grid_rounds``), then run the winner to the budget."""
    grid = []
    for value in contender.grid:
        point, diverged = _attempt(setting, contender, value, setting.grid_rounds, out, source_dir, parallel)
        grid.append({"value": value, "best_accuracy": _best_until(point["records"], setting.grid_rounds)})
        if diverged is not None:  # (a legitimate grid outcome: the value is too large; it cannot be chosen)
            grid[-1]["diverged_at"] = diverged
        else:
            console.print(f"  {contender.strategy} {contender.knob}={value:g}: best accuracy "
                          f"{grid[-1]['best_accuracy']:.4f} by round {setting.grid_rounds}")
    candidates = [g for g in grid if "diverged_at" not in g]
    if not candidates:
        raise TrainingFailed(f"{contender.strategy} diverged at every point of its {contender.knob} grid "
                             f"{', '.join(f'{v:g}' for v in contender.grid)} on {setting.key}",
                             "give it a grid of smaller values (fedctl/sim/noniid.py CONTENDERS)", diverged=True)
    chosen = max(candidates, key=lambda g: (g["best_accuracy"], -g["value"]))["value"]
    # (the chosen value may still diverge later in its run: the row then says when)
    row, diverged_at = _attempt(setting, contender, chosen, setting.budget_rounds, out, source_dir, parallel)
    records = [r for r in row["records"] if r["round"] <= setting.budget_rounds]
    evaluated = [r for r in records if r.get("test_accuracy") is not None]
    to_target = _to_target(records, setting.target)
    past = 0  # rounds the reference ran past the budget to reach the target
    if to_target is None and contender.strategy == REFERENCE and setting.reference_rounds:
        extended = row["records"]  # (a resumed comparison: the run may already have gone on to the target)
        if _to_target(extended, setting.target) is None and extended[-1]["round"] < setting.reference_rounds:
            console.print(f"  {contender.strategy}: not at {setting.target:g} by round {setting.budget_rounds}; the "
                          f"reference runs on to the target (at most round {setting.reference_rounds})")
            extended = _run(setting, contender, chosen, setting.reference_rounds, out, source_dir, parallel,
                            stop_at_target=True)["records"]
        to_target = _to_target(extended, setting.target)
        past = len(extended) - len(records)
    return {"setting": setting.key, "strategy": contender.strategy, "knob": contender.knob, "grid": grid,
            "chosen": chosen, "preset": row["preset"], "label": row["label"], "rounds_run": len(records),
            "rounds_to_target": to_target, "rounds_past_budget": past, "diverged_at": diverged_at,
            "accuracy_after_budget": evaluated[-1]["test_accuracy"] if evaluated else None,
            "best_accuracy": max((r["test_accuracy"] for r in evaluated), default=None),
            "bytes_up": sum(r["bytes_in"] for r in records), "bytes_down": sum(r["bytes_out"] for r in records),
            "wall_s": round(sum(r["duration_s"] + r.get("eval_s", 0.0) for r in records), 1),
            "curve": [(r["round"], r["test_accuracy"], r["bytes_in"] + r["bytes_out"]) for r in records]}


def _load(out: Path) -> list[dict[str, Any]]:
    path = out / RESULTS
    return json.loads(path.read_text())["results"] if path.is_file() else []


def write_report(rows: list[dict[str, Any]], out: Path) -> None:
    atomic_write(out / RESULTS, lambda fh: fh.write(json.dumps(
        {"environment": f"{platform.machine()} · Python {platform.python_version()}", "results": rows},
        indent=1).encode()))
    lines = ["# Non-IID comparison", "",
             f"E = {EPOCHS}, B = {BATCH}, C = {FRACTION:g}, 100 clients; workers' rate {CLIENT_LR:g} unless the knob "
             "is `lr`. Each algorithm: three grid points of its knob, each run to the setting's grid round; the best "
             "(accuracy so far) continues to the budget. Rounds to target: monotone curve, interpolated. FedAvg, the "
             "reference, runs past the budget to the target where it has not reached it (its other columns stay "
             "the budget's); † marks such a row.", ""]
    for key, setting in SETTINGS.items():
        mine = [r for r in rows if r["setting"] == key]
        if not mine:
            continue
        lines += [f"## {setting.label}", "",
                  f"Grid budget: 3 points × {setting.grid_rounds} rounds per algorithm; run budget "
                  f"{setting.budget_rounds} rounds"
                  + (f"; FedAvg may run on to round {setting.reference_rounds} to reach the target."
                     if setting.reference_rounds else "."), "",
                  "| algorithm | knob: grid (best so far at the grid round) | chosen | rounds to target | ÷ FedAvg's "
                  "| accuracy after budget | best | rounds run | MB up / down | wall s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        fedavg = next((r["rounds_to_target"] for r in mine if r["strategy"] == REFERENCE), None)
        for r in mine:
            grid = ", ".join(f"{g['value']:g} (diverged in round {g['diverged_at']})" if "diverged_at" in g
                             else f"{g['value']:g} ({g['best_accuracy']:.4f})" for g in r["grid"])
            past = r.get("rounds_past_budget", 0)
            reached = ("not reached" if r["rounds_to_target"] is None else f"{r['rounds_to_target']:.1f}"
                       + (" †" if r["rounds_to_target"] > setting.budget_rounds else ""))
            if r["rounds_to_target"] is None and past:
                reached += f" (by round {setting.budget_rounds + past} †)"
            after = "–" if r["accuracy_after_budget"] is None else f"{r['accuracy_after_budget']:.4f}"
            if r.get("diverged_at"):
                after = f"diverged in round {r['diverged_at']} (last {after})"
            best = "–" if r["best_accuracy"] is None else f"{r['best_accuracy']:.4f}"
            if not fedavg:
                ratio = "–"
            elif r["rounds_to_target"] is None:  # (not by the budget: more than budget / FedAvg's rounds)
                ratio = f"> {setting.budget_rounds / fedavg:.2f}" if setting.budget_rounds < fedavg else "–"
            else:
                ratio = f"{r['rounds_to_target'] / fedavg:.2f}"
            lines.append(f"| {r['strategy']} | {r['knob']}: {grid} | {r['chosen']:g} | {reached} | {ratio} | {after} | "
                         f"{best} | "
                         f"{r['rounds_run']} | {r['bytes_up'] / 1e6:.1f} / {r['bytes_down'] / 1e6:.1f} | "
                         f"{r['wall_s']:.0f} |")
        lines.append("")
        _plot(setting, mine, out / f"noniid_{key}.png")
        lines += [f"![{key}](noniid_{key}.png)", ""]
    atomic_write(out / "noniid.md", lambda fh: fh.write("\n".join(lines).encode()))


def _plot(setting: Setting, rows: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    by_round, by_bytes = fig.subplots(1, 2)
    best = setting.target
    for r in rows:
        points = [(rnd, acc, b) for rnd, acc, b in r["curve"]]
        total = 0
        xs_b, xs_r, ys = [], [], []
        for rnd, acc, b in points:
            total += b
            if acc is not None:
                xs_r.append(rnd)
                xs_b.append(total / 1e6)
                ys.append(acc)
                best = max(best, acc)
        label = f"{r['strategy']} ({r['knob']}={r['chosen']:g})"
        by_round.plot(xs_r, ys, linewidth=1.2, label=label)
        by_bytes.plot(xs_b, ys, linewidth=1.2, label=label)
    for ax, xlabel in ((by_round, "round"), (by_bytes, "MB on the wire (up + down)")):
        ax.axhline(setting.target, color="black", linestyle="--", linewidth=0.8, label=f"target {setting.target:g}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        # the differences live near the target (a collapse leaves the frame; the table says where); the top is the
        # next 0.05 above the best point + 0.02, so a target of 0.85 does not waste the upper half
        ax.set_ylim(max(0.0, setting.target - 0.1), min(1.0, math.ceil((best + 0.02) * 20) / 20))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    by_bytes.set_xscale("log")
    fig.suptitle(setting.label)
    fig.savefig(path, dpi=110)


@click.command("noniid")
@click.option("--setting", "settings", multiple=True, type=click.Choice(list(SETTINGS)),
              help=f"Data setting (repeatable; default: {', '.join(DEFAULT_SETTINGS)}).")
@click.option("--strategy", "strategies", multiple=True, type=click.Choice([c.strategy for c in CONTENDERS]),
              help="Algorithm (repeatable; default: all).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("bench/results"),
              show_default=True, help="Directory for the results and the runs' state.")
@click.option("--source-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the MNIST IDX files are (Fashion-MNIST is found in /usr/share/datasets/fashion-mnist).")
@click.option("--parallel", type=click.IntRange(min=1), default=2, show_default=True, help="Training threads.")
@click.option("--skip-existing", is_flag=True,
              help="Skip the algorithms that already have a row for the setting in OUT/noniid.json (their runs' state "
                   "may be gone: a fresh checkout keeps the table, not OUT/runs).")
def bench_noniid(settings: tuple[str, ...], strategies: tuple[str, ...], out: Path, source_dir: Path | None,
                 parallel: int, skip_existing: bool) -> None:
    """FedAvg against the algorithms for non-IID data, each tuned on the same grid budget (docs/results.md)."""
    check_writable_dir(out, "--out")
    quiet_workers()
    rows = _load(out)
    for key in settings or DEFAULT_SETTINGS:
        setting = SETTINGS[key]
        console.print(f"[bold]{setting.label}[/]")
        for contender in CONTENDERS:
            if strategies and contender.strategy not in strategies:
                continue
            if skip_existing and any(r["setting"] == key and r["strategy"] == contender.strategy for r in rows):
                console.print(f"  {contender.strategy}: already in {out / RESULTS}; skipped")
                continue
            try:
                row = compare(setting, contender, out, source_dir, parallel)
            except FedctlError as err:
                console.print(f"  [red]{contender.strategy}: {err}[/]")
                raise
            keys = [(r["setting"], r["strategy"]) for r in rows]
            if (key, contender.strategy) in keys:  # (a rerun keeps its place in the table)
                rows[keys.index((key, contender.strategy))] = row
            else:
                rows.append(row)
            write_report(rows, out)
            reached = row["rounds_to_target"]
            console.print(f"  {contender.strategy}: {contender.knob}={row['chosen']:g}, to target "
                          f"{'not reached' if reached is None else f'{reached:.1f}'}, after "
                          f"{row['rounds_run']} rounds {row['accuracy_after_budget']}")
    if rows:  # (also when every algorithm was skipped: the report follows the current code)
        write_report(rows, out)
