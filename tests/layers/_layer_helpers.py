"""Shared helpers of the layer tests: dense configs, known-rank factors, MAC counting."""
from math import prod
from typing import Any

import torch
from torch import nn

from tensorslim.tensor.results import CPTensor, SVDResult, TTMatrix, TuckerTensor

S, T = 8, 12  # in / out channels of the test convs (divisible by groups 1, 2, 4)
SPATIAL_2D = (9, 7)
LENGTH_1D = 11

CONV2D_CONFIGS: list[dict[str, Any]] = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=(3, 2), stride=2, padding=(1, 0)),
    dict(kernel_size=3, stride=(2, 1), padding=2, dilation=2, bias=False),
    dict(kernel_size=3, padding="same", dilation=(1, 2)),
    dict(kernel_size=(4, 2), padding="same"),  # asymmetric zero padding
    dict(kernel_size=3, padding="valid"),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
    dict(kernel_size=(2, 3), padding="same", dilation=2, padding_mode="replicate"),
    dict(kernel_size=3, stride=2, padding=(2, 1), padding_mode="circular"),
    dict(kernel_size=3, padding=1, groups=2),
    dict(kernel_size=(3, 1), padding=1, groups=4, padding_mode="reflect", bias=False),
    dict(kernel_size=1),
]
CONV1D_CONFIGS: list[dict[str, Any]] = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=4, padding="same", padding_mode="circular"),
    dict(kernel_size=5, stride=2, dilation=2, padding=3, groups=2),
    dict(kernel_size=3, padding="valid", groups=4, bias=False),
    dict(kernel_size=3, padding=2, padding_mode="reflect", stride=3),
]
# rank per method (totals over groups; divisible by 4)
RANKS = {"cp": 8, "tucker": (4, 8), "svd": 4}


def config_id(cfg: dict[str, Any]) -> str:
    return "-".join(f"{k}={v}" for k, v in cfg.items()).replace(" ", "")


def dense_conv(dims: int, cfg: dict[str, Any]) -> nn.Module:
    torch.manual_seed(0)
    cls = nn.Conv2d if dims == 2 else nn.Conv1d
    return cls(S, T, **cfg).double()


def conv_input(dims: int, batch: int = 2, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    shape = (batch, S, *SPATIAL_2D) if dims == 2 else (batch, S, LENGTH_1D)
    return torch.randn(shape, generator=g, dtype=dtype)


def _rand(*shape: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float64)


def known_factors(method: str, conv: nn.Module, rank: Any) -> tuple[list[Any], torch.Tensor]:
    """Random per-group factors of ``method`` at ``rank`` and the exact kernel they build."""
    g = torch.Generator().manual_seed(2)
    groups = conv.groups
    tg, sg = conv.out_channels // groups, conv.in_channels // groups
    k = tuple(conv.kernel_size)
    parts, kernels = [], []
    for _ in range(groups):
        if method == "cp":
            r = rank // groups
            cp = CPTensor(_rand(r, g=g), (_rand(tg, r, g=g), _rand(sg, r, g=g),
                                          *[_rand(kk, r, g=g) for kk in k]))
            parts.append(cp)
            kernels.append(cp.to_tensor())
        elif method == "tucker":
            r_in, r_out = rank[0] // groups, rank[1] // groups
            core, u_out, u_in = _rand(r_out, r_in, *k, g=g), _rand(tg, r_out, g=g), _rand(sg, r_in, g=g)
            parts.append(TuckerTensor(core, (u_out, u_in), (0, 1)))
            kernels.append(torch.einsum("ab...,ia,jb->ij...", core, u_out, u_in))
        else:
            r = rank // groups
            svd = SVDResult(_rand(tg, r, g=g), _rand(r, g=g).abs(), _rand(r, sg * prod(k), g=g))
            parts.append(svd)
            kernels.append(svd.to_tensor().reshape(tg, sg, *k))
    return parts, torch.cat(kernels)


def known_tt(in_modes: tuple[int, ...], out_modes: tuple[int, ...], ranks: tuple[int, ...],
             seed: int = 3) -> TTMatrix:
    g = torch.Generator().manual_seed(seed)
    r = (1, *ranks, 1)
    cores = tuple(_rand(r[i], m, n, r[i + 1], g=g) / (m * n * r[i]) ** 0.5
                  for i, (m, n) in enumerate(zip(out_modes, in_modes)))
    return TTMatrix(cores, tuple(in_modes), tuple(out_modes))


def hook_macs(layer: nn.Module, x: torch.Tensor) -> int:
    """MACs per sample of the nn.Conv*/nn.Linear modules run by ``layer(x)`` (forward hooks),
    plus those of a conv the layer runs itself (a CP layer's fused depthwise conv), computed
    here from the output shape: R * kh * kw per output pixel."""
    total = 0
    batch = x.shape[0]

    def hook(m: nn.Module, inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        per_sample = out.numel() // batch
        if getattr(m, "fused", False):  # CPConv2d: depthwise R channels, kh x kw, output H' x W'
            total += m.rank * prod(m.geometry.kernel) * (per_sample // m.out_channels)
        if isinstance(m, nn.modules.conv._ConvNd):
            total += per_sample * (m.in_channels // m.groups) * prod(m.kernel_size)
        elif isinstance(m, nn.Linear):
            total += per_sample * m.in_features

    handles = [m.register_forward_hook(hook) for m in layer.modules()
               if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) or getattr(m, "fused", False)]
    try:
        with torch.no_grad():
            layer(x)
    finally:
        for h in handles:
            h.remove()
    return total


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
