"""The arithmetic of :class:`~tensorslim.layers.TTConv2d` (see :mod:`.ttconv`): exact TT-ranks,
bond sizes, the merged-first-step rule, the (params, MACs) cost, and the kernel <-> cores maps
(the TT-SVD layout of a kernel, loading cores into a layer, the dense kernel of a layer)."""
from math import prod
from typing import Sequence

import torch
from torch import Tensor, nn

from ._conv import ConvGeometry, conv_out_size
from ._tt_common import chain_caps


def conv_tt_caps(kernel: Sequence[int], in_modes: Sequence[int], out_modes: Sequence[int]) -> list[int]:
    """Exact TT-ranks (r_0..r_{d-1}) of a generic kernel with these modes: bond j joins the
    spatial mode and the last j channel pairs to the rest."""
    pairs = [m * n for m, n in zip(out_modes, in_modes)]
    return chain_caps([prod(kernel)] + pairs[::-1])


def _bonds(ranks: Sequence[int], k: int, d: int) -> tuple[int, int]:
    """(r_in, r_out) of the core of channel mode k (0-based): r_in towards the spatial core."""
    return ranks[d - 1 - k], (ranks[d - k] if k > 0 else 1)


def merges_first_core(geo: ConvGeometry, in_modes: Sequence[int], out_modes: Sequence[int],
                      ranks: Sequence[int]) -> bool:
    """Whether the spatial core and the first channel core run as ONE small conv (kernel
    (m_d r_1, n_d, kh, kw) on n_d-channel slices of the input): when that needs fewer MACs than
    the depthwise conv (S r_0 kh kw per pixel) plus the first matmul."""
    d, k2 = len(in_modes), prod(geo.kernel)
    a = geo.groups * prod(in_modes[:d - 1])
    r_out = _bonds(ranks, d - 1, d)[1]
    merged = a * out_modes[-1] * r_out * in_modes[-1] * k2
    split = geo.in_channels * ranks[0] * k2 + a * in_modes[-1] * ranks[0] * out_modes[-1] * r_out
    return merged < split


def tt_conv_cost(geo: ConvGeometry, in_modes: Sequence[int], out_modes: Sequence[int],
                 ranks: Sequence[int], positions: int) -> tuple[int, int]:
    """(params, MACs per sample) of a TTConv2d at ``ranks`` with ``positions`` = H' W' output
    pixels (a folded ``out_scale`` adds T params, see ``num_params``)."""
    g, n, m, d = geo.groups, list(in_modes), list(out_modes), len(in_modes)
    k2 = prod(geo.kernel)
    merged = merges_first_core(geo, in_modes, out_modes, ranks)
    params = g * ranks[0] * k2
    macs = 0 if merged else geo.in_channels * ranks[0] * k2 * positions
    for k in range(d):
        r_in, r_out = _bonds(ranks, k, d)
        params += g * r_out * m[k] * n[k] * r_in
        per_pixel = r_out * m[k] * n[k] * (k2 if merged and k == d - 1 else r_in)
        macs += g * prod(n[:k]) * prod(m[k + 1:]) * positions * per_pixel
    return params + (geo.out_channels if geo.bias else 0), macs


def _positions(geo: ConvGeometry, spatial: Sequence[int]) -> int:
    return prod(conv_out_size(n, k, s, dl, p)
                for n, k, s, dl, p in zip(spatial, geo.kernel, geo.stride, geo.dilation, geo.pads))


def kernel_tt_tensors(w: Tensor, groups: int, in_modes: Sequence[int], out_modes: Sequence[int]) -> list[Tensor]:
    """Each group's kernel (T_g, S_g, kh, kw) of ``w`` (T, S/G, kh, kw) as the tensor the TT
    of :class:`TTConv2d` factorises, in chain order: (kh kw, m_d n_d, ..., m_1 n_1)."""
    d, k2 = len(in_modes), prod(w.shape[2:])
    perm = [2 * d] + [i for k in reversed(range(d)) for i in (k, d + k)]
    sizes = [k2] + [m * n for m, n in zip(out_modes, in_modes)][::-1]
    return [wg.reshape(*out_modes, *in_modes, k2).permute(perm).reshape(sizes)
            for wg in w.chunk(groups, dim=0)]


def _load_cores(layer: nn.Module, per_group: Sequence[Sequence[Tensor]]) -> None:
    """Copy per-group TT cores in chain order ((1, kh kw, r_0), (r_0, m_d n_d, r_1), ...,
    (r_{d-1}, m_1 n_1, 1)) into ``layer``, zero-padded to its ranks."""
    kh, kw = layer.geometry.kernel
    d = len(layer.cores)
    with torch.no_grad():
        layer.spatial.zero_()
        for p in layer.cores:
            p.zero_()
        spatial = layer.spatial.view(layer.groups, layer.rank[0], kh, kw)
        for g, cores in enumerate(per_group):
            c0 = cores[0][0]  # (kh kw, r_0')
            spatial[g, :c0.shape[1]] = c0.t().reshape(-1, kh, kw).to(spatial.dtype)
            for j, c in enumerate(cores[1:]):
                k = d - 1 - j
                p, m, n = layer.cores[k], layer.out_modes[k], layer.in_modes[k]
                c = c.reshape(c.shape[0], m, n, c.shape[2]).permute(3, 1, 2, 0)  # (r_out, m, n, r_in)
                p[g, :c.shape[0], :, :, :c.shape[3]] = c.to(p.dtype)


def tt_conv_kernel(layer: nn.Module) -> Tensor:
    """Reference only (tests, ``approx_error``): the dense kernel (T, S/G, kh, kw) of ``layer``."""
    g, d = layer.groups, len(layer.cores)
    kh, kw = layer.geometry.kernel
    blocks = []
    for gi in range(g):
        out = layer.spatial.detach().view(g, -1, kh * kw)[gi].t()  # (kh kw, r_0)
        for k in reversed(range(d)):  # chain order; each core as (r_in, m, n, r_out)
            core = layer.cores[k].detach()[gi].permute(3, 1, 2, 0)
            out = torch.tensordot(out, core, dims=([out.dim() - 1], [0]))
        out = out.reshape([kh * kw] + [s for k in reversed(range(d))
                                       for s in (layer.out_modes[k], layer.in_modes[k])])
        perm = ([1 + 2 * (d - 1 - k) for k in range(d)] + [2 + 2 * (d - 1 - k) for k in range(d)] + [0])
        blocks.append(out.permute(perm).reshape(layer.out_channels // g, layer.in_channels // g, kh, kw))
    return torch.cat(blocks)
