"""Tucker-2 convolutions (Kim et al. 2016).

A kernel W (T, S, *k) ~= G x_0 U_out x_1 U_in (partial Tucker over the channel modes) runs as
``1x1 (S -> r_in) -> k-conv core (r_in -> r_out; stride, dilation) -> 1x1 (r_out -> T, bias)``.
A grouped conv is decomposed per group (rank split evenly) and runs with grouped convs, so it
is exact at full rank.
"""
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ..tensor.ops import mode_dot
from ..tensor.results import TuckerTensor
from ._conv import ConvGeometry, Stage, assign_, group_blocks, pointwise, spatial_conv
from ._convbase import FactorizedConv
from ..tensor import rel_error
from .base import Rank, check_finite, check_int_rank, check_module_finite, nearest_rank


class _TuckerConvNd(FactorizedConv):
    method = "tucker"

    @classmethod
    def _pair(cls, rank: Any) -> tuple[Any, Any]:
        if isinstance(rank, (list, tuple)):
            if len(rank) != 2:
                raise ValueError(
                    f"{cls.__name__}: rank={rank!r} must be an int or (r_in, r_out)"
                )
            return rank[0], rank[1]
        return rank, rank

    @classmethod
    def _check_rank(cls, geo: ConvGeometry, rank: Any) -> tuple[int, int]:
        r_in, r_out = cls._pair(rank)
        name = cls.__name__
        r_in = check_int_rank(name, "r_in", r_in, 1, geo.in_channels, geo.groups)
        r_out = check_int_rank(name, "r_out", r_out, 1, geo.out_channels, geo.groups)
        return (r_in, r_out)

    @classmethod
    def _valid_rank(cls, geo: ConvGeometry, rank: Any) -> tuple[int, int]:
        """(r_in, r_out) nearest to ``rank`` (an int or a pair): multiples of groups, at
        most the channel counts."""
        r_in, r_out = cls._pair(rank)
        name = cls.__name__
        return (nearest_rank(name, "r_in", r_in, geo.in_channels, geo.groups),
                nearest_rank(name, "r_out", r_out, geo.out_channels, geo.groups))

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
        cl = self._cl_out(x)  # the stages run in the input's layout (see _cl_out)
        y = self.project_in(x, cl)
        y = self._pad(y, cl)
        y = self.core(y)
        return self.project_out(y, cl)

    @classmethod
    def from_factors(cls, conv: nn.Module, tuckers: Sequence[Any]) -> "_TuckerConvNd":
        """Build from one partial Tucker (modes (0, 1)) per group of ``conv``'s kernel.

        ``tuckers[i]``: core (r_out/g, r_in/g, *k), factors for modes 0 (T/g, r_out/g) and
        1 (S/g, r_in/g). The bias is copied from ``conv``.
        """
        return cls._assemble(cls._geometry(conv), tuckers, conv.bias, conv.weight)

    @classmethod
    def _assemble(cls, geo: ConvGeometry, tuckers: Sequence[Any], bias: Optional[Tensor],
                  like: Tensor) -> "_TuckerConvNd":
        """The layer of geometry ``geo`` from per-group Tuckers (see ``from_factors``), with
        ``bias`` copied and the device/dtype of ``like``."""
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
        layer.to(device=like.device, dtype=like.dtype)
        one = (1,) * geo.dims
        assign_(layer.project_in.weight,
                torch.cat([u.t() for u in u_ins]).reshape(rank[0], geo.in_group, *one))
        assign_(layer.core.weight, torch.cat(cores))
        assign_(layer.project_out.weight,
                torch.cat(u_outs).reshape(geo.out_channels, rank[1] // geo.groups, *one))
        if bias is not None:
            assign_(layer.project_out.bias, bias)
        return layer

    def to_tucker(self) -> list[TuckerTensor]:
        """The layer's current kernel as one exact partial Tucker (modes (0, 1), float64) per
        group, with orthonormal factors: the 1x1 weights are QR-factorized and their R factors
        absorbed into the core. ``core`` (r_out/g, r_in/g, *k), ``factors`` (T/g, r_out/g) and
        (S/g, r_in/g); ``cat([t.to_tensor() for t in ...])`` is the kernel (T, S/g, *k)."""
        geo = self.geometry
        g, (r_in, r_out) = geo.groups, self.rank
        p = self.project_in.weight.detach().double().reshape(r_in, geo.in_group)
        q = self.project_out.weight.detach().double().reshape(geo.out_channels, r_out // g)
        core = self.core.weight.detach().double()
        out = []
        for pi, qi, ci in zip(p.chunk(g), q.chunk(g), core.chunk(g)):
            q_o, r_q = torch.linalg.qr(qi)  # (T/g, r_out/g), (r_out/g, r_out/g)
            p_o, r_p = torch.linalg.qr(pi.t())  # (S/g, r_in/g), (r_in/g, r_in/g)
            ci = mode_dot(mode_dot(ci, r_q, 0), r_p, 1)
            out.append(TuckerTensor(core=ci, factors=(q_o, p_o), modes=(0, 1)))
        return out

    def recompress(self, rank: Rank, **tucker_opts: Any) -> "_TuckerConvNd":
        """A new layer at smaller ranks (MUSCO's further compression step); ``self`` is untouched.

        The core of :meth:`to_tucker` gets a Tucker-2 (``tensorslim.tensor.tucker``) at
        ``rank`` = (r_in', r_out') <= ``self.rank`` and its factors are merged into the 1x1
        convs. Since the outer factors are orthonormal, the result equals the Tucker-2 of the
        layer's reconstructed kernel at that rank (the same HOSVD + HOOI iterates, up to
        column signs). ``approx_error`` = ||W - W'|| / ||W||, W the current kernel.
        """
        geo = self.geometry
        r_in, r_out = self._check_rank(geo, rank)
        check_finite(f"{type(self).__name__}.recompress", dict(self.named_parameters()))
        if r_in > self.rank[0] or r_out > self.rank[1]:
            raise ValueError(f"{type(self).__name__}.recompress: rank={(r_in, r_out)} exceeds the "
                             f"current rank {self.rank}; accepted: r_in <= {self.rank[0]}, "
                             f"r_out <= {self.rank[1]}")
        from ..tensor import tucker
        g = geo.groups
        parts, lost, norm = [], 0.0, 0.0
        for t in self.to_tucker():
            small = tucker(t.core, (r_out // g, r_in // g), modes=(0, 1), **tucker_opts)
            factors = (t.factors[0] @ small.factors[0], t.factors[1] @ small.factors[1])
            parts.append(TuckerTensor(small.core, factors, (0, 1), small.errors))
            sq = float(torch.linalg.vector_norm(t.core) ** 2)
            lost, norm = lost + small.errors[-1] ** 2 * sq, norm + sq
        bias = self.project_out.bias
        layer = self._assemble(geo, parts, None if bias is None else bias.detach(),
                               self.core.weight)
        layer.approx_error = (lost / norm) ** 0.5 if norm else 0.0
        return layer

    @classmethod
    def from_conv(cls, conv: nn.Module, rank: Rank, **tucker_opts: Any) -> "_TuckerConvNd":
        """Partial Tucker (HOOI via ``tensorslim.tensor.tucker``) of each group's kernel.

        ``rank``: int r (r_in = r_out = r) or (r_in, r_out), totals over the groups;
        ``tucker_opts`` go to ``tucker`` (``n_iter``, ``tol``, ``init``, ``seed``). The kernel is
        decomposed in its own precision (float32 or float64; half precisions in float32): the
        factors are stored in that dtype anyway, and float32 halves the time of every product
        and eigendecomposition. Sets ``approx_error`` = ||W - W^|| / ||W|| (computed in float64).
        """
        geo = cls._geometry(conv)
        r_in, r_out = cls._check_rank(geo, rank)
        check_module_finite(cls.__name__, conv)
        g = geo.groups
        w = conv.weight.detach()
        if w.dtype not in (torch.float32, torch.float64):
            w = w.to(torch.float32)
        from ..tensor import tucker
        parts = [tucker(wg, (r_out // g, r_in // g), modes=(0, 1), **tucker_opts)
                 for wg in group_blocks(w, g)]
        layer = cls.from_factors(conv, parts)
        # the dense weight is the reference: ||W - W^|| / ||W||
        layer.approx_error = rel_error(w, torch.cat([p.to_tensor() for p in parts]))
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
