"""Deep Gradient Compression (Lin et al. 2018, "Deep Gradient Compression: Reducing the Communication Bandwidth
for Distributed Training", ICLR 2018): workers push the top 0.1% of their accumulated gradient, the rest waits.

Worker side, per round, on the gradient g of one mini-batch (four techniques of the paper, §3):

1. **Local gradient clipping** — g is scaled to L2 norm ``clip_norm`` when its global norm (all tensors
   together) is larger, *before* it is accumulated, so a spike cannot sit in the residual for many rounds. The
   paper clips at the global threshold scaled by N^(−1/2) for N workers: pass that product as ``clip_norm``.
2. **Momentum correction with local accumulation** — u ← m·u + g, v ← v + u: the momentum is accumulated locally
   (not the raw gradient), so a coordinate sent after T rounds of waiting carries what momentum SGD would have
   applied over those rounds.
3. **Momentum factor masking** — the top-k of |v| (threshold found by sampling, :func:`fedctl.compress.sampled_topk`)
   is sent and removed from v; u is zeroed at those indices, so stale momentum does not push a coordinate again
   after its delayed update.
4. **Warm-up training** — sparsity rises 75% → 93.75% → 98.4375% → 99.6% (1 − 4^−i) and then the final
   ``sparsity``, each stage lasting ``warmup_rounds`` rounds; the broker puts the round's value in the task, so
   every worker uses the same schedule.

Kept values go on the wire as float16 (``fp16``) when they fit; the rounding error stays in v, so nothing is lost:
Σ sent + v always equals Σ u. Tensors below ``dense_below`` elements (biases) are sent dense as plain momentum
SGD (u kept, nothing accumulated in v), as in the paper's reference code, which leaves such tensors
uncompressed: masking u on a tensor sent in full every round would switch its momentum off.

Broker side: w ← w − η_t · Σ_k (n_k/n) · sent_k, summed sparse (the kernels scatter each update into one
accumulator), with η_t = η · lr_decay^t after t aggregations as in :mod:`fedctl.strategies.fedsgd`.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedctl.compress.topk import index_dtype, sampled_topk
from fedctl.errors import ConfigError, ModelMismatch
from fedctl.strategies.base import AggregateResult, ClientResult, LocalTrainer, Option, Params, Strategy, Update
from fedctl.strategies.fedsgd import mean_gradient, sgd_step
from fedctl.strategies.registry import register
from fedctl.wire.constants import KIND_GRADIENT
from fedctl.wire.tensors import SparseTensor, Tensor

WARMUP_STAGES = (0.75, 0.9375, 0.984375, 0.99609375)
"""Sparsity of the warm-up stages, 1 − 4^−i (the paper rounds the last to 99.6%)."""
FP16_MAX = float(np.finfo(np.float16).max)
U_KEY, V_KEY = "dgc.u/", "dgc.v/"
"""Worker-state key prefixes of the momentum u and the accumulated residual v, followed by the tensor name."""


def warmup_sparsity(round_no: int, warmup_rounds: int, final: float, first: int = 0) -> float:
    """The sparsity of round ``round_no`` (1-based): the warm-up stage it falls in, then ``final``.

    Stage i (0-based) covers rounds ``i·warmup_rounds + 1 .. (i+1)·warmup_rounds``; ``warmup_rounds`` 0 skips the
    warm-up. With ``first`` > 0 the first stage (75%, the densest and so the costliest) lasts ``first`` rounds and
    the others follow it. A stage never exceeds ``final``, so a low final sparsity is not overshot during warm-up.
    """
    if warmup_rounds <= 0:
        return final
    r = max(round_no - 1, 0)
    if first > 0:
        stage = 0 if r < first else 1 + (r - first) // warmup_rounds
    else:
        stage = r // warmup_rounds
    return min(WARMUP_STAGES[stage], final) if stage < len(WARMUP_STAGES) else final


def keep_count(numel: int, sparsity: float) -> int:
    """k = max(1, round((1 − sparsity) · numel)), at most ``numel``."""
    return min(numel, max(1, round((1.0 - sparsity) * numel)))


def clip_by_global_norm(grads: Mapping[str, np.ndarray], clip_norm: float) -> tuple[Params, float]:
    """(g scaled to global L2 norm ``clip_norm`` if it is larger — new arrays —, the norm before clipping).

    ``clip_norm`` 0 leaves g unchanged. Raises ConfigError on a non-finite gradient: accumulated into v it would
    poison every later round, so it must not be pushed or saved.
    """
    norm = math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values()))
    if not math.isfinite(norm):
        bad = next(name for name, g in grads.items() if not np.isfinite(g).all())
        raise ConfigError(f"the gradient of {bad!r} is not finite; DGC does not accumulate it",
                          "lower --lr or set --opt clip_norm=<max L2 norm>")
    scale = clip_norm / norm if 0 < clip_norm < norm else 1.0
    return {name: np.asarray(g, dtype=np.float32) * np.float32(scale) for name, g in grads.items()}, norm


def _tensor_rng(seed: int, name: str) -> np.random.Generator:
    # One stream per (round seed, tensor): the selection does not depend on the order tensors are visited in.
    return np.random.default_rng([int(seed) % 2**64, zlib.crc32(name.encode())])


def _prior(state: Mapping[str, np.ndarray], key: str, like: np.ndarray) -> np.ndarray | float:
    """The saved array under ``key`` (read only), or 0.0 when there is none (first round, fresh worker)."""
    saved = state.get(key)
    if saved is None:
        return 0.0
    if saved.shape != like.shape:
        raise ModelMismatch(f"saved DGC state {key!r} has shape {saved.shape}, the gradient {like.shape}",
                            "the worker state belongs to another model; remove the worker's state dir")
    return saved


@dataclass(frozen=True)
class _Settings:
    momentum: float
    sparsity: float
    dense_below: int
    sample_ratio: float
    fp16: bool
    clip_norm: float
    seed: int
    scope: str = "layer"


def _accumulate(name: str, grad: np.ndarray, state: Mapping[str, np.ndarray], cfg: _Settings,
                new_state: Params) -> tuple[np.ndarray, np.ndarray | None]:
    """Momentum correction with local accumulation of one tensor: (u, v) as new arrays written into
    ``new_state``; v is None for a tensor below ``dense_below`` (plain momentum SGD, sent dense)."""
    # New arrays (never the saved ones, which a retried push starts from again), float32 and C-ordered whatever
    # the trainer or the saved state held, so the flat views below write through.
    u = np.ascontiguousarray(np.float32(cfg.momentum) * _prior(state, U_KEY + name, grad) + grad, np.float32)
    new_state[U_KEY + name] = u
    if grad.size < cfg.dense_below:
        return u, None
    v = np.ascontiguousarray(_prior(state, V_KEY + name, grad) + u, np.float32)
    new_state[V_KEY + name] = v
    return u, v


def _send(u: np.ndarray, v: np.ndarray, idx: np.ndarray, fp16: bool) -> SparseTensor:
    """Take the entries ``idx`` out of the residual v (exactly what is sent) and mask their momentum."""
    flat_v, flat_u = v.reshape(-1), u.reshape(-1)
    values = flat_v[idx]
    if fp16 and (values.size == 0 or float(np.max(np.abs(values))) <= FP16_MAX):
        values = values.astype(np.float16)
    flat_v[idx] -= values.astype(np.float32)  # exactly what was sent: fp16 rounding stays in the residual
    flat_u[idx] = 0.0  # momentum factor masking
    return SparseTensor(tuple(v.shape), idx.astype(index_dtype(v.size), copy=False), values)


def _compress(name: str, grad: np.ndarray, state: Mapping[str, np.ndarray], cfg: _Settings,
              new_state: Params) -> Tensor:
    """One tensor's momentum correction, selection and masking (scope "layer"); writes its new u, v."""
    u, v = _accumulate(name, grad, state, cfg, new_state)
    if v is None:
        return u.copy()
    idx = sampled_topk(v.reshape(-1), keep_count(v.size, cfg.sparsity), _tensor_rng(cfg.seed, name),
                       cfg.sample_ratio)
    return _send(u, v, idx, cfg.fp16)


def _compress_model(grads: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray], cfg: _Settings,
                    new_state: Params) -> dict[str, Tensor]:
    """Scope "model": one top-k over all compressible tensors together, so k = (1 − sparsity) · their total
    size is spent where the accumulated gradient is largest, whatever the layer; a tensor with nothing kept is
    left out of the push (zero)."""
    out: dict[str, Tensor] = {}
    pending: list[tuple[str, np.ndarray, np.ndarray]] = []
    for name, g in grads.items():
        u, v = _accumulate(name, g, state, cfg, new_state)
        if v is None:
            out[name] = u.copy()
        else:
            pending.append((name, u, v))
    if not pending:
        return out
    flat = np.concatenate([v.reshape(-1) for _, _, v in pending])
    idx = sampled_topk(flat, keep_count(flat.size, cfg.sparsity), _tensor_rng(cfg.seed, "*"), cfg.sample_ratio)
    offsets = np.cumsum([0] + [v.size for _, _, v in pending])
    bounds = np.searchsorted(idx, offsets)
    for i, (name, u, v) in enumerate(pending):
        local = idx[bounds[i]:bounds[i + 1]] - offsets[i]
        if local.size:
            out[name] = _send(u, v, local, cfg.fp16)
    return out


def _kept(tensor: Tensor) -> int:
    return tensor.nnz if isinstance(tensor, SparseTensor) else int(tensor.size)


@register
class DGC(Strategy):
    """Deep Gradient Compression: sparse momentum-corrected gradients up, one SGD step on their mean at the broker."""

    name = "dgc"
    update_kind = KIND_GRADIENT
    options = {
        "sparsity": Option(float, 0.999, "fraction of each large tensor's entries held back per round (final)",
                           lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
        "momentum": Option(float, 0.9, "momentum m of the worker-side momentum correction (0 = plain SGD)",
                           lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
        "clip_norm": Option(float, 0.0, "local clipping threshold on the L2 norm of the whole gradient; the paper "
                            "uses the global threshold times N^-1/2 for N workers (0 = off)",
                            lambda v: 0.0 <= v < math.inf, "a finite number >= 0"),
        "warmup_rounds": Option(int, 0, "rounds per warm-up stage (75%, 93.75%, 98.4375%, 99.6% sparsity, then "
                                "the final sparsity); 0 = no warm-up", lambda v: v >= 0, ">= 0"),
        "warmup_first": Option(int, 0, "rounds of the first warm-up stage (75%) when it should differ from "
                               "warmup_rounds: the densest stage costs most of the warm-up's bytes (0 = same)",
                               lambda v: v >= 0, ">= 0"),
        "sample_ratio": Option(float, 0.01, "fraction of a tensor sampled to estimate the top-k threshold",
                               lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
        "dense_below": Option(int, 256, "tensors with fewer elements are sent dense (biases)",
                              lambda v: v >= 0, ">= 0"),
        "fp16": Option(bool, True, "send kept values as float16 when they fit (the rounding stays in the residual)"),
        "scope": Option(str, "layer", "where top-k is taken: per tensor ('layer', the paper) or over the whole "
                        "model at once ('model': tensors with nothing kept are left out of the push)",
                        lambda v: v in ("layer", "model"), "'layer' or 'model'"),
    }

    def task_for_round(self, round_no: int, seed: int) -> dict[str, Any]:
        task = super().task_for_round(round_no, seed)
        task["sparsity"] = warmup_sparsity(round_no, self.opts["warmup_rounds"], self.opts["sparsity"],
                                           self.opts["warmup_first"])
        return task

    def _settings(self, task: Mapping[str, Any]) -> _Settings:
        """Options as the broker sent them in the task (falling back to this instance's), plus the round's sparsity."""
        raw = task.get("options") or {}
        opts = {k: self.options[k].parse(k, raw[k]) if k in raw else v for k, v in self.opts.items()}
        if "sparsity" in task:
            sparsity = self.options["sparsity"].parse("sparsity", task["sparsity"])
        else:
            sparsity = warmup_sparsity(int(task.get("round", 1)), opts["warmup_rounds"], opts["sparsity"],
                                       opts["warmup_first"])
        return _Settings(opts["momentum"], sparsity, opts["dense_below"], opts["sample_ratio"], opts["fp16"],
                         opts["clip_norm"], int(task["seed"]), opts["scope"])

    def client_update(self, weights: Params, trainer: LocalTrainer, task: Mapping[str, Any],
                      state: Mapping[str, np.ndarray]) -> ClientResult:
        cfg = self._settings(task)
        result = trainer.gradient(weights, int(task["batch_size"]), int(task["seed"]))
        grads, norm = clip_by_global_norm(result.params, cfg.clip_norm)
        new_state: Params = {}
        if cfg.scope == "model":
            tensors = _compress_model(grads, state, cfg, new_state)
        else:
            tensors = {name: _compress(name, g, state, cfg, new_state) for name, g in grads.items()}
        # Few metrics: each costs ~20 bytes in a push whose payload is a few hundred bytes at 99.9% sparsity.
        metrics = {k: float(v) for k, v in result.metrics.items() if k == "train_loss"}
        metrics["kept"] = float(sum(_kept(t) for t in tensors.values()))
        if cfg.clip_norm > 0:
            metrics["clipped"] = float(cfg.clip_norm < norm)
        return ClientResult(KIND_GRADIENT, tensors, result.num_examples, metrics, new_state)

    def aggregate(self, weights: Params, updates: Sequence[Update], state: dict[str, Any],
                  rng: np.random.Generator) -> AggregateResult:
        grad = mean_gradient(updates)
        nnz = sum(int(np.count_nonzero(g)) for g in grad.values())
        numel = sum(int(g.size) for g in grad.values())
        return sgd_step(self.task, weights, grad, state, {"updates": float(len(updates)), "nnz": float(nnz),
                                                          "density": nnz / numel if numel else 0.0})
