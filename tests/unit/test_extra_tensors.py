"""A strategy's extra tensors on the wire (docs/protocol.md §5.6; SCAFFOLD's ``scaffold.c/…`` and ``scaffold.dc/…``):
the wire's split and checks, the model messages that carry c whole (dense model or delta, never ``evaluate``), the
pushes that carry Δc, every malformed push refused with its code and changing nothing, and the start checks."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from coresim import CoreSim, Peer, config

from fedctl.broker.core import BrokerCore
from fedctl.errors import ConfigError, ProtocolError
from fedctl.models import get_model
from fedctl.strategies import TaskConfig, get_strategy
from fedctl.wire import SparseTensor, make, split_extras
from fedctl.wire import constants as C
from fedctl.wire.constants import ErrorCode
from fedctl.worker.client import Worker, WorkerConfig

SHAPES = {"fc.w": (2, 3), "fc.b": (3,)}
MLP = {p.name: p.shape for p in get_model("mlp").params}
MODEL_BYTES = get_model("mlp").nbytes


def zeros(prefix: str = "", shapes: dict[str, tuple[int, ...]] = MLP, value: float = 0.0) -> dict[str, np.ndarray]:
    return {prefix + k: np.full(s, value, np.float32) for k, s in shapes.items()}


# ----------------------------------------------------------------------------------------------- wire
def test_split_extras_separates_and_checks_each_extra_tensor() -> None:
    tensors: dict[str, Any] = {**zeros(shapes=SHAPES), **zeros("p/", SHAPES, 1.0)}
    model, extras = split_extras(tensors, ("p",), SHAPES)
    assert set(model) == {"fc.w", "fc.b"} and set(extras) == {"p/fc.w", "p/fc.b"}
    assert split_extras(tensors, (), SHAPES) == (tensors, {}), "no prefix declared: nothing is an extra tensor"
    bad: list[tuple[dict[str, Any], str]] = [
        ({"p/fc.w": np.zeros((3, 2), np.float32), "p/fc.b": np.zeros(3, np.float32)}, "has shape"),
        ({"p/fc.w": np.zeros((2, 3), np.float32)}, "lacks"),
        ({**zeros("p/", SHAPES), "p/fc.x": np.zeros(3, np.float32)}, "shadows no tensor"),
        ({**zeros("p/", SHAPES), "p/fc.b": np.zeros(3, np.float16)}, "dense float32"),
        ({**zeros("p/", SHAPES), "p/fc.b": SparseTensor((3,), np.array([1], np.uint32), np.ones(1, np.float32))},
         "dense float32")]
    for case, words in bad:
        with pytest.raises(ProtocolError, match=words) as info:
            split_extras(case, ("p",), SHAPES)
        assert info.value.code == ErrorCode.MODEL_MISMATCH


# ----------------------------------------------------------------------------------------------- the core
def scaffold_sim(**overrides: Any) -> CoreSim:
    return CoreSim(config(strategy="scaffold", **overrides))


def joined(sim: CoreSim, *names: str) -> list[Peer]:
    peers = [Peer(sim, n) for n in names]
    for p in peers:
        [welcome] = p.join()
        assert welcome.type == C.WELCOME and welcome["run"]["strategy"] == sim.core.strategy.name
    return peers


def start_round(sim: CoreSim, peers: list[Peer], number: int, version: int | None = None) -> None:
    for p in peers:
        assert p.pull(version=version) == []
    assert sim.core.try_open_round(number, sim.clock()) is not None
    sim.hand_out(number)


def scaffold_push(peer: Peer, round_no: int, base: int = 0, dc: float = 0.5, **extra: Any) -> list[Any]:
    return peer.push({**zeros(value=0.01), **zeros("scaffold.dc/", value=dc), **extra}, round_no, base=base,
                     kind=C.KIND_DELTA, seq=round_no)


def test_the_model_carries_c_whole_and_the_push_carries_delta_c() -> None:
    sim = scaffold_sim()
    a, b = joined(sim, "a", "b")
    start_round(sim, [a, b], 1)
    for p in (a, b):
        model = p.last()
        assert model.type == C.MODEL and model["task"]["strategy"] == "scaffold"
        assert set(model.tensors) == set(MLP) | {f"scaffold.c/{k}" for k in MLP}
        assert all(np.array_equal(model.tensors[f"scaffold.c/{k}"], np.zeros(s)) for k, s in MLP.items())
        assert sim.sent_bytes[p.identity][-1] == pytest.approx(2 * MODEL_BYTES, rel=0.01)
        assert scaffold_push(p, 1) == []
    assert [sorted(u.tensors) == sorted([*MLP, *(f"scaffold.dc/{k}" for k in MLP)]) for u in sim.core.updates] == \
        [True, True], "Δc stays in the update, for the strategy"
    sim.core.policy.close()
    sim.aggregate_round()
    c = {k: v for k, v in sim.state["strategy_state"].items() if k.startswith("c/")}
    assert set(c) == {f"c/{k}" for k in MLP} and all(np.allclose(v, 0.5) for v in c.values()), "c += ΣΔc/N"
    # round 2: a holds version 1, the current one (an empty delta, and c), b holds nothing (the dense model, and c)
    a.pull(version=1), b.pull()
    assert sim.core.try_open_round(2, sim.clock()) is not None
    sim.hand_out(2)
    delta, dense = a.last(), b.last()
    assert delta["base"] == 1 and dense.get("base") is None
    for model in (delta, dense):
        for k in MLP:
            np.testing.assert_array_equal(model.tensors[f"scaffold.c/{k}"], sim.state["strategy_state"][f"c/{k}"])
    assert set(delta.tensors) == {f"scaffold.c/{k}" for k in MLP}, "unchanged model tensors are left out, c is not"


def test_evaluate_carries_the_model_only() -> None:
    sim = scaffold_sim()
    a, = joined(sim, "a")
    a.pull()
    asked = sim.open_evaluation(0)
    assert asked == ["a"] and set(a.last().tensors) == set(MLP)


def malformed_pushes() -> dict[str, tuple[dict[str, Any], dict[str, Any], ErrorCode]]:
    good = {**zeros(value=0.01), **zeros("scaffold.dc/")}
    sparse = SparseTensor((10,), np.array([1], np.uint32), np.ones(1, np.float32))
    return {
        "dc of the wrong shape": ({**good, "scaffold.dc/fc3.bias": np.zeros(11, np.float32)}, {},
                                  ErrorCode.MODEL_MISMATCH),
        "dc missing for a tensor": ({k: v for k, v in good.items() if k != "scaffold.dc/fc1.weight"}, {},
                                    ErrorCode.MODEL_MISMATCH),
        "dc sparse": ({**good, "scaffold.dc/fc3.bias": sparse}, {}, ErrorCode.MODEL_MISMATCH),
        "dc in fp16": ({**good, "scaffold.dc/fc3.bias": np.zeros(10, np.float16)}, {}, ErrorCode.MODEL_MISMATCH),
        "dc of no tensor": ({**good, "scaffold.dc/fc9.bias": np.zeros(10, np.float32)}, {},
                            ErrorCode.MODEL_MISMATCH),
        "c sent back": ({**good, "scaffold.c/fc3.bias": np.zeros(10, np.float32)}, {}, ErrorCode.MODEL_MISMATCH),
        "no dc at all": (zeros(value=0.01), {}, ErrorCode.MODEL_MISMATCH),
        "chunked": ({}, {"chunks": 3}, ErrorCode.BAD_FIELD),
    }


@pytest.mark.parametrize("case", sorted(malformed_pushes()))
def test_a_malformed_scaffold_push_is_refused_and_changes_nothing(case: str) -> None:
    tensors, fields, code = malformed_pushes()[case]
    sim = scaffold_sim()
    a, = joined(sim, "a")
    start_round(sim, [a], 1)
    before = {k: v.copy() for k, v in sim.store.weights.items()}
    [err] = a.push(tensors, 1, kind=C.KIND_DELTA, **fields)
    assert (err.type, err["code"], err.re) == (C.ERROR, code, a.ids), err.fields
    assert sim.core.updates == [] and sim.core.policy.current is not None
    assert sim.core.policy.current.received == [] and sim.core.inbound == {}
    assert sim.core.rejected == {code.name: 1}
    assert all(np.array_equal(sim.store.weights[k], v) for k, v in before.items())
    assert scaffold_push(a, 1) == [], "the round still takes the right push"


def test_extra_tensors_under_fedavg_are_refused() -> None:
    sim = CoreSim()
    a, = joined(sim, "a")
    start_round(sim, [a], 1)
    assert set(a.last().tensors) == set(MLP), "FedAvg's model message carries no extra tensor"
    [err] = a.push({**sim.store.weights, **zeros("scaffold.dc/")}, 1)
    assert err["code"] == ErrorCode.MODEL_MISMATCH and "scaffold.dc/" in err["reason"]
    assert sim.core.updates == [] and sim.core.rejected == {"MODEL_MISMATCH": 1}
    assert a.push(dict(sim.store.weights), 1) == []


def test_a_packed_frame_is_a_push_s_only_tensor_even_beside_extra_tensors() -> None:
    sim = scaffold_sim()
    a, = joined(sim, "a")
    start_round(sim, [a], 1)
    total = sum(int(np.prod(s)) for s in MLP.values())
    packed = SparseTensor((total,), np.array([0, 5], np.uint32), np.ones(2, np.float32))
    [err] = a.push({"*": packed, **zeros("scaffold.dc/")}, 1, kind=C.KIND_DELTA)
    assert err["code"] == ErrorCode.MODEL_MISMATCH


def test_a_model_that_does_not_fit_one_message_twice_is_refused_at_start() -> None:
    cfg = config(strategy="scaffold", max_message_bytes=1024 * 1024, chunk_above=600_000)  # the mlp: 437,544 bytes
    with pytest.raises(ConfigError, match="chunk-above-mb") as info:
        CoreSim(cfg)
    assert "875,088" in str(info.value.message) and "\n" not in str(info.value.message)
    CoreSim(config(strategy="fedavg", max_message_bytes=1024 * 1024, chunk_above=600_000))  # FedAvg: one model
    CoreSim(config(strategy="scaffold", max_message_bytes=2 * 1024 * 1024, chunk_above=900_000))


def test_the_strategies_declare_their_extra_prefixes() -> None:
    scaffold = get_strategy("scaffold", TaskConfig())
    assert scaffold.extra_downlink == ("scaffold.c",) and scaffold.extra_uplink == ("scaffold.dc",)
    for name in ("fedavg", "fedprox", "fedsgd", "dgc"):
        strategy = get_strategy(name, TaskConfig())
        assert strategy.extra_downlink == strategy.extra_uplink == ()
        assert strategy.downlink_extra({"w": np.zeros(2, np.float32)}, {}) == {}
    assert BrokerCore is not None


def test_the_worker_hands_c_to_the_strategy_and_refuses_a_model_without_it() -> None:
    worker = Worker(WorkerConfig("tcp://127.0.0.1:1", "w", "numpy", 10), lambda spec: None)
    worker.spec = get_model("mlp")
    scaffold, fedavg = get_strategy("scaffold", TaskConfig()), get_strategy("fedavg", TaskConfig())
    task = {"strategy": "scaffold", "kind": "delta", "epochs": 1, "batch_size": 0, "lr": 0.1, "seed": 0, "round": 1}
    model = make(C.MODEL, 1, tensors={**zeros(), **zeros("scaffold.c/", value=2.0)}, round=1, version=0, task=task)
    rest, extras = worker._split_extras(model, scaffold)
    assert set(rest.tensors) == set(MLP) and rest.fields == model.fields
    assert set(extras) == {f"scaffold.c/{k}" for k in MLP} and all(np.all(v == 2.0) for v in extras.values())
    plain = make(C.MODEL, 2, tensors=zeros(), round=1, version=0, task=task)
    assert worker._split_extras(plain, fedavg) == (plain, {})
    total = sum(int(np.prod(s)) for s in MLP.values())
    packed = SparseTensor((total,), np.array([3], np.uint32), np.ones(1, np.float32))
    for bad in (plain, make(C.MODEL, 3, round=1, version=0, task=task, chunks=4),
                make(C.MODEL, 4, tensors={"*": packed, **zeros("scaffold.c/")}, round=1, version=0, task=task,
                     base=0)):
        with pytest.raises(ProtocolError) as info:
            worker._split_extras(bad, scaffold)
        assert info.value.code == ErrorCode.MODEL_MISMATCH
