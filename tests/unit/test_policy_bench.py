"""`fedctl bench policies` / `bench heartbeat` summaries on literal records: wall time to target, staleness
statistics, ratios against sync, the run settings each policy gets, and the reports."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from fedctl.broker.policy import ClockConfig
from fedctl.errors import ConfigError
from fedctl.sim.heartbeat import HeartbeatBench, summarize_heartbeat, write_heartbeat_report
from fedctl.sim.metrics import percentile
from fedctl.sim.policies import (
    PolicyBench,
    add_ratios,
    staleness_stats,
    summarize_policy,
    to_target,
    write_policies_report,
)
from fedctl.strategies import TaskConfig

pytestmark = pytest.mark.timeout(60)


def rec(elapsed: float, acc: float | None, participants: int = 5, eval_s: float = 0.0, **extra: Any) -> dict:
    return {"elapsed_s": elapsed, "test_accuracy": acc, "participants": participants,
            "eval_s": eval_s if acc is not None else 0.0, **extra}


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 11))
    assert percentile(values, 50) == 5 and percentile(values, 90) == 9 and percentile(values, 99) == 10
    assert percentile(values, 0) == 1 and percentile([7.5], 99) == 7.5
    assert percentile([], 50) is None
    assert percentile([3, 1, 2], 50) == 2  # order of the input does not matter


def test_wall_time_to_target_interpolates_between_evaluations() -> None:
    # Evaluated at 20 s (0.90) and 30 s (0.98): 0.95 is 5/8 of the way, at 26.25 s and 10 + 5/8·5 updates.
    records = [rec(10, None), rec(20, 0.90, eval_s=1.0), rec(30, 0.98, eval_s=1.0)]
    got = to_target(records, 0.95, start_accuracy=0.1)
    assert got["wall_s_to_target"] == pytest.approx(26.25)
    assert got["updates_to_target"] == pytest.approx(13.125)
    # Without the 1 s evaluation pause that came before the 30 s record: between 20 s and 29 s.
    assert got["wall_s_excl_eval_to_target"] == pytest.approx(25.625)


def test_best_so_far_curve_ignores_dips_and_unreached_is_none() -> None:
    records = [rec(10, 0.90), rec(20, 0.80), rec(30, 0.97)]
    # Best so far: 0.90 at 10 s and 20 s, 0.97 at 30 s: 0.95 at 20 + 5/7·10 s.
    assert to_target(records, 0.95)["wall_s_to_target"] == pytest.approx(20 + 50 / 7)
    assert to_target(records, 0.99)["wall_s_to_target"] is None
    assert to_target(records, 0.99)["updates_to_target"] is None


def test_first_evaluation_above_target_interpolates_from_the_initial_model() -> None:
    records = [rec(4, 0.9, participants=20)]
    assert to_target(records, 0.5, start_accuracy=0.1)["wall_s_to_target"] == pytest.approx(2.0)
    assert to_target(records, 0.5, start_accuracy=0.1)["updates_to_target"] == pytest.approx(10.0)
    assert to_target(records, 0.5)["wall_s_to_target"] == 4.0  # no initial accuracy: the first crossing point


def test_staleness_stats_of_clock_records() -> None:
    records = [rec(1, None, 2, staleness=[0, 2]), rec(2, None, 1, staleness=[5]), rec(3, 0.5, 3, staleness=[1, 1, 3])]
    s = staleness_stats(records)
    assert s["count"] == 6 and s["mean"] == pytest.approx(2.0)
    assert (s["p50"], s["p90"], s["max"]) == (1, 5, 5)  # sorted 0 1 1 2 3 5: 3rd and 6th
    assert s["histogram"] == {"0": 1, "1": 2, "2": 1, "3": 1, "5": 1}


def test_sync_records_count_as_fresh_updates() -> None:
    s = staleness_stats([rec(1, 0.5, 20), rec(2, 0.6, 18)])
    assert s["count"] == 38 and (s["p50"], s["p90"], s["max"]) == (0, 0, 0) and s["histogram"] == {"0": 38}
    assert staleness_stats([])["p50"] is None


def test_summary_of_a_clock_run() -> None:
    records = [rec(1.0, None, 1, staleness=[0], held_pulls=2, refused_stale_total=0),
               rec(2.0, 0.7, 2, eval_s=0.5, staleness=[1, 3], held_pulls=4, refused_stale_total=1),
               rec(4.0, 0.9, 1, eval_s=0.5, staleness=[2], held_pulls=0, refused_stale_total=3)]
    s = summarize_policy(records, 0.8, start_accuracy=0.1)
    assert s["total_updates"] == 4 and s["total_wall_s"] == 4.0 and s["updates_per_s"] == 1.0
    assert s["best_accuracy"] == 0.9 and s["final_accuracy"] == 0.9
    assert s["max_held_pulls"] == 4 and s["refused_stale"] == 3 and s["min_participants"] == 1
    assert s["eval_share"] == pytest.approx(0.25)
    assert s["wall_s_to_target"] == pytest.approx(3.0)
    assert s["staleness"]["max"] == 3


def test_sync_summary_has_no_clock_figures() -> None:
    s = summarize_policy([rec(5.0, 0.9, 20)], 0.95)
    assert s["max_held_pulls"] is None and s["refused_stale"] is None and s["wall_s_to_target"] is None


def test_ratios_against_sync() -> None:
    summaries = {"sync": {"wall_s_to_target": 100.0, "wall_s_excl_eval_to_target": 80.0},
                 "async": {"wall_s_to_target": 40.0, "wall_s_excl_eval_to_target": 36.0},
                 "ssp:1": {"wall_s_to_target": None, "wall_s_excl_eval_to_target": None}}
    add_ratios(summaries)
    assert summaries["sync"]["wall_s_ratio_vs_sync"] == 1.0
    assert summaries["async"]["wall_s_ratio_vs_sync"] == pytest.approx(0.4)
    assert summaries["async"]["wall_s_excl_eval_ratio_vs_sync"] == pytest.approx(0.45)
    assert summaries["ssp:1"]["wall_s_ratio_vs_sync"] is None
    alone = {"async": {"wall_s_to_target": 40.0, "wall_s_excl_eval_to_target": 36.0}}
    add_ratios(alone)  # no sync run: nothing to compare with
    assert alone["async"]["wall_s_ratio_vs_sync"] is None


def test_budgets_and_evaluation_are_counted_in_updates(tmp_path: Path) -> None:
    bench = PolicyBench(workers=20, max_updates=4000, clock=ClockConfig(max_staleness=200, buffer=4))
    sync = bench.broker_config("sync", tmp_path)
    assert (sync.rounds, sync.eval_every, sync.policy) == (200, 1, "sync")
    assert (sync.sync.fraction, sync.sync.min_workers) == (1.0, 18)  # a dead worker does not stop the rounds
    async_ = bench.broker_config("async", tmp_path)
    assert (async_.rounds, async_.eval_every, async_.clock.buffer) == (1000, 5, 4)
    assert async_.target_accuracy == 0.985
    # Every version an admitted update may start from is kept (LeNet-5: 61,706 float32 parameters).
    assert async_.history_mb >= 202 * 61_706 * 4 / 2**20
    tiny = PolicyBench(workers=6, max_updates=60, eval_every=3, stop_at_target=False)
    assert tiny.broker_config("sync", tmp_path).eval_every == 1 and tiny.sync_quorum == 5
    assert tiny.broker_config("ssp:2", tmp_path).eval_every == 3
    assert tiny.broker_config("ssp:2", tmp_path).target_accuracy is None


@pytest.mark.parametrize("bad", [{"policies": ("ssp:x",)}, {"policies": ()}, {"model": "resnet"},
                                 {"strategy": "nope"}, {"quorum": 21}, {"max_updates": 0}])
def test_bad_settings_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        PolicyBench(**bad)


def _row(policy: str, records: list[dict]) -> dict:
    return {"policy": policy, "records": records, "summary": summarize_policy(records, 0.8, 0.1)}


def test_report_files(tmp_path: Path) -> None:
    rows = [_row("sync", [rec(5, 0.7, 6), rec(10, 0.85, 6)]),
            _row("async", [rec(1, 0.6, 2, staleness=[0, 3]), rec(2, 0.82, 3, staleness=[1, 2, 9])])]
    add_ratios({r["policy"]: r["summary"] for r in rows})
    bench = PolicyBench(policies=("sync", "async"), workers=6, model="mlp", task=TaskConfig(1, 50, 0.05))
    setup = {"bench": bench.describe(), "dataset": "mnist-sample", "clients": 10}
    files = write_policies_report(setup, rows, tmp_path, "fedctl bench policies --workers 6")
    assert all(p.is_file() and p.stat().st_size > 0 for p in files.values())
    doc = json.loads(files["json"].read_text())
    assert [r["policy"] for r in doc["results"]] == ["sync", "async"]
    assert doc["setup"]["bench"]["clock"]["max_staleness"] == 50 and "bound" not in doc["setup"]["bench"]["clock"]
    table = files["markdown"].read_text()
    assert "| `sync` |" in table and "| `async` |" in table and "fedctl bench policies --workers 6" in table
    assert "2 / 9 / 9" in table  # async τ 0 1 2 3 9: p50 / p90 / max


def test_heartbeat_summary_and_report(tmp_path: Path) -> None:
    bench = HeartbeatBench(workers=10, duration_s=1.0)
    raw = {"sent": 50, "answered": 49, "unanswered": 1, "rtt_s": [0.001 * (i + 1) for i in range(49)],
           "window_s": 2.0, "updates_applied": 300, "uplink_mb_per_s": 70.0, "downlink_mb_per_s": 0.1}
    s = summarize_heartbeat(bench, raw, 246_824)
    assert (s["rtt_ms_p50"], s["rtt_ms_p99"], s["rtt_ms_max"]) == pytest.approx((25.0, 49.0, 49.0))
    assert s["updates_per_s"] == 150.0
    assert s["within_budget"] is False  # a lost heartbeat fails the check, whatever the percentiles
    files = write_heartbeat_report(s, tmp_path, "fedctl bench heartbeat")
    assert json.loads(files["json"].read_text())["heartbeats"] == 50
    assert "| 50 | 1 | 25.00 |" in files["markdown"].read_text()
    assert math.isclose(summarize_heartbeat(bench, {**raw, "unanswered": 0}, 1)["rtt_ms_p90"], 45.0)


def test_report_notes_short_sync_rounds_refusals_and_missed_targets() -> None:
    from fedctl.sim.policies import policies_markdown

    rows = [_row("sync", [rec(5, 0.7, 6), rec(10, 0.75, 5)]),
            _row("async", [rec(1, 0.9, 2, staleness=[0, 3], refused_stale_total=4, held_pulls=0)])]
    add_ratios({r["policy"]: r["summary"] for r in rows})
    bench = PolicyBench(policies=("sync", "async"), workers=6, model="mlp")
    table = policies_markdown({"bench": bench.describe(), "dataset": "mnist", "clients": 100}, rows, "fedctl")
    assert "`sync`: 1 of 2 rounds aggregated fewer than 6 updates" in table
    assert "`sync`: target not reached in 11 updates" in table
    assert "`async`: 4 updates refused as more than 50 versions old" in table
    assert "`async`: target not reached" not in table
