"""SCAFFOLD and FedProx through the real broker and workers over ZeroMQ, with PyTorch workers on the bundled MNIST
sample: SCAFFOLD trains; its model messages carry c and its pushes Δc, so a round moves twice FedAvg's bytes each
way; a worker restarted with its --state-dir keeps c_i and a broker resumed from its checkpoint keeps c (both used
in the next round); a malformed push is refused and changes nothing. FedProx trains under sync rounds and under
async."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.asyncio

from fedctl.broker.policy import ClockConfig, SyncConfig
from fedctl.broker.store import STATE_ARRAY_PREFIX, Checkpointer
from fedctl.data.datasets import get_dataset, load_dataset
from fedctl.data.shards import normalize
from fedctl.models import get_model, init_params
from fedctl.strategies import TaskConfig
from fedctl.strategies.base import ROUND_WORKERS
from fedctl.wire import constants as C
from fedctl.wire import decode, encode, make
from fedctl.wire.constants import ErrorCode
from fedctl.worker.client import Worker, WorkerConfig
from fedctl.worker.state import WorkerState

torch = pytest.importorskip("torch")
from fedctl.worker.frameworks import create_trainer  # noqa: E402

MLP = [p.name for p in get_model("mlp").params]
MODEL_BYTES = get_model("mlp").nbytes
TASK = TaskConfig(1, 20, 0.05)
Shards = list[tuple[np.ndarray, np.ndarray]]


@pytest.fixture(scope="module")
def mnist() -> tuple[Shards, tuple[np.ndarray, np.ndarray]]:
    """Three shards of 600 training images of the bundled sample, each mostly four or so digits (sorted by label:
    the drift SCAFFOLD corrects), and 1,000 test images."""
    spec = get_dataset("mnist-sample")
    images, labels = load_dataset("mnist-sample", "train")
    order = np.argsort(labels[:1800], kind="stable")
    x, y = normalize(images[:1800][order], spec.mean, spec.std), labels[:1800][order].astype(np.int64)
    shards = [(x[i * 600:(i + 1) * 600], y[i * 600:(i + 1) * 600]) for i in range(3)]
    test_images, test_labels = load_dataset("mnist-sample", "test")
    return shards, (normalize(test_images[:1000], spec.mean, spec.std), test_labels[:1000].astype(np.int64))


@pytest.fixture(scope="module")
def mnist_iid(mnist: tuple[Shards, Any]) -> tuple[Shards, Any]:
    """The same 1,800 images dealt at random: under async every version comes from one worker's shard, and with the
    sorted shards a version's accuracy depends on which worker's push it is (timing under load), not on FedProx."""
    shards, test = mnist
    x, y = np.concatenate([s[0] for s in shards]), np.concatenate([s[1] for s in shards])
    order = np.random.default_rng(0).permutation(len(y))
    return [(x[order[i::3]], y[order[i::3]]) for i in range(3)], test


class Recorder:
    """A real trainer that remembers the gradient offsets it was given (SCAFFOLD's c − c_i)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer, self.offsets = trainer, []

    def fit(self, *args: Any, **kwargs: Any) -> Any:
        self.offsets.append({k: np.array(v) for k, v in (kwargs.get("grad_offset") or {}).items()})
        return self.trainer.fit(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.trainer, name)


def torch_worker(ctx: zmq.asyncio.Context, endpoint: str, shards: Shards, i: int, seen: dict[str, Recorder] | None,
                 **config: Any) -> Worker:
    x, y = shards[i]

    def make(spec: Any) -> Any:
        trainer = create_trainer("torch", spec, x, y, threads=1)
        if seen is None:
            return trainer
        seen[f"w{i}"] = Recorder(trainer)
        return seen[f"w{i}"]

    return Worker(WorkerConfig(endpoint, f"w{i}", "torch", len(y), compress="never", **config), make, ctx=ctx)


def run(fed: Any, ctx: zmq.asyncio.Context, mnist: Any, state_dir: Path, strategy: str, rounds: int,
        worker_dirs: list[Path] | None = None, seen: dict[str, Recorder] | None = None, before: Any = None,
        **overrides: Any) -> tuple[dict[str, Any], Any, list[Worker]]:
    shards, (test_x, test_y) = mnist

    async def scenario() -> tuple[dict[str, Any], Any, list[Worker]]:
        evaluate = create_trainer("torch", get_model("mlp"), test_x, test_y, threads=1).evaluate
        config = fed.broker_config(state_dir, **{"strategy": strategy, "rounds": rounds, "task": TASK,
                                                 "compress": "never", **overrides})
        broker = fed.start_broker(ctx, config, evaluator=evaluate)
        if before is not None:
            before(broker)
        crew = [torch_worker(ctx, broker.endpoint, shards, i, seen,
                             state_dir=None if worker_dirs is None else worker_dirs[i]) for i in range(3)]
        summary, *_ = await fed.run_federation(broker, crew)
        return summary, broker, crew

    return fed.run_async(scenario(), timeout_s=110)


def initial_accuracy(mnist: Any) -> float:
    _, (test_x, test_y) = mnist
    return create_trainer("torch", get_model("mlp"), test_x, test_y, threads=1).evaluate(init_params(get_model("mlp"),
                                                                                                     7))["accuracy"]


@pytest.mark.timeout(240)
def test_scaffold_trains_moves_twice_fedavgs_bytes_and_keeps_c_and_c_i_across_restarts(
        fed: Any, ctx: zmq.asyncio.Context, mnist: Any, tmp_path: Path) -> None:
    state_dir, avg_dir = tmp_path / "scaffold", tmp_path / "fedavg"
    worker_dirs = [tmp_path / f"w{i}" for i in range(3)]
    for d in (state_dir, avg_dir):
        d.mkdir()
    summary, broker, _ = run(fed, ctx, mnist, state_dir, "scaffold", rounds=2, worker_dirs=worker_dirs)
    assert summary["rounds"] == 2 and summary["rejected"] == {}
    run(fed, ctx, mnist, avg_dir, "fedavg", rounds=2)
    scaffold, fedavg = fed.read_metrics(state_dir), fed.read_metrics(avg_dir)
    for s, a in zip(scaffold, fedavg):
        assert s["participants"] == a["participants"] == 3
        # Δy and Δc up, x and c down: each message twice FedAvg's (headers and the task map aside)
        assert s["update_bytes_in"] == pytest.approx(2 * a["update_bytes_in"], rel=0.01)
        assert s["model_bytes_out"] == pytest.approx(2 * a["model_bytes_out"], rel=0.01)
        assert a["update_bytes_in"] == pytest.approx(3 * MODEL_BYTES, rel=0.01)
        assert s["strategy"]["workers"] == 3 and s["strategy"]["c_norm"] > 0
    start = initial_accuracy(mnist)  # (0.08)
    assert start < 0.2 < scaffold[0]["test_accuracy"] < scaffold[1]["test_accuracy"]
    assert scaffold[1]["test_accuracy"] > start + 0.3  # (0.57 here; FedAvg 0.46 on these label-sorted shards)

    # The checkpoint holds c (float32, one per tensor); each worker's state dir holds its c_i.
    _, saved = Checkpointer(state_dir).load()
    c = {k.removeprefix("c/"): v for k, v in saved["strategy_state"].items() if k.startswith("c/")}
    assert sorted(c) == sorted(MLP) and ROUND_WORKERS not in saved["strategy_state"]
    with np.load(state_dir / f"model-{saved['version']}.npz") as npz:
        assert {f"{STATE_ARRAY_PREFIX}c/{k}" for k in MLP} <= set(npz.files)
    states = [WorkerState.load(d) for d in worker_dirs]
    for s in states:
        assert s.seq == 2 and s.run_id == saved["run_id"]
        assert sorted(s.strategy) == sorted(f"scaffold.ci/{k}" for k in MLP)
        assert any(np.any(v) for v in s.strategy.values())

    # Restart the broker (resuming) and the workers (same state dirs): round 3 trains on c − c_i from both.
    seen: dict[str, Recorder] = {}
    handed: list[dict[str, Any]] = []

    def spy(resumed: Any) -> None:
        assert resumed.state["round"] == 2
        aggregate = resumed.core.strategy.aggregate

        def record(weights: Any, updates: Any, state: Any, rng: Any) -> Any:
            handed.append(dict(state))
            return aggregate(weights, updates, state, rng)

        resumed.core.strategy.aggregate = record

    summary, _, crew = run(fed, ctx, mnist, state_dir, "scaffold", rounds=3, worker_dirs=worker_dirs, seen=seen,
                           before=spy)
    assert summary["rounds"] == 3 and summary["rejected"] == {}
    for i, s in enumerate(states):
        [offset] = seen[f"w{i}"].offsets
        for k in MLP:  # the offset of round 3 is c (the broker's, resumed) − c_i (the worker's, restarted)
            np.testing.assert_allclose(offset[k], c[k] - s.strategy[f"scaffold.ci/{k}"], rtol=0, atol=1e-7)
        assert crew[i].rounds_trained == 1 and WorkerState.load(worker_dirs[i]).seq == 3
    [state] = handed
    assert state[ROUND_WORKERS] == 3
    assert all(state[f"c/{k}"].tobytes() == c[k].tobytes() for k in MLP), "round 3 updated the saved c"
    assert [m["round"] for m in fed.read_metrics(state_dir)] == [1, 2, 3]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("policy", ["sync", "async"])
def test_fedprox_trains_under_sync_and_async(fed: Any, ctx: zmq.asyncio.Context, mnist: Any, mnist_iid: Any,
                                             state_dir: Path, policy: str) -> None:
    overrides: dict[str, Any] = {"task": TaskConfig(1, 20, 0.05, options={"mu": "0.1"}), "policy": policy}
    if policy == "async":
        overrides.update(clock=ClockConfig(), sync=SyncConfig(1.0, 1, 20.0))
    rounds = 3 if policy == "sync" else 6
    data = mnist if policy == "sync" else mnist_iid
    summary, broker, _ = run(fed, ctx, data, state_dir, "fedprox", rounds=rounds, **overrides)
    assert summary["rejected"] == {} and broker.store.version == rounds
    metrics = fed.read_metrics(state_dir)
    assert len(metrics) == rounds and all(m["participants"] >= 1 for m in metrics)
    accuracy = [m["test_accuracy"] for m in metrics]
    # sync (sorted shards): 0.30, 0.47, 0.58; async (random shards, one version per arrival): 0.35 … 0.70 to 0.75
    assert max(accuracy) > initial_accuracy(mnist) + 0.3
    if policy == "sync":  # (under async a push may land in the byte window of another version)
        assert accuracy == sorted(accuracy)
        assert all(m["update_bytes_in"] == pytest.approx(3 * MODEL_BYTES, rel=0.01) for m in metrics), "FedAvg's"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("strategy", ["scaffold", "fedavg"])
def test_a_malformed_push_over_a_socket_is_refused_and_changes_nothing(fed: Any, ctx: zmq.asyncio.Context,
                                                                       state_dir: Path, strategy: str) -> None:
    """A raw DEALER: the model message (with c under SCAFFOLD), a push whose Δc has the wrong shape (SCAFFOLD) or
    that carries Δc at all (FedAvg) refused MODEL_MISMATCH, then the right push is taken and applied."""
    async def scenario() -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, np.ndarray], Any]:
        broker = fed.start_broker(ctx, fed.broker_config(state_dir, strategy=strategy, rounds=1,
                                                         sync=SyncConfig(1.0, 1, 20.0)))
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(broker.endpoint)
        ids = iter(range(1, 100))

        async def ask(mtype: str, tensors: Any = None, **fields: Any) -> Any:
            await sock.send_multipart(encode(make(mtype, next(ids), tensors=tensors, **fields)))
            assert await sock.poll(5000), f"no answer to {mtype}"
            return decode(await sock.recv_multipart(), C.BROKER_TO_WORKER)

        run = asyncio.ensure_future(broker.run())
        try:
            assert (await ask(C.JOIN, worker="p", backend="numpy", num_examples=10)).type == C.WELCOME
            model = await ask(C.PULL)
            x = {k: model.tensors[k].copy() for k in MLP}
            kind = "delta" if strategy == "scaffold" else "weights"
            update = {k: np.full_like(v, 0.125) for k, v in x.items()} if kind == "delta" else x
            dc = {f"scaffold.dc/{k}": np.full_like(v, 0.5) for k, v in x.items()}
            bad = {**dc, "scaffold.dc/fc3.bias": np.zeros(11, np.float32)} if kind == "delta" else dc
            push = {"round": 1, "base_version": 0, "seq": 0, "kind": kind, "num_examples": 10}
            refused = await ask(C.PUSH, {**update, **bad}, **push)
            assert (refused.type, refused["code"]) == (C.ERROR, ErrorCode.MODEL_MISMATCH), refused.fields
            assert broker.policy.current is not None and broker.policy.current.received == []
            ack = await ask(C.PUSH, {**update, **(dc if kind == "delta" else {})}, **push)
            assert (ack.type, ack["status"]) == (C.ACK, "accepted")
            await sock.send_multipart(encode(make(C.LEAVE, next(ids))))
            summary = await run
        finally:
            sock.close(0)
            run.cancel()
        return summary, model.tensors, x, broker

    summary, tensors, x, broker = fed.run_async(scenario())
    assert summary["version"] == 1 and summary["rejected"] == {"MODEL_MISMATCH": 1}
    if strategy == "scaffold":
        assert {f"scaffold.c/{k}" for k in MLP} <= set(tensors) and not any(
            np.any(tensors[f"scaffold.c/{k}"]) for k in MLP), "round 1's model carries c = 0"
        for k in MLP:  # x + η_g·Δy and c + Δc/N with one worker, N = 1
            np.testing.assert_allclose(broker.store.weights[k], x[k] + 0.125, rtol=1e-6)
            np.testing.assert_array_equal(broker.state["strategy_state"][f"c/{k}"], np.full_like(x[k], 0.5))
    else:
        assert set(tensors) == set(MLP)
        assert all(np.array_equal(broker.store.weights[k], x[k]) for k in MLP)
