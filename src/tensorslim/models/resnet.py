"""CIFAR-style ResNets (He et al. 2016) for small grayscale images.

The stem is one conv3x3 (no max-pool); stage ``i`` has ``blocks[i]`` BasicBlocks with
``channels[i] * width`` channels and stride 2 at its start (except the first stage).
Shortcuts that change shape are 1x1 conv + BN ("option B"), which keeps every layer a plain
module (torch.jit.script / torch.export friendly).
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from tensorslim.models._common import check_common, scaled


class BasicBlock(nn.Module):
    """Two conv3x3 + BN, identity (or 1x1 conv + BN) shortcut: (B, c_in, H, W) -> (B, c_out, H/s, W/s)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """``forward(x: (B, in_channels, H, W)) -> logits (B, num_classes)``."""

    def __init__(
        self,
        blocks: tuple[int, ...],
        channels: tuple[int, ...],
        *,
        width: float = 1.0,
        in_channels: int = 1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        check_common("resnet", width, in_channels, num_classes)
        if len(blocks) != len(channels) or not blocks or min(blocks) < 1:
            raise ValueError(f"resnet: need one positive block count per stage, got "
                             f"blocks={blocks}, channels={channels}")
        widths = [scaled(c, width) for c in channels]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages: list[nn.Module] = []
        c_in = widths[0]
        for i, (n, c) in enumerate(zip(blocks, widths)):
            layer = [BasicBlock(c_in if j == 0 else c, c, 2 if (j == 0 and i > 0) else 1)
                     for j in range(n)]
            stages.append(nn.Sequential(*layer))
            c_in = c
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.pool(self.layers(x))
        return self.fc(torch.flatten(x, 1))


def resnet20(*, width: float = 1.0, in_channels: int = 1, num_classes: int = 10) -> ResNet:
    """ResNet-20: 3 stages x 3 BasicBlocks, channels (16, 32, 64) * width."""
    return ResNet((3, 3, 3), (16, 32, 64), width=width, in_channels=in_channels,
                  num_classes=num_classes)


def resnet18(*, width: float = 1.0, in_channels: int = 1, num_classes: int = 10) -> ResNet:
    """ResNet-18 (CIFAR stem): 4 stages x 2 BasicBlocks, channels (64, 128, 256, 512) * width."""
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), width=width, in_channels=in_channels,
                  num_classes=num_classes)
