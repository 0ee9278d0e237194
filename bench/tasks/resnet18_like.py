"""A ResNet-18-sized task for CIFAR-shaped images (3 x 32 x 32, 10 classes), used by bench/task_overhead.py.

ResNet-18 (He et al. 2016) with the CIFAR stem (one 3x3 convolution, no max-pool): four stages of two BasicBlocks
(64, 128, 256, 512 channels), BatchNorm after every convolution, a 1x1 projection where the shape changes. Built
from plain PyTorch, nothing downloaded. 11,173,962 parameters in 62 tensors; with the 40 BatchNorm running
statistics (federated, averaged like weights) 102 tensors and 11,183,562 float32 values (44.7 MB) travel per
model — well within a message's 256 tensors. The 20 integer ``num_batches_tracked`` buffers stay on each worker.

    fedctl serve --task bench/tasks/resnet18_like.py ...
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

name = "resnet18-like"


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an identity (or 1x1-projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18Like(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def model() -> nn.Module:
    return ResNet18Like()
