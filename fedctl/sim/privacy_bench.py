"""``fedctl bench privacy``: what privacy costs, measured through the real broker and workers (virtual workers of
``fedctl simulate``, loopback TCP).

* ``secagg`` — secure aggregation against the same run without it, in one process run after run: median round
  time (round 1 left out), bytes per worker per round (both directions, counted on the broker's socket), the
  broker's own secure-aggregation compute (closing the stages, unmasking), and the same with a fraction of the
  workers lost after sending their masked input (emulated: their process stops before the reveal).
* ``dp`` — DP-FedAvg's privacy–utility curve: ≥ 1,000 clients on MNIST, m of them per round, a fixed number of rounds;
  for each target ε the noise multiplier z that spends exactly it (bisection on the accountant), the final test
  accuracy beside the non-private run.
* ``ssgd`` — Selective SGD's DP variant with the paper's per-value budgets (``dp_per=value``) at several ε per value,
  with the ε one upload really spends (c values × ε).
"""

from __future__ import annotations

import logging
import math
import shutil
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedctl.api.simulation import ensure_partition, run_simulation
from fedctl.broker.config import BrokerConfig
from fedctl.broker.policy import SyncConfig
from fedctl.broker.store import Checkpointer
from fedctl.privacy import Accountant, RoundEvent
from fedctl.sim.runner import SimConfig
from fedctl.strategies import TaskConfig

log = logging.getLogger(__name__)
Announce = Callable[[str], None]


def _run(config: BrokerConfig, sim: SimConfig, evaluator: Any = None) -> list[dict[str, Any]]:
    """One measured run from scratch (a state dir left by an earlier benchmark would be resumed, not re-run)."""
    shutil.rmtree(config.state_dir, ignore_errors=True)
    run_simulation(config, sim, evaluator, None, None)
    return Checkpointer(config.state_dir).read_metrics()


def _evaluator(data: Path) -> Any:
    from fedctl.api.inputs import make_evaluator
    from fedctl.data.shards import load_shard
    from fedctl.models import get_model

    return make_evaluator("torch", get_model("mlp"), load_shard(data, "test"), threads=1)


# ------------------------------------------------------------------------------------------------ secure aggregation
def secagg_rows(out: Path, models: Sequence[str], workers: Sequence[int], rounds: int, vanish: Sequence[float],
                parallel: int, announce: Announce) -> list[dict[str, Any]]:
    rows = []
    for model in models:
        for n in workers:
            data = ensure_partition(None, "mnist-sample", n, None, None, 0, out / "partitions")
            runs: dict[str, list[dict[str, Any]]] = {}
            for label, secure, fraction in [("plain", False, 0.0), ("secure", True, 0.0),
                                            *((f"secure, {int(f * 100)}% lost", True, f) for f in vanish if f)]:
                announce(f"secure aggregation: {model}, {n} workers, {label}")
                state = out / "runs" / f"secagg-{model}-{n}-{label.replace(' ', '').replace(',', '-')}"
                # The lost workers are gone for good: later rounds open with the others.
                quorum = n - round(fraction * n)
                config = BrokerConfig(model=model, strategy="fedavg", rounds=rounds, task=TaskConfig(1, 10, 0.05),
                                      sync=SyncConfig(1.0, quorum, 300.0), state_dir=state, seed=0,
                                      eval_every=10**6,
                                      secure_aggregation=secure, secagg_timeout_s=30.0, liveness_s=5.0,
                                      done_linger_s=1.0)
                runs[label] = _run(config, SimConfig(data, backend="torch", parallel=parallel,
                                                     vanish_fraction=fraction, vanish_before=("sa_reveal", 2)))
            rows += _secagg_compare(model, n, runs)
    return rows


def _secagg_compare(model: str, n: int, runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    def per_round(records: list[dict[str, Any]], label: str) -> dict[str, float]:
        later = records[1:] if label == "plain" or "lost" not in label else records[1:2]  # the round with losses
        return {"round_s": statistics.median(r["duration_s"] for r in later),
                "bytes_per_worker": statistics.median((r["bytes_in"] + r["bytes_out"]) / max(r["selected"], 1)
                                                      for r in later),
                "broker_s": statistics.median((r.get("secagg") or {}).get("broker_s", 0.0) for r in later),
                "worker_s": statistics.median(r["update_metrics"].get("secagg_s", 0.0) for r in later),
                "train_s": statistics.median(r["update_metrics"].get("train_time_s", 0.0) for r in later),
                "inputs": statistics.median(r["participants"] for r in later),
                "lost": sum((r.get("secagg") or {}).get("dropped", 0) for r in records),
                "abandoned": max(((r.get("secagg") or {}).get("abandoned", 0) for r in records), default=0)}

    plain = per_round(runs["plain"], "plain")
    rows = []
    for label, records in runs.items():
        got = per_round(records, label)
        rows.append({"model": model, "workers": n, "run": label, **got,
                     "round_ratio": got["round_s"] / plain["round_s"],
                     "bytes_ratio": got["bytes_per_worker"] / plain["bytes_per_worker"],
                     "final_accuracy": records[-1].get("test_accuracy")})
    return rows


# ------------------------------------------------------------------------------------------------ DP-FedAvg
def noise_for(epsilon: float, population: int, sampled: int, rounds: int, delta: float) -> float:
    """The smallest noise multiplier z whose ``rounds`` rounds spend at most ``epsilon`` (bisection)."""
    acc = Accountant(delta)

    def spent(z: float) -> float:
        return acc.epsilon([RoundEvent(population, sampled, z)] * rounds)

    lo, hi = 0.1, 1.0
    while spent(hi) > epsilon:
        lo, hi = hi, hi * 2
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if spent(mid) > epsilon else (lo, mid)
    return hi


def dp_rows(out: Path, clients: int, sampled: int, rounds: int, epsilons: Sequence[float], clip: float,
            delta: float, source_dir: Path | None, parallel: int, announce: Announce,
            dataset: str = "mnist") -> list[dict[str, Any]]:
    data = ensure_partition(None, dataset, clients, None, source_dir, 0, out / "partitions")
    fraction = sampled / clients
    rows = []
    for eps in [math.inf, *epsilons]:
        z = None if math.isinf(eps) else noise_for(eps, clients, sampled, rounds, delta)
        announce(f"DP-FedAvg: ε = {eps:g}" + ("" if z is None else f" (z = {z:.3f})"))
        state = out / "runs" / f"dp-{clients}-{'none' if z is None else f'eps{eps:g}'}"
        config = BrokerConfig(model="mlp", strategy="fedavg", rounds=rounds, task=TaskConfig(1, 10, 0.1),
                              sync=SyncConfig(fraction, sampled, 600.0), state_dir=state, seed=0, eval_every=5,
                              dp_noise_multiplier=z, dp_clip=clip, dp_delta=delta, done_linger_s=1.0)
        records = _run(config, SimConfig(data, backend="torch", parallel=parallel), _evaluator(data))
        last = records[-1]
        rows.append({"epsilon_target": None if z is None else eps, "noise_multiplier": z, "clip": clip,
                     "clients": clients, "sampled": sampled, "q": fraction, "rounds": len(records), "delta": delta,
                     "epsilon": None if z is None else last["dp"]["epsilon"],
                     "final_accuracy": last["test_accuracy"],
                     "curve": [(r["round"], r["test_accuracy"]) for r in records if r["test_accuracy"] is not None]})
    return rows


# ------------------------------------------------------------------------------------------------ DP Selective SGD
def ssgd_rows(out: Path, epsilons: Sequence[float], rounds: int, source_dir: Path | None, parallel: int,
              announce: Announce, dataset: str = "mnist", clients: int = 100) -> list[dict[str, Any]]:
    fraction, theta_u, gamma = 0.1, 0.01, 0.01
    data = ensure_partition(None, dataset, clients, None, source_dir, 0, out / "partitions")
    count = max(1, round(theta_u * 109_386))
    rows = []
    for eps in [0.0, *epsilons]:
        announce(f"Selective SGD: ε per value = {eps:g}" if eps else "Selective SGD without DP")
        options = {"theta_u": str(theta_u), "combine": "mean-sent", "gamma": str(gamma)}
        if eps:
            options.update(dp_epsilon=str(eps), dp_per="value")
        state = out / "runs" / f"ssgd-dp-{eps:g}"
        config = BrokerConfig(model="mlp", strategy="ssgd", rounds=rounds, task=TaskConfig(1, 10, 0.1,
                                                                                            options=options),
                              sync=SyncConfig(fraction, max(round(fraction * clients), 1), 600.0), state_dir=state,
                              seed=0, eval_every=5,
                              done_linger_s=1.0)
        records = _run(config, SimConfig(data, backend="torch", parallel=parallel), _evaluator(data))
        rows.append({"epsilon_per_value": eps or None, "epsilon_per_upload": eps * count if eps else None,
                     "uploaded_values": count, "gamma": gamma, "theta_u": theta_u, "rounds": len(records),
                     "epsilon_max": records[-1]["strategy"].get("epsilon_max"),
                     "final_accuracy": records[-1]["test_accuracy"],
                     "curve": [(r["round"], r["test_accuracy"]) for r in records if r["test_accuracy"] is not None]})
    return rows
