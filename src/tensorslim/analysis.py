"""Active subspaces of a network's loss and the universal attack they give (Cui, Zhang,
Zhang, Daniel, Chen, "Active Subspace of Neural Networks: Structural Analysis and Universal
Attacks", SIMODS 2020; seed talk 003).

For a cut activation ``z`` (D,) of a sample with loss ``l``, the active subspace is spanned by
the leading eigenvectors of the gradient covariance ``E[grad_z l grad_z l^T]``. The gradients
are streamed through a Frequent-Directions sketch (Liberty 2013; Ghashami et al. 2016) of
``sketch_size`` rows, never forming the D x D covariance, and the sketch's leading right
singular vectors (a truncated SVD, randomized when large) are the basis. With
``sketch_size >= D`` the sketch is exact.

:func:`universal_attack` perturbs every input by the same vector along the top active
direction of the loss w.r.t. the INPUT, and compares the attack success rate with a random
direction of the same norm.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

__all__ = ["ActiveSubspace", "FrequentDirections", "active_subspace", "AttackResult",
           "universal_attack"]


class FrequentDirections:
    """A streamed sketch ``B`` (<= 2 * ell, D) of the rows of a tall matrix G with
    ``B^T B ~= G^T G`` (``||G^T G - B^T B||_2 <= ||G - G_k||_F^2 / (ell - k)``); the buffer is
    shrunk by its ``ell``-th squared singular value whenever it exceeds ``2 * ell`` rows."""

    def __init__(self, ell: int) -> None:
        if isinstance(ell, bool) or not isinstance(ell, int) or ell < 1:
            raise ValueError(f"FrequentDirections: ell must be a positive int, got {ell!r}")
        self.ell = ell
        self.rows: torch.Tensor | None = None

    def update(self, g: torch.Tensor) -> None:
        """Add rows ``g`` (b, D)."""
        self.rows = g if self.rows is None else torch.cat([self.rows, g])
        if self.rows.shape[0] > 2 * self.ell:
            self._shrink()

    def _shrink(self) -> None:
        _, s, vh = torch.linalg.svd(self.rows, full_matrices=False)
        if s.numel() > self.ell:
            s = torch.sqrt(torch.clamp(s[: self.ell] ** 2 - s[self.ell] ** 2, min=0))
            vh = vh[: self.ell]
        self.rows = s[:, None] * vh

    def sketch(self) -> torch.Tensor:
        """The sketch (<= 2 * ell, D)."""
        if self.rows is None:
            raise ValueError("FrequentDirections: no rows were added")
        return self.rows


@dataclass(frozen=True)
class ActiveSubspace:
    """``basis`` (D, r) orthonormal columns, ``eigenvalues`` (r,) of E[g g^T] (descending),
    ``samples`` gradients seen, ``cut`` where they were taken and the activation ``shape``."""

    basis: torch.Tensor
    eigenvalues: torch.Tensor
    samples: int
    cut: str
    shape: tuple[int, ...]


def _labelled(loader: Any, limit: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    n = 0
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError("loader must yield labelled batches (x, y)")
        x, y = batch[0], batch[1]
        x, y = x[: limit - n], y[: limit - n]
        yield x, y
        n += x.shape[0]
        if n >= limit:
            return


def cut_gradients(model: nn.Module, cut: str, x: torch.Tensor, y: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z (B, *shape), logits (B, C), per-sample grad of the cross-entropy w.r.t. z (B, D)) for
    ``cut`` = ``"input"`` or the name of the module whose input is the cut activation."""
    keep: dict[str, torch.Tensor] = {}

    def hook(_m, args):
        keep["z"] = args[0].detach().requires_grad_(True)
        return (keep["z"],) + tuple(args[1:])

    handle = None
    if cut == "input":
        keep["z"] = x.detach().requires_grad_(True)
        x = keep["z"]
    else:
        handle = dict(model.named_modules())[cut].register_forward_pre_hook(hook)
    try:
        with torch.enable_grad():
            logits = model(x)
            loss = F.cross_entropy(logits, y, reduction="sum")  # rows: per-sample gradients
            (g,) = torch.autograd.grad(loss, keep["z"])
    finally:
        if handle is not None:
            handle.remove()
    return keep["z"].detach(), logits.detach(), g.flatten(1)


def _check_cut(model: nn.Module, cut: Any) -> str:
    names = [n for n, _ in model.named_modules() if n]
    if cut != "input" and cut not in names:
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise ValueError(f"active_subspace: cut must be 'input' or the name of the module whose "
                         f"input is the cut activation, got {cut!r}; modules: {shown}")
    return cut


def active_subspace(model: nn.Module, cut: str, loader: Any, *, rank: int = 20,
                    sketch_size: int | None = None, max_samples: int = 2048,
                    progress: bool = False, seed: int = 0) -> ActiveSubspace:
    """The rank-``rank`` active subspace of the cross-entropy loss w.r.t. the activation at
    ``cut`` (``"input"``, or the name of the module whose input it is, e.g. ``features.24``)
    over the first ``max_samples`` labelled samples of ``loader``. ``sketch_size`` (default
    ``max(4 * rank, 64)``) rows of Frequent Directions. The model is used in eval mode and its
    parameters are not changed."""
    cut = _check_cut(model, cut)
    for name, v in (("rank", rank), ("max_samples", max_samples)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"active_subspace: {name} must be a positive int, got {v!r}")
    ell = sketch_size if sketch_size is not None else max(4 * rank, 64)
    fd = FrequentDirections(ell)
    net = copy.deepcopy(model).eval().requires_grad_(False)  # the caller's model stays as it is
    n, shape = 0, ()
    for x, y in tqdm(_labelled(loader, max_samples), desc="active subspace", disable=not progress,
                     leave=False):
        z, _, g = cut_gradients(net, cut, x, y)
        fd.update(g)
        n, shape = n + x.shape[0], tuple(z.shape[1:])
    from .tensor import svd

    B = fd.sketch()
    r = min(rank, *B.shape)
    res = svd(B, r, seed=seed)
    return ActiveSubspace(res.Vh.T.contiguous(), res.S ** 2 / max(n, 1), n, cut, shape)


@dataclass(frozen=True)
class AttackResult:
    """Attack success rates (share of correctly classified samples whose prediction the
    perturbation changes) along the top active direction and a random one of the same L2
    ``norm``; ``samples`` correctly classified samples were attacked."""

    active_rate: float
    random_rate: float
    norm: float
    samples: int


def _rate(model: nn.Module, batches: list, delta: torch.Tensor) -> tuple[int, int]:
    fooled = total = 0
    with torch.no_grad():
        for x, y in batches:
            ok = model(x).argmax(1) == y
            adv = model(x + delta.reshape(1, *x.shape[1:]).to(x.dtype)).argmax(1) != y
            fooled += int((ok & adv).sum())
            total += int(ok.sum())
    return fooled, total


def universal_attack(model: nn.Module, loader: Any, *, eps: float = 0.1,
                     eval_loader: Any = None, max_samples: int = 1024, seed: int = 0,
                     progress: bool = False) -> AttackResult:
    """Universal perturbation ``+-norm * v`` (the sign that fools more) with ``v`` the top
    active direction of the loss w.r.t. the input on ``loader``, against ``+-norm * u`` with a
    seeded random unit ``u``; ``norm = eps * mean ||x||_2`` of the evaluated inputs. Rates are
    measured on ``eval_loader`` (default ``loader``), at most ``max_samples`` samples."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"universal_attack: eps must be a positive number, got {eps!r}")
    sub = active_subspace(model, "input", loader, rank=1, max_samples=max_samples,
                          progress=progress, seed=seed)
    batches = list(_labelled(eval_loader if eval_loader is not None else loader, max_samples))
    norm = eps * float(torch.cat([x.flatten(1).norm(dim=1) for x, _ in batches]).mean())
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(sub.basis.shape[0], generator=g, dtype=sub.basis.dtype)
    net = copy.deepcopy(model).eval()
    rates = [max(_rate(net, batches, s * norm * d) for s in (1.0, -1.0))
             for d in (sub.basis[:, 0], u / u.norm())]
    (fa, total), (fr, _) = rates
    return AttackResult(fa / max(total, 1), fr / max(total, 1), norm, total)
