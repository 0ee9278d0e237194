"""An in-memory harness for the broker's sans-IO core: effects are carried out in lists and dicts, time is a fake
clock, workers are scripted peers that speak the wire protocol. No socket, no event loop, no file."""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedctl.broker import downlink
from fedctl.broker.config import BrokerConfig
from fedctl.broker.core import BrokerCore
from fedctl.broker.effects import (
    CloseTransfer,
    Credited,
    Effect,
    OpenTransfer,
    Persist,
    Send,
    StartModelTransfer,
    Wake,
    WriteChunk,
)
from fedctl.broker.params import ParameterStore
from fedctl.broker.policy import SyncConfig, make_policy
from fedctl.models import get_model, init_params
from fedctl.strategies import TaskConfig, Update, get_strategy
from fedctl.testing.clock import FakeClock
from fedctl.wire import chunks, decode, encode, make
from fedctl.wire import constants as C
from fedctl.wire.messages import Message


@dataclass
class Disk:
    """What a shell would have written: persisted pushes (in order) and spool files."""

    persisted: list[Persist] = field(default_factory=list)
    spools: dict[str, bytearray] = field(default_factory=dict)


class MemorySpool(Mapping[str, np.ndarray]):
    """A completed chunked push read back from an in-memory spool (as the shell's SpoolTensors reads a file)."""

    def __init__(self, data: bytearray, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.data, self.shapes = data, dict(shapes)
        self.offsets, _ = chunks.flat_offsets(self.shapes)

    def __getitem__(self, name: str) -> np.ndarray:
        start = self.offsets[name] * 4
        n = math.prod(self.shapes[name])
        return np.frombuffer(bytes(self.data[start:start + 4 * n]), "<f4").reshape(self.shapes[name])

    def __iter__(self) -> Any:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def config(**overrides: Any) -> BrokerConfig:
    options: dict[str, Any] = {"model": "mlp", "strategy": "fedavg", "rounds": 3, "seed": 7,
                               "task": TaskConfig(1, 10, 0.05), "sync": SyncConfig(1.0, 1, 20.0)}
    options.update(overrides)
    return BrokerConfig(**options)


class CoreSim:
    """A :class:`BrokerCore` and everything around it, in memory."""

    def __init__(self, cfg: BrokerConfig | None = None, *, durable: bool = True, disk: Disk | None = None,
                 store: ParameterStore | None = None, state: dict[str, Any] | None = None,
                 clock: FakeClock | None = None) -> None:
        self.cfg = cfg or config()
        self.clock = clock or FakeClock()
        self.disk = disk or Disk()
        spec = get_model(self.cfg.model)
        self.store = store or ParameterStore(init_params(spec, self.cfg.seed))
        self.state = state or {"run_id": secrets.token_hex(4), "round": 0, "strategy_state": {}}
        policy = make_policy(self.cfg.policy, self.cfg.sync, self.cfg.clock, self.state)
        self.core = BrokerCore(self.cfg, spec, get_strategy(self.cfg.strategy, self.cfg.task), policy, self.store,
                               self.state, open_spool=self._open_spool, durable=durable)
        self.outbox: dict[bytes, list[Message]] = {}
        self.sent_bytes: dict[bytes, list[int]] = {}
        """The size of every message sent to each peer, encoded."""
        self.unreachable: set[bytes] = set()
        self.wakes = 0
        self.transfers: list[StartModelTransfer] = []
        self.credited: list[Credited] = []

    def _open_spool(self, name: str, owned: bool) -> Mapping[str, np.ndarray]:
        return MemorySpool(self.disk.spools[name], self.core.shapes)

    # -- carrying out effects ----------------------------------------------------------------------------------
    def run(self, effects: list[Effect]) -> None:
        for e in effects:
            if isinstance(e, Send):
                if e.identity in self.unreachable:
                    if e.worker is not None:
                        self.run(self.core.unreachable(e.worker, self.clock()))
                    continue
                msg = decode(e.frames, C.BROKER_TO_WORKER)
                assert msg.type == e.type
                self.outbox.setdefault(e.identity, []).append(msg)
                self.sent_bytes.setdefault(e.identity, []).append(sum(map(len, e.frames)))
            elif isinstance(e, Persist):
                self.disk.persisted.append(e)
                self.run(list(e.then))
            elif isinstance(e, OpenTransfer):
                self.disk.spools[e.name] = bytearray(e.nbytes)
            elif isinstance(e, WriteChunk):
                for at, values in e.pieces:
                    raw = values.astype("<f4").tobytes()
                    self.disk.spools[e.name][at:at + len(raw)] = raw
            elif isinstance(e, CloseTransfer):
                if e.delete:
                    del self.disk.spools[e.name]
            elif isinstance(e, StartModelTransfer):
                self.transfers.append(e)
            elif isinstance(e, Wake):
                self.wakes += 1
            elif isinstance(e, Credited):
                self.credited.append(e)
            else:  # pragma: no cover - a new effect type must be handled here
                raise AssertionError(f"unknown effect {e!r}")

    def feed(self, identity: bytes, frames: list[bytes]) -> list[Message]:
        """Hand the core one message; returns what it sent back to that peer."""
        before = len(self.outbox.get(identity, []))
        self.run(self.core.handle(identity, frames, self.clock()))
        return self.outbox.get(identity, [])[before:]

    def tick(self, seconds: float = 0.0) -> None:
        self.clock.advance(seconds)
        self.run(self.core.tick(self.clock()))

    # -- what a driver does ------------------------------------------------------------------------------------
    def hand_out(self, number: int, workers: list[str] | None = None) -> None:
        records = [r for r in self.core.registry.waiting() if workers is None or r.worker in workers]
        jobs = [(r, number) for r in records]
        self.run(self.core.hand_out(jobs, downlink.build(self.core, records),
                                    self.clock()))

    def open_evaluation(self, number: int) -> list[str]:
        """What the round driver does for a federated evaluation: sample the waiting workers, answer their pulls
        with ``evaluate``; returns who was asked."""
        waiting = {r.worker: r for r in self.core.registry.waiting()}
        sample = self.core.evaluations.sample(list(waiting), len(self.core.registry), self.core.rng)
        records = [waiting[w] for w in sample]
        self.run(self.core.open_evaluation(number, records, downlink.build(self.core, records),
                                           self.clock()))
        return sample

    def aggregate_round(self) -> list[Update]:
        """What the round driver does with a closed round: aggregate, checkpoint (here: nothing to write), then
        send the acks the core held until the checkpoint."""
        updates = sorted(self.core.take_updates(), key=lambda u: u.worker)
        result = self.core.strategy.aggregate(self.store.weights, updates, self.state["strategy_state"],
                                              self.core.rng)
        self.core.finish_apply(result.weights, len(updates))
        self.state["round"] += 1
        self.state["strategy_state"] = result.state
        self.run(self.core.release_acks(self.state["round"]))
        return updates


class Peer:
    """A scripted worker: builds protocol messages and reads the broker's replies."""

    def __init__(self, sim: CoreSim, name: str, num_examples: int = 100) -> None:
        self.sim, self.name, self.num_examples = sim, name, num_examples
        self.identity = b"\x00" + name.encode()
        self.ids = 0

    def _next(self) -> int:
        self.ids += 1
        return self.ids

    def send(self, mtype: str, tensors: Mapping[str, Any] | None = None, slices: Any = None,
             **fields: Any) -> list[Message]:
        return self.sim.feed(self.identity, encode(make(mtype, self._next(), tensors=tensors, slices=slices,
                                                        **fields)))

    def join(self) -> list[Message]:
        return self.send(C.JOIN, worker=self.name, backend="numpy", num_examples=self.num_examples)

    def pull(self, version: int | None = None, link_bps: int | None = None) -> list[Message]:
        return self.send(C.PULL, version=version, link_bps=link_bps)

    def push(self, tensors: Mapping[str, Any], round_no: int, base: int = 0, kind: str = C.KIND_WEIGHTS,
             seq: int = 1, **fields: Any) -> list[Message]:
        return self.send(C.PUSH, tensors=tensors, round=round_no, base_version=base, seq=seq, kind=kind,
                         num_examples=self.num_examples, **fields)

    def evaluation(self, version: int, num_examples: int, **metrics: float) -> list[Message]:
        return self.send(C.EVALUATION, version=version, num_examples=num_examples, metrics=metrics)

    def inbox(self) -> list[Message]:
        return self.sim.outbox.get(self.identity, [])

    def last(self) -> Message:
        return self.inbox()[-1]
