"""``fedctl simulate --ray``: the virtual workers as Ray actors, each hosting a group of them, connected to the
broker over TCP like any ``fedctl join``.

Ray places the actors (``num_cpus`` and ``num_gpus`` per actor, so several groups can share one GPU); fedctl
launches nothing itself. Each actor runs the same :class:`~fedctl.worker.client.Worker` objects the one-process
simulation does — same ids (``sim-<shard>``), shards, trainers and evaluators — on its own asyncio loop and ZeroMQ
context, so a run with the same seed samples the same workers, hands them the same seeds and gets the same updates.
The shards are read by the actors from the partition directory: on a multi-machine cluster it must be at the same
path on every node (a shared file system), and the broker's address must be reachable from them.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedctl.errors import BackendUnavailable, ConfigError
from fedctl.models import ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayConfig:
    """Where and how to place the virtual workers on Ray (``fedctl simulate --ray ADDRESS``)."""

    address: str
    """A running cluster: ``auto`` (the one ``ray start --head`` started on this machine) or ``HOST:PORT``."""
    workers_per_actor: int = 25
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    threads: int = 1
    """Training threads in each actor (its sampled workers train concurrently up to this)."""

    def __post_init__(self) -> None:
        if self.workers_per_actor < 1:
            raise ConfigError(f"--ray-workers-per-actor must be at least 1, got {self.workers_per_actor}")
        if self.num_cpus <= 0 or self.num_gpus < 0 or self.threads < 1:
            raise ConfigError("--ray-cpus must be > 0, --ray-gpus >= 0 and --ray-threads >= 1",
                              "e.g. --ray-cpus 1 --ray-gpus 0.25 (four actors share a GPU)")


@dataclass(frozen=True)
class Group:
    """What one actor hosts: the shards (by name) of its workers and how to build them."""

    endpoint: str
    data_dir: str
    names: tuple[str, ...]
    backend: str
    device: str
    holdout: float
    spec: ModelSpec | None
    """A user task's spec (None: a built-in model, named by the broker)."""
    task_ref: str | None
    threads: int


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise BackendUnavailable("--ray needs Ray, which is not installed",
                                 "pip install 'fedctl[ray]' (or drop --ray to simulate in this process)") from None
    return ray


def connect(config: RayConfig) -> Any:
    """``ray.init`` against the running cluster (never starting one: that is ``ray start``'s job)."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    probe(config)
    try:
        ray.init(address=config.address, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"no Ray cluster at --ray {config.address}: {str(exc).splitlines()[0][:200]}",
                          "start one with `ray start --head` (then --ray auto), or pass its HOST:PORT") from None
    return ray


def probe(config: RayConfig) -> None:
    """ConfigError when nothing listens at a ``HOST:PORT`` address (``ray.init`` would retry it for minutes);
    ``auto`` is checked by ``ray.init`` itself, at once."""
    host, sep, port = config.address.removeprefix("ray://").rpartition(":")
    if sep and port.isdigit():
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
        except OSError as exc:
            raise ConfigError(f"no Ray cluster at --ray {config.address}: {exc.strerror or exc}",
                              "start one with `ray start --head` (then --ray auto), or pass its HOST:PORT") from None


def broker_host(ray: Any) -> str:
    """The address the broker binds for the actors: loopback when every node of the cluster is this machine, else
    this node's address as Ray knows it."""
    here = ray.util.get_node_ip_address()
    nodes = {n.get("NodeManagerAddress") for n in ray.nodes() if n.get("Alive")}
    local = {here, "127.0.0.1", socket.gethostbyname(socket.gethostname())}
    return "127.0.0.1" if nodes <= local else here


async def _host(group: Group) -> list[dict[str, Any]]:
    import zmq
    import zmq.asyncio

    from fedctl.data.shards import load_shard, with_holdout
    from fedctl.sim.runner import _evaluator_factory, _trainer_factory
    from fedctl.tasks import load_task
    from fedctl.worker.client import Worker, WorkerConfig

    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=group.threads, thread_name_prefix="train"))
    task = None if group.task_ref is None else load_task(group.task_ref)
    shards = [with_holdout(load_shard(Path(group.data_dir), name), group.holdout, seed=0) for name in group.names]
    ctx = zmq.asyncio.Context()
    ctx.set(zmq.MAX_SOCKETS, max(1024, 2 * len(shards) + 64))
    try:
        workers = [Worker(WorkerConfig(group.endpoint, f"sim-{shard.name}", group.backend, shard.num_examples,
                                       connect_timeout_s=120.0, device=group.device, spec=group.spec),
                          _trainer_factory(shard, group.backend, group.device, task), ctx=ctx,
                          evaluator=_evaluator_factory(shard, group.backend, group.device, task))
                   for shard in shards]
        await asyncio.gather(*(w.serve() for w in workers))
    finally:
        ctx.destroy(linger=0)
    return [{"worker": w.config.worker_id, "trained": w.trainer is not None, "rounds": w.rounds_trained,
             "node": socket.gethostname()} for w in workers]


def _run_group(group: Group) -> list[dict[str, Any]]:
    logging.basicConfig(level=logging.WARNING)
    return asyncio.run(_host(group))


def start_groups(ray: Any, config: RayConfig, groups: list[Group]) -> list[Any]:
    """One actor per group (``num_cpus``/``num_gpus`` each); returns the object refs of their runs."""
    host = ray.remote(num_cpus=config.num_cpus, num_gpus=config.num_gpus)(_RayHost)
    actors = [host.remote() for _ in groups]
    return [actor.run.remote(group) for actor, group in zip(actors, groups)]


class _RayHost:
    """The actor: hosts one group of virtual workers until the broker says the run is done."""

    def run(self, group: Group) -> list[dict[str, Any]]:
        return _run_group(group)


def groups_of(endpoint: str, data_dir: Path, names: list[str], config: RayConfig, backend: str, device: str,
              holdout: float, spec: ModelSpec | None, task_ref: str | None) -> list[Group]:
    size = config.workers_per_actor
    return [Group(endpoint, str(data_dir.resolve()), tuple(names[i:i + size]), backend, device, holdout, spec,
                  task_ref, config.threads) for i in range(0, len(names), size)]
