"""Shared small models for the plan / surgery / cost tests."""
from __future__ import annotations

import pytest
import torch
from torch import nn


class SmallCNN(nn.Module):
    """Covers plain, strided, padded-'same', reflect-padded, grouped and depthwise convs,
    a non-square kernel, and Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),  # too small to save anything
            nn.ReLU(),
            nn.Conv2d(16, 48, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(48),
            nn.ReLU(),
            nn.Conv2d(48, 64, (3, 5), padding="same", padding_mode="reflect"),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1, groups=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1, groups=64),  # depthwise: cannot be factorized
            nn.ReLU(),
            nn.Conv2d(64, 96, 3, padding=2, dilation=2),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(384, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SeqNet(nn.Module):
    """Conv1d and Linear on a (B, T, C) sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(32, 64, 5, padding=2)
        self.proj = nn.Linear(64, 96)
        self.out = nn.Linear(96, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).transpose(1, 2)  # (B, T, 64)
        return self.out(torch.relu(self.proj(h))).mean(1)


@pytest.fixture
def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN().eval()


@pytest.fixture
def seq_net() -> nn.Module:
    torch.manual_seed(0)
    return SeqNet().eval()


@pytest.fixture
def image() -> torch.Tensor:
    return torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def sequence() -> torch.Tensor:
    return torch.randn(2, 32, 40, generator=torch.Generator().manual_seed(1))
