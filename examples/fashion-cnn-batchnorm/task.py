"""A CNN with BatchNorm and dropout for Fashion-MNIST, written once for PyTorch and once for MXNet Gluon.

PyTorch and MXNet workers train it side by side in one run (docs/tasks.md, "MXNet Gluon"). The two definitions
list the same layers in the same order, so their tensors pair up one by one without `gluon_names()`:

    PyTorch state_dict          Gluon parameter           shape
    0.weight, 0.bias            0.weight, 0.bias          (32, 1, 3, 3), (32,)
    1.weight, 1.bias            1.gamma, 1.beta           (32,)
    1.running_mean, _var        1.running_mean, _var      (32,)          BatchNorm statistics (buffers)
    1.num_batches_tracked       —                                        an integer buffer: never federated
    ...                         ...
    14.weight, 14.bias          14.weight, 14.bias        (10, 320), (10,)

1,026,698 trainable parameters (the 3136 x 320 dense layer holds most of them) and 832 BatchNorm statistics.

The BatchNorm statistics are averaged by the federation like the weights (the default), or kept on each worker
(FedBN, Li et al. 2021) when the environment of the broker and of every worker has FASHION_BN=local. The broker
and its workers must agree: a worker of the other choice is refused with the first differing tensor.

Both frameworks' defaults agree: BatchNorm epsilon 1e-5, and PyTorch's momentum=0.1 is Gluon's momentum=0.9 (the
weight of the old running value). Each framework imports lazily, so a machine with only one of them installed runs
its own half of this file.
"""

import os

name = "fashion-cnn-bn"
local_buffers = os.environ.get("FASHION_BN", "aggregated") == "local"
input_shape = (1, 28, 28)  # one image: fedctl partition's Fashion-MNIST shards, normalised, channels first
_MOMENTUM = 0.9  # SGD momentum, the same in both frameworks


def model():
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),  # 0-3: 32 x 14 x 14
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),  # 4-7: 64 x 7 x 7
        nn.Dropout(0.25), nn.Flatten(),  # 8-9
        nn.Linear(64 * 7 * 7, 320), nn.BatchNorm1d(320), nn.ReLU(), nn.Dropout(0.5),  # 10-13
        nn.Linear(320, 10))  # 14


def gluon_model():
    from mxnet.gluon import nn

    net = nn.HybridSequential()
    net.add(
        nn.Conv2D(32, 3, padding=1, in_channels=1), nn.BatchNorm(in_channels=32), nn.Activation("relu"),
        nn.MaxPool2D(2),
        nn.Conv2D(64, 3, padding=1, in_channels=32), nn.BatchNorm(in_channels=64), nn.Activation("relu"),
        nn.MaxPool2D(2),
        nn.Dropout(0.25), nn.Flatten(),
        nn.Dense(320, in_units=64 * 7 * 7), nn.BatchNorm(in_channels=320), nn.Activation("relu"), nn.Dropout(0.5),
        nn.Dense(10, in_units=320))
    return net  # uninitialised: fedctl initialises it, and the run's weights replace those anyway


def optimizer(params, lr):
    import torch

    return torch.optim.SGD(params, lr=lr, momentum=_MOMENTUM)


def gluon_optimizer(params, lr):
    from mxnet import gluon

    return gluon.Trainer(params, "sgd", {"learning_rate": lr, "momentum": _MOMENTUM}, kvstore=None)
