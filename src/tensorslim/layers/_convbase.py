"""``FactorizedConv``: what CP, Tucker-2 and low-rank convs share (geometry, like, cost)."""
from math import prod
from typing import Any, ClassVar, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._conv import ConvGeometry, Stage, is_channels_last, pad_by_slices, stages_cost
from .base import FactorizedLayer, Rank


CHUNK_BYTES = 32 << 20  # glibc's largest mmap threshold: bigger buffers page-fault on every call


class FactorizedConv(FactorizedLayer):
    """Base of the factorized ``nn.Conv1d`` / ``nn.Conv2d`` replacements.

    The constructor mirrors ``nn.Conv{dims}d`` plus ``rank``. Subclasses define ``_check_rank``
    (validate/normalise the rank), ``_valid_rank`` (the nearest valid rank), ``_stages`` (the
    convs they run, for ``cost``), ``_build`` (create the child modules), ``_chain`` (for the
    init) and ``_forward``.
    """

    dims: ClassVar[int] = 2
    # the batch-chunking threshold (bytes of the widest intermediate), see _forward_eager
    chunk_default: ClassVar[int] = CHUNK_BYTES
    __jit_ignored_attributes__ = ["method", "dense_types", "dims", "geometry", "chunk_default"]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Union[int, Sequence[int]],
        rank: Rank,
        stride: Union[int, Sequence[int]] = 1,
        padding: Union[str, int, Sequence[int]] = 0,
        dilation: Union[int, Sequence[int]] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        geo = ConvGeometry.make(type(self).__name__, self.dims, in_channels, out_channels,
                                kernel_size, stride, padding, dilation, groups, bias, padding_mode)
        self.geometry = geo
        self.rank = self._check_rank(geo, rank)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.groups = groups
        # Padding decisions, fixed here so forward has no data-dependent control flow.
        self.explicit_pad = geo.explicit_pad
        self.pad = geo.fpad
        self.pad_mode = geo.fpad_mode
        self.channels_last = self.dims == 2
        # widest intermediate (channels) and the eager batch-chunking threshold
        self.widest = max(st.out_channels for st in self._stages(geo, self.rank)[:-1])
        self.chunk_bytes = self.chunk_default
        self._build(geo)
        self.reset_parameters()

    # -- to implement -------------------------------------------------------------------------
    @classmethod
    def _check_rank(cls, geo: ConvGeometry, rank: Any) -> Rank:
        raise NotImplementedError

    @classmethod
    def _valid_rank(cls, geo: ConvGeometry, rank: Any) -> Rank:
        """The valid rank nearest to ``rank`` (see ``FactorizedLayer.valid_rank``)."""
        raise NotImplementedError

    @classmethod
    def _stages(cls, geo: ConvGeometry, rank: Rank) -> list[Stage]:
        raise NotImplementedError

    def _build(self, geo: ConvGeometry) -> None:
        raise NotImplementedError

    def _chain(self) -> tuple[list[Tensor], list[int], Any]:
        """(weights in order, their fan-ins, the bias) for ``reset_parameters``."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Random init whose output variance matches the dense conv's default init."""
        from .base import chain_uniform_, dense_bias_

        geo = self.geometry
        dense_fan_in = geo.in_group * prod(geo.kernel)
        weights, fan_ins, bias = self._chain()
        chain_uniform_(weights, fan_ins)
        dense_bias_(bias, dense_fan_in)

    def forward(self, x: Tensor) -> Tensor:
        """(B, S, *spatial) -> (B, T, *spatial_out), in the input's memory format."""
        if torch.jit.is_scripting():
            return self._forward(x)
        return self._forward_eager(x)

    def _forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.jit.unused
    def _forward_eager(self, x: Tensor) -> Tensor:
        """Eager mode: when the widest intermediate of the whole batch would exceed
        ``chunk_bytes`` (default ``chunk_default``: 32 MB, above which glibc serves every
        allocation by a fresh, page-faulting mmap; CP layers 8 MB), run the batch in chunks
        whose intermediates stay small and in cache. Same numbers; traced / exported /
        compiled graphs run the batch whole."""
        if (self.chunk_bytes <= 0 or torch.jit.is_tracing() or torch.compiler.is_compiling()
                or torch.compiler.is_exporting()):
            return self._forward(x)
        b = x.shape[0]
        per_sample = self.widest * (x.numel() // max(b * x.shape[1], 1)) * x.element_size()
        if b < 2 or b * per_sample <= self.chunk_bytes:
            return self._forward(x)
        chunk = max(1, (self.chunk_bytes // 2) // max(per_sample, 1))
        parts = x.split(chunk)
        if torch.is_grad_enabled() and (x.requires_grad
                                        or any(p.requires_grad for p in self.parameters())):
            return torch.cat([self._forward(c) for c in parts])
        # Inference: copy each chunk's output into the result while it is still in cache
        # (a torch.cat at the end re-reads every chunk from memory).
        first = self._forward(parts[0])
        fmt = torch.channels_last if is_channels_last(first) else torch.contiguous_format
        out = torch.empty((b, *first.shape[1:]), dtype=first.dtype, device=first.device,
                          memory_format=fmt)
        out[:first.shape[0]].copy_(first)
        start = first.shape[0]
        for c in parts[1:]:
            out[start:start + c.shape[0]].copy_(self._forward(c))
            start += c.shape[0]
        return out

    def _cl_out(self, x: Tensor) -> bool:
        """Whether to return channels-last output (2-D only): when the input is channels-last,
        and also when its layout is ambiguous (one channel or 1x1 spatial: both NCHW- and
        channels-last-contiguous) — the stages run fastest channels-last on CPU, and the layers
        after this one follow the layout they are given (as nn.Conv2d does)."""
        if not self.channels_last or x.dim() != 4:
            return False
        return is_channels_last(x) or (x.is_contiguous()
                                       and x.is_contiguous(memory_format=torch.channels_last))

    def _pad(self, y: Tensor, cl: bool = True) -> Tensor:
        """The dense conv's padding, when its spatial conv(s) cannot do it (see _conv.py);
        the result channels-last when ``cl`` (2-D layers)."""
        if self.explicit_pad:
            if torch.jit.is_tracing() and self.pad_mode != "circular":
                y = pad_by_slices(y, self.pad, self.pad_mode)
            else:
                y = F.pad(y, self.pad, self.pad_mode)
            if self.channels_last and cl:
                y = y.contiguous(memory_format=torch.channels_last)
        return y

    def fold_output_affine(self, scale: Tensor, shift: Tensor) -> None:
        """``y -> scale * y + shift`` per output channel, folded into the last 1x1 conv
        (``project_out``: its weight rows and bias, the bias created if absent); every
        subclass ends with that 1x1, so no op is added. ``scale``, ``shift``: (T,)."""
        from dataclasses import replace

        from .base import check_affine, fold_affine_

        check_affine(type(self).__name__, self.out_channels, scale, shift)
        fold_affine_(self.project_out, scale, shift)
        self.geometry = replace(self.geometry, bias=True)

    @classmethod
    def check(cls, module: nn.Module) -> None:
        cls._geometry(module)

    @classmethod
    def _geometry(cls, module: nn.Module) -> ConvGeometry:
        return ConvGeometry.of(cls.__name__, module, cls.dims)

    @classmethod
    def valid_rank(cls, module: nn.Module, rank: Any, **opts: Any) -> Rank:
        """The valid rank for ``module`` nearest to ``rank``: each rank rounded to the nearest
        multiple of ``groups`` and clipped to the layer's bounds (see ``_check_rank``)."""
        if opts:
            raise TypeError(f"{cls.__name__}.valid_rank: unexpected options {sorted(opts)}")
        return cls._valid_rank(cls._geometry(module), rank)

    @classmethod
    def like(cls, module: nn.Module, rank: Rank, **opts: Any) -> "FactorizedConv":
        """Randomly initialised layer with ``module``'s geometry (dtype/device of its weight)."""
        if opts:
            raise TypeError(f"{cls.__name__}.like: unexpected options {sorted(opts)}")
        geo = cls._geometry(module)
        layer = cls(**geo.conv_kwargs(), rank=rank)
        return layer.to(device=module.weight.device, dtype=module.weight.dtype)

    @classmethod
    def cost(
        cls,
        module: nn.Module,
        rank: Rank,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        **opts: Any,
    ) -> tuple[int, int]:
        """(params, MACs per sample); ``in_shape`` is (C, *spatial) without batch. Params of
        the stored stages (``_stages``), MACs of the ones that run (``_run_stages``)."""
        if opts:
            raise TypeError(f"{cls.__name__}.cost: unexpected options {sorted(opts)}")
        geo = cls._geometry(module)
        spatial = geo.check_in_shape(cls.__name__, in_shape)
        r = cls._check_rank(geo, rank)
        params, _ = stages_cost(cls._stages(geo, r), spatial)
        _, macs = stages_cost(cls._run_stages(geo, r), spatial)
        return params, macs

    @classmethod
    def _run_stages(cls, geo: ConvGeometry, rank: Rank) -> list[Stage]:
        """The convs ``forward`` runs, for the MAC count (``_stages`` holds the parameters);
        the same unless a subclass runs some stages merged."""
        return cls._stages(geo, rank)

    @classmethod
    def from_dense(cls, module: nn.Module, rank: Rank, **opts: Any) -> "FactorizedConv":
        return cls.from_conv(module, rank, **opts)

    @classmethod
    def from_conv(cls, conv: nn.Module, rank: Rank, **opts: Any) -> "FactorizedConv":
        raise NotImplementedError

    def extra_repr(self) -> str:
        g = self.geometry
        s = (f"{g.in_channels}, {g.out_channels}, kernel_size={g.kernel}, rank={self.rank}, "
             f"stride={g.stride}, pads={g.pads}, dilation={g.dilation}")
        if g.groups != 1:
            s += f", groups={g.groups}"
        if g.padding_mode != "zeros":
            s += f", padding_mode={g.padding_mode!r}"
        return s + ("" if g.bias else ", bias=False")
