"""The broker's run configuration: one frozen, validated dataclass, built by the CLI from its options."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from fedctl.broker.policy import ClockConfig, SyncConfig, parse_policy, policy_name
from fedctl.errors import ConfigError
from fedctl.privacy.dp import DPConfig
from fedctl.strategies.base import TaskConfig
from fedctl.strategies.registry import get_strategy_class
from fedctl.wire.compression import check_mode
from fedctl.wire.constants import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_MESSAGE_BYTES, MAX_SECAGG_PEERS

SECURE_STRATEGIES = ("fedavg", "fedsgd")
"""Strategies whose dense updates secure aggregation sums (docs/protocol.md §7.4)."""
_METRIC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


@dataclass(frozen=True)
class BrokerConfig:
    """Everything ``fedctl serve`` needs to run a federation."""

    bind: str = "tcp://*:5555"
    model: str = "mlp"
    strategy: str = "fedavg"
    rounds: int = 20
    task: TaskConfig = field(default_factory=TaskConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    seed: int = 0
    state_dir: Path = Path("runs/default")
    heartbeat_interval_s: float = 1.0
    liveness_s: float = 10.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    eval_every: int = 1
    """Evaluate the global model every this many rounds (and after the last one)."""
    fed_eval_every: int = 0
    """Federated evaluation (docs/protocol.md §7.2) every this many rounds and after the last: sampled workers
    evaluate the global model on their held-out data (0: never). Sync policy only."""
    fed_eval_fraction: float = 1.0
    """Each federated evaluation asks max(⌈C·K⌉, 1) of the K connected workers (among those waiting)."""
    target_accuracy: float | None = None
    """End the run after the first evaluated round whose test accuracy reaches this (needs an evaluator)."""
    done_linger_s: float = 2.0
    """After the last round: how long to keep answering so every worker hears ``done``."""
    compress: str = "auto"
    """Dense models and downlink deltas through the zlib codec: ``auto`` (per worker, where its link is slow enough
    that the bytes saved outweigh deflate and inflate; docs/protocol.md §4.4), ``always`` or ``never``."""
    gather: int = 0
    """Sync rounds: the first round this process opens waits until this many workers have a pull waiting, so that its
    sample is drawn from all of them (``fedctl simulate`` sets its worker count; 0: only ``sync.min_workers``)."""
    durable_updates: bool = True
    """Write each acknowledged update (and the open round) to ``<state_dir>/pending`` before acknowledging it, so a
    broker killed mid-round resumes the round without losing anything it acknowledged."""
    policy: str = "sync"
    """Consistency policy: ``sync`` (rounds), ``ssp:S`` (stale-synchronous, bound S) or ``async``."""
    clock: ClockConfig = field(default_factory=ClockConfig)
    """SSP / async settings (hard staleness limit, staleness weighting, buffer); the bound comes from ``policy``."""
    history_mb: float = 64.0
    """Memory for past model versions, from which a worker holding one gets only what changed (0: always dense)."""
    curve_secret_key: Path | None = None
    """The broker's ``NAME.key_secret`` (``fedctl keygen``): with ``allowed_keys``, the ROUTER is a CURVE server."""
    allowed_keys: Path | None = None
    """Directory of the admitted workers' public keys (``*.key``); only with ``curve_secret_key``."""
    chunk_above: int = 0
    """Dense models and updates larger than this many bytes travel in chunks (docs/protocol.md §7.1); 0 means 64 MiB
    or 3/4 of the largest message (room for framing), whichever is smaller."""
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    """Tensor bytes per chunk message."""
    best_metric: str | None = None
    """Metrics-record field the best model (``model-best.npz``) is chosen by, dotted for a nested one; None: by
    ``test_accuracy`` when the broker evaluates, else ``fed_eval_accuracy``; ``none``: keep no best model."""
    best_mode: str | None = None
    """``max`` or ``min``; None: ``min`` for a metric named like a loss, else ``max``."""
    keep_models: int | None = 1
    """How many of the newest checkpointed models stay in the state dir (None: all), for ``fedctl export --round``."""
    secure_aggregation: bool = False
    """Secure aggregation (docs/protocol.md §7.4): the broker learns only the sum of each round's updates."""
    secagg_clip: float = 4.0
    """Fixed-point range of secure aggregation: each weighted update value is clipped to [-clip, clip]."""
    secagg_neighbours: int | None = None
    """k of the SecAgg+ graph (None: min(n − 1, 2⌈log2 n⌉ + 2))."""
    secagg_threshold: float = 0.5
    """Shamir threshold t = ⌊threshold · k⌋ + 1 of k neighbours."""
    secagg_timeout_s: float = 30.0
    """Deadline of each secure-aggregation stage but the inputs (which have the round's)."""
    dp_noise_multiplier: float | None = None
    """DP-FedAvg (docs/privacy.md): noise multiplier z of the Gaussian noise on each round's sum (None: no DP)."""
    dp_clip: float = 1.0
    """DP-FedAvg: L2 bound S of each worker's update (the initial bound with adaptive clipping)."""
    dp_delta: float = 1e-5
    dp_target_epsilon: float | None = None
    """End the run before a round would take ε above this."""
    dp_adaptive_quantile: float | None = None
    """Adaptive clipping (Andrew et al.): the quantile of update norms the bound tracks (None: fixed bound)."""
    dp_clip_lr: float = 0.2

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"--rounds must be at least 1, got {self.rounds}")
        check_mode(self.compress)
        if not 0 < self.heartbeat_interval_s < self.liveness_s:
            raise ConfigError("heartbeat interval must be positive and shorter than the liveness timeout",
                              "e.g. --heartbeat-interval 1 --liveness 10")
        if self.eval_every < 1:
            raise ConfigError(f"--eval-every must be at least 1, got {self.eval_every}")
        if self.fed_eval_every < 0:
            raise ConfigError(f"--fed-eval-every must be >= 0, got {self.fed_eval_every}", "use 0 to turn it off")
        if not 0 < self.fed_eval_fraction <= 1:
            raise ConfigError(f"--fed-eval-fraction must be in (0, 1], got {self.fed_eval_fraction}")
        if self.target_accuracy is not None and not 0 < self.target_accuracy <= 1:
            raise ConfigError(f"--target-accuracy must be in (0, 1], got {self.target_accuracy}")
        parse_policy(self.policy)
        if self.history_mb < 0:
            raise ConfigError(f"--history-mb must be >= 0, got {self.history_mb}",
                              "use 0 to always send the model dense")
        if self.max_message_bytes < 1024:
            raise ConfigError(f"max message size {self.max_message_bytes} is too small")
        if self.chunk_above == 0:
            object.__setattr__(self, "chunk_above", min(64 * 2**20, self.max_message_bytes * 3 // 4))
        if not 1024 <= self.chunk_bytes <= self.max_message_bytes // 2:
            raise ConfigError(f"chunk size {self.chunk_bytes} must be 1 KiB .. half the max message size")
        if not 0 < self.chunk_above <= self.max_message_bytes * 3 // 4:
            raise ConfigError(f"--chunk-above-mb ({self.chunk_above} bytes) must be positive and at most 3/4 of "
                              f"--max-message-mb ({self.max_message_bytes} bytes)", "lower --chunk-above-mb")
        if self.best_metric is not None and not _METRIC_NAME.match(self.best_metric):
            raise ConfigError(f"--best-metric {self.best_metric!r} is not a metrics field name",
                              "pass a field of metrics.jsonl such as test_accuracy or fed_eval_loss, or none")
        if self.best_mode not in (None, "max", "min"):
            raise ConfigError(f"--best-mode {self.best_mode!r} is neither max nor min", "pass --best-mode max or min")
        if self.keep_models is not None and self.keep_models < 1:
            raise ConfigError(f"--keep-models must be at least 1 or all, got {self.keep_models}",
                              "pass --keep-models 1 to keep only the current model")
        self._check_secure_aggregation()
        self._check_dp()
        if (self.curve_secret_key is None) != (self.allowed_keys is None):
            raise ConfigError("CURVE needs both --secret-key and --allowed-keys", "pass both, or neither")
        # An unknown strategy is refused here too, and one not defined for the policy (FedAdam under async).
        get_strategy_class(self.strategy).check_policy(policy_name(self.policy))

    def _check_secure_aggregation(self) -> None:
        if not self.secure_aggregation:
            return
        if self.strategy not in SECURE_STRATEGIES:
            raise ConfigError(f"--secure-aggregation sums dense updates; --strategy {self.strategy} sends sparse "
                              "ones, whose indices a sum cannot hide", "use --strategy fedavg or fedsgd")
        if self.policy != "sync":
            raise ConfigError(f"--secure-aggregation needs rounds (--policy sync); {self.policy} applies updates "
                              "one by one, and the sum of one is that update", "drop --policy")
        if not (0 < self.secagg_clip < float("inf")):
            raise ConfigError(f"--secagg-clip must be a positive number, got {self.secagg_clip}")
        if self.secagg_neighbours is not None and not 2 <= self.secagg_neighbours <= MAX_SECAGG_PEERS:
            raise ConfigError(f"--secagg-neighbours must be 2..{MAX_SECAGG_PEERS}, got {self.secagg_neighbours}")
        if not 0 < self.secagg_threshold < 1:
            raise ConfigError(f"--secagg-threshold must be in (0, 1), got {self.secagg_threshold}",
                              "e.g. 0.5: a majority of a worker's neighbours")
        if not self.secagg_timeout_s > 0:
            raise ConfigError(f"--secagg-timeout must be positive, got {self.secagg_timeout_s}")

    def dp_config(self) -> DPConfig | None:
        if self.dp_noise_multiplier is None:
            return None
        return DPConfig(self.dp_noise_multiplier, self.dp_clip, self.dp_delta, self.dp_target_epsilon,
                        self.dp_adaptive_quantile, self.dp_clip_lr,
                        "distributed" if self.secure_aggregation else "central")

    def _check_dp(self) -> None:
        z = self.dp_noise_multiplier
        if z is None:
            if self.dp_target_epsilon is not None or self.dp_adaptive_quantile is not None:
                raise ConfigError("--dp-target-epsilon and --dp-adaptive-quantile need differential privacy on",
                                  "pass --dp-noise-multiplier Z (e.g. 1.0)")
            return
        if not (z > 0 and math.isfinite(z)):
            raise ConfigError(f"--dp-noise-multiplier must be a positive number, got {z}", "e.g. 1.0")
        if not (self.dp_clip > 0 and math.isfinite(self.dp_clip)):
            raise ConfigError(f"--dp-clip must be a positive number, got {self.dp_clip}", "e.g. 1.0")
        if not 0 < self.dp_delta < 1:
            raise ConfigError(f"--dp-delta must be in (0, 1), got {self.dp_delta}", "e.g. 1e-5")
        if self.dp_target_epsilon is not None and not self.dp_target_epsilon > 0:
            raise ConfigError(f"--dp-target-epsilon must be positive, got {self.dp_target_epsilon}")
        if self.dp_adaptive_quantile is not None and not 0 < self.dp_adaptive_quantile < 1:
            raise ConfigError(f"--dp-adaptive-quantile must be in (0, 1), got {self.dp_adaptive_quantile}",
                              "e.g. 0.5: the median update norm")
        if not self.dp_clip_lr > 0:
            raise ConfigError(f"--dp-clip-lr must be positive, got {self.dp_clip_lr}")
        if self.secure_aggregation and self.dp_adaptive_quantile is not None:
            raise ConfigError("--dp-adaptive-quantile with --secure-aggregation is not available: the broker would "
                              "need each worker's clipping indicator, which the secure sum hides",
                              "use a fixed --dp-clip with secure aggregation (distributed DP)")
        fewest = max(math.floor(self.sync.fraction * self.sync.min_workers + 1e-9), 1)
        if self.dp_adaptive_quantile is not None and fewest <= 10 * z:
            raise ConfigError(f"adaptive clipping's noisy count (σ = m/20) spends more than noise multiplier {z:g} "
                              f"allows unless every round samples m > {10 * z:g} workers; with --min-workers "
                              f"{self.sync.min_workers} and --fraction {self.sync.fraction:g} a round may sample "
                              f"{fewest}", f"raise --min-workers above {math.ceil(10 * z / self.sync.fraction)}, or "
                                         "drop --dp-adaptive-quantile")
        if self.strategy not in SECURE_STRATEGIES:
            raise ConfigError(f"DP-FedAvg clips and noises dense updates; --strategy {self.strategy} is not one "
                              "(Selective SGD has its own DP option, dp_epsilon)", "use --strategy fedavg or fedsgd")
        if self.policy != "sync":
            raise ConfigError(f"DP-FedAvg accounts rounds (--policy sync), not --policy {self.policy}",
                              "drop --policy")
        try:
            import dp_accounting  # noqa: F401
        except ImportError:
            raise ConfigError("DP-FedAvg's accountant needs the dp-accounting package, which is not installed",
                              "pip install 'fedctl[dp]'") from None
