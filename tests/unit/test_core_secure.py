"""Secure aggregation in the broker's sans-IO core (fedctl/broker/secure.py), without sockets: a whole attempt
driven stage by stage as the round driver does, the one refusal path for out-of-step messages, abandoned attempts,
and the settings refused at start."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from coresim import CoreSim, Peer, config

from fedctl.errors import ConfigError
from fedctl.secagg import ClientSession, Field
from fedctl.wire import constants as C
from fedctl.wire.constants import ErrorCode


def secure_sim(*names: str) -> tuple[CoreSim, list[Peer]]:
    sim = CoreSim(config(secure_aggregation=True))
    peers = [Peer(sim, n, 100 + 50 * i) for i, n in enumerate(names)]
    for p in peers:
        p.join()
        p.pull()
    sim.core.try_open_round(1, sim.clock())
    records = list(sim.core.registry.waiting())
    sim.core.secure.open(1, [(r.worker, r.num_examples) for r in records], sim.store.version)  # type: ignore[union-attr]
    sim.hand_out(1)
    return sim, peers


def advance(sim: CoreSim) -> Any:
    replies, outcome = sim.core.secure.advance()  # type: ignore[union-attr]
    sim.run(sim.core.secure_effects(replies))
    return outcome


def test_one_attempt_through_the_core() -> None:
    sim, peers = secure_sim("a", "b", "c")
    models = [p.last() for p in peers]
    sa = models[0]["secagg"]
    assert sa["max_inputs"] == 3 and sa["weight_ref"] == 200 and all(m["secagg"] == sa for m in models)
    sessions = {p.name: ClientSession(1, sa["attempt"]) for p in peers}
    for p in peers:
        c, s = sessions[p.name].public_keys()
        assert p.send(C.SA_KEYS, round=1, attempt=sa["attempt"], c=c, s=s) == []  # answered when the stage closes
    advance(sim)
    for p in peers:
        got = p.last()
        assert got.type == C.SA_PEERS and got.re == p.ids
        sealed = sessions[p.name].share(got["index"], {v: (c, s) for v, c, s in got["peers"]}, got["threshold"])
        p.send(C.SA_SHARES, round=1, attempt=sa["attempt"], shares=[[v, b] for v, b in sealed.items()])
    advance(sim)
    field = Field(4.0, 3)
    xs = {p.name: np.full(sim.core.spec.num_params + 1, 0.01 * (i + 1)) for i, p in enumerate(peers)}
    for p in peers:
        sessions[p.name].receive({v: b for v, b in p.last()["shares"]})
        masked = sessions[p.name].mask(field.encode(xs[p.name])[0])
        p.send(C.SA_INPUT, tensors={"masked": masked}, round=1, attempt=sa["attempt"], base_version=0,
               num_examples=p.num_examples, weight=p.num_examples / 200)
    assert sorted(sim.core.policy.current.received) == ["a", "b", "c"]  # type: ignore[union-attr]
    advance(sim)
    for p in peers:
        got = p.last()
        seeds, keys = sessions[p.name].reveal(got["survivors"], got["dropped"])
        p.send(C.SA_REVEAL, round=1, attempt=sa["attempt"], seeds=[[v, b] for v, b in seeds.items()],
               keys=[[v, b] for v, b in keys.items()])
    outcome = advance(sim)
    assert [p.last().type for p in peers] == [C.ACK] * 3 and sim.core.secure.current is None  # type: ignore[union-attr]
    # Each worker sent x_k (already weighted); the outcome is Σ x_k / Σ w_k.
    expected = sum(xs.values()) / (0.5 + 0.75 + 1.0)
    np.testing.assert_allclose(outcome.mean, expected[:-1], atol=1e-6)
    assert outcome.metrics["train_loss"] == pytest.approx(expected[-1], abs=1e-6), "the last value: the loss"
    assert outcome.workers == ["a", "b", "c"] and outcome.num_examples == 450


def test_out_of_step_messages_are_refused_through_the_one_path() -> None:
    sim, (a, b) = secure_sim("a", "b")
    attempt = a.last()["secagg"]["attempt"]
    keys = ClientSession(1, attempt).public_keys()
    [err] = a.send(C.SA_KEYS, round=1, attempt=attempt + 1, c=keys[0], s=keys[1])
    assert err["code"] == ErrorCode.SECAGG_REFUSED and "is not open" in err["reason"] and err.re == a.ids
    assert a.send(C.SA_KEYS, round=1, attempt=attempt, c=keys[0], s=keys[1]) == []
    [err] = a.send(C.SA_KEYS, round=1, attempt=attempt, c=keys[0], s=keys[1])
    assert err["code"] == ErrorCode.SECAGG_REFUSED and "sent twice" in err["reason"]
    [err] = b.send(C.SA_REVEAL, round=1, attempt=attempt, seeds=[], keys=[])
    assert err["code"] == ErrorCode.SECAGG_REFUSED and "in the keys stage" in err["reason"]
    assert sim.core.rejected == {"SECAGG_REFUSED": 3}


def test_secure_messages_to_a_run_without_it_are_unknown() -> None:
    sim = CoreSim()
    p = Peer(sim, "a")
    p.join()
    [err] = p.send(C.SA_KEYS, round=1, attempt=1, c=b"c" * 32, s=b"s" * 32)
    assert err["code"] == ErrorCode.UNKNOWN_TYPE and "--secure-aggregation" in err["fix"]


def test_an_attempt_without_enough_workers_is_abandoned_and_everyone_told() -> None:
    sim, (a, b) = secure_sim("a", "b")
    attempt = a.last()["secagg"]["attempt"]
    c, s = ClientSession(1, attempt).public_keys()
    a.send(C.SA_KEYS, round=1, attempt=attempt, c=c, s=s)
    sim.run(sim.core.drop("b", "expired", sim.clock(), "lost"))
    assert sim.core.secure.stage_done({"a"})  # type: ignore[union-attr]
    assert advance(sim) is None and sim.core.secure.current is None  # type: ignore[union-attr]
    err = a.last()
    assert err.type == C.ERROR and err["code"] == ErrorCode.SECAGG_ABORTED and "at least 2" in err["reason"]


@pytest.mark.parametrize("overrides, words", [
    ({"strategy": "dgc"}, "--strategy dgc sends sparse"),
    ({"strategy": "ssgd"}, "--strategy ssgd sends sparse"),
    ({"policy": "async"}, "needs rounds (--policy sync)"),
    ({"policy": "ssp:2"}, "needs rounds (--policy sync)"),
    ({"secagg_clip": 0.0}, "--secagg-clip must be a positive number"),
    ({"secagg_neighbours": 1}, "--secagg-neighbours must be 2..256"),
    ({"secagg_threshold": 1.0}, "--secagg-threshold must be in (0, 1)"),
])
def test_settings_refused_at_start(overrides: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        config(secure_aggregation=True, **overrides)


def test_a_model_that_goes_in_chunks_is_refused_at_start() -> None:
    with pytest.raises(ConfigError, match="goes in chunks above --chunk-above-mb"):
        CoreSim(config(secure_aggregation=True, chunk_above=4096))


def test_the_reveals_close_once_every_secret_has_t_shares_and_a_late_reveal_is_acknowledged() -> None:
    sim, peers = secure_sim("a", "b", "c", "d")
    sa = peers[0].last()["secagg"]
    sessions = {p.name: ClientSession(1, sa["attempt"]) for p in peers}
    for p in peers:
        c, s = sessions[p.name].public_keys()
        p.send(C.SA_KEYS, round=1, attempt=sa["attempt"], c=c, s=s)
    advance(sim)
    for p in peers:
        got = p.last()
        sealed = sessions[p.name].share(got["index"], {v: (c, s) for v, c, s in got["peers"]}, got["threshold"])
        p.send(C.SA_SHARES, round=1, attempt=sa["attempt"], shares=[[v, b] for v, b in sealed.items()])
    advance(sim)
    field = Field(4.0, 4)
    for p in peers:
        sessions[p.name].receive({v: b for v, b in p.last()["shares"]})
        masked = sessions[p.name].mask(field.encode(np.zeros(sim.core.spec.num_params + 1))[0])
        p.send(C.SA_INPUT, tensors={"masked": masked}, round=1, attempt=sa["attempt"], base_version=0,
               num_examples=100, weight=1.0)
    advance(sim)
    live = {"a", "b", "c", "d"}
    reveals = {}
    for p in peers:
        got = p.last()
        reveals[p.name] = sessions[p.name].reveal(got["survivors"], got["dropped"])
    for p in peers[:3]:
        assert not sim.core.secure.stage_done(live)  # type: ignore[union-attr]
        seeds, keys = reveals[p.name]
        p.send(C.SA_REVEAL, round=1, attempt=sa["attempt"], seeds=[[v, b] for v, b in seeds.items()],
               keys=[[v, b] for v, b in keys.items()])
    assert sim.core.secure.stage_done(live), "k = 3, t = 2: three reveals give every seed two shares"  # type: ignore[union-attr]
    outcome = advance(sim)
    assert outcome.workers == ["a", "b", "c", "d"] and np.allclose(outcome.mean, 0, atol=1e-6)
    seeds, keys = reveals["d"]
    [late] = peers[3].send(C.SA_REVEAL, round=1, attempt=sa["attempt"], seeds=[[v, b] for v, b in seeds.items()],
                           keys=[[v, b] for v, b in keys.items()])
    assert late.type == C.ACK and late["status"] == C.ACK_DUPLICATE
