"""Test accuracy of a finished run's global model, as the broker holds it and with each worker's own BatchNorm
statistics (what FedBN evaluates).

    python evaluate.py --task task.py --state-dir runs/fashion-local/state --shards runs/fashion-local/shards \
        shard0 shard1

The global model comes from the state dir's last checkpoint. "as held" loads it into the task's PyTorch model: with
the statistics averaged by the federation, or, when they stay on the workers (FASHION_BN=local), with a fresh
model's (mean 0, variance 1), which no worker ever used. "with shardK's statistics" first re-estimates the
BatchNorm statistics on that worker's training shard (a cumulative average over one pass, the network otherwise in
evaluation mode): the global weights as that worker runs them under FedBN.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedctl.data.shards import load_shard
from fedctl.tasks import load_task

_BATCH = 250


def accuracy(net: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(torch.from_numpy(x[i:i + _BATCH])).argmax(1) for i in range(0, len(x), _BATCH)])
    return float((pred.numpy() == y).mean())


def recalibrate(net: nn.Module, x: np.ndarray) -> None:
    """BatchNorm statistics of ``x`` under the current weights; dropout stays off."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    net.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the pass
        m.train()
    with torch.no_grad():
        for i in range(0, len(x), _BATCH):
            net(torch.from_numpy(x[i:i + _BATCH]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--shards", type=Path, required=True, help="the run's partition directory")
    parser.add_argument("workers", nargs="*", help="the shards whose statistics to use (shard0 shard1)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = load_task(args.task)
    assert task.model is not None
    state = json.loads((args.state_dir / "state.json").read_text())
    with np.load(args.state_dir / state["model_file"]) as npz:
        weights = {k: torch.from_numpy(npz[k]) for k in npz.files if k in task.model().state_dict()}
    net = task.model()
    net.load_state_dict(weights, strict=False)  # FedBN: the statistics were never federated
    test = load_shard(args.shards, "test")
    statistics = "local (FedBN)" if task.local_buffers else "aggregated"
    print(f"statistics {statistics}: round {state.get('round', '?')}, test accuracy as held: "
          f"{accuracy(net, test.x, test.y):.4f}")
    for name in args.workers:
        recalibrate(net, load_shard(args.shards, name).x)
        print(f"  with {name}'s statistics: {accuracy(net, test.x, test.y):.4f}")


if __name__ == "__main__":
    main()
