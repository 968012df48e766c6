"""Tensor-Train embedding (Hrinchuk et al., "Tensorized Embedding Layers", 2020).

The (V, D) table, its rows padded with zeros to V' = prod(vocab_modes) >= V, is a TT-matrix
with cores ``G_k`` (r_{k-1}, v_k, d_k, r_k), D = prod(dim_modes):

    E[(i_1..i_d), (j_1..j_d)] = G_1[:, i_1, j_1, :] @ ... @ G_d[:, i_d, j_d, :].

A lookup of token i splits it into its mixed-radix digits (i_1..i_d) and contracts the d
gathered core slices; the table is never built (memory per token: D * max rank). Built from a
trained ``nn.Embedding`` by TT-SVD (``tensorslim.tensor.tt_matrix``), exact at full TT-rank.

:class:`LowRankEmbedding` (the truncated SVD of the table) is the layer plans use: it is
registered for ``("svd", nn.Embedding)``, so ``make_plan(model, "svd" | "auto", ...)`` prices
embedding tables next to the Linear layers. A dense lookup costs no MACs; the factorised one
costs r * D per token (``own_macs``, what ``tensorslim.count`` adds), so only a params goal can
compress a table. TTEmbedding is not registered: the planner's TT options, error proxies and
energy rule speak of a matrix's in / out modes, not of a padded vocabulary's.
"""
from __future__ import annotations

from math import ceil, prod
from typing import Any, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ._tt_common import chain_caps, check_modes, clip_ranks
from .base import FactorizedLayer, check_module_finite, nearest_rank

__all__ = ["TTEmbedding", "LowRankEmbedding", "vocab_modes_for"]


def vocab_modes_for(num_embeddings: int, d: int) -> tuple[int, ...]:
    """Balanced modes whose product is the smallest ``ceil(V^(1/d))``-style cover of V: d - 1
    equal modes q and a last one ceil(V / q^(d-1)), q = ceil(V^(1/d))."""
    if num_embeddings < 1 or d < 1:
        raise ValueError(f"vocab_modes_for: num_embeddings={num_embeddings} and d={d} must be >= 1")
    q = max(1, ceil(round(num_embeddings ** (1.0 / d), 9)))
    return (q,) * (d - 1) + (ceil(num_embeddings / q ** (d - 1)),)


def _check_embedding(cls: type, module: nn.Module) -> None:
    """LayerTypeError for a non-Embedding; ValueError for max_norm / sparse (kept dense)."""
    cls._check_type(module)
    if module.max_norm is not None or module.sparse:
        raise ValueError(f"{cls.__name__}: an nn.Embedding with max_norm / sparse gradients is kept "
                         "dense (the factorised table has no per-row renormalisation)")


class TTEmbedding(FactorizedLayer):
    """``TTEmbedding(num_embeddings, embedding_dim, rank, vocab_modes=None, dim_modes=None, d=3)``.

    ``rank``: max internal TT-rank (int) or one per bond; ``cores[k]`` (r_{k-1}, v_k, d_k, r_k).
    Shapes: (*) int64 indices -> (*, embedding_dim).
    """

    method = "tt"
    dense_types = (nn.Embedding,)

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: Any,
                 vocab_modes: Optional[Sequence[int]] = None, dim_modes: Optional[Sequence[int]] = None,
                 d: int = 3) -> None:
        super().__init__()
        name = type(self).__name__
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.dim_modes = check_modes(name, embedding_dim, dim_modes, d, "dim_modes")
        self.vocab_modes = (vocab_modes_for(num_embeddings, len(self.dim_modes)) if vocab_modes is None
                            else tuple(int(v) for v in vocab_modes))
        if len(self.vocab_modes) != len(self.dim_modes) or prod(self.vocab_modes) < num_embeddings:
            raise ValueError(f"{name}: vocab_modes={self.vocab_modes} must have {len(self.dim_modes)} modes "
                             f"(as dim_modes) with product >= num_embeddings={num_embeddings}")
        caps = chain_caps([v * m for v, m in zip(self.vocab_modes, self.dim_modes)])
        self.ranks = clip_ranks(name, rank, caps)
        self.rank = list(self.ranks) if not isinstance(rank, int) else int(rank)
        bonds = (1,) + self.ranks + (1,)
        self.cores = nn.ParameterList(
            nn.Parameter(torch.randn(bonds[k], v, m, bonds[k + 1]) / (bonds[k] * m) ** 0.5)
            for k, (v, m) in enumerate(zip(self.vocab_modes, self.dim_modes)))
        radix = [prod(self.vocab_modes[k + 1:]) for k in range(len(self.vocab_modes))]
        self.register_buffer("radix", torch.tensor(radix, dtype=torch.long), persistent=False)

    def forward(self, idx: Tensor) -> Tensor:
        """(*) token indices -> (*, D), contracting the gathered core slices."""
        flat = idx.reshape(-1)
        digits = (flat[:, None] // self.radix) % torch.tensor(self.vocab_modes, device=flat.device)
        out = self.cores[0][0, digits[:, 0]]  # (n, d_1, r_1)
        for k in range(1, len(self.cores)):
            core = self.cores[k][:, digits[:, k]].permute(1, 0, 2, 3)  # (n, r_{k-1}, d_k, r_k)
            out = torch.einsum("npr,nrds->npds", out, core).reshape(flat.shape[0], -1, core.shape[-1])
        return out.reshape(*idx.shape, self.embedding_dim)

    # -- protocol ------------------------------------------------------------------------------
    @classmethod
    def check(cls, module: nn.Module) -> None:
        _check_embedding(cls, module)

    @classmethod
    def _opts(cls, module: nn.Module, opts: dict) -> dict:
        unknown = set(opts) - {"vocab_modes", "dim_modes", "d"}
        if unknown:
            raise TypeError(f"{cls.__name__}: unexpected options {sorted(unknown)}; accepted: vocab_modes, "
                            "dim_modes, d")
        cls.check(module)
        return opts

    @classmethod
    def like(cls, module: nn.Module, rank: Any, **opts: Any) -> "TTEmbedding":
        opts = cls._opts(module, opts)
        layer = cls(module.num_embeddings, module.embedding_dim, rank, **opts)
        return layer.to(device=module.weight.device, dtype=module.weight.dtype)

    @classmethod
    def from_dense(cls, module: nn.Module, rank: Any, **opts: Any) -> "TTEmbedding":
        """TT-SVD of the zero-padded table; sets ``approx_error`` ||E - E^|| / ||E||."""
        from ..tensor import tt_matrix

        layer = cls.like(module, rank, **opts)
        check_module_finite(cls.__name__, module)
        w = module.weight.detach().double()
        padded = torch.cat([w, w.new_zeros(prod(layer.vocab_modes) - w.shape[0], w.shape[1])])
        tt = tt_matrix(padded, layer.dim_modes, layer.vocab_modes, list(layer.ranks))
        with torch.no_grad():
            for p, c in zip(layer.cores, tt.cores):
                if p.shape != c.shape:  # TT-SVD stopped below a cap: keep its smaller bond
                    raise ValueError(f"{cls.__name__}: TT-SVD core {tuple(c.shape)} != {tuple(p.shape)}")
                p.copy_(c.to(p))
        from ..tensor import rel_error

        layer.approx_error = rel_error(w, tt.to_tensor()[: w.shape[0]])  # the real rows only
        return layer

    @classmethod
    def cost(cls, module: nn.Module, rank: Any, in_shape: Sequence[int], out_shape: Sequence[int],
             **opts: Any) -> tuple[int, int]:
        """(params, MACs per sample): MACs of the per-token core contractions."""
        layer_shape = cls.like(module, rank, **opts)
        params = sum(p.numel() for p in layer_shape.cores)
        tokens = prod(int(s) for s in in_shape) if in_shape else 1
        macs, width = 0, layer_shape.dim_modes[0]
        bonds = (1,) + layer_shape.ranks + (1,)
        for k in range(1, len(layer_shape.dim_modes)):
            macs += width * bonds[k] * layer_shape.dim_modes[k] * bonds[k + 1]
            width *= layer_shape.dim_modes[k]
        return params, tokens * macs

    @classmethod
    def valid_rank(cls, module: nn.Module, rank: Any, **opts: Any) -> Any:
        """An int rank rounded and clipped to [1, largest bond cap]."""
        cls._opts(module, dict(opts))
        if isinstance(rank, (tuple, list)):
            return [max(1, int(round(r))) for r in rank]
        dims = check_modes(cls.__name__, module.embedding_dim, opts.get("dim_modes"), opts.get("d", 3), "dim_modes")
        vocab = opts.get("vocab_modes") or vocab_modes_for(module.num_embeddings, len(dims))
        return min(max(1, int(round(rank))), max(chain_caps([v * m for v, m in zip(vocab, dims)])))

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, vocab_modes={self.vocab_modes}, "
                f"dim_modes={self.dim_modes}, ranks={self.ranks}")


class LowRankEmbedding(FactorizedLayer):
    """``LowRankEmbedding(num_embeddings, embedding_dim, rank)``: row i is ``rows[i] @ basis``,
    ``rows`` (V, r) gathered, ``basis`` (r, D); the table is never built. Shapes: (*) -> (*, D).

    ``bias`` is None unless :meth:`fold_output_affine` folded an affine map into the layer.
    ``from_dense(emb, r)`` keeps the truncated SVD of the table; with ``row_weights`` (V,)
    (e.g. sqrt of token frequencies + a floor) the weighted SVD of ``diag(w) E`` instead, so
    frequent tokens are reproduced best (``tensorslim.tensor.row_weighted_svd``)."""

    method = "svd"
    dense_types = (nn.Embedding,)

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.rank = self._check_rank(num_embeddings, embedding_dim, rank)
        self.out_features = self.embedding_dim  # the output width, as tensorslim.fuse reads it
        self.rows = nn.Parameter(torch.randn(num_embeddings, self.rank) / self.rank ** 0.5)
        self.basis = nn.Parameter(torch.randn(self.rank, embedding_dim))
        self.register_parameter("bias", None)  # only fold_output_affine creates one

    @classmethod
    def _check_rank(cls, v: int, d: int, rank: Any) -> int:
        from .base import check_int_rank

        return check_int_rank(cls.__name__, "rank", rank, 1, min(v, d))

    def forward(self, idx: Tensor) -> Tensor:
        """(*) token indices -> (*, D)."""
        out = nn.functional.embedding(idx, self.rows) @ self.basis
        bias = self.bias
        if bias is not None:
            out = out + bias
        return out

    @classmethod
    def check(cls, module: nn.Module) -> None:
        _check_embedding(cls, module)

    @classmethod
    def like(cls, module: nn.Module, rank: Any, **opts: Any) -> "LowRankEmbedding":
        if opts:
            raise TypeError(f"{cls.__name__}.like: unexpected options {sorted(opts)}")
        cls.check(module)
        layer = cls(module.num_embeddings, module.embedding_dim, rank)
        return layer.to(device=module.weight.device, dtype=module.weight.dtype)

    @classmethod
    def from_dense(cls, module: nn.Module, rank: Any, *, row_weights: Optional[Tensor] = None,
                   **opts: Any) -> "LowRankEmbedding":
        """(Row-weighted) truncated SVD of the table; ``approx_error`` ||E - E^|| / ||E||."""
        from ..tensor import rel_error, row_weighted_svd

        layer = cls.like(module, rank, **opts)
        check_module_finite(cls.__name__, module)
        w = module.weight.detach().double()
        weights = torch.ones(w.shape[0], dtype=w.dtype) if row_weights is None else row_weights.to(w)
        res = row_weighted_svd(w, weights, layer.rank)
        with torch.no_grad():
            layer.rows.copy_((res.U * res.S).to(layer.rows))
            layer.basis.copy_(res.Vh.to(layer.basis))
        layer.approx_error = rel_error(w, res.to_tensor())
        return layer

    @classmethod
    def cost(cls, module: nn.Module, rank: Any, in_shape: Sequence[int], out_shape: Sequence[int],
             **opts: Any) -> tuple[int, int]:
        """(params, MACs per sample): one (r -> D) product per token."""
        r = cls._check_rank(module.num_embeddings, module.embedding_dim, rank)
        tokens = prod(int(s) for s in in_shape) if in_shape else 1
        return r * (module.num_embeddings + module.embedding_dim), tokens * r * module.embedding_dim

    @classmethod
    def valid_rank(cls, module: nn.Module, rank: Any, **opts: Any) -> int:
        """``rank`` (a positive number) rounded and clipped to [1, min(V, D)]."""
        if opts:
            raise TypeError(f"{cls.__name__}.valid_rank: unexpected options {sorted(opts)}; it takes none")
        cls.check(module)
        return nearest_rank(cls.__name__, "rank", rank, min(module.num_embeddings, module.embedding_dim))

    @classmethod
    def rank_space(cls, module: nn.Module, **opts: Any) -> list[int]:
        """The planner's candidate ranks, smallest first: 1 .. min(V, D)."""
        if opts:
            raise TypeError(f"{cls.__name__}.rank_space: unexpected options {sorted(opts)}; it takes none")
        return list(range(1, min(module.num_embeddings, module.embedding_dim) + 1))

    def own_macs(self, in_shape: Tuple[int, ...], out_shape: Tuple[int, ...]) -> int:
        """MACs of ``rows[idx] @ basis`` for one call on indices of shape ``in_shape`` (run by
        ``forward`` itself, not by a child module; ``tensorslim.count`` adds them): one
        (r -> D) product per token, as :meth:`cost` prices it. The gather multiplies nothing."""
        return prod(int(s) for s in in_shape) * self.rank * self.embedding_dim

    def fold_output_affine(self, scale: Tensor, shift: Tensor) -> None:
        """``y -> scale * y + shift`` per output feature (``scale``, ``shift``: (D,)): the
        columns of ``basis`` scaled, ``shift`` into a bias (created if absent), computed in
        float64, stored as new Parameters (e.g. a BatchNorm1d after a (B,) -> (B, D) lookup)."""
        from .base import check_affine, folded_params

        check_affine(type(self).__name__, self.embedding_dim, scale, shift)
        basis = self.basis  # (r, D): output features along its columns
        self.basis, self.bias = folded_params(basis, self.bias, basis.detach().double() * scale.detach().double(),
                                              scale, shift)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}"
