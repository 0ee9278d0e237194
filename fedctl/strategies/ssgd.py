"""Selective SGD (Shokri & Shmatikov, CCS 2015): sparse, bounded uploads of local changes, optionally with DP.

Each sampled participant trains locally (E epochs, batch B, rate η) from the parameters it received, computes
Δw = w_local − w_received and uploads only a fraction θ_u of Δw, each value bounded to [−γ, γ]; the broker adds
the uploads to the global parameters. Downloads may be partial too (θ_d): see :meth:`SelectiveSGD.downlink`.

Selection is **global over the model**, not per tensor: the c = round(θ_u · numel) entries are chosen among all
parameters at once, as in the paper, where the parameter vector is one vector. A layer whose changes are small
(e.g. a large first layer) may therefore upload nothing in a round while a small layer uploads all of it.

The differentially private variant (``dp_epsilon`` > 0) replaces the selection by the paper's sparse vector
technique; its exact formulas are in :func:`sparse_vector_upload`. By default ``dp_epsilon`` is the budget of one
whole upload (all c values), charged per round a worker takes part in. The paper states its budgets per uploaded
parameter (``dp_per=value``): one upload of c values then spends c·ε, and that is what fedctl charges. Because the
noise scales with c/ε_upload, a per-upload ε of 10 with c ≈ 1,000 is pure noise (the critics' point); the paper's
per-value budgets make it learn, at a total ε per upload in the thousands (docs/results.md).

``gamma`` defaults to inf (no bound): the bound exists to give the DP variant its sensitivity; without DP it only
caps the step of single entries. The DP variant refuses an infinite γ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedctl.errors import ConfigError
from fedctl.strategies.base import (
    AggregateResult,
    ClientResult,
    LocalTrainer,
    Option,
    Params,
    Strategy,
    TaskConfig,
    Update,
    exact_delta,
    merged,
)
from fedctl.strategies.kernels import accumulate, example_weights
from fedctl.strategies.registry import register
from fedctl.wire.constants import KIND_DELTA
from fedctl.wire.tensors import SparseTensor, Tensor

SELECT_MODES = ("largest", "random")
COMBINE_MODES = ("sum", "mean", "mean-sent")
NOISE_STREAM = 0x55D
"""Second word of the seed of the selection/noise generator, so it is independent of the trainer's shuffling,
which is seeded by task["seed"] alone."""


def _fraction(v: float) -> bool:
    return 0.0 < v <= 1.0


def _finite_nonneg(v: float) -> bool:
    return 0.0 <= v < math.inf


OPTIONS: dict[str, Option] = {
    "theta_u": Option(float, 0.1, "fraction θ_u of all parameters whose changes a participant uploads",
                      _fraction, "in (0, 1]"),
    "theta_d": Option(float, 1.0, "fraction θ_d of all parameters sent down: the most changed since the "
                      "worker's copy (1 = the exact model)", _fraction, "in (0, 1]"),
    "select": Option(str, "largest", "upload selection: 'largest' |Δw| or 'random' among |Δw| > tau",
                     lambda v: v in SELECT_MODES, "one of: largest, random"),
    "tau": Option(float, 0.0, "threshold τ of the 'random' selection and of the DP selection",
                  _finite_nonneg, "a finite number >= 0"),
    "gamma": Option(float, math.inf, "bound γ: uploaded values are clipped to [−γ, γ] (inf = no bound; the DP "
                    "variant needs a finite γ)", lambda v: v > 0, "> 0 (or inf)"),
    "combine": Option(str, "sum", "how the broker applies the round's uploads: 'sum' (the paper), 'mean' "
                      "(example-weighted over all uploads) or 'mean-sent' (each entry: the mean of the uploads that "
                      "carry it)", lambda v: v in COMBINE_MODES, "one of: sum, mean, mean-sent"),
    "dp_epsilon": Option(float, 0.0, "privacy budget ε of the DP variant (sparse vector technique); 0 = no DP",
                         _finite_nonneg, "a finite number >= 0 (0 turns DP off)"),
    "dp_per": Option(str, "upload", "what dp_epsilon is the budget of: 'upload' (all c values of one upload: "
                     "a real per-round guarantee) or 'value' (each uploaded value, as the paper states its budgets; "
                     "an upload then spends c·ε)", lambda v: v in ("upload", "value"), "one of: upload, value"),
}


def upload_count(fraction: float, numel: int) -> int:
    """c = round(fraction · numel), at least 1 for a non-empty model."""
    return min(numel, max(1, int(round(fraction * numel)))) if numel else 0


def float32_bound(gamma: float) -> float:
    """The largest float32 ≤ γ, so that values clipped to it and stored as float32 stay within [−γ, γ]."""
    if math.isinf(gamma):
        return gamma
    bound = np.float32(gamma)
    if float(bound) > gamma:
        bound = np.nextafter(bound, np.float32(0))
    return float(bound)


def select_largest(delta: np.ndarray, count: int) -> np.ndarray:
    """Sorted flat indices of the ``count`` largest |delta| (ties broken arbitrarily but deterministically)."""
    if count >= delta.size:
        return np.arange(delta.size)
    if count <= 0:
        return np.empty(0, dtype=np.int64)
    top = np.argpartition(-np.abs(delta), count - 1)[:count]
    return np.sort(top)


def select_random(delta: np.ndarray, count: int, tau: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted flat indices of a uniformly random subset of ``count`` entries with |delta| > τ (all of them when
    fewer than ``count`` exceed τ: the paper uploads *at most* θ_u)."""
    above = np.flatnonzero(np.abs(delta) > tau)
    if above.size <= count:
        return above
    return np.sort(rng.choice(above, size=count, replace=False))


def sparse_vector_upload(delta: np.ndarray, count: int, tau: float, gamma: float, epsilon: float,
                         rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The paper's differentially private selective upload (sparse vector technique), ε per upload.

    With c = ``count``, sensitivity Δf = 2γ (every value is bounded to [−γ, γ]), ε1 = 8ε/9 for the selection and
    ε2 = ε/9 for the release, and clip(x) = min(max(x, −γ), γ):

    * noisy threshold, drawn once: T̂ = τ + Lap(2·c·Δf / ε1);
    * the entries are visited in a uniformly random order (data-independent); entry i is selected when
      |clip(Δw_i)| + Lap(4·c·Δf / ε1) ≥ T̂, with fresh noise per entry, until c entries are selected;
    * each selected entry is released as clip(clip(Δw_i) + Lap(2·c·Δf / ε2)).

    The value is bounded *before* the noise is added as well as after, since only the bounded value has
    sensitivity Δf. Budget: the selection costs ε1 (standard SVT analysis; one threshold draw suffices because the
    per-entry noise already scales with c), and c' ≤ c released values at scale 2·c·Δf/ε2 cost at most ε2/2, so
    charging ε = ε1 + ε2 per upload is an upper bound. Uploads compose sequentially across rounds.

    Returns
    -------
    (indices, values): sorted flat indices (at most ``count``) and their released float64 values.
    """
    if not (epsilon > 0 and math.isfinite(gamma)):
        raise ConfigError("the DP upload needs ε > 0 and a finite bound γ", "pass --opt gamma=<bound>")
    eps1, eps2 = epsilon * 8.0 / 9.0, epsilon / 9.0
    sensitivity = 2.0 * gamma
    bounded = np.clip(delta, -gamma, gamma)
    threshold = tau + rng.laplace(0.0, 2.0 * count * sensitivity / eps1)
    order = rng.permutation(delta.size)
    noisy = np.abs(bounded[order]) + rng.laplace(0.0, 4.0 * count * sensitivity / eps1, size=delta.size)
    chosen = np.sort(order[noisy >= threshold][:count])
    released = bounded[chosen] + rng.laplace(0.0, 2.0 * count * sensitivity / eps2, size=chosen.size)
    return chosen, np.clip(released, -gamma, gamma)


def _flatten(params: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    return np.concatenate([np.asarray(params[n], dtype=np.float64).reshape(-1) for n in names]) if names \
        else np.empty(0)


def _unflatten(indices: np.ndarray, values: np.ndarray, like: Mapping[str, np.ndarray],
               dtype: np.dtype | None = None) -> dict[str, Tensor]:
    """Split sorted global ``indices`` and their ``values`` back into one tensor per name of ``like``: a
    SparseTensor of the entries that fall in it, or the dense tensor when every entry of it is there."""
    out: dict[str, Tensor] = {}
    offset = 0
    for name, ref in like.items():
        size, shape = int(ref.size), tuple(ref.shape)
        lo, hi = np.searchsorted(indices, [offset, offset + size])
        vals = values[lo:hi].astype(dtype or ref.dtype)
        if hi - lo == size:
            out[name] = vals.reshape(shape)
        else:
            local = (indices[lo:hi] - offset).astype(np.uint32 if size < 2**32 else np.uint64)
            out[name] = SparseTensor(shape, local, vals)
        offset += size
    return out


def _entries(tensor: Tensor) -> int:
    return tensor.nnz if isinstance(tensor, SparseTensor) else int(np.asarray(tensor).size)


@register
class SelectiveSGD(Strategy):
    """Distributed selective SGD: workers upload the θ_u fraction of their local change Δw, the broker adds them.

    ``combine`` = "sum" (default, the paper): w ← w + Σ_k Δw_k. "mean": w ← w + Σ_k (n_k/n) Δw_k. Because each
    upload is sparse and the participants' selections overlap only in part, the mean also divides entries that a
    single participant uploaded by K, so it learns more slowly; the sum, the paper's rule, trained better in the
    in-process check (tests/unit/test_ssgd.py) and is the default. "mean" bounds the step when many participants
    per round send dense (θ_u near 1) updates.

    With ``dp_epsilon`` > 0 every upload is selected and noised by :func:`sparse_vector_upload` (``select`` is
    then not used: the sparse vector technique is the private form of "random above τ") and the broker keeps the
    ε spent by each worker in its state (``epsilon_spent``, sequential composition) and reports the largest
    (``epsilon_max``).
    """

    name = "ssgd"
    update_kind = KIND_DELTA
    options = OPTIONS

    def __init__(self, task: TaskConfig) -> None:
        super().__init__(task)
        _check_combination(self.opts)

    def _task_opts(self, task: Mapping[str, Any]) -> dict[str, Any]:
        """This round's options: the broker's, as the task carries them, over this instance's."""
        opts = dict(self.opts)
        for key, raw in (task.get("options") or {}).items():
            if key in self.options:
                opts[key] = self.options[key].parse(key, raw)
        _check_combination(opts)
        return opts

    def why_not_hierarchical(self) -> str | None:
        if self.opts["combine"] == "mean-sent":
            return ("combine=mean-sent divides each entry by the uploads that carry it, which one merged update "
                    "cannot tell the parent (pass --opt combine=sum or combine=mean)")
        if self.opts["dp_epsilon"] > 0:
            return "with dp_epsilon the broker charges each worker's own privacy budget"
        return None

    def merge(self, updates: Sequence[Update]) -> ClientResult:
        """combine=sum: the plain sum (the parent adds the merged sums: the flat sum); combine=mean: the default
        example-weighted mean."""
        self.check_hierarchical()
        if self.opts["combine"] == "sum":
            return merged(updates, [1.0] * len(updates))
        return super().merge(updates)

    def client_update(self, weights: Params, trainer: LocalTrainer, task: Mapping[str, Any],
                      state: Mapping[str, np.ndarray]) -> ClientResult:
        opts = self._task_opts(task)
        seed = int(task["seed"])
        result = trainer.fit(weights, int(task["epochs"]), int(task["batch_size"]), float(task["lr"]), seed)
        names = list(weights)
        delta = _flatten(result.params, names) - _flatten(weights, names)
        count = upload_count(float(opts["theta_u"]), delta.size)
        rng = np.random.default_rng([seed, NOISE_STREAM])
        gamma = float32_bound(float(opts["gamma"]))
        metrics = dict(result.metrics)
        if opts["dp_epsilon"] > 0:
            chosen, values = sparse_vector_upload(delta, count, float(opts["tau"]), gamma,
                                                  upload_epsilon(opts, count), rng)
            metrics["epsilon_round"] = upload_epsilon(opts, count)
        else:
            if opts["select"] == "largest":
                chosen = select_largest(delta, count)
            else:
                chosen = select_random(delta, count, float(opts["tau"]), rng)
            values = np.clip(delta[chosen], -gamma, gamma)
        metrics["uploaded"] = float(chosen.size)
        metrics["upload_fraction"] = chosen.size / max(delta.size, 1)
        tensors = _unflatten(chosen, values, weights, np.dtype(np.float32))
        return ClientResult(KIND_DELTA, tensors, result.num_examples, metrics)

    def aggregate(self, weights: Params, updates: Sequence[Update], state: dict[str, Any],
                  rng: np.random.Generator) -> AggregateResult:
        if not updates:
            raise ConfigError("cannot aggregate: no update")
        mode = self.opts["combine"]
        if mode == "sum":
            coeffs = [1.0] * len(updates)
        else:
            coeffs = example_weights([u.num_examples for u in updates]).tolist()
        new: Params = {}
        for name, w in weights.items():
            acc = w.astype(np.float64)
            if mode == "mean-sent":
                # Each entry moves by the example-weighted mean of the uploads that carry it.
                total, weight = np.zeros(w.size), np.zeros(w.size)
                for u, coeff in zip(updates, coeffs):
                    if name in u.tensors:
                        accumulate(total, _flat(u.tensors[name]), coeff)
                        accumulate(weight, _flat(_ones_like(u.tensors[name])), coeff)
                sent = weight > 0
                acc.reshape(-1)[sent] += total[sent] / weight[sent]
            else:
                for u, coeff in zip(updates, coeffs):
                    if name in u.tensors:  # a left-out tensor is zero
                        accumulate(acc, u.tensors[name], coeff)  # sparse uploads scatter into one accumulator
            new[name] = acc.astype(w.dtype)
        nnz = sum(_entries(t) for u in updates for t in u.tensors.values())
        metrics = {"updates": float(len(updates)), "uploaded_nnz": float(nnz)}
        new_state = dict(state)
        eps = upload_epsilon(self.opts, upload_count(float(self.opts["theta_u"]),
                                                     sum(int(w.size) for w in weights.values())))
        if eps > 0:
            # The broker charges the budget it configured (and sent in the task), not what a worker reports.
            spent = {str(k): float(v) for k, v in dict(state.get("epsilon_spent", {})).items()}
            for u in updates:
                spent[u.worker] = spent.get(u.worker, 0.0) + eps
            new_state["epsilon_spent"] = spent
            metrics["epsilon_round"] = eps
            metrics["epsilon_max"] = max(spent.values())
        return AggregateResult(new, new_state, metrics)

    def downlink(self, current: Params, base: Params | None) -> dict[str, Tensor] | None:
        """Send the θ_d fraction of all entries that changed most since ``base``, as their new values.

        The entries are the round(θ_d · numel) largest |current − base| over the whole model (only entries that
        changed at all). With θ_d < 1 the worker's copy becomes a mix of versions: new values at those entries,
        older ones elsewhere, as in the paper, where a participant overwrites only the downloaded parameters.
        θ_d = 1 sends the exact delta (the worker's copy equals ``current``); ``base`` None sends the dense model.
        """
        if base is None:
            return None
        theta_d = float(self.opts["theta_d"])
        if theta_d >= 1.0:
            return exact_delta(current, base)
        names = list(current)
        new = _flatten(current, names)
        change = np.abs(new - _flatten(base, names))
        changed = np.flatnonzero(change > 0)
        count = upload_count(theta_d, new.size)
        if changed.size > count:
            changed = np.sort(changed[np.argpartition(-change[changed], count - 1)[:count]])
        return _unflatten(changed, new[changed], current)


def upload_epsilon(opts: Mapping[str, Any], count: int) -> float:
    """The ε one upload of ``count`` values spends: ``dp_epsilon``, or ``count`` times it with ``dp_per=value``."""
    eps = float(opts["dp_epsilon"])
    return eps * count if opts.get("dp_per") == "value" else eps


def _check_combination(opts: Mapping[str, Any]) -> None:
    if opts["dp_epsilon"] > 0 and math.isinf(opts["gamma"]):
        raise ConfigError("ssgd with dp_epsilon > 0 needs a finite bound gamma (the sensitivity is 2·gamma)",
                          "pass e.g. --opt gamma=0.01 with --opt dp_epsilon=...")


def _flat(t: Tensor) -> Tensor:
    if isinstance(t, SparseTensor):
        return SparseTensor((int(np.prod(t.shape)),), t.indices, t.values)
    return np.asarray(t).reshape(-1)


def _ones_like(t: Tensor) -> Tensor:
    if isinstance(t, SparseTensor):
        return SparseTensor(t.shape, t.indices, np.ones(t.values.shape, np.float32))
    return np.ones(np.shape(t), np.float32)
