"""``fedctl bench policies`` and ``fedctl bench heartbeat`` in real processes, on tiny configurations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import fedctl, read_metrics

pytestmark = pytest.mark.timeout(150)


def test_bench_policies_sync_vs_async_with_a_straggler(tmp_path: Path) -> None:
    out = tmp_path / "results"
    # 6 workers, the first 5x slower: a sync round waits ~5 x (training + 0.2 s), async applies what arrives.
    run = fedctl(tmp_path, "bench", "policies", "--dataset", "mnist-sample", "--clients", "10", "--workers", "6",
                 "--model", "mlp", "--policies", "sync", "--policies", "async", "--target", "0.8",
                 "--max-updates", "90", "--delay", "0.2", "--backend", "torch", "--out", str(out), timeout=140)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("policies.json", "policies.md", "policies.png", "policies_staleness.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    doc = json.loads((out / "policies.json").read_text())
    rows = {r["policy"]: r for r in doc["results"]}
    assert list(rows) == ["sync", "async"]
    sync, asy = rows["sync"]["summary"], rows["async"]["summary"]
    assert doc["setup"]["bench"]["slow_workers"] == 1
    for s in (sync, asy):
        assert s["wall_s_to_target"] is not None and s["best_accuracy"] >= 0.8, s  # stopped at the target
    assert sync["wall_s_ratio_vs_sync"] == 1.0 and asy["wall_s_ratio_vs_sync"] is not None
    assert asy["updates_per_s"] > 1.5 * sync["updates_per_s"], (asy["updates_per_s"], sync["updates_per_s"])
    assert sync["staleness"]["max"] == 0 and asy["staleness"]["max"] >= 1
    # One fresh state dir per policy, with the broker's own records.
    assert [m["participants"] for m in read_metrics(out / "runs" / "policies-sync")][0] == 6
    assert all("staleness" in m for m in read_metrics(out / "runs" / "policies-async"))
    table = (out / "policies.md").read_text()
    assert "| `sync` |" in table and "| `async` |" in table and "fedctl bench policies --dataset mnist-sample" in table


def test_bench_heartbeat_probe_reports_round_trips(tmp_path: Path) -> None:
    out = tmp_path / "results"
    run = fedctl(tmp_path, "bench", "heartbeat", "--workers", "10", "--duration", "3", "--out", str(out), timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((out / "heartbeat.json").read_text())
    assert 120 <= result["heartbeats"] <= 151  # one every 20 ms for 3 s
    assert result["answered"] >= 0.95 * result["heartbeats"] and len(result["rtt_ms"]) == result["answered"]
    assert 0 < result["rtt_ms_p50"] <= result["rtt_ms_p99"] <= result["rtt_ms_max"]
    assert result["updates_applied"] > 0 and result["uplink_mb_per_s"] > 0
    assert "RTT p50" in (out / "heartbeat.md").read_text() and "heartbeat RTT p50" in run.stderr
