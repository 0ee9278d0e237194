"""``fedctl status``'s table: a narrow terminal keeps the important columns whole instead of eliding them all."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from fedctl.cli.status import render


def _status(workers: int) -> dict[str, Any]:
    return {
        "run_id": "725a7e2f6869fb26", "model": "mlp", "strategy": "fedavg", "policy": "sync", "round": 19,
        "rounds": 300, "version": 19, "finished": False, "workers_connected": workers, "workers_waiting": 0,
        "applied_updates": 38, "refused": {}, "dp_epsilon": None, "workers_total": workers,
        "last_round": {"test_accuracy": 0.956, "test_loss": 0.2344, "duration_s": 0.95, "bytes_in": 880000,
                       "bytes_out": 880000},
        "workers": [{"worker": f"hospital-{i}@ward-7.example.org", "state": "training", "waiting": False,
                     "backend": "torch", "device": "cuda:0", "address": "203.0.113.7:50412", "silent_s": 0.3,
                     "updates": 19, "bytes_in": 8.32e6, "bytes_out": 8.76e6, "staleness": 0, "rtt_s": 0.0162,
                     "link_bps": 5.4e8} for i in range(workers)],
        "events": [],
    }


def _text(width: int) -> str:
    console = Console(width=width, record=True, color_system=None)
    console.print(render(_status(2), "tcp://127.0.0.1:5555", width))
    return console.export_text()


def test_a_narrow_terminal_keeps_whole_names_and_drops_the_least_important_columns() -> None:
    narrow = _text(80)
    assert "hospital-0@ward-7.example.org" in narrow and "hospital-1@ward-7.example.org" in narrow
    assert "training" in narrow and "0.3 s ago" in narrow and "19" in narrow
    assert "workers (2 of 2; 6 more columns in a wider terminal or --json)" in narrow
    assert "203.0.113.7:50412" not in narrow and "Mbit/s" not in narrow   # address and link go first
    assert "…" not in narrow, narrow
    assert all(len(line) <= 80 for line in narrow.splitlines())


def test_a_wide_terminal_shows_every_column() -> None:
    wide = _text(220)
    for cell in ("hospital-0@ward-7.example.org", "training", "torch", "cuda:0", "203.0.113.7:50412", "16.2 ms",
                 "4320.0 Mbit/s", "8.32 MB / 8.76 MB"):
        assert cell in wide, cell
    assert "workers (2 of 2)" in wide and "more columns" not in wide and "…" not in wide
