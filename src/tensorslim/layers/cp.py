"""CP convolutions (Lebedev et al. 2015).

A kernel W (T, S, kh, kw) ~= sum_r w_r a_r o b_r o c_r o d_r runs as
``1x1 (S -> R) -> depthwise (kh x 1) -> depthwise (1 x kw) -> 1x1 (R -> T, bias)``, the CP
weights w folded into the last 1x1. Conv1d: ``1x1 -> depthwise k -> 1x1``. The first depthwise
conv carries the vertical stride/dilation, the second the horizontal ones. A grouped conv is
decomposed per group (R split evenly across groups) and runs with grouped 1x1 convs.

The two depthwise stages hold the paper's separable factors, but for small kernels
(kh*kw <= 2*(kh + kw): 3x3, 1xk, kx1, ...) the 2-D layer RUNS them as one depthwise kh x kw
conv whose kernel is their outer product (the same numbers): the stages are memory-bound on
CPU and one pass over the R-channel tensor beats two (256->256 3x3, rank 284, 32x32,
channels_last: 1.4x at batch 8, 2.4x at batch 64 for the depthwise part). ``cost`` and
``count`` report the MACs of what runs (R*kh*kw per output pixel instead of R*(kh + kw)).
"""
from math import prod
from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._conv import ConvGeometry, Stage, assign_, group_blocks, pointwise, spatial_conv
from ._convbase import FactorizedConv
from ..tensor import rel_error
from .base import Rank, check_finite, check_int_rank, check_module_finite, nearest_rank


def max_cp_rank(shape: Sequence[int]) -> int:
    """Generic upper bound of the CP rank of a tensor: min over n of prod of the other dims."""
    return min(prod(shape) // s for s in shape)


def _check_epc(layer: str, epc: object) -> None:
    if not isinstance(epc, bool):
        raise TypeError(f"{layer}: epc must be True or False (CPD-EPC after CP-ALS), got {epc!r}")


def fuses_depthwise(dims: int, kernel: Sequence[int]) -> bool:
    """Whether a CP conv runs its separable depthwise stages as one kh x kw depthwise conv."""
    return dims == 2 and prod(kernel) <= 2 * sum(kernel)


class _CPConvNd(FactorizedConv):
    method = "cp"
    # CP's rank-R intermediates are wider than the input and its depthwise stage is
    # memory-bound, so smaller, cache-sized chunks pay: 256->256 3x3, rank 283, batch 64,
    # channels-last, 2 threads (bench_layers-style interleaved medians): 51.8 ms at 8 MB vs
    # 57.6 ms at 32 MB with tcmalloc, 72.3 vs 75.0 ms with glibc malloc. Tucker-2 showed no
    # such gain (49.7 ms unchunked vs 52.9 ms at 8 MB) and keeps the 32 MB default.
    chunk_default = 8 << 20

    @classmethod
    def like(cls, module: nn.Module, rank: Rank, *, epc: bool = False, **opts: Any) -> "_CPConvNd":
        """Random init with ``module``'s geometry; ``epc`` (how ``from_conv`` decomposes) does
        not change the layer, it is accepted so a plan's options replay."""
        _check_epc(cls.__name__, epc)
        return super().like(module, rank, **opts)

    @classmethod
    def cost(cls, module: nn.Module, rank: Rank, in_shape: Sequence[int], out_shape: Sequence[int],
             *, epc: bool = False, **opts: Any) -> tuple[int, int]:
        """(params, MACs per sample), the same with or without ``epc``."""
        _check_epc(cls.__name__, epc)
        return super().cost(module, rank, in_shape, out_shape, **opts)

    @classmethod
    def valid_rank(cls, module: nn.Module, rank: Any, *, epc: bool = False, **opts: Any) -> int:
        """The valid rank nearest to ``rank`` (a multiple of groups, at most the generic
        maximum CP rank of the kernel per group); ``epc`` is accepted so a plan's options
        replay."""
        _check_epc(cls.__name__, epc)
        return super().valid_rank(module, rank, **opts)  # type: ignore[return-value]

    @classmethod
    def _max_rank(cls, geo: ConvGeometry) -> int:
        return max_cp_rank((geo.out_group, geo.in_group) + geo.kernel) * geo.groups

    @classmethod
    def _check_rank(cls, geo: ConvGeometry, rank: Any) -> int:
        return check_int_rank(cls.__name__, "rank", rank, 1, cls._max_rank(geo), geo.groups)

    @classmethod
    def _valid_rank(cls, geo: ConvGeometry, rank: Any) -> int:
        return nearest_rank(cls.__name__, "rank", rank, cls._max_rank(geo), geo.groups)

    @classmethod
    def _depth_stages(cls, geo: ConvGeometry, r: int) -> list[Stage]:
        """One depthwise stage per spatial dim; stage i convolves dim i only."""
        stages = []
        for i in range(geo.dims):
            kernel = tuple(k if j == i else 1 for j, k in enumerate(geo.kernel))
            stride = tuple(s if j == i else 1 for j, s in enumerate(geo.stride))
            dil = tuple(d if j == i else 1 for j, d in enumerate(geo.dilation))
            if geo.explicit_pad:  # F.pad pads every dim before the first depthwise conv
                pads = geo.pads if i == 0 else tuple((0, 0) for _ in geo.pads)
            else:
                pads = tuple(p if j == i else (0, 0) for j, p in enumerate(geo.pads))
            stages.append(Stage(r, r, kernel, stride, dil, r, False, pads))
        return stages

    @classmethod
    def _stages(cls, geo: ConvGeometry, rank: Rank) -> list[Stage]:
        r = int(rank)  # type: ignore[arg-type]
        one = (1,) * geo.dims
        zero = tuple((0, 0) for _ in range(geo.dims))
        g = geo.groups
        return [
            Stage(geo.in_channels, r, one, one, one, g, False, zero),
            *cls._depth_stages(geo, r),
            Stage(r, geo.out_channels, one, one, one, g, geo.bias, zero),
        ]

    @classmethod
    def _run_stages(cls, geo: ConvGeometry, rank: Rank) -> list[Stage]:
        """What runs: with small kernels the depthwise stages as one R-channel kh x kw
        depthwise conv (see the module docstring), else the stored stages."""
        stages = cls._stages(geo, rank)
        if not fuses_depthwise(geo.dims, geo.kernel):
            return stages
        r = int(rank)  # type: ignore[arg-type]
        fused = Stage(r, r, geo.kernel, geo.stride, geo.dilation, r, False, geo.pads)
        return [stages[0], fused, stages[-1]]

    def _build(self, geo: ConvGeometry) -> None:
        r = self.rank
        d = self.dims
        self.project_in = pointwise(d, geo.in_channels, r, geo.groups, False)
        depth = []
        for st in self._depth_stages(geo, r):
            conv_pad = (0,) * d if geo.explicit_pad else tuple(a for a, _ in st.pads)
            depth.append(spatial_conv(d, st, conv_pad))
        if d == 2:
            self.depth_h, self.depth_w = depth
        else:
            self.depth = depth[0]
        self.fused = fuses_depthwise(d, geo.kernel)
        # the fused conv's arguments: stride/dilation of both dims, the convs' own padding
        self.fused_stride = (geo.stride[0], geo.stride[-1])
        self.fused_dilation = (geo.dilation[0], geo.dilation[-1])
        self.fused_padding = (int(depth[0].padding[0]), int(depth[-1].padding[-1]))
        self.project_out = pointwise(d, r, geo.out_channels, geo.groups, geo.bias)

    def _depthwise(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    def _chain(self) -> tuple[list[Tensor], list[int], Optional[Tensor]]:
        geo = self.geometry
        depth = [self.depth_h, self.depth_w] if self.dims == 2 else [self.depth]
        return (
            [self.project_in.weight, *[m.weight for m in depth], self.project_out.weight],
            [geo.in_group, *[m.weight[0, 0].numel() for m in depth], self.rank // geo.groups],
            self.project_out.bias,
        )

    def _forward(self, x: Tensor) -> Tensor:
        """(B, S, *spatial) -> (B, T, *spatial_out), the factorized stages."""
        cl = self._cl_out(x)  # the stages run in the input's layout (see _cl_out)
        y = self.project_in(x, cl)
        y = self._pad(y, cl)
        y = self._depthwise(y)
        return self.project_out(y, cl)

    @classmethod
    def from_factors(cls, conv: nn.Module, cps: Sequence[Any]) -> "_CPConvNd":
        """Build from one CP per group of ``conv``'s kernel.

        ``cps[i]``: weights (R/g,), factors (T/g, R/g), (S/g, R/g), then (k_j, R/g) per spatial
        dim. The CP weights are folded into the last 1x1; the bias is copied from ``conv``.
        """
        geo = cls._geometry(conv)
        if len(cps) != geo.groups:
            raise ValueError(f"{cls.__name__}: got {len(cps)} CP tensors for groups={geo.groups};"
                             f" need one per group")
        for cp in cps:
            if len(cp.factors) != 2 + geo.dims:
                raise ValueError(f"{cls.__name__}: a CP of a {2 + geo.dims}-way kernel needs "
                                 f"{2 + geo.dims} factors, got {len(cp.factors)}")
        rank = sum(int(cp.weights.shape[0]) for cp in cps)
        layer = cls(**geo.conv_kwargs(), rank=rank)
        layer.to(device=conv.weight.device, dtype=conv.weight.dtype)
        one = (1,) * geo.dims
        rg = rank // geo.groups
        first = torch.cat([cp.factors[1].t() for cp in cps])  # (R, S/g)
        assign_(layer.project_in.weight, first.reshape(rank, geo.in_group, *one))
        last = torch.cat([cp.factors[0] * cp.weights for cp in cps])  # (T, R/g)
        assign_(layer.project_out.weight, last.reshape(geo.out_channels, rg, *one))
        depth = [layer.depth_h, layer.depth_w] if geo.dims == 2 else [layer.depth]
        for i, mod in enumerate(depth):
            f = torch.cat([cp.factors[2 + i] for cp in cps], dim=1).t()  # (R, k_i)
            assign_(mod.weight, f.reshape(mod.weight.shape))
        if conv.bias is not None:
            assign_(layer.project_out.bias, conv.bias)
        return layer

    @classmethod
    def from_conv(cls, conv: nn.Module, rank: Rank, *, epc: bool = False,
                  **cp_opts: Any) -> "_CPConvNd":
        """CP-ALS (``tensorslim.tensor.cp_als`` with ``cp_opts``) of each group's kernel at rank
        R/g; ``epc=True`` then turns each group's CP into the CPD-EPC one
        (``tensorslim.tensor.cp_epc`` from the ALS result: the same error, least sensitivity,
        so fine-tuning is stable). Sets ``approx_error`` = ||W - W^|| / ||W||.
        """
        _check_epc(cls.__name__, epc)
        geo = cls._geometry(conv)
        r = cls._check_rank(geo, rank)
        check_module_finite(cls.__name__, conv)
        g = geo.groups
        w = conv.weight.detach().to(torch.float64)
        from ..tensor import cp_als, cp_epc
        blocks = group_blocks(w, g)
        parts = [cp_als(wg, r // g, **cp_opts) for wg in blocks]
        if epc:
            parts = [cp_epc(wg, r // g, init=p) for wg, p in zip(blocks, parts)]
        layer = cls.from_factors(conv, parts)
        # the dense weight is the reference: ||W - W^|| / ||W||
        layer.approx_error = rel_error(w, torch.cat([p.to_tensor() for p in parts]))
        return layer

    def to_cp(self) -> list[Any]:
        """The layer's current kernel as one exact CP (float64 ``CPTensor``) per group:
        factors (T/g, R/g), (S/g, R/g), then (k_i, R/g) per spatial dim, unit-norm columns,
        the scales in ``weights`` (R/g,); ``cat([c.to_tensor() ...])`` is the kernel."""
        from ..tensor import CPTensor

        g, r, geo = self.geometry.groups, self.rank, self.geometry
        depth = [self.depth_h, self.depth_w] if self.dims == 2 else [self.depth]
        first = self.project_in.weight.detach().double().reshape(r, geo.in_group)
        last = self.project_out.weight.detach().double().reshape(geo.out_channels, r // g)
        spatial = [m.weight.detach().double().reshape(r, -1) for m in depth]  # (R, k_i)
        out = []
        for i in range(g):
            rows = slice(i * r // g, (i + 1) * r // g)
            fs = [last[i * geo.out_group:(i + 1) * geo.out_group], first[rows].t(),
                  *[f[rows].t() for f in spatial]]
            norms = [f.norm(dim=0) for f in fs]
            w = torch.stack(norms).prod(0)
            fs = [f / n.clamp_min(torch.finfo(f.dtype).tiny) for f, n in zip(fs, norms)]
            out.append(CPTensor(weights=w, factors=tuple(fs)))
        return out

    def recompress(self, rank: Rank, **cp_opts: Any) -> "_CPConvNd":
        """A new layer at ``rank`` (MUSCO's further compression step); ``self`` is untouched.

        CP has no nested optimal truncation, so the decomposition (``from_conv`` with
        ``cp_opts``) is re-run on the layer's current kernel (rebuilt in float64 from
        :meth:`to_cp`); ``approx_error`` = ||W - W'|| / ||W||, W the current kernel.
        """
        geo = self.geometry
        r = self._check_rank(geo, rank)
        check_finite(f"{type(self).__name__}.recompress", dict(self.named_parameters()))
        if r > self.rank:
            raise ValueError(f"{type(self).__name__}.recompress: rank={r} exceeds the current rank "
                             f"{self.rank}; accepted: 1 <= rank <= {self.rank}")
        conv_type = nn.Conv2d if self.dims == 2 else nn.Conv1d
        like = self.project_in.weight
        dense = conv_type(**geo.conv_kwargs(), device=like.device, dtype=torch.float64)
        with torch.no_grad():
            dense.weight.copy_(torch.cat([c.to_tensor() for c in self.to_cp()]))
            if dense.bias is not None:
                dense.bias.copy_(self.project_out.bias.detach())
        return type(self).from_conv(dense, r, **cp_opts).to(dtype=like.dtype)


class CPConv2d(_CPConvNd):
    """CP replacement of an ``nn.Conv2d``.

    ``CPConv2d(in_channels, out_channels, kernel_size, rank, stride=1, padding=0, dilation=1,
    groups=1, bias=True, padding_mode="zeros")``. Children: ``project_in`` 1x1 (S -> R),
    ``depth_h`` depthwise (kh x 1), ``depth_w`` depthwise (1 x kw), ``project_out`` 1x1
    (R -> T, bias). Shapes: (B, S, H, W) -> (B, T, H', W').
    """

    dims = 2
    dense_types = (nn.Conv2d,)

    def _depthwise(self, y: Tensor) -> Tensor:
        if self.fused:  # one depthwise kh x kw conv, kernel = outer product of the two factors
            w = self.depth_h.weight * self.depth_w.weight  # (R,1,kh,1) * (R,1,1,kw)
            return F.conv2d(y, w, None, self.fused_stride, self.fused_padding,
                            self.fused_dilation, self.rank)
        return self.depth_w(self.depth_h(y))

    def own_macs(self, in_shape: Tuple[int, ...], out_shape: Tuple[int, ...]) -> int:
        """MACs of the fused depthwise conv (run by ``forward`` itself, not by a child module;
        ``tensorslim.count`` adds them); 0 when the separable child convs run."""
        if not self.fused:
            return 0
        kh, kw = self.geometry.kernel
        return self.rank * kh * kw * out_shape[0] * out_shape[2] * out_shape[3]


class CPConv1d(_CPConvNd):
    """CP replacement of an ``nn.Conv1d``: 1x1 (S -> R), depthwise k, 1x1 (R -> T).

    Children ``project_in``, ``depth``, ``project_out``. Shapes: (B, S, L) -> (B, T, L').
    """

    dims = 1
    dense_types = (nn.Conv1d,)

    def _depthwise(self, y: Tensor) -> Tensor:
        return self.depth(y)
