"""``fedctl bench noniid`` end to end on the bundled sample (the `smoke` setting): every grid point runs through the
real broker, the best continues to the budget, and the report names the grid, the choice and the result; a
misspelt ``--preset`` of ``bench fl`` is refused in one line with a suggestion."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import fedctl

pytestmark = pytest.mark.timeout(240)


def test_the_comparison_tunes_each_algorithm_then_runs_the_best_to_the_budget(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = fedctl(tmp_path, "bench", "noniid", "--setting", "smoke", "--strategy", "fedavg", "--strategy", "fedavgm",
                 "--out", str(out), "--parallel", "1", timeout=200)
    assert run.returncode == 0, run.stderr
    rows = json.loads((out / "noniid.json").read_text())["results"]
    assert [r["strategy"] for r in rows] == ["fedavg", "fedavgm"]
    for r in rows:
        assert len(r["grid"]) == 3 and r["rounds_run"] == 3
        best = max(r["grid"], key=lambda g: (g["best_accuracy"], -g["value"]))
        assert r["chosen"] == best["value"], "the best grid point is the one run to the budget"
        assert r["bytes_up"] > 0 and r["accuracy_after_budget"] is not None
        assert (out / "runs" / r["preset"] / "metrics.jsonl").is_file()
    page = (out / "noniid.md").read_text()
    assert "| fedavg | lr: 0.025 (" in page and "| fedavgm | eta: 0.3 (" in page
    fedavg, fedavgm = rows
    assert fedavg["rounds_past_budget"] > 0 and fedavg["rounds_to_target"] > 3, \
        "FedAvg, short of the target at the budget, runs on to it: every ratio gets a denominator"
    assert fedavgm["rounds_past_budget"] == 0, "only the reference runs past the budget"
    ran = [json.loads(line)["round"] for line in (out / "runs" / fedavg["preset"] / "metrics.jsonl").open()]
    assert ran[-1] == 3 + fedavg["rounds_past_budget"] and fedavg["rounds_to_target"] <= ran[-1]
    assert f"{fedavg['rounds_to_target']:.1f} †" in page
    assert (out / "noniid_smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = fedctl(tmp_path, "bench", "noniid", "--setting", "smoke", "--strategy", "fedavg", "--out", str(out),
                   "--parallel", "1", timeout=200)
    assert again.returncode == 0 and json.loads((out / "noniid.json").read_text())["results"] == rows, \
        "a finished comparison resumes to the same result without training again"
    assert "÷ FedAvg's" in page and "| fedavg | lr: " in page
    import shutil

    shutil.rmtree(out / "runs")  # (what a fresh checkout has: the table, not the runs)
    skipped = fedctl(tmp_path, "bench", "noniid", "--setting", "smoke", "--strategy", "fedavg", "--out", str(out),
                     "--parallel", "1", "--skip-existing", timeout=200)
    assert skipped.returncode == 0 and "fedavg: already in" in skipped.stderr, skipped.stderr
    assert not (out / "runs").exists(), "a skipped algorithm trains nothing"
    assert json.loads((out / "noniid.json").read_text())["results"] == rows


def test_a_misspelt_preset_is_one_line_with_a_suggestion(tmp_path: Path) -> None:
    run = fedctl(tmp_path, "bench", "fl", "--preset", "cnn-fedavg-e5-b10-idd", timeout=60)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    [line] = run.stderr.strip().splitlines()
    assert "did you mean cnn-fedavg-e5-b10-iid" in line, line


def test_an_lr_grid_keeps_the_best_point_as_the_row(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = fedctl(tmp_path, "bench", "fl", "--preset", "smoke", "--out", str(out), "--max-rounds", "2",
                 "--parallel", "1", "--lr-grid", "0.2,0.05", timeout=200)
    assert run.returncode == 0, run.stderr
    [row] = json.loads((out / "fl.json").read_text())["results"]
    grid = {g["lr"]: g["best_accuracy"] for g in row["lr_grid"]}
    assert set(grid) == {0.05, 0.2} and row["lr"] == max(grid, key=lambda lr: grid[lr])
    assert row["preset"] == "smoke" and (out / "runs" / "smoke@lr0.05" / "metrics.jsonl").is_file()
    assert f"{row['lr']:g} (best of 0.05, 0.2)" in (out / "fl.md").read_text()
    plain = tmp_path / "plain"
    first = fedctl(tmp_path, "bench", "fl", "--preset", "smoke", "--out", str(plain), "--max-rounds", "2",
                   "--parallel", "1", timeout=200)
    assert first.returncode == 0, first.stderr
    [measured] = json.loads((plain / "fl.json").read_text())["results"]
    grid = fedctl(tmp_path, "bench", "fl", "--preset", "smoke", "--out", str(plain), "--max-rounds", "2",
                  "--parallel", "1", "--lr-grid", "0.05,0.1", timeout=200)
    assert grid.returncode == 0, grid.stderr
    assert not (plain / "runs" / "smoke@lr0.1").exists(), "the preset's own rate, already measured, is not rerun"
    [row] = json.loads((plain / "fl.json").read_text())["results"]
    point = next(g for g in row["lr_grid"] if g["lr"] == 0.1)
    assert point["best_accuracy"] == measured["summary"]["best_accuracy"]
    bad = fedctl(tmp_path, "bench", "fl", "--preset", "smoke", "--lr-grid", "0.1", timeout=60)
    assert bad.returncode == 2 and "two or more distinct" in bad.stderr and "Traceback" not in bad.stderr


def test_an_lr_grid_stops_a_point_that_can_no_longer_win(tmp_path: Path) -> None:
    """The rule is the fewest rounds to the target: a point still to run after another reached the target in R
    rounds stops after ⌈R⌉ + 1 rounds, and the grid says so."""
    out = tmp_path / "out"
    first = fedctl(tmp_path, "bench", "fl", "--preset", "smoke-target", "--out", str(out), "--parallel", "1",
                   timeout=200)
    assert first.returncode == 0, first.stderr
    [measured] = json.loads((out / "fl.json").read_text())["results"]
    reached = measured["summary"]["rounds_to_target"]
    assert reached is not None and reached < 7, "the preset's own rate reaches its target early"
    grid = fedctl(tmp_path, "bench", "fl", "--preset", "smoke-target", "--out", str(out), "--parallel", "1",
                  "--lr-grid", "0.001,0.1", timeout=200)
    assert grid.returncode == 0, grid.stderr
    [row] = json.loads((out / "fl.json").read_text())["results"]
    slow = next(g for g in row["lr_grid"] if g["lr"] == 0.001)
    cap = math.ceil(reached) + 1
    assert slow["rounds_to_target"] is None and slow["stopped_after"] == cap and slow["rounds_run"] == cap, slow
    assert len((out / "runs" / "smoke-target@lr0.001" / "metrics.jsonl").read_text().splitlines()) == cap
    assert row["lr"] == 0.1 and "another rate got there" in " ".join(grid.stderr.split())
