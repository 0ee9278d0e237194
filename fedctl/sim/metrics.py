"""Experiment metrics: McMahan et al.'s rounds-to-target and the costs (epochs, bytes, time) spent to get there.

Pure functions over plain sequences and the broker's ``metrics.jsonl`` records; numpy only. The accuracy curve
is made monotone (best so far) and the crossing of the target is interpolated linearly between the two
evaluated points around it, as in McMahan et al. 2017 (docs: REFERENCES.md). Rounds that were not evaluated
(accuracy ``None``) are skipped, so runs that evaluate every N rounds are measured the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["best_so_far", "cumulative_at", "percentile", "rounds_to_target", "summarize", "summarize_centralized"]

Record = Mapping[str, Any]


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (a value that occurred): the ⌈q/100 · n⌉-th smallest; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return float(ordered[min(max(math.ceil(q / 100 * len(ordered)), 1), len(ordered)) - 1])


def best_so_far(values: Sequence[float | None]) -> list[float | None]:
    """Running maximum of ``values``; ``None`` entries stay ``None`` and do not reset the maximum.

    Examples
    --------
    >>> best_so_far([0.5, None, 0.4, 0.7])
    [0.5, None, 0.5, 0.7]
    """
    out: list[float | None] = []
    best: float | None = None
    for v in values:
        if v is None:
            out.append(None)
            continue
        best = float(v) if best is None else max(best, float(v))
        out.append(best)
    return out


def _evaluated(rounds: Sequence[float], accuracy: Sequence[float | None]) -> list[tuple[float, float]]:
    """The (round, best-so-far accuracy) pairs of the evaluated rounds, in order."""
    if len(rounds) != len(accuracy):
        raise ValueError(f"{len(rounds)} rounds but {len(accuracy)} accuracies")
    return [(float(r), a) for r, a in zip(rounds, best_so_far(accuracy)) if a is not None]


def _lerp_round(r0: float, a0: float, r1: float, a1: float, target: float) -> float:
    """The round at which the segment (r0, a0)-(r1, a1) reaches ``target`` (a0 < target <= a1)."""
    return r0 + (target - a0) / (a1 - a0) * (r1 - r0)


def rounds_to_target(
    rounds: Sequence[float],
    accuracy: Sequence[float | None],
    target: float,
    start: tuple[float, float | None] = (0, None),
) -> float | None:
    """Rounds (fractional) until the best-so-far accuracy reaches ``target``, or None if it never does.

    Parameters
    ----------
    rounds:
        Round (or epoch) numbers, increasing.
    accuracy:
        Test accuracy per entry of ``rounds``; ``None`` where the round was not evaluated.
    target:
        Accuracy to reach.
    start:
        ``(round, accuracy)`` of the initial model. When its accuracy is given and the first evaluated point
        already reaches the target, the crossing is interpolated from it; otherwise that first round is
        returned. A start accuracy at or above the target gives the start round.

    Returns
    -------
    float or None
        ``r0 + (target - a0) / (a1 - a0) * (r1 - r0)`` for the first evaluated point ``(r1, a1)`` at or above
        the target and the evaluated point ``(r0, a0)`` before it.
    """
    points = _evaluated(rounds, accuracy)
    start_round, start_acc = start
    prev: tuple[float, float] | None = None
    if start_acc is not None:
        if start_acc >= target:
            return float(start_round)
        prev = (float(start_round), float(start_acc))
    for r1, a1 in points:
        if a1 >= target:
            if prev is None:
                return r1
            r0, a0 = prev
            return _lerp_round(r0, a0, r1, a1, target)
        prev = (r1, a1)
    return None


def cumulative_at(rounds: Sequence[float], per_round_values: Sequence[float | None], x: float) -> float:
    """The cumulative sum of ``per_round_values`` at fractional round ``x``, interpolated linearly.

    Entry ``i`` is what round ``rounds[i]`` spent, spread evenly over ``(rounds[i-1], rounds[i]]``; the first
    round starts from zero at ``rounds[0] - 1``. ``None`` values count as zero.

    Raises
    ------
    ValueError
        ``rounds`` is empty or not increasing, the lengths differ, or ``x`` lies outside the run.
    """
    if len(rounds) != len(per_round_values):
        raise ValueError(f"{len(rounds)} rounds but {len(per_round_values)} values")
    if not rounds:
        raise ValueError("no rounds")
    xs = np.concatenate([[float(rounds[0]) - 1.0], np.asarray(rounds, dtype=float)])
    if np.any(np.diff(xs) <= 0):
        raise ValueError("rounds must be strictly increasing")
    if not xs[0] <= x <= xs[-1]:
        raise ValueError(f"round {x} outside the run [{xs[0]:g}, {xs[-1]:g}]")
    values = np.array([0.0 if v is None else float(v) for v in per_round_values])
    ys = np.concatenate([[0.0], np.cumsum(values)])
    return float(np.interp(x, xs, ys))


def _accuracies(records: Sequence[Record]) -> list[float | None]:
    return [r.get("test_accuracy") for r in records]


def _best_final(accuracy: Sequence[float | None]) -> tuple[float | None, float | None]:
    measured = [float(a) for a in accuracy if a is not None]
    return (max(measured), measured[-1]) if measured else (None, None)


def _at(rtt: float | None, rounds: Sequence[float], values: Sequence[float | None]) -> float | None:
    return None if rtt is None else cumulative_at(rounds, values, rtt)


def summarize(
    records: Sequence[Record],
    target: float,
    fraction: float,
    epochs: int,
    start_accuracy: float | None = None,
) -> dict[str, Any]:
    """Summarise one federated run's ``metrics.jsonl`` records against ``target``.

    Parameters
    ----------
    records:
        The broker's per-round records (keys ``round``, ``test_accuracy``, ``bytes_in``, ``bytes_out``,
        ``duration_s``), in round order.
    target:
        Test accuracy to reach.
    fraction:
        C, the fraction of clients selected per round.
    epochs:
        E, local epochs per round (1 for FedSGD).
    start_accuracy:
        Accuracy of the initial model (round 0), if measured; used only to interpolate a first-round crossing.

    Returns
    -------
    dict
        ``rounds_run``, ``best_accuracy``, ``final_accuracy``, ``rounds_to_target``,
        ``epochs_of_computation_to_target`` (rounds × C × E), ``bytes_up_to_target`` (what the broker received),
        ``bytes_down_to_target``, ``wall_s_to_target``, ``total_bytes_up``, ``total_bytes_down``,
        ``total_wall_s``. Entries "to target" are None when the target was not reached.
    """
    rounds = [float(r["round"]) for r in records]
    accuracy = _accuracies(records)
    up = [r.get("bytes_in") for r in records]
    down = [r.get("bytes_out") for r in records]
    wall = [r.get("duration_s") for r in records]
    rtt = rounds_to_target(rounds, accuracy, target, start=(rounds[0] - 1 if rounds else 0, start_accuracy))
    best, final = _best_final(accuracy)
    return {
        "rounds_run": int(rounds[-1]) if rounds else 0,
        "best_accuracy": best,
        "final_accuracy": final,
        "target": target,
        "rounds_to_target": rtt,
        "epochs_of_computation_to_target": None if rtt is None else rtt * fraction * epochs,
        "bytes_up_to_target": _at(rtt, rounds, up),
        "bytes_down_to_target": _at(rtt, rounds, down),
        "wall_s_to_target": _at(rtt, rounds, wall),
        "total_bytes_up": float(sum(v or 0 for v in up)),
        "total_bytes_down": float(sum(v or 0 for v in down)),
        "total_wall_s": float(sum(v or 0 for v in wall)),
    }


def summarize_centralized(records: Sequence[Record], target: float) -> dict[str, Any]:
    """Summarise a centralised baseline run (records with ``epoch``, ``test_accuracy``, cumulative ``wall_s``).

    The record at epoch 0 (the initial model) is the starting point of the interpolation.

    Returns
    -------
    dict
        ``epochs_run``, ``best_accuracy``, ``final_accuracy``, ``target``, ``epochs_to_target``,
        ``epochs_of_computation_to_target`` (the same number, for tables shared with federated runs),
        ``wall_s_to_target`` and ``total_wall_s``.
    """
    epochs = [float(r["epoch"]) for r in records]
    accuracy = _accuracies(records)
    wall = [float(r.get("wall_s") or 0.0) for r in records]
    ett = rounds_to_target(epochs, accuracy, target)
    best, final = _best_final(accuracy)
    return {
        "epochs_run": epochs[-1] if epochs else 0.0,
        "best_accuracy": best,
        "final_accuracy": final,
        "target": target,
        "epochs_to_target": ett,
        "epochs_of_computation_to_target": ett,
        "wall_s_to_target": None if ett is None else float(np.interp(ett, epochs, wall)),
        "total_wall_s": wall[-1] if wall else 0.0,
    }
