"""Options shared by the commands that run a federation (``serve`` and ``simulate``); the config they build is
:func:`fedctl.api.config.run_config`'s."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from fedctl.models import MODELS
from fedctl.strategies import strategy_names

F = TypeVar("F", bound=Callable[..., Any])

FED_EVAL_OPTIONS = [
    click.option("--fed-eval-every", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Federated evaluation every N rounds (and after the last): sampled workers evaluate the global "
                      "model on their held-out data; fed_eval_* in metrics.jsonl (0: off; under ssp/async every N "
                      "model versions, a pause)."),
    click.option("--fed-eval-fraction", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
                 help="Federated evaluation asks max(⌈C·K⌉, 1) of the K connected workers."),
]
FED_EVAL_KEYS = ("fed_eval_every", "fed_eval_fraction")
"""The options above, named as the BrokerConfig fields they set."""
RUN_OPTIONS = [
    click.option("--model", type=click.Choice(sorted(MODELS)), default="mlp", show_default=True,
                 help="The model every worker trains (canonical parameter names, any framework)."),
    click.option("--strategy", type=click.Choice(strategy_names()), default="fedavg", show_default=True,
                 help="The algorithm: the workers' update rule and the broker's aggregation (`fedctl strategies`)."),
    click.option("--rounds", type=click.IntRange(min=1), default=20, show_default=True,
                 help="Rounds to run (for ssp/async: model versions)."),
    click.option("--fraction", "-C", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
                 help="Client fraction C: each round samples max(C·K, 1) of the K connected workers."),
    click.option("--min-workers", type=click.IntRange(min=1), default=1, show_default=True,
                 help="Quorum: a round starts once this many workers wait, and at the deadline it is aggregated "
                      "only if min(this, sampled) updates arrived (otherwise retried)."),
    click.option("--round-timeout", type=click.FloatRange(min=0, min_open=True), default=120.0, show_default=True,
                 help="Round deadline, seconds."),
    click.option("--epochs", "-E", type=click.IntRange(min=1), default=1, show_default=True, help="Local epochs E."),
    click.option("--batch-size", "-B", type=click.IntRange(min=0), default=10, show_default=True,
                 help="Local batch size B (0 = the whole shard, B=∞)."),
    click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.1, show_default=True,
                 help="Learning rate η."),
    click.option("--lr-decay", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
                 help="Round r uses η · lr_decay^(r−1) (1 = constant)."),
    click.option("--opt", "strategy_options", multiple=True, metavar="KEY=VALUE",
                 help="A strategy option (repeatable), e.g. --opt sparsity=0.999; `fedctl strategies` lists them."),
    click.option("--policy", default="sync", show_default=True, metavar="sync|ssp:S|async",
                 help="Consistency policy: synchronous rounds, stale-synchronous parallel with bound S, or fully "
                      "asynchronous (for ssp/async, --rounds counts model versions)."),
    click.option("--max-staleness", type=click.IntRange(min=0), default=50, show_default=True,
                 help="ssp/async: refuse an update based on a model more than this many versions old."),
    click.option("--staleness-exponent", type=click.FloatRange(min=0), default=0.5, show_default=True,
                 help="ssp/async: weigh an update τ versions old by (1+τ)^-a (0: no weighting)."),
    click.option("--buffer", type=click.IntRange(min=1), default=1, show_default=True,
                 help="ssp/async: apply updates in groups of this many arrivals (1: each as it arrives)."),
    click.option("--server-lr", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
                 help="ssp/async: factor η_g on every update's weight (FedBuff's server learning rate)."),
    click.option("--history-mb", type=click.FloatRange(min=0), default=64.0, show_default=True,
                 help="Memory for past model versions, so a worker is sent only what changed since the version "
                      "it holds (0: always the dense model)."),
    click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Seed of the model initialisation and sampling."),
    click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/default"),
                 show_default=True, help="Checkpoints and metrics.jsonl go here; an existing run there is resumed."),
    click.option("--eval-every", type=click.IntRange(min=1), default=1, show_default=True,
                 help="Evaluate every N rounds (and after the last)."),
    click.option("--target-accuracy", type=click.FloatRange(0, 1, min_open=True), default=None,
                 help="End the run once the evaluated test accuracy reaches this."),
    *FED_EVAL_OPTIONS,
    click.option("--best-metric", default=None, metavar="NAME|none",
                 help="Keep the best model (model-best.npz, `fedctl export --best`) by this metrics.jsonl field "
                      "[default: test_accuracy when the broker evaluates, else fed_eval_accuracy]."),
    click.option("--best-mode", type=click.Choice(["max", "min"]), default=None,
                 help="Whether a larger or a smaller --best-metric is better [default: min for a loss, else max]."),
    click.option("--keep-models", default="1", show_default=True, metavar="N|all",
                 callback=lambda ctx, param, value: _count_or_all(value),
                 help="Keep the models of the last N checkpoints (or all) for `fedctl export --round`."),
    click.option("--secure-aggregation", is_flag=True, default=False,
                 help="Secure aggregation (SecAgg+): the broker learns only the sum of each round's updates, "
                      "never one of them; fedavg/fedsgd, sync rounds (docs/privacy.md)."),
    click.option("--secagg-clip", type=click.FloatRange(min=0, min_open=True), default=4.0, show_default=True,
                 help="Secure aggregation: each weighted update value is clipped to ±this before it is encoded."),
    click.option("--secagg-neighbours", type=click.IntRange(2, 256), default=None,
                 help="Secure aggregation: neighbours k each worker masks with [default: min(n−1, 2⌈log2 n⌉+2)]."),
    click.option("--secagg-threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.5,
                 show_default=True, help="Secure aggregation: t = ⌊this·k⌋+1 of a worker's k neighbours must "
                                         "survive to unmask (Shamir threshold)."),
    click.option("--secagg-timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
                 help="Secure aggregation: seconds each key, share and reveal stage waits for the workers."),
    click.option("--dp-noise-multiplier", type=click.FloatRange(min=0, min_open=True), default=None, metavar="Z",
                 help="DP-FedAvg: Gaussian noise of std Z·S on each round's sum of clipped updates (client-level "
                      "differential privacy; docs/privacy.md). Off when absent."),
    click.option("--dp-clip", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True, metavar="S",
                 help="DP-FedAvg: L2 bound S of each worker's update (initial bound with --dp-adaptive-quantile)."),
    click.option("--dp-delta", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=1e-5,
                 show_default=True, help="DP-FedAvg: the δ of (ε, δ)."),
    click.option("--dp-target-epsilon", type=click.FloatRange(min=0, min_open=True), default=None, metavar="EPS",
                 help="DP-FedAvg: end the run before a round would take ε above EPS."),
    click.option("--dp-adaptive-quantile", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
                 metavar="Q",
                 help="DP-FedAvg: adapt S to the Q-quantile of update norms (Andrew et al.; e.g. 0.5)."),
    click.option("--dp-clip-lr", type=click.FloatRange(min=0, min_open=True), default=0.2, show_default=True,
                 help="DP-FedAvg adaptive clipping: the bound's geometric learning rate."),
]
RUN_KEYS = ("model", "strategy", "rounds", "fraction", "min_workers", "round_timeout", "epochs", "batch_size", "lr",
            "lr_decay", "strategy_options", "policy", "max_staleness",
            "staleness_exponent", "buffer", "server_lr", "history_mb", "seed", "state_dir", "eval_every",
            "target_accuracy", "best_metric", "best_mode", "keep_models", "secure_aggregation", "secagg_clip",
            "secagg_neighbours", "secagg_threshold", "secagg_timeout", "dp_noise_multiplier", "dp_clip", "dp_delta",
            "dp_target_epsilon", "dp_adaptive_quantile", "dp_clip_lr")


def _count_or_all(value: str) -> int | None:
    """``--keep-models``: a count >= 1, or None for ``all``."""
    if value.strip().lower() == "all":
        return None
    if value.strip().isdigit() and int(value) >= 1:
        return int(value)
    raise click.BadParameter(f"{value!r} is neither a count >= 1 nor all")


def run_options(f: F) -> F:
    """Decorate a click command with the options of a federated run."""
    for option in reversed(RUN_OPTIONS):
        f = option(f)
    return f


def fed_eval_options(f: F) -> F:
    """Decorate a click command with the federated-evaluation options alone (``fedctl demo``)."""
    for option in reversed(FED_EVAL_OPTIONS):
        f = option(f)
    return f


def class_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    """``--classes a,b,c``: the class names in id order (checked again, with the data, by ``with_classes``)."""
    if value is None:
        return None
    names = tuple(name.strip() for name in value.split(","))
    if not all(names):
        raise click.BadParameter("an empty class name; list the names comma-separated, e.g. benign,malignant")
    return names


def dp_phrase(summary: dict[str, Any]) -> str:
    """``, (ε = 2.31, δ = 1e-05)-DP`` for a run summary with differential privacy, else nothing."""
    dp = summary.get("dp")
    return "" if not dp else f", (ε = {dp['epsilon']:.3f}, δ = {dp['delta']:g})-DP for each worker"


def metrics_options(f: Any) -> Any:
    """``--metrics-bind``, ``--metrics-token`` and ``--metrics-insecure`` (serve and join: docs/observability.md)."""
    for option in reversed([
        click.option("--metrics-bind", default=None, metavar="HOST:PORT",
                     help="Serve Prometheus metrics at http://HOST:PORT/metrics, and for fedctl serve the live "
                          "dashboard at http://HOST:PORT/ (docs/observability.md), e.g. 127.0.0.1:9464. A "
                          "non-loopback HOST needs --metrics-token or --metrics-insecure."),
        click.option("--metrics-token", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="File holding a bearer token: HTTP requests without 'Authorization: Bearer <token>' get "
                          "401."),
        click.option("--metrics-insecure", is_flag=True, default=False,
                     help="Serve a non-loopback --metrics-bind without a token: anyone who reaches it can read the "
                          "metrics.")]):
        f = option(f)
    return f
