"""Secure aggregation over real ZeroMQ sockets (docs/protocol.md §7.4): the broker's model equals plain FedAvg of the
same updates up to the fixed-point step, workers that vanish at any stage leave the sum of the others, and nothing
the broker holds — what reaches the strategy, the journal, the checkpoints, the pending store, the messages it
received — is an individual update."""

from __future__ import annotations

import asyncio
import contextvars
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq.asyncio

from fedctl.broker.policy import SyncConfig
from fedctl.strategies import TaskConfig
from fedctl.wire import constants as C
from fedctl.worker.transport import Connection

pytestmark = pytest.mark.timeout(120)
DIE_BEFORE: contextvars.ContextVar[str | None] = contextvars.ContextVar("die_before", default=None)


class Died(Exception):
    """The worker vanished (its socket closed, as if its process were killed)."""


class Recorder:
    """Wraps a worker's trainer: every update it computed, by round order."""

    def __init__(self) -> None:
        self.fits: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]] = []

    def wrap(self, trainer: Any) -> Any:
        fit = trainer.fit

        def recording(weights: Any, *args: Any, **kwargs: Any) -> Any:
            result = fit(weights, *args, **kwargs)
            self.fits.append(({k: v.copy() for k, v in weights.items()}, dict(result.params), result.num_examples))
            return result

        trainer.fit = recording
        return trainer


@pytest.fixture
def mortal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Connection.request kills the worker (closes its socket, ends its task) before it sends the message type its
    task's DIE_BEFORE names."""
    original = Connection.request

    async def request(self: Connection, mtype: str, *args: Any, **kwargs: Any) -> Any:
        if DIE_BEFORE.get() == mtype:
            self.close()
            raise Died(mtype)
        return await original(self, mtype, *args, **kwargs)

    monkeypatch.setattr(Connection, "request", request)


def secure_config(fed: Any, state_dir: Path, workers: int, rounds: int = 2, **overrides: Any) -> Any:
    return fed.broker_config(state_dir, rounds=rounds, sync=SyncConfig(1.0, workers, 8.0),
                             task=TaskConfig(1, 20, 0.1), secure_aggregation=True, secagg_timeout_s=3.0,
                             heartbeat_interval_s=0.3, liveness_s=1.5, **overrides)


async def until_dead(worker: Any, stage: str) -> str:
    DIE_BEFORE.set(stage)
    try:
        await worker.serve()
    except Died as died:
        return str(died)
    raise AssertionError(f"{worker.config.worker_id} should have died before {stage}")


def test_secure_fedavg_equals_plain_fedavg(fed: Any, ctx: zmq.asyncio.Context, tmp_path: Path) -> None:
    finals = {}
    for secure in (False, True):
        state = tmp_path / ("secure" if secure else "plain")
        config = secure_config(fed, state, 4) if secure else fed.broker_config(
            state, rounds=2, sync=SyncConfig(1.0, 4, 8.0), task=TaskConfig(1, 20, 0.1))

        async def scenario(config: Any = config) -> Any:
            broker = fed.start_broker(ctx, config)
            workers = [fed.mlp_worker(ctx, broker.endpoint, i, n=100 + 40 * i) for i in range(4)]
            await fed.run_federation(broker, workers)
            return {k: v.copy() for k, v in broker.store.weights.items()}

        finals[secure] = fed.run_async(scenario())
    # Unequal example counts: the weighting by n_k / n_ref and Σ w_k is FedAvg's. Fixed point: 4 · c / L per value.
    step = 4 * 4.0 / (2**30 - 1)
    for name, plain in finals[False].items():
        np.testing.assert_allclose(finals[True][name], plain, atol=50 * step, rtol=0, err_msg=name)
    metrics = fed.read_metrics(tmp_path / "secure")
    assert [m["secagg"]["inputs"] for m in metrics] == [4, 4] and all(m["participants"] == 4 for m in metrics)


SENT: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar("sent", default=None)
GATE: contextvars.ContextVar[asyncio.Event | None] = contextvars.ContextVar("gate", default=None)


@pytest.fixture
def inputs_sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, Any]]:
    """Every sa_input sent, as (round, attempt, the update the sender's trainer computed last)."""
    sent: list[tuple[int, int, Any]] = []
    original = Connection.request

    async def request(self: Connection, mtype: str, *args: Any, **kwargs: Any) -> Any:
        if DIE_BEFORE.get() == mtype:
            self.close()
            raise Died(mtype)
        gate = GATE.get()
        if mtype == C.PULL and gate is not None:
            await gate.wait()  # every worker's first pull goes out together, so round 1 samples all of them
        recorder = SENT.get()
        if mtype == C.SA_INPUT and recorder is not None:
            sent.append((kwargs["round"], kwargs["attempt"], recorder[-1]))
        return await original(self, mtype, *args, **kwargs)

    monkeypatch.setattr(Connection, "request", request)
    return sent


async def attend(worker: Any, recorder: Recorder, die_before: str | None = None,
                 gate: asyncio.Event | None = None) -> str | None:
    """Run ``worker`` (its task's context names its recorder, the stage it dies before, if any, and the event its
    first pull waits for)."""
    SENT.set(recorder.fits)
    GATE.set(gate)
    DIE_BEFORE.set(die_before)
    try:
        await worker.serve()
    except Died as died:
        return str(died)
    assert die_before is None, f"{worker.config.worker_id} should have died before {die_before}"
    return None


def test_workers_lost_at_every_stage_leave_the_sum_of_the_rest(fed: Any, ctx: zmq.asyncio.Context, state_dir: Path,
                                                               inputs_sent: list[tuple[int, int, Any]]) -> None:
    """Eight workers; four vanish the first time they are sampled: one before its keys, one before its shares, one
    before its input (after training) and one before its reveal (after its input). Every round's model is the
    previous one plus the mean change of exactly the inputs sent in the attempt it applied."""
    stages = [C.SA_KEYS, C.SA_SHARES, C.SA_INPUT, C.SA_REVEAL]
    recorders = [Recorder() for _ in range(8)]
    config = secure_config(fed, state_dir, 4, rounds=3, keep_models=None, secagg_threshold=0.3)

    initial: dict[str, np.ndarray] = {}

    async def scenario() -> list[Any]:
        broker = fed.start_broker(ctx, config)
        initial.update({k: v.copy() for k, v in broker.store.weights.items()})
        workers = [fed.mlp_worker(ctx, broker.endpoint, i, n=150, wrap=recorders[i].wrap) for i in range(8)]
        gate = asyncio.Event()

        async def open_gate() -> None:
            while len(broker.core.registry) < 8:
                await asyncio.sleep(0.01)
            gate.set()

        runs = [attend(w, r, s, gate) for w, r, s in zip(workers, recorders, [*stages, None, None, None, None])]
        return await fed.run_federation(broker, [], extra=[open_gate(), *runs])

    results = fed.run_async(scenario(), timeout_s=110)
    assert results[2:] == [*stages, None, None, None, None]
    metrics = fed.read_metrics(state_dir)
    assert [m["round"] for m in metrics] == [1, 2, 3]
    from fedctl.broker.store import Checkpointer

    store = Checkpointer(state_dir)
    lost_before_input = {id(r.fits[0]) for r in recorders[2:3] if r.fits}
    for m in metrics:
        before = initial if m["version"] == 1 else store.load_version(m["version"] - 1)
        after = store.load_version(m["version"])
        summed = [fit for rnd, attempt, fit in inputs_sent if (rnd, attempt) == (m["round"], m["secagg"]["attempt"])]
        assert len(summed) == m["secagg"]["inputs"] == m["participants"] >= 4, m
        assert all(id(fit) not in lost_before_input for fit in summed)
        for name in before:
            change = np.mean([new[name] - base[name] for base, new, _ in summed], axis=0)
            np.testing.assert_allclose(after[name], before[name] + change, atol=2e-6, err_msg=f"{name}, {m}")
    assert metrics[0]["secagg"]["dropped"] == 3 and metrics[0]["secagg"]["inputs"] == 5, \
        "round 1 lost three workers before their shares, input and reveal — and summed the fourth's input"


def test_the_broker_never_holds_an_individual_update(fed: Any, ctx: zmq.asyncio.Context, state_dir: Path,
                                                     inputs_sent: list[tuple[int, int, Any]],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Instrument everything an update could reach at the broker during a secure run — the messages it decodes, what
    reaches the strategy, the pending store, the journal, every checkpoint — and compare with each worker's own
    update (recorded on the worker side)."""
    from fedctl.broker.durable import PendingStore
    from fedctl.broker.store import Checkpointer

    pending_writes: list[str] = []
    for method in ("save_round", "save_updates"):
        monkeypatch.setattr(PendingStore, method, lambda self, *a, _m=method, **k: pending_writes.append(_m))
    recorders = [Recorder() for _ in range(5)]
    config = secure_config(fed, state_dir, 5, rounds=3, keep_models=None)
    decoded: list[Any] = []
    aggregated: list[Any] = []

    async def scenario() -> None:
        broker = fed.start_broker(ctx, config)
        handle, aggregate = broker.core.dispatch, broker.core.strategy.aggregate

        def dispatch(identity: bytes, msg: Any, frames: Any, now: float) -> Any:
            decoded.append(msg)
            return handle(identity, msg, frames, now)

        def aggregate_spy(weights: Any, updates: Any, *args: Any) -> Any:
            aggregated.extend(updates)
            return aggregate(weights, updates, *args)

        broker.core.dispatch = dispatch
        broker.core.strategy.aggregate = aggregate_spy
        workers = [fed.mlp_worker(ctx, broker.endpoint, i, n=120, wrap=recorders[i].wrap) for i in range(5)]
        await fed.run_federation(broker, [], extra=[attend(w, r) for w, r in zip(workers, recorders)])

    fed.run_async(scenario(), timeout_s=90)
    individual = [(base, new) for r in recorders for base, new, _ in r.fits]
    assert len(individual) == 15 and len(inputs_sent) == 15

    def is_individual(tensors: Any, as_change: bool = False) -> bool:
        """Whether ``tensors`` is (or, for a change, equals) some worker's update, to within the field's step."""
        for base, new in individual:
            target = {k: new[k] - base[k] for k in new} if as_change else new
            if all(k in tensors and np.allclose(np.asarray(tensors[k], np.float64), target[k], atol=1e-5)
                   for k in target):
                return True
        return False

    # 1. What the strategy aggregated: one update per round, the secure aggregate, never a worker's.
    assert [u.worker for u in aggregated] == ["secure-aggregate"] * 3
    assert not any(is_individual(u.tensors) for u in aggregated)
    # 2. The messages: no push ever; each masked input uncorrelated with the update it hides.
    assert not [m for m in decoded if m.type in (C.PUSH, C.CHUNK)]
    masked = [m.tensors["masked"].astype(np.float64) for m in decoded if m.type == C.SA_INPUT]
    assert len(masked) == 15 and all(v.std() > 2**29 for v in masked), "uniform over Z_2^32"
    # No metric computed from a worker's data travels in the clear: its training loss is inside the sum.
    assert {k for m in decoded if m.type == C.SA_INPUT for k in m["metrics"]} == {"train_time_s", "clipped",
                                                                                  "secagg_s"}
    assert all(0 < line["train_loss"] < 3 for line in fed.read_metrics(state_dir)), "the loss, summed securely"
    # 3. The pending store: never written.  4. The journal: only the aggregate.  5. Checkpoints: the global models.
    assert pending_writes == []
    journal = [line for line in (state_dir / "journal.jsonl").read_text().splitlines() if line.strip()]
    assert journal and all('"secure-aggregate"' in line for line in journal)
    store = Checkpointer(state_dir)
    for version in (1, 2, 3):
        model = store.load_version(version)
        assert not is_individual(model)
