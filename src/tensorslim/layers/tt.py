"""Tensor-Train Linear layer (Novikov et al. 2015, "Tensorizing Neural Networks").

W (M, N), M = prod(out_modes), N = prod(in_modes), is stored as TT-cores
``G_k`` (r_{k-1}, m_k, n_k, r_k), r_0 = r_d = 1, with
``W[(i_1..i_d), (j_1..j_d)] = G_1[:, i_1, j_1, :] @ ... @ G_d[:, i_d, j_d, :]``
(row-major multi-indices, i.e. ``W.reshape(out_modes + in_modes)``; the layout of
``tensorslim.tensor.TTMatrix``).

Forward never builds W. It contracts one core per step as a single large matmul with the
batch merged into the rows, then one permute that brings the next contracted pair last:

    right-to-left, step k = d..1: state (P, Q, n_k, r_k), P = (B, n_1..n_{k-1}),
    Q = (m_{k+1}..m_d); mm with G_k viewed (n_k r_k, r_{k-1} m_k) -> (P', m_k Q, n_{k-1}, r_{k-1})

(left-to-right mirrors it). MACs per sample = sum_k rows_k * n_k r_k * r_{k-1} m_k with
rows_k = prod_{j<k} n_j prod_{j>k} m_j (right-to-left); the cheaper direction is chosen.
"""
from math import prod
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ._conv import assign_
from ..tensor import rel_error
from ._tt_common import check_modes as _modes, factorize, init_variance, max_tt_ranks, tt_init_
from .base import FactorizedLayer, Rank, check_module_finite, dense_bias_, nearest_rank


CHUNK_ELEMENTS = 1 << 18  # 1 MiB of float32 per intermediate: stays in L2 on common CPUs


def _ranks(layer: str, rank: Any, in_modes: Sequence[int], out_modes: Sequence[int]) -> tuple[int, ...]:
    """Internal ranks (r_1..r_{d-1}). An int is clipped per bond to the useful maximum."""
    caps = max_tt_ranks(in_modes, out_modes)
    d = len(in_modes)
    if isinstance(rank, bool):
        raise TypeError(f"{layer}: rank must be an int or a sequence of ints, got {rank!r}")
    if isinstance(rank, int):
        if rank < 1:
            raise ValueError(f"{layer}: rank={rank} must be >= 1")
        if caps and rank > max(caps):
            raise ValueError(f"{layer}: rank={rank} is larger than any TT bond can use for "
                             f"modes in={tuple(in_modes)} out={tuple(out_modes)}; accepted: 1.."
                             f"{max(caps)} (per bond: {caps})")
        return tuple(min(rank, c) for c in caps)
    ranks = [int(r) for r in rank]
    if len(ranks) == d + 1 and ranks[0] == 1 and ranks[-1] == 1:
        ranks = ranks[1:-1]
    if len(ranks) != d - 1:
        raise ValueError(f"{layer}: ranks={tuple(rank)} must be an int or d-1={d - 1} internal "
                         f"ranks (or d+1 with r_0 = r_d = 1)")
    for k, (r, c) in enumerate(zip(ranks, caps), start=1):
        if r < 1 or r > c:
            raise ValueError(f"{layer}: TT-rank r_{k}={r} is out of range; accepted 1 <= r_{k} "
                             f"<= {c} for modes in={tuple(in_modes)} out={tuple(out_modes)}")
    return tuple(ranks)


def _plan(in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int], ltr: bool) -> dict[str, list[Any]]:
    """Per-step metadata of the contraction (see module doc) and per-sample row multipliers."""
    d = len(in_modes)
    n, m, r = list(in_modes), list(out_modes), [1, *ranks, 1]
    steps: dict[str, list[Any]] = {k: [] for k in ("order", "perm", "k_in", "k_out", "a", "q", "b", "c", "rows")}
    for s in range(d):
        k = s if ltr else d - 1 - s  # 0-based core index
        if ltr:  # contract (n_k, r_{k-1}); cols (r_k, m_k); next pair (n_{k+1}, r_k)
            perm, k_in, k_out = [2, 0, 3, 1], n[k] * r[k], r[k + 1] * m[k]
            a, q, b = (n[k + 1] if k + 1 < d else 1), prod(n[k + 2:]), r[k + 1]
            rows = prod(m[:k]) * prod(n[k + 1:])
        else:  # contract (n_k, r_k); cols (r_{k-1}, m_k); next pair (n_{k-1}, r_{k-1})
            perm, k_in, k_out = [2, 3, 0, 1], n[k] * r[k + 1], r[k] * m[k]
            a, q, b = (n[k - 1] if k > 0 else 1), prod(m[k + 1:]), r[k]
            rows = prod(n[:k]) * prod(m[k + 1:])
        for key, v in zip(steps, (k, perm, k_in, k_out, a, q, b, m[k], rows)):
            steps[key].append(v)
    return steps


def _plan_macs(steps: dict[str, list[Any]]) -> int:
    return sum(rw * ki * ko for rw, ki, ko in zip(steps["rows"], steps["k_in"], steps["k_out"]))


class TTLinear(FactorizedLayer):
    """TT-matrix replacement of ``nn.Linear``.

    ``TTLinear(in_features, out_features, in_modes=None, out_modes=None, ranks=8, bias=True,
    *, d=3, init="dense")``: modes default to ``factorize(features, d)``; ``ranks`` is an int
    (clipped per bond to the useful maximum) or the d-1 internal TT-ranks; ``init`` "dense"
    (``nn.Linear``'s weight variance) or "glorot" (t3f). Parameters: ``cores[k]``
    (r_{k-1}, m_k, n_k, r_k), ``bias`` (M,) and, once a BatchNorm was folded into the layer,
    ``out_scale`` (M,) (see ``fold_output_affine``). Shapes: (*, N) -> (*, M).
    """

    method = "tt"
    dense_types = (nn.Linear,)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        in_modes: Optional[Sequence[int]] = None,
        out_modes: Optional[Sequence[int]] = None,
        ranks: Rank = 8,
        bias: bool = True,
        *,
        d: int = 3,
        init: str = "dense",
    ) -> None:
        super().__init__()
        name = type(self).__name__
        init_variance(name, init, in_features, out_features)  # validates init
        self.init = init
        if in_modes is not None:
            d = len(in_modes)
        elif out_modes is not None:
            d = len(out_modes)
        self.in_modes = _modes(name, in_features, in_modes, d, "in_modes")
        self.out_modes = _modes(name, out_features, out_modes, d, "out_modes")
        if len(self.in_modes) != len(self.out_modes):
            raise ValueError(f"{name}: in_modes={self.in_modes} and out_modes={self.out_modes} "
                             f"must have the same length")
        self.rank = _ranks(name, ranks, self.in_modes, self.out_modes)
        self.in_features = in_features
        self.out_features = out_features
        r = (1, *self.rank, 1)
        self.cores = nn.ParameterList(
            [nn.Parameter(torch.empty(r[k], m, n, r[k + 1]))
             for k, (m, n) in enumerate(zip(self.out_modes, self.in_modes))])
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
        else:
            self.register_parameter("bias", None)
        # per-output scale of a folded BatchNorm (see fold_output_affine); None until then
        self.register_parameter("out_scale", None)
        # Contraction plan: fixed here so forward has no data-dependent control flow.
        rtl = _plan(self.in_modes, self.out_modes, self.rank, ltr=False)
        ltr = _plan(self.in_modes, self.out_modes, self.rank, ltr=True)
        self.ltr = _plan_macs(ltr) < _plan_macs(rtl)
        plan = ltr if self.ltr else rtl
        self.order = plan["order"]
        self.perm = plan["perm"]
        self.k_in = plan["k_in"]
        self.k_out = plan["k_out"]
        self.a = plan["a"]
        self.q = plan["q"]
        self.b = plan["b"]
        self.c = plan["c"]
        self.rows = plan["rows"]
        self.n_first = self.in_modes[0]
        self.n_last = self.in_modes[-1]
        # eager-mode row chunk: keeps the largest intermediate under ~CHUNK_ELEMENTS floats
        widest = max(rw * ko for rw, ko in zip(self.rows, self.k_out))
        self.chunk_rows = max(1, CHUNK_ELEMENTS // max(widest, self.in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Gaussian cores with Var(W_ij) = 1/(3N) (``init="dense"``: ``nn.Linear``'s default)
        or 2/(N+M) (``init="glorot"``, t3f), so the output variance matches that dense init."""
        var = init_variance(type(self).__name__, self.init, self.in_features, self.out_features)
        tt_init_(list(self.cores), self.rank, var)
        dense_bias_(self.bias, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        """(*, N) -> (*, M)."""
        if torch.jit.is_scripting():
            return self._contract(x)
        return self._forward_eager(x)

    @torch.jit.unused
    def _forward_eager(self, x: Tensor) -> Tensor:
        """Eager mode: contract ``chunk_rows`` input rows at a time so the intermediate states
        (up to r * max(m, n) times larger than the input) stay in cache instead of streaming
        through memory. Same numbers; traced / exported / compiled graphs use one chunk."""
        if (self.chunk_rows < 1 or torch.jit.is_tracing() or torch.compiler.is_compiling()
                or torch.compiler.is_exporting()):
            return self._contract(x)
        rows = x.numel() // self.in_features
        if rows <= self.chunk_rows:
            return self._contract(x)
        flat = x.reshape(rows, self.in_features)
        out = torch.cat([self._contract(c) for c in flat.split(self.chunk_rows)])
        return out.reshape(list(x.shape[:-1]) + [self.out_features])

    def _contract(self, x: Tensor) -> Tensor:
        """The TT contraction (see module doc): one mm + one permute per core."""
        lead = list(x.shape[:-1])
        cores = [c for c in self.cores]
        if self.ltr:
            z = x.reshape(-1, self.n_first, self.in_features // self.n_first)
            z = z.transpose(1, 2).reshape(-1, self.n_first)
        else:
            z = x.reshape(-1, self.n_last)
        for s in range(len(self.order)):
            w = cores[self.order[s]].permute(self.perm[s]).reshape(self.k_in[s], self.k_out[s])
            y = torch.mm(z, w)
            y = y.view(-1, self.a[s], self.q[s], self.b[s], self.c[s]).permute(0, 4, 2, 1, 3)
            z = y.reshape(-1, self.a[s] * self.b[s])
        out = z.reshape(lead + [self.out_features])
        bias, scale = self.bias, self.out_scale
        if scale is not None and bias is not None:  # a folded BatchNorm: in the bias add
            out = torch.addcmul(bias, out, scale)
        elif bias is not None:
            out = out + bias
        return out

    def fold_output_affine(self, scale: Tensor, shift: Tensor) -> None:
        """``y -> scale * y + shift`` per output feature (``scale``, ``shift``: (M,)); the bias
        becomes ``scale * bias + shift`` (created if absent). Output feature i = (i_1..i_d)
        is a product of modes, so a scale folds into the cores only if it is a Kronecker
        product of per-mode vectors: in general it becomes an ``out_scale`` parameter applied
        inside the bias add (``torch.addcmul``, one pass as before); when one out-mode holds
        all M features it folds exactly into that core."""
        from .base import check_affine

        check_affine(type(self).__name__, self.out_features, scale, shift)
        s, t, ref = scale.detach().double(), shift.detach().double(), self.cores[0]
        wide = [k for k, m in enumerate(self.out_modes) if m > 1] or [0]
        as_param = lambda v: nn.Parameter(v.to(dtype=ref.dtype, device=ref.device),  # noqa: E731
                                          requires_grad=ref.requires_grad)
        if len(wide) == 1:
            self.cores[wide[0]] = as_param(self.cores[wide[0]].detach().double() * s.view(1, -1, 1, 1))
        else:
            old = self.out_scale
            self.out_scale = as_param(s if old is None else old.detach().double() * s)
        bias = self.bias
        self.bias = as_param(t if bias is None else bias.detach().double() * s + t)

    def macs(self, in_shape: Sequence[int]) -> int:
        """Multiply-accumulates of ``forward`` on an input of shape ``in_shape`` (*, N): leading
        dims multiply (pass a per-sample shape for per-sample MACs). Equals
        FlopCounterMode's flops / 2 (bias adds are not MACs)."""
        if not len(in_shape) or int(in_shape[-1]) != self.in_features:
            raise ValueError(f"TTLinear: in_shape={tuple(in_shape)} must end with "
                             f"{self.in_features}")
        rows = prod(int(s) for s in in_shape[:-1])
        return rows * sum(rw * ki * ko for rw, ki, ko in zip(self.rows, self.k_in, self.k_out))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def _linear(cls, module: nn.Module) -> nn.Linear:
        cls._check_type(module)
        return module  # type: ignore[return-value]

    @classmethod
    def valid_rank(cls, module: nn.Module, rank: Any, *, in_modes: Optional[Sequence[int]] = None,
                   out_modes: Optional[Sequence[int]] = None, d: int = 3) -> Rank:
        """The valid TT-rank nearest to ``rank``: an int (max TT-rank) rounded and clipped to
        [1, largest bond maximum]; a sequence of d-1 internal ranks each rounded and clipped
        to its bond's maximum (modes as in ``like``)."""
        lin = cls._linear(module)
        name = cls.__name__
        with torch.device("meta"):  # validates the modes, no memory
            shape = cls(lin.in_features, lin.out_features, in_modes, out_modes, 1, d=d)
        caps = max_tt_ranks(shape.in_modes, shape.out_modes)
        if isinstance(rank, (list, tuple)):
            ranks = list(rank)
            if len(ranks) == len(caps) + 2:  # with the boundary ranks r_0 = r_d = 1
                ranks = ranks[1:-1]
            if len(ranks) != len(caps):
                raise ValueError(f"{name}: ranks={tuple(rank)} must be a number or "
                                 f"{len(caps)} internal TT-ranks")
            return tuple(nearest_rank(name, f"r_{k}", r, c)
                         for k, (r, c) in enumerate(zip(ranks, caps), start=1))
        return nearest_rank(name, "rank", rank, max(caps, default=1))

    @classmethod
    def like(cls, module: nn.Module, rank: Rank, *, in_modes: Optional[Sequence[int]] = None,
             out_modes: Optional[Sequence[int]] = None, d: int = 3) -> "TTLinear":
        """Random init with ``module``'s shape; modes default to ``factorize(features, d)``."""
        lin = cls._linear(module)
        layer = cls(lin.in_features, lin.out_features, in_modes, out_modes, rank,
                    lin.bias is not None, d=d)
        return layer.to(device=lin.weight.device, dtype=lin.weight.dtype)

    @classmethod
    def cost(cls, module: nn.Module, rank: Rank, in_shape: Sequence[int],
             out_shape: Sequence[int], *, in_modes: Optional[Sequence[int]] = None,
             out_modes: Optional[Sequence[int]] = None, d: int = 3) -> tuple[int, int]:
        """(params, MACs per sample), equal to the built layer's ``num_params()``/``macs()``."""
        lin = cls._linear(module)
        with torch.device("meta"):
            layer = cls(lin.in_features, lin.out_features, in_modes, out_modes, rank,
                        lin.bias is not None, d=d)
        return layer.num_params(), layer.macs(in_shape)

    @classmethod
    def from_factors(cls, linear: nn.Module, ttm: Any) -> "TTLinear":
        """Build from a ``TTMatrix`` of ``linear.weight`` (cores (r_{k-1}, m_k, n_k, r_k))."""
        lin = cls._linear(linear)
        ranks = [int(c.shape[3]) for c in ttm.cores[:-1]]
        layer = cls(lin.in_features, lin.out_features, tuple(ttm.in_modes), tuple(ttm.out_modes),
                    ranks, lin.bias is not None)
        layer.to(device=lin.weight.device, dtype=lin.weight.dtype)
        for p, c in zip(layer.cores, ttm.cores):
            assign_(p, c)
        if lin.bias is not None:
            assign_(layer.bias, lin.bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Module, rank: Rank, *,
                    in_modes: Optional[Sequence[int]] = None,
                    out_modes: Optional[Sequence[int]] = None, d: int = 3,
                    **tt_opts: Any) -> "TTLinear":
        """TT-SVD (``tensorslim.tensor.tt_matrix`` with ``tt_opts``) of ``linear.weight`` at
        ``rank`` (max TT-rank, or the d-1 internal ranks); modes as in ``like``. Sets
        approx_error.

        Cores come back zero-padded to the requested ranks if TT-SVD found smaller ones, so
        the layer always has the architecture ``like(linear, rank, ...)`` builds.
        """
        lin = cls._linear(linear)
        layer = cls.like(lin, rank, in_modes=in_modes, out_modes=out_modes, d=d)
        check_module_finite(cls.__name__, lin)
        w = lin.weight.detach().to(torch.float64)
        from ..tensor import tt_matrix
        ttm = tt_matrix(w, layer.in_modes, layer.out_modes, list(layer.rank), **tt_opts)
        r = (1, *layer.rank, 1)
        with torch.no_grad():
            for k, (p, c) in enumerate(zip(layer.cores, ttm.cores)):
                p.zero_()
                a, b = min(r[k], c.shape[0]), min(r[k + 1], c.shape[3])
                p[:a, :, :, :b] = c[:a, :, :, :b].to(p.dtype)
        if lin.bias is not None:
            assign_(layer.bias, lin.bias)
        # the dense weight is the reference: ||W - W^|| / ||W||
        layer.approx_error = rel_error(w, ttm.to_tensor())
        return layer

    @classmethod
    def from_dense(cls, module: nn.Module, rank: Rank, **opts: Any) -> "TTLinear":
        return cls.from_linear(module, rank, **opts)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, in_modes={self.in_modes}, "
                f"out_modes={self.out_modes}, ranks={self.rank}, "
                f"order={'left-to-right' if self.ltr else 'right-to-left'}")


def tt_weight(layer: TTLinear) -> Tensor:
    """Reference only (tests): the dense (M, N) weight the cores represent."""
    out = layer.cores[0].detach()
    for core in list(layer.cores)[1:]:
        out = torch.tensordot(out, core.detach(), dims=([out.dim() - 1], [0]))
    d = len(layer.cores)
    out = out.reshape([s for c in layer.cores for s in c.shape[1:3]])
    perm = [2 * k for k in range(d)] + [2 * k + 1 for k in range(d)]
    return out.permute(perm).reshape(layer.out_features, layer.in_features)


__all__ = ["TTLinear", "factorize", "max_tt_ranks", "tt_weight"]
