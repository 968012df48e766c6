"""Cutting a registry VGG / ResNet at a layer and replacing everything after the cut.

Shared by RON (:mod:`.ron`) and ASNet (:mod:`.asnet`). A *start* is the name of the first
module replaced: ``features.<i>`` (a Conv2d, or a factorized conv, of a VGG's features),
``layers.<s>.<b>`` (a ResNet block) or ``pool`` (the global pooling before the classifier). The models' own ``forward`` is
kept: every module from the start on becomes ``nn.Identity`` and the classifier (``classifier``
/ ``fc``) becomes the new tail, which therefore receives ``flatten(z)`` of the cut activation
``z`` (B, C, H, W). The tails are small dense modules (``nn.Linear``, ``nn.ReLU``, a row
:class:`Gather` and a :class:`GroupMax`), so :func:`tensorslim.count` counts them exactly.

For RON also: the dense activations of the steps (:func:`activations`), step shapes, the
given-ranks parser and the MAC-budget helpers (one kept-energy share for every activation).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..batches import StopPass
from ..layers.base import FactorizedLayer
from ..models.resnet import BasicBlock, ResNet
from ..models.vgg import VGG
from ..surgery import set_submodule
from ._ron_residual import block_steps

__all__ = ["Gather", "GroupMax", "starts", "tail_units", "tail_macs", "cut_input", "install_cut",
           "linear_steps", "pool_windows", "rank_for", "rows_for", "reduced_macs", "energy_for_budget", "activations",
           "given_ranks", "group_size", "unflat_shape"]


class Gather(nn.Module):
    """``x (B, D) -> x[:, index] (B, P)``: RON's row sampling S_0 of the cut activation."""

    def __init__(self, index: Sequence[int]) -> None:
        super().__init__()
        self.register_buffer("index", torch.as_tensor(list(index), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).index_select(1, self.index)


class GroupMax(nn.Module):
    """``x (B, P * g) -> max over consecutive groups of g (B, P)``: a max-pool after sampling
    the g window members of every sampled pooled position (not counted as MACs, like pooling)."""

    def __init__(self, group: int) -> None:
        super().__init__()
        self.group = int(group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1, self.group).amax(-1)

    def extra_repr(self) -> str:
        return f"group={self.group}"


def _arch(model: nn.Module, who: str) -> str:
    if isinstance(model, VGG):
        return "vgg"
    if isinstance(model, ResNet):
        return "resnet"
    raise TypeError(f"{who}: model must be a tensorslim registry VGG or ResNet "
                    f"(ts.models.create / load_pretrained), got {type(model).__name__}")


def starts(model: nn.Module, who: str, *, blocks: bool, first_block: bool = False) -> list[str]:
    """The accepted start names in forward order (ResNet blocks only with ``blocks``; the
    first block ``layers.0.0`` only with ``first_block`` too)."""
    if _arch(model, who) == "vgg":
        names = [f"features.{i}" for i, m in enumerate(model.features)
                 if isinstance(m, (nn.Conv2d, FactorizedLayer))]
    else:
        names = [f"layers.{s}.{b}" for s, st in enumerate(model.layers) for b in range(len(st))]
        names = (names if first_block else names[1:]) if blocks else []
    return names + ["pool"]


def check_start(model: nn.Module, start: Any, who: str, *, blocks: bool,
                first_block: bool = False) -> str:
    ok = starts(model, who, blocks=blocks, first_block=first_block)
    if start not in ok:
        raise ValueError(f"{who}: start_layer/cut {start!r} is not accepted for this "
                         f"{type(model).__name__}; accepted: {', '.join(ok)}")
    return start


def tail_units(model: nn.Module, start: str) -> list[tuple[str, nn.Module]]:
    """(name, module) of everything the forward runs from ``start`` on, in order, with the
    model's flatten as ``("flatten", nn.Flatten())``."""
    if isinstance(model, VGG):
        feats = [(f"features.{i}", m) for i, m in enumerate(model.features)]
        body = feats[[n for n, _ in feats].index(start):] if start != "pool" else []
        head = [(f"classifier.{i}", m) for i, m in enumerate(model.classifier)]
    else:
        blocks = [(f"layers.{s}.{b}", m) for s, st in enumerate(model.layers) for b, m in enumerate(st)]
        body = blocks[[n for n, _ in blocks].index(start):] if start != "pool" else []
        head = [("fc", model.fc)]
    return body + [("pool", model.pool), ("flatten", nn.Flatten())] + head


def tail_macs(model: nn.Module, start: str, macs: dict[str, int]) -> int:
    """The part of ``macs`` (counted layer name -> MACs, as :func:`tensorslim.count` names
    them) spent from ``start`` on: a unit's own row and the rows inside it (a block's convs)."""
    units = [n for n, _ in tail_units(model, start)]
    return sum(m for n, m in macs.items() if any(n == u or n.startswith(u + ".") for u in units))


def head_name(model: nn.Module) -> str:
    return "classifier" if isinstance(model, VGG) else "fc"


def cut_input(model: nn.Module, start: str, batches: Any, limit: int | None = None,
              progress_bar: Callable | None = None) -> torch.Tensor:
    """The activation entering ``start`` (N, C, H, W) for the inputs in ``batches`` (at most
    ``limit`` samples), computed by the model in eval mode with no gradients."""
    unit = dict(model.named_modules())[start]
    got: list[torch.Tensor] = []

    def hook(_m, args):
        got.append(args[0].detach())
        raise StopPass

    handle = unit.register_forward_pre_hook(hook)
    n = 0
    try:
        with torch.no_grad():
            for x in (progress_bar(batches) if progress_bar else batches):
                try:
                    model(x)
                except StopPass:
                    pass
                n += got[-1].shape[0]
                if limit is not None and n >= limit:
                    break
    finally:
        handle.remove()
    if not got:
        raise ValueError("the calibration data yielded no batches")
    z = torch.cat(got)
    return z[:limit] if limit is not None else z


def install_cut(model: nn.Module, start: str, tail: nn.Module) -> None:
    """Put ``nn.Identity`` at every module from ``start`` on and ``tail`` at the classifier."""
    for name, _ in tail_units(model, start):
        if name not in ("flatten", head_name(model)) and not name.startswith("classifier."):
            set_submodule(model, name, nn.Identity())
    old = next(model.get_submodule(head_name(model)).parameters(), None)
    set_submodule(model, head_name(model), tail if old is None else tail.to(dtype=old.dtype))


def linear_steps(units: list[tuple[str, nn.Module]], who: str) -> list[dict[str, Any]]:
    """Group the tail's modules into RON steps ``z_k = pool(act(f_k(z_{k-1}) + g_k(z_{k-2})))``:
    ``f_k`` the affine modules (conv, BatchNorm, Linear, average pooling, flatten, dropout),
    ``act`` a ReLU, ``pool`` a MaxPool2d; a ResNet BasicBlock gives two steps (see
    :func:`._ron_residual.block_steps`), the second with its shortcut as ``g_k`` (``skip``,
    else None). Returns dicts {names, modules, act, pool, label, skip}."""
    affine = (nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.AdaptiveAvgPool2d, nn.AvgPool2d,
              nn.Flatten, nn.Dropout, nn.Identity, FactorizedLayer)  # factorized: linear too
    steps: list[dict[str, Any]] = []
    for name, m in units:
        cur = steps[-1] if steps else None
        if isinstance(m, BasicBlock):
            steps.extend(block_steps(name, m, who))
        elif isinstance(m, affine):
            if cur is None or cur["act"] or cur["pool"] is not None:
                cur = {"names": [], "modules": [], "act": False, "pool": None, "label": name,
                       "skip": None}
                steps.append(cur)
            cur["names"].append(name)
            cur["modules"].append(m)
        elif isinstance(m, nn.ReLU) and cur is not None and not cur["act"] and cur["pool"] is None:
            cur["act"] = True
        elif isinstance(m, nn.MaxPool2d) and cur is not None and cur["pool"] is None:
            cur["pool"] = m
        else:
            raise ValueError(f"{who}: cannot reduce module {name} ({type(m).__name__}) after the "
                             f"start; supported: Conv2d, BatchNorm2d, Linear, pooling, ReLU, "
                             f"MaxPool2d, BasicBlock")
    return steps


def pool_windows(pool: nn.MaxPool2d, shape: Sequence[int], who: str) -> torch.Tensor:
    """Flat pre-pool indices (C*Ho*Wo, k*k) of each pooled output's window over an input of
    ``shape`` (C, H, W); a ceil-mode window cut by the border repeats its first member."""
    k = pool.kernel_size if isinstance(pool.kernel_size, tuple) else (pool.kernel_size,) * 2
    s = pool.stride if isinstance(pool.stride, tuple) else (pool.stride,) * 2
    pad = pool.padding if isinstance(pool.padding, tuple) else (pool.padding,) * 2
    dil = pool.dilation if isinstance(pool.dilation, tuple) else (pool.dilation,) * 2
    if any(pad) or any(d != 1 for d in dil):
        raise ValueError(f"{who}: MaxPool2d with padding or dilation is not supported, got {pool}")
    C, H, W = shape
    Ho, Wo = pool(torch.zeros(1, C, H, W)).shape[-2:]
    c, i, j, a, b = torch.meshgrid(torch.arange(C), torch.arange(Ho), torch.arange(Wo),
                                   torch.arange(k[0]), torch.arange(k[1]), indexing="ij")
    rows, cols = i * s[0] + a, j * s[1] + b
    inside = (rows < H) & (cols < W)
    first = (c * H + i * s[0]) * W + j * s[1]
    flat = torch.where(inside, (c * H + rows) * W + cols, first)
    return flat.reshape(C * Ho * Wo, k[0] * k[1])


def activations(steps: list[dict], z0: torch.Tensor) -> tuple[list[torch.Tensor], list]:
    """Flattened activations z_0..z_K (N, D_k) and each step's pre-pool shape; a step with a
    ``skip`` adds its shortcut of the previous step's input (a residual block's output)."""
    raw, pre_shapes, z = [z0], [], z0
    with torch.no_grad():
        for k, st in enumerate(steps):
            for m in st["modules"]:
                z = m(z)
            if st["skip"] is not None:
                short = raw[k - 1]
                for m in st["skip"]:
                    short = m(short)
                z = z + short
            pre_shapes.append(tuple(z.shape[1:]))
            z = torch.relu(z) if st["act"] else z
            z = st["pool"](z) if st["pool"] is not None else z
            raw.append(z)
    return [r.flatten(1) for r in raw], pre_shapes


def given_ranks(ranks: Any, names: list[str], caps: list[int]) -> list[int]:
    """Per reduced activation rank from ``ranks`` (int, fraction in (0, 1], sequence or
    mapping name -> int; ``"full"`` is handled by the caller), clipped to what exists."""
    if isinstance(ranks, Mapping):
        unknown = sorted(set(ranks) - set(names))
        if unknown:
            raise ValueError(f"ron: ranks names {unknown} are not reduced activations; known: {names}")
        vals = [ranks.get(n, cap) for n, cap in zip(names, caps)]
    elif isinstance(ranks, Sequence) and not isinstance(ranks, str):
        if len(ranks) != len(names):
            raise ValueError(f"ron: ranks must give {len(names)} values ({names}), got {len(ranks)}")
        vals = list(ranks)
    else:
        vals = [ranks] * len(names)
    out = []
    for v, cap in zip(vals, caps):
        if isinstance(v, float) and 0 < v <= 1:
            v = max(1, round(v * cap))
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"ron: ranks must be 'full', a positive int, a fraction in (0, 1], a "
                             f"list or a mapping of those; got {v!r}")
        out.append(min(v, cap))
    return out


def group_size(step: dict) -> int:
    """Members per max-pool window (1 without a pool)."""
    if step["pool"] is None:
        return 1
    k = step["pool"].kernel_size
    return math.prod(k) if isinstance(k, tuple) else k * k


def unflat_shape(step: dict, pre: tuple) -> tuple:
    """The shape of a step's output (after its pool), i.e. the next step's input shape."""
    if step["pool"] is None:
        return pre
    return tuple(step["pool"](torch.zeros(1, *pre)).shape[1:])


# RON's MAC budget: ranks from one kept-energy share of every activation's singular values.

def rank_for(sv: torch.Tensor, t: float) -> int:
    """The smallest rank whose squared singular values ``sv`` keep a share >= ``t``."""
    energy = torch.cumsum(sv.double() ** 2, 0)
    energy = energy / energy[-1].clamp_min(1e-300)
    return min(int(torch.searchsorted(energy, torch.tensor([t], dtype=energy.dtype))[0]) + 1,
               len(sv))


def rows_for(r: int, dim: int, oversample: float) -> int:
    """Sampled rows P = ceil(oversample * r), at least r, at most ``dim``."""
    return min(dim, max(r, math.ceil(oversample * r)))


def reduced_macs(rows: list[int], groups: list[int], out_dim: int, skips: Sequence[int] = ()) -> int:
    """MACs of the reduced layers: step k maps P_k rows to g_{k+1} P_{k+1}; a step in
    ``skips`` also maps the previous step's input (P_{k-1} rows) to its output."""
    outs = [g * p for g, p in zip(groups[1:], rows[1:])] + [out_dim]
    return sum(o * p for o, p in zip(outs, rows)) + sum(outs[k] * rows[k - 1] for k in skips)


def energy_for_budget(svs, dims, groups, out_dim, oversample, budget, skips) -> tuple[float, list[int]]:
    """The largest kept-energy share t whose ranks fit ``budget`` MACs (bisection), and those
    ranks; t = -1 when rank 1 everywhere already exceeds the budget."""
    def macs(t):
        rs = [rank_for(sv, t) for sv in svs]
        return reduced_macs([rows_for(r, d, oversample) for r, d in zip(rs, dims)], groups, out_dim,
                            skips), rs

    low, ranks = macs(0.0)
    if low > budget:
        return -1.0, ranks
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if macs(mid)[0] <= budget else (lo, mid)
    return lo, macs(lo)[1]
