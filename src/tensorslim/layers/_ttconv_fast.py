"""Per-call savings of :class:`~tensorslim.layers.TTConv2d`'s eager forward.

* :func:`derived`: an inference cache of tensors the forward derives from the TT cores (the
  merged spatial + first-core kernel, the depthwise filters). It is used only when no autograd
  graph is needed (grad disabled, or no source requires grad), in plain eager mode on CPU
  (never while tracing, scripting, compiling or exporting, never under a dispatch mode such as
  FlopCounterMode or FakeTensorMode), so exported graphs still hold the TT structure. A hit
  needs every source to equal, value for value (``torch.equal``) and in shape, dtype and
  device, the snapshot taken when the entry was built: an optimizer step, a ``.data``
  assignment or an untracked ``.data`` in-place change, ``load_state_dict``, ``.to()`` /
  ``.double()`` all miss, so an entry never goes stale. Sources are the small TT cores, so the
  comparison costs far less than the rebuild. A forward that needs gradients drops the cache.
  The caches live in the module's ``__dict__`` under :data:`CACHE` and :data:`INDEX` (not
  parameters or buffers: never in ``state_dict``); ``TTConv2d`` leaves them out of pickles.
* :func:`small_forward`: the whole forward of a small input with the fewest ops, its im2col
  one ``index_select`` with an index cached per input shape.
* :func:`batch_chunk`: a large batch runs in slices whose contraction state stays near
  ``chunk_bytes``. The state of one sample can be many times its input (r_1 m_d channels per
  slice of n_d input channels); whole-batch states of tens of MB leave the cache, and glibc's
  allocator returns such blocks to the kernel on free (its mmap and trim thresholds), so each
  call pays page faults on fresh zeroed pages. Slices reuse the same heap blocks and stay in
  cache. The slices run the same matmuls, so the MACs are unchanged. ``chunk_bytes = None``
  (the default) slices only under glibc's allocator: TCMalloc and jemalloc keep freed blocks
  for reuse, and there whole batches ran as fast or faster.
"""
from functools import lru_cache
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..runtime import allocator
from ._conv import conv_out_size

CACHE = "_tt_cache"  # keys of the caches in a module's __dict__: derived tensors, small-input plan
INDEX = "_tt_small"
CHUNK_BYTES = 4 << 20  # the contraction state of one batch slice under glibc's allocator


_PLAIN = (Tensor, nn.Parameter)


def needs_graph(sources: Sequence[Tensor]) -> bool:
    """Whether a tensor derived from ``sources`` now needs an autograd graph."""
    if not torch.is_grad_enabled():
        return False
    for s in sources:
        if s.requires_grad:
            return True
    return False


def cache_allowed(sources: Sequence[Tensor]) -> bool:
    """Whether tensors derived from ``sources`` may come from the cache in this call: plain
    eager mode (no tracing, compiling, exporting or dispatch mode), no autograd graph needed,
    plain CPU tensors."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    if _get_current_dispatch_mode() is not None or needs_graph(sources):
        return False
    for s in sources:
        if type(s) not in _PLAIN or not s.is_cpu:
            return False
    return True


def _same(snaps: Sequence[Tensor], sources: Sequence[Tensor]) -> bool:
    """Every source equals its snapshot (both on CPU: :func:`cache_allowed`), value for value."""
    if len(snaps) != len(sources):
        return False
    for a, b in zip(snaps, sources):
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            return False
    return True


def drop_cache(module: nn.Module, plans: bool = False) -> None:
    """Free the cached derived tensors (and with ``plans`` the small-input plan too)."""
    module.__dict__.pop(CACHE, None)
    if plans:
        module.__dict__.pop(INDEX, None)


def derived(module: nn.Module, name: str, sources: Sequence[Tensor], build: Callable[[], Tensor]) -> Tensor:
    """``build()`` (a function of ``sources`` and the module's fixed shapes only), from the
    module's cache entry ``name`` when :func:`cache_allowed` and the sources are unchanged."""
    if not cache_allowed(sources):
        if needs_graph(sources):
            drop_cache(module)  # training: keep nothing
        return build()
    cache = module.__dict__.get(CACHE)
    if cache is None:
        cache = module.__dict__[CACHE] = {}
    hit = cache.get(name)
    if hit is not None and _same(hit[0], sources):
        return hit[1]
    # outside inference mode: an entry built under torch.inference_mode() stays usable in a
    # later no-grad call whose input requires grad (inference tensors cannot be saved for backward)
    with torch.inference_mode(False), torch.no_grad():
        snaps = [s.detach().clone() for s in sources]
        value = build()
    cache[name] = (snaps, value)
    return value


def _unfold_index(shape: Sequence[int], kernel: Sequence[int], dilation: Sequence[int],
                  padding: Sequence[int], stride: Sequence[int]) -> Tensor:
    """Flat positions (into the input; ``numel`` for a padded zero) of ``F.unfold``'s output
    in its memory order: the unfold of the positions themselves."""
    numel = 1
    for s in shape:
        numel *= int(s)
    pos = torch.arange(1, numel + 1, dtype=torch.float64).view(list(shape))  # 0 marks padding
    cols = F.unfold(pos, list(kernel), list(dilation), list(padding), list(stride)).to(torch.int64)
    cols = cols.sub_(1).masked_fill_(cols < 0, numel)
    return cols.reshape(-1)


def small_forward(layer: nn.Module, x: Tensor) -> Optional[Tensor]:
    """The forward of a ``TTConv2d`` with ``merged`` and one group on a small input (8 <= H' W'
    and batch x H' W' <= ``im2col_pixels``), in eager mode; None where it does not apply.
    The same matmuls (so the same MACs) as the generic forward, with the fewest ops: im2col of
    the (B A, n_d, H, W) slices as ONE ``index_select`` (``F.unfold``'s values; the unfold
    kernel has a large fixed cost on small inputs) with an index cached per input shape, then
    one bmm per step, each weight a stride-0 view over the batches."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return None
    key = (x.shape, x.dtype, x.device, layer.im2col_pixels)
    plan = layer.__dict__.get(INDEX)
    if plan is None or plan[0] != key:
        plan = (key, *_small_plan(layer, x))
        layer.__dict__[INDEX] = plan
    _, index, zero, ho, wo, nk = plan
    if index is None:
        return None
    if layer.explicit_pad:
        x = F.pad(x, layer.pad, layer.pad_mode)
    b, p = x.shape[0], ho * wo
    flat = x.reshape(-1)
    if zero is not None:  # a zero at position numel for the padded taps
        flat = torch.cat([flat, zero])
    cols = flat.index_select(0, index).view(-1, nk, p)  # (B A, n_d kh kw, P)
    cores = list(layer.cores._parameters.values())  # the ParameterList's, without its slow indexing
    spatial = layer._parameters["spatial"]
    ker = derived(layer, "merged", (spatial, cores[-1]), lambda: layer._build_kernel(True)).view(-1, nk)
    z = torch.bmm(ker.expand(cols.shape[0], -1, -1), cols)
    for j in range(1, len(layer.order)):
        k_in, k_out = layer.k_in[j], layer.k_out[j]
        zz = z.view(-1, k_in, layer.cols[j] * p)
        z = torch.bmm(cores[layer.order[j]].reshape(k_out, k_in).expand(zz.shape[0], -1, -1), zz)
    return layer._affine(z.view(b, layer.out_channels, p)).view(b, layer.out_channels, ho, wo)


def _padded_shape(layer: nn.Module, x: Tensor) -> list[int]:
    """``x``'s shape once ``layer.pad`` (F.pad's order: W sides, then H sides) grew it, when the
    layer pads explicitly."""
    shape = list(x.shape)
    if layer.explicit_pad:
        shape[2] += layer.pad[2] + layer.pad[3]
        shape[3] += layer.pad[0] + layer.pad[1]
    return shape


def _out_size(layer: nn.Module, shape: Sequence[int]) -> tuple[int, int]:
    """(H', W') of the layer's conv on a (padded) input of ``shape``."""
    ho, wo = (conv_out_size(n, k, s, dl, (pd, pd)) for n, k, s, dl, pd in
              zip(shape[2:], layer.geometry.kernel, layer.stride, layer.dilation, layer.conv_padding))
    return ho, wo


def _small_plan(layer: nn.Module, x: Tensor) -> tuple[Optional[Tensor], Optional[Tensor], int, int, int]:
    """(index, zero or None, H', W', n_d kh kw) of :func:`small_forward` for inputs like ``x``
    (index None: the input is not small). ``layer.pad`` (F.pad's order: W sides, then H sides)
    grows the input first when the layer pads explicitly."""
    kernel = layer.geometry.kernel
    nk = layer.in_modes[-1] * kernel[0] * kernel[1]
    if x.dim() != 4 or not (layer.merged and layer.groups == 1):
        return None, None, 0, 0, nk
    shape = _padded_shape(layer, x)
    ho, wo = _out_size(layer, shape)
    if not (ho > 0 and wo > 0 and 8 <= ho * wo and shape[0] * ho * wo <= layer.im2col_pixels):
        return None, None, ho, wo, nk
    with torch.inference_mode(False), torch.no_grad():
        index = _unfold_index(shape, kernel, layer.dilation, layer.conv_padding, layer.stride).to(x.device)
        zero = x.new_zeros(1) if any(layer.conv_padding) else None
    return index, zero, ho, wo, nk


@lru_cache(maxsize=1)
def auto_chunk_bytes() -> int:
    """``chunk_bytes = None``'s value in this process: :data:`CHUNK_BYTES` under glibc's
    allocator, 0 (no slicing) under TCMalloc or jemalloc."""
    return CHUNK_BYTES if allocator() == "system" else 0


def batch_chunk(layer: nn.Module, x: Tensor) -> int:
    """Samples per slice for ``layer``'s eager inference on ``x`` so that the largest
    contraction state of a slice is about ``layer.chunk_bytes`` (None: :func:`auto_chunk_bytes`);
    0 (the whole batch at once) while tracing, compiling, exporting, under a dispatch mode,
    when an autograd graph is needed, or when the whole batch's state is under twice the
    budget. Slices are equal to within one sample."""
    budget = auto_chunk_bytes() if layer.chunk_bytes is None else int(layer.chunk_bytes)
    if budget <= 0 or not cache_allowed([layer._parameters["spatial"], *layer.cores._parameters.values()]):
        return 0
    if (x.requires_grad and torch.is_grad_enabled()) or x.dim() != 4 or x.shape[0] < 2:
        return 0
    ho, wo = _out_size(layer, _padded_shape(layer, x))
    width = max(r * k * c for r, k, c in zip(layer.rows, layer.k_out, layer.cols))
    if not layer.merged:  # the depthwise step's output: r_0 channels per input channel
        width = max(width, layer.in_channels * layer.rank[0] // layer.groups)
    per_sample = layer.groups * width * max(ho * wo, 0) * x.element_size()
    b = x.shape[0]
    if per_sample == 0 or b * per_sample <= 2 * budget:
        return 0
    slices = -(-b * per_sample // budget)
    return -(-b // slices)
