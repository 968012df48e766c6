"""Inference fusion: fold every eval-mode BatchNorm into the layer that produces its input.

An eval-mode BatchNorm computes ``y -> scale * y + shift`` per channel, with
``scale = gamma / sqrt(running_var + eps)`` and ``shift = beta - running_mean * scale``. When
it is the only consumer of a conv / linear layer's output, that affine map folds into the
layer: a dense ``nn.Conv{1,2,3}d`` / ``nn.Linear`` gets its weight rows (``nn.ConvTranspose*``:
its weight's output axis) scaled and the bias ``scale * bias + shift``; a factorized layer
folds it into its LAST stage (``FactorizedLayer.fold_output_affine``). The BatchNorm becomes
an ``nn.Identity`` under the same name, so module names stay and its state_dict keys go.

Pairs are found by tracing the model with ``torch.fx`` (factorized layers, BatchNorms, dense
producers and torch.nn leaf modules stay leaves): a BatchNorm whose single input is the output
of a producer module, where that output has no other user and each module is called once.
A model ``torch.fx`` cannot trace falls back to ``nn.Sequential`` adjacency (a producer
immediately followed by the BatchNorm in a plain ``nn.Sequential``). The report says which
BatchNorms were folded and why each other one was left.

Limit: a ``Linear`` whose output has 3+ dims (B, L, F) followed by ``BatchNorm1d(L)`` with
L == F cannot be told apart from (B, F) without running the model; such a pair is folded as
if the BatchNorm normalised the features.
"""
from __future__ import annotations

import copy
import logging
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .layers.base import FactorizedLayer, LayerTypeError, check_stock_forward, fold_affine_
from .plan import FusedBN

__all__ = ["fuse", "fuse_with_report", "fusion_report", "FusionReport", "apply_folds",
           "bn_affine", "FUSED_ATTR"]

log = logging.getLogger(__name__)

# the model attribute that records what was folded: ((bn, into, into_type), ...); io.save
# writes it into the plan (plain strings so torch.jit.script can type it)
FUSED_ATTR = "tensorslim_fused"

_CONVS: dict[type, int] = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_TRANSPOSED: dict[type, int] = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2,
                                nn.ConvTranspose3d: 3}
_BN_DIMS: dict[type, int] = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}
_DENSE = (*_CONVS, *_TRANSPOSED, nn.Linear)


@dataclass(frozen=True)
class FusionReport:
    """What :func:`fuse` folds (``folded``) and leaves (``left``: (BatchNorm name, reason)).

    ``how``: ``"torch.fx"`` or ``"nn.Sequential adjacency (...)"`` when fx could not trace.
    """

    folded: tuple[FusedBN, ...]
    left: tuple[tuple[str, str], ...]
    how: str

    def summary(self) -> str:
        lines = [f"fuse: folded {len(self.folded)} BatchNorm(s), left {len(self.left)} "
                 f"(pairs found by {self.how})"]
        lines += [f"  left {name}: {why}" for name, why in self.left]
        return "\n".join(lines)


def _bn_dims(bn: nn.Module) -> int | None:
    """1/2/3 for a stock BatchNorm{1,2,3}d (or a subclass that keeps its forward), else None."""
    for kind, dims in _BN_DIMS.items():
        if isinstance(bn, kind) and type(bn).forward is kind.forward:
            return dims
    return None


def _producer_dims(m: nn.Module) -> tuple[int, int] | None:
    """(BatchNorm dims that may follow, output channels) of a foldable producer, else None."""
    if isinstance(m, FactorizedLayer):
        dims = getattr(m, "dims", 1)
        return dims, int(getattr(m, "out_channels", None) or m.out_features)
    for table in (_CONVS, _TRANSPOSED):
        for kind, dims in table.items():
            if isinstance(m, kind):
                return dims, m.out_channels
    if isinstance(m, nn.Linear):
        return 1, m.out_features
    return None


def _why_not(producer: nn.Module, bn: nn.Module) -> str:
    """Why ``bn`` cannot fold into ``producer`` ("" when it can), looking at the modules only."""
    dims = _bn_dims(bn)
    if dims is None:
        return f"{type(bn).__name__} overrides forward"
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return "track_running_stats=False: it normalises by batch statistics even in eval mode"
    if isinstance(bn, nn.modules.lazy.LazyModuleMixin) and bn.has_uninitialized_params():
        return "uninitialised lazy BatchNorm"
    if not bn.running_var.is_floating_point():
        return f"non-float statistics ({bn.running_var.dtype})"
    shape = _producer_dims(producer)
    if shape is None:
        return f"its input comes from a {type(producer).__name__}, not a conv / linear layer"
    if not isinstance(producer, FactorizedLayer):
        base = next(t for t in _DENSE if isinstance(producer, t))
        try:
            check_stock_forward("fuse", producer, base)
        except LayerTypeError:
            return f"the {type(producer).__name__} before it overrides forward"
    if (isinstance(producer, FactorizedLayer)
            and type(producer).fold_output_affine is FactorizedLayer.fold_output_affine):
        return f"{type(producer).__name__} does not implement fold_output_affine"
    if shape[0] != dims:
        return f"a BatchNorm{dims}d after a {shape[0]}-d {type(producer).__name__}"
    if shape[1] != bn.num_features:
        return f"num_features={bn.num_features} but the layer before has {shape[1]} outputs"
    return ""


def bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), float64 (C,), of an eval-mode BatchNorm: ``bn(y) == scale * y + shift``
    per channel."""
    scale = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
    shift = -bn.running_mean.detach().double() * scale
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
        shift = shift * bn.weight.detach().double()
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return scale, shift


def _fold(producer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    if isinstance(producer, FactorizedLayer):
        producer.fold_output_affine(scale, shift)
    elif isinstance(producer, tuple(_TRANSPOSED)):
        fold_affine_(producer, scale, shift, axis=1, groups=producer.groups)
    else:
        fold_affine_(producer, scale, shift)


class _Tracer(fx.Tracer):
    """Keeps factorized layers, BatchNorms and dense producers (even user subclasses) as
    leaves, plus torch.nn's own modules as usual."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, (FactorizedLayer, _BatchNorm, *_DENSE))
                or super().is_leaf_module(m, qualname))


def _pairs_fx(model: nn.Module, graph: fx.Graph) -> tuple[list[FusedBN], dict[str, str]]:
    calls = Counter(id(model.get_submodule(n.target)) for n in graph.nodes
                    if n.op == "call_module")
    folded, left = [], {}
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        bn = model.get_submodule(node.target)
        if not isinstance(bn, _BatchNorm):
            continue
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not isinstance(src, fx.Node) or src.op != "call_module":
            what = "several inputs" if src is None else f"{getattr(src, 'op', type(src).__name__)} " \
                                                        f"{getattr(src, 'target', '')}"
            left[node.target] = f"its input is not a module's output ({what})"
            continue
        producer = model.get_submodule(src.target)
        why = _why_not(producer, bn)
        if not why and calls[id(bn)] != 1:
            why = f"the BatchNorm is called {calls[id(bn)]} times"
        if not why and calls[id(producer)] != 1:
            why = f"{src.target} is called {calls[id(producer)]} times"
        if not why and len(src.users) != 1:
            others = sorted(str(u) for u in src.users if u is not node)
            why = f"the output of {src.target} is also used by {', '.join(others[:3])}"
        if why:
            left[node.target] = why
        else:
            folded.append(FusedBN(node.target, src.target, type(producer).__name__))
    return folded, left


def _pairs_sequential(model: nn.Module) -> tuple[list[FusedBN], dict[str, str]]:
    """Fallback: producer immediately followed by a BatchNorm in a plain nn.Sequential, each
    registered once in the model."""
    seen = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    folded, left = [], {}
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        kids = list(seq.named_children())
        for (pname, producer), (bname, bn) in zip(kids, kids[1:]):
            if not isinstance(bn, _BatchNorm) or _producer_dims(producer) is None:
                continue
            full = lambda n: f"{name}.{n}" if name else n  # noqa: E731
            why = _why_not(producer, bn)
            if not why and (seen[id(bn)] != 1 or seen[id(producer)] != 1):
                why = "the BatchNorm or the layer before it is registered more than once"
            if why:
                left[full(bname)] = why
            else:
                folded.append(FusedBN(full(bname), full(pname), type(producer).__name__))
    return folded, left


def fusion_report(model: nn.Module) -> FusionReport:
    """Which BatchNorms :func:`fuse` would fold into which layer, and why it would leave the
    others; changes nothing (a dry run)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse expects an nn.Module, got {type(model).__name__}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph: fx.Graph | None = _Tracer().trace(model)
        how = "torch.fx"
    except Exception as e:  # noqa: BLE001 - fx raises many types on untraceable code
        graph = None
        first = (str(e).strip().splitlines() or [""])[0][:120]
        how = f"nn.Sequential adjacency (torch.fx could not trace: {type(e).__name__}: {first})"
    folded, left = _pairs_fx(model, graph) if graph is not None else _pairs_sequential(model)
    seen = {id(model.get_submodule(n)) for n in [f.bn for f in folded] + list(left)}
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm) and id(m) not in seen:
            seen.add(id(m))
            left[name] = ("not called by forward as traced" if graph is not None
                          else "not directly after a conv / linear layer in an nn.Sequential")
    return FusionReport(tuple(folded), tuple(sorted(left.items())), how)


def apply_folds(model: nn.Module, folds: Sequence[FusedBN]) -> None:
    """Fold each recorded BatchNorm into its layer (in place, whatever the train/eval mode:
    ``tensorslim.load`` rebuilds the structure and then loads the values) and put an
    ``nn.Identity`` in its place; extends the model's fusion record. ValueError naming the
    pair when a module is missing or the pair cannot fold."""
    from .surgery import replace_modules

    for f in folds:
        try:
            producer, bn = model.get_submodule(f.into), model.get_submodule(f.bn)
        except AttributeError as e:
            raise ValueError(f"fused BatchNorm {f.bn} -> {f.into}: the model has no such "
                             f"module ({e})") from None
        why = _why_not(producer, bn) if isinstance(bn, _BatchNorm) else \
            f"{f.bn} is a {type(bn).__name__}, not a BatchNorm"
        if why:
            raise ValueError(f"fused BatchNorm {f.bn} -> {f.into}: cannot fold: {why}")
        _fold(producer, *bn_affine(bn))
        replace_modules(model, {bn: nn.Identity()})
    record = tuple(getattr(model, FUSED_ATTR, ())) + tuple((f.bn, f.into, f.into_type)
                                                           for f in folds)
    if record:
        setattr(model, FUSED_ATTR, record)


def fused_record(model: nn.Module) -> tuple[FusedBN, ...]:
    """The BatchNorms folded into ``model`` so far (empty for an unfused model)."""
    return tuple(FusedBN(*r) for r in getattr(model, FUSED_ATTR, ()))


def fuse_with_report(model: nn.Module, *, inplace: bool = False) -> tuple[nn.Module, FusionReport]:
    """:func:`fuse` and the :class:`FusionReport` of what it folded and left."""
    if not isinstance(inplace, bool):
        raise TypeError(f"fuse: inplace must be True or False, got {inplace!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse expects an nn.Module, got {type(model).__name__}")
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm) and m.training:
            raise ValueError(f"fuse: BatchNorm {name or '(the model)'} is in training mode (it "
                             f"normalises by batch statistics, which cannot be folded); call "
                             f"model.eval() first")
    report = fusion_report(model)
    if not inplace:
        model = copy.deepcopy(model)
    with torch.no_grad():
        apply_folds(model, report.folded)
    log.info(report.summary())
    return model, report


def fuse(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Fold every eval-mode BatchNorm into the conv / linear / factorized layer before it.

    ``model`` (eval mode; a BatchNorm in training mode is refused with a ValueError naming
    it) -> the fused model: a copy, or ``model`` itself changed when ``inplace=True``. The
    output equals the unfused model's to float32 rounding; folded BatchNorms become
    ``nn.Identity`` and the model records them (``tensorslim.save`` writes the record into
    the plan, ``tensorslim.load`` replays it). A summary of what was folded and what was
    left (and why) is logged at INFO on ``tensorslim.fusion``; :func:`fuse_with_report`
    returns it. Shapes: unchanged, any input the model takes.
    """
    return fuse_with_report(model, inplace=inplace)[0]
