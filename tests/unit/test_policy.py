"""The sync-round policy, sans IO: scripted arrivals, time as plain floats, a seeded generator."""

from __future__ import annotations

import numpy as np
import pytest

from fedctl.broker.policy import SyncConfig, SyncRoundPolicy
from fedctl.errors import ConfigError
from fedctl.wire.constants import ErrorCode

WORKERS = [f"w{i}" for i in range(10)]


def policy(fraction: float = 1.0, min_workers: int = 1, timeout_s: float = 10.0) -> SyncRoundPolicy:
    return SyncRoundPolicy(SyncConfig(fraction, min_workers, timeout_s))


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.parametrize("fraction, k, m", [
    (1.0, 1, 1), (1.0, 10, 10), (0.1, 10, 1), (0.1, 9, 1), (0.1, 100, 10), (0.3, 10, 3), (0.35, 10, 3),
    (0.5, 3, 1), (0.5, 4, 2), (0.01, 5, 1), (0.7, 10, 7), (0.29, 100, 29),
])
def test_sample_size_is_max_floor_c_k_and_one(fraction: float, k: int, m: int) -> None:
    assert policy(fraction).sample_size(k) == m


@pytest.mark.parametrize("fraction, k", [(0.3, 10), (0.5, 4), (0.1, 10), (1.0, 7)])
def test_try_start_samples_that_many_distinct_ready_workers(fraction: float, k: int) -> None:
    p = policy(fraction)
    ready = WORKERS[:k]
    opened = p.try_start(1, ready, k, 100.0, rng())
    assert opened is not None
    assert len(opened.selected) == max(int(fraction * k + 1e-9), 1)
    assert len(set(opened.selected)) == len(opened.selected) and set(opened.selected) <= set(ready)
    assert list(opened.selected) == sorted(opened.selected)
    assert opened.number == 1 and opened.deadline == 110.0


def test_sampling_is_reproducible_from_the_seed() -> None:
    picks = [policy(0.3).try_start(1, WORKERS, 10, 0.0, rng(5)).selected for _ in range(3)]
    assert picks[0] == picks[1] == picks[2]
    others = {policy(0.3).try_start(1, WORKERS, 10, 0.0, rng(s)).selected for s in range(20)}
    assert len(others) > 1


def test_try_start_waits_for_min_workers() -> None:
    p = policy(1.0, min_workers=3)
    assert p.try_start(1, [], 0, 0.0, rng()) is None
    assert p.try_start(1, ["a"], 1, 0.0, rng()) is None
    assert p.try_start(1, ["a", "b"], 3, 0.0, rng()) is None  # 3 connected, only 2 ready
    opened = p.try_start(1, ["a", "b", "c"], 3, 0.0, rng())
    assert opened is not None and opened.selected == ("a", "b", "c")
    assert p.try_start(2, ["d", "e", "f"], 6, 0.0, rng()) is None, "one round at a time"


def test_try_start_takes_only_ready_workers_when_some_are_busy() -> None:
    p = policy(1.0, min_workers=2)
    opened = p.try_start(1, ["a", "c"], 4, 0.0, rng())
    assert opened is not None and opened.selected == ("a", "c")


def test_admit_decisions() -> None:
    p = policy(1.0, min_workers=1)
    refused = p.admit("a", 1)
    assert refused.code == ErrorCode.STALE_UPDATE and "no round is open" in refused.reason
    p.try_start(3, ["a", "b"], 3, 0.0, rng())
    stale = p.admit("a", 2)
    assert stale.code == ErrorCode.STALE_UPDATE and not stale.admitted and "round 3 is" in stale.reason
    future = p.admit("a", 4)
    assert future.code == ErrorCode.STALE_UPDATE
    outsider = p.admit("c", 3)
    assert outsider.code == ErrorCode.NOT_SELECTED and not outsider.admitted
    ok = p.admit("a", 3)
    assert ok.admitted and ok.code is None and not ok.duplicate
    p.record("a")
    dup = p.admit("a", 3)
    assert dup.duplicate and dup.code is None and not dup.admitted


def test_should_close_when_all_answered() -> None:
    p = policy(1.0, min_workers=2, timeout_s=10.0)
    p.try_start(1, ["a", "b", "c"], 3, 0.0, rng())
    assert not p.should_close(1.0)
    p.record("a")
    p.record("b")
    assert not p.should_close(2.0)
    p.record("c")
    assert p.should_close(3.0)
    closed, ok = p.close()
    assert ok and closed.received == ["a", "b", "c"] and p.current is None


def test_should_close_when_a_selected_worker_is_gone() -> None:
    p = policy(1.0, min_workers=2)
    p.try_start(1, ["a", "b", "c"], 3, 0.0, rng())
    p.record("a")
    p.record("b")
    p.worker_gone("z")  # not sampled: changes nothing
    assert not p.should_close(1.0)
    p.worker_gone("c")
    assert p.should_close(1.0)
    closed, ok = p.close()
    assert ok and closed.gone == {"c"}


def test_worker_gone_after_answering_still_counts() -> None:
    p = policy(1.0, min_workers=2)
    p.try_start(1, ["a", "b"], 2, 0.0, rng())
    p.record("a")
    p.worker_gone("a")
    assert not p.should_close(1.0)
    p.record("b")
    closed, ok = p.close()
    assert ok and closed.received == ["a", "b"]


def test_deadline_with_and_without_quorum() -> None:
    p = policy(1.0, min_workers=2, timeout_s=5.0)
    p.try_start(1, ["a", "b", "c"], 3, 100.0, rng())
    assert p.time_left(101.0) == 4.0
    p.record("a")
    p.record("b")
    assert not p.should_close(104.99)
    assert p.should_close(105.0)
    assert p.time_left(106.0) == 0.0
    _, ok = p.close()
    assert ok, "2 of 3 with --min-workers 2 is a quorum"

    p.try_start(2, ["a", "b", "c"], 3, 200.0, rng())
    p.record("a")
    assert p.should_close(205.0)
    closed, ok = p.close()
    assert not ok and closed.number == 2 and closed.received == ["a"]
    assert p.time_left(300.0) is None


def test_quorum_is_min_workers_within_a_larger_sample() -> None:
    p = policy(0.5, min_workers=2, timeout_s=5.0)
    opened = p.try_start(1, WORKERS, 10, 0.0, rng())
    assert opened is not None and len(opened.selected) == 5
    assert p.quorum(opened) == 2
    p.record(opened.selected[0])
    p.record(opened.selected[1])
    assert not p.should_close(1.0) and p.should_close(5.0)
    assert p.close()[1]


def test_all_gone_closes_without_quorum() -> None:
    p = policy(1.0, min_workers=1)
    p.try_start(1, ["a"], 1, 0.0, rng())
    p.worker_gone("a")
    assert p.should_close(0.0)
    assert p.close()[1] is False


def test_close_without_open_round_is_an_error() -> None:
    with pytest.raises(RuntimeError):
        policy().close()
    assert not policy().should_close(1e9)


@pytest.mark.parametrize("fraction, min_workers, timeout_s", [(0.0, 1, 1.0), (1.5, 1, 1.0), (-0.1, 1, 1.0),
                                                             (0.5, 0, 1.0), (0.5, 1, 0.0), (0.5, 1, -1.0)])
def test_sync_config_validates(fraction: float, min_workers: int, timeout_s: float) -> None:
    with pytest.raises(ConfigError):
        SyncConfig(fraction, min_workers, timeout_s)


def test_small_fraction_below_min_workers_still_starts_and_quorum_is_the_sample() -> None:
    # C=0.1 of K=10 samples one worker; --min-workers 5 gates the start, and the quorum is min(5, 1) = 1.
    p = policy(fraction=0.1, min_workers=5, timeout_s=10.0)
    workers = [f"w{i}" for i in range(10)]
    assert p.try_start(1, workers[:4], 10, 0.0, rng()) is None
    opened = p.try_start(1, workers, 10, 0.0, rng())
    assert opened is not None and len(opened.selected) == 1
    assert p.quorum(opened) == 1
    p.record(opened.selected[0])
    assert p.should_close(0.5)
    _, ok = p.close()
    assert ok
