"""``fedctl simulate`` and ``fedctl bench fl`` in real processes: many virtual workers, resume after Ctrl-C, reports."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from conftest import Launcher, fedctl, read_metrics

pytestmark = pytest.mark.timeout(300)


def _simulate_args(state: Path, rounds: int) -> list[str]:
    return ["simulate", "--dataset", "mnist-sample", "--clients", "20", "--fraction", "0.25", "--rounds", str(rounds),
            "--min-workers", "5", "--state-dir", str(state), "--backend", "torch"]


def test_simulate_twenty_workers_samples_five_per_round(tmp_path: Path) -> None:
    state = tmp_path / "run" / "state"
    run = fedctl(tmp_path, *_simulate_args(state, 3), timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = read_metrics(state)
    assert [(m["round"], m["participants"], m["connected"]) for m in metrics] == [(r, 5, 20) for r in (1, 2, 3)]
    assert metrics[-1]["test_accuracy"] > 0.8
    assert "simulated 20 workers" in run.stdout and "peak RSS" in run.stdout
    # Each sampled worker pushed one dense MLP update over the socket: the broker counted them.
    assert all(5 * 437_544 < m["bytes_in"] < 5 * 450_000 for m in metrics), [m["bytes_in"] for m in metrics]


def test_simulate_and_demo_on_dirichlet_shards(tmp_path: Path) -> None:
    """--dirichlet makes the label-skewed partition (Hsu et al.) that simulate and demo then train on."""
    state = tmp_path / "run" / "state"
    run = fedctl(tmp_path, "simulate", "--dataset", "mnist-sample", "--clients", "6", "--dirichlet", "0.2",
                 "--rounds", "1", "--state-dir", str(state), "--backend", "torch", timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads((tmp_path / "run" / "partitions" / "mnist-sample-6-dirichlet0.2-seed0" /
                           "manifest.json").read_text())
    assert manifest["scheme"] == "dirichlet" and manifest["alpha"] == 0.2
    classes_held = [sum(1 for c in s["label_histogram"] if c) for s in manifest["shards"]]
    assert min(classes_held) < 10, classes_held  # skewed: some client lacks a class
    assert read_metrics(state)[0]["participants"] == 6
    demo = fedctl(tmp_path, "demo", "--workers", "2", "--rounds", "1", "--dirichlet", "0.2", "--out",
                  str(tmp_path / "demo"), timeout=240)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert json.loads((tmp_path / "demo" / "data" / "manifest.json").read_text())["scheme"] == "dirichlet"


def test_simulate_resumes_after_ctrl_c(spawn: Launcher, tmp_path: Path) -> None:
    state = tmp_path / "run" / "state"
    rounds = 80  # enough that the interrupt lands part-way even when rounds take a few ms
    proc = spawn("simulate", *_simulate_args(state, rounds))
    deadline = time.monotonic() + 200
    while len(read_metrics(state)) < 2:
        assert time.monotonic() < deadline and proc.popen.poll() is None, proc.describe()
        time.sleep(0.1)
    proc.popen.send_signal(signal.SIGINT)
    assert proc.wait(60) != 0
    done_before = len(read_metrics(state))
    assert 2 <= done_before < rounds, "the run should have been interrupted part-way"

    again = fedctl(tmp_path, *_simulate_args(state, rounds), timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [m["round"] for m in read_metrics(state)] == list(range(1, rounds + 1))  # continued, nothing repeated


def test_bench_fl_smoke_writes_table_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "results"
    run = fedctl(tmp_path, "bench", "fl", "--preset", "smoke", "--preset", "smoke-central", "--out", str(out),
                 timeout=280)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {r["preset"]: r for r in json.loads((out / "fl.json").read_text())["results"]}
    assert set(rows) == {"smoke", "smoke-central"}
    assert [r["round"] for r in rows["smoke"]["records"]] == [1, 2, 3]
    assert rows["smoke"]["summary"]["best_accuracy"] > 0.8
    assert rows["smoke-central"]["records"][-1]["epoch"] == 1.0
    table = (out / "fl.md").read_text()
    assert "fedctl bench fl --preset smoke" in table and "centralised" in table
    for png in ("fl_accuracy_vs_round.png", "fl_accuracy_vs_bytes.png", "fl_accuracy_vs_epochs.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_comm_smoke_compares_dgc_with_dense_fedsgd(tmp_path: Path) -> None:
    out = tmp_path / "results"
    run = fedctl(tmp_path, "bench", "comm", "--preset", "smoke-fedsgd", "--preset", "smoke-dgc", "--no-topk",
                 "--out", str(out), timeout=280)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads((out / "comm.json").read_text())
    rows = {r["preset"]: r for r in data["results"]}
    assert set(rows) == {"smoke-fedsgd", "smoke-dgc"}
    dense, dgc = rows["smoke-fedsgd"]["comm"], rows["smoke-dgc"]["comm"]
    # Bytes are counted on the broker's socket: 5 dense MLP pushes per round against 1%-sparse ones.
    assert dense["up_per_round"] > 5 * 109_386 * 4
    assert dgc["vs_reference"]["reference"] == "smoke-fedsgd"
    assert dgc["vs_reference"]["up_ratio_per_round"] > 20
    assert 0.005 < dgc["density"] < 0.02 and dgc["bytes_per_kept"] < 12
    assert "fedctl bench comm --preset smoke-dgc" in (out / "comm.md").read_text()
    assert (out / "comm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_round_measures_separate_processes(tmp_path: Path) -> None:
    """`fedctl bench round` without Flower, scaled down: `fedctl serve` and 3 worker processes, the table and the
    JSON with every figure; on loopback the wire carries the raw payload plus framing (nothing is compressed)."""
    out = tmp_path / "bench"
    run = fedctl(tmp_path, "bench", "round", "--workers", "3", "--model", "mlp", "--rounds", "4", "--no-flower",
                 "--out", str(out), timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    [row] = json.loads((out / "round.json").read_text())["rows"]
    assert (row["system"], row["workers"], row["processes"], row["participants"], row["error"]) == \
        ("fedctl", 3, 3, 3, None)
    assert row["s_per_round"] > 0 and row["server_cpu_s_per_round"] > 0 and row["worker_cpu_ms_per_round"] > 0
    assert row["server_peak_rss_mb"] > 20 and row["worker_peak_rss_mb"] > 20
    assert 1.0 <= row["wire_bytes_per_round"] / row["raw_payload_per_round"] < 1.02, row
    table = (out / "round.md").read_text()
    assert "| 3 | mlp (438 KB) |" in table and (out / "round.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_round_beside_flower(tmp_path: Path) -> None:
    """The side-by-side row: Flower 1.42 installed from PyPI into its own virtual environment (never into fedctl's),
    its server and clients as separate processes with the same workload, in the same run."""
    out = tmp_path / "bench"
    run = fedctl(tmp_path, "bench", "round", "--workers", "3", "--model", "mlp", "--rounds", "4", "--out", str(out),
                 "--flower-venv", str(tmp_path / "flwr"), timeout=840)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {r["system"]: r for r in json.loads((out / "round.json").read_text())["rows"]}
    assert set(rows) == {"fedctl", "flower"} and rows["flower"]["participants"] == 3
    assert rows["flower"]["s_per_round"] > 0 and rows["flower"]["server_peak_rss_mb"] > 20
    assert "| 3 | mlp (438 KB) |" in (out / "round.md").read_text()
    import importlib.util
    assert importlib.util.find_spec("flwr") is None, "Flower must not be installed beside fedctl"
