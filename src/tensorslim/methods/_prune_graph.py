"""Graph analysis for filter pruning: which Conv2d's output channels can be removed.

torch.fx traces the model and ShapeProp records every tensor's shape; from each Conv2d the
users are followed through BatchNorm2d, elementwise ops, pooling, dropout and at most one
flatten. The conv is prunable when this reaches exactly one consumer (a groups=1 Conv2d, or a
Linear after the flatten) and nothing else: a residual add, a concat, the model output or any
unknown op makes it unprunable, with the reason recorded.
"""
from __future__ import annotations

import contextlib
import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardtanh, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout2d,
)
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_ELEMENTWISE_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.hardtanh, F.hardswish,
    F.mish, torch.sigmoid, torch.tanh, F.dropout, F.dropout2d,
}
_POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous"}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}


@dataclass(frozen=True)
class Chain:
    """A prunable conv, the BatchNorms on its output and the one layer consuming it."""

    conv: str
    channels: int
    bns: tuple[str, ...]
    consumer: str
    group: int  # input features of the consumer per channel: 1 for a conv, H*W after flatten


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run with every submodule in eval mode, then restore each module's own flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def trace(model: nn.Module, inputs: tuple[Any, ...]) -> fx.GraphModule:
    """Symbolically trace ``model`` and annotate every node with its tensor shape."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # fx raises many types (TraceError, TypeError, RuntimeError...)
        raise TypeError(
            f"l1_prune: cannot trace {type(model).__name__} with torch.fx.symbolic_trace "
            f"({type(e).__name__}: {e}); filter pruning needs an fx-traceable model "
            f"(no data-dependent control flow in forward)") from e
    with eval_mode(gm), torch.no_grad():
        ShapeProp(gm).propagate(*inputs)
    return gm


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _is_tensor(node: fx.Node) -> bool:
    """Whether ShapeProp saw ``node`` produce a tensor (or tensors), not ints like a size."""
    return node.meta.get("tensor_meta") is not None


def _is_flatten(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A flatten/view/reshape turning (B, C, H, W) into (B, C*H*W)."""
    if node.op == "call_module":
        ok = isinstance(modules[node.target], nn.Flatten)
    elif node.op == "call_function":
        ok = node.target in (torch.flatten, torch.reshape)
    else:
        ok = node.op == "call_method" and node.target in _FLATTEN_METHODS
    src = node.args[0] if node.args else None
    if not ok or not isinstance(src, fx.Node):
        return False
    ins, outs = _shape(src), _shape(node)
    return (ins is not None and outs is not None and len(ins) == 4 and len(outs) == 2
            and outs == (ins[0], ins[1] * ins[2] * ins[3]))


def _passes_through(node: fx.Node, modules: dict[str, nn.Module], flat: bool) -> bool:
    """Elementwise ops (any time) and pooling (before the flatten) keep channels in place."""
    if node.op == "call_module":
        mod = modules[node.target]
        return isinstance(mod, _ELEMENTWISE_MODULES) or (not flat and isinstance(mod, _POOL_MODULES))
    if node.op == "call_function":
        return node.target in _ELEMENTWISE_FUNCTIONS or (not flat and node.target in _POOL_FUNCTIONS)
    return node.op == "call_method" and node.target in _ELEMENTWISE_METHODS


def _describe(node: fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target))
    if target in (operator.add, operator.iadd, torch.add):
        return f"a residual add ({node.name})"
    return f"{node.op} {name!s} ({node.name})"


def _follow(conv: fx.Node, channels: int, modules: dict[str, nn.Module],
            calls: Counter) -> tuple[list[str], fx.Node | None, int, str]:
    """Walk the users of ``conv``: (BatchNorms, the consumer, its group size, why not)."""
    bns: list[str] = []
    consumers: list[tuple[fx.Node, int]] = []
    stack = [(user, conv, 0) for user in conv.users]  # (node, its chain input, H*W if flattened)
    seen: set[fx.Node] = set()
    while stack:
        node, src, group = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if not _is_tensor(node):  # x.size(0), x.shape: reads the shape, not the channels
            continue
        if any(n is not src and _is_tensor(n) for n in node.all_input_nodes):
            return bns, None, 0, f"its output meets another tensor at {_describe(node)}"
        mod = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            consumers.append((node, group))
            continue
        if isinstance(mod, nn.BatchNorm2d) and not group and mod.num_features == channels:
            if calls[node.target] != 1:
                return bns, None, 0, f"BatchNorm {node.target} is called {calls[node.target]} times"
            bns.append(node.target)
        elif not group and _is_flatten(node, modules):
            src_shape = _shape(src)
            group = src_shape[2] * src_shape[3]
        elif not _passes_through(node, modules, bool(group)):
            return bns, None, 0, f"its output reaches {_describe(node)}"
        stack += [(user, node, group) for user in node.users]
    if len(consumers) != 1:
        return bns, None, 0, f"its output reaches {len(consumers)} conv/linear layers, not exactly 1"
    return bns, consumers[0][0], consumers[0][1], ""


def _check_consumer(node: fx.Node, mod: nn.Module, channels: int, group: int, calls: Counter) -> str:
    if calls[node.target] != 1:
        return f"its consumer {node.target} is called {calls[node.target]} times"
    if isinstance(mod, nn.Conv2d):
        if mod.groups != 1:
            return f"its consumer {node.target} is a grouped conv (groups={mod.groups})"
        if group or mod.in_channels != channels:
            return f"its consumer {node.target} does not see its {channels} channels unflattened"
        return ""
    if not group or mod.in_features != channels * group:
        return f"its consumer {node.target} is a Linear that does not see (B, C*H*W) features"
    return ""


def find_chains(gm: fx.GraphModule, exclude: set[str]) -> tuple[list[Chain], dict[str, str]]:
    """Every prunable conv (in graph order) and, for the other Conv2d, why not."""
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    chains: list[Chain] = []
    skipped: dict[str, str] = {}
    for node in gm.graph.nodes:
        mod = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(mod, nn.Conv2d):
            continue
        name = node.target
        if name in exclude:
            skipped[name] = "excluded by the caller"
        elif calls[name] != 1:
            skipped[name] = f"it is called {calls[name]} times"
        elif mod.groups != 1:
            skipped[name] = f"it is a grouped conv (groups={mod.groups})"
        else:
            bns, consumer, group, why = _follow(node, mod.out_channels, modules, calls)
            if consumer is not None:
                why = _check_consumer(consumer, modules[consumer.target], mod.out_channels,
                                      group, calls)
            if why:
                skipped[name] = why
            else:
                chains.append(Chain(name, mod.out_channels, tuple(bns), consumer.target,
                                     max(group, 1)))
    return chains, skipped
