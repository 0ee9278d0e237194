"""The broker's sans-IO core without a socket: whole rounds, SSP clocks, chunked pushes, every refusal and a
crash-restore, each in milliseconds (tests/unit/coresim.py carries out the effects in memory)."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np
import pytest
from coresim import CoreSim, Peer, config

from fedctl.broker.effects import CloseTransfer, OpenTransfer, WriteChunk
from fedctl.broker.params import ParameterStore
from fedctl.broker.policy import ClockConfig, SyncConfig
from fedctl.wire import chunks, encode, make
from fedctl.wire import constants as C
from fedctl.wire.constants import ErrorCode
from fedctl.wire.messages import Message

RESERVED = {ErrorCode.ALREADY_JOINED, ErrorCode.DUPLICATE, ErrorCode.SHUTTING_DOWN, ErrorCode.INTERNAL}
"""Codes docs/protocol.md §6 reserves: no broker sends them."""


def shifted(weights: dict[str, np.ndarray], by: float) -> dict[str, np.ndarray]:
    return {k: (v + np.float32(by)).astype(np.float32) for k, v in weights.items()}


def joined(sim: CoreSim, *names: str, examples: tuple[int, ...] = ()) -> list[Peer]:
    peers = [Peer(sim, n, examples[i] if examples else 100) for i, n in enumerate(names)]
    for p in peers:
        [welcome] = p.join()
        assert welcome.type == C.WELCOME and welcome["worker"] == p.name
        assert welcome["run"]["model"]["name"] == "mlp"
    return peers


def test_a_whole_sync_round_then_a_delta_downlink() -> None:
    sim = CoreSim()
    a, b, c = joined(sim, "a", "b", "c", examples=(100, 200, 700))
    start = dict(sim.store.weights)
    for p in (a, b, c):
        assert p.pull() == [], "a pull waits for the round"
    opened = sim.core.try_open_round(1, sim.clock())
    assert opened is not None and opened.selected == ("a", "b", "c")
    sim.hand_out(1)
    for i, p in enumerate((a, b, c)):
        model = p.last()
        assert model.type == C.MODEL and model.re == 2 and model["round"] == 1 and model.get("base") is None
        assert all(np.array_equal(model.tensors[k], start[k]) for k in start)
        assert p.push(shifted(start, i + 1), 1) == [], "the ack waits for the round's checkpoint"
    assert sim.disk.persisted == [], "sync rounds write no update: the checkpoint holds them"
    assert sim.core.policy.should_close(sim.clock())
    sim.core.policy.close()
    sim.aggregate_round()
    for p in (a, b, c):
        ack = p.last()
        assert (ack.type, ack["status"], ack.re) == (C.ACK, "accepted", p.ids)
    expected = (1 * 100 + 2 * 200 + 3 * 700) / 1000
    assert sim.store.version == 1
    for k in start:
        np.testing.assert_allclose(sim.store.weights[k], start[k] + expected, rtol=0, atol=1e-5)
    # Round 2: a worker holding version 0 gets only what changed — here everything, so the dense model.
    # One holding version 1 (nothing changed since) gets an empty delta.
    a.pull(version=1)
    assert sim.core.try_open_round(2, sim.clock()) is not None
    sim.hand_out(2)
    delta = a.last()
    assert delta.type == C.MODEL and delta["base"] == 1 and delta.tensors == {}


def test_gather_holds_the_first_round_until_every_expected_worker_is_connected() -> None:
    """``fedctl simulate`` knows its workers: its first round samples all of them, never the first to connect."""
    sim = CoreSim(config(gather=3))
    a, b = joined(sim, "a", "b")
    a.pull(), b.pull()
    assert sim.core.try_open_round(1, sim.clock()) is None, "two of the three expected workers"
    [c] = joined(sim, "c")
    assert sim.core.try_open_round(1, sim.clock()) is None, "c is connected but its pull has not arrived"
    c.pull()
    opened = sim.core.try_open_round(1, sim.clock())
    assert opened is not None and opened.selected == ("a", "b", "c")


def test_the_model_goes_through_zlib_only_to_a_worker_whose_link_is_slow() -> None:
    """Each worker's pull says its measured link (``link_bps``); the broker deflates the model for the slow one and
    sends the same round plain to the fast one and to the one that has not measured yet (docs/protocol.md §4.4)."""
    sim = CoreSim()
    slow, fast, unknown = joined(sim, "slow", "fast", "unknown")
    slow.pull(link_bps=125_000)  # 1 Mbit/s
    fast.pull(link_bps=3_000_000_000)  # loopback
    unknown.pull()
    assert sim.core.try_open_round(1, sim.clock()) is not None
    sim.hand_out(1)
    sent = {p.name: sim.sent_bytes[p.identity][-1] for p in (slow, fast, unknown)}
    assert sent["fast"] == sent["unknown"] > 109_386 * 4
    assert sent["slow"] < 0.95 * sent["fast"], sent
    weights = [{k: v.copy() for k, v in p.last().tensors.items()} for p in (slow, fast)]
    assert all(np.array_equal(weights[0][k], weights[1][k]) for k in weights[0]), "the same model either way"


def test_a_refused_update_changes_nothing_and_a_resent_one_is_a_duplicate() -> None:
    sim = CoreSim()
    a, b = joined(sim, "a", "b")
    a.pull(), b.pull()
    sim.core.try_open_round(1, sim.clock())
    sim.hand_out(1)
    assert a.push(sim.store.weights, 1) == []
    # a resend (the worker reconnected) replaces the held ack: the answer goes to the push still waiting
    assert a.push(sim.store.weights, 1) == []
    assert [u.worker for u in sim.core.updates] == ["a"]
    [err] = b.push({"nope": np.zeros(3, np.float32)}, 1)
    assert err.type == C.ERROR and err["code"] == ErrorCode.MODEL_MISMATCH and err.re == b.ids
    assert sim.core.policy.current is not None and sim.core.policy.current.received == ["a"]
    sim.core.policy.close()
    sim.aggregate_round()
    [ack] = [m for m in a.inbox() if m.type == C.ACK]
    assert (ack["status"], ack.re) == ("duplicate", a.ids), "one answer, to the push still waiting"
    # its ack lost again, the worker resends once more after the round was committed: a duplicate, acked at once
    [late] = a.push(sim.store.weights, 1)
    assert (late.type, late["status"]) == (C.ACK, "duplicate")
    [stale] = b.push(sim.store.weights, 1)
    assert stale["code"] == ErrorCode.STALE_UPDATE, "b took no part in round 1"


def test_a_failed_round_refuses_the_pushes_whose_acks_it_held() -> None:
    sim = CoreSim(config(sync=SyncConfig(1.0, 2, 20.0)))  # quorum 2
    a, b = joined(sim, "a", "b")
    a.pull(), b.pull()
    sim.core.try_open_round(1, sim.clock())
    sim.hand_out(1)
    assert a.push(sim.store.weights, 1) == []
    sim.clock.advance(30)
    closed, ok = sim.core.policy.close()
    assert not ok
    sim.run(sim.core.refuse_held(1, "round 1 failed"))
    err = a.last()
    assert (err.type, err["code"], err.re) == (C.ERROR, ErrorCode.STALE_UPDATE, a.ids)
    assert sim.core.held == {} and sim.core.policy.committed == (0, frozenset()) and sim.core.rejected == {}
    [again] = a.push(sim.store.weights, 1)
    assert again["code"] == ErrorCode.STALE_UPDATE, "a failed round's update is not a duplicate"


def test_not_durable_acknowledges_at_once() -> None:
    sim = CoreSim(durable=False)
    [a] = joined(sim, "a")
    a.pull()
    sim.core.try_open_round(1, sim.clock())
    sim.hand_out(1)
    [ack] = a.push(sim.store.weights, 1)
    assert ack["status"] == "accepted" and sim.disk.persisted == []


def test_ssp_clocks_hold_a_fast_worker_and_admission_counts_the_version_being_made() -> None:
    sim = CoreSim(config(policy="ssp:1", clock=ClockConfig(max_staleness=1)))
    fast, slow = joined(sim, "fast", "slow")
    policy: Any = sim.core.policy

    def grant() -> list[str]:
        jobs = [r.worker for r in sim.core.registry.waiting() if policy.may_start(r.worker)]
        for w in jobs:
            record = sim.core.registry.get(w)
            assert record is not None
            sim.run(sim.core.hand_out([(record, policy.assign(w, sim.store.version))],
                                      _downlinks(sim, record.holds_version), sim.clock()))
        return jobs

    fast.pull(), slow.pull()
    assert grant() == ["fast", "slow"]
    for tick in (1, 2):
        model = fast.last()
        assert model["round"] == tick
        [ack] = fast.push(sim.store.weights, tick, base=model["version"])
        assert ack["status"] == "accepted"
        updates = sim.core.start_apply()
        sim.core.finish_apply(shifted(sim.store.weights, 0.5), len(updates))
        fast.pull(version=sim.store.version)
        granted = grant()
        assert granted == (["fast"] if tick == 1 else []), "clock 2 is 2 ahead of the slowest (0): held"
    assert policy.clocks == {"fast": 2, "slow": 0}
    # slow's update was computed on version 0; the model is at 2 (max_staleness 1): refused as stale.
    [err] = slow.push(sim.store.weights, 1, base=0)
    assert err["code"] == ErrorCode.STALE_UPDATE and "--max-staleness" in err["reason"]
    # While an application is under way, a push is judged against the version being made.
    sim2 = CoreSim(config(policy="async", clock=ClockConfig(max_staleness=0)))
    [w] = joined(sim2, "w")
    w.pull()
    record = sim2.core.registry.get("w")
    assert record is not None
    sim2.run(sim2.core.hand_out([(record, sim2.core.policy.assign("w", 0))],  # type: ignore[union-attr]
                                _downlinks(sim2, None), sim2.clock()))
    sim2.core.start_apply()
    [late] = w.push(sim2.store.weights, 1, base=0)
    assert late["code"] == ErrorCode.STALE_UPDATE, "0 versions old now, 1 once the application ends"
    sim2.core.finish_apply(None, 0)


def _downlinks(sim: CoreSim, held: int | None) -> Any:
    from fedctl.broker import downlink
    from fedctl.broker.registry import WorkerRecord

    return downlink.build(sim.core, [WorkerRecord("w", b"w", "noop", 1, holds_version=held)])


def chunked_sim(durable: bool = True) -> tuple[CoreSim, Peer]:
    sim = CoreSim(config(chunk_above=8192, chunk_bytes=16384), durable=durable)
    [a] = joined(sim, "a")
    a.pull()
    sim.core.try_open_round(1, sim.clock())
    sim.hand_out(1)
    return sim, a


@pytest.mark.parametrize("durable", [True, False])
def test_a_chunked_push_is_spooled_and_acknowledged_after_its_last_chunk(durable: bool) -> None:
    sim, a = chunked_sim(durable)
    assert sim.core.chunked_model() == 27 and sim.transfers and sim.transfers[0].worker == "a"
    update = shifted(sim.store.weights, 0.25)
    pieces = list(chunks.split(update, sim.core.shapes, 16384))
    [credit] = a.push({}, 1, chunks=len(pieces))
    header_id = a.ids
    assert credit.type == C.CREDIT and (credit["xfer"], credit["received"]) == (header_id, 0)
    for index, piece in enumerate(pieces):
        replies = a.send(C.CHUNK, slices=piece, xfer=header_id, index=index)
        assert replies[0].type == C.CREDIT and replies[0]["received"] == index + 1
    [got] = sim.core.updates
    assert all(np.array_equal(got.tensors[k], update[k]) for k in update)
    assert sim.core.inbound == {} and sim.disk.persisted == []
    if durable:
        assert a.last().type == C.CREDIT, "the ack waits for the round's checkpoint"
        sim.core.policy.close()
        sim.aggregate_round()
    ack = a.last()
    assert ack.type == C.ACK and ack.re == header_id and ack["status"] == "accepted"


def test_a_bad_chunk_answers_the_push_and_drops_its_spool() -> None:
    sim, a = chunked_sim()
    pieces = list(chunks.split(sim.store.weights, sim.core.shapes, 16384))
    a.push({}, 1, chunks=len(pieces))
    header_id = a.ids
    a.send(C.CHUNK, slices=pieces[0], xfer=header_id, index=0)
    [err] = a.send(C.CHUNK, slices=pieces[0], xfer=header_id, index=5)
    assert err.type == C.ERROR and err["code"] == ErrorCode.BAD_FIELD and err.re == header_id
    assert sim.core.inbound == {} and sim.disk.spools == {} and sim.core.rejected == {"BAD_FIELD": 1}


def test_a_chunk_that_fails_validation_answers_the_push_and_closes_it() -> None:
    sim, a = chunked_sim()
    pieces = list(chunks.split(sim.store.weights, sim.core.shapes, 16384))
    a.push({}, 1, chunks=len(pieces))
    header_id = a.ids
    a.send(C.CHUNK, slices=pieces[0], xfer=header_id, index=0)
    frames = encode(make(C.CHUNK, 70, slices=pieces[1], xfer=header_id, index=1))
    frames[1] = frames[1][:-4]  # a slice frame whose data is short: the decoder refuses it (BAD_TENSOR)
    [err] = sim.feed(a.identity, frames)
    assert err.type == C.ERROR and err["code"] == ErrorCode.BAD_TENSOR and err.re == header_id
    assert sim.core.inbound == {} and sim.disk.spools == {}
    [unknown] = a.send(C.CHUNK, slices=pieces[2], xfer=header_id, index=2)
    assert unknown["code"] == ErrorCode.UNKNOWN_TRANSFER and unknown.re == a.ids


def test_a_push_whose_last_chunk_comes_after_its_round_closed_is_refused_and_counted() -> None:
    sim, a = chunked_sim()
    pieces = list(chunks.split(sim.store.weights, sim.core.shapes, 16384))
    a.push({}, 1, chunks=len(pieces))
    header_id = a.ids
    for index, piece in enumerate(pieces[:-1]):
        a.send(C.CHUNK, slices=piece, xfer=header_id, index=index)
    sim.clock.advance(30)  # past the round's deadline
    assert sim.core.policy.should_close(sim.clock())
    sim.core.policy.close()
    replies = a.send(C.CHUNK, slices=pieces[-1], xfer=header_id, index=len(pieces) - 1)
    err = replies[-1]
    assert err.type == C.ERROR and err["code"] == ErrorCode.STALE_UPDATE and err.re == header_id
    assert sim.core.rejected == {"STALE_UPDATE": 1} and sim.disk.spools == {}


def test_a_stalled_chunked_push_expires_and_a_silent_worker_is_dropped() -> None:
    sim, a = chunked_sim()
    a.push({}, 1, chunks=27)
    assert len(sim.disk.spools) == 1
    sim.tick(sim.cfg.liveness_s + 1)
    assert sim.core.inbound == {} and sim.disk.spools == {}
    assert "a" not in sim.core.registry and sim.core.outbound == {}
    assert sim.core.policy.current is not None and sim.core.policy.current.gone == {"a"}


def test_credits_move_the_model_transfer_and_unknown_ones_are_refused() -> None:
    sim, a = chunked_sim()
    xfer = sim.transfers[0].xfer
    assert a.send(C.CREDIT, xfer=xfer, received=3) == []
    assert sim.core.outbound[(a.identity, xfer)].received == 3 and len(sim.credited) == 1
    [err] = a.send(C.CREDIT, xfer=xfer + 1000, received=1)
    assert err["code"] == ErrorCode.UNKNOWN_TRANSFER


def _raw(header: dict[str, Any], *tensor_frames: bytes) -> list[bytes]:
    return [msgpack.packb(header, use_bin_type=True), *tensor_frames]


def refusal_cases() -> list[tuple[str, ErrorCode]]:
    return [(name, code) for name, code, _ in CASES]


def _good_push(sim: CoreSim, peer: Peer, **overrides: Any) -> list[bytes]:
    fields: dict[str, Any] = {"round": 1, "base_version": 0, "seq": 1, "kind": C.KIND_WEIGHTS,
                              "num_examples": 100}
    tensors = overrides.pop("tensors", sim.store.weights)
    fields.update(overrides)
    return encode(make(C.PUSH, 99, tensors=tensors, **fields))


def _nan(sim: CoreSim) -> dict[str, np.ndarray]:
    bad = dict(sim.store.weights)
    first = next(iter(bad))
    bad[first] = bad[first].copy()
    bad[first].reshape(-1)[0] = np.nan
    return bad


def _bad_tensor(sim: CoreSim, peer: Peer) -> list[bytes]:
    frames = _good_push(sim, peer)
    frames[1] = frames[1][:-8]  # declared size no longer matches the data
    return frames


CASES: list[tuple[str, ErrorCode, Any]] = [
    ("not msgpack", ErrorCode.MALFORMED, lambda sim, p: [b"\xc1"]),
    ("version 2", ErrorCode.UNSUPPORTED_VERSION, lambda sim, p: _raw({"v": 2, "type": "pull", "id": 5})),
    ("a broker-only type", ErrorCode.UNKNOWN_TYPE, lambda sim, p: _raw({"v": 1, "type": "welcome", "id": 5})),
    ("join without a worker id", ErrorCode.MISSING_FIELD,
     lambda sim, p: _raw({"v": 1, "type": "join", "id": 5, "backend": "x", "num_examples": 1})),
    ("an unknown field", ErrorCode.BAD_FIELD, lambda sim, p: _raw({"v": 1, "type": "pull", "id": 5, "x": 1})),
    ("a 70 KB header", ErrorCode.TOO_LARGE,
     lambda sim, p: _raw({"v": 1, "type": "leave", "id": 5, "reason": "x" * 70_000})),
    ("a truncated tensor frame", ErrorCode.BAD_TENSOR, _bad_tensor),
    ("a NaN", ErrorCode.NON_FINITE, lambda sim, p: _good_push(sim, p, tensors=_nan(sim))),
    ("a tensor the model lacks", ErrorCode.MODEL_MISMATCH,
     lambda sim, p: _good_push(sim, p, tensors={"x": np.zeros(2, np.float32)})),
    ("a pull from a stranger", ErrorCode.NOT_JOINED, "stranger"),
    ("a push for round 5", ErrorCode.STALE_UPDATE, lambda sim, p: _good_push(sim, p, round=5)),
    ("a push from a worker not sampled", ErrorCode.NOT_SELECTED, "late"),
    ("a gradient in a FedAvg run", ErrorCode.WRONG_KIND,
     lambda sim, p: _good_push(sim, p, kind=C.KIND_GRADIENT)),
    ("a chunk of no transfer", ErrorCode.UNKNOWN_TRANSFER,
     lambda sim, p: encode(make(C.CHUNK, 5, slices=next(chunks.split(sim.store.weights, sim.core.shapes, 4096)),
                                xfer=77, index=0))),
    ("a push after the run finished", ErrorCode.RUN_FINISHED, "finished"),
]


SECURE = {ErrorCode.SECAGG_REFUSED, ErrorCode.SECAGG_ABORTED}
"""Sent only in a run with secure aggregation: tests/unit/test_core_secure.py refuses and abandons there."""


def test_the_cases_cover_every_code_a_broker_sends() -> None:
    assert {code for _, code, _ in CASES} == set(ErrorCode) - RESERVED - SECURE


@pytest.mark.parametrize("name, code", refusal_cases())
def test_every_error_code_is_refused_through_the_one_path(name: str, code: ErrorCode) -> None:
    sim = CoreSim()
    a, b = joined(sim, "a", "b")
    a.pull(), b.pull()
    sim.core.try_open_round(1, sim.clock())
    sim.hand_out(1)
    make_frames = dict((n, f) for n, _, f in CASES)[name]
    peer = a
    if make_frames == "stranger":
        peer, frames = Peer(sim, "stranger"), encode(make(C.PULL, 5))
    elif make_frames == "late":
        [peer] = joined(sim, "late")
        frames = _good_push(sim, peer)
    elif make_frames == "finished":
        sim.run(sim.core.finish())
        frames = _good_push(sim, a)
    else:
        frames = make_frames(sim, a)
    version, received = sim.store.version, list(sim.core.policy.current.received)  # type: ignore[union-attr]
    replies = sim.feed(peer.identity, frames)
    assert [m.type for m in replies] == [C.ERROR], replies
    [err] = replies
    assert err["code"] == code and err["reason"]
    expected_re = None if code in (ErrorCode.MALFORMED, ErrorCode.TOO_LARGE) else (99 if frames is not None and
                                                                                  code in PUSH_CODES else 5)
    assert err.re == expected_re
    assert sim.core.rejected == {code.name: 1}
    assert sim.store.version == version and sim.core.policy.current.received == received  # type: ignore[union-attr]
    assert sim.disk.persisted == [] and sim.core.updates == []


PUSH_CODES = {ErrorCode.BAD_TENSOR, ErrorCode.NON_FINITE, ErrorCode.MODEL_MISMATCH, ErrorCode.STALE_UPDATE,
              ErrorCode.NOT_SELECTED, ErrorCode.WRONG_KIND, ErrorCode.RUN_FINISHED}


def test_refusals_are_logged_at_most_once_a_second_per_code(caplog: pytest.LogCaptureFixture) -> None:
    sim = CoreSim()
    stranger = Peer(sim, "stranger")
    with caplog.at_level("WARNING", logger="fedctl.broker.core"):
        for _ in range(5):
            stranger.pull()
        sim.clock.advance(1.0)
        stranger.pull()
    assert sim.core.rejected == {"NOT_JOINED": 6}
    assert len([r for r in caplog.records if "refused" in r.getMessage()]) == 2


def test_a_restarted_core_resumes_the_open_round_and_takes_the_resent_updates() -> None:
    """Crash after two of three pushes arrived (held, not acknowledged): a new core, restored from the round file
    and the checkpoint of round 0, takes the two workers' resent updates and the third one's, and finishes the
    round with the same result as a run that never stopped."""

    def round_one(sim: CoreSim) -> list[Peer]:
        peers = joined(sim, "a", "b", "c", examples=(100, 200, 700))
        for p in peers:
            p.pull()
        sim.core.try_open_round(1, sim.clock())
        sim.hand_out(1)
        return peers

    whole = CoreSim()
    for i, p in enumerate(round_one(whole)):
        p.push(shifted(whole.store.weights, i + 1), 1)
    whole.core.policy.close()
    whole.aggregate_round()

    first = CoreSim()
    start = dict(first.store.weights)
    a, b, _ = round_one(first)
    assert a.push(shifted(start, 1), 1) == [] and b.push(shifted(start, 2), 1) == []
    opened = first.core.policy.current
    assert opened is not None
    # kill -9: only the disk survives (the round file), and the checkpoint of round 0.
    second = CoreSim(disk=first.disk, store=ParameterStore(start), state={**first.state})
    restored = second.core.policy.restore(0, (1, opened.selected), [], set, second.clock())
    assert not restored.forget_all and restored.updates == []
    a2, b2, c2 = joined(second, "a", "b", "c", examples=(100, 200, 700))
    for p in (a2, b2, c2):
        p.pull()
    assert all(second.core.policy.needs_model(w) for w in "abc")
    second.hand_out(1, ["a", "b", "c"])
    for i, p in enumerate((a2, b2, c2)):
        assert p.push(shifted(start, i + 1), 1) == []
    assert second.core.policy.should_close(second.clock())
    second.core.policy.close()
    second.aggregate_round()
    assert [p.last()["status"] for p in (a2, b2, c2)] == ["accepted"] * 3
    for k in start:
        assert np.array_equal(second.store.weights[k], whole.store.weights[k]), k


def test_a_restart_after_the_checkpoint_acks_a_resent_update_of_the_committed_round() -> None:
    """Killed after round 1's checkpoint but before its acks went out: the restarted broker knows from the journal
    who took part in round 1 and acks their resent updates as duplicates instead of refusing them as stale."""
    sim = CoreSim(state={"run_id": "r", "round": 1, "strategy_state": {}})
    restored = sim.core.policy.restore(1, (1, ("a", "b")), [], lambda: {("a", 1), ("b", 1), ("a", 0)},
                                       sim.clock())
    assert restored.forget_all
    a, c = joined(sim, "a", "c")
    [dup] = a.push(sim.store.weights, 1)
    assert (dup.type, dup["status"]) == (C.ACK, "duplicate")
    [err] = c.push(sim.store.weights, 1)
    assert err["code"] == ErrorCode.STALE_UPDATE


def test_a_restart_forgets_a_round_that_was_not_open_and_clock_updates_already_applied() -> None:
    sim = CoreSim()
    restored = sim.core.policy.restore(3, (3, ("a",)), [], set, sim.clock())
    assert restored.forget_all and restored.updates == []
    clock_sim = CoreSim(config(policy="async"))
    from fedctl.strategies import Update

    ups = [Update(w, 10, {}, C.KIND_WEIGHTS, 0, round=t) for w, t in (("a", 1), ("a", 2), ("b", 1))]
    got = clock_sim.core.policy.restore(2, None, ups, lambda: {("a", 1)}, clock_sim.clock())
    assert [(u.worker, u.round) for u in got.updates] == [("a", 2), ("b", 1)] and got.forget == [("a", 1)]
    assert clock_sim.core.policy.clocks == {"a": 2, "b": 1}  # type: ignore[union-attr]


def test_unreachable_worker_is_dropped_when_its_model_cannot_be_sent() -> None:
    sim = CoreSim()
    a, b = joined(sim, "a", "b")
    a.pull(), b.pull()
    sim.unreachable.add(b.identity)
    sim.core.try_open_round(1, sim.clock())
    sim.hand_out(1)
    assert "b" not in sim.core.registry and sim.core.policy.current is not None
    assert sim.core.policy.current.gone == {"b"}


def test_done_answers_waiting_pulls_and_later_pulls() -> None:
    sim = CoreSim()
    a, b = joined(sim, "a", "b")
    a.pull()
    sim.run(sim.core.finish())
    assert a.last().type == C.DONE and a.last().re == 2
    assert b.last().type == C.DONE and b.last().re is None
    [done] = b.pull()
    assert done.type == C.DONE and done.re == b.ids


def test_leave_is_never_answered_and_a_heartbeat_is_echoed() -> None:
    sim = CoreSim()
    [a] = joined(sim, "a")
    [echo] = a.send(C.HEARTBEAT, t=1.5)
    assert echo.type == C.HEARTBEAT and echo["t"] == 1.5 and echo.re == a.ids
    assert a.send(C.LEAVE, reason="bye") == [] and "a" not in sim.core.registry
    assert Peer(sim, "ghost").send(C.LEAVE) == [], "not even from a stranger"


def test_the_core_answers_every_worker_message_type() -> None:
    handled = set(CoreSim().core._handlers)
    assert handled == set(C.WORKER_TO_BROKER)


def test_effects_of_a_chunked_push_in_order() -> None:
    sim, a = chunked_sim()
    pieces = list(chunks.split(sim.store.weights, sim.core.shapes, 16384))
    effects = sim.core.handle(a.identity, encode(make(C.PUSH, 50, round=1, base_version=0, seq=1,
                                                      kind=C.KIND_WEIGHTS, num_examples=1, chunks=len(pieces))),
                              sim.clock())
    assert isinstance(effects[0], OpenTransfer) and effects[0].nbytes == 4 * sum(
        math.prod(s) for s in sim.core.shapes.values())
    sim.run(effects)
    last: list[Any] = []
    for index, piece in enumerate(pieces):
        last = sim.core.handle(a.identity, encode(make(C.CHUNK, 60 + index, slices=piece, xfer=50, index=index)),
                               sim.clock())
        sim.run(last)
    kinds = [type(e).__name__ for e in last]
    assert kinds == ["WriteChunk", "Send", "CloseTransfer", "Wake"], "(sync: the ack is held)"
    assert isinstance(last[0], WriteChunk) and isinstance(last[2], CloseTransfer) and not last[2].delete


def test_messages_are_fully_validated_before_the_core_acts() -> None:
    sim = CoreSim()
    msg = Message(C.PULL, {}, {}, 3)
    assert sim.core.dispatch(b"\x00x", msg, encode(msg), sim.clock())[0].type == C.ERROR


def test_sync_config_in_coresim_is_a_real_policy() -> None:
    assert CoreSim(config(sync=SyncConfig(0.5, 1, 5.0))).core.policy.name == "sync"


def test_a_worker_that_cannot_train_is_not_waited_for() -> None:
    sim = CoreSim()
    a, b = joined(sim, "a", "b")
    a.pull(), b.pull()
    sim.core.try_open_round(1, sim.clock())
    sim.hand_out(1)
    a.push(sim.store.weights, 1)
    assert not sim.core.policy.should_close(sim.clock())
    assert b.send(C.FAILED, round=1, reason="ZeroDivisionError: division by zero") == [], "never answered"
    assert sim.core.policy.should_close(sim.clock()), "the round goes on without b"
    b.pull()
    assert not sim.core.policy.needs_model("b"), "b is not handed the round's model again"
    assert a.send(C.FAILED, round=1, reason="late") == [] and sim.core.policy.current is not None
    assert sim.core.policy.current.failed == {"b"}, "a report after a push changes nothing"
    [err] = Peer(sim, "stranger").send(C.FAILED, round=1, reason="x")
    assert err["code"] == ErrorCode.NOT_JOINED


def test_a_failed_clock_update_ends_the_assignment() -> None:
    sim = CoreSim(config(policy="async"))
    [w] = joined(sim, "w")
    w.pull()
    record = sim.core.registry.get("w")
    assert record is not None
    policy: Any = sim.core.policy
    sim.run(sim.core.hand_out([(record, policy.assign("w", 0))], _downlinks(sim, None), sim.clock()))
    assert policy.busy() == 1
    w.send(C.FAILED, round=2, reason="wrong tick")
    assert policy.busy() == 1
    w.send(C.FAILED, round=1, reason="boom")
    assert policy.busy() == 0 and policy.clocks == {"w": 0}


def test_status_answers_without_a_join_and_changes_nothing() -> None:
    sim = CoreSim()
    a, b = joined(sim, "a", "b")
    a.pull()
    sim.core.try_open_round(1, sim.clock())
    sim.hand_out(1)
    admin = Peer(sim, "admin")
    [reply] = admin.send(C.STATUS)
    assert reply.type == C.STATUS_REPLY and reply.re == admin.ids
    s = reply["status"]
    assert (s["round"], s["version"], s["workers_connected"], s["workers_total"]) == (0, 0, 2, 2)
    assert s["open_round"]["round"] == 1 and s["open_round"]["sampled"] == 1 and s["open_round"]["received"] == 0
    assert [w["worker"] for w in s["workers"]] == ["a", "b"] and [w["waiting"] for w in s["workers"]] == [False, False]
    assert "admin" not in sim.core.registry and sim.core.rejected == {}
    [short] = admin.send(C.STATUS, workers=False)
    assert "workers" not in short["status"]


def test_a_join_retried_on_the_same_connection_keeps_the_workers_pull() -> None:
    """A worker whose welcome was late resends ``join`` on its socket; the broker, busy, answers both. The second
    must not undo the pull sent after the first welcome (else, under a join storm, no round ever opens)."""
    sim = CoreSim()
    a, b = joined(sim, "a", "b")
    a.pull()
    b.pull()
    assert {r.worker for r in sim.core.registry.waiting()} == {"a", "b"}
    [welcome] = [m for m in a.join() if m.type == C.WELCOME]
    assert welcome["worker"] == "a"
    assert {r.worker for r in sim.core.registry.waiting()} == {"a", "b"}, "the retried join kept a's pull"
    assert sim.core.try_open_round(1, sim.clock()) is not None
    assert [e["kind"] for e in sim.core.status(sim.clock())["events"]] == ["join", "join"]
    a.identity = b"\x09a"  # a new connection (a restarted worker): a rejoin, whose old pull is gone
    a.join()
    assert sim.core.registry.get("a").identity == b"\x09a"
    assert "a" not in {r.worker for r in sim.core.registry.waiting()}
