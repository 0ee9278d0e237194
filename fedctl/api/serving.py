"""The broker from Python: :class:`Server` checks a run's options and loads what it needs; :func:`serve` runs it to
the end, :func:`serve_background` runs it in a thread and returns a handle. ``fedctl serve`` calls these."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from fedctl.api.background import BrokerHandle, Started, private_context, run_blocking
from fedctl.api.config import StrategyOptions, check_resume, run_config, run_options, takes_parameters_of, task_ref
from fedctl.api.results import Run
from fedctl.broker.service import Broker
from fedctl.errors import ConfigError
from fedctl.fsio import check_readable_dir, check_writable_dir, removed_if_empty_on_error
from fedctl.models import get_model
from fedctl.observe.bind import parse_http_bind
from fedctl.security import check_serve_security, is_local_bind, load_allowed_keys, load_key_pair

log = logging.getLogger(__name__)
PathLike = str | os.PathLike[str]


class Server:
    """A broker ready to run: every option checked, the task and the evaluation data loaded, nothing bound yet.

    Parameters
    ----------
    task:
        The model to federate: a task file (``"my_task.py"``, docs/tasks.md), an importable module, or a built-in
        model name (``"mlp"``, ``"lenet5"``, ``"2nn"``, ``"cnn"``). Default: ``model``, else ``"mlp"``.
    bind:
        The ZeroMQ endpoint to listen on. ``tcp://127.0.0.1:*`` takes any free port (read it from
        ``serve_background(...).endpoint``); an address other machines reach needs ``secret_key`` and
        ``allowed_keys``, or ``insecure=True``.
    model:
        A built-in model name (``task`` names one too).
    strategy, rounds, fraction, min_workers, round_timeout, epochs, batch_size, lr, lr_decay, policy, max_staleness, \
staleness_exponent, buffer, server_lr, history_mb, seed, state_dir, eval_every, target_accuracy, fed_eval_every, \
fed_eval_fraction, best_metric, best_mode, keep_models, \
secure_aggregation, secagg_clip, secagg_neighbours, secagg_threshold, secagg_timeout, dp_noise_multiplier, dp_clip, \
dp_delta, dp_target_epsilon, dp_adaptive_quantile, dp_clip_lr:
        The run's options, as ``fedctl serve --help`` describes them (``batch_size`` is ``--batch-size``).
        ``keep_models`` is a count or ``"all"``.
    strategy_options:
        The strategy's settings (``--opt``): ``{"sparsity": 0.999}`` or ``["sparsity=0.999"]``.
    eval_data, data_dir, eval_backend:
        Evaluate the global model after every ``eval_every`` rounds on this shard of ``data_dir`` (``"test"``) or
        dataset split (``"mnist:test"``), with this framework (``"auto"``: the first installed).
    heartbeat_interval, liveness, max_message_mb, chunk_above_mb, chunk_kb, compress, secret_key, allowed_keys, \
insecure:
        Transport and security options, as for ``fedctl serve`` (``compress``: ``"auto"``, ``"always"`` or
        ``"never"``).
    metrics_bind, metrics_token, metrics_insecure, metrics_per_worker:
        Serve Prometheus metrics at ``http://HOST:PORT/metrics`` and the live dashboard at ``http://HOST:PORT/``
        (docs/observability.md), as ``fedctl serve --metrics-bind`` does; read the bound URL from ``metrics_url``
        once the broker listens. ``metrics_per_worker`` adds one series per worker.
    on_round:
        Called with each round's metrics record (a dict), in the broker's thread.

    Raises
    ------
    ConfigError, DataError, BackendUnavailable
        An option or file is wrong; nothing was written.
    """

    def __init__(self, task: PathLike | None = None, *, bind: str = "tcp://127.0.0.1:5555", model: str | None = None,
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
                 eval_data: str | None = None, data_dir: PathLike | None = None, eval_backend: str = "auto",
                 heartbeat_interval: float = 1.0, liveness: float = 10.0, max_message_mb: float = 256.0,
                 chunk_above_mb: float | None = None, chunk_kb: int = 256, compress: str = "auto",
                 secret_key: PathLike | None = None,
                 allowed_keys: PathLike | None = None, insecure: bool = False,
                 metrics_bind: str | None = None, metrics_token: PathLike | None = None,
                 metrics_insecure: bool = False, metrics_per_worker: bool = False,
                 upstream: str | None = None, server_key: str | None = None, edge_id: str | None = None,
                 on_round: Callable[[dict[str, Any]], None] | None = None) -> None:
        arguments = dict(locals())  # first: the parameters alone, whose run options go to run_config
        from fedctl.api.inputs import check_endpoint
        from fedctl.api.tasking import resolve_task

        check_endpoint(bind, "--bind", bind=True)
        self.upstream = self._upstream(upstream, server_key, edge_id, secret_key, allowed_keys)
        if self.upstream is not None:
            from fedctl.edge.run import EDGE_ROUNDS

            arguments["rounds"] = EDGE_ROUNDS  # (the parent ends the run)
            if allowed_keys is None:  # (the key pair is the edge's own, for its parent: its workers' side is plain)
                secret_key = None
        self.metrics_bind = None if metrics_bind is None else parse_http_bind(
            metrics_bind, None if metrics_token is None else Path(metrics_token), metrics_insecure)
        self.metrics_per_worker = metrics_per_worker
        if metrics_per_worker and metrics_bind is None:
            raise ConfigError("--metrics-per-worker adds series to the metrics listener, and there is none",
                              "pass --metrics-bind HOST:PORT too")
        self.metrics_url: str | None = None
        """``http://HOST:PORT`` of the metrics listener once it listens (``metrics_bind``), else None."""
        keys = (None if secret_key is None else Path(secret_key), None if allowed_keys is None else Path(allowed_keys))
        check_serve_security(bind, keys[0], keys[1], insecure)
        self.task = resolve_task(task_ref(task), model or "mlp", model is not None)
        max_message_bytes = int(max_message_mb * 2**20)
        if chunk_kb * 1024 > max_message_bytes // 2:
            raise ConfigError(f"--chunk-kb {chunk_kb} is more than half of --max-message-mb {max_message_mb:g}",
                              f"pass --chunk-kb {max(max_message_bytes // 2048, 1)} or less, or a larger "
                              "--max-message-mb")
        self.config = run_config(model=self.task.name, **run_options(arguments), bind=bind,
                                 heartbeat_interval_s=heartbeat_interval, liveness_s=liveness,
                                 max_message_bytes=max_message_bytes,
                                 chunk_above=int(chunk_above_mb * 2**20) if chunk_above_mb else 0,
                                 chunk_bytes=chunk_kb * 1024, compress=compress, curve_secret_key=keys[0],
                                 allowed_keys=keys[1])
        self.on_round = on_round
        check_writable_dir(self.config.state_dir, "--state-dir")
        self._check_keys(keys[0], keys[1], insecure)
        check_resume(self.config)
        if self.upstream is not None:
            from fedctl.edge.run import check_edge

            check_edge(self.config, evaluates=bool(eval_data))
        self._load(eval_data, None if data_dir is None else Path(data_dir), eval_backend)

    @staticmethod
    def _upstream(upstream: str | None, server_key: str | None, edge_id: str | None, secret_key: PathLike | None,
                  allowed_keys: PathLike | None) -> Any:
        """The parent of an edge broker (``--upstream``), its options checked; None for a root broker."""
        from fedctl.api.inputs import check_endpoint

        if upstream is None:
            if server_key is not None or edge_id is not None:
                given = "--server-key" if server_key is not None else "--edge-id"
                raise ConfigError(f"{given} is for an edge broker's link to its parent, and there is no --upstream",
                                  "pass --upstream tcp://PARENT:PORT too, or drop it")
            return None
        from fedctl.edge.run import Upstream
        from fedctl.security import check_join_security

        check_endpoint(upstream, "--upstream", bind=False)
        if server_key is not None or (secret_key is not None and allowed_keys is None):
            if secret_key is None:
                raise ConfigError("--server-key (the parent's public key) needs this edge's own key pair",
                                  "pass --secret-key NAME.key_secret (`fedctl keygen NAME`; the parent's "
                                  "--allowed-keys holds NAME.key)")
            curve = check_join_security(server_key, Path(secret_key))
            server_key = None if curve is None else curve[0].decode("ascii")  # (a NAME.key file: its key)
        if edge_id is not None and not 0 < len(edge_id) <= 128:
            raise ConfigError(f"--edge-id must have 1 to 128 characters, got {len(edge_id)}", "pass a shorter name")
        return Upstream(upstream, edge_id, server_key, None if server_key is None else Path(str(secret_key)))

    def _check_keys(self, secret_key: Path | None, allowed_keys: Path | None, insecure: bool) -> None:
        """A bad key fails before evaluation data is loaded; plaintext on a reachable bind is logged."""
        if secret_key is not None and allowed_keys is not None:
            check_readable_dir(allowed_keys, "--allowed-keys")
            load_key_pair(secret_key)
            load_allowed_keys(allowed_keys)
        elif insecure and not is_local_bind(self.config.bind):
            log.warning("serving %s in plaintext (--insecure): anyone who reaches it can join, and model updates "
                        "travel unencrypted", self.config.bind)

    def _load(self, eval_data: str | None, data_dir: Path | None, eval_backend: str) -> None:
        """A user task's spec and initial weights (imports its framework), and the evaluator if asked for."""
        from fedctl.api.inputs import load_data, make_evaluator, resolve_backend
        from fedctl.api.tasking import broker_model

        config, task = self.config, self.task
        self.model = broker_model(task, config.seed)
        self.evaluator = None
        if eval_data:
            shard = load_data(eval_data, data_dir, "--eval-data")
            spec = get_model(config.model) if self.model is None else self.model[0]
            self.evaluator = make_evaluator("torch" if self.model is not None else resolve_backend(eval_backend),
                                            spec, shard, task=task)
            log.info("evaluating on %s (%d examples) every %d round(s)", shard.name, shard.num_examples,
                     config.eval_every)

    async def _main(self, started: Started) -> Run:
        """Bind, run every round, and describe the run; a start that fails leaves no empty state dir."""
        begun = time.perf_counter()
        with removed_if_empty_on_error(self.config.state_dir):  # e.g. bind in use: no empty run directory stays
            async with private_context() as ctx:
                observers = [] if self.on_round is None else [self.on_round]

                def on_round(record: dict[str, Any]) -> None:
                    for observe in observers:
                        observe(record)

                link = driver = None
                if self.upstream is not None:
                    from fedctl.edge.driver import EdgeDriver
                    from fedctl.edge.link import EdgeLink

                    link = EdgeLink()
                    driver = partial(EdgeDriver, link=link)
                broker = Broker(self.config, self.evaluator, on_round=on_round, ctx=ctx, model=self.model,
                                driver=driver)
                listener = None
                try:
                    if self.metrics_bind is not None:
                        from fedctl.observe.collector import BrokerMetrics  # (aiohttp: only when asked for)
                        from fedctl.observe.dashboard import Dashboard
                        from fedctl.observe.http import MetricsServer

                        metrics = BrokerMetrics(broker, self.metrics_per_worker)
                        dashboard = Dashboard(broker, broker.checkpointer.read_metrics())
                        observers[:0] = [metrics.observe_round, dashboard.observe_round]
                        listener = MetricsServer(metrics.registry, self.metrics_bind, dashboard)
                        self.metrics_url = await listener.start()
                    started(broker.endpoint)
                    if link is None:
                        summary = await broker.run()
                    else:
                        from fedctl.edge.run import run_edge

                        summary = await run_edge(broker, link, self.upstream, ctx)
                finally:
                    if listener is not None:
                        await listener.stop()
        return Run.from_summary(self.config.state_dir, summary, time.perf_counter() - begun)

    def run(self) -> Run:
        """Run the broker until the run is complete (workers join with :func:`fedctl.join`); a run already in the
        state dir is resumed. Ctrl-C (or interrupting a notebook cell) stops it; the same call resumes it."""
        return run_blocking(self._main, "fedctl-broker")

    def start(self) -> BrokerHandle:
        """Run the broker in a background thread; returns once it listens, with its ``endpoint``."""
        return BrokerHandle(self._main, "fedctl-broker", self.config.state_dir)


@takes_parameters_of(Server)
def serve(*args: Any, **kwargs: Any) -> Run:
    """Run a broker until its run is complete and return the :class:`~fedctl.api.results.Run` (parameters: those
    of :class:`Server`). Workers take part with :func:`fedctl.join` (or ``fedctl join``) from other processes.

    >>> run = fedctl.serve(task="my_task.py", bind="tcp://127.0.0.1:5555", rounds=20, min_workers=5,
    ...                    state_dir="runs/y")                                       # doctest: +SKIP
    """
    return Server(*args, **kwargs).run()


@takes_parameters_of(Server)
def serve_background(*args: Any, **kwargs: Any) -> BrokerHandle:
    """Start a broker in a background thread and return its handle once it listens (parameters: those of
    :class:`Server`): ``handle.endpoint``, ``handle.wait(timeout)`` → :class:`~fedctl.api.results.Run`,
    ``handle.stop()``, ``handle.metrics``; ``with fedctl.serve_background(...) as broker:`` stops it on leaving."""
    return Server(*args, **kwargs).start()


__all__ = ["Server", "serve", "serve_background"]
