"""Tensor-Train convolution (Garipov et al. 2016, "Ultimate tensorization").

Per group g (G groups; S_g = S/G = prod(in_modes), T_g = T/G = prod(out_modes), d modes) the
kernel W_g (T_g, S_g, kh, kw) is a TT chain that starts at a spatial core:

    W_g[(t_1..t_d), (s_1..s_d), x, y] = K[x, y, :] @ C_d[t_d, s_d] @ C_{d-1}[t_{d-1}, s_{d-1}] @ ... @ C_1[t_1, s_1]

with K (kh kw, r_0) shared by the group's input channels and C_k[t, s] a (r_in, r_out) matrix;
``rank`` = (r_0, ..., r_{d-1}) are the bonds in chain order (spatial-C_d, C_d-C_{d-1}, ...).
The chain runs from the last (innermost) channel mode, so every step of the forward contracts
two adjacent axes and no activation is ever permuted:

    1. one depthwise conv (S groups, r_0 filters per input channel: K; the dense conv's stride,
       padding, dilation): (B, S, H, W) -> (B, G, n_1..n_d, r_0, P), P = H' W'; or, when it
       needs fewer MACs (:func:`merges_first_core`), K and C_d as ONE conv on the input's
       n_d-channel slices, which also does step 2 for k = d;
    2. for k = d..1 one matmul of ``cores[k]`` viewed (m_k r_out, n_k r_in) with the state
       viewed (B G n_1..n_{k-1}, n_k r_in, m_{k+1}..m_d P) -> (.., r_out m_k, m_{k+1}..m_d P);
    3. the state is (B, T, P) in NCHW order: bias (and a folded BatchNorm's ``out_scale``).

Parameters: ``spatial`` (G r_0, 1, kh, kw), ``cores[k]`` (G, r_out, m_k, n_k, r_in) (stored in
the matmul's layout). MACs per sample: :func:`tt_conv_cost` (the arithmetic lives in
:mod:`._ttconv_math`). In eager inference the kernels the first step derives from the cores
are cached (never stale, never in ``state_dict`` or exported graphs) and small inputs take a
forward with the fewest ops, and large batches run in slices (``chunk_bytes``): :mod:`._ttconv_fast`
(``eager_cache = False`` turns all three off).
"""
from dataclasses import replace
from math import prod
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tensor import rel_error, tt_svd
from ._conv import ConvGeometry, assign_, pad_by_slices
from ._ttconv_fast import CACHE, INDEX, batch_chunk, derived, drop_cache, small_forward
from ._ttconv_math import (_bonds, _load_cores, _positions, conv_tt_caps, kernel_tt_tensors,
                           merges_first_core, tt_conv_cost, tt_conv_kernel)
from ._tt_common import check_modes, clip_ranks, init_variance, nearest_ranks, tt_init_
from .base import FactorizedLayer, Rank, check_affine, check_module_finite, dense_bias_

_Int2 = Union[int, Sequence[int]]

IM2COL_PIXELS = 64  # batch x H' W' up to which the merged step is im2col + bmm (small_forward, _merged_conv)


class TTConv2d(FactorizedLayer):
    """TT replacement of ``nn.Conv2d`` (see the module doc).

    ``TTConv2d(in_channels, out_channels, kernel_size, rank=8, stride=1, padding=0, dilation=1,
    groups=1, bias=True, padding_mode="zeros", *, in_modes=None, out_modes=None, d=3,
    init="glorot")``: modes factorise the per-group channels (default ``factorize(S/G, d)``,
    ``factorize(T/G, d)``); ``rank`` an int bound or d interior ranks (r_0..r_{d-1}), each
    clipped to the exact TT-rank of its bond; ``init`` "glorot" (t3f: Var W = 2/(fan_in +
    fan_out)) or "dense" (``nn.Conv2d``'s 1/(3 fan_in)). Parameters: ``spatial`` (G r_0, 1,
    kh, kw), ``cores[k]`` (G, r_{k-1}, m_k, n_k, r_k), ``bias`` (T,), ``out_scale`` (T,) once a
    BatchNorm was folded in. Shapes: (B, S, H, W) -> (B, T, H', W'). Depthwise convs are
    refused (no channel mode to factorise).
    """

    method = "tt"
    dense_types = (nn.Conv2d,)
    dims = 2  # spatial dims: fusion folds a following BatchNorm2d (fold_output_affine)
    __jit_ignored_attributes__ = ["method", "dense_types", "dims", "geometry"]

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _Int2, rank: Rank = 8,
                 stride: _Int2 = 1, padding: Union[str, _Int2] = 0, dilation: _Int2 = 1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *,
                 in_modes: Optional[Sequence[int]] = None, out_modes: Optional[Sequence[int]] = None,
                 d: int = 3, init: str = "glorot") -> None:
        super().__init__()
        name = type(self).__name__
        geo = ConvGeometry.make(name, 2, in_channels, out_channels, kernel_size, stride, padding,
                                dilation, groups, bias, padding_mode)
        d = len(in_modes) if in_modes is not None else len(out_modes) if out_modes is not None else d
        self.in_modes = check_modes(name, geo.in_group, in_modes, d, "in_modes")
        self.out_modes = check_modes(name, geo.out_group, out_modes, d, "out_modes")
        if len(self.in_modes) != len(self.out_modes):
            raise ValueError(f"{name}: in_modes={self.in_modes} and out_modes={self.out_modes} "
                             f"must have the same length")
        init_variance(name, init, 1, 1)  # validates init
        self.geometry, self.init = geo, init
        self.rank = clip_ranks(name, rank, conv_tt_caps(geo.kernel, self.in_modes, self.out_modes))
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.stride, self.dilation = list(geo.stride), list(geo.dilation)
        self.explicit_pad, self.pad, self.pad_mode = geo.explicit_pad, geo.fpad, geo.fpad_mode
        self.conv_padding = list(geo.conv_padding)
        dd = len(self.in_modes)
        self.spatial = nn.Parameter(torch.empty(groups * self.rank[0], 1, *geo.kernel))
        self.cores = nn.ParameterList(
            [nn.Parameter(torch.empty(groups, _bonds(self.rank, k, dd)[1], m, n, _bonds(self.rank, k, dd)[0]))
             for k, (m, n) in enumerate(zip(self.out_modes, self.in_modes))])
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.register_parameter("out_scale", None)  # see fold_output_affine
        # per-step shapes of the contraction (see the module doc), fixed here: step j handles
        # channel mode k = d-1-j: state (B G A_j, n_k r_in, C_j / P), A_j = n_1..n_{k-1}
        n, m = self.in_modes, self.out_modes
        self.order = [dd - 1 - j for j in range(dd)]
        self.rows = [prod(n[:k]) for k in self.order]
        self.cols = [prod(m[k + 1:]) for k in self.order]
        self.k_in = [n[k] * _bonds(self.rank, k, dd)[0] for k in self.order]
        self.k_out = [m[k] * _bonds(self.rank, k, dd)[1] for k in self.order]
        self.merged = merges_first_core(geo, self.in_modes, self.out_modes, self.rank)
        self.im2col_pixels = IM2COL_PIXELS
        # eager inference: batch slices of about this many state bytes (None: auto, 0: off)
        self.chunk_bytes = None
        self.eager_cache = True  # False: no inference cache, no small-input path (_ttconv_fast)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Gaussian cores (:func:`tt_init_`) with the weight variance of ``init``; the bias as
        ``nn.Conv2d``'s."""
        geo = self.geometry
        k2 = prod(geo.kernel)
        var = init_variance(type(self).__name__, self.init, geo.in_group * k2, geo.out_channels * k2)
        tt_init_([self.spatial, *self.cores], self.rank, var)
        dense_bias_(self.bias, geo.in_group * k2)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """(B, S, H, W) -> (B, T, H', W'), NCHW-contiguous."""
        if not torch.jit.is_scripting() and self.eager_cache:
            if self.merged and self.groups == 1:
                y = self._small_eager(x)
                if y is not None:
                    return y
            chunk = self._batch_chunk(x)
            if 0 < chunk < x.shape[0]:
                return torch.cat([self._contract(xc) for xc in x.split(chunk)])
        return self._contract(x)

    @torch.jit.unused
    def _batch_chunk(self, x: Tensor) -> int:
        """:func:`._ttconv_fast.batch_chunk` (0: the whole batch at once)."""
        return batch_chunk(self, x)

    def _contract(self, x: Tensor) -> Tensor:
        """The generic forward: the first step as a conv (or im2col + bmm), then one bmm per
        channel core."""
        bsz, g = x.shape[0], self.groups
        if self.explicit_pad:
            if torch.jit.is_tracing() and self.pad_mode != "circular":
                x = pad_by_slices(x, self.pad, self.pad_mode)
            else:
                x = F.pad(x, self.pad, self.pad_mode)
        if self.merged:  # spatial core + first channel core as one conv (merges_first_core)
            z, start = self._merged_conv(x), 1
        else:  # depthwise: r_0 filters per input channel
            ws = self._kernel(False)
            z, start = F.conv2d(x, ws, None, self.stride, self.conv_padding, self.dilation, self.in_channels), 0
        ho, wo = z.shape[2], z.shape[3]
        p = ho * wo
        cores = self._core_list()
        for j in range(start, len(self.order)):
            core = cores[self.order[j]]
            # one bmm over (B, G, A_j) batches; the weight broadcast over B and A_j (a stride-0
            # view for G = 1; torch.matmul would transpose the big state instead)
            zz = z.reshape(bsz, g, -1, self.k_in[j], self.cols[j] * p)
            w = core.view(1, g, 1, self.k_out[j], self.k_in[j]).expand(bsz, g, zz.shape[2], -1, -1)
            z = torch.bmm(w.reshape(-1, self.k_out[j], self.k_in[j]), zz.reshape(-1, self.k_in[j], self.cols[j] * p))
        return self._affine(z.reshape(bsz, self.out_channels, p)).reshape(bsz, self.out_channels, ho, wo)

    def _core_list(self) -> list[Tensor]:
        if torch.jit.is_scripting():
            return [c for c in self.cores]
        return self._core_list_eager()

    @torch.jit.unused
    def _core_list_eager(self) -> list[Tensor]:
        return list(self.cores._parameters.values())  # without ParameterList's slow indexing

    def _affine(self, z: Tensor) -> Tensor:
        """(B, T, P) + bias (times ``out_scale`` first, in the same pass, once folded)."""
        bias, scale = self.bias, self.out_scale
        if bias is not None:
            if scale is not None:
                return torch.addcmul(bias.view(1, -1, 1), z, scale.view(1, -1, 1))
            return z + bias.view(1, -1, 1)
        return z

    @torch.jit.unused
    def _small_eager(self, x: Tensor) -> Optional[Tensor]:
        """:func:`._ttconv_fast.small_forward` (None: not a small input)."""
        return small_forward(self, x)

    def _build_kernel(self, merged: bool) -> Tensor:
        """Batch-independent weights of the first step, from the cores (not in the per-sample
        MACs): merged -> the kernel (G, r_1 m_d, n_d, kh, kw) = sum over r_0 of the last
        channel core x K; else the depthwise filters (S r_0, 1, kh, kw), K per input channel."""
        g, r0 = self.groups, self.rank[0]
        kh, kw = self.spatial.shape[2], self.spatial.shape[3]
        if merged:
            core = self._core_list()[-1]
            n_d = core.shape[3]
            return (core.reshape(g, self.k_out[0], n_d, r0, 1, 1) * self.spatial.view(g, 1, 1, r0, kh, kw)).sum(3)
        sg = self.in_channels // g
        return self.spatial.view(g, 1, r0, kh, kw).expand(g, sg, r0, kh, kw).reshape(-1, 1, kh, kw)

    def _kernel(self, merged: bool) -> Tensor:
        if torch.jit.is_scripting() or not self.eager_cache:
            return self._build_kernel(merged)
        return self._cached_kernel(merged)

    @torch.jit.unused
    def _cached_kernel(self, merged: bool) -> Tensor:
        """:meth:`_build_kernel`, from the inference cache when no autograd graph is needed
        (see :mod:`._ttconv_fast`)."""
        spatial = self._parameters["spatial"]
        sources = [spatial, self._core_list_eager()[-1]] if merged else [spatial]
        return derived(self, "merged" if merged else "depthwise", sources, lambda: self._build_kernel(merged))

    def _merged_conv(self, x: Tensor) -> Tensor:
        """Spatial core and the core of the last channel mode as one conv on the input seen as
        (B G A, n_d, H, W) slices, kernel :meth:`_build_kernel` -> (B, G A r_1 m_d, H', W').
        A small conv (8 <= H' W', batch x H' W' <= ``im2col_pixels``) runs as im2col + one bmm
        over the slices: the same MACs without the conv primitive's fixed cost (under 8 pixels
        the bmm's rows are too short to pay; eager mode with one group takes
        :func:`._ttconv_fast.small_forward` instead). Traced graphs (ONNX) keep the conv."""
        g, kh, kw = self.groups, self.spatial.shape[2], self.spatial.shape[3]
        n_d, out = self.in_modes[-1], self.k_out[0]
        ker = self._kernel(True)
        b, h, w = x.shape[0], x.shape[2], x.shape[3]
        ho = (h + 2 * self.conv_padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        wo = (w + 2 * self.conv_padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        if 8 <= ho * wo and b * ho * wo <= self.im2col_pixels and not torch.jit.is_tracing():
            cols = F.unfold(x, [kh, kw], self.dilation, self.conv_padding, self.stride)  # (B, S kh kw, P)
            nk = n_d * kh * kw
            cols = cols.view(-1, nk, ho * wo)  # (B G A, n_d kh kw, P): a slice's channels are adjacent
            wt = ker.view(1, g, 1, out, nk).expand(b, g, cols.shape[0] // (b * g), out, nk)
            return torch.bmm(wt.reshape(-1, out, nk), cols).view(b, -1, ho, wo)
        if g == 1:  # the slices as a batch
            y = F.conv2d(x.reshape(-1, n_d, h, w), ker.view(out, n_d, kh, kw), None, self.stride,
                         self.conv_padding, self.dilation)
            return y.view(b, -1, y.shape[2], y.shape[3])
        a = self.rows[0]  # the slices as conv groups, each group's kernel repeated A times
        ker = ker.unsqueeze(1).expand(g, a, out, n_d, kh, kw).reshape(g * a * out, n_d, kh, kw)
        return F.conv2d(x, ker, None, self.stride, self.conv_padding, self.dilation, g * a)

    def __getstate__(self) -> dict[str, Any]:
        """Pickles and deep copies leave the inference caches out."""
        state = self.__dict__.copy()
        state.pop(CACHE, None)
        state.pop(INDEX, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("im2col_pixels", IM2COL_PIXELS)  # pickled by older versions
        self.__dict__.setdefault("eager_cache", True)
        self.__dict__.setdefault("chunk_bytes", None)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "TTConv2d":
        drop_cache(self, plans=True)  # .to() / .double() / ...: free the entries (they would miss anyway)
        return super()._apply(fn, *args, **kwargs)

    def fold_output_affine(self, scale: Tensor, shift: Tensor) -> None:
        """``y -> scale * y + shift`` per output channel (``scale``, ``shift``: (T,)): the bias
        becomes ``scale * bias + shift`` (created if absent); the scale becomes the
        ``out_scale`` parameter applied inside the bias add (``torch.addcmul``, the same pass),
        since a per-channel scale is no Kronecker product of per-mode vectors in general."""
        check_affine(type(self).__name__, self.out_channels, scale, shift)
        s, t, ref = scale.detach().double(), shift.detach().double(), self.spatial

        def as_param(v: Tensor) -> nn.Parameter:
            return nn.Parameter(v.to(dtype=ref.dtype, device=ref.device), requires_grad=ref.requires_grad)

        old = self.out_scale
        self.out_scale = as_param(s if old is None else old.detach().double() * s)
        bias = self.bias
        self.bias = as_param(t if bias is None else bias.detach().double() * s + t)
        self.geometry = replace(self.geometry, bias=True)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def macs(self, in_shape: Sequence[int]) -> int:
        """MACs of ``forward`` on an input of shape ``in_shape`` ((B,) S, H, W): the batch
        multiplies. Equals FlopCounterMode's flops / 2 (bias adds are not MACs)."""
        shape = [int(s) for s in in_shape]
        batch = shape[0] if len(shape) == 4 else 1
        spatial = self.geometry.check_in_shape(type(self).__name__, shape[-3:])
        return batch * tt_conv_cost(self.geometry, self.in_modes, self.out_modes, self.rank,
                                    _positions(self.geometry, spatial))[1]

    # -- the factory protocol -----------------------------------------------------------------
    @classmethod
    def _geo(cls, module: nn.Module) -> ConvGeometry:
        return ConvGeometry.of(cls.__name__, module, 2)

    @classmethod
    def _shape(cls, module: nn.Module, in_modes: Optional[Sequence[int]],
               out_modes: Optional[Sequence[int]], d: int) -> tuple[ConvGeometry, tuple, tuple, list[int]]:
        """(geometry, in_modes, out_modes, exact TT-ranks) of ``module`` with these options."""
        geo = cls._geo(module)
        d = len(in_modes) if in_modes is not None else len(out_modes) if out_modes is not None else d
        ins = check_modes(cls.__name__, geo.in_group, in_modes, d, "in_modes")
        outs = check_modes(cls.__name__, geo.out_group, out_modes, d, "out_modes")
        if len(ins) != len(outs):
            raise ValueError(f"{cls.__name__}: in_modes={ins} and out_modes={outs} must have the same length")
        return geo, ins, outs, conv_tt_caps(geo.kernel, ins, outs)

    @classmethod
    def check(cls, module: nn.Module) -> None:
        cls._geo(module)

    @classmethod
    def valid_rank(cls, module: nn.Module, rank: Any, *, in_modes: Optional[Sequence[int]] = None,
                   out_modes: Optional[Sequence[int]] = None, d: int = 3) -> Rank:
        """The valid rank nearest to ``rank``: a number -> an int in [1, largest exact bond
        rank]; d numbers -> each rounded and clipped to its bond's exact rank."""
        return nearest_ranks(cls.__name__, rank, cls._shape(module, in_modes, out_modes, d)[3])

    @classmethod
    def rank_space(cls, module: nn.Module, *, in_modes: Optional[Sequence[int]] = None,
                   out_modes: Optional[Sequence[int]] = None, d: int = 3) -> list[int]:
        """The int ranks worth pricing, smallest first: 1 up to the first whose parameters
        reach the dense conv's (or the largest exact bond rank)."""
        geo, ins, outs, caps = cls._shape(module, in_modes, out_modes, d)
        dense = sum(p.numel() for p in module.parameters(recurse=False))
        out = []
        for r in range(1, max(caps, default=1) + 1):
            out.append(r)
            if tt_conv_cost(geo, ins, outs, clip_ranks(cls.__name__, r, caps), 1)[0] >= dense:
                break
        return out

    @classmethod
    def cost(cls, module: nn.Module, rank: Rank, in_shape: Sequence[int], out_shape: Sequence[int],
             *, in_modes: Optional[Sequence[int]] = None, out_modes: Optional[Sequence[int]] = None,
             d: int = 3) -> tuple[int, int]:
        """(params, MACs per sample) of the layer ``like`` builds; ``in_shape`` (S, H, W)."""
        geo, ins, outs, caps = cls._shape(module, in_modes, out_modes, d)
        spatial = geo.check_in_shape(cls.__name__, in_shape)
        return tt_conv_cost(geo, ins, outs, clip_ranks(cls.__name__, rank, caps), _positions(geo, spatial))

    @classmethod
    def like(cls, module: nn.Module, rank: Rank, *, in_modes: Optional[Sequence[int]] = None,
             out_modes: Optional[Sequence[int]] = None, d: int = 3, init: str = "glorot") -> "TTConv2d":
        """Random init (``init``) with ``module``'s geometry, dtype and device."""
        geo, ins, outs, _ = cls._shape(module, in_modes, out_modes, d)
        layer = cls(**geo.conv_kwargs(), rank=rank, in_modes=ins, out_modes=outs, init=init)
        return layer.to(device=module.weight.device, dtype=module.weight.dtype)

    @classmethod
    def from_conv(cls, conv: nn.Module, rank: Optional[Rank] = None, *,
                  in_modes: Optional[Sequence[int]] = None, out_modes: Optional[Sequence[int]] = None,
                  d: int = 3, ranks: Optional[Rank] = None) -> "TTConv2d":
        """TT-SVD (float64) of each group's kernel reshaped to (kh kw, m_1 n_1, ..., m_d n_d)
        at ``rank`` (alias ``ranks``: an int bound or d interior ranks, clipped to the exact
        TT-ranks; exact at full rank). Cores are zero-padded to the layer's ranks where TT-SVD
        found smaller ones. Sets ``approx_error`` = ||W - W^|| / ||W||."""
        if (rank is None) == (ranks is None):
            raise TypeError(f"{cls.__name__}.from_conv: give the TT-rank once, as rank= or ranks= "
                            f"(got rank={rank!r}, ranks={ranks!r})")
        layer = cls.like(conv, rank if ranks is None else ranks, in_modes=in_modes, out_modes=out_modes, d=d)
        check_module_finite(cls.__name__, conv)
        w = conv.weight.detach().to(torch.float64)
        cores = [tt_svd(t, list(layer.rank)).cores
                 for t in kernel_tt_tensors(w, layer.groups, layer.in_modes, layer.out_modes)]
        _load_cores(layer, cores)
        if conv.bias is not None:
            assign_(layer.bias, conv.bias)
        layer.approx_error = rel_error(w, tt_conv_kernel(layer).to(torch.float64))
        return layer

    @classmethod
    def from_factors(cls, conv: nn.Module, parts: Sequence[Any], *, in_modes: Optional[Sequence[int]] = None,
                     out_modes: Optional[Sequence[int]] = None) -> "TTConv2d":
        """Build from one ``TTTensor`` per group of ``conv``'s kernel in the layout of
        :func:`kernel_tt_tensors` (cores (1, kh kw, r_0), (r_{k-1}, m_k n_k, r_k), ...)."""
        geo = cls._geo(conv)
        if len(parts) != geo.groups:
            raise ValueError(f"{cls.__name__}.from_factors: {len(parts)} TTs for groups={geo.groups}")
        ranks = tuple(max(int(p.cores[k].shape[2]) for p in parts) for k in range(len(parts[0].cores) - 1))
        layer = cls.like(conv, ranks, in_modes=in_modes, out_modes=out_modes, d=len(ranks))
        if layer.rank != ranks:
            raise ValueError(f"{cls.__name__}.from_factors: TT-ranks {ranks} exceed the exact ranks "
                             f"{layer.rank} of modes in={layer.in_modes} out={layer.out_modes}")
        _load_cores(layer, [p.cores for p in parts])
        if conv.bias is not None:
            assign_(layer.bias, conv.bias)
        return layer

    @classmethod
    def from_dense(cls, module: nn.Module, rank: Rank, **opts: Any) -> "TTConv2d":
        return cls.from_conv(module, rank, **opts)

    def extra_repr(self) -> str:
        g = self.geometry
        s = (f"{g.in_channels}, {g.out_channels}, kernel_size={g.kernel}, in_modes={self.in_modes}, "
             f"out_modes={self.out_modes}, ranks={self.rank}, stride={g.stride}, pads={g.pads}, "
             f"dilation={g.dilation}")
        s += f", groups={g.groups}" if g.groups != 1 else ""
        s += f", padding_mode={g.padding_mode!r}" if g.padding_mode != "zeros" else ""
        return s + ("" if self.bias is not None else ", bias=False")


__all__ = ["TTConv2d", "conv_tt_caps", "kernel_tt_tensors", "merges_first_core", "tt_conv_cost", "tt_conv_kernel"]
