"""Shared fixtures: a zmq.asyncio context that fails the test on leaked sockets, state dirs, in-process runs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import zmq
import zmq.asyncio

from fedctl.broker.config import BrokerConfig
from fedctl.broker.policy import SyncConfig
from fedctl.broker.service import Broker
from fedctl.models import get_model
from fedctl.strategies import TaskConfig
from fedctl.testing.trainers import NumpyMLPTrainer, synthetic_digits
from fedctl.worker.client import Worker, WorkerConfig

T = TypeVar("T")
LOCAL = "tcp://127.0.0.1:*"


def run_async(coro: Coroutine[Any, Any, T], timeout_s: float = 50.0) -> T:
    """Run ``coro`` in a fresh event loop with a hard timeout (no pytest-asyncio here)."""

    async def bounded() -> T:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that races the result
        async with asyncio.timeout(timeout_s):
            return await coro

    return asyncio.run(bounded())


@pytest.fixture
def ctx() -> Any:
    """A private zmq.asyncio context; the test fails if it leaves a socket open. Destroyed with linger 0."""
    context = zmq.asyncio.Context()
    yield context
    leaked = [s for s in list(getattr(context, "_sockets", ())) if not s.closed]
    kinds = [zmq.SocketType(s.type).name for s in leaked]
    context.destroy(linger=0)
    if leaked:
        pytest.fail(f"test leaked {len(leaked)} open ZeroMQ socket(s): {kinds}")


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir()
    return d


def broker_config(state_dir: Path, **overrides: Any) -> BrokerConfig:
    """A fast BrokerConfig for in-process runs on a loopback port chosen by the OS."""
    sync = overrides.pop("sync", SyncConfig(1.0, 3, 20.0))
    options: dict[str, Any] = {"bind": LOCAL, "model": "mlp", "strategy": "fedavg", "rounds": 3,
                                   "task": TaskConfig(1, 10, 0.05), "sync": sync, "seed": 7, "state_dir": state_dir,
                                   "heartbeat_interval_s": 0.5, "liveness_s": 5.0, "done_linger_s": 0.5}
    options.update(overrides)
    return BrokerConfig(**options)


def evaluator() -> Callable[[dict[str, np.ndarray]], dict[str, float]]:
    x, y = synthetic_digits(300, seed=99)
    return NumpyMLPTrainer(get_model("mlp"), x, y).evaluate


def start_broker(ctx: zmq.asyncio.Context, config: BrokerConfig, **kwargs: Any) -> Broker:
    """A Broker in this process on ``ctx``; its bound address is ``broker.endpoint``. Call inside a loop."""
    return Broker(config, evaluator=kwargs.pop("evaluator", evaluator()), ctx=ctx, **kwargs)


def mlp_worker(ctx: zmq.asyncio.Context, endpoint: str, index: int, n: int = 200,
               wrap: Callable[[NumpyMLPTrainer], Any] | None = None, **config: Any) -> Worker:
    """A Worker training the numpy MLP on its own slice of synthetic digits (seed = index)."""
    x, y = synthetic_digits(n, seed=index)

    def make(spec: Any) -> Any:
        trainer = NumpyMLPTrainer(spec, x, y)
        return wrap(trainer) if wrap else trainer

    return Worker(WorkerConfig(endpoint, f"w{index}", "numpy", len(y), **config), make, ctx=ctx)


async def run_federation(broker: Broker, workers: list[Worker],
                         extra: Sequence[Awaitable[Any]] = ()) -> list[Any]:
    """Run a broker, its workers and any extra coroutines to completion; returns their results in order.

    A TaskGroup, so one failure cancels the rest instead of leaving them waiting for a broker that is gone.
    """
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(broker.run()), *(tg.create_task(w.serve()) for w in workers),
                 *(tg.create_task(_awaited(c)) for c in extra)]
    return [t.result() for t in tasks]


async def _awaited(aw: Awaitable[T]) -> T:
    return await aw


def read_metrics(state_dir: Path) -> list[dict[str, Any]]:
    lines = (state_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


class Fed:
    """The helpers above as a fixture: test modules cannot ``import conftest`` (tests/e2e has a conftest too)."""

    run_async = staticmethod(run_async)
    broker_config = staticmethod(broker_config)
    evaluator = staticmethod(evaluator)
    start_broker = staticmethod(start_broker)
    mlp_worker = staticmethod(mlp_worker)
    run_federation = staticmethod(run_federation)
    read_metrics = staticmethod(read_metrics)


@pytest.fixture
def fed() -> type[Fed]:
    return Fed


@pytest.fixture(params=["torch", "mxnet"])
def backend(request: pytest.FixtureRequest) -> str:
    """Each framework in turn (skipped only on a single-framework install; in the dev environment both run)."""
    pytest.importorskip(str(request.param))
    return str(request.param)


@pytest.fixture(scope="module")
def both() -> None:
    """Both frameworks, for cross-framework comparisons."""
    pytest.importorskip("torch")
    pytest.importorskip("mxnet")
