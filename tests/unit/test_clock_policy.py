"""SSP and async clocks, sans-IO: scripted arrivals, no sockets, no clock of their own."""

from __future__ import annotations

import math

import pytest

from fedctl.broker.policy import ClockConfig, ClockPolicy, parse_policy
from fedctl.errors import ConfigError
from fedctl.wire.constants import ErrorCode


def policy(bound: float, **kw: object) -> ClockPolicy:
    p = ClockPolicy(ClockConfig(bound=bound, **kw))  # type: ignore[arg-type]
    for w in ("a", "b", "c"):
        p.join(w)
    return p


def step(p: ClockPolicy, worker: str, version: int) -> None:
    """Worker pulls, computes on ``version`` and pushes immediately (admitted and recorded)."""
    tick = p.assign(worker, version)
    admission = p.admit(worker, tick, version, version)
    assert admission.admitted, admission.reason
    p.record(worker)


def test_parse_policy() -> None:
    assert parse_policy("sync") is None
    assert parse_policy("ssp:0") == 0 and parse_policy("ssp:4") == 4
    assert math.isinf(parse_policy("async") or 0)
    for bad in ("ssp", "ssp:-1", "ssp:x", "bsp", "ssp:1.5"):
        with pytest.raises(ConfigError, match="consistency policy"):
            parse_policy(bad)


def test_ssp_bound_holds_the_fast_worker_until_the_slowest_catches_up() -> None:
    p = policy(1)
    step(p, "a", 0)
    assert p.may_start("a")  # a at 1, min 0: 1 − 0 ≤ 1
    step(p, "a", 1)
    assert not p.may_start("a")  # a at 2, min 0
    assert p.may_start("b") and p.may_start("c")
    step(p, "b", 2)
    assert not p.may_start("a")  # c still at 0
    step(p, "c", 3)
    assert p.may_start("a")  # min is 1 now
    assert (p.min_clock(), p.max_clock()) == (1, 2)


def test_ssp_zero_is_lock_step_like_sync_rounds() -> None:
    p = policy(0)
    version = 0
    for _ in range(3):  # three "rounds": each worker exactly once, nobody twice before the others
        order = ["c", "a", "b"]
        for w in order:
            assert p.may_start(w)
            step(p, w, version)
            version += 1
            others_done = order[: order.index(w) + 1]
            assert not p.may_start(w) or others_done == order
        assert len({p.clocks[w] for w in "abc"}) == 1
    assert p.clocks == {"a": 3, "b": 3, "c": 3}


def test_async_never_holds_but_refuses_updates_older_than_the_hard_limit() -> None:
    p = policy(math.inf, max_staleness=3)
    tick = p.assign("a", 10)
    for _ in range(20):
        step(p, "b", 0)
    assert p.may_start("b")  # no bound
    ok = p.admit("a", tick, 10, 13)
    assert ok.admitted and ok.staleness == 3
    late = p.admit("a", tick, 10, 14)
    assert late.code == ErrorCode.STALE_UPDATE and late.staleness == 4 and "--max-staleness" in late.reason
    # The refused work is forgotten: the same tick cannot be pushed again, a new pull gets a new assignment.
    assert p.admit("a", tick, 10, 14).code == ErrorCode.NOT_SELECTED
    assert p.assign("a", 14) == tick


def test_duplicates_unassigned_and_wrong_base_pushes() -> None:
    p = policy(2)
    step(p, "a", 0)
    assert p.admit("a", 1, 0, 5).duplicate  # tick 1 of "a" was already counted
    assert p.admit("b", 1, 0, 5).code == ErrorCode.NOT_SELECTED  # nothing was handed to "b"
    tick = p.assign("b", 4)
    assert p.admit("b", tick, 3, 5).code == ErrorCode.STALE_UPDATE  # claims another base version


def test_a_dead_worker_stops_holding_the_others_and_keeps_its_clock_for_a_rejoin() -> None:
    p = policy(1)
    step(p, "a", 0)
    step(p, "a", 1)
    step(p, "b", 2)
    step(p, "b", 3)
    assert not p.may_start("a") and not p.may_start("b")  # c (clock 0) holds both
    p.worker_gone("c")
    assert p.may_start("a") and p.may_start("b")
    p.join("c")  # reconnects: its clock is still 0, it holds the others again
    assert p.clocks["c"] == 0 and not p.may_start("a")


def test_a_new_worker_starts_at_the_slowest_clock_and_pulling_again_drops_its_work() -> None:
    p = policy(1)
    for v in range(2):
        for w in "abc":
            step(p, w, v)
    p.join("d")
    assert p.clocks["d"] == 2 and p.may_start("a")
    tick = p.assign("d", 7)
    assert p.busy() == 1
    p.pulled("d")  # it restarted and asks again: the old work will not come
    assert p.busy() == 0 and p.admit("d", tick, 7, 7).code == ErrorCode.NOT_SELECTED


def test_staleness_weight() -> None:
    p = policy(math.inf, staleness_exponent=1.0)
    assert [p.weight(t) for t in (0, 1, 3)] == [1.0, 0.5, 0.25]
    assert policy(math.inf, staleness_exponent=0.0).weight(9) == 1.0
    with pytest.raises(ConfigError):
        ClockConfig(buffer=0)
