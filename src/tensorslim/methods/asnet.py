"""ASNet: active-subspace network (Cui et al., SIMODS 2020; seed talk 003).

The network is cut at a layer; everything after the cut is replaced by

    z (B, D) -> z / rms||z|| -> c = V^T z, normalised (nn.Linear(D -> r))
             -> Hermite polynomial-chaos basis of total degree <= p (:class:`PCE`, T terms)
             -> nn.Linear(T -> classes),

``V`` (D, r) the active subspace of the loss w.r.t. the cut activation
(:func:`tensorslim.analysis.active_subspace`: gradient covariance streamed through a
Frequent-Directions sketch, then a truncated SVD), the projection normalised by the mean and
standard deviation of ``c`` on the training samples, and the PCE coefficients fitted by
(ridge-regularised) least squares to the dense model's logits; then optional fine-tuning with
distillation from the dense model. The plan records the replacement as one ``asnet_head``
``Edit`` (cut, D, r, p, classes, the active eigenvalues), which :func:`tensorslim.load`
replays to the right shapes. MACs: the two Linears are counted by :func:`tensorslim.count`;
the basis evaluation (``r * p`` Hermite recurrences and ``T * (p - 1)`` products per sample,
recorded in the edit as ``uncounted_mults``) is, like activations and pooling, not counted.
"""
from __future__ import annotations

import copy
import itertools
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from ..analysis import _labelled, active_subspace
from ..configs import check_int
from ..cost import as_tuple, count
from ..plan import CompressionPlan, Edit
from ..surgery import register_edit
from . import _ron_tail as tail_lib
from .registry import Pipeline, register_pipeline

__all__ = ["PCE", "ASNetResult", "asnet", "fit_pce"]

OP = "asnet_head"
DEFAULT_RANK = 20
DEFAULT_DEGREE = 2
CLIP = 6.0  # PCE inputs are clamped to [-CLIP, CLIP] standard deviations
DEFAULT_CUT = {"vgg": "features.24", "resnet": "layers.2.0"}


def pce_terms(r: int, degree: int) -> list[list[tuple[int, int]]]:
    """Multi-indices of total degree <= ``degree`` in ``r`` variables, each as ``degree``
    (variable, power) pairs (padded with (0, 0): He_0 = 1), ordered by total degree."""
    terms = []
    for d in range(degree + 1):
        for combo in itertools.combinations_with_replacement(range(r), d):
            pairs = sorted(Counter(combo).items())
            terms.append(pairs + [(0, 0)] * (degree - len(pairs)))
    return terms


class PCE(nn.Module):
    """``x (B, r) -> [prod_i He_{a_i}(x_i)]_a (B, T)``: probabilists' Hermite polynomials
    (He_0 = 1, He_1 = x, He_{n+1} = x He_n - n He_{n-1}) over every multi-index ``a`` with
    |a| <= degree; T = C(r + degree, degree); ``x`` clamped to [-CLIP, CLIP]. No parameters."""

    def __init__(self, r: int, degree: int) -> None:
        super().__init__()
        self.r, self.degree = int(r), int(degree)
        terms = torch.tensor(pce_terms(self.r, self.degree), dtype=torch.long).reshape(-1, self.degree, 2)
        self.register_buffer("var", terms[..., 0], persistent=False)
        self.register_buffer("power", terms[..., 1], persistent=False)

    @property
    def terms(self) -> int:
        return math.comb(self.r + self.degree, self.degree)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # saturate far outside the fitted range (features are normalised): a polynomial of a
        # feature shifted by train-mode BatchNorm statistics would otherwise explode
        x = x.clamp(-CLIP, CLIP)
        he = [torch.ones_like(x), x]
        for n in range(1, self.degree):
            he.append(x * he[n] - n * he[n - 1])
        table = torch.stack(he[: self.degree + 1], dim=-1)  # (B, r, degree + 1)
        return table[:, self.var, self.power].prod(-1)

    def extra_repr(self) -> str:
        return f"r={self.r}, degree={self.degree}, terms={self.terms}"


def fit_pce(features: torch.Tensor, targets: torch.Tensor, degree: int, ridge: float = 1e-6
            ) -> torch.Tensor:
    """Least-squares PCE coefficients (T, C) mapping normalised features (N, r) to targets
    (N, C): ``argmin ||Phi W - Y||^2 + ridge * N * ||W||^2`` (float64 normal equations)."""
    phi = PCE(features.shape[1], degree)(features.double())
    gram = phi.T @ phi + ridge * phi.shape[0] * torch.eye(phi.shape[1], dtype=torch.float64)
    return torch.linalg.solve(gram, phi.T @ targets.double())


class Scale(nn.Module):
    """``x (B, ...) -> flatten(x) * scale`` (B, D): the cut activation brought to unit RMS norm
    per sample, so fine-tuning the projection sees inputs of norm ~1 whatever D is (an SGD
    step on a Linear moves its output by lr * ||input||^2)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) * self.scale


def _head(args: Mapping[str, Any]) -> nn.Sequential:
    d, r, p, c = (int(args[k]) for k in ("dim", "rank", "degree", "classes"))
    return nn.Sequential(Scale(), nn.Linear(d, r), PCE(r, p), nn.Linear(math.comb(r + p, p), c))


def _replay(model: nn.Module, edit: Edit, weights: bool) -> None:
    if weights:
        raise ValueError(f"edit {OP} on {edit.target!r}: the ASNet head is fitted to data and "
                         f"cannot be rebuilt from the dense model; load the checkpoint with "
                         f"tensorslim.load, or run methods.asnet.asnet again")
    cut = tail_lib.check_start(model, edit.args.get("cut"), f"edit {OP}", blocks=True)
    if edit.target != tail_lib.head_name(model):
        raise ValueError(f"edit {OP}: target {edit.target!r} does not fit this {type(model).__name__} "
                         f"(expected {tail_lib.head_name(model)!r})")
    tail_lib.install_cut(model, cut, _head(edit.args))


register_edit(OP, _replay)


@dataclass(frozen=True)
class ASNetResult:
    """The ASNet model, its plan (one ``asnet_head`` edit) and ``history``: ``cut``, ``rank``,
    ``degree``, ``eigenvalues`` (active, descending), ``fit_rel_error`` (||head - dense logits||
    / ||dense logits|| on the fitting samples) and the fine-tuning record."""

    model: nn.Module
    plan: CompressionPlan
    history: dict[str, Any] = field(default_factory=dict)


def _check_int(name: str, v: Any, low: int) -> int:
    check_int(name, v, low, where="asnet")
    return v


def _pick_cut(model, cut, target_macs, macs, total, head_macs) -> str:
    if cut is not None:
        return tail_lib.check_start(model, cut, "asnet", blocks=True)
    if target_macs is None:
        return DEFAULT_CUT["vgg" if isinstance(model, tail_lib.VGG) else "resnet"]
    ok = []
    for name in tail_lib.starts(model, "asnet", blocks=True):
        if total - tail_lib.tail_macs(model, name, macs) + head_macs(name) <= target_macs * total:
            ok.append(name)
    if not ok:
        raise ValueError(f"asnet: target_macs={target_macs} is not reachable: even the earliest cut "
                         f"keeps more dense MACs; accepted cuts: {tail_lib.starts(model, 'asnet', blocks=True)}")
    return ok[-1]


def _samples(model, cut, loader, limit):
    """Flattened cut activations (N, D) and dense logits (N, C) of ``limit`` training samples."""
    zs, ys = [], []
    feats = {}
    handle = dict(model.named_modules())[cut].register_forward_pre_hook(
        lambda _m, a: feats.__setitem__("z", a[0].detach()))
    try:
        with torch.no_grad():
            for x, _ in _labelled(loader, limit):
                ys.append(model(x))
                zs.append(feats["z"].flatten(1))
    finally:
        handle.remove()
    return torch.cat(zs), torch.cat(ys)


def asnet(model: nn.Module, example_inputs: Any, *, train_loader: Any, cut: str | None = None,
          rank: int | None = None, degree: int | None = None, target_macs: float | None = None,
          ranks: int | None = None, finetune_steps: int = 0, finetune_lr: float = 0.005,
          max_samples: int = 2048, sketch_size: int | None = None, ridge: float = 1e-6,
          progress: bool = True, seed: int = 0) -> ASNetResult:
    """Replace everything after ``cut`` in a copy of ``model`` (a registry VGG or ResNet, left
    untouched) by an active-subspace projection and a PCE head; returns :class:`ASNetResult`.

    ``train_loader``: labelled batches (x, y); its first ``max_samples`` samples give the
    active subspace (``sketch_size`` Frequent-Directions rows) and the least-squares fit
    (``ridge`` * N on the diagonal). ``cut``: the first replaced module (``features.<i>``,
    ``layers.<s>.<b>`` or ``pool``; default: the latest cut whose MACs fit ``target_macs``,
    else :data:`DEFAULT_CUT`). ``rank`` (alias ``ranks``, the CLI goal; default
    :data:`DEFAULT_RANK`, at most D) and ``degree`` (default :data:`DEFAULT_DEGREE`).
    ``finetune_steps`` steps of fine-tuning (lr ``finetune_lr``, distilled from the dense model,
    seeded by ``seed``, which also seeds the randomized SVD of a large sketch).
    """
    rank = _check_int("rank", rank if rank is not None else (ranks if ranks is not None else DEFAULT_RANK), 1)
    degree = _check_int("degree", degree if degree is not None else DEFAULT_DEGREE, 1)
    _check_int("finetune_steps", finetune_steps, 0)
    _check_int("max_samples", max_samples, 1)
    if target_macs is not None and (isinstance(target_macs, bool) or not isinstance(
            target_macs, (int, float)) or not 0 < target_macs <= 1):
        raise ValueError(f"asnet: target_macs must be a fraction in (0, 1], got {target_macs!r}")
    dense = copy.deepcopy(model).eval()
    x1 = as_tuple(example_inputs)[0][:1]
    before = count(dense, x1)
    macs = {l.name: l.macs for l in before.layers}
    shapes = _cut_shapes(dense, x1)
    classes = int(dense(x1).shape[1])

    def head_macs(name):
        d = math.prod(shapes[name])
        r = min(rank, d)
        return r * d + math.comb(r + degree, degree) * classes

    cut = _pick_cut(dense, cut, target_macs, macs, before.total_macs, head_macs)
    dim = math.prod(shapes[cut])
    r = min(rank, dim)
    sub = active_subspace(dense, cut, train_loader, rank=r, sketch_size=sketch_size,
                          max_samples=max_samples, progress=progress, seed=seed)
    r = sub.basis.shape[1]
    z, logits = _samples(dense, cut, train_loader, max_samples)
    c = z @ sub.basis.to(z.dtype)
    mu, sd = c.mean(0), c.std(0).clamp_min(1e-12)
    coef = fit_pce((c - mu) / sd, logits, degree, ridge)
    args = {"cut": cut, "dim": dim, "rank": r, "degree": degree, "classes": classes,
            "terms": math.comb(r + degree, degree), "eigenvalues": [float(e) for e in sub.eigenvalues],
            "uncounted_mults": r * degree + math.comb(r + degree, degree) * (degree - 1)}
    head = _head(args).to(z.dtype)
    with torch.no_grad():
        scale = 1.0 / z.norm(dim=1).pow(2).mean().sqrt().clamp_min(1e-30)
        head[0].scale.fill_(scale)
        head[1].weight.copy_((sub.basis.to(z.dtype) / (sd * scale)).T)
        head[1].bias.copy_(-mu / sd)
        head[3].weight.copy_(coef.T.to(z.dtype))
        head[3].bias.zero_()
        err = float(torch.linalg.norm(head(z) - logits) / torch.linalg.norm(logits).clamp_min(1e-30))
    student = copy.deepcopy(model)
    tail_lib.install_cut(student, cut, head)
    student.eval()
    history: dict[str, Any] = {"cut": cut, "rank": r, "degree": degree, "samples": sub.samples,
                               "eigenvalues": args["eigenvalues"], "fit_rel_error": err}
    if finetune_steps:
        from ..train import fine_tune

        history["finetune"] = fine_tune(student, train_loader, steps=finetune_steps, lr=finetune_lr,
                                        teacher=dense, progress=progress, seed=seed)
        student.eval()
    after = count(student, x1)
    goal = {"target_macs": target_macs} if target_macs is not None else {"ranks": r}
    plan = CompressionPlan(layers=(), method="asnet", goal=goal, params_before=before.total_params,
                           params_after=after.total_params, macs_before=before.total_macs,
                           macs_after=after.total_macs,
                           edits=(Edit(OP, tail_lib.head_name(student), args),))
    return ASNetResult(student, CompressionPlan.from_json(plan.to_json()), history)


def _cut_shapes(model: nn.Module, x1: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """The activation shape (without batch) entering every accepted cut."""
    names = tail_lib.starts(model, "asnet", blocks=True)
    mods = dict(model.named_modules())
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [mods[n].register_forward_pre_hook(
        lambda _m, a, n=n: shapes.__setitem__(n, tuple(a[0].shape[1:]))) for n in names]
    try:
        with torch.no_grad():
            model(x1)
    finally:
        for h in hooks:
            h.remove()
    return shapes


register_pipeline(Pipeline(
    name="asnet", run=asnet, summary="ASNet: active-subspace projection + polynomial-chaos head",
    goals=("target_macs", "ranks"), data="train_loader",
    smoke={"rank": 4, "degree": 2, "finetune_steps": 2, "max_samples": 32, "progress": False}))
