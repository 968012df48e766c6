"""VGG-16 with batch norm for small grayscale images (28x28 or 32x32).

13 conv3x3 + BN + ReLU layers in 5 blocks, each block ended by a 2x2 max-pool (ceil mode, so
28 -> 14 -> 7 -> 4 -> 2 -> 1 and 32 -> 16 -> 8 -> 4 -> 2 -> 1), global average pooling and a
two-layer classifier. Channel counts are the standard ones times ``width``.
"""
from __future__ import annotations

import torch
from torch import nn

from tensorslim.models._common import check_common, scaled

# Standard VGG-16 configuration: channels per conv layer, "M" = max-pool.
VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


class VGG(nn.Module):
    """``forward(x: (B, in_channels, H, W)) -> logits (B, num_classes)``, H, W >= 1."""

    def __init__(
        self,
        cfg: tuple[int | str, ...] = VGG16_CFG,
        *,
        width: float = 1.0,
        in_channels: int = 1,
        num_classes: int = 10,
        hidden: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_common("vgg", width, in_channels, num_classes)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"vgg: dropout must be in [0, 1), got {dropout!r}")
        layers: list[nn.Module] = []
        c_in = in_channels
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
                continue
            if not isinstance(item, int) or item < 1:
                raise ValueError(f"vgg: cfg entries must be positive ints or 'M', got {item!r}")
            c_out = scaled(item, width)
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        hid = hidden if hidden is not None else c_in
        if not isinstance(hid, int) or hid < 1:
            raise ValueError(f"vgg: hidden must be a positive int or None, got {hidden!r}")
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(c_in, hid), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hid, num_classes),
        )
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def vgg16(
    *, width: float = 1.0, in_channels: int = 1, num_classes: int = 10,
    hidden: int | None = None, dropout: float = 0.0,
) -> VGG:
    """VGG-16-BN (13 conv layers) with channels ``[64 .. 512] * width``."""
    return VGG(VGG16_CFG, width=width, in_channels=in_channels, num_classes=num_classes,
               hidden=hidden, dropout=dropout)
