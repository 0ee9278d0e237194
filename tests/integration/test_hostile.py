"""A hostile peer on a raw DEALER socket next to honest workers: every bad message is refused, nothing changes."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
import zmq.asyncio

from fedctl.broker.policy import SyncConfig
from fedctl.broker.service import Broker
from fedctl.models import get_model, init_params
from fedctl.testing.trainers import NumpyMLPTrainer
from fedctl.wire import SparseTensor, decode, encode, make, peek_id
from fedctl.wire import constants as C
from fedctl.wire.constants import ErrorCode
from fedctl.wire.messages import Message
from fedctl.wire.tensors import PACKED_NAME

MAX_MESSAGE_BYTES = 600_000  # above the MLP's largest frame (fc1.weight, 401 kB), below the oversized one
SPEC = get_model("mlp")


def config(fed: Any, state_dir: Path, **overrides: Any) -> Any:
    options: dict[str, Any] = {"rounds": 3, "seed": 11, "sync": SyncConfig(1.0, 2, 20.0),
                                   "max_message_bytes": MAX_MESSAGE_BYTES, "liveness_s": 10.0}
    options.update(overrides)
    return fed.broker_config(state_dir, **options)


@dataclass
class GatedTrainer:
    """The numpy MLP, but training waits for ``gate`` so round 1 stays open while the attacker works."""

    inner: NumpyMLPTrainer
    gate: threading.Event
    backend: str = "numpy"

    def fit(self, weights: Any, epochs: int, batch_size: int, lr: float, seed: int) -> Any:
        if not self.gate.wait(30):
            raise TimeoutError("the attack never finished")
        return self.inner.fit(weights, epochs, batch_size, lr, seed)

    def gradient(self, weights: Any, batch_size: int, seed: int) -> Any:
        return self.inner.gradient(weights, batch_size, seed)

    def evaluate(self, weights: Any, batch_size: int = 1000) -> Any:
        return self.inner.evaluate(weights, batch_size)


class RawPeer:
    """A bare DEALER speaking (or mangling) the protocol by hand."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.ids = 1000

    def next_id(self) -> int:
        self.ids += 1
        return self.ids

    async def send(self, frames: list[bytes]) -> None:
        await self.sock.send_multipart(frames)

    async def recv(self, timeout_s: float = 5.0) -> Message:
        # poll, then receive: never cancel a pending receive (pyzmq would drop the message)
        if not await self.sock.poll(int(timeout_s * 1000)):
            raise AssertionError(f"no reply within {timeout_s} s")
        return decode(await self.sock.recv_multipart(), C.BROKER_TO_WORKER)

    async def ask(self, frames: list[bytes]) -> Message:
        await self.send(frames)
        return await self.recv()

    def msg(self, mtype: str, tensors: Any = None, **fields: Any) -> list[bytes]:
        return encode(make(mtype, self.next_id(), tensors=tensors, **fields))

    def push(self, tensors: Any, round_no: int = 1, kind: str = "weights", base_version: int = 0) -> list[bytes]:
        return self.msg(C.PUSH, tensors, round=round_no, base_version=base_version, seq=0, kind=kind,
                        num_examples=100)

    def close(self) -> None:
        self.sock.close(0)


def good_tensors() -> dict[str, np.ndarray]:
    return init_params(SPEC, 1)


def hostile_table(peer: RawPeer, open_round: int) -> tuple[list[tuple[str, list[bytes], ErrorCode]],
                                                           list[tuple[str, list[bytes], ErrorCode]]]:
    """(before joining, after joining): name, frames, the error code the broker must answer with."""
    nan = good_tensors()
    nan["fc3.bias"][3] = np.nan
    renamed = good_tensors()
    renamed["fc9.bias"] = renamed.pop("fc3.bias")
    reshaped = good_tensors()
    reshaped["fc1.weight"] = np.ascontiguousarray(reshaped["fc1.weight"].T)
    wrong_dtype = good_tensors()  # one float64 tensor (a whole float64 model would exceed the size limit)
    wrong_dtype["fc3.bias"] = wrong_dtype["fc3.bias"].astype(np.float64)
    valid_join = peer.msg(C.JOIN, worker="mallory", backend="numpy", num_examples=100)
    before = [
        ("garbage", [b"\xc1\x00garbage"], ErrorCode.MALFORMED),
        ("truncated msgpack", [valid_join[0][:-5]], ErrorCode.MALFORMED),
        ("header not a map", [msgpack.packb(["join", 1])], ErrorCode.MALFORMED),
        ("wrong version", [msgpack.packb({"v": 99, "type": "join", "id": 5})], ErrorCode.UNSUPPORTED_VERSION),
        ("broker-to-worker type", peer.msg(C.WELCOME, worker="x", run={}), ErrorCode.UNKNOWN_TYPE),
        ("type is a list", [msgpack.packb({"v": 1, "type": ["push"], "id": 6})], ErrorCode.UNKNOWN_TYPE),
        ("join without a worker id", [msgpack.packb({"v": 1, "type": "join", "id": 7, "backend": "numpy",
                                                     "num_examples": 3})], ErrorCode.MISSING_FIELD),
        ("push before join", peer.push(good_tensors(), open_round), ErrorCode.NOT_JOINED),
        ("pull before join", peer.msg(C.PULL), ErrorCode.NOT_JOINED),
        ("push with NaN", peer.push(nan, open_round), ErrorCode.NON_FINITE),
        ("join for another model", peer.msg(C.JOIN, worker="mallory", backend="numpy", num_examples=100,
                                            model="lenet5"), ErrorCode.MODEL_MISMATCH),
    ]
    after = [
        ("push with wrong tensor names", peer.push(renamed, open_round), ErrorCode.MODEL_MISMATCH),
        ("push with a wrong shape", peer.push(reshaped, open_round), ErrorCode.MODEL_MISMATCH),
        ("push with a float64 tensor", peer.push(wrong_dtype, open_round), ErrorCode.MODEL_MISMATCH),
        ("push with no tensors", peer.push({}, open_round), ErrorCode.MODEL_MISMATCH),
        ("push with a packed frame of the wrong length", peer.push(
            {PACKED_NAME: SparseTensor((7,), np.array([3], np.int64), np.array([1.0], np.float32))}, open_round),
         ErrorCode.MODEL_MISMATCH),
        ("push with the wrong kind", peer.push(good_tensors(), open_round, kind="gradient"), ErrorCode.WRONG_KIND),
        ("push for a round not open", peer.push(good_tensors(), open_round + 5), ErrorCode.STALE_UPDATE),
        ("push for a past round", peer.push(good_tensors(), open_round - 1), ErrorCode.STALE_UPDATE),
        ("push when not sampled", peer.push(good_tensors(), open_round), ErrorCode.NOT_SELECTED),
        ("push with NaN after join", peer.push(nan, open_round), ErrorCode.NON_FINITE),
    ]
    return before, after


async def expect_refusal(broker: Broker, peer: RawPeer, name: str, frames: list[bytes], code: ErrorCode) -> None:
    before = dict(broker.rejected)
    reply = await peer.ask(frames)
    assert reply.type == C.ERROR, f"{name}: got {reply.type}"
    assert reply["code"] == code, f"{name}: got {ErrorCode(reply['code']).name}: {reply['reason']}"
    assert reply["reason"]
    assert reply.re == peek_id(frames[0]), name  # garbage has no id, so its error names no request
    after = dict(broker.rejected)
    assert sum(after.values()) == sum(before.values()) + 1, name
    assert after.get(code.name, 0) == before.get(code.name, 0) + 1, name


async def attack(ctx: zmq.asyncio.Context, broker: Broker, gate: threading.Event) -> dict[str, int]:
    """Wait until round 1 is open (the honest workers are training), run the table, then let them finish."""
    try:
        while broker.policy.current is None:
            await asyncio.sleep(0.01)
        open_round = broker.policy.current.number
        peer = RawPeer(ctx, broker.endpoint)
        big = RawPeer(ctx, broker.endpoint)
        try:
            before, after = hostile_table(peer, open_round)
            for name, frames, code in before:
                await expect_refusal(broker, peer, name, frames, code)
            welcome = await peer.ask(peer.msg(C.JOIN, worker="mallory", backend="numpy", num_examples=100))
            assert welcome.type == C.WELCOME and welcome["run"]["model"]["name"] == "mlp"
            for name, frames, code in after:
                await expect_refusal(broker, peer, name, frames, code)
            beat = await peer.ask(peer.msg(C.HEARTBEAT, t=1.0))
            assert beat.type == C.HEARTBEAT

            # Over ZMQ_MAXMSGSIZE: libzmq drops the connection, no reply. The broker must keep serving.
            rejected = sum(broker.rejected.values())
            await big.send([b"\x00" * (2 * MAX_MESSAGE_BYTES)])
            await asyncio.sleep(0.2)
            assert sum(broker.rejected.values()) == rejected
            await expect_refusal(broker, peer, "garbage after the oversized frame", [b"\xc1"], ErrorCode.MALFORMED)
            assert broker.policy.current is not None and broker.policy.current.received == []

            await peer.send(peer.msg(C.LEAVE, reason="done attacking"))
            await asyncio.sleep(0.05)
            assert "mallory" not in broker.registry
            return dict(broker.rejected)
        finally:
            peer.close()
            big.close()
    finally:
        gate.set()


async def federation(fed: Any, ctx: zmq.asyncio.Context, state_dir: Path,
                     attacked: bool) -> tuple[Any, dict[str, np.ndarray], Any]:
    gate = threading.Event()
    if not attacked:
        gate.set()
    broker = fed.start_broker(ctx, config(fed, state_dir))
    workers = [fed.mlp_worker(ctx, broker.endpoint, i, wrap=lambda t: GatedTrainer(t, gate)) for i in range(2)]
    extra = [attack(ctx, broker, gate)] if attacked else []
    summary, *rest = await fed.run_federation(broker, workers, extra)
    return summary, broker.store.weights, rest[-1] if attacked else None


@pytest.mark.timeout(60)
def test_hostile_peer_is_refused_and_changes_nothing(fed: Any, ctx: zmq.asyncio.Context, tmp_path: Path) -> None:
    (tmp_path / "clean").mkdir()
    (tmp_path / "attacked").mkdir()
    clean, clean_weights, _ = fed.run_async(federation(fed, ctx, tmp_path / "clean", attacked=False))
    attacked, attacked_weights, rejected = fed.run_async(federation(fed, ctx, tmp_path / "attacked", attacked=True))

    assert clean["rounds"] == attacked["rounds"] == 3 and clean["version"] == attacked["version"] == 3
    assert clean["rejected"] == {}
    assert attacked["rejected"] == rejected
    assert sum(rejected.values()) == 22
    assert rejected["MODEL_MISMATCH"] == 6 and rejected["NOT_JOINED"] == 2 and rejected["MALFORMED"] == 4
    metrics = fed.read_metrics(tmp_path / "attacked")
    assert [m["round"] for m in metrics] == [1, 2, 3] and all(m["participants"] == 2 for m in metrics)
    assert metrics[-1]["rejected_total"] == 22

    assert list(clean_weights) == list(attacked_weights)
    for name in clean_weights:
        assert clean_weights[name].tobytes() == attacked_weights[name].tobytes(), f"{name} differs"


@pytest.mark.timeout(60)
def test_a_sparse_update_is_aggregated_like_its_dense_form(fed: Any, ctx: zmq.asyncio.Context, state_dir: Path) -> None:
    """A sampled peer may push a sparse encoding of its weights; the broker must not choke on it."""

    async def scenario() -> tuple[Any, dict[str, np.ndarray], dict[str, np.ndarray]]:
        broker = fed.start_broker(ctx, config(fed, state_dir, rounds=1, sync=SyncConfig(1.0, 1, 20.0)))
        peer = RawPeer(ctx, broker.endpoint)
        run = asyncio.ensure_future(broker.run())
        try:
            assert (await peer.ask(peer.msg(C.JOIN, worker="p", backend="numpy", num_examples=10))).type == C.WELCOME
            model = await peer.ask(peer.msg(C.PULL))
            assert model.type == C.MODEL and model["round"] == 1
            target = {k: np.where(np.abs(v) > 0.05, v, 0).astype(np.float32) for k, v in model.tensors.items()}
            sparse = {}
            for k, v in target.items():
                idx = np.flatnonzero(v).astype(np.uint32)
                sparse[k] = SparseTensor(v.shape, idx, v.reshape(-1)[idx])
            ack = await peer.ask(peer.push(sparse, model["round"], base_version=model["version"]))
            assert ack.type == C.ACK and ack["status"] == "accepted"
            done = await peer.recv()
            assert done.type == C.DONE and done["version"] == 1
            await peer.send(peer.msg(C.LEAVE))
            summary = await run
        finally:
            peer.close()
            run.cancel()
        return summary, broker.store.weights, target

    summary, weights, target = fed.run_async(scenario())
    assert summary["version"] == 1
    for k in target:
        assert weights[k].tobytes() == target[k].tobytes()


@pytest.mark.timeout(60)
def test_a_duplicate_push_is_acknowledged_once(fed: Any, ctx: zmq.asyncio.Context, state_dir: Path) -> None:
    """At-least-once delivery: the same update twice is counted once. A sync round acknowledges updates once its
    checkpoint holds them: the ack answers the latest of the two pushes, as a duplicate."""

    async def scenario() -> tuple[Any, dict[str, np.ndarray]]:
        broker = fed.start_broker(ctx, config(fed, state_dir, rounds=1, sync=SyncConfig(1.0, 2, 20.0)))
        a, b = RawPeer(ctx, broker.endpoint), RawPeer(ctx, broker.endpoint)
        run = asyncio.ensure_future(broker.run())
        try:
            for name, peer in (("a", a), ("b", b)):
                welcome = await peer.ask(peer.msg(C.JOIN, worker=name, backend="numpy", num_examples=1))
                assert welcome.type == C.WELCOME
            await a.send(a.msg(C.PULL))
            await b.send(b.msg(C.PULL))
            model = await a.recv()
            await b.recv()
            await a.send(a.push({k: np.ones_like(v) for k, v in model.tensors.items()}, 1))
            again = a.push({k: np.ones_like(v) for k, v in model.tensors.items()}, 1)
            await a.send(again)
            with pytest.raises(AssertionError, match="no reply"):
                await a.recv(0.5)  # held until the round's checkpoint
            assert len(broker.updates) == 1
            assert (await b.ask(b.push({k: 3 * np.ones_like(v) for k, v in model.tensors.items()}, 1)))["status"] \
                == "accepted"
            ack = await a.recv()
            assert (ack.type, ack["status"], ack.re) == (C.ACK, "duplicate", a.ids), "one answer, to the resend"
            assert (await a.recv()).type == C.DONE
            assert (await b.recv()).type == C.DONE
            for peer in (a, b):
                await peer.send(peer.msg(C.LEAVE))
            summary = await run
        finally:
            a.close()
            b.close()
            run.cancel()
        return summary, broker.store.weights

    summary, weights = fed.run_async(scenario())
    assert summary["version"] == 1 and summary["rejected"] == {}
    assert all(np.all(w == 2.0) for w in weights.values())
