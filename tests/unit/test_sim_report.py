"""The results report: files written, table rows and commands, JSON round trip, real PNGs, merge by preset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedctl.sim.metrics import summarize, summarize_centralized
from fedctl.sim.report import merge_results, write_report

pytest.importorskip("matplotlib")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fed(preset: str, model: str, target: float, accuracy: list[float | None], paper: int | None) -> dict[str, Any]:
    records = [{"round": i + 1, "version": i + 1, "test_accuracy": a, "test_loss": 0.1, "train_loss": 0.1,
                "participants": 10, "selected": 10, "connected": 100, "bytes_in": 2_000_000, "bytes_out": 4_000_000,
                "duration_s": 1.5, "rejected_total": 0} for i, a in enumerate(accuracy)]
    return {"preset": preset, "label": f"{model} fedavg E=1 B=10 C=0.1 η=0.1", "model": model, "strategy": "fedavg",
            "epochs": 1, "batch_size": 10, "fraction": 0.1, "lr": 0.1, "partition": "IID", "target": target,
            "paper_rounds": paper, "paper_note": "paper's 2NN" if paper else "",
            "command": f"fedctl sim --preset {preset}", "records": records,
            "summary": summarize(records, target, 0.1, 1), "peak_rss_mb": 812.5, "workers": 100}


def _central() -> dict[str, Any]:
    records = [{"epoch": e / 2, "test_accuracy": a, "test_loss": 0.1, "wall_s": 3.0 * e}
               for e, a in enumerate([0.1, 0.95, 0.975, 0.98])]
    return {"preset": "central-mlp", "label": "mlp centralised SGD (B=10, η=0.1)", "model": "mlp",
            "strategy": "central", "epochs": 1, "batch_size": 10, "fraction": 1.0, "lr": 0.1, "partition": "IID",
            "target": 0.97, "paper_rounds": None, "paper_note": "", "command": "fedctl sim --preset central-mlp",
            "records": records, "summary": summarize_centralized(records, 0.97), "peak_rss_mb": None, "workers": 0}


@pytest.fixture
def results() -> list[dict[str, Any]]:
    return [_fed("mlp-fedavg-e1-b10-iid", "mlp", 0.97, [0.85, None, 0.96, 0.98], 87),
            _fed("lenet5-fedavg-e1-b10-iid", "lenet5", 0.99, [0.9, 0.95, 0.97], None),
            _central()]


def test_write_report_files(tmp_path: Path, results: list[dict[str, Any]]) -> None:
    paths = write_report(results, tmp_path / "out", name="fl")
    assert set(paths) == {"json", "markdown", "accuracy_vs_round", "accuracy_vs_bytes", "accuracy_vs_epochs"}
    for key, path in paths.items():
        assert path.is_file() and path.stat().st_size > 0, key
        assert path.name.startswith("fl")
    for key in ("accuracy_vs_round", "accuracy_vs_bytes", "accuracy_vs_epochs"):
        data = paths[key].read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_markdown_rows_and_commands(tmp_path: Path, results: list[dict[str, Any]]) -> None:
    md = write_report(results, tmp_path)["markdown"].read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 3  # header + one per result
    mlp, lenet, central = rows[1:]
    # Round 2 is not evaluated: 0.97 is crossed halfway between (3, 0.96) and (4, 0.98).
    assert "| 3.5 | 87 | 0.35 | 7.0 | 14.0 | 5.2 | 0.9800 (4 rounds) |" in mlp
    assert "| — | — | — | — | — | — | 0.9700 (3 rounds) |" in lenet
    assert central.startswith("| mlp centralised SGD")
    # Between (0.5, 0.95) and (1.0, 0.975): epoch 0.9, 5.4 s of training.
    assert "| — | — | 0.90 | — | — | 5.4 | 0.9800 (1.5 epochs) |" in central
    for r in results:
        assert r["command"] in md
    assert "paper's 2NN" in md


def test_json_round_trips(tmp_path: Path, results: list[dict[str, Any]]) -> None:
    path = write_report(results, tmp_path)["json"]
    data = json.loads(path.read_text())
    assert data["results"] == results


def test_merge_replaces_by_preset(tmp_path: Path, results: list[dict[str, Any]]) -> None:
    path = write_report(results, tmp_path)["json"]
    rerun = _fed("lenet5-fedavg-e1-b10-iid", "lenet5", 0.99, [0.98, 0.991], None)
    extra = _fed("mlp-fedsgd-iid", "mlp", 0.97, [0.9, 0.975], 1474)
    merged = merge_results(path, [rerun, extra])
    assert [r["preset"] for r in merged] == ["mlp-fedavg-e1-b10-iid", "lenet5-fedavg-e1-b10-iid", "central-mlp",
                                           "mlp-fedsgd-iid"]
    assert merged[1]["records"] == rerun["records"]
    assert merge_results(tmp_path / "missing.json", [extra]) == [extra]
    md = write_report(merged, tmp_path)["markdown"].read_text()
    assert md.count("fedctl sim --preset lenet5-fedavg-e1-b10-iid") == 1


def test_low_accuracy_and_empty_reports_still_plot(tmp_path: Path) -> None:
    low = _fed("smoke", "mlp", 0.97, [0.3, 0.5], None)
    paths = write_report([low], tmp_path, name="smoke")
    assert paths["accuracy_vs_round"].read_bytes().startswith(PNG_MAGIC)
    empty = write_report([], tmp_path, name="empty")
    assert empty["accuracy_vs_epochs"].read_bytes().startswith(PNG_MAGIC)
