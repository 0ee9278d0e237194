"""``fedctl bench scale --edges``, scaled down to seconds: 40 no-op workers in their own processes, flat against a
root over two edge brokers (each its own process); the table, the JSON and the plot, with the root's inbound bytes
divided by the fan-in; its mistakes are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import fedctl

pytestmark = pytest.mark.timeout(300)


def test_flat_and_two_levels_side_by_side(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = fedctl(tmp_path, "bench", "scale", "--workers", "40", "--edges", "0", "--edges", "2", "--sampled", "8",
                 "--rounds", "3", "--model", "mlp", "--out", str(out), timeout=280)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {r["edges"]: r for r in json.loads((out / "scale_brokers.json").read_text())["results"]}
    flat, two = rows[0], rows[2]
    assert flat["root"]["participants"] == [8, 8, 8] and two["root"]["participants"] == [2, 2, 2]
    # The root receives one merged update per edge instead of one per worker: fan-in 4.
    assert two["root"]["bytes_in_per_round"] == pytest.approx(flat["root"]["bytes_in_per_round"] / 4, rel=0.05)
    assert two["edge"]["bytes_in_per_round_mean"] == pytest.approx(flat["root"]["bytes_in_per_round"] / 2, rel=0.05)
    for r in (flat, two):
        assert r["round_s_median"] > 0 and r["root"]["peak_rss_mb"] > 20
    page = (out / "scale_brokers.md").read_text()
    assert "| 40 | mlp | flat |" in page and "| 40 | mlp | 2 |" in page
    assert (out / "scale_brokers.png").read_bytes()[:4] == b"\x89PNG"


def test_edges_that_do_not_divide_the_workers_are_one_line(tmp_path: Path) -> None:
    run = fedctl(tmp_path, "bench", "scale", "--workers", "40", "--edges", "3", "--sampled", "8", "--out",
                 str(tmp_path / "o"), timeout=60)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "must divide" in run.stderr and not (tmp_path / "o").exists()
