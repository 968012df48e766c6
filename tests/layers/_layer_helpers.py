"""Shared helpers of the layer tests: dense configs, known-rank factors, MAC counting, and the
Embedding branch of the registry-driven tests (integer token inputs; what does not apply)."""
from math import prod
from typing import Any

import torch
from torch import nn

from tensorslim.layers import factorize
from tensorslim.layers.ttconv import TTConv2d
from tensorslim.tensor.filter_cp import FilterCP
from tensorslim.tensor.results import CPTensor, SVDResult, TTMatrix, TTTensor, TuckerTensor

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
# rank per method (totals over groups; divisible by 4; TT: a bound on every bond, clipped per
# bond to its exact rank)
RANKS = {"cp": 8, "tucker": (4, 8), "svd": 4, "tt": 4, "filtercp": 2}  # filtercp: per filter
TT_D = 3  # TTConv2d's default number of channel modes


def rank_of(method: str) -> Any:
    """The test rank of ``method``; a KeyError that says what to add for an unknown one."""
    if method not in RANKS:
        raise KeyError(f"no test rank for method {method!r}: add one to RANKS in "
                       f"tests/layers/_layer_helpers.py (known: {sorted(RANKS)})")
    return RANKS[method]


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
    """Random per-group factors of ``method`` at ``rank`` and the exact kernel they build.
    KeyError for a method this helper does not know (add its branch here)."""
    g = torch.Generator().manual_seed(2)
    if method == "tt":
        return _tt_factors(conv, rank, g)
    if method == "filtercp":
        return _filtercp_factors(conv, rank, g)
    if method not in ("cp", "tucker", "svd"):
        raise KeyError(f"known_factors: no known-rank factors for method {method!r}: add a branch "
                       f"to tests/layers/_layer_helpers.py (known: cp, tucker, svd, tt, filtercp)")
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


def _tt_factors(conv: nn.Module, rank: int, g: torch.Generator) -> tuple[list[TTTensor], torch.Tensor]:
    """Random TTConv2d factors: per group a TT of the kernel in chain order (kh kw, m_d n_d, ...,
    m_1 n_1) (default balanced modes), every bond at ``rank`` clipped to its exact rank, and
    the kernel (T, S/G, kh, kw) they build, assembled here from the TT formula of the
    ttconv module doc (W_g[(t_1..t_d), (s_1..s_d), x, y] = K[x, y] C_d[t_d, s_d] ... C_1[t_1, s_1])."""
    groups, k = conv.groups, tuple(conv.kernel_size)
    tg, sg = conv.out_channels // groups, conv.in_channels // groups
    outs, ins, d = factorize(tg, TT_D), factorize(sg, TT_D), TT_D
    sizes = [prod(k)] + [m * n for m, n in zip(outs, ins)][::-1]
    bonds = [1] + [min(rank, prod(sizes[:j]), prod(sizes[j:])) for j in range(1, d + 1)] + [1]
    # chain axis of out mode k: 1 + 2 (d-1-k), of in mode k: 2 + 2 (d-1-k); spatial: 0
    perm = [1 + 2 * (d - 1 - k) for k in range(d)] + [2 + 2 * (d - 1 - k) for k in range(d)] + [0]
    parts, kernels = [], []
    for _ in range(groups):
        cores = tuple(_rand(bonds[j], n, bonds[j + 1], g=g) / (n * bonds[j]) ** 0.5
                      for j, n in enumerate(sizes))
        tt = TTTensor(cores)
        full = tt.to_tensor().reshape(prod(k), *[s for kk in reversed(range(d)) for s in (outs[kk], ins[kk])])
        parts.append(tt)
        kernels.append(full.permute(perm).reshape(tg, sg, *k))
    return parts, torch.cat(kernels)


def _filtercp_factors(conv: nn.Module, rank: int, g: torch.Generator) -> tuple[Any, torch.Tensor]:
    """Random filter-wise CP factors (one rank-``rank`` CP per output filter, the layout of
    ``tensor.FilterCP``: weights (T, R), factors (T, S/g, R), (T, kh, R), (T, kw, R)) and the
    kernel they build, W[o, i, y, x] = sum_r w[o, r] a[o, i, r] b[o, y, r] c[o, x, r], written
    out here as an explicit sum of outer products. A filter only sees its group's S/g input
    channels, so groups need nothing more."""
    t, sg, (kh, kw) = conv.out_channels, conv.in_channels // conv.groups, tuple(conv.kernel_size)
    w = _rand(t, rank, g=g).abs() + 0.5
    a, b, c = _rand(t, sg, rank, g=g), _rand(t, kh, rank, g=g), _rand(t, kw, rank, g=g)
    kernel = torch.zeros(t, sg, kh, kw, dtype=torch.float64)
    for r in range(rank):
        kernel += w[:, r, None, None, None] * a[:, :, None, None, r] * b[:, None, :, None, r] \
            * c[:, None, None, :, r]
    cp = FilterCP(w, (a, b, c), torch.zeros(t, dtype=torch.float64))
    return cp, kernel


def filter_cp_lower(w: torch.Tensor, rank: int) -> float:
    """A lower bound on the relative error of ANY filter-wise rank-``rank`` CP of the kernel ``w``
    (T, S/g, kh, kw): a rank-R CP of one filter has every mode unfolding of rank <= R, so its
    squared error is at least the largest Eckart-Young tail of that filter's three unfoldings,
    and the kernel's squared error is the sum of its filters' (also for a coupled CP)."""
    w = w.detach().double()
    tails = []
    for m in range(1, 4):
        unf = w.movedim(m, 1).reshape(w.shape[0], w.shape[m], -1)
        tails.append((torch.linalg.svdvals(unf)[:, rank:] ** 2).sum(1))
    return float(torch.stack(tails).amax(0).sum() / (w ** 2).sum()) ** 0.5


def known_tt(in_modes: tuple[int, ...], out_modes: tuple[int, ...], ranks: tuple[int, ...],
             seed: int = 3) -> TTMatrix:
    g = torch.Generator().manual_seed(seed)
    r = (1, *ranks, 1)
    cores = tuple(_rand(r[i], m, n, r[i + 1], g=g) / (m * n * r[i]) ** 0.5
                  for i, (m, n) in enumerate(zip(out_modes, in_modes)))
    return TTMatrix(cores, tuple(in_modes), tuple(out_modes))


def hook_macs(layer: nn.Module, x: torch.Tensor) -> int:
    """MACs per sample of the nn.Conv*/nn.Linear modules run by ``layer(x)`` (forward hooks),
    plus those of the ops a layer runs itself, computed here from shapes: a CP layer's fused
    depthwise conv (R * kh * kw per output pixel), a FilterCPConv2d's fused one (R * T * kh * kw
    per output pixel) and a TTConv2d's conv + core matmuls (:func:`_tt_conv_macs`)."""
    total = 0
    batch = x.shape[0]

    def hook(m: nn.Module, inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        per_sample = out.numel() // batch
        if getattr(m, "fused", False):  # CPConv2d: depthwise R channels, kh x kw, output H' x W'
            total += m.rank * prod(m.geometry.kernel) * (per_sample // m.out_channels)
        if getattr(m, "fused_depthwise", False):
            # FilterCPConv2d runs one depthwise kh x kw conv on its R*T channels (the outer
            # product of depth_h and depth_w) itself: R*T*H'*W' outputs of kh*kw MACs each
            total += m.rank * prod(m.geometry.kernel) * per_sample
        if isinstance(m, TTConv2d):
            total += _tt_conv_macs(m, per_sample // m.out_channels)
        if isinstance(m, nn.modules.conv._ConvNd):
            total += per_sample * (m.in_channels // m.groups) * prod(m.kernel_size)
        elif isinstance(m, nn.Linear):
            total += per_sample * m.in_features

    handles = [m.register_forward_hook(hook) for m in layer.modules()
               if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, TTConv2d))
               or getattr(m, "fused", False) or getattr(m, "fused_depthwise", False)]
    try:
        with torch.no_grad():
            layer(x)
    finally:
        for h in handles:
            h.remove()
    return total


def _tt_conv_macs(m: TTConv2d, pixels: int) -> int:
    """MACs per sample of a TTConv2d's forward from its parameter shapes, at ``pixels`` = H' W'
    output positions. Core k (G, r_out, m_k, n_k, r_in) maps (n_k r_in) -> (r_out m_k) at each
    of G n_1..n_{k-1} m_{k+1}..m_d P positions; the spatial core K (G r_0, 1, kh, kw) is a
    depthwise conv with r_0 filters per input channel (S r_0 kh kw per pixel), unless the layer
    runs K and the last core as one conv (``merged``), which has n_d kh kw inputs per output
    (the merged kernel is built once per call, not per sample)."""
    g, k2 = m.groups, prod(m.spatial.shape[2:])
    shapes = [tuple(c.shape[1:]) for c in m.cores]  # (r_out, m_k, n_k, r_in)
    ns, ms = [s[2] for s in shapes], [s[1] for s in shapes]
    total = 0 if m.merged else m.in_channels * (m.spatial.shape[0] // g) * k2 * pixels
    for k, (r_out, mk, nk, r_in) in enumerate(shapes):
        inputs = nk * k2 if m.merged and k == len(shapes) - 1 else nk * r_in
        total += g * prod(ns[:k]) * prod(ms[k + 1:]) * pixels * r_out * mk * inputs
    return total


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- the Embedding branch of the registry-driven tests -----------------------------------------
# An nn.Embedding takes integer token indices, not floats; the generic tests build it and its
# inputs here. EMB_V / EMB_D: vocabulary and width of the test tables (rank bound min(V, D)).
EMB_V, EMB_D = 40, 20
# generic properties that do not apply to an embedding, each with the reason the tests assert
NOT_FOR_EMBEDDING = {
    "bias": "nn.Embedding has no bias",
}


def is_embedding(dense: type) -> bool:
    return issubclass(dense, nn.Embedding)


def dense_embedding(v: int = EMB_V, d: int = EMB_D, dtype: torch.dtype = torch.float32) -> nn.Embedding:
    torch.manual_seed(0)
    return nn.Embedding(v, d).to(dtype)


def token_input(v: int = EMB_V, shape: tuple[int, ...] = (3, 7), seed: int = 1) -> torch.Tensor:
    """int64 token indices in [0, v), every row of a 3 x 7 batch drawn at random."""
    return torch.randint(0, v, shape, generator=torch.Generator().manual_seed(seed))


def factory_name(dense: type) -> str:
    """The dense-type factory of a registered class: from_linear, from_conv or from_dense."""
    if is_embedding(dense):
        return "from_dense"
    return "from_linear" if issubclass(dense, nn.Linear) else "from_conv"
