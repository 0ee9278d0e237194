"""SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning", ICML 2020),
Algorithm 1 with option II for the control variates.

The broker holds the model x and the server control variate c; every worker i holds its own control variate c_i
(zero at first). In a round, each sampled worker receives x and c (c travels with the model as the extra tensors
``scaffold.c/<name>``, docs/protocol.md §5.6), starts from y = x and takes K local SGD steps

    y ← y − η_l · (g_i(y) − c_i + c)

(the trainer's gradient correction with offset c − c_i; K = the mini-batch steps of its E epochs with batch B, as
the trainer counts them, η_l the round's ``--lr``). Then (option II)

    c_i⁺ = c_i − c + (x − y) / (K · η_l)

and it pushes Δy = y − x (kind ``delta``) with Δc = c_i⁺ − c_i (the extra tensors ``scaffold.dc/<name>``), keeping
c_i⁺ as its private strategy state (saved with ``fedctl join --state-dir``, committed once the push is
acknowledged). A worker that took no step (K = 0) keeps c_i: Δc = 0.

The broker, over the round's sampled set S:

    x ← x + η_g · Σ_{i∈S} w_i · Δy_i,        c ← c + (1/N) · Σ_{i∈S} Δc_i

with w_i = 1/|S| (``weighting=uniform``, the paper's, the default) or n_i/n (``weighting=examples``, as FedAvg
weighs), η_g the option ``eta_g`` (default 1). c's update is never example-weighted: c estimates the mean of all N
workers' c_i. N is the number of workers connected when the round opened (the K that ``--fraction`` samples
from, at least |S|), which the round driver passes in the state (:data:`~fedctl.strategies.base.ROUND_WORKERS`);
with a fixed population it is the paper's N, and with workers coming and going c follows the population of each
round. Without it (a direct call) N = |S|, full participation. c is kept in the broker state as ``c/<name>``
(float32, as it travels), which the checkpoint holds, so a resumed broker continues with it.

Sync rounds only (``policies``): the rule needs every update of a round computed on the same x and c. Option II
reads (x − y)/(K·η_l) as the mean corrected gradient, which holds for plain SGD at η_l: a user task with its own
``optimizer()`` (momentum, Adam) is refused at the worker, whose training then fails with that one line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedctl.errors import ConfigError, ModelMismatch
from fedctl.strategies.base import (
    EXTRA_TENSORS,
    ROUND_WORKERS,
    AggregateResult,
    ClientResult,
    LocalTrainer,
    Option,
    Params,
    Strategy,
    Update,
)
from fedctl.strategies.kernels import example_weights, weighted_sum
from fedctl.strategies.registry import register
from fedctl.wire.constants import EXTRA_SEPARATOR, KIND_DELTA
from fedctl.wire.tensors import Tensor

C_PREFIX = "scaffold.c"
"""Extra tensors of the ``model`` message: the server control variate c, ``scaffold.c/<name>``."""
DC_PREFIX = "scaffold.dc"
"""Extra tensors of the ``push``: the worker's control-variate change Δc_i, ``scaffold.dc/<name>``."""
CI_STATE = "scaffold.ci/"
"""The worker's private state: its control variate c_i, ``scaffold.ci/<name>``."""
C_STATE = "c/"
"""The broker's state: the server control variate c, ``c/<name>``."""
WEIGHTINGS = ("uniform", "examples")


def _extra(prefix: str, name: str) -> str:
    return f"{prefix}{EXTRA_SEPARATOR}{name}"


@register
class Scaffold(Strategy):
    """Control variates c (broker) and c_i (each worker) correct local drift: y ← y − η_l(g_i(y) − c_i + c).

    Workers push Δy and Δc_i; the broker sets x ← x + η_g · mean Δy and c ← c + ΣΔc_i / N (Algorithm 1, option II).
    """

    name = "scaffold"
    update_kind = KIND_DELTA
    policies = ("sync",)
    hierarchical = False  # (c moves by (1/N) Σ dc_i with N the workers and |S| the updates: both lost in a merge)
    extra_downlink = (C_PREFIX,)
    extra_uplink = (DC_PREFIX,)
    options = {"eta_g": Option(float, 1.0, "global step size η_g: x ← x + η_g · mean Δy",
                               lambda v: 0.0 < v < math.inf, "a finite number > 0"),
               "weighting": Option(str, "uniform", "mean of Δy: uniform (1/|S|, the paper) or examples (n_k/n)",
                                   lambda v: v in WEIGHTINGS, "uniform or examples")}

    # ------------------------------------------------------------------ the worker
    def client_update(self, weights: Params, trainer: LocalTrainer, task: Mapping[str, Any],
                      state: Mapping[str, np.ndarray]) -> ClientResult:
        if getattr(trainer, "own_optimizer", False):
            raise ConfigError("SCAFFOLD's control variates assume plain SGD at the round's --lr, and this task "
                              "trains with its own optimizer()", "drop optimizer() (gluon_optimizer()) from the "
                              "task, or use --strategy fedprox or fedavg")
        c = self._server_control(weights, task.get(EXTRA_TENSORS) or {})
        ci = {n: np.asarray(state.get(CI_STATE + n, np.zeros_like(w)), np.float32) for n, w in weights.items()}
        offset = {n: c[n] - ci[n] for n in weights}
        lr = float(task["lr"])
        result = trainer.fit(weights, int(task["epochs"]), int(task["batch_size"]), lr, int(task["seed"]),
                             grad_offset=offset)
        if "steps" not in result.metrics:
            raise ConfigError("SCAFFOLD needs the number of local steps K, which this trainer does not report",
                              "train with a fedctl framework adapter (its fit reports metrics['steps'])")
        steps = int(result.metrics["steps"])
        tensors: dict[str, Tensor] = {}
        new_state: Params = {}
        for name, x in weights.items():
            y = np.asarray(result.params[name], np.float32)
            x64 = np.asarray(x, np.float64)
            if steps > 0:  # option II: c_i⁺ = c_i − c + (x − y) / (K η_l)
                ci_new = (ci[name] - c[name] + (x64 - y) / (steps * lr)).astype(np.float32)
            else:
                ci_new = ci[name]
            tensors[name] = (y - x64).astype(np.float32)
            tensors[_extra(DC_PREFIX, name)] = (ci_new.astype(np.float64) - ci[name]).astype(np.float32)
            new_state[CI_STATE + name] = ci_new
        return ClientResult(KIND_DELTA, tensors, result.num_examples, {**result.metrics, "steps": float(steps)},
                            new_state)

    @staticmethod
    def _server_control(weights: Params, extras: Mapping[str, Any]) -> Params:
        """c from the model message's extra tensors (float32, one per model tensor)."""
        c: Params = {}
        for name, w in weights.items():
            value = extras.get(_extra(C_PREFIX, name))
            if value is None or np.shape(value) != np.shape(w):
                raise ConfigError(f"the model message carried no control variate {_extra(C_PREFIX, name)} of shape "
                                  f"{np.shape(w)}", "run the broker and the workers with the same fedctl version")
            c[name] = np.asarray(value, np.float32)
        return c

    # ------------------------------------------------------------------ the broker
    def downlink_extra(self, weights: Params, state: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """c, whole, as ``scaffold.c/<name>`` (zeros before the first round)."""
        return {_extra(C_PREFIX, n): self._control(state, n, w) for n, w in weights.items()}

    def aggregate(self, weights: Params, updates: Sequence[Update], state: dict[str, Any],
                  rng: np.random.Generator) -> AggregateResult:
        if not updates:
            raise ConfigError("cannot aggregate: no update")
        count = len(updates)
        shares = ([1.0 / count] * count if self.opts["weighting"] == "uniform"
                  else example_weights([u.num_examples for u in updates]).tolist())
        marker = DC_PREFIX + EXTRA_SEPARATOR
        moves = [{k: t for k, t in u.tensors.items() if not k.startswith(marker)} for u in updates]
        mean_dy = weighted_sum(moves, shares, np.dtype(np.float64))
        workers = max(int(state.get(ROUND_WORKERS) or count), count)
        dc_sum = weighted_sum([self._control_change(u, weights) for u in updates], [1.0] * count,
                              np.dtype(np.float64))
        eta = float(self.opts["eta_g"])
        new: Params = {}
        new_state = {k: v for k, v in state.items() if k != ROUND_WORKERS}
        dy_sq = c_sq = 0.0
        for name, x in weights.items():
            dy = mean_dy.get(name)
            new[name] = x if dy is None else (x.astype(np.float64) + eta * dy).astype(x.dtype)
            c = self._control(state, name, x).astype(np.float64) + dc_sum[name] / workers
            new_state[C_STATE + name] = c.astype(np.float32)
            dy_sq += 0.0 if dy is None else float(np.sum(np.square(dy)))
            c_sq += float(np.sum(np.square(c)))
        return AggregateResult(new, new_state, {"updates": float(count), "workers": float(workers),
                                                "delta_norm": math.sqrt(dy_sq), "c_norm": math.sqrt(c_sq)})

    def apply_async(self, weights: Params, updates: Sequence[Update], scales: Sequence[float],
                    state: dict[str, Any], rng: np.random.Generator, population: int = 0) -> AggregateResult:
        """Not defined: the broker refuses ssp/async with SCAFFOLD at start (``policies``); refused here too."""
        raise ConfigError("strategy 'scaffold' needs every update of a round computed on the same x and c",
                          "pass --policy sync")

    @staticmethod
    def _control(state: Mapping[str, Any], name: str, like: np.ndarray) -> np.ndarray:
        """c of tensor ``name`` from the broker state (float32), or zeros before the first round."""
        saved = state.get(C_STATE + name)
        if saved is None:
            return np.zeros(like.shape, np.float32)
        if np.shape(saved) != like.shape:
            raise ModelMismatch(f"the broker state's {C_STATE}{name} has shape {np.shape(saved)}, the model "
                                f"{like.shape}", "the checkpoint belongs to another model; pass a fresh --state-dir")
        return np.asarray(saved, np.float32)

    @staticmethod
    def _control_change(update: Update, weights: Params) -> dict[str, Tensor]:
        """Δc_i of ``update`` by model tensor name (the broker checked that it carries all of them)."""
        out: dict[str, Tensor] = {}
        for name in weights:
            value = update.tensors.get(_extra(DC_PREFIX, name))
            if value is None:
                raise ModelMismatch(f"the update of {update.worker} lacks {_extra(DC_PREFIX, name)}",
                                    "push Δc for every tensor of the model (docs/protocol.md §5.6)")
            out[name] = value
        return out
