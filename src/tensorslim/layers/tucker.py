"""Tucker-2 convolutions (Kim et al. 2016).

A kernel W (T, S, *k) ~= G x_0 U_out x_1 U_in (partial Tucker over the channel modes) runs as
``1x1 (S -> r_in) -> k-conv core (r_in -> r_out; stride, dilation) -> 1x1 (r_out -> T, bias)``.
A grouped conv is decomposed per group (rank split evenly) and runs with grouped convs, so it
is exact at full rank.
"""
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ._conv import ConvGeometry, Stage, assign_, group_blocks, pointwise, spatial_conv
from ._convbase import FactorizedConv
from .base import Rank, check_int_rank, rel_error


class _TuckerConvNd(FactorizedConv):
    method = "tucker"

    @classmethod
    def _check_rank(cls, geo: ConvGeometry, rank: Any) -> tuple[int, int]:
        if isinstance(rank, (list, tuple)):
            if len(rank) != 2:
                raise ValueError(
                    f"{cls.__name__}: rank={rank!r} must be an int or (r_in, r_out)"
                )
            r_in, r_out = rank
        else:
            r_in = r_out = rank
        name = cls.__name__
        r_in = check_int_rank(name, "r_in", r_in, 1, geo.in_channels, geo.groups)
        r_out = check_int_rank(name, "r_out", r_out, 1, geo.out_channels, geo.groups)
        return (r_in, r_out)

    @classmethod
    def _stages(cls, geo: ConvGeometry, rank: Rank) -> list[Stage]:
        r_in, r_out = rank  # type: ignore[misc]
        one = (1,) * geo.dims
        zero = tuple((0, 0) for _ in range(geo.dims))
        g = geo.groups
        return [
            Stage(geo.in_channels, r_in, one, one, one, g, False, zero),
            Stage(r_in, r_out, geo.kernel, geo.stride, geo.dilation, g, False, geo.pads),
            Stage(r_out, geo.out_channels, one, one, one, g, geo.bias, zero),
        ]

    def _build(self, geo: ConvGeometry) -> None:
        first, core, last = self._stages(geo, self.rank)
        d = self.dims
        self.project_in = pointwise(d, first.in_channels, first.out_channels, geo.groups, False)
        self.core = spatial_conv(d, core, geo.conv_padding)
        self.project_out = pointwise(d, last.in_channels, last.out_channels, geo.groups,
                                     geo.bias)

    def _chain(self) -> tuple[list[Tensor], list[int], Optional[Tensor]]:
        geo = self.geometry
        r_in, r_out = self.rank
        ksize = self.core.weight[0, 0].numel()
        return (
            [self.project_in.weight, self.core.weight, self.project_out.weight],
            [geo.in_group, (r_in // geo.groups) * ksize, r_out // geo.groups],
            self.project_out.bias,
        )

    def _forward(self, x: Tensor) -> Tensor:
        """(B, S, *spatial) -> (B, T, *spatial_out), the factorized stages."""
        cl = self._cl_out(x)
        y = self.project_in(x)
        y = self._pad(y)
        y = self.core(y)
        return self.project_out(y, cl)

    @classmethod
    def from_factors(cls, conv: nn.Module, tuckers: Sequence[Any]) -> "_TuckerConvNd":
        """Build from one partial Tucker (modes (0, 1)) per group of ``conv``'s kernel.

        ``tuckers[i]``: core (r_out/g, r_in/g, *k), factors for modes 0 (T/g, r_out/g) and
        1 (S/g, r_in/g). The bias is copied from ``conv``.
        """
        geo = cls._geometry(conv)
        if len(tuckers) != geo.groups:
            raise ValueError(f"{cls.__name__}: got {len(tuckers)} Tucker factors for "
                             f"groups={geo.groups}; need one per group")
        cores, u_outs, u_ins = [], [], []
        for t in tuckers:
            modes = tuple(int(m) for m in t.modes)
            if sorted(modes) != [0, 1]:
                raise ValueError(f"{cls.__name__}: Tucker modes must be (0, 1), got {modes}")
            u_outs.append(t.factors[modes.index(0)])
            u_ins.append(t.factors[modes.index(1)])
            cores.append(t.core)
        rank = (sum(u.shape[1] for u in u_ins), sum(u.shape[1] for u in u_outs))
        layer = cls(**geo.conv_kwargs(), rank=rank)
        layer.to(device=conv.weight.device, dtype=conv.weight.dtype)
        one = (1,) * geo.dims
        assign_(layer.project_in.weight,
                torch.cat([u.t() for u in u_ins]).reshape(rank[0], geo.in_group, *one))
        assign_(layer.core.weight, torch.cat(cores))
        assign_(layer.project_out.weight,
                torch.cat(u_outs).reshape(geo.out_channels, rank[1] // geo.groups, *one))
        if conv.bias is not None:
            assign_(layer.project_out.bias, conv.bias)
        return layer

    @classmethod
    def from_conv(cls, conv: nn.Module, rank: Rank, **tucker_opts: Any) -> "_TuckerConvNd":
        """Partial Tucker (HOOI via ``tensorslim.tensor.tucker``) of each group's kernel.

        ``rank``: int r (r_in = r_out = r) or (r_in, r_out), totals over the groups.
        Sets ``approx_error`` = ||W - W^|| / ||W||.
        """
        geo = cls._geometry(conv)
        r_in, r_out = cls._check_rank(geo, rank)
        g = geo.groups
        w = conv.weight.detach().to(torch.float64)
        from ..tensor import tucker
        parts = [tucker(wg, (r_out // g, r_in // g), modes=(0, 1), **tucker_opts)
                 for wg in group_blocks(w, g)]
        layer = cls.from_factors(conv, parts)
        layer.approx_error = rel_error(torch.cat([p.to_tensor() for p in parts]), w)
        return layer


class TuckerConv2d(_TuckerConvNd):
    """Tucker-2 replacement of an ``nn.Conv2d``.

    ``TuckerConv2d(in_channels, out_channels, kernel_size, rank, stride=1, padding=0,
    dilation=1, groups=1, bias=True, padding_mode="zeros")``, rank = r or (r_in, r_out).
    Children: ``project_in`` 1x1 (S -> r_in), ``core`` (r_in -> r_out, kernel, stride,
    dilation), ``project_out`` 1x1 (r_out -> T, bias). Shapes: (B, S, H, W) -> (B, T, H', W').
    """

    dims = 2
    dense_types = (nn.Conv2d,)


class TuckerConv1d(_TuckerConvNd):
    """Tucker-2 replacement of an ``nn.Conv1d``; see ``TuckerConv2d``. (B, S, L) -> (B, T, L')."""

    dims = 1
    dense_types = (nn.Conv1d,)
