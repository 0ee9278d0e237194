"""Federated evaluation in the broker's sans-IO core (docs/protocol.md §7.2), without a socket: who is asked, what
``evaluate`` carries, which ``evaluation`` answers count, their example-weighted mean, and every refusal."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np
import pytest
from coresim import CoreSim, Peer, config

from fedctl.broker.evaluation import Evaluations, OpenEvaluation, empty_summary, sample_size
from fedctl.broker.policy import SyncConfig
from fedctl.errors import ConfigError
from fedctl.wire import constants as C
from fedctl.wire.constants import ErrorCode


def joined(sim: CoreSim, *names: str) -> list[Peer]:
    peers = [Peer(sim, n) for n in names]
    for p in peers:
        assert p.join()[0].type == C.WELCOME
    return peers


def after_round_one(sim: CoreSim, peers: list[Peer]) -> None:
    """Round 1 with every peer, aggregated; then every peer pulls again holding version 0."""
    for p in peers:
        p.pull()
    assert sim.core.try_open_round(1, sim.clock()) is not None
    sim.hand_out(1)
    for p in peers:
        p.push({k: v + np.float32(0.01) for k, v in sim.store.weights.items()}, 1)
    sim.core.policy.close()
    sim.aggregate_round()
    assert all(p.last().type == C.ACK for p in peers)
    for p in peers:
        assert p.pull(version=0) == []


def test_an_evaluation_after_a_round_weighs_the_answers_by_examples() -> None:
    sim = CoreSim()
    peers = a, b, c = joined(sim, "a", "b", "c")
    after_round_one(sim, peers)
    asked = sim.open_evaluation(1)
    assert asked == ["a", "b", "c"]
    for p in peers:
        msg = p.last()
        assert msg.type == C.EVALUATE and msg.re == p.ids and msg["round"] == 1 and msg["version"] == 1
        assert "task" not in msg.fields
    assert sim.core.registry.waiting() == [], "the evaluate answers the pull"
    assert not sim.core.evaluations.complete(sim.clock())
    wakes = sim.wakes
    assert a.evaluation(1, 100, accuracy=0.5, loss=2.0) == [], "an accepted evaluation is not answered"
    assert b.evaluation(1, 300, accuracy=0.9, loss=1.0, f1=0.7) == []
    assert sim.wakes == wakes + 2
    assert not sim.core.evaluations.complete(sim.clock())
    assert c.evaluation(1, 0) == [], "a worker without held-out data answers 0 examples"
    assert sim.core.evaluations.complete(sim.clock())
    closed = sim.core.evaluations.close()
    assert closed is not None
    summary = closed.summary()
    assert summary["fed_eval_accuracy"] == pytest.approx((0.5 * 100 + 0.9 * 300) / 400)
    assert summary["fed_eval_loss"] == pytest.approx((2.0 * 100 + 1.0 * 300) / 400)
    assert summary["fed_eval_f1"] == pytest.approx(0.7), "a metric is averaged over the workers reporting it"
    assert (summary["fed_eval_examples"], summary["fed_eval_workers"], summary["fed_eval_asked"]) == (400, 2, 3)
    assert sim.core.rejected == {}


def test_evaluate_carries_the_model_as_model_would() -> None:
    """A worker holding the previous version gets the same delta (``base``) in ``evaluate`` as in ``model``; one
    holding nothing gets the dense model."""
    sim = CoreSim()
    peers = joined(sim, "a", "b")
    after_round_one(sim, peers)
    peers[1].pull()  # pulls again holding nothing (replaces its pull: a restarted worker)
    sim.open_evaluation(1)
    held, fresh = peers[0].last(), peers[1].last()
    assert fresh.get("base") is None and set(fresh.tensors) == set(sim.core.shapes)
    assert all(np.array_equal(fresh.tensors[k], sim.store.weights[k]) for k in sim.core.shapes)
    assert held.get("base") in (0, None)
    if held.get("base") == 0:
        assert held.tensors, "a delta carries the changed tensors"


def test_a_sample_of_the_waiting_workers_is_asked() -> None:
    sim = CoreSim(config(fed_eval_fraction=0.5))
    peers = joined(sim, "a", "b", "c", "d", "e")
    for p in peers:
        p.pull()
    asked = sim.open_evaluation(2)
    assert len(asked) == sample_size(0.5, 5) == 3
    assert [p.name for p in peers if p.inbox() and p.last().type == C.EVALUATE] == asked
    assert {r.worker for r in sim.core.registry.waiting()} == {p.name for p in peers} - set(asked)
    assert sample_size(0.01, 5) == 1 and sample_size(1.0, 5) == 5 and sample_size(0.2, 5) == 1


def test_fewer_waiting_than_the_sample_asks_those_that_wait() -> None:
    evaluations = Evaluations(1.0, 10.0)
    rng = np.random.default_rng(0)
    assert evaluations.sample(["a", "b"], 4, rng) == ["a", "b"]
    assert evaluations.sample([], 4, rng) == []


def test_refused_evaluations_change_nothing() -> None:
    sim = CoreSim(config(fed_eval_fraction=0.5))
    peers = a, b, c, d = joined(sim, "a", "b", "c", "d")
    for p in peers:
        p.pull()
    [err] = a.evaluation(0, 10, accuracy=0.5)
    assert (err.type, err["code"], err.re) == (C.ERROR, ErrorCode.STALE_UPDATE, a.ids), "no evaluation is open"
    asked = sim.open_evaluation(1)
    outsider = next(p for p in peers if p.name not in asked)
    insider = next(p for p in peers if p.name in asked)
    cases: list[tuple[Peer, dict[str, Any], ErrorCode]] = [
        (insider, {"version": 5}, ErrorCode.STALE_UPDATE),
        (outsider, {}, ErrorCode.NOT_SELECTED),
    ]
    for peer, fields, code in cases:
        [err] = peer.send(C.EVALUATION, **{"version": 0, "num_examples": 10, "metrics": {"accuracy": 0.5},
                                            **fields})
        assert (err.type, err["code"], err.re) == (C.ERROR, code, peer.ids), (fields, code)
    [err] = Peer(sim, "stranger").evaluation(0, 10)
    assert err["code"] == ErrorCode.NOT_JOINED
    nan = msgpack.packb({"v": 1, "type": C.EVALUATION, "id": 77, "version": 0, "num_examples": 3,
                         "metrics": {"accuracy": math.nan}})
    [err] = sim.feed(insider.identity, [nan])
    assert (err["code"], err.re) == (ErrorCode.BAD_FIELD, 77), "metrics must be finite"
    cur = sim.core.evaluations.current
    assert cur is not None and cur.answers == {}
    assert sim.core.rejected == {"STALE_UPDATE": 2, "NOT_SELECTED": 1, "NOT_JOINED": 1, "BAD_FIELD": 1}


def test_a_repeated_evaluation_is_taken_once() -> None:
    sim = CoreSim()
    [a] = joined(sim, "a")
    a.pull()
    sim.open_evaluation(1)
    assert a.evaluation(0, 10, accuracy=0.5) == []
    assert a.evaluation(0, 99, accuracy=0.1) == [], "a repeat (delivery is at least once) is not an error"
    cur = sim.core.evaluations.current
    assert cur is not None and cur.answers == {"a": (10, {"accuracy": 0.5})}
    assert sim.core.rejected == {}


def test_workers_that_will_not_answer_are_not_waited_for() -> None:
    sim = CoreSim()
    a, b, c = joined(sim, "a", "b", "c")
    for p in (a, b, c):
        p.pull()
    sim.open_evaluation(1)
    b.send(C.LEAVE, reason="bye")
    c.pull()  # c restarted: it pulls again without answering, and may no longer answer
    assert not sim.core.evaluations.complete(sim.clock())
    assert a.evaluation(0, 10, accuracy=1.0) == []
    assert sim.core.evaluations.complete(sim.clock())
    [err] = c.evaluation(0, 10, accuracy=0.0)
    assert err["code"] == ErrorCode.NOT_SELECTED
    closed = sim.core.evaluations.close()
    assert closed is not None and closed.summary()["fed_eval_accuracy"] == 1.0
    assert [r.worker for r in sim.core.registry.waiting()] == ["c"]


def test_the_deadline_ends_an_evaluation_and_a_late_answer_is_stale() -> None:
    sim = CoreSim(config(sync=SyncConfig(1.0, 1, 5.0)))
    a, b = joined(sim, "a", "b")
    a.pull(), b.pull()
    sim.open_evaluation(1)
    assert a.evaluation(0, 10, accuracy=0.25) == []
    assert sim.core.evaluations.time_left(sim.clock()) == 5.0
    sim.clock.advance(5.0)
    assert sim.core.evaluations.complete(sim.clock())
    closed = sim.core.evaluations.close()
    assert closed is not None and closed.outstanding() == {"b"}
    assert closed.summary()["fed_eval_accuracy"] == 0.25
    [err] = b.evaluation(0, 10, accuracy=0.75)
    assert err["code"] == ErrorCode.STALE_UPDATE
    assert sim.core.evaluations.complete(sim.clock()), "nothing open: nothing to wait for"


def test_a_large_model_is_evaluated_from_chunks() -> None:
    sim = CoreSim(config(chunk_above=4096, chunk_bytes=16384))
    [a] = joined(sim, "a")
    a.pull()
    sim.open_evaluation(1)
    msg = a.last()
    assert msg.type == C.EVALUATE and msg["chunks"] == sim.core.chunked_model() > 1 and not msg.tensors
    [transfer] = sim.transfers
    assert transfer.xfer == msg.id and (a.identity, msg.id) in sim.core.outbound


def test_a_summary_without_examples_has_no_means() -> None:
    opened = OpenEvaluation(3, 3, ("a", "b"), 10.0, answers={"a": (0, {"accuracy": 0.9})})
    summary = opened.summary()
    assert summary == {**empty_summary(), "fed_eval_examples": 0, "fed_eval_workers": 0, "fed_eval_asked": 2}
    assert summary["fed_eval_accuracy"] is None
    counted = OpenEvaluation(3, 3, ("a",), 10.0, answers={"a": (5, {"examples": 1e9, "accuracy": 1.0})})
    assert counted.summary()["fed_eval_examples"] == 5, "a worker's metric cannot replace the counts"


@pytest.mark.parametrize("overrides, message", [
    ({"fed_eval_every": -1}, "--fed-eval-every"),
    ({"fed_eval_fraction": 0.0}, "--fed-eval-fraction"),
    ({"fed_eval_fraction": 1.5}, "--fed-eval-fraction"),
])
def test_config_refuses_bad_settings(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(**overrides)


def test_the_evaluation_types_travel_one_way_each() -> None:
    assert C.EVALUATE in C.BROKER_TO_WORKER and C.EVALUATE not in C.WORKER_TO_BROKER
    assert C.EVALUATION in C.WORKER_TO_BROKER and C.EVALUATION not in C.BROKER_TO_WORKER
