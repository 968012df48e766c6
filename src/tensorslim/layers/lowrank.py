"""Low-rank (truncated SVD) Linear and conv layers.

``LowRankLinear``: W (M, N) ~= U S Vh runs as Linear(N -> r, no bias) then Linear(r -> M, bias).
``LowRankConv{1,2}d``: SVD of the kernel reshaped (T, S*prod(k)) runs as a k-conv (S -> r;
stride, padding, dilation) then a 1x1 (r -> T, bias); grouped convs per group.
sqrt(S) is split evenly between the two factors (balanced, which fine-tunes better).
"""
from math import prod
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ._conv import ConvGeometry, Stage, assign_, group_blocks, pointwise, spatial_conv
from ._convbase import FactorizedConv
from ..tensor import rel_error
from .base import FactorizedLayer, LayerTypeError, Rank, chain_uniform_, check_finite, \
    check_int_rank, check_module_finite, dense_bias_, nearest_rank


def product_svd(b: Tensor, a: Tensor) -> Any:
    """Exact SVD (an ``SVDResult``, float64) of ``b @ a``, b (m, r), a (r, n), r <= m, n,
    from the QRs of both factors and the SVD of an r x r matrix."""
    from ..tensor import SVDResult, svd

    b, a = b.detach().double(), a.detach().double()
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.t())
    small = svd(r_b @ r_a.t(), min(r_b.shape[0], r_a.shape[0]), method="full")
    return SVDResult(q_b @ small.U, small.S, small.Vh @ q_a.t(), (0.0,))


def truncate_svd(res: Any, rank: int) -> tuple[Any, float]:
    """(the rank-``rank`` truncation of an exact ``SVDResult``, its relative error): the best
    approximation of that rank (Eckart-Young)."""
    from ..tensor import SVDResult

    s2 = res.S.double() ** 2
    total = float(s2.sum())
    err = (float(s2[rank:].sum()) / total) ** 0.5 if total else 0.0
    return SVDResult(res.U[:, :rank], res.S[:rank], res.Vh[:rank], (err,)), err


def _check_smaller(layer: Any, rank: int) -> None:
    if rank > layer.rank:
        raise ValueError(f"{type(layer).__name__}.recompress: rank={rank} exceeds the current "
                         f"rank {layer.rank}; accepted: 1 <= rank <= {layer.rank}")


def _split(svd: Any) -> tuple[Tensor, Tensor]:
    """(U sqrt(S), sqrt(S) Vh) of an SVDResult."""
    root = svd.S.clamp_min(0).sqrt()
    return svd.U * root, root[:, None] * svd.Vh


class LowRankLinear(FactorizedLayer):
    """``LowRankLinear(in_features, out_features, rank, bias=True)``: y = B (A x) + b.

    Children ``project_in`` = Linear(N -> r, no bias), ``project_out`` = Linear(r -> M, bias).
    Shapes: (*, N) -> (*, M).
    """

    method = "svd"
    dense_types = (nn.Linear,)

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.rank = self._check_rank(in_features, out_features, rank)
        self.in_features = in_features
        self.out_features = out_features
        self.project_in = nn.Linear(in_features, self.rank, bias=False)
        self.project_out = nn.Linear(self.rank, out_features, bias=bias)
        self.reset_parameters()

    @classmethod
    def _check_rank(cls, n: int, m: int, rank: Any) -> int:
        return check_int_rank(cls.__name__, "rank", rank, 1, min(n, m))

    @classmethod
    def valid_rank(cls, module: nn.Module, rank: Any, **opts: Any) -> int:
        """The valid rank nearest to ``rank``: rounded, clipped to [1, min(N, M)]."""
        if opts:
            raise TypeError(f"{cls.__name__}.valid_rank: unexpected options {sorted(opts)}")
        lin = cls._linear(module)
        return nearest_rank(cls.__name__, "rank", rank, min(lin.in_features, lin.out_features))

    def reset_parameters(self) -> None:
        """Output variance matches a dense ``nn.Linear``'s default init."""
        chain_uniform_([self.project_in.weight, self.project_out.weight],
                       [self.in_features, self.rank])
        dense_bias_(self.project_out.bias, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        """(*, N) -> (*, M)."""
        return self.project_out(self.project_in(x))

    def fold_output_affine(self, scale: Tensor, shift: Tensor) -> None:
        """``y -> scale * y + shift`` per output feature, folded into ``project_out`` (its
        weight rows and bias, the bias created if absent). ``scale``, ``shift``: (M,)."""
        from .base import check_affine, fold_affine_

        check_affine(type(self).__name__, self.out_features, scale, shift)
        fold_affine_(self.project_out, scale, shift)

    @classmethod
    def _linear(cls, module: nn.Module) -> nn.Linear:
        cls._check_type(module)
        return module  # type: ignore[return-value]

    @classmethod
    def like(cls, module: nn.Module, rank: Rank, **opts: Any) -> "LowRankLinear":
        if opts:
            raise TypeError(f"{cls.__name__}.like: unexpected options {sorted(opts)}")
        lin = cls._linear(module)
        layer = cls(lin.in_features, lin.out_features, rank, lin.bias is not None)  # type: ignore[arg-type]
        return layer.to(device=lin.weight.device, dtype=lin.weight.dtype)

    @classmethod
    def cost(cls, module: nn.Module, rank: Rank, in_shape: Sequence[int],
             out_shape: Sequence[int], **opts: Any) -> tuple[int, int]:
        """(params, MACs per sample); ``in_shape`` is (..., N) without batch."""
        if opts:
            raise TypeError(f"{cls.__name__}.cost: unexpected options {sorted(opts)}")
        lin = cls._linear(module)
        n, m = lin.in_features, lin.out_features
        r = cls._check_rank(n, m, rank)
        if not in_shape or int(in_shape[-1]) != n:
            raise ValueError(f"{cls.__name__}: in_shape={tuple(in_shape)} must end with {n}")
        rows = prod(int(s) for s in in_shape[:-1])
        params = r * n + m * r + (m if lin.bias is not None else 0)
        return params, rows * (n * r + r * m)

    @classmethod
    def from_factors(cls, linear: nn.Module, svd: Any) -> "LowRankLinear":
        """Build from an SVDResult of ``linear.weight`` (U (M, r), S (r,), Vh (r, N))."""
        lin = cls._linear(linear)
        return cls._assemble(lin.in_features, lin.out_features, svd, lin.bias, lin.weight)

    @classmethod
    def _assemble(cls, n: int, m: int, svd: Any, bias: Optional[Tensor],
                  like: Tensor) -> "LowRankLinear":
        layer = cls(n, m, int(svd.S.shape[0]), bias is not None)
        layer.to(device=like.device, dtype=like.dtype)
        us, svh = _split(svd)
        assign_(layer.project_in.weight, svh)
        assign_(layer.project_out.weight, us)
        if bias is not None:
            assign_(layer.project_out.bias, bias.detach())
        return layer

    def to_svd(self) -> Any:
        """Exact SVD (float64 ``SVDResult``: U (M, r), S (r,), Vh (r, N)) of the current
        weight B A (``project_out.weight @ project_in.weight``)."""
        return product_svd(self.project_out.weight, self.project_in.weight)

    def recompress(self, rank: int, **svd_opts: Any) -> "LowRankLinear":
        """A new layer at a smaller rank (MUSCO's further compression step); ``self`` is
        untouched. Truncates :meth:`to_svd`, so the new weight is the best rank-``rank``
        approximation of the current one; ``approx_error`` = ||W - W'|| / ||W||."""
        if svd_opts:
            raise TypeError(f"{type(self).__name__}.recompress: unexpected options {sorted(svd_opts)}")
        r = self._check_rank(self.in_features, self.out_features, rank)
        _check_smaller(self, r)
        check_finite(f"{type(self).__name__}.recompress", dict(self.named_parameters()))
        res, err = truncate_svd(self.to_svd(), r)
        layer = self._assemble(self.in_features, self.out_features, res, self.project_out.bias,
                               self.project_in.weight)
        layer.approx_error = err
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Module, rank: int, **svd_opts: Any) -> "LowRankLinear":
        """Truncated SVD (``tensorslim.tensor.svd``) of ``linear.weight``; sets approx_error."""
        lin = cls._linear(linear)
        r = cls._check_rank(lin.in_features, lin.out_features, rank)
        check_module_finite(cls.__name__, lin)
        w = lin.weight.detach().to(torch.float64)
        from ..tensor import svd
        res = svd(w, r, **svd_opts)
        layer = cls.from_factors(lin, res)
        # the dense weight is the reference: ||W - W^|| / ||W||
        layer.approx_error = rel_error(w, res.to_tensor())
        return layer

    @classmethod
    def from_dense(cls, module: nn.Module, rank: Rank, *, gram: Optional[Tensor] = None,
                   input_mean: Optional[Tensor] = None, scale: Optional[Tensor] = None,
                   alpha: float = 0.5, row_weights: Optional[Tensor] = None, **opts: Any) -> "LowRankLinear":
        """Truncated SVD of the weight, or with ``gram`` (N, N), the mean input second moment
        E[x x^T] the layer sees, the data-aware factorisation (:meth:`from_linear_data`)."""
        if gram is None:
            if input_mean is not None or scale is not None or row_weights is not None:
                raise TypeError(f"{cls.__name__}.from_dense: input_mean / scale / row_weights need gram= (E[x x^T])")
            return cls.from_linear(module, rank, **opts)  # type: ignore[arg-type]
        if opts:
            raise TypeError(f"{cls.__name__}.from_dense: unexpected options {sorted(opts)} with gram=")
        return cls.from_linear_data(module, rank, gram, input_mean=input_mean, scale=scale, alpha=alpha,
                                    row_weights=row_weights)

    @classmethod
    def from_linear_data(cls, linear: nn.Module, rank: int, gram: Tensor, *,
                         input_mean: Optional[Tensor] = None, scale: Optional[Tensor] = None,
                         alpha: float = 0.5, row_weights: Optional[Tensor] = None) -> "LowRankLinear":
        """The rank-``rank`` layer with the least output error on inputs of second moment
        ``gram`` = E[x x^T] (N, N): SVD-LLM's whitened SVD (``tensorslim.tensor.whitened_svd``),
        or with ``scale`` (N,) = E|x| ASVD's activation-scaled SVD, or with ``row_weights`` (M,)
        FWSVD's row-weighted SVD (``tensorslim.tensor.row_weighted_svd``). With ``input_mean`` (N,) =
        E[x] and a bias, the error is measured centred and its mean (W - W^) E[x] moves into the
        bias (the exact optimum with a free bias). Sets ``approx_error`` (weight, as
        :meth:`from_linear`) and ``output_error`` (relative output error on those inputs)."""
        from ..tensor import asvd, row_weighted_svd, whitened_svd

        lin = cls._linear(linear)
        r = cls._check_rank(lin.in_features, lin.out_features, rank)
        check_module_finite(cls.__name__, lin)
        w = lin.weight.detach().to(torch.float64)
        g = gram.detach().to(device=w.device, dtype=torch.float64)
        mu = None if input_mean is None or lin.bias is None else input_mean.detach().to(w)
        metric = g - torch.outer(mu, mu) if mu is not None else g
        if scale is not None and row_weights is not None:
            raise TypeError(f"{cls.__name__}.from_linear_data: give scale= (ASVD) or row_weights= (FWSVD), not both")
        if scale is not None:
            res = asvd(w, scale.detach().to(w), r, alpha=alpha, gram=metric)
        elif row_weights is not None:
            res = row_weighted_svd(w, row_weights.detach().to(w), r, gram=metric)
        else:
            res = whitened_svd(w, metric, r)
        approx = res.to_tensor()
        bias = lin.bias
        if mu is not None:
            bias = lin.bias.detach().double() + (w - approx) @ mu
        layer = cls._assemble(lin.in_features, lin.out_features, res, bias, lin.weight)
        layer.approx_error = rel_error(w, approx)
        layer.output_error = float(res.curve[r]) ** 0.5
        return layer

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}"


class _LowRankConvNd(FactorizedConv):
    method = "svd"

    @classmethod
    def _max_rank(cls, geo: ConvGeometry) -> int:
        return min(geo.out_group, geo.in_group * prod(geo.kernel)) * geo.groups

    @classmethod
    def _check_rank(cls, geo: ConvGeometry, rank: Any) -> int:
        return check_int_rank(cls.__name__, "rank", rank, 1, cls._max_rank(geo), geo.groups)

    @classmethod
    def _valid_rank(cls, geo: ConvGeometry, rank: Any) -> int:
        return nearest_rank(cls.__name__, "rank", rank, cls._max_rank(geo), geo.groups)

    @classmethod
    def _stages(cls, geo: ConvGeometry, rank: Rank) -> list[Stage]:
        r = int(rank)  # type: ignore[arg-type]
        one = (1,) * geo.dims
        zero = tuple((0, 0) for _ in range(geo.dims))
        g = geo.groups
        return [
            Stage(geo.in_channels, r, geo.kernel, geo.stride, geo.dilation, g, False, geo.pads),
            Stage(r, geo.out_channels, one, one, one, g, geo.bias, zero),
        ]

    def _build(self, geo: ConvGeometry) -> None:
        core, last = self._stages(geo, self.rank)
        self.core = spatial_conv(self.dims, core, geo.conv_padding)
        self.project_out = pointwise(self.dims, last.in_channels, last.out_channels, geo.groups,
                                     geo.bias)

    def _chain(self) -> tuple[list[Tensor], list[int], Optional[Tensor]]:
        geo = self.geometry
        return ([self.core.weight, self.project_out.weight],
                [geo.in_group * prod(geo.kernel), self.rank // geo.groups],
                self.project_out.bias)

    def _forward(self, x: Tensor) -> Tensor:
        """(B, S, *spatial) -> (B, T, *spatial_out), the factorized stages."""
        cl = self._cl_out(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = self.core(self._pad(x))
        return self.project_out(y, cl)

    @classmethod
    def from_factors(cls, conv: nn.Module, svds: Sequence[Any]) -> "_LowRankConvNd":
        """Build from one SVDResult per group of the kernel reshaped (T/g, S/g * prod(k))."""
        return cls._assemble(cls._geometry(conv), svds, conv.bias, conv.weight)

    @classmethod
    def _assemble(cls, geo: ConvGeometry, svds: Sequence[Any], bias: Optional[Tensor],
                  like: Tensor) -> "_LowRankConvNd":
        if len(svds) != geo.groups:
            raise ValueError(f"{cls.__name__}: got {len(svds)} SVDs for groups={geo.groups}; "
                             f"need one per group")
        rank = sum(int(s.S.shape[0]) for s in svds)
        layer = cls(**geo.conv_kwargs(), rank=rank)
        layer.to(device=like.device, dtype=like.dtype)
        lasts, firsts = zip(*[_split(s) for s in svds])
        one = (1,) * geo.dims
        assign_(layer.core.weight, torch.cat(firsts).reshape(rank, geo.in_group, *geo.kernel))
        assign_(layer.project_out.weight,
                torch.cat(lasts).reshape(geo.out_channels, rank // geo.groups, *one))
        if bias is not None:
            assign_(layer.project_out.bias, bias.detach())
        return layer

    def to_svd(self) -> list[Any]:
        """Exact SVD (float64 ``SVDResult``) of each group's current kernel reshaped
        (T/g, S/g * prod(k)): U (T/g, r/g), S (r/g,), Vh (r/g, S/g * prod(k))."""
        g = self.geometry.groups
        a = self.core.weight.reshape(self.rank, -1)
        b = self.project_out.weight.reshape(self.geometry.out_channels, -1)
        return [product_svd(bi, ai) for bi, ai in zip(b.chunk(g), a.chunk(g))]

    def recompress(self, rank: int, **svd_opts: Any) -> "_LowRankConvNd":
        """A new layer at a smaller rank; ``self`` is untouched. Each group's exact SVD is
        truncated (the best approximation of that rank); ``approx_error`` as in ``from_conv``."""
        if svd_opts:
            raise TypeError(f"{type(self).__name__}.recompress: unexpected options {sorted(svd_opts)}")
        geo = self.geometry
        r = self._check_rank(geo, rank)
        _check_smaller(self, r)
        check_finite(f"{type(self).__name__}.recompress", dict(self.named_parameters()))
        exact = self.to_svd()
        parts = [truncate_svd(s, r // geo.groups)[0] for s in exact]
        layer = self._assemble(geo, parts, self.project_out.bias, self.core.weight)
        lost = sum(float((s.S[r // geo.groups:] ** 2).sum()) for s in exact)
        total = sum(float((s.S ** 2).sum()) for s in exact)
        layer.approx_error = (lost / total) ** 0.5 if total else 0.0
        return layer

    @classmethod
    def from_conv(cls, conv: nn.Module, rank: Rank, **svd_opts: Any) -> "_LowRankConvNd":
        """Truncated SVD of each group's (T/g, S/g * prod(k)) kernel; sets approx_error."""
        geo = cls._geometry(conv)
        r = cls._check_rank(geo, rank)
        check_module_finite(cls.__name__, conv)
        g = geo.groups
        w = conv.weight.detach().to(torch.float64)
        from ..tensor import svd
        parts = [svd(wg.reshape(wg.shape[0], -1), r // g, **svd_opts) for wg in group_blocks(w, g)]
        layer = cls.from_factors(conv, parts)
        approx = torch.cat([p.to_tensor() for p in parts]).reshape(w.shape)
        # the dense weight is the reference: ||W - W^|| / ||W||
        layer.approx_error = rel_error(w, approx)
        return layer


class LowRankConv2d(_LowRankConvNd):
    """SVD replacement of an ``nn.Conv2d``: ``core`` k x k conv (S -> r) then ``project_out``
    1x1 (r -> T, bias). Constructor mirrors ``nn.Conv2d`` plus ``rank``.
    Shapes: (B, S, H, W) -> (B, T, H', W')."""

    dims = 2
    dense_types = (nn.Conv2d,)


class LowRankConv1d(_LowRankConvNd):
    """SVD replacement of an ``nn.Conv1d``; see ``LowRankConv2d``. (B, S, L) -> (B, T, L')."""

    dims = 1
    dense_types = (nn.Conv1d,)


__all__ = ["LowRankLinear", "LowRankConv2d", "LowRankConv1d", "LayerTypeError"]
