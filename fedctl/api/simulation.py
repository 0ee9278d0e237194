"""A whole federation in this process from Python: :class:`Simulation` checks the options, partitions the data if
needed and loads the task; :func:`simulate` runs it. ``fedctl simulate`` (and ``fedctl bench``) call these."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedctl.api.background import Started, run_blocking
from fedctl.api.config import StrategyOptions, check_resume, run_config, run_options, takes_parameters_of, task_ref
from fedctl.api.results import Run
from fedctl.broker.config import BrokerConfig
from fedctl.broker.service import Evaluator
from fedctl.data.partition import write_partition
from fedctl.data.shards import list_shards, load_shard
from fedctl.errors import ConfigError
from fedctl.fsio import check_writable_dir, removed_if_empty_on_error
from fedctl.models import ModelSpec, get_model
from fedctl.sim import runner
from fedctl.sim.runner import SimConfig
from fedctl.tasks import Task
from fedctl.worker.frameworks.base import Params

log = logging.getLogger(__name__)
PathLike = str | os.PathLike[str]
OnRound = Callable[[dict[str, Any]], None]


def ensure_partition(data_dir: PathLike | None, dataset: str, clients: int, shards_per_client: int | None,
                     source_dir: PathLike | None, seed: int, cache_root: Path,
                     announce: Callable[[str], None] | None = None, dirichlet: float | None = None) -> Path:
    """Use ``data_dir`` if given, else partition the dataset once into ``cache_root`` and reuse it (IID,
    ``shards_per_client`` label shards, or ``dirichlet`` label skew); ``announce`` (default: the log) hears a line
    once the data is loaded and cut, so a mistake announces nothing."""
    if data_dir is not None:
        return Path(data_dir)
    if shards_per_client is not None and dirichlet is not None:
        raise ConfigError(f"both --shards-per-client {shards_per_client} and --dirichlet {dirichlet:g} were given",
                          "pass one of them (or neither, for an IID partition)")
    if dirichlet is not None and not dirichlet > 0:
        raise ConfigError(f"--dirichlet must be above 0, got {dirichlet:g}", "pass e.g. --dirichlet 0.5")
    if dirichlet is not None:
        kind, scheme = "dirichlet", f"dirichlet{dirichlet:g}"
    elif shards_per_client is not None:
        kind, scheme = "shards", f"shards{shards_per_client}"
    else:
        kind = scheme = "iid"
    out = cache_root / f"{dataset}-{clients}-{scheme}-seed{seed}"
    if not (out / "manifest.json").is_file():
        announced: list[bool] = []

        def progress(done: int, total: int) -> None:
            if not announced:
                announced.append(True)
                (announce or log.info)(f"partitioning {dataset} into {clients} clients ({scheme}) → {out}")

        write_partition(dataset, out, clients=clients, scheme=kind, shards_per_client=shards_per_client,
                        alpha=dirichlet, seed=seed,
                        source_dir=None if source_dir is None else Path(source_dir), on_progress=progress)
    return out


def simulation_model(config: BrokerConfig, sim: SimConfig, eval_backend: str,
                     task: Task | None) -> tuple[Evaluator | None, tuple[ModelSpec, Params] | None]:
    """The evaluator on the partition's test shard (a user ``task``'s only when the partition has one) and a user
    task's spec and initial weights (None for a built-in model)."""
    from fedctl.api.inputs import make_evaluator, resolve_backend
    from fedctl.api.tasking import broker_model

    model = broker_model(task, config.seed) if task is not None else None
    if model is None:
        return make_evaluator(resolve_backend(eval_backend), get_model(config.model),
                              load_shard(sim.data_dir, "test"), threads=1), None
    if "test" in list_shards(sim.data_dir, include_test=True):
        return make_evaluator("torch", model[0], load_shard(sim.data_dir, "test"), threads=1, task=task), model
    return None, model


def run_simulation(config: BrokerConfig, sim: SimConfig, evaluator: Evaluator | None,
                   model: tuple[ModelSpec, Params] | None, task: Task | None,
                   on_round: OnRound | None = None) -> tuple[dict[str, Any], float]:
    """Run the federation (:func:`fedctl.sim.runner.simulate`); returns its summary and the wall seconds."""

    async def main(started: Started) -> dict[str, Any]:
        started(None)
        return await runner.simulate(config, sim, evaluator, on_round=on_round, task=task, model=model)

    begun = time.perf_counter()
    summary = run_blocking(main, "fedctl-simulate")
    return summary, time.perf_counter() - begun


class Simulation:
    """A simulated federation ready to run: one broker and K virtual workers in this process, on the deployment
    code path (the same broker, workers, sockets and codec as ``fedctl serve`` + ``fedctl join``).

    Parameters
    ----------
    task:
        The model to federate: a task file (``"my_task.py"``), an importable module, or a built-in model name.
        Default: ``model``, else ``"mlp"``.
    data:
        A partition directory (:func:`fedctl.partition`, ``fedctl partition``); the partition's ``test`` shard
        evaluates the model. None: ``dataset`` is partitioned into ``clients`` shards (IID, ``shards_per_client``
        label shards each, or ``dirichlet`` label skew of that α) and cached beside ``state_dir``.
    model, strategy, rounds, fraction, min_workers, round_timeout, epochs, batch_size, lr, lr_decay, \
strategy_options, policy, max_staleness, staleness_exponent, buffer, server_lr, history_mb, seed, state_dir, \
eval_every, target_accuracy, fed_eval_every, fed_eval_fraction, best_metric, best_mode, keep_models, \
secure_aggregation, secagg_clip, secagg_neighbours, secagg_threshold, secagg_timeout, dp_noise_multiplier, dp_clip, \
dp_delta, dp_target_epsilon, dp_adaptive_quantile, dp_clip_lr:
        The run's options, as for :class:`fedctl.api.serving.Server`.
    dataset, clients, shards_per_client, dirichlet, source_dir:
        The partition made when ``data`` is None (``dataset="mnist-sample"`` ships with fedctl).
    workers, backend, parallel, transport, slow_fraction, slowdown, delay, holdout:
        As for ``fedctl simulate`` (``delay`` is ``--delay``, in seconds).
    ray, ray_workers_per_actor, ray_cpus, ray_gpus:
        Host the virtual workers as Ray actors on a running cluster (``"auto"``: the one ``ray start --head``
        started here, or ``"HOST:PORT"``), that many per actor, each actor with these CPUs and (fractional) GPUs;
        needs ``fedctl[ray]``. The broker stays in this process.
    on_round:
        Called with each round's metrics record (a dict).
    on_partition:
        Hears the line announcing a new partition (default: the log).

    Raises
    ------
    ConfigError, DataError, BackendUnavailable
        An option, the data or the task is wrong.
    """

    def __init__(self, task: PathLike | None = None, *, data: PathLike | None = None, model: str | None = None,
                 strategy: str = "fedavg", rounds: int = 20, fraction: float = 1.0, min_workers: int = 1,
                 round_timeout: float = 120.0, epochs: int = 1, batch_size: int = 10, lr: float = 0.1,
                 lr_decay: float = 1.0, strategy_options: StrategyOptions = None, policy: str = "sync",
                 max_staleness: int = 50, staleness_exponent: float = 0.5, buffer: int = 1, server_lr: float = 1.0,
                 history_mb: float = 64.0, seed: int = 0, state_dir: PathLike = "runs/default", eval_every: int = 1,
                 target_accuracy: float | None = None, fed_eval_every: int = 0, fed_eval_fraction: float = 1.0,
                 best_metric: str | None = None, best_mode: str | None = None, keep_models: int | str | None = 1,
                 secure_aggregation: bool = False, secagg_clip: float = 4.0, secagg_neighbours: int | None = None,
                 secagg_threshold: float = 0.5, secagg_timeout: float = 30.0, dp_noise_multiplier: float | None = None,
                 dp_clip: float = 1.0, dp_delta: float = 1e-5, dp_target_epsilon: float | None = None,
                 dp_adaptive_quantile: float | None = None, dp_clip_lr: float = 0.2,
                 dataset: str = "mnist", clients: int = 100, shards_per_client: int | None = None,
                 dirichlet: float | None = None, source_dir: PathLike | None = None, workers: int | None = None,
                 backend: str = "auto",
                 parallel: int = 2, transport: str = "tcp", slow_fraction: float = 0.0, slowdown: float = 1.0,
                 delay: float = 0.0, holdout: float | None = None, ray: str | None = None,
                 ray_workers_per_actor: int = 25, ray_cpus: float = 1.0, ray_gpus: float = 0.0,
                 on_round: OnRound | None = None, on_partition: Callable[[str], None] | None = None) -> None:
        arguments = dict(locals())  # first: the parameters alone, whose run options go to run_config
        from fedctl.api.inputs import missing_dataset_fix, resolve_backend
        from fedctl.api.tasking import resolve_task

        task_ = resolve_task(task_ref(task), model or "mlp", model is not None)
        if not task_.is_builtin and backend == "mxnet" and task_.gluon_model is None:
            raise ConfigError(f"task {task_.name} defines no gluon_model(); --backend mxnet cannot train it",
                              "pass --backend torch, or add gluon_model() to the task (docs/tasks.md)")
        config = self.config = run_config(model=task_.name, **run_options(arguments), done_linger_s=2.0)
        hosts = None
        if ray is not None:  # (Ray missing, or no cluster at a HOST:PORT: one line before any partition is made)
            from fedctl.sim.ray_hosts import RayConfig, import_ray, probe

            hosts = RayConfig(ray, ray_workers_per_actor, ray_cpus, ray_gpus, threads=max(int(ray_cpus), 1))
            import_ray()
            probe(hosts)
        check_writable_dir(config.state_dir, "--state-dir")  # the partition cache goes beside it
        check_resume(config)
        with missing_dataset_fix(has_download=False):
            partition = ensure_partition(data, dataset, clients, shards_per_client, source_dir, config.seed,
                                         Path(config.state_dir).parent / "partitions", on_partition, dirichlet)
        shards = len(list_shards(partition))  # a bad partition fails here, before anything runs
        if workers is not None and not 1 <= workers <= shards:
            raise ConfigError(f"--workers {workers} is more than the {shards} shards of {partition}" if workers > 0
                              else f"--workers must be at least 1, got {workers}",
                              f"pass --workers {shards} or fewer, or a partition with more clients")
        self.sim = SimConfig(partition, workers, resolve_backend(backend), parallel=parallel, transport=transport,
                             slow_fraction=slow_fraction, slowdown=slowdown, delay_s=delay,
                             holdout=holdout if holdout is not None else (0.1 if config.fed_eval_every else 0.0),
                             ray=hosts, device="gpu:0" if ray_gpus > 0 else "cpu")
        self.task = None if task_.is_builtin else task_
        self.on_round = on_round
        self._evaluator, self._model = simulation_model(config, self.sim, backend, self.task)

    def run(self, on_round: OnRound | None = None) -> Run:
        """Run every round (``on_round``: instead of the one given at construction) and write ``simulate.json``
        beside the metrics; a run already in the state dir is resumed. Ctrl-C (or interrupting a notebook cell)
        stops it; the same call resumes it."""
        config = self.config
        with removed_if_empty_on_error(config.state_dir):
            summary, wall = run_simulation(config, self.sim, self._evaluator, self._model, self.task,
                                           on_round or self.on_round)
        (Path(config.state_dir) / "simulate.json").write_text(json.dumps({**summary, "wall_s": wall}, indent=1))
        return Run.from_summary(config.state_dir, summary, wall)


@takes_parameters_of(Simulation)
def simulate(*args: Any, **kwargs: Any) -> Run:
    """Run a federation of virtual workers in this process and return the :class:`~fedctl.api.results.Run`
    (parameters: those of :class:`Simulation`).

    >>> run = fedctl.simulate(task="my_task.py", data="shards/", rounds=10, lr=0.05,
    ...                       state_dir="runs/x")                                    # doctest: +SKIP
    >>> run.rounds, run.metrics[-1]["test_accuracy"]                                 # doctest: +SKIP
    """
    return Simulation(*args, **kwargs).run()


__all__ = ["Simulation", "ensure_partition", "run_simulation", "simulate", "simulation_model"]
