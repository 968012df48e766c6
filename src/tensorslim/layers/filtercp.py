"""Filter-wise CP convolution (NORTON's CPD block; CONCATENATION's coupled form).

Each output filter W_o (S x kh x kw) of a dense conv has its own rank-R CP
``W_o = sum_r a_or o b_or o c_or`` (channel, height, width factors). The layer runs

``1x1 (S -> T*R) -> depthwise (kh x 1) -> depthwise (1 x kw) -> view(B, T, R, H, W).sum(2) + bias``

channel ``o*R + r`` carrying term r of filter o (so a grouped conv's groups stay contiguous:
the 1x1 conv runs with the dense conv's groups); the first depthwise conv carries the dense
conv's vertical stride/dilation, the second the horizontal ones. Padding is done by the
depthwise convs (symmetric zeros) or by one ``F.pad`` before them (other modes, 'same' with
even kernels). For small kernels (kh*kw <= 2*(kh + kw): 3x3, 1xk, ...) the two depthwise
stages RUN as one depthwise kh x kw conv whose kernel is their outer product (same numbers; the
stages are memory-bound on CPU and one pass over the R*T-channel tensor is several times
faster); ``cost`` / ``count`` report the MACs of what runs (R*T*kh*kw per output pixel instead
of R*T*(kh + kw)). Parameters ``R*T*(S + kh + kw)`` instead of ``T*S*kh*kw``. Exact at the generic
rank of one filter, ``min(kh*kw, S*kw, S*kh)``.

``clusters`` (one cluster id per output filter, K clusters) makes the channel factor shared
within each cluster (CONCATENATION's coupled CPD): the 1x1 conv has R*K outputs and an index
gather expands them to the R*T depthwise channels, so its MACs drop by T/K (groups=1 only).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._conv import ConvGeometry, Stage, assign_, pointwise, spatial_conv, stages_cost
from ._convbase import FactorizedConv
from .base import Rank, check_int_rank, check_module_finite, nearest_rank

_PENDING = "_filtercp_clusters"


def _check_clusters(layer: str, clusters: Any, out_channels: int) -> Optional[tuple[int, ...]]:
    """``clusters`` as a tuple of ints (one per output filter, using every id 0..K-1), or None."""
    if clusters is None:
        return None
    if isinstance(clusters, Tensor):
        clusters = clusters.tolist()
    if not isinstance(clusters, (list, tuple)) or any(
            isinstance(c, bool) or not isinstance(c, int) for c in clusters):
        raise TypeError(f"{layer}: clusters must be a sequence of ints (one cluster id per output "
                        f"filter), got {clusters!r:.80}")
    out = tuple(int(c) for c in clusters)
    if len(out) != out_channels:
        raise ValueError(f"{layer}: clusters has {len(out)} entries; accepted: one per output "
                         f"filter ({out_channels})")
    if min(out) < 0 or set(out) != set(range(max(out) + 1)):
        raise ValueError(f"{layer}: clusters must use every id 0..K-1, got ids "
                         f"{sorted(set(out))[:8]}...")
    return out


class FilterCPConv2d(FactorizedConv):
    """Filter-wise CP replacement of an ``nn.Conv2d`` (any groups but depthwise).

    ``FilterCPConv2d(in_channels, out_channels, kernel_size, rank, stride=1, padding=0,
    dilation=1, groups=1, bias=True, padding_mode="zeros", clusters=None)``. Children:
    ``project_in`` 1x1 (S -> R*T, or R*K with clusters), ``depth_h`` depthwise (kh x 1),
    ``depth_w`` depthwise (1 x kw); parameter ``bias`` (T,); buffer ``expand`` (R*T,) with
    clusters. Shapes: (B, S, H, W) -> (B, T, H', W').
    """

    method = "filtercp"
    dims = 2
    __jit_ignored_attributes__ = FactorizedConv.__jit_ignored_attributes__ + ["clusters"]
    dense_types = (nn.Conv2d,)

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, rank: Rank,
                 stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1,
                 bias: bool = True, padding_mode: str = "zeros",
                 clusters: Optional[Sequence[int]] = None) -> None:
        # _build (run by the base constructor) needs the clusters: stash them on the class
        # instance dict before nn.Module's init (a plain attribute, not a submodule)
        object.__setattr__(self, _PENDING, _check_clusters(type(self).__name__, clusters, out_channels))
        super().__init__(in_channels, out_channels, kernel_size, rank, stride, padding, dilation,
                         groups, bias, padding_mode)

    # -- rank ---------------------------------------------------------------------------------
    @classmethod
    def _max_rank(cls, geo: ConvGeometry) -> int:
        from ..tensor.filter_cp import max_filter_rank

        return max_filter_rank((geo.in_group,) + geo.kernel)

    @classmethod
    def _check_groups(cls, geo: ConvGeometry) -> None:
        """Every non-depthwise conv is accepted (ConvGeometry refuses depthwise ones)."""

    @classmethod
    def _check_rank(cls, geo: ConvGeometry, rank: Any) -> int:
        cls._check_groups(geo)
        return check_int_rank(cls.__name__, "rank", rank, 1, cls._max_rank(geo))

    @classmethod
    def _valid_rank(cls, geo: ConvGeometry, rank: Any) -> int:
        cls._check_groups(geo)
        return nearest_rank(cls.__name__, "rank", rank, cls._max_rank(geo))

    @classmethod
    def check(cls, module: nn.Module) -> None:
        cls._check_groups(cls._geometry(module))

    @classmethod
    def rank_space(cls, module: nn.Module, **opts: Any) -> list[int]:
        """Every valid rank, 1 .. generic rank of one filter (for the planner)."""
        cls._options(module, opts, "rank_space")
        return list(range(1, cls._max_rank(cls._geometry(module)) + 1))

    @classmethod
    def valid_rank(cls, module: nn.Module, rank: Any, **opts: Any) -> int:
        cls._options(module, opts, "valid_rank")
        return cls._valid_rank(cls._geometry(module), rank)

    # -- stages and cost ----------------------------------------------------------------------
    @classmethod
    def _stages(cls, geo: ConvGeometry, rank: Rank, k: Optional[int] = None) -> list[Stage]:
        r, t = int(rank), geo.out_channels  # type: ignore[arg-type]
        one, zero = (1, 1), ((0, 0), (0, 0))
        stages = [Stage(geo.in_channels, r * (t if k is None else k), one, one, one, geo.groups,
                        False, zero)]
        for i in range(2):
            kernel = tuple(geo.kernel[j] if j == i else 1 for j in range(2))
            stride = tuple(geo.stride[j] if j == i else 1 for j in range(2))
            dil = tuple(geo.dilation[j] if j == i else 1 for j in range(2))
            if geo.explicit_pad:  # F.pad pads both dims before the first depthwise conv
                pads = geo.pads if i == 0 else zero
            else:
                pads = tuple(p if j == i else (0, 0) for j, p in enumerate(geo.pads))
            stages.append(Stage(r * t, r * t, kernel, stride, dil, r * t, False, pads))
        return stages

    @classmethod
    def _options(cls, module: nn.Module, opts: dict, where: str = "") -> Optional[tuple[int, ...]]:
        unknown = set(opts) - {"clusters", "n_iter", "seed"}
        if unknown:
            raise TypeError(f"{cls.__name__}.{where}: unexpected options {sorted(unknown)}; accepted: "
                            f"clusters, n_iter, seed")
        return _check_clusters(cls.__name__, opts.get("clusters"), module.out_channels)

    @classmethod
    def _check_clustered(cls, geo: ConvGeometry, clusters: Any) -> None:
        if clusters is not None and geo.groups != 1:
            raise ValueError(f"{cls.__name__}: clusters (a shared channel factor) need groups=1, "
                             f"got groups={geo.groups}")

    @classmethod
    def cost(cls, module: nn.Module, rank: Rank, in_shape: Sequence[int],
             out_shape: Sequence[int], **opts: Any) -> tuple[int, int]:
        """(params, MACs per sample) of the 1x1 and the two depthwise convs (the sum over R
        is additions, not MACs); the bias counts T params."""
        clusters = cls._options(module, opts, "cost")
        geo = cls._geometry(module)
        cls._check_clustered(geo, clusters)
        spatial = geo.check_in_shape(cls.__name__, in_shape)
        r = cls._check_rank(geo, rank)
        k = None if clusters is None else max(clusters) + 1
        params, _ = stages_cost(cls._stages(geo, r, k), spatial)
        _, macs = stages_cost(cls._run_stages(geo, r, k), spatial)
        return params + (geo.out_channels if geo.bias else 0), macs

    @classmethod
    def _run_stages(cls, geo: ConvGeometry, rank: Rank, k: Optional[int] = None) -> list[Stage]:
        """The convs forward runs: with small kernels the two depthwise stages as one."""
        from .cp import fuses_depthwise

        stages = cls._stages(geo, rank, k)
        if not fuses_depthwise(2, geo.kernel):
            return stages
        c = stages[1].in_channels
        return [stages[0], Stage(c, c, geo.kernel, geo.stride, geo.dilation, c, False, geo.pads)]

    # -- build ------------------------------------------------------------------------------
    def _build(self, geo: ConvGeometry) -> None:
        clusters = self.__dict__.pop(_PENDING, None)
        self.clusters = clusters
        k = None if clusters is None else max(clusters) + 1
        self._check_clustered(geo, clusters)
        r, t = self.rank, geo.out_channels
        st = self._stages(geo, r, k)
        self.project_in = pointwise(2, geo.in_channels, st[0].out_channels, geo.groups, False)
        depth = [spatial_conv(2, s, (0, 0) if geo.explicit_pad else tuple(a for a, _ in s.pads))
                 for s in st[1:]]
        self.depth_h, self.depth_w = depth
        from .cp import fuses_depthwise

        self.fused_depthwise = fuses_depthwise(2, geo.kernel)
        self.fused_stride = (geo.stride[0], geo.stride[1])
        self.fused_dilation = (geo.dilation[0], geo.dilation[1])
        self.fused_padding = (int(depth[0].padding[0]), int(depth[1].padding[1]))
        self.clustered = clusters is not None
        if clusters is not None:  # depthwise channel o*R + r reads 1x1 channel k(o)*R + r
            ids = torch.tensor(clusters, dtype=torch.long)
            idx = (ids[:, None] * r + torch.arange(r)[None, :]).reshape(-1)
        else:
            idx = torch.arange(r * t)
        self.register_buffer("expand", idx)
        self.bias = nn.Parameter(torch.empty(t)) if geo.bias else None

    def _chain(self) -> tuple[list[Tensor], list[int], Optional[Tensor]]:
        geo = self.geometry
        return ([self.project_in.weight, self.depth_h.weight, self.depth_w.weight],
                [geo.in_group, geo.kernel[0], geo.kernel[1] * self.rank], self.bias)

    def _forward(self, x: Tensor) -> Tensor:
        """(B, S, H, W) -> (B, T, H', W'), in the input's memory format."""
        cl = self._cl_out(x)
        y = self.project_in(x, cl)
        if self.clustered:
            y = y.index_select(1, self.expand)
        y = self._spatial(y, cl)
        b, h, w = y.shape[0], y.shape[2], y.shape[3]
        if cl:  # (B, H, W, T*R) in memory: sum the R adjacent values, stay channels-last
            y = y.permute(0, 2, 3, 1).reshape(b, h, w, self.out_channels, self.rank)
            y = y.sum(4).permute(0, 3, 1, 2)
        else:
            y = y.reshape(b, self.out_channels, self.rank, h, w).sum(2)
        bias = self.bias
        if bias is not None:
            y = y + bias.view(1, -1, 1, 1)
        return y

    def _spatial(self, y: Tensor, cl: bool) -> Tensor:
        """The padding and depthwise stage(s) of ``forward`` on (B, R*T, H, W); for small
        kernels one kh x kw depthwise conv whose kernel is the outer product of the factors."""
        y = self._pad(y, cl)
        if self.fused_depthwise:
            wd = self.depth_h.weight * self.depth_w.weight  # (RT,1,kh,1) * (RT,1,1,kw)
            return F.conv2d(y, wd, None, self.fused_stride, self.fused_padding,
                            self.fused_dilation, wd.shape[0])
        return self.depth_w(self.depth_h(y))

    def term_responses(self, x: Tensor) -> Tensor:
        """(B, S, H, W) -> (B, S, R*T, H', W'): every input channel s filtered by the spatial
        kernel (height x width factor) of every term, channel ``o*R + r`` = term r of filter o.
        Unclustered groups=1 layers only: the output is then
        ``sum_{s, r} W[o*R + r, s] * resp[:, s, o*R + r] + bias`` with ``W`` the 1x1 weight
        (linear in it: a data-aware refit of the channel factor is least squares)."""
        if self.clustered or self.geometry.groups != 1:
            raise ValueError(f"{type(self).__name__}.term_responses: needs an unclustered groups=1 "
                             f"layer (clusters={self.clusters is not None}, groups={self.geometry.groups})")
        b, s = x.shape[0], x.shape[1]
        y = x.reshape(b * s, 1, *x.shape[2:]).expand(-1, self.rank * self.out_channels, -1, -1)
        y = self._spatial(y.contiguous(), False)
        return y.reshape(b, s, *y.shape[1:])

    @torch.no_grad()
    def rebalance_(self) -> None:
        """Rescale the factors of every term (o, r) to equal column norms (the convention of
        ``from_factors``; unclustered layers: all three, clustered: the two spatial ones).
        The kernel is unchanged."""
        a = self.project_in.weight.flatten(1).index_select(0, self.expand)  # (R*T, S/g)
        h, w = self.depth_h.weight, self.depth_w.weight
        na = a.norm(dim=1)
        nb, nc = h.flatten(1).norm(dim=1), w.flatten(1).norm(dim=1)
        eps = torch.finfo(h.dtype).tiny
        if self.clustered:
            g = (nb * nc).sqrt()
        else:
            g = (na * nb * nc).pow(1.0 / 3.0)
            self.project_in.weight.mul_((g / na.clamp_min(eps)).view(-1, 1, 1, 1))
        h.mul_((g / nb.clamp_min(eps)).view(-1, 1, 1, 1))
        w.mul_((g / nc.clamp_min(eps)).view(-1, 1, 1, 1))

    def own_macs(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> int:
        """MACs of the fused depthwise conv (run by ``forward``, not by a child module;
        ``tensorslim.count`` adds them); 0 when the separable child convs run."""
        if not self.fused_depthwise:
            return 0
        kh, kw = self.geometry.kernel
        return self.rank * kh * kw * out_shape[0] * out_shape[1] * out_shape[2] * out_shape[3]

    def fold_output_affine(self, scale: Tensor, shift: Tensor) -> None:
        """``y -> scale * y + shift`` per output channel: the last depthwise conv's rows
        ``o*R + r`` scaled by ``scale[o]`` and the bias ``scale * bias + shift`` (created if
        absent); no op is added. ``scale``, ``shift``: (T,)."""
        from dataclasses import replace

        from .base import check_affine

        check_affine(type(self).__name__, self.out_channels, scale, shift)
        w = self.depth_w.weight
        s = scale.detach().double().repeat_interleave(self.rank).view(-1, 1, 1, 1)
        new_w = (w.detach().double() * s.to(w.device)).to(w.dtype)
        self.depth_w.weight = nn.Parameter(new_w, requires_grad=w.requires_grad)
        old = self.bias
        base = torch.zeros_like(shift, dtype=torch.float64) if old is None else old.detach().double()
        new_b = (base * scale.detach().double() + shift.detach().double()).to(dtype=w.dtype, device=w.device)
        self.bias = nn.Parameter(new_b, requires_grad=w.requires_grad if old is None else old.requires_grad)
        self.geometry = replace(self.geometry, bias=True)

    # -- constructors -----------------------------------------------------------------------
    @classmethod
    def like(cls, module: nn.Module, rank: Rank, **opts: Any) -> "FilterCPConv2d":
        """Random init with ``module``'s geometry (and ``clusters``); ``n_iter`` / ``seed`` (how
        ``from_conv`` decomposes) are accepted so a plan's options replay."""
        clusters = cls._options(module, opts, "like")
        geo = cls._geometry(module)
        layer = cls(**geo.conv_kwargs(), rank=rank, clusters=clusters)
        return layer.to(device=module.weight.device, dtype=module.weight.dtype)

    @classmethod
    def from_conv(cls, conv: nn.Module, rank: Rank, **opts: Any) -> "FilterCPConv2d":
        """Batched CP-ALS of every filter (``tensorslim.tensor.filter_cp``; with ``clusters``
        the coupled CP sharing the channel factor per cluster), ``n_iter`` sweeps (default
        300), ``seed`` (default 0). Sets ``approx_error`` = ||W - W^|| / ||W||."""
        from ..tensor import rel_error
        from ..tensor.filter_cp import coupled_filter_cp, filter_cp

        clusters = cls._options(conv, opts, "from_conv")
        geo = cls._geometry(conv)
        cls._check_clustered(geo, clusters)
        r = cls._check_rank(geo, rank)
        check_module_finite(cls.__name__, conv)
        w = conv.weight.detach().to(torch.float64)
        kw = dict(n_iter=opts.get("n_iter", 300), seed=opts.get("seed", 0))
        if clusters is None:
            cp = filter_cp(w, r, **kw)
        else:
            cp = coupled_filter_cp(w, r, torch.tensor(clusters), **kw)
        layer = cls.from_factors(conv, cp, clusters=clusters)
        layer.approx_error = rel_error(w, cp.to_tensor())
        return layer

    @classmethod
    def from_factors(cls, conv: nn.Module, cp: Any, *,
                     clusters: Optional[Sequence[int]] = None) -> "FilterCPConv2d":
        """Build from a filter-wise CP of ``conv``'s kernel (``tensor.FilterCP``: weights (T, R),
        factors (T, S/g, R), (T, kh, R), (T, kw, R)); with ``clusters`` the channel factors of
        a cluster's members must be equal (a coupled CP). The bias is copied from ``conv``."""
        from ..tensor.filter_cp import FilterCP

        if not isinstance(cp, FilterCP):
            raise TypeError(f"{cls.__name__}.from_factors: expected a FilterCP, got {type(cp).__name__}")
        geo = cls._geometry(conv)
        clusters = _check_clusters(cls.__name__, clusters, geo.out_channels)
        shapes = tuple(tuple(f.shape) for f in cp.factors)
        want = ((geo.out_channels, geo.in_group, cp.rank), (geo.out_channels, geo.kernel[0], cp.rank),
                (geo.out_channels, geo.kernel[1], cp.rank))
        if shapes != want:
            raise ValueError(f"{cls.__name__}.from_factors: factor shapes {shapes} do not fit the "
                             f"conv; accepted: {want}")
        layer = cls(**geo.conv_kwargs(), rank=cp.rank, clusters=clusters)
        layer.to(device=conv.weight.device, dtype=conv.weight.dtype)
        cls._assign(layer, cp, clusters)
        if conv.bias is not None:
            assign_(layer.bias, conv.bias)
        return layer

    @staticmethod
    def _assign(layer: "FilterCPConv2d", cp: Any, clusters: Optional[tuple[int, ...]]) -> None:
        """Factors into the three convs, BALANCED: term (o, r) of weight w gets column norms
        w^(1/3) in all three factors (shared channel factors with clusters keep unit norm and
        the two spatial factors get w^(1/2) each). With the weight in one factor and unit
        columns elsewhere, the gradients of fine-tuning are scaled very differently per
        factor (the channel column has entries ~ 1/sqrt(S)); equal norms condition SGD the
        same way for every factor. The kernel computed is the same either way."""
        a, b, c = cp.factors  # (T, S, R), (T, kh, R), (T, kw, R)
        t, s, r = a.shape
        w = cp.weights.abs()  # (T, R); the sign stays in the first spatial factor
        sign = torch.where(cp.weights < 0, -1.0, 1.0).to(b)
        if clusters is not None:  # the shared A of each cluster, from its first member
            k = max(clusters) + 1
            first = [clusters.index(i) for i in range(k)]
            a = a[first]
            share = w.sqrt()
        else:
            share = w.pow(1.0 / 3.0)
            a = a * share[:, None, :]
        assign_(layer.project_in.weight, a.transpose(1, 2).reshape(-1, s, 1, 1))
        bh = (b * (sign * share)[:, None, :]).transpose(1, 2).reshape(r * t, 1, -1, 1)
        assign_(layer.depth_h.weight, bh)
        cw = (c * share[:, None, :]).transpose(1, 2).reshape(r * t, 1, 1, -1)
        assign_(layer.depth_w.weight, cw)

    def kernel(self) -> Tensor:
        """The dense kernel (T, S/g, kh, kw) the layer computes, float64 (for tests/recompress)."""
        r, t = self.rank, self.out_channels
        a = self.project_in.weight.detach().double().flatten(1)  # (R*T or R*K, S/g)
        a = a.index_select(0, self.expand).reshape(t, r, -1)
        b = self.depth_h.weight.detach().double().reshape(t, r, -1)
        c = self.depth_w.weight.detach().double().reshape(t, r, -1)
        return torch.einsum("tri,trj,trk->tijk", a, b, c)

    def recompress(self, rank: Rank, **opts: Any) -> "FilterCPConv2d":
        """A new layer at ``rank`` (<= the current one) decomposed again from the layer's
        current kernel (``from_conv`` with ``opts``; default: the same clusters); ``self`` is
        untouched. ``approx_error`` is relative to the current kernel."""
        from .base import check_finite

        check_finite(f"{type(self).__name__}.recompress", dict(self.named_parameters()))
        r = self._check_rank(self.geometry, rank)
        if r > self.rank:
            raise ValueError(f"{type(self).__name__}.recompress: rank={r} exceeds the current rank "
                             f"{self.rank}; accepted: 1 <= rank <= {self.rank}")
        like = self.project_in.weight
        dense = nn.Conv2d(**self.geometry.conv_kwargs(), device=like.device, dtype=torch.float64)
        with torch.no_grad():
            dense.weight.copy_(self.kernel())
            if dense.bias is not None:
                dense.bias.copy_(self.bias.detach())
        opts.setdefault("clusters", self.clusters)
        return type(self).from_conv(dense, r, **opts).to(dtype=like.dtype)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.clusters is not None:
            s += f", clusters={max(self.clusters) + 1}"
        return s
