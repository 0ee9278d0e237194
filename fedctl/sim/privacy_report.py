"""The report of ``fedctl bench privacy``: privacy.json, privacy.md and privacy.png (the secure-aggregation ratios,
DP-FedAvg's accuracy against ε, Selective SGD's accuracy against its per-value ε)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PUBLISHED = [
    ("Bonawitz et al. 2017 (SecAgg, complete graph)", "communication expansion 1.73× for 2^10 users with "
     "2^20-dimensional vectors, 1.98× for 2^14 users with 2^24 dimensions (16-bit inputs); server cost quadratic "
     "in n"),
    ("Bell et al. 2020 (SecAgg+, k = O(log n) neighbours)", "client cost polylogarithmic in n; server "
     "O(n log² n + n log n · m)"),
]


def write_privacy_report(out: Path, results: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    merged = {**(json.loads((out / "privacy.json").read_text()) if (out / "privacy.json").exists() else {}),
              **results}
    (out / "privacy.json").write_text(json.dumps(merged, indent=1, default=str))
    (out / "privacy.md").write_text(markdown(merged))
    plot(merged, out / "privacy.png")


def markdown(res: dict[str, Any]) -> str:
    lines = ["# Privacy: what it costs", "", f"{res.get('environment', '')}", ""]
    if res.get("secagg"):
        lines += ["## Secure aggregation against the same run without it", "",
                  "| model | workers | run | round (median) | ratio | bytes / worker / round | ratio | broker "
                  "secure-aggregation compute | each worker's (mean) | training (mean) | inputs summed | abandoned "
                  "attempts |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in res["secagg"]:
            lines.append(f"| {r['model']} | {r['workers']} | {r['run']} | {r['round_s']:.3f} s | "
                         f"{r['round_ratio']:.2f}× | {r['bytes_per_worker'] / 1e3:,.1f} kB | {r['bytes_ratio']:.3f}× | "
                         f"{r['broker_s'] * 1e3:.1f} ms | {r.get('worker_s', 0) * 1e3:.1f} ms | "
                         f"{r.get('train_s', 0) * 1e3:.0f} ms | {r['inputs']:g} | {r.get('abandoned', 0)} |")
        lines += ["", "Published figures, for comparison (n users, m-element vectors):", ""]
        lines += [f"* **{name}**: {text}" for name, text in PUBLISHED]
        lines.append("")
    if res.get("dp"):
        lines += ["## DP-FedAvg: test accuracy against ε", "",
                  "| target ε | ε spent | noise multiplier z | clip S | clients K | per round m | q | rounds | δ | "
                  "test accuracy |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in res["dp"]:
            lines.append(f"| {_num(r['epsilon_target'])} | {_num(r['epsilon'], '–')} | "
                         f"{_num(r['noise_multiplier'], '0 (no noise)')} | "
                         f"{r['clip']} | {r['clients']} | {r['sampled']} | {r['q']:g} | {r['rounds']} | "
                         f"{r['delta']:g} | {r['final_accuracy']:.4f} |")
        lines.append("")
    if res.get("ssgd"):
        lines += ["## Selective SGD with differential privacy (sparse vector technique)", "",
                  "| ε per value | ε per upload (c values) | ε spent by a worker (max) | uploaded values c | γ | "
                  "rounds | test accuracy |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in res["ssgd"]:
            lines.append(f"| {_num(r['epsilon_per_value'])} | {_num(r['epsilon_per_upload'], '–')} | "
                         f"{_num(r['epsilon_max'], '–')} | {r['uploaded_values']} | {r['gamma']} | {r['rounds']} | "
                         f"{r['final_accuracy']:.4f} |")
        lines.append("")
    return "\n".join(lines)


def _num(v: Any, none: str = "∞ (no DP)") -> str:
    return none if v is None else f"{v:,.3g}" if isinstance(v, float) else str(v)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("secagg", "dp", "ssgd") if res.get(k)]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.8), squeeze=False)
    for ax, key in zip(axes[0], panels):
        if key == "secagg":
            rows = [r for r in res["secagg"] if r["run"] != "plain"]
            labels = [f"{r['model']} {r['workers']}" + ("" if r["run"] == "secure" else
                                                        " " + r["run"].replace("secure, ", "")) for r in rows]
            xs = range(len(rows))
            ax.bar([x - 0.2 for x in xs], [r["round_ratio"] for r in rows], 0.4, label="round time ratio")
            ax.bar([x + 0.2 for x in xs], [r["bytes_ratio"] for r in rows], 0.4, label="bytes/worker ratio")
            ax.axhline(1.5, color="tab:red", ls="--", lw=1, label="round-time goal 1.5×")
            ax.axhline(1.15, color="tab:purple", ls=":", lw=1, label="bytes goal 1.15×")
            ax.set_xticks(list(xs), labels, fontsize=7, rotation=60, ha="right")
            ax.set_ylabel("secure / plain")
            ax.set_title("Secure aggregation overhead")
            ax.legend(fontsize=7)
        elif key == "dp":
            private = [r for r in res["dp"] if r["epsilon_target"] is not None]
            _accuracy_vs_epsilon(ax, res["dp"], "epsilon", "DP-FedAvg",
                                 f"ε (δ = {private[0]['delta']:g})" if private else "ε",
                                 f"DP-FedAvg, MNIST MLP, {res['dp'][0]['clients']} clients")
        else:
            ax.axhline(0.1, color="tab:red", ls=":", lw=1, label="chance")
            _accuracy_vs_epsilon(ax, res["ssgd"], "epsilon_per_value", "DP Selective SGD",
                                 "ε per uploaded value (an upload spends c·ε)", "Selective SGD (θ_u = 0.01, γ = 0.01)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _accuracy_vs_epsilon(ax: Any, rows: list[dict[str, Any]], key: str, label: str, xlabel: str, title: str) -> None:
    """Final accuracy against ε (``key``) for the private rows, the non-private row (``key`` empty) as a line."""
    private = [r for r in rows if r[key]]
    ax.plot([r[key] for r in private], [r["final_accuracy"] for r in private], marker="o", label=label)
    for r in rows:
        if not r[key]:
            ax.axhline(r["final_accuracy"], color="gray", ls="--", label="no DP")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.legend(fontsize=7)
