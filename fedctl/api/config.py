"""The options of a federated run as keyword arguments: one mapping to :class:`BrokerConfig`, shared by
:func:`fedctl.serve`, :func:`fedctl.simulate` and their command-line twins (``fedctl.cli.options``)."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from fedctl.broker.config import BrokerConfig
from fedctl.broker.policy import ClockConfig, SyncConfig
from fedctl.errors import ConfigError
from fedctl.strategies import TaskConfig, get_strategy

P = ParamSpec("P")
R = TypeVar("R")

StrategyOptions = Mapping[str, Any] | Iterable[str] | None
"""Strategy settings: a mapping (``{"sparsity": 0.999}``) or ``KEY=VALUE`` strings (``["sparsity=0.999"]``)."""


def parse_options(pairs: Iterable[str]) -> dict[str, str]:
    """``--opt KEY=VALUE`` pairs as a map (the strategy converts and checks the values)."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--opt {pair!r} is not KEY=VALUE", "write e.g. --opt sparsity=0.999")
        out[key.strip()] = value.strip()
    return out


def strategy_settings(options: StrategyOptions) -> dict[str, Any]:
    """``options`` as the strategy's settings map."""
    if options is None:
        return {}
    if isinstance(options, Mapping):
        return {str(k): v for k, v in options.items()}
    if isinstance(options, str):
        return parse_options([options])
    return parse_options(options)


def keep_models_count(value: int | str | None) -> int | None:
    """``keep_models``: a count >= 1, or None for ``"all"`` (None itself means all too)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "all"):
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value  # BrokerConfig refuses a count below 1
    raise ConfigError(f"keep_models {value!r} is neither a count >= 1 nor 'all'", "pass e.g. keep_models=3")


def run_config(*, model: str, strategy: str = "fedavg", rounds: int = 20, fraction: float = 1.0,
               min_workers: int = 1, round_timeout: float = 120.0, epochs: int = 1, batch_size: int = 10,
               lr: float = 0.1, lr_decay: float = 1.0, strategy_options: StrategyOptions = None,
               policy: str = "sync", max_staleness: int = 50, staleness_exponent: float = 0.5, buffer: int = 1,
               server_lr: float = 1.0, history_mb: float = 64.0, seed: int = 0,
               state_dir: str | os.PathLike[str] = "runs/default", eval_every: int = 1,
               target_accuracy: float | None = None, fed_eval_every: int = 0, fed_eval_fraction: float = 1.0,
               best_metric: str | None = None, best_mode: str | None = None, keep_models: int | str | None = 1,
               secure_aggregation: bool = False, secagg_clip: float = 4.0, secagg_neighbours: int | None = None,
               secagg_threshold: float = 0.5, secagg_timeout: float = 30.0, dp_noise_multiplier: float | None = None,
               dp_clip: float = 1.0, dp_delta: float = 1e-5, dp_target_epsilon: float | None = None,
               dp_adaptive_quantile: float | None = None, dp_clip_lr: float = 0.2, **extra: Any) -> BrokerConfig:
    """The :class:`BrokerConfig` of a run from its options (``extra``: further BrokerConfig fields), checked: the
    config's own checks, then the strategy's settings, before any file or socket is made.

    Raises
    ------
    ConfigError
        An option out of range, an unknown strategy or policy, a bad strategy setting.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"--seed must be an integer >= 0, got {seed!r}", "pass e.g. seed=0")
    config = BrokerConfig(model=model, strategy=strategy, rounds=rounds,
                          task=TaskConfig(epochs, batch_size, lr, lr_decay, strategy_settings(strategy_options)),
                          sync=SyncConfig(fraction, min_workers, round_timeout), seed=seed,
                          state_dir=Path(state_dir), eval_every=eval_every, target_accuracy=target_accuracy,
                          history_mb=history_mb, policy=policy,
                          clock=ClockConfig(max_staleness=max_staleness, staleness_exponent=staleness_exponent,
                                            buffer=buffer, server_lr=server_lr),
                          best_metric=best_metric, best_mode=best_mode, keep_models=keep_models_count(keep_models),
                          fed_eval_every=fed_eval_every, fed_eval_fraction=fed_eval_fraction,
                          secure_aggregation=secure_aggregation, secagg_clip=secagg_clip,
                          secagg_neighbours=secagg_neighbours, secagg_threshold=secagg_threshold,
                          secagg_timeout_s=secagg_timeout, dp_noise_multiplier=dp_noise_multiplier, dp_clip=dp_clip,
                          dp_delta=dp_delta, dp_target_epsilon=dp_target_epsilon,
                          dp_adaptive_quantile=dp_adaptive_quantile, dp_clip_lr=dp_clip_lr, **extra)
    get_strategy(config.strategy, config.task)  # checks the strategy's settings now
    return config


RUN_OPTIONS = tuple(name for name in inspect.signature(run_config).parameters if name not in ("model", "extra"))
"""The options of a run, as keyword arguments of :func:`fedctl.serve` and :func:`fedctl.simulate`."""


def run_options(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The run options among a call's ``arguments`` (its parameters as ``locals()`` holds them at its start)."""
    return {name: arguments[name] for name in RUN_OPTIONS}


def takes_parameters_of(source: Callable[P, Any]) -> Callable[[Callable[..., R]], Callable[P, R]]:
    """Give the decorated function ``source``'s parameters: ``help()``, IDEs and mypy see them, and the function
    passes them on to ``source`` (``fedctl.serve(**kw)`` is ``Server(**kw).run()``)."""

    def decorate(function: Callable[..., R]) -> Callable[P, R]:
        signature = inspect.signature(source)
        returns = inspect.signature(function).return_annotation
        function.__signature__ = signature.replace(return_annotation=returns)  # type: ignore[attr-defined]
        return function

    return decorate


def task_ref(task: str | os.PathLike[str] | None) -> str | None:
    """A task given as a path object, as the reference string the task loader takes."""
    return None if task is None else os.fspath(task)


def check_resume(config: BrokerConfig) -> None:
    """Before anything starts: an existing run in the state dir must be of the same model and strategy, and a DP
    run must not have spent its --dp-target-epsilon already (cheap: reads state.json only)."""
    from fedctl.broker.dp import check_budget
    from fedctl.broker.store import Checkpointer

    store = Checkpointer(config.state_dir)
    store.check_resumable(config.model, config.strategy)
    if store.exists():
        state = store.read_state()
        check_budget(config.dp_config(), state.get("dp"), int(state.get("round", 0)))
