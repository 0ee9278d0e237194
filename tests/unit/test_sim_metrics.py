"""Rounds to target (McMahan et al.'s interpolated metric), cumulative costs and run summaries, on literal curves."""

from __future__ import annotations

from typing import Any

import pytest

from fedctl.sim.metrics import best_so_far, cumulative_at, rounds_to_target, summarize, summarize_centralized


def test_best_so_far_skips_none() -> None:
    assert best_so_far([None, 0.5, None, 0.4, 0.7, 0.6]) == [None, 0.5, None, 0.5, 0.7, 0.7]
    assert best_so_far([]) == []


def test_crossing_between_rounds_interpolates_exactly() -> None:
    # 0.90 at round 2, 0.98 at round 3: 0.97 is 7/8 of the way.
    assert rounds_to_target([1, 2, 3], [0.8, 0.9, 0.98], 0.97) == pytest.approx(2.875)


def test_crossing_exactly_on_a_point_gives_that_round() -> None:
    assert rounds_to_target([1, 2, 3], [0.8, 0.9, 0.97], 0.97) == pytest.approx(3.0)


def test_unevaluated_rounds_are_skipped() -> None:
    # Evaluated every 5 rounds: interpolate between rounds 5 and 10, not between 9 and 10.
    rounds = list(range(1, 11))
    acc: list[float | None] = [None] * 10
    acc[4], acc[9] = 0.90, 0.98
    assert rounds_to_target(rounds, acc, 0.97) == pytest.approx(5 + 5 * 7 / 8)


def test_never_reached_is_none() -> None:
    assert rounds_to_target([1, 2, 3], [0.5, 0.6, 0.96], 0.97) is None
    assert rounds_to_target([1, 2], [None, None], 0.97) is None
    assert rounds_to_target([], [], 0.97) is None


def test_first_point_crossing_without_start_returns_that_round() -> None:
    assert rounds_to_target([4, 5], [0.99, 0.995], 0.97) == 4.0


def test_first_point_crossing_with_start_interpolates_from_it() -> None:
    # From (0, 0.1) to (2, 0.99): 0.97 is reached at 2 * 0.87 / 0.89.
    got = rounds_to_target([2, 3], [0.99, 0.995], 0.97, start=(0, 0.1))
    assert got == pytest.approx(2 * 0.87 / 0.89)


def test_start_already_at_target_gives_start_round() -> None:
    assert rounds_to_target([1, 2], [0.5, 0.6], 0.5, start=(0, 0.5)) == 0.0


def test_dip_after_a_peak_is_irrelevant() -> None:
    # The raw curve dips to 0.80 at round 3; best so far stays 0.96, so interpolation is from (3, 0.96).
    assert rounds_to_target([1, 2, 3, 4], [0.5, 0.96, 0.80, 0.98], 0.97) == pytest.approx(3.5)


def test_cumulative_at_interpolates_within_a_round() -> None:
    rounds, sent = [1, 2, 3], [100, 200, 400]
    assert cumulative_at(rounds, sent, 0) == 0
    assert cumulative_at(rounds, sent, 0.5) == pytest.approx(50)
    assert cumulative_at(rounds, sent, 2) == pytest.approx(300)
    assert cumulative_at(rounds, sent, 2.25) == pytest.approx(400)
    assert cumulative_at(rounds, sent, 3) == pytest.approx(700)


def test_cumulative_at_rejects_points_outside_the_run() -> None:
    with pytest.raises(ValueError):
        cumulative_at([1, 2], [1, 1], 2.5)
    with pytest.raises(ValueError):
        cumulative_at([], [], 0)
    with pytest.raises(ValueError):
        cumulative_at([1, 1], [1, 1], 1)


def _records() -> list[dict[str, Any]]:
    accuracy = [0.80, None, 0.90, None, 0.98, 0.97]
    return [{"round": i + 1, "version": i + 1, "test_accuracy": a, "test_loss": None, "train_loss": 0.1,
             "participants": 10, "selected": 10, "connected": 100, "bytes_in": 1000 * (i + 1), "bytes_out": 500,
             "duration_s": 2.0, "rejected_total": 0} for i, a in enumerate(accuracy)]


def test_summarize_synthetic_run() -> None:
    s = summarize(_records(), target=0.97, fraction=0.1, epochs=5)
    rtt = 3 + 2 * 7 / 8  # between (3, 0.90) and (5, 0.98)
    assert s["rounds_run"] == 6
    assert s["best_accuracy"] == 0.98 and s["final_accuracy"] == 0.97
    assert s["rounds_to_target"] == pytest.approx(rtt)
    assert s["epochs_of_computation_to_target"] == pytest.approx(rtt * 0.1 * 5)
    # Up: 1000 + 2000 + 3000 + 4000 by round 4, then 0.75 of round 5's 5000.
    assert s["bytes_up_to_target"] == pytest.approx(10_000 + 0.75 * 5000)
    assert s["bytes_down_to_target"] == pytest.approx(500 * rtt)
    assert s["wall_s_to_target"] == pytest.approx(2.0 * rtt)
    assert s["total_bytes_up"] == 21_000 and s["total_bytes_down"] == 3000 and s["total_wall_s"] == 12.0


def test_summarize_target_not_reached() -> None:
    s = summarize(_records(), target=0.99, fraction=0.1, epochs=1)
    for key in ("rounds_to_target", "epochs_of_computation_to_target", "bytes_up_to_target",
                "bytes_down_to_target", "wall_s_to_target"):
        assert s[key] is None
    assert s["best_accuracy"] == 0.98


def test_summarize_start_accuracy_used_for_a_first_round_crossing() -> None:
    recs = _records()[:1]
    recs[0]["test_accuracy"] = 0.99
    assert summarize(recs, 0.97, 0.1, 1)["rounds_to_target"] == 1.0
    s = summarize(recs, 0.97, 0.1, 1, start_accuracy=0.10)
    assert s["rounds_to_target"] == pytest.approx(0.87 / 0.89)


def test_summarize_centralized() -> None:
    records = [{"epoch": 0.0, "test_accuracy": 0.10, "wall_s": 0.0},
               {"epoch": 0.5, "test_accuracy": 0.95, "wall_s": 4.0},
               {"epoch": 1.0, "test_accuracy": 0.99, "wall_s": 8.0},
               {"epoch": 1.5, "test_accuracy": 0.985, "wall_s": 12.0}]
    s = summarize_centralized(records, 0.97)
    assert s["epochs_to_target"] == pytest.approx(0.75)
    assert s["epochs_of_computation_to_target"] == pytest.approx(0.75)
    assert s["wall_s_to_target"] == pytest.approx(6.0)
    assert s["best_accuracy"] == 0.99 and s["final_accuracy"] == 0.985
    assert s["epochs_run"] == 1.5 and s["total_wall_s"] == 12.0
    assert summarize_centralized(records, 0.995)["epochs_to_target"] is None
