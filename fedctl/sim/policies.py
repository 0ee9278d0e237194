"""Consistency policies compared under stragglers (``fedctl bench policies``): run settings, pure summaries, the
report and its plots. The heartbeat benchmark is :mod:`fedctl.sim.heartbeat`.

Wall time to target follows McMahan et al.'s rounds to target with ``elapsed_s`` in place of the round: the
best-so-far accuracy, interpolated linearly between the evaluated records around the crossing, starting from the
initial model's accuracy at 0 s. The summaries are pure functions over ``metrics.jsonl`` records.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedctl.broker.config import BrokerConfig
from fedctl.broker.policy import ClockConfig, SyncConfig, parse_policy
from fedctl.errors import ConfigError
from fedctl.models import get_model
from fedctl.sim.metrics import percentile, rounds_to_target
from fedctl.sim.report import fmt
from fedctl.sim.runner import SimConfig
from fedctl.strategies import TaskConfig, strategy_names

Record = Mapping[str, Any]


@dataclass(frozen=True)
class PolicyBench:
    """One comparison: the same model, data, K workers and speed profile under each consistency policy.

    Budgets and evaluation are counted in applied updates so that rounds (sync, K updates each) and model
    versions (ssp/async, ``buffer`` updates each) compare: sync runs ⌈max_updates / K⌉ rounds and evaluates every
    ⌈eval_every / K⌉ rounds, the clock policies run ⌈max_updates / buffer⌉ versions and evaluate every
    ⌈eval_every / buffer⌉ versions (eval_every defaults to K: the same evaluation cost per update).
    """

    policies: tuple[str, ...] = ("sync", "ssp:1", "ssp:4", "async")
    workers: int = 20
    model: str = "lenet5"
    strategy: str = "fedavg"
    task: TaskConfig = field(default_factory=lambda: TaskConfig(1, 50, 0.05))
    slow_fraction: float = 0.2
    slowdown: float = 5.0
    delay_s: float = 1.0
    target: float = 0.985
    max_updates: int = 4000
    eval_every: int | None = None
    """Evaluate every this many applied updates (default K)."""
    quorum: int | None = None
    """Sync: updates a round needs (default K − max(1, K // 10): a dead worker is dropped and rounds go on)."""
    round_timeout_s: float = 300.0
    clock: ClockConfig = field(default_factory=ClockConfig)
    """ssp/async settings (max staleness, staleness exponent, buffer); the bound comes from each policy's name."""
    stop_at_target: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.policies:
            raise ConfigError("name at least one policy", "e.g. --policy sync --policy async")
        for p in self.policies:
            parse_policy(p)
        get_model(self.model)
        if self.strategy not in strategy_names():
            raise ConfigError(f"unknown strategy {self.strategy!r}", f"choose one of {', '.join(strategy_names())}")
        if self.workers < 1 or self.max_updates < 1 or (self.eval_every is not None and self.eval_every < 1):
            raise ConfigError("--workers, --max-updates and --eval-every must be at least 1")
        if self.quorum is not None and not 1 <= self.quorum <= self.workers:
            raise ConfigError(f"--quorum must be in 1..{self.workers} (the workers), got {self.quorum}")

    @property
    def sync_quorum(self) -> int:
        return self.quorum if self.quorum is not None else max(self.workers - max(1, self.workers // 10), 1)

    def per_step(self, policy: str) -> int:
        """Updates one round (sync: all K) or one model version (ssp/async: ``buffer``) applies."""
        return self.workers if parse_policy(policy) is None else self.clock.buffer

    def broker_config(self, policy: str, state_dir: Path) -> BrokerConfig:
        step = self.per_step(policy)
        every = self.eval_every or self.workers
        model_mb = get_model(self.model).num_params * 4 / 2**20
        return BrokerConfig(model=self.model, strategy=self.strategy, rounds=math.ceil(self.max_updates / step),
                            task=self.task, sync=SyncConfig(1.0, self.sync_quorum, self.round_timeout_s),
                            seed=self.seed, state_dir=state_dir, eval_every=max(math.ceil(every / step), 1),
                            target_accuracy=self.target if self.stop_at_target else None, done_linger_s=2.0,
                            policy=policy, clock=self.clock,
                            # Keep every version an admitted update may be based on (weights → change needs it).
                            history_mb=max(64.0, (self.clock.max_staleness + 2) * model_mb))

    def sim_config(self, data_dir: Path, backend: str, parallel: int) -> SimConfig:
        return SimConfig(data_dir, self.workers, backend, parallel=parallel, slow_fraction=self.slow_fraction,
                         slowdown=self.slowdown, delay_s=self.delay_s)

    def describe(self) -> dict[str, Any]:
        clock = {k: v for k, v in asdict(self.clock).items() if k != "bound"}  # per policy (and inf is no JSON)
        return {**asdict(self), "policies": list(self.policies), "clock": clock, "sync_quorum": self.sync_quorum,
                "slow_workers": round(self.slow_fraction * self.workers)}


# -- summaries (pure) ----------------------------------------------------------------------------------------------



def staleness_of(records: Sequence[Record]) -> list[int]:
    """τ of every applied update; sync records carry none, their updates all start from the current model (0)."""
    out: list[int] = []
    for r in records:
        taus = r.get("staleness")
        out.extend([int(t) for t in taus] if taus is not None else [0] * int(r.get("participants") or 0))
    return out


def staleness_stats(records: Sequence[Record]) -> dict[str, Any]:
    """Count, mean, p50 / p90 (nearest rank), max and the exact histogram {τ: updates} of the applied updates."""
    taus = staleness_of(records)
    hist = Counter(taus)
    return {"count": len(taus), "mean": sum(taus) / len(taus) if taus else None, "p50": percentile(taus, 50),
            "p90": percentile(taus, 90), "max": max(taus, default=None),
            "histogram": {str(t): hist[t] for t in sorted(hist)}}


def _cumulative(values: Sequence[float | None]) -> list[float]:
    out, total = [], 0.0
    for v in values:
        total += float(v or 0.0)
        out.append(total)
    return out


def to_target(records: Sequence[Record], target: float, start_accuracy: float | None = None) -> dict[str, Any]:
    """Wall seconds, wall seconds without evaluation pauses, and applied updates until the best-so-far test
    accuracy reaches ``target`` (linear interpolation; the initial model at 0 s and 0 updates), else None."""
    acc = [r.get("test_accuracy") for r in records]
    # elapsed_s of a record is taken before its own evaluation, so only the earlier evaluations are in it.
    evals = [0.0] + _cumulative([r.get("eval_s") for r in records])[:-1]
    axes = {"wall_s": [float(r["elapsed_s"]) for r in records],
            "wall_s_excl_eval": [float(r["elapsed_s"]) - e for r, e in zip(records, evals)],
            "updates": _cumulative([r.get("participants") for r in records])}
    return {f"{name}_to_target": rounds_to_target(xs, acc, target, start=(0.0, start_accuracy))
            for name, xs in axes.items()}


def summarize_policy(records: Sequence[Record], target: float, start_accuracy: float | None = None) -> dict[str, Any]:
    """One policy's run: costs to the target, accuracy, throughput, staleness, held pulls and refusals."""
    measured = [float(r["test_accuracy"]) for r in records if r.get("test_accuracy") is not None]
    total = sum(int(r.get("participants") or 0) for r in records)
    wall = float(records[-1]["elapsed_s"]) if records else 0.0
    eval_s = sum(float(r.get("eval_s") or 0.0) for r in records)
    held = [int(r["held_pulls"]) for r in records if r.get("held_pulls") is not None]
    refused = [int(r["refused_stale_total"]) for r in records if r.get("refused_stale_total") is not None]
    return {"target": target, "start_accuracy": start_accuracy, **to_target(records, target, start_accuracy),
            "best_accuracy": max(measured, default=None), "final_accuracy": measured[-1] if measured else None,
            "steps": len(records), "total_updates": total, "total_wall_s": wall,
            "updates_per_s": total / wall if wall > 0 else None, "eval_share": eval_s / wall if wall > 0 else None,
            "min_participants": min((int(r.get("participants") or 0) for r in records), default=None),
            "staleness": staleness_stats(records), "max_held_pulls": max(held, default=None),
            "refused_stale": max(refused, default=None)}


def add_ratios(summaries: Mapping[str, dict[str, Any]], reference: str = "sync") -> None:
    """Add each policy's wall time to target divided by the reference policy's (None when either is missing)."""
    ref = summaries.get(reference, {})
    for s in summaries.values():
        for key in ("wall_s_to_target", "wall_s_excl_eval_to_target"):
            mine, base = s.get(key), ref.get(key)
            s[key.replace("_to_target", f"_ratio_vs_{reference}")] = (
                mine / base if mine is not None and base else None)


# -- report --------------------------------------------------------------------------------------------------------



def _table_row(r: Mapping[str, Any]) -> str:
    s, st = r["summary"], r["summary"]["staleness"]
    cells = [f"`{r['policy']}`", fmt(s["wall_s_to_target"], ".1f"), fmt(s["wall_s_ratio_vs_sync"], ".2f"),
             fmt(s["wall_s_excl_eval_to_target"], ".1f"), fmt(s["updates_to_target"], ".0f"),
             fmt(s["best_accuracy"], ".4f"), fmt(s["final_accuracy"], ".4f"), str(s["total_updates"]),
             fmt(s["updates_per_s"], ".2f"), f"{fmt(st['p50'], 'g')} / {fmt(st['p90'], 'g')} / {fmt(st['max'], 'g')}",
             fmt(s["max_held_pulls"], "d"), fmt(s["refused_stale"], "d"), fmt(s["eval_share"], ".0%")]
    return "| " + " | ".join(cells) + " |"


def policies_markdown(setup: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], command: str) -> str:
    b = setup["bench"]
    task = b["task"]
    lines = [
        "# Consistency policies with stragglers: sync vs SSP vs async", "",
        f"{b['model']} / {b['strategy']} (E={task['epochs']}, B={task['batch_size']}, η={task['lr']:g}) on "
        f"{setup['dataset']}: the first {b['workers']} shards of a {setup['clients']}-client IID partition, the same "
        f"seed for every policy. Slow workers: {b['slow_workers']} of {b['workers']}, {b['slowdown']:g}× slower; "
        f"every update also takes {b['delay_s']:g} s of emulated device time (before the slowdown). Sync: C = 1, "
        f"quorum {b['sync_quorum']}, deadline {b['round_timeout_s']:g} s. ssp/async: staleness weight (1+τ)^−"
        f"{b['clock']['staleness_exponent']:g}, max staleness {b['clock']['max_staleness']}, buffer "
        f"{b['clock']['buffer']}. Target {b['target']:g}.", "",
        "Wall time to target: best-so-far test accuracy interpolated on the broker's elapsed seconds (initial model "
        "at 0 s); \"excl. eval\" subtracts the evaluation pauses before the crossing (exact for sync, whose workers "
        "all wait while the model is evaluated; ssp/async workers already handed a model keep training through a "
        "pause, so their time without evaluation lies between the two columns). Updates = applied updates "
        "(cumulative participants). Staleness τ = model versions between an update's base and the model it was "
        "applied to (sync: 0).", "",
        "| policy | wall s to target | × sync | wall s excl. eval | updates to target | best acc | final acc "
        "| updates | updates/s | τ p50 / p90 / max | max held pulls | refused stale | eval share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
        *[_table_row(r) for r in rows], "", *_notes(b, rows),
        "![accuracy vs wall time](policies.png)", "", "![staleness](policies_staleness.png)", "",
        "Command:", "", "```", command, "```", ""]
    return "\n".join(lines)


def _notes(b: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """What a reader should know about a row: short sync rounds, refused stale updates, budgets ended early."""
    notes = []
    for r in rows:
        s, recs = r["summary"], r["records"]
        short = sum(1 for rec in recs if int(rec.get("participants") or 0) < b["workers"])
        if r["policy"] == "sync" and short:
            notes.append(f"- `sync`: {short} of {len(recs)} rounds aggregated fewer than {b['workers']} updates "
                         f"(a worker left, or missed the start of a round; quorum {b['sync_quorum']}).")
        if s.get("refused_stale"):
            notes.append(f"- `{r['policy']}`: {s['refused_stale']} updates refused as more than "
                         f"{b['clock']['max_staleness']} versions old (their work is lost).")
        if s["wall_s_to_target"] is None:
            notes.append(f"- `{r['policy']}`: target not reached in {s['total_updates']} updates.")
    return [*notes, ""] if notes else []


def _evaluated_curve(r: Mapping[str, Any], axis: str) -> tuple[list[float], list[float]]:
    start = r["summary"].get("start_accuracy")
    xs, ys = ([0.0], [float(start)]) if start is not None else ([], [])
    updates = 0.0
    for rec in r["records"]:
        updates += float(rec.get("participants") or 0)
        if rec.get("test_accuracy") is not None:
            xs.append(float(rec["elapsed_s"]) if axis == "wall" else updates)
            ys.append(float(rec["test_accuracy"]))
    return xs, ys


def _figure(ncols: int, width: float) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def plot_accuracy(rows: Sequence[Mapping[str, Any]], target: float, path: Path) -> None:
    """Test accuracy vs wall seconds and vs applied updates, one curve per policy, the target dashed."""
    fig, axes = _figure(2, 6.5)
    for ax, axis, label in zip(axes, ("wall", "updates"), ("wall time (s)", "applied updates")):
        low = 1.0
        for r in rows:
            xs, ys = _evaluated_curve(r, axis)
            ax.plot(xs, ys, linewidth=1.2, marker="." if len(xs) < 40 else None, label=r["policy"])
            low = min([low, *ys[1:]]) if len(ys) > 1 else low
        ax.axhline(target, color="black", linestyle="--", linewidth=0.8, label=f"target {target:g}")
        ax.set_ylim(max(0.0, min(low, target) - 0.05), 1.0)
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=110)


def plot_staleness(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """One histogram of applied-update staleness per policy."""
    fig, axes = _figure(len(rows), 3.6)
    top = max((r["summary"]["staleness"]["max"] or 0 for r in rows), default=0)
    for ax, r in zip(axes, rows):
        hist = {int(k): v for k, v in r["summary"]["staleness"]["histogram"].items()}
        ax.bar(list(hist), list(hist.values()), width=1.0)
        ax.set_xlim(-0.5, max(top, 1) + 0.5)  # one scale for every policy
        ax.set_title(r["policy"])
        ax.set_xlabel("staleness τ (model versions)")
        ax.set_ylabel("applied updates")
        ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=110)


def write_policies_report(setup: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], out: Path,
                          command: str) -> dict[str, Path]:
    """OUT/policies.json (setup, rows with records and summaries), .md (table, command) and the two plots."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "policies.json", "markdown": out / "policies.md", "plot": out / "policies.png",
             "staleness": out / "policies_staleness.png"}
    doc = {"format": "fedctl-policies/1", "setup": setup, "command": command, "results": list(rows)}
    paths["json"].write_text(json.dumps(doc, indent=1))
    paths["markdown"].write_text(policies_markdown(setup, rows, command))
    plot_accuracy(rows, float(setup["bench"]["target"]), paths["plot"])
    plot_staleness(rows, paths["staleness"])
    return paths
