"""Residual blocks in RON, approximated jointly (Gusak et al. 2021; seed talk 003).

A ResNet BasicBlock ``z_out = relu(F(z_in) + shortcut(z_in))`` with
``F(z) = bn2(conv2(h))``, ``h = relu(bn1(conv1(z)))`` becomes two RON steps:

* the branch's inner activation ``h ~= U_h s_h`` with
  ``s_h = relu(S_h A_1 U_in s_in + S_h b_1)``;
* the block output, from the sampled rows of BOTH branches (``V c ~= psi(V_1 c_1 + V_2 c_2)``):
  ``s_out = relu(S_out A_2 U_h s_h + S_out A_sc U_in s_in + S_out (b_2 + b_sc))``,

where ``A_1``, ``A_2``, ``A_sc`` are the convs with their BatchNorms (the shortcut is the
identity or a 1x1 conv + BN) and ``U = V (S V)^+`` (D, P). The matrices ``S A U`` (P_out, P_in)
are computed by running the modules themselves on U's columns and keeping the sampled output
rows, so no dense D x D matrix of a large D is ever formed. The reduced block is
:class:`ReducedBlock`: three small ``nn.Linear`` (``inner``, ``outer`` and the bias-free
``skip``), counted exactly by :func:`tensorslim.count`.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..models.resnet import BasicBlock

__all__ = ["ReducedBlock", "block_steps", "run_affine", "build_block"]


class ReducedBlock(nn.Module):
    """``s_in (B, P_in) -> relu(outer(relu(inner(s_in))) + skip(s_in)) (B, P_out)``: a
    residual block in RON form (``inner``: P_in -> P_h, ``outer``: P_h -> P_out with the
    summed biases of both branches, ``skip``: P_in -> P_out without bias)."""

    def __init__(self, inner: nn.Linear, outer: nn.Linear, skip: nn.Linear) -> None:
        super().__init__()
        if inner.out_features != outer.in_features or skip.in_features != inner.in_features \
                or skip.out_features != outer.out_features or skip.bias is not None:
            raise ValueError(f"ReducedBlock: shapes do not chain: inner {inner}, outer {outer}, "
                             f"skip {skip} (skip must be bias-free, P_in -> P_out)")
        self.inner, self.outer, self.skip = inner, outer, skip

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.outer(torch.relu(self.inner(s))) + self.skip(s))


def block_steps(name: str, block: nn.Module, who: str) -> list[dict[str, Any]]:
    """The two RON steps of the BasicBlock ``block`` named ``name``: the inner activation
    (conv1, bn1, ReLU) and the block output (conv2, bn2, plus the shortcut of the block's
    input as ``skip``, then ReLU). Same dict layout as :func:`._ron_tail.linear_steps`."""
    if not isinstance(block, BasicBlock) or not isinstance(block.shortcut, nn.Sequential):
        raise ValueError(f"{who}: cannot reduce block {name} ({type(block).__name__}); "
                         f"supported: the registry ResNet's BasicBlock")
    sc = list(block.shortcut)
    inner = {"names": [f"{name}.conv1", f"{name}.bn1"], "modules": [block.conv1, block.bn1],
             "act": True, "pool": None, "label": f"{name}.conv1", "skip": None}
    outer = {"names": [f"{name}.conv2", f"{name}.bn2"] + [f"{name}.shortcut.{i}" for i in range(len(sc))],
             "modules": [block.conv2, block.bn2], "act": True, "pool": None, "label": name,
             "skip": sc}
    return [inner, outer]


def run_affine(modules: Sequence[nn.Module], U: torch.Tensor, in_shape: Sequence[int]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns and offset of the affine map ``modules`` applied to ``U`` (D_in, P):
    returns (``A U`` (D_out, P), ``b`` (D_out,)), computed by running the modules on U's
    columns (reshaped to ``in_shape``) and on zero, never forming ``A``."""
    x = torch.cat([U.T, torch.zeros(1, U.shape[0], dtype=U.dtype)]).reshape(-1, *in_shape)
    with torch.no_grad():
        for m in modules:
            x = m(x)
    x = x.flatten(1)
    bias = x[-1]
    return (x[:-1] - bias).T, bias.clone()


def build_block(inner: Mapping[str, Any], outer: Mapping[str, Any], where: str) -> ReducedBlock:
    """A :class:`ReducedBlock` (weights uninitialised) from two layer entries of a
    ``ron_tail`` edit (the second with ``skip_features``)."""
    if not inner.get("act") or int(inner.get("group", 1)) != 1 or not outer.get("act") \
            or int(outer.get("group", 1)) != 1:
        raise ValueError(f"{where}: a residual layer entry must follow an unpooled ReLU layer "
                         f"and end in an unpooled ReLU, got {dict(inner)} then {dict(outer)}")
    return ReducedBlock(nn.Linear(int(inner["in_features"]), int(inner["out_features"])),
                        nn.Linear(int(outer["in_features"]), int(outer["out_features"])),
                        nn.Linear(int(outer["skip_features"]), int(outer["out_features"]), bias=False))
