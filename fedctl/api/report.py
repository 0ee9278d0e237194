"""``fedctl report STATE_DIR``: one self-contained HTML page (and a PNG of its curves) describing a run from its
state directory — finished or still running — read-only.

Everything comes from what the broker writes: ``state.json`` (the configuration and where the run is),
``metrics.jsonl`` (one line per round or model version) and ``journal.jsonl`` (every applied update: which
workers took part). The page embeds its figure as a PNG data URI and loads nothing from anywhere.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedctl.broker.store import Checkpointer
from fedctl.errors import ConfigError
from fedctl.fsio import atomic_write, check_writable_dir

CONFIG_KEYS = ("run_id", "model", "strategy", "round", "version", "elapsed_s", "dp_budget_spent_at")
ROUND_COLUMNS = ("round", "version", "participants", "selected", "test_accuracy", "test_loss", "fed_eval_accuracy",
                 "train_loss", "duration_s", "bytes_in", "bytes_out", "rejected_total")


@dataclass(frozen=True)
class Report:
    html: Path
    png: Path
    rounds: int


def _figure(records: list[dict[str, Any]]) -> bytes:
    """Accuracy and loss against the round and against the cumulative bytes on the wire, as PNG bytes."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("fedctl report draws its curves with matplotlib, which is not installed",
                          "pip install 'fedctl[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in records]
    sent = list(itertools.accumulate((r.get("bytes_in") or 0) + (r.get("bytes_out") or 0) for r in records))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("test_accuracy", "test accuracy"), ("fed_eval_accuracy", "federated evaluation accuracy")):
        points = [(x, b, r[key]) for x, b, r in zip(rounds, sent, records) if r.get(key) is not None]
        if points:
            axes[0].plot([p[0] for p in points], [p[2] for p in points], marker=".", label=label)
            axes[1].plot([p[1] / 1e6 for p in points], [p[2] for p in points], marker=".", label=label)
    losses = [(x, r["train_loss"]) for x, r in zip(rounds, records) if r.get("train_loss") is not None]
    if losses:
        twin = axes[0].twinx()
        twin.plot([p[0] for p in losses], [p[1] for p in losses], color="grey", alpha=0.5, label="train loss")
        twin.set_ylabel("train loss")
    axes[0].set_xlabel("round (model version)")
    axes[1].set_xlabel("MB on the wire (both directions, cumulative)")
    for ax in axes:
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return html.escape(str(value))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def report(state_dir: str | Path, out: str | Path | None = None) -> Report:
    """Write ``OUT.html`` and ``OUT.png`` (default: ``STATE_DIR/report.html`` and ``report.png``) for the run in
    ``state_dir``. ConfigError when it holds no run yet or ``out`` cannot be written; nothing is half-written."""
    state_dir = Path(state_dir)
    checkpointer = Checkpointer(state_dir)
    state = checkpointer.read_state()
    records = [r for r in checkpointer.read_metrics() if isinstance(r, dict) and isinstance(r.get("round"), int)]
    if not records:
        raise ConfigError(f"{state_dir} has no completed round in metrics.jsonl yet",
                          "wait for the first round to complete, or pass the --state-dir of another run")
    html_path = Path(out) if out is not None else state_dir / "report.html"
    if html_path.suffix != ".html":
        html_path = html_path.with_suffix(".html")
    check_writable_dir(html_path.parent, "--out")
    png_path = html_path.with_suffix(".png")
    png = _figure(records)
    journal = checkpointer.read_journal()
    per_worker = Counter(str(e.get("worker")) for e in journal)
    rounds_of: dict[str, list[int]] = {}
    for e in journal:
        rounds_of.setdefault(str(e.get("worker")), []).append(int(e.get("round", 0)))
    total_in = sum(r.get("bytes_in") or 0 for r in records)
    total_out = sum(r.get("bytes_out") or 0 for r in records)
    updates_in = sum(r.get("update_bytes_in") or 0 for r in records)
    models_out = sum(r.get("model_bytes_out") or 0 for r in records)
    last = records[-1]
    config_rows = [[k, state.get(k)] for k in CONFIG_KEYS if k in state]
    config_rows += [[f"spec: {k}", v] for k, v in sorted((state.get("spec") or {}).items())
                    if isinstance(v, (str, int, float))]
    ledger = [["received (all messages)", total_in], ["  of which updates (push)", updates_in],
              ["sent (all messages)", total_out], ["  of which models", models_out],
              ["per round, mean", (total_in + total_out) // len(records)]]
    workers = [[w, n, min(rounds_of[w]), max(rounds_of[w])] for w, n in sorted(per_worker.items())]
    rows = [[r.get(c) for c in ROUND_COLUMNS] for r in records]
    title = f"fedctl run {state.get('run_id', '?')}: {state.get('model')} / {state.get('strategy')}"
    acc = last.get("test_accuracy") if last.get("test_accuracy") is not None else last.get("fed_eval_accuracy")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1200px; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child, th:first-child {{ text-align: left; }}
img {{ max-width: 100%; height: auto; }} .scroll {{ overflow-x: auto; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{len(records)} rounds recorded (last: round {last['round']}, model version {last.get('version')}), final accuracy
{_cell(acc)}, {len(per_worker)} workers took part, {_cell((total_in + total_out) / 1e6)} MB on the wire.
Written by <code>fedctl report</code> from <code>{html.escape(str(state_dir))}</code>.</p>
<h2>Curves</h2>
<img alt="accuracy against the round and against the bytes on the wire"
 src="data:image/png;base64,{base64.b64encode(png).decode()}">
<h2>Configuration</h2>{_table(["setting", "value"], config_rows)}
<h2>Bytes</h2>{_table(["ledger", "bytes"], ledger)}
<h2>Workers that took part</h2>{_table(["worker", "updates applied", "first round", "last round"], workers)}
<h2>Rounds</h2><div class="scroll">{_table(list(ROUND_COLUMNS), rows)}</div>
</body></html>
"""
    atomic_write(png_path, lambda fh: fh.write(png))
    atomic_write(html_path, lambda fh: fh.write(page.encode("utf-8")))
    return Report(html_path, png_path, len(records))
