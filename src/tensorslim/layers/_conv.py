"""Shared pieces of the factorized convolutions: geometry, padding, stage costs, 1x1 convs.

Padding. A factorized conv runs ``1x1 -> pad -> spatial conv(s) -> 1x1``. Padding (zeros,
reflect, replicate or circular) only moves/copies/zeroes spatial positions, so it commutes
with a bias-free 1x1 conv: padding after the first 1x1 conv equals padding the input. When the
dense conv pads symmetrically with zeros, the spatial conv's own ``padding`` does it (fastest);
otherwise an explicit ``F.pad`` with the dense conv's mode and per-side amounts (as torch
computes them, including the asymmetric 'same' of even kernels) runs before the spatial
conv(s), which then use padding 0.

Speed (CPU). The spatial convs run on channels-last activations (oneDNN is several times faster
there, above all for depthwise convs). A layer returns its output in its input's memory
format, like ``nn.Conv2d``: channels-last in -> every stage is a oneDNN conv on channels-last
data (fastest: run the model channels-last); NCHW in -> the first 1x1 is one batched matmul
that reads NCHW and writes channels-last, and the last one reads channels-last and writes NCHW,
so no layout copies are made.
"""
from dataclasses import dataclass
from math import prod
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LayerTypeError, check_stock_forward

_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}
_CONV_TYPES: dict[int, type] = {1: nn.Conv1d, 2: nn.Conv2d}


def _tuple(value: Union[int, Sequence[int]], dims: int, layer: str, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dims
    out = tuple(int(v) for v in value)
    if len(out) != dims:
        raise ValueError(f"{layer}: {name}={value!r} must be an int or a {dims}-tuple")
    return out


@dataclass(frozen=True)
class ConvGeometry:
    """Everything a factorized conv needs to know about the dense conv it replaces.

    ``pads[i]`` is the (before, after) padding of spatial dim i, as torch applies it.
    """

    dims: int
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    bias: bool
    padding_mode: str
    pads: tuple[tuple[int, int], ...]

    @classmethod
    def make(
        cls,
        layer: str,
        dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: Union[int, Sequence[int]],
        stride: Union[int, Sequence[int]] = 1,
        padding: Union[str, int, Sequence[int]] = 0,
        dilation: Union[int, Sequence[int]] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
    ) -> "ConvGeometry":
        """Validate a conv's arguments (as given to ``nn.Conv{dims}d``) into a geometry."""
        kernel = _tuple(kernel_size, dims, layer, "kernel_size")
        stride_t = _tuple(stride, dims, layer, "stride")
        dil = _tuple(dilation, dims, layer, "dilation")
        if min(kernel + stride_t + dil) < 1 or in_channels < 1 or out_channels < 1 or groups < 1:
            raise ValueError(
                f"{layer}: channels, kernel_size, stride, dilation and groups must be >= 1, got "
                f"in={in_channels} out={out_channels} kernel={kernel} stride={stride_t} "
                f"dilation={dil} groups={groups}"
            )
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"{layer}: in_channels={in_channels} and out_channels={out_channels} must be "
                f"divisible by groups={groups}"
            )
        if groups > 1 and in_channels == groups:
            raise ValueError(
                f"{layer}: cannot factorize a depthwise conv (in_channels == groups == {groups}):"
                f" each filter sees one input channel, so there is no channel mode to compress; "
                f"keep it dense"
            )
        if padding_mode not in _MODES:
            raise ValueError(
                f"{layer}: padding_mode={padding_mode!r} not supported; accepted: {sorted(_MODES)}"
            )
        if isinstance(padding, str):
            if padding == "valid":
                pads = tuple((0, 0) for _ in range(dims))
            elif padding == "same":
                if any(s != 1 for s in stride_t):
                    raise ValueError(f"{layer}: padding='same' needs stride 1, got {stride_t}")
                totals = [d * (k - 1) for d, k in zip(dil, kernel)]
                pads = tuple((t // 2, t - t // 2) for t in totals)
            else:
                raise ValueError(
                    f"{layer}: padding={padding!r} not supported; accepted: 'same', 'valid', int "
                    f"or {dims}-tuple"
                )
        else:
            p = _tuple(padding, dims, layer, "padding")
            if min(p) < 0:
                raise ValueError(f"{layer}: padding={p} must be >= 0")
            pads = tuple((v, v) for v in p)
        return cls(dims, in_channels, out_channels, kernel, stride_t, dil, groups, bool(bias),
                   padding_mode, pads)

    @classmethod
    def of(cls, layer: str, module: nn.Module, dims: int) -> "ConvGeometry":
        """Geometry of a dense ``nn.Conv{dims}d``; LayerTypeError for any other module."""
        conv_type = _CONV_TYPES[dims]
        if not isinstance(module, conv_type) or isinstance(module, nn.modules.conv._ConvTransposeNd):
            raise LayerTypeError(
                f"{layer}: cannot replace a {type(module).__name__}; accepted module type: "
                f"{conv_type.__name__}"
            )
        check_stock_forward(layer, module, conv_type)
        return cls.make(layer, dims, module.in_channels, module.out_channels, module.kernel_size,
                        module.stride, module.padding, module.dilation, module.groups,
                        module.bias is not None, module.padding_mode)

    def conv_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that rebuild the dense conv (padding as explicit ints or 'same')."""
        sym = all(a == b for a, b in self.pads)
        padding: Any = tuple(a for a, _ in self.pads) if sym else "same"
        return dict(in_channels=self.in_channels, out_channels=self.out_channels,
                    kernel_size=self.kernel, stride=self.stride, padding=padding,
                    dilation=self.dilation, groups=self.groups, bias=self.bias,
                    padding_mode=self.padding_mode)

    @property
    def explicit_pad(self) -> bool:
        """True when an ``F.pad`` must run (non-zero mode or asymmetric padding)."""
        if not any(a or b for a, b in self.pads):
            return False
        return self.padding_mode != "zeros" or any(a != b for a, b in self.pads)

    @property
    def fpad(self) -> list[int]:
        """Pads in ``F.pad`` order: last spatial dim first, (before, after) each."""
        return [v for a, b in reversed(self.pads) for v in (a, b)]

    @property
    def fpad_mode(self) -> str:
        return _MODES[self.padding_mode]

    @property
    def conv_padding(self) -> tuple[int, ...]:
        """Symmetric padding for the spatial conv's ``padding`` arg (0 when F.pad is used)."""
        if self.explicit_pad:
            return (0,) * self.dims
        return tuple(a for a, _ in self.pads)

    @property
    def in_group(self) -> int:
        return self.in_channels // self.groups

    @property
    def out_group(self) -> int:
        return self.out_channels // self.groups

    def check_in_shape(self, layer: str, in_shape: Sequence[int]) -> tuple[int, ...]:
        """Spatial sizes of a per-sample input shape (C, *spatial)."""
        shape = tuple(int(s) for s in in_shape)
        if len(shape) != self.dims + 1 or shape[0] != self.in_channels:
            raise ValueError(
                f"{layer}: in_shape={shape} must be per-sample (C, *spatial) with "
                f"C={self.in_channels} and {self.dims} spatial dims"
            )
        return shape[1:]


def pad_by_slices(x: Tensor, pad: list[int], mode: str) -> Tensor:
    """``F.pad(x, pad, mode)`` for modes 'constant' (zeros), 'reflect', 'replicate' built
    from constant slices.

    Same values; used when tracing, because the TorchScript ONNX exporter loses static shapes
    through ``Pad`` (then e.g. a following AdaptiveAvgPool2d cannot be exported).
    """
    for i in range(len(pad) // 2):
        dim = x.dim() - 1 - i
        before, after = pad[2 * i], pad[2 * i + 1]
        parts = []
        if mode == "reflect":
            if before > 0:
                parts.append(x.narrow(dim, 1, before).flip(dim))
            parts.append(x)
            if after > 0:
                parts.append(x.narrow(dim, x.shape[dim] - 1 - after, after).flip(dim))
        elif mode == "replicate":
            parts = [x.narrow(dim, 0, 1)] * before + [x]
            parts += [x.narrow(dim, x.shape[dim] - 1, 1)] * after
        else:
            zero = torch.zeros_like(x.narrow(dim, 0, 1))
            parts = [zero] * before + [x] + [zero] * after
        x = torch.cat(parts, dim)
    return x


def conv_out_size(size: int, kernel: int, stride: int, dilation: int, pad: tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - dilation * (kernel - 1) - 1) // stride + 1


@dataclass(frozen=True)
class Stage:
    """One conv of a factorized layer; ``pads`` is its effective padding (F.pad or its own)."""

    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    bias: bool
    pads: tuple[tuple[int, int], ...]


def stages_cost(stages: Sequence[Stage], spatial: Sequence[int]) -> tuple[int, int]:
    """(params, MACs) of running ``stages`` in sequence on one sample of spatial size ``spatial``.

    MACs of a conv = output elements * (in_channels / groups) * prod(kernel).
    """
    params = macs = 0
    size = list(spatial)
    for s in stages:
        size = [conv_out_size(n, k, st, d, p)
                for n, k, st, d, p in zip(size, s.kernel, s.stride, s.dilation, s.pads)]
        fan_in = (s.in_channels // s.groups) * prod(s.kernel)
        params += s.out_channels * fan_in + (s.out_channels if s.bias else 0)
        macs += s.out_channels * prod(size) * fan_in
    return params, macs


def spatial_conv(dims: int, stage: Stage, conv_padding: Sequence[int]) -> nn.Module:
    """An ``nn.Conv{dims}d`` for a spatial stage (padding done by it or by an F.pad before)."""
    return _CONV_TYPES[dims](stage.in_channels, stage.out_channels, stage.kernel, stage.stride,
                             tuple(conv_padding), stage.dilation, stage.groups, stage.bias)


def is_channels_last(x: Tensor) -> bool:
    """True for a channels-last (NHWC-strided) 4-D tensor that is not also NCHW-contiguous."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
        memory_format=torch.channels_last)


class Pointwise2d(nn.Conv2d):
    """A 1x1 ``nn.Conv2d`` (stride 1, no padding) that writes the memory format asked for.

    ``forward(x, cl_out)``: when tracing (jit.trace, ONNX export), or for NCHW input and
    output (``cl_out=False``), a plain conv; otherwise the conv on channels-last input (the
    input converted if needed), returning channels-last (``cl_out=True``) or contiguous NCHW
    output. On CPU both run oneDNN's 1x1 kernel. On the AMD EPYC development machine it ran
    at ~190 GMAC/s channels-last, against ~85 GMAC/s for the batched-matmul (MKL) route this
    layer used before (K = 256, 32x32 maps, 2 threads). Shapes: (B, C_in, H, W) -> (B, C_out, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int = 1,
                 bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 1, groups=groups, bias=bias)

    def forward(self, x: Tensor, cl_out: bool = True) -> Tensor:
        if torch.jit.is_tracing() or not (cl_out or is_channels_last(x)):
            # plain conv: static shapes for ONNX shape inference / NCHW in and out
            y = F.conv2d(x, self.weight, self.bias, 1, 0, 1, self.groups)
        else:
            y = F.conv2d(x.contiguous(memory_format=torch.channels_last), self.weight,
                         self.bias, 1, 0, 1, self.groups)
        return y if cl_out else y.contiguous()


class Pointwise1d(nn.Conv1d):
    """A 1x1 ``nn.Conv1d`` run as one batched matmul. Shapes: (B, C_in, L) -> (B, C_out, L).

    ``cl_out`` is accepted for symmetry with ``Pointwise2d`` and ignored."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 1,
                 bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 1, groups=groups, bias=bias)

    def forward(self, x: Tensor, cl_out: bool = False) -> Tensor:
        bias = self.bias
        if self.groups != 1 or torch.jit.is_tracing():
            return F.conv1d(x, self.weight, bias, 1, 0, 1, self.groups)
        b = x.shape[0]
        wb = self.weight.flatten(1).unsqueeze(0).expand(b, -1, -1)
        if bias is None:
            return torch.bmm(wb, x)
        return torch.baddbmm(bias.view(1, -1, 1), wb, x)


def pointwise(dims: int, in_channels: int, out_channels: int, groups: int, bias: bool) -> nn.Module:
    cls = Pointwise2d if dims == 2 else Pointwise1d
    return cls(in_channels, out_channels, groups, bias)


def group_blocks(weight: Tensor, groups: int) -> list[Tensor]:
    """Split a dense conv weight (T, S/g, *k) into its g per-group kernels (T/g, S/g, *k)."""
    return list(weight.chunk(groups, dim=0))


def param_like(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` cast to ``ref``'s dtype and device (for copying factors into parameters)."""
    return t.detach().to(dtype=ref.dtype, device=ref.device)


def assign_(param: Optional[Tensor], value: Tensor) -> None:
    """Copy ``value`` into ``param`` (shapes must match exactly)."""
    if param is None:
        return
    if tuple(param.shape) != tuple(value.shape):
        raise ValueError(f"factor shape {tuple(value.shape)} != parameter shape {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(param_like(value, param))
