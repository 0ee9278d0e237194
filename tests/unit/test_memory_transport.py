"""The broker's real asyncio shell over fedctl.testing's in-memory transport: a whole run, no socket."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from fedctl.broker.config import BrokerConfig
from fedctl.broker.policy import SyncConfig
from fedctl.broker.service import Broker
from fedctl.strategies import TaskConfig
from fedctl.testing.clock import FakeClock
from fedctl.testing.memory import MemoryDealer, MemoryRouter
from fedctl.wire import constants as C
from fedctl.wire import decode, encode, make


async def worker(peer: MemoryDealer, name: str, shift: float) -> int:
    """Join, then answer every model with (model + shift) until done; returns the rounds trained."""
    ids = iter(range(1, 10_000))
    peer.send(encode(make(C.JOIN, next(ids), worker=name, backend="numpy", num_examples=10)))
    assert decode(await peer.recv(), C.BROKER_TO_WORKER).type == C.WELCOME
    rounds = 0
    while True:
        peer.send(encode(make(C.PULL, next(ids))))
        msg = decode(await peer.recv(), C.BROKER_TO_WORKER)
        if msg.type == C.DONE:
            peer.send(encode(make(C.LEAVE, next(ids), reason="done")))
            return rounds
        assert msg.type == C.MODEL, msg
        update = {k: np.asarray(v, np.float32) + np.float32(shift) for k, v in msg.tensors.items()}
        peer.send(encode(make(C.PUSH, next(ids), tensors=update, round=msg["round"], base_version=msg["version"],
                              seq=rounds, kind=C.KIND_WEIGHTS, num_examples=10)))
        ack = decode(await peer.recv(), C.BROKER_TO_WORKER)
        assert ack.type == C.ACK and ack["status"] == "accepted", ack
        rounds += 1


def test_a_broker_runs_a_federation_over_the_in_memory_transport(tmp_path: Path) -> None:
    config = BrokerConfig(bind="inproc://unused", model="mlp", rounds=3, task=TaskConfig(1, 10, 0.05),
                          sync=SyncConfig(1.0, 2, 10.0), state_dir=tmp_path / "state", history_mb=0,
                          done_linger_s=2.0)

    async def main() -> tuple[dict, list[int], Broker, dict[str, np.ndarray]]:
        router = MemoryRouter()
        broker = Broker(config, transport=router)
        start = {k: v.copy() for k, v in broker.store.weights.items()}
        run = asyncio.ensure_future(broker.run())
        rounds = await asyncio.gather(worker(router.connect(), "a", 1.0), worker(router.connect(), "b", 3.0))
        return await run, list(rounds), broker, start

    summary, rounds, broker, start = asyncio.run(asyncio.wait_for(main(), 30))
    assert summary["rounds"] == 3 and rounds == [3, 3] and summary["rejected"] == {}
    for k, v in start.items():  # each round moves every weight by the mean shift, 2
        np.testing.assert_allclose(broker.store.weights[k], v + 6.0, atol=1e-4)
    assert broker.transport.counters.messages_in > 0 and (tmp_path / "state" / "state.json").is_file()


def test_fake_clock_moves_only_forward() -> None:
    clock = FakeClock(5.0)
    assert clock() == 5.0 and clock.advance(1.5) == 6.5 and clock() == 6.5
    try:
        clock.advance(-1)
    except ValueError:
        return
    raise AssertionError("a fake monotonic clock went back")
