"""Before/after in one run: the broker overhead (and optionally the heartbeat benchmark) of an earlier revision and
of this checkout, alternated A B A B … so both see the same machine. Writes bench/results/compare.{json,md}.

Usage: ``.venv/bin/python bench/compare_revisions.py --base e1c375f [--repeats 5] [--workers 100] [--heartbeat]``.
The earlier revision is checked out with ``git worktree`` into a temporary directory and imported from there
(``PYTHONPATH``), with this checkout's virtual environment.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
OVERHEAD = """
import json, sys
sys.path.insert(0, "bench")
import broker_overhead
if __name__ == "__main__":
    r = broker_overhead.run({workers}, {rounds})
    print(json.dumps({{"duration_s": r["duration_s"]["median"], "cycle_s": r["cycle_s"]["median"]}}))
"""


def run_side(tree: Path, what: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    if what == "overhead":
        code = OVERHEAD.format(workers=args.workers, rounds=args.rounds)
        done = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True,
                              timeout=600, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])
    subprocess.run([sys.executable, "-m", "fedctl", "bench", "heartbeat", "--out", str(out)], cwd=tree, env=env,
                   capture_output=True, text=True, timeout=600, check=True)
    data = json.loads((out / "heartbeat.json").read_text())
    return {k: float(data[k]) for k in ("rtt_ms_p50", "rtt_ms_p99", "updates_per_s", "broker_peak_rss_mb")}


def table(rows: dict[str, dict[str, list[float]]]) -> list[str]:
    lines = ["| measure | base (median of runs) | this checkout | ratio |", "|---|---:|---:|---:|"]
    for key in rows["base"]:
        base, head = statistics.median(rows["base"][key]), statistics.median(rows["head"][key])
        lines.append(f"| {key} | {base:.4g} | {head:.4g} | {head / base:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the earlier revision (commit, tag or branch)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--heartbeat", action="store_true", help="also run `fedctl bench heartbeat` on each side")
    args = parser.parse_args()
    whats = ["overhead", *(["heartbeat"] if args.heartbeat else [])]
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = Path(tmp) / "base"
        added = subprocess.run(["git", "worktree", "add", "--detach", str(base_tree), args.base], cwd=ROOT,
                               capture_output=True, text=True, check=False)
        if added.returncode != 0:
            sys.exit(f"error: cannot check out --base {args.base!r} ({added.stderr.strip().splitlines()[-1]}) — "
                     "pass a commit, tag or branch of this repository")
        try:
            results: dict[str, dict[str, dict[str, list[float]]]] = {w: {"base": {}, "head": {}} for w in whats}
            for what in whats:
                for i in range(args.repeats):
                    for side, tree in (("base", base_tree), ("head", ROOT)):
                        got = run_side(tree, what, args, Path(tmp) / f"{what}-{side}-{i}")
                        for key, value in got.items():
                            results[what][side].setdefault(key, []).append(value)
                        print(what, side, i, got, flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, check=False,
                           capture_output=True)
    report: dict[str, Any] = {"base": args.base, "workers": args.workers, "rounds": args.rounds,
                              "repeats": args.repeats, "load_average_1min": os.getloadavg()[0], "results": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compare.json").write_text(json.dumps(report, indent=1))
    lines = [f"# Before/after: {args.base} vs this checkout", "",
             f"{args.workers} no-op workers, {args.rounds} rounds (first left out), runs alternated "
             f"{args.repeats}× (`bench/compare_revisions.py --base {args.base}`).", ""]
    for what in whats:
        lines += [f"## {what}", "", *table(results[what]), ""]
    (RESULTS / "compare.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
