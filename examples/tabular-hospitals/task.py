"""A small MLP for the breast-cancer table (30 numeric features; class 0 malignant, 1 benign), for fedctl --task.

The features span five orders of magnitude (mean area ~ 650, mean smoothness ~ 0.1), so the model standardises
them itself, in its first layer. That layer keeps two running averages over the training batches it has seen, the
mean of x and the mean of x², as buffers. Buffers are federated like weights: FedAvg averages each hospital's,
weighted by its number of examples, so the broker's model holds the mean and second moment of all the hospitals'
training data together, and from them the exact variance. No statistic leaves a hospital except through that
average, every hospital trains and evaluates with the same standardisation, and the trained model (and its
`fedctl export`) takes raw features.
"""

import torch
from torch import nn

name = "breast-cancer-mlp"


class Standardize(nn.Module):
    """``(x - mean) / std`` per feature, with mean and E[x²] averaged over every training batch seen so far."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("sq_mean", torch.ones(features))
        # An integer buffer stays on each worker (docs/tasks.md): every hospital counts its own batches.
        self.register_buffer("batches", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.batches += 1
                rate = 1.0 / float(self.batches)  # a cumulative average: the first batch's statistics replace 0 and 1
                self.mean += rate * (x.mean(0) - self.mean)
                self.sq_mean += rate * ((x * x).mean(0) - self.sq_mean)
        variance = (self.sq_mean - self.mean * self.mean).clamp_min(0.0)
        return (x - self.mean) / torch.sqrt(variance + 1e-5)


def model() -> nn.Module:
    return nn.Sequential(Standardize(30), nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 2))


def optimizer(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr)
