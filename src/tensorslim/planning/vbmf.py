"""EVBMF ranks of layers: a dense layer (grouped convs per group), and an already factorized
layer (MUSCO's further stages). The matrix math is :mod:`tensorslim.rank.vbmf`; this module
reads ``nn.Module`` weights, which ``rank/`` never does."""
from __future__ import annotations

from typing import Any

import torch

from ..rank.vbmf import evbmf_rank, soften_rank, vbmf_ranks
from .candidates import PlannedLayer


def layer_vbmf_rank(layer: PlannedLayer, factor: float) -> Any:
    """EVBMF rank of one dense layer softened by ``factor``; a grouped conv takes the
    largest per-group rank times groups. ValueError for methods other than tucker / svd."""
    if layer.method not in ("tucker", "svd"):
        raise ValueError(
            f"layer {layer.name}: rank_rule='vbmf' works for methods 'tucker' and 'svd' (EVBMF "
            f"estimates matrix ranks of the kernel's unfoldings), got {layer.method!r}; use "
            f"method 'tucker'/'svd'/'auto', or another rank_rule for 'cp'/'tt'")
    w = layer.module.weight.detach()
    g = getattr(layer.module, "groups", 1)
    ranks = [vbmf_ranks(wg, layer.method, factor) for wg in w.chunk(g, dim=0)]
    if layer.method == "svd":
        return max(ranks) * g
    return (max(r[0] for r in ranks) * g, max(r[1] for r in ranks) * g)


def _qr(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin QR of ``u`` (n, r), n >= r: ``u = Q R``, Q (n, r) orthonormal, R (r, r)."""
    return torch.linalg.qr(u.detach().to(torch.float64))


def vbmf_ranks_factorized(layer: Any, factor: float = 1.0, *, min_rank: int = 1) -> int | tuple[int, int]:
    """EVBMF ranks to re-compress an already factorized layer (MUSCO's further stages), with
    R = the layer's current ranks in :func:`soften_rank`.

    The matrix EVBMF sees is the current kernel W^'s unfolding expressed in its own kept basis
    (its row space), i.e. with the exactly-zero singular values beyond the current rank
    removed, and with the *other* dimensions of the original layer:

    * ``TuckerConv{1,2}d`` (groups=1), W^ = G x_0 U_out x_1 U_in: the factors are
      orthonormalised (U = Q R, R absorbed into the core, G' = G x_0 R_out x_1 R_in), then
      r_in from ``unfold(G' x_0 Q_out, 1)`` (r_in, T*prod(k)) and r_out from
      ``unfold(G' x_1 Q_in, 0)`` (r_out, S*prod(k)). Their singular values are those of the
      core's unfoldings (MUSCO applies EVBMF to the core), but the noise model keeps the
      original long dimension: EVBMF can only resolve ranks below ~L / (1 + L/M) - 1 of an
      (L, M) matrix, and the bare core (r_in, r_out*prod(k)) puts that bound at the current
      rank when it is tight (measured: a (6, 10)-rank kernel decomposed at (8, 12) gives
      (6, 1) on the bare core and (6, 10) here). Invariant to any rescaling between the core
      and the factors (what fine-tuning does).
    * ``LowRankLinear`` / ``LowRankConv{1,2}d`` (groups=1), W^ = B A, B (M, r), A (r, N): EVBMF
      runs on the product, not on one factor (a factor alone depends on how the scale is
      split between A and B): ``R_B A`` (r, N) when N >= M, else ``B R_A^T`` (M, r), with
      B = Q_B R_B and A^T = Q_A R_A. Both have the nonzero singular values of B A; for a
      truncated SVD, ``Q_B^T W^ = Q_B^T W`` is the original weight projected on the kept
      output subspace. (The r x r matrix ``R_B R_A^T`` has the same singular values but, being
      square, cannot resolve ranks above ~r/2.)
    Returns (r_in, r_out) for Tucker, r for low-rank layers.
    """
    from ..layers import LowRankConv1d, LowRankConv2d, LowRankLinear, TuckerConv1d, TuckerConv2d
    from ..tensor import mode_dot, unfold

    name = type(layer).__name__
    if isinstance(layer, (TuckerConv1d, TuckerConv2d)):
        _no_groups(layer, name)
        r_in, r_out = layer.rank
        q_in, rr_in = _qr(layer.project_in.weight.reshape(r_in, -1).T)  # U_in (S, r_in)
        q_out, rr_out = _qr(layer.project_out.weight.reshape(-1, r_out))  # U_out (T, r_out)
        core = layer.core.weight.detach().to(torch.float64)  # (r_out, r_in, *k)
        core = mode_dot(mode_dot(core, rr_out, 0), rr_in, 1)
        k_in = evbmf_rank(unfold(mode_dot(core, q_out, 0), 1))
        k_out = evbmf_rank(unfold(mode_dot(core, q_in, 1), 0))
        return (soften_rank(r_in, k_in, factor, min_rank=min_rank),
                soften_rank(r_out, k_out, factor, min_rank=min_rank))
    if isinstance(layer, (LowRankLinear, LowRankConv1d, LowRankConv2d)):
        if isinstance(layer, LowRankLinear):
            a, b = layer.project_in.weight, layer.project_out.weight
        else:
            _no_groups(layer, name)
            a, b = layer.core.weight, layer.project_out.weight
        r = int(layer.rank)
        a = a.detach().to(torch.float64).reshape(r, -1)  # (r, N)
        b = b.detach().to(torch.float64).reshape(-1, r)  # (M, r)
        x = _qr(b)[1] @ a if a.shape[1] >= b.shape[0] else b @ _qr(a.T)[1].T
        return soften_rank(r, evbmf_rank(x), factor, min_rank=min_rank)
    raise ValueError(
        f"vbmf_ranks_factorized supports TuckerConv1d/2d, LowRankLinear and LowRankConv1d/2d, "
        f"got {name}")


def _no_groups(layer: Any, name: str) -> None:
    groups = layer.geometry.groups
    if groups != 1:
        raise ValueError(f"vbmf_ranks_factorized: {name} with groups={groups} is not supported; "
                         f"only groups=1")
