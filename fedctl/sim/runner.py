"""Run one broker and K virtual workers in one process, over real ZeroMQ sockets and the real codec.

Every virtual worker is a :class:`fedctl.worker.client.Worker` — the code ``fedctl join`` runs — with its own
DEALER socket and identity, its own shard and its own state; they share one asyncio loop and a small thread
pool for training, so only the sampled workers use CPU. The broker is the ``fedctl serve`` broker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import resource
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from fedctl.broker.config import BrokerConfig
from fedctl.broker.service import Broker, Evaluator
from fedctl.data.shards import Shard, list_shards, load_shard, with_holdout
from fedctl.errors import ConfigError
from fedctl.models import ModelSpec
from fedctl.sim.ray_hosts import RayConfig
from fedctl.tasks import Task
from fedctl.worker.client import EvaluatorFactory, Worker, WorkerConfig, trainer_evaluator
from fedctl.worker.frameworks import create_trainer
from fedctl.worker.frameworks.base import Params, Trainer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimConfig:
    """How to host the virtual workers."""

    data_dir: Path
    workers: int | None = None
    """How many shards of ``data_dir`` get a worker (default: all)."""
    backend: str = "torch"
    device: str = "cpu"
    parallel: int = 2
    """Training threads shared by all virtual workers (sampled workers train concurrently up to this)."""
    transport: str = "tcp"
    """``tcp`` (loopback, as across machines) or ``inproc``."""
    slow_fraction: float = 0.0
    """Heterogeneous devices: this fraction of the workers (the first ones by shard name) is ``slowdown``× slower."""
    slowdown: float = 1.0
    delay_s: float = 0.0
    """Emulated device time added to every update of every worker (seconds, before the slowdown factor)."""
    holdout: float = 0.0
    """Fraction of each shard held out of training, on which the worker evaluates the model when the broker asks
    (federated evaluation, ``--fed-eval-every``)."""
    vanish_fraction: float = 0.0
    """Emulated dropouts under secure aggregation (benchmarks): this fraction of the workers (the last ones by
    shard name) stops just before sending ``vanish_before[0]`` in its first secure round ≥ ``vanish_before[1]``."""
    vanish_before: tuple[str, int] = ("sa_reveal", 2)
    ray: RayConfig | None = None
    """Host the virtual workers as Ray actors on this cluster instead of in this process (``--ray``)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.slow_fraction <= 1.0:
            raise ConfigError(f"--slow-fraction must be in [0, 1], got {self.slow_fraction}")
        if self.slowdown < 1.0 or self.delay_s < 0:
            raise ConfigError("--slowdown must be >= 1 and --delay >= 0")
        if self.parallel < 1:
            raise ConfigError(f"--parallel must be at least 1, got {self.parallel}")
        if not 0.0 <= self.holdout < 1.0:
            raise ConfigError(f"--holdout must be in [0, 1), got {self.holdout}")
        if self.transport not in ("tcp", "inproc"):
            raise ConfigError(f"unknown transport {self.transport!r}", "use tcp or inproc")
        if self.ray is not None and (self.transport != "tcp" or self.slow_fraction or self.vanish_fraction
                                     or self.delay_s):
            raise ConfigError("--ray hosts the workers as Ray actors over TCP, without emulated slow or lost "
                              "devices", "drop --transport inproc, --slow-fraction, --delay (or drop --ray)")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _trainer_factory(shard: Shard, backend: str, device: str, task: Task | None) -> Callable[[ModelSpec], Trainer]:
    return lambda spec: create_trainer(backend, spec, shard.x, shard.y, device=device, threads=1, task=task)


def _evaluator_factory(shard: Shard, backend: str, device: str, task: Task | None) -> EvaluatorFactory | None:
    """Federated evaluation on the shard's held-out examples, if it has any."""
    if shard.holdout_x is None or shard.holdout_y is None or not len(shard.holdout_y):
        return None
    hx, hy = shard.holdout_x, shard.holdout_y
    return trainer_evaluator(lambda spec: create_trainer(backend, spec, hx, hy, device=device, threads=1, task=task),
                             len(hy))


def load_shards(sim: SimConfig) -> list[Shard]:
    names = list_shards(sim.data_dir)
    if sim.workers is not None:
        if sim.workers > len(names):
            raise ConfigError(f"{sim.data_dir} holds {len(names)} shards, {sim.workers} workers were asked for",
                              "partition into more clients or ask for fewer workers")
        names = names[: sim.workers]
    return [with_holdout(load_shard(sim.data_dir, name), sim.holdout, seed=0) for name in names]


async def simulate(broker_config: BrokerConfig, sim: SimConfig, evaluator: Evaluator | None = None,
                   on_round: Callable[[dict[str, Any]], None] | None = None,
                   shards: list[Shard] | None = None, task: Task | None = None,
                   model: tuple[ModelSpec, Params] | None = None) -> dict[str, Any]:
    """Run a whole federated run with virtual workers; returns the broker's summary plus host figures.

    ``task`` and ``model`` (its spec and initial weights, ``fedctl.api.tasking.broker_model``) run a user task
    instead of the built-in model ``broker_config.model``."""
    if sim.ray is not None:
        return await _simulate_on_ray(broker_config, sim, evaluator, on_round, task, model)
    shards = shards if shards is not None else load_shards(sim)
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=sim.parallel, thread_name_prefix="train"))
    ctx = zmq.asyncio.Context()
    ctx.set(zmq.MAX_SOCKETS, max(1024, 2 * len(shards) + 64))
    bind = "inproc://fedctl-sim" if sim.transport == "inproc" else "tcp://127.0.0.1:*"
    config = dataclasses.replace(broker_config, bind=bind, gather=len(shards))  # round 1 samples every worker
    try:
        broker = Broker(config, evaluator, on_round=on_round, ctx=ctx, model=model)
        if broker.is_complete():  # resumed a finished run: nothing to train, no worker to start
            return {**await broker.run(), "workers": 0, "workers_that_trained": 0, "peak_rss_mb": peak_rss_mb()}
        slow = round(sim.slow_fraction * len(shards))
        vanish = len(shards) - round(sim.vanish_fraction * len(shards))
        workers = [Worker(WorkerConfig(broker.endpoint, f"sim-{shard.name}", sim.backend, shard.num_examples,
                                       connect_timeout_s=120.0, device=sim.device,
                                       slowdown=sim.slowdown if i < slow else 1.0,
                                       delay_s=sim.delay_s, spec=None if model is None else model[0],
                                       vanish_before=sim.vanish_before if i >= vanish else None),
                          _trainer_factory(shard, sim.backend, sim.device, task), ctx=ctx,
                          evaluator=_evaluator_factory(shard, sim.backend, sim.device, task))
                   for i, shard in enumerate(shards)]
        log.info("simulating %d workers (%s) against %s", len(workers), sim.backend, broker.endpoint)
        async with asyncio.TaskGroup() as tg:
            run = tg.create_task(broker.run())
            for worker in workers:
                tg.create_task(worker.serve())
        summary = run.result()
    finally:
        ctx.destroy(linger=0)
    trained = sum(1 for w in workers if w.trainer is not None)
    return {**summary, "workers": len(workers), "workers_that_trained": trained, "peak_rss_mb": peak_rss_mb()}


async def _simulate_on_ray(broker_config: BrokerConfig, sim: SimConfig, evaluator: Evaluator | None,
                           on_round: Callable[[dict[str, Any]], None] | None, task: Task | None,
                           model: tuple[ModelSpec, Params] | None) -> dict[str, Any]:
    """:func:`simulate` with the workers in Ray actors (:mod:`fedctl.sim.ray_hosts`); the broker stays here."""
    from fedctl.sim import ray_hosts

    assert sim.ray is not None
    names = list_shards(sim.data_dir)[: sim.workers or None]
    ray = await asyncio.to_thread(ray_hosts.connect, sim.ray)
    ctx = zmq.asyncio.Context()
    try:
        host = ray_hosts.broker_host(ray)
        if host != "127.0.0.1":
            log.warning("the Ray cluster spans machines: the broker listens on %s in plaintext for its actors", host)
        config = dataclasses.replace(broker_config, bind=f"tcp://{host}:*", gather=len(names))
        broker = Broker(config, evaluator, on_round=on_round, ctx=ctx, model=model)
        if broker.is_complete():
            return {**await broker.run(), "workers": 0, "workers_that_trained": 0, "peak_rss_mb": peak_rss_mb()}
        ref = None if task is None else (str(Path(task.ref).resolve()) if Path(task.ref).is_file() else task.ref)
        groups = ray_hosts.groups_of(broker.endpoint, sim.data_dir, names, sim.ray, sim.backend, sim.device,
                                     sim.holdout, None if model is None else model[0], ref)
        log.info("simulating %d workers (%s) in %d Ray actors against %s", len(names), sim.backend, len(groups),
                 broker.endpoint)
        refs = ray_hosts.start_groups(ray, sim.ray, groups)

        async def hosts() -> list[list[dict[str, Any]]]:
            return list(await asyncio.gather(*(asyncio.wrap_future(r.future()) for r in refs)))

        async with asyncio.TaskGroup() as tg:
            run = tg.create_task(broker.run())
            hosted = tg.create_task(hosts())
        reports = [w for group in hosted.result() for w in group]
    finally:
        ctx.destroy(linger=0)
        ray.shutdown()
    return {**run.result(), "workers": len(reports), "workers_that_trained": sum(w["trained"] for w in reports),
            "peak_rss_mb": peak_rss_mb(), "ray": {"actors": len(groups), "nodes": sorted({w["node"] for w in reports})}}
