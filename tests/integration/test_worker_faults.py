"""Worker faults over real sockets: a worker dies mid-training; no broker at the address; a refused join."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.asyncio

from fedctl.broker.policy import SyncConfig
from fedctl.errors import RemoteError, TransportError
from fedctl.testing.trainers import NumpyMLPTrainer
from fedctl.wire import constants as C
from fedctl.wire import encode, make
from fedctl.wire.constants import ErrorCode
from fedctl.worker.client import Worker, WorkerConfig

ROUND_TIMEOUT_S = 3.0


@dataclass
class StallingTrainer:
    """Signals ``started`` when training begins, then stalls until ``release`` (the kill happens meanwhile)."""

    inner: NumpyMLPTrainer
    started: threading.Event
    release: threading.Event
    backend: str = "numpy"

    def fit(self, weights: Any, epochs: int, batch_size: int, lr: float, seed: int) -> Any:
        self.started.set()
        self.release.wait(20)
        return self.inner.fit(weights, epochs, batch_size, lr, seed)

    def gradient(self, weights: Any, batch_size: int, seed: int) -> Any:
        return self.inner.gradient(weights, batch_size, seed)

    def evaluate(self, weights: Any, batch_size: int = 1000) -> Any:
        return self.inner.evaluate(weights)


@pytest.mark.timeout(60)
def test_a_worker_killed_mid_round_does_not_stop_the_run(fed: Any, ctx: zmq.asyncio.Context, state_dir: Path) -> None:
    started, release = threading.Event(), threading.Event()

    async def scenario() -> tuple[dict[str, Any], list[dict[str, Any]], float]:
        config = fed.broker_config(state_dir, rounds=3, sync=SyncConfig(1.0, 2, ROUND_TIMEOUT_S),
                               heartbeat_interval_s=0.2, liveness_s=2.0)
        broker = fed.start_broker(ctx, config)
        honest = [fed.mlp_worker(ctx, broker.endpoint, i) for i in range(2)]
        doomed = fed.mlp_worker(ctx, broker.endpoint, 2, wrap=lambda t: StallingTrainer(t, started, release))
        run = asyncio.ensure_future(broker.run())
        serving = [asyncio.ensure_future(w.serve()) for w in honest]
        victim = asyncio.ensure_future(doomed.serve())
        try:
            await asyncio.to_thread(started.wait, 20)
            assert started.is_set(), "the doomed worker was never sampled"
            killed_at = time.monotonic()
            victim.cancel()  # the process dies mid-training: no push, no leave, no more heartbeats
            with pytest.raises(asyncio.CancelledError):
                await victim
            assert doomed.conn is None, "a killed worker's socket is closed"
            summary = await run
            results = list(await asyncio.gather(*serving))
            return summary, results, time.monotonic() - killed_at
        finally:
            release.set()
            for task in (run, victim, *serving):
                task.cancel()

    summary, results, after_kill_s = fed.run_async(scenario())
    assert summary["rounds"] == 3 and summary["version"] == 3
    assert all(r["final_round"] == 3 for r in results)
    metrics = fed.read_metrics(state_dir)
    assert [m["round"] for m in metrics] == [1, 2, 3]
    hit = [m for m in metrics if m["selected"] == 3]
    assert len(hit) == 1, "exactly one round had the doomed worker sampled"
    assert hit[0]["participants"] == 2, "that round closed on the quorum of the two survivors"
    assert hit[0]["duration_s"] <= ROUND_TIMEOUT_S + 1.0
    assert all(m["participants"] == 2 for m in metrics)
    assert after_kill_s < 3 * ROUND_TIMEOUT_S


def free_tcp_endpoint() -> str:
    """An address nothing listens on: bind to an OS-chosen port, note it, release it."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind("tcp://127.0.0.1:*")
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    sock.close(0)
    ctx.term()
    return endpoint


@pytest.mark.timeout(30)
def test_join_without_a_broker_raises_transport_error_in_time(fed: Any, ctx: zmq.asyncio.Context) -> None:
    endpoint = free_tcp_endpoint()
    timeout_s = 0.6
    worker = Worker(WorkerConfig(endpoint, "w0", "numpy", 10, connect_timeout_s=timeout_s),
                    lambda spec: None, ctx=ctx)  # type: ignore[arg-type,return-value]

    async def scenario() -> float:
        t0 = time.monotonic()
        with pytest.raises(TransportError) as e:
            await worker.serve()
        assert endpoint in str(e.value)
        assert e.value.fix
        return time.monotonic() - t0

    elapsed = fed.run_async(scenario())
    assert elapsed < timeout_s + 0.4, f"join gave up after {elapsed:.2f} s, the limit is {timeout_s} s"
    assert worker.conn is None


@pytest.mark.timeout(30)
def test_join_without_a_broker_gives_up_after_several_attempts(fed: Any, ctx: zmq.asyncio.Context) -> None:
    endpoint = free_tcp_endpoint()
    worker = Worker(WorkerConfig(endpoint, "w0", "numpy", 10, connect_timeout_s=1.5, max_backoff_s=0.5),
                    lambda spec: None, ctx=ctx)  # type: ignore[arg-type,return-value]

    async def scenario() -> float:
        t0 = time.monotonic()
        with pytest.raises(TransportError):
            await worker.serve()
        return time.monotonic() - t0

    elapsed = fed.run_async(scenario())
    assert 1.4 <= elapsed < 2.0


@pytest.mark.timeout(30)
def test_a_refused_join_raises_remote_error_and_closes_the_socket(fed: Any, ctx: zmq.asyncio.Context,
                                                                   state_dir: Path) -> None:
    async def scenario() -> None:
        broker = fed.start_broker(ctx, fed.broker_config(state_dir, rounds=1))
        run = asyncio.ensure_future(broker.run())
        worker = fed.mlp_worker(ctx, broker.endpoint, 0, model="lenet5", connect_timeout_s=5.0)
        try:
            with pytest.raises(RemoteError) as e:
                await worker.serve()
            assert e.value.code == ErrorCode.MODEL_MISMATCH and "lenet5" in str(e.value)
            assert worker.conn is None
            assert broker.rejected == {"MODEL_MISMATCH": 1}
        finally:
            run.cancel()
            with pytest.raises(asyncio.CancelledError):
                await run

    fed.run_async(scenario())


def test_a_diverged_update_is_reported_as_a_failed_training_not_pushed(fed: Any, ctx: zmq.asyncio.Context,
                                                                       state_dir: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Training that produced NaN (too high a learning rate, or DP noise) is a failed round for that worker: it
    reports `failed` and the round goes on with the others; nothing non-finite reaches the broker."""
    def diverge(trainer: Any) -> Any:
        fit = trainer.fit

        calls = []

        def nan_fit(*args: Any, **kwargs: Any) -> Any:
            result = fit(*args, **kwargs)
            calls.append(1)
            if len(calls) == 1:  # its first training diverges
                result.params["fc1.weight"][0, 0] = np.nan
            return result

        trainer.fit = nan_fit
        return trainer

    async def scenario() -> Any:
        broker = fed.start_broker(ctx, fed.broker_config(state_dir, rounds=2, sync=SyncConfig(1.0, 2, 20.0)))
        workers = [fed.mlp_worker(ctx, broker.endpoint, 0), fed.mlp_worker(ctx, broker.endpoint, 1, wrap=diverge)]
        summary, *_ = await fed.run_federation(broker, workers)
        return summary

    with caplog.at_level("WARNING"):
        summary = fed.run_async(scenario())
    assert summary["rejected"] == {}, "nothing non-finite was pushed"
    assert "training diverged: the update's fc1.weight holds NaN" in caplog.text
    assert [m["participants"] for m in fed.read_metrics(state_dir)] == [2, 2]  # round 1 retried without the NaN


@pytest.mark.timeout(60)
def test_a_finished_worker_sends_no_heartbeat_after_its_leave(fed: Any, ctx: zmq.asyncio.Context,
                                                            state_dir: Path) -> None:
    """At the end of a run a worker stops its heartbeat before it leaves: with heartbeats every 5 ms, one sent in
    the moment after the leave would reach the broker, which lingers while another member (a bare DEALER that
    joined and never leaves) stays, and be refused as NOT_JOINED."""

    async def scenario() -> tuple[dict[str, Any], dict[str, int]]:
        config = fed.broker_config(state_dir, rounds=2, sync=SyncConfig(1.0, 2, ROUND_TIMEOUT_S),
                                   heartbeat_interval_s=0.005, liveness_s=2.0, done_linger_s=1.0)
        broker = fed.start_broker(ctx, config)
        stayer = ctx.socket(zmq.DEALER)
        stayer.linger = 0
        stayer.connect(broker.endpoint)
        workers = [fed.mlp_worker(ctx, broker.endpoint, i) for i in range(2)]
        run = asyncio.ensure_future(broker.run())
        serving = [asyncio.ensure_future(w.serve()) for w in workers]
        try:
            await stayer.send_multipart(encode(make(C.JOIN, 1, worker="stayer", backend="probe", num_examples=1)))
            await asyncio.gather(*serving)
            summary = await run
            return summary, dict(broker.core.rejected)
        finally:
            stayer.close(0)
            for task in (run, *serving):
                task.cancel()

    summary, rejected = fed.run_async(scenario())
    assert summary["rounds"] == 2
    assert rejected == {}, rejected
