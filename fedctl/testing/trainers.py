"""Framework-free trainers for tests and benchmarks: a numpy MLP (the zoo's ``mlp``) and a no-op trainer.

Both implement the worker's Trainer protocol, so the broker and worker code paths run unchanged without MXNet
or PyTorch. The numpy MLP is exact (float64 maths, float32 results) and small enough for unit tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedctl.models import ModelSpec
from fedctl.worker.frameworks.base import Params, TrainResult


def _forward(w: Params, x: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    h = x.reshape(len(x), -1).astype(np.float64)
    acts = [h]
    for i, layer in enumerate(("fc1", "fc2", "fc3")):
        h = h @ w[f"{layer}.weight"].T.astype(np.float64) + w[f"{layer}.bias"]
        if i < 2:
            h = np.maximum(h, 0.0)
        acts.append(h)
    return acts, h


def _softmax_xent(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    loss = float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean())
    p[np.arange(len(y)), y] -= 1.0
    return loss, p / len(y)


def mlp_loss_grad(w: Params, x: np.ndarray, y: np.ndarray) -> tuple[float, Params]:
    """Mean cross-entropy of the zoo MLP and its gradient, by hand."""
    acts, logits = _forward(w, x)
    loss, delta = _softmax_xent(logits, y)
    grads: Params = {}
    for i, layer in reversed(list(enumerate(("fc1", "fc2", "fc3")))):
        grads[f"{layer}.weight"] = (delta.T @ acts[i]).astype(np.float32)
        grads[f"{layer}.bias"] = delta.sum(axis=0).astype(np.float32)
        if i > 0:
            delta = (delta @ w[f"{layer}.weight"].astype(np.float64)) * (acts[i] > 0)
    return loss, grads


@dataclass
class NumpyMLPTrainer:
    """Plain SGD on the zoo's ``mlp`` in numpy; a stand-in for a framework adapter in tests."""

    spec: ModelSpec
    x: np.ndarray
    y: np.ndarray
    backend: str = "numpy"

    def fit(self, weights: Params, epochs: int, batch_size: int, lr: float, seed: int, prox_mu: float = 0.0,
            grad_offset: Params | None = None) -> TrainResult:
        """Plain SGD, each step's gradient corrected by ``prox_mu · (w − weights) + grad_offset`` (see
        :class:`~fedctl.worker.frameworks.base.Trainer`)."""
        w = {k: np.array(v, dtype=np.float32) for k, v in weights.items()}
        start = {k: v.copy() for k, v in w.items()} if prox_mu else {}
        offset = grad_offset or {}
        rng, n = np.random.default_rng(seed), len(self.y)
        b = batch_size or n
        losses: list[float] = []
        steps = 0
        for _ in range(epochs):
            order = rng.permutation(n)
            losses = []
            for begin in range(0, n, b):
                idx = order[begin:begin + b]
                loss, g = mlp_loss_grad(w, self.x[idx], self.y[idx])
                losses.append(loss)
                for k in w:
                    step = g[k]
                    if prox_mu:
                        step = step + np.float32(prox_mu) * (w[k] - start[k])
                    if k in offset:
                        step = step + np.asarray(offset[k], np.float32)
                    w[k] -= np.float32(lr) * step
                steps += 1
        return TrainResult(w, n, {"train_loss": float(np.mean(losses)), "steps": steps})

    def gradient(self, weights: Params, batch_size: int, seed: int) -> TrainResult:
        n = len(self.y)
        idx = np.arange(n) if not batch_size else np.random.default_rng(seed).choice(n, min(batch_size, n), False)
        loss, g = mlp_loss_grad(weights, self.x[idx], self.y[idx])
        return TrainResult(g, n, {"train_loss": loss})

    def evaluate(self, weights: Params, batch_size: int = 1000) -> dict[str, float]:
        _, logits = _forward(weights, self.x)
        loss, _ = _softmax_xent(logits, self.y)
        return {"accuracy": float((logits.argmax(1) == self.y).mean()), "loss": loss, "num_examples": len(self.y)}


@dataclass
class NoOpTrainer:
    """Returns the weights unchanged (or a zero gradient) instantly: measures protocol and broker overhead."""

    spec: ModelSpec
    num_examples: int = 600
    backend: str = "noop"
    noise: float = 0.0
    """With noise > 0, ``fit`` returns w + ν, ν ~ N(0, noise²) drawn once per trainer (so each round costs one add,
    and the update is not the model it was given: what `fedctl bench round` and Flower's client both send)."""
    _nu: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def fit(self, weights: Params, epochs: int, batch_size: int, lr: float, seed: int, prox_mu: float = 0.0,
            grad_offset: Params | None = None) -> TrainResult:
        """No training, so no gradient to correct: ``prox_mu`` and ``grad_offset`` change nothing."""
        if not self.noise:
            return TrainResult({k: np.asarray(v) for k, v in weights.items()}, self.num_examples, {"train_loss": 0.0})
        if not self._nu:
            rng = np.random.default_rng(seed)
            self._nu = {k: self.noise * rng.standard_normal(np.shape(v), dtype=np.float32)
                        for k, v in weights.items()}
        return TrainResult({k: np.add(v, self._nu[k], dtype=np.float32) for k, v in weights.items()},
                           self.num_examples, {"train_loss": 0.0})

    def gradient(self, weights: Params, batch_size: int, seed: int) -> TrainResult:
        return TrainResult({k: np.zeros_like(v) for k, v in weights.items()}, self.num_examples, {"train_loss": 0.0})

    def evaluate(self, weights: Params, batch_size: int = 1000) -> dict[str, float]:
        return {"accuracy": 0.0, "loss": 0.0, "num_examples": 0}


def synthetic_digits(n: int, seed: int = 0, noise: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """A learnable 10-class problem shaped like MNIST: class templates plus Gaussian noise."""
    rng = np.random.default_rng(1234)
    templates = rng.normal(size=(10, 1, 28, 28)).astype(np.float32)
    r = np.random.default_rng(seed)
    y = r.integers(0, 10, size=n)
    x = templates[y] + noise * r.normal(size=(n, 1, 28, 28)).astype(np.float32)
    return x.astype(np.float32), y.astype(np.int64)
