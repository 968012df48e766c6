"""Data-aware correction of factorized layers: refit each layer's last factors so that its
output matches the dense layer's output on real inputs (asymmetric reconstruction).

Truncating a decomposition minimises the error of the *weights*; what the network needs is a
small error of each layer's *output* on the inputs it actually sees, and those inputs are
themselves changed by the layers compressed before it. Zhang et al. (TPAMI 2016,
"Accelerating very deep convolutional networks for classification and detection") fit the
factors so that the compressed layer, fed the compressed network's activations, reproduces the
dense layer fed the dense network's activations ("asymmetric" reconstruction), which stops the
errors from accumulating with depth.

Here the tail of every factorized layer is linear in its weights, and :func:`reconstruct`,
layer by layer in execution order, collects its input activations from the compressed model
and the dense layer's output Y from the dense model on the same calibration images, then
solves for the tail in closed form (statistics accumulated in float64, ridge-regularised):

- Tucker-2 and SVD convs (ungrouped): the spatial ``core`` and the 1x1 ``project_out`` jointly,
  as the best map of rank <= r_out from the core's input patches (im2col) to Y with a free bias
  (reduced-rank regression: least squares, then projection onto the top r_out principal
  directions of the fitted outputs), split back into the two convs;
- SVD Linear: ``project_in`` and ``project_out`` jointly, the same way, from the layer input;
- CP convs and grouped convs: ``project_out`` alone (per group), ordinary least squares.

The rank-limited fit is :func:`tensorslim.tensor.reduced_rank_regression` on the centred
statistics (the bias absorbs the means), i.e. the same whitened SVD that data-aware
compression (``compress(..., calibration=)``) uses: with the dense layer's own inputs and
outputs it gives exactly the whitened-SVD factors; with the compressed network's inputs it
corrects for the drift of the layers before.

A calibration batch is what the loader yields: a tensor, a mapping of keyword tensors (a
tokenizer's output, run as ``model(**batch)``; rows at padded positions of an
``attention_mask`` are left out), or a tuple / list ``(inputs, targets, ...)`` whose first
element is such an input or a tuple of positional tensors.

The ranks, the cost and the forward stay exactly as they are. The weights are updated in
place, like a fine-tuning step; no module is replaced.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .batches import StopPass, batch_mask, run_batch, unpadded


DEFAULT_STEPS = 16  # calibration batches used by oneshot / compress / demo (batch 128: 2048 images)


@dataclass(frozen=True)
class LayerFit:
    """What :func:`reconstruct` did to one layer: output error ||WZ+b - Y|| / ||Y|| on the
    calibration data before and after the refit (the compressed model's own inputs, the dense
    model's targets), and the number of output positions (samples) it was fitted on."""

    name: str
    error_before: float
    error_after: float
    samples: int


def refittable(model: nn.Module) -> list[str]:
    """Names of the layers of ``model`` whose last factor :func:`reconstruct` can refit: the
    factorized layers (``tensorslim.layers``) with a linear ``project_out`` (CP, Tucker-2,
    SVD of convs and Linears; not TT)."""
    from .layers.base import FactorizedLayer

    return [n for n, m in model.named_modules()
            if isinstance(m, FactorizedLayer)
            and isinstance(getattr(m, "project_out", None), (nn.Conv1d, nn.Conv2d, nn.Linear))]


def _batches(loader: Iterable[Any], steps: int) -> list[Any]:
    out = []
    for batch in loader:
        out.append(batch[0] if isinstance(batch, (tuple, list)) else batch)
        if len(out) >= steps:
            break
    if not out:
        raise ValueError("reconstruct: the loader yielded no batches")
    return out


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def _rows(t: Tensor, module: nn.Module, mask: Tensor | None = None) -> Tensor:
    """Activations -> (samples, C): a conv's (B, C, *spatial) or a Linear's (*, C), the rows of
    a (B, L, C) Linear activation at padded positions (``mask`` False) left out."""
    if isinstance(module, nn.Linear) or t.dim() <= 2:
        return unpadded(t, mask).reshape(-1, t.shape[-1])
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def _capture(model: nn.Module, module: nn.Module, x: Any, *, output: bool) -> Tensor:
    """The output of ``module`` (or its first input) when ``model`` runs on ``x``; the forward
    pass stops right after it (a module called several times: its first call)."""
    got: list[Tensor] = []

    def pre(_m: nn.Module, args: tuple[Any, ...]) -> None:
        got.append(args[0].detach())
        raise StopPass

    def post(_m: nn.Module, _args: tuple[Any, ...], out: Tensor) -> None:
        got.append(out.detach())
        raise StopPass

    handle = module.register_forward_hook(post) if output else module.register_forward_pre_hook(pre)
    try:
        run_batch(model, x)
    except StopPass:
        pass
    finally:
        handle.remove()
    if not got:
        raise ValueError(f"reconstruct: {type(module).__name__} did not run in the forward pass")
    return got[0]


def _execution_order(model: nn.Module, names: Sequence[str], x: Any) -> list[str]:
    seen: list[str] = []
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_pre_hook(lambda _m, _a, n=n: seen.append(n)) for n in names]
    try:
        run_batch(model, x)
    finally:
        for h in handles:
            h.remove()
    order = list(dict.fromkeys(seen))
    return order + [n for n in names if n not in order]  # never ran: fitting will say so


def _head(layer: nn.Module) -> nn.Module | None:
    """The stage before ``project_out`` that is refitted jointly with it (reduced-rank
    regression), or None when only ``project_out`` is refitted: a Tucker-2 / SVD conv's
    spatial ``core`` (ungrouped) and an SVD Linear's ``project_in``. CP's depthwise stage
    is not a free matrix, so CP refits its last factor only."""
    head = getattr(layer, "core", None)
    if isinstance(head, (nn.Conv1d, nn.Conv2d)) and head.groups == 1 and head.bias is None:
        return head
    head = getattr(layer, "project_in", None)
    if isinstance(head, nn.Linear) and head.bias is None:
        return head
    return None


def _features(head: nn.Module, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """The rows the head's weight multiplies: conv input patches (im2col, in the order of
    ``weight.flatten(1)``) or the Linear's input (padded rows left out); (samples, fan_in)."""
    if isinstance(head, nn.Linear):
        return _rows(x, head, mask)
    if isinstance(head, nn.Conv1d):
        x, k, d, p, s = x.unsqueeze(2), (1, *head.kernel_size), (1, *head.dilation), \
            (0, *head.padding), (1, *head.stride)
    else:
        k, d, p, s = head.kernel_size, head.dilation, head.padding, head.stride
    cols = torch.nn.functional.unfold(x, k, dilation=d, padding=p, stride=s)  # (B, C*k, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


class _Stats:
    """Sums over samples of [z, 1][z, 1]^T and [z, 1] y^T per group (float64)."""

    def __init__(self, groups: int, k: int, t: int, bias: bool, device: torch.device) -> None:
        self.bias, self.samples, self.y_sq = bias, 0, 0.0
        f64 = dict(dtype=torch.float64, device=device)
        self.gram = torch.zeros(groups, k + bias, k + bias, **f64)
        self.cross = torch.zeros(groups, k + bias, t, **f64)

    def add(self, z: Tensor, y: Tensor, chunk: int = 16384) -> None:
        g = self.gram.shape[0]
        for i in range(0, z.shape[0], chunk):
            zc, yc = z[i:i + chunk].double(), y[i:i + chunk].double()
            zg = zc.reshape(zc.shape[0], g, -1).transpose(0, 1)  # (g, n, k)
            if self.bias:
                zg = torch.cat([zg, zg.new_ones(g, zg.shape[1], 1)], dim=2)
            yg = yc.reshape(yc.shape[0], g, -1).transpose(0, 1)  # (g, n, t)
            self.gram += zg.transpose(1, 2) @ zg
            self.cross += zg.transpose(1, 2) @ yg
            self.y_sq += float(yc.square().sum())
        self.samples += z.shape[0]

    def error(self, w: Tensor) -> float:
        """||[Z 1] w - Y|| / ||Y|| from the sums: tr(w'Gw) - 2 tr(w'C) + ||Y||^2. A result
        below the rounding error of that sum (float64 eps x its terms) is reported as 0: an
        exact fit cancels the terms to noise of order sqrt(eps) after the square root."""
        fit, cross = float((w * (self.gram @ w)).sum()), float((w * self.cross).sum())
        sq = fit - 2 * cross + self.y_sq
        noise = 64 * torch.finfo(torch.float64).eps * (abs(fit) + 2 * abs(cross) + self.y_sq)
        return (sq / self.y_sq) ** 0.5 if self.y_sq and sq > noise else 0.0

    def solve(self, ridge: float, rank: int | None) -> Tensor:
        """The (g, k [+1], t) map minimising ||[Z 1] w - Y|| per group: least squares (ridge
        relative to the mean diagonal of the centred Gram matrix; the bias is not penalised)
        and, with ``rank``, the best slopes of rank <= ``rank`` (reduced-rank regression, the
        whitened SVD of :func:`tensorslim.tensor.reduced_rank_regression`) on the statistics
        centred by the bias, which takes the means."""
        from .tensor import reduced_rank_regression

        k = self.gram.shape[1] - self.bias
        out = []
        for gram, cross in zip(self.gram, self.cross):
            if not self.bias:
                out.append(reduced_rank_regression(gram, cross, rank, ridge=ridge))
                continue
            n = float(gram[-1, -1]) or 1.0
            zbar, ybar = gram[-1:, :k] / n, cross[-1:] / n  # (1, k), (1, t)
            g_c = gram[:k, :k] - n * zbar.T @ zbar
            c_c = cross[:k] - n * zbar.T @ ybar
            slopes = reduced_rank_regression(g_c, c_c, rank, ridge=ridge)
            out.append(torch.cat([slopes, ybar - zbar @ slopes]))
        return torch.stack(out)


def _fit_layer(name: str, layer: nn.Module, dense: nn.Module, student: nn.Module,
               teacher: nn.Module, xs: list[Tensor], ridge: float) -> LayerFit:
    out, head = layer.project_out, _head(layer)
    g = int(getattr(out, "groups", 1)) if head is None else 1
    has_bias = out.bias is not None
    mid, t = out.weight.shape[1], out.weight.shape[0] // g  # per group: mid in, t out
    tap = out if head is None else head
    k = mid if head is None else head.weight[0].numel()
    stats = _Stats(g, k, t, has_bias, out.weight.device)
    for x in xs:
        mask = batch_mask(x)
        z = _capture(student, tap, x, output=False)
        z = _rows(z, tap, mask) if head is None else _features(head, z, mask)
        y = _rows(_capture(teacher, dense, x, output=True), dense, mask)
        if y.shape[0] != z.shape[0]:
            raise ValueError(f"reconstruct: {name}: {z.shape[0]} factor positions vs "
                             f"{y.shape[0]} dense output positions")
        stats.add(z, y)
    w_out = out.weight.detach().double().reshape(g, t, mid).transpose(1, 2)  # (g, mid, t)
    if head is None:
        w_old = w_out
    else:  # the composite head -> project_out map, (1, k, t)
        w_old = (head.weight.detach().double().reshape(mid, k).t() @ w_out[0]).unsqueeze(0)
    if has_bias:
        w_old = torch.cat([w_old, out.bias.detach().double().reshape(g, 1, t)], dim=1)
    w_new = stats.solve(ridge, None if head is None else mid)
    before, after = stats.error(w_old), stats.error(w_new)
    if after < before:  # keep the better (the refit can only lose on degenerate data)
        _assign(out, head, w_new, g, mid, t, k, has_bias)
    return LayerFit(name, before, min(before, after), stats.samples)


@torch.no_grad()
def _assign(out: nn.Module, head: nn.Module | None, w: Tensor, g: int, mid: int, t: int,
            k: int, has_bias: bool) -> None:
    slopes = w[:, :k, :]  # (g, k, t)
    if head is None:
        out.weight.copy_(slopes.transpose(1, 2).reshape(out.weight.shape).to(out.weight))
    else:  # slopes = H P with P = top-mid right singular vectors: head H, project_out P
        _, _, vh = torch.linalg.svd(slopes[0], full_matrices=False)
        p = vh[:mid]  # (mid, t), orthonormal rows
        h = slopes[0] @ p.t()  # (k, mid)
        head.weight.copy_(h.t().reshape(head.weight.shape).to(head.weight))
        out.weight.copy_(p.t().reshape(out.weight.shape).to(out.weight))
    if has_bias:
        out.bias.copy_(w[:, k, :].reshape(-1).to(out.bias))


@torch.no_grad()
def reconstruct(student: nn.Module, teacher: nn.Module, loader: Iterable[Any], *,
                steps: int = DEFAULT_STEPS, ridge: float = 1e-4, layers: Sequence[str] | None = None,
                progress: bool = False) -> list[LayerFit]:
    """Refit the last factors of each factorized layer of ``student`` (in place) so that its
    output matches the same-named dense layer of ``teacher`` on ``steps`` batches of
    ``loader`` (each ``(x, ...)`` or ``x``; ``x`` a tensor, a tuple of positional tensors or a
    dict of keyword tensors), the compressed model's activations in, the dense model's out
    (asymmetric reconstruction, see the module docstring).

    ``layers``: names to refit (default: :func:`refittable`); ``ridge``: Tikhonov weight
    relative to the mean diagonal of each Gram matrix. Both models run in eval mode (BatchNorm
    uses its running statistics); their train/eval modes are restored. A refit that does not
    lower a layer's output error on the calibration data is not applied. Returns one
    :class:`LayerFit` per layer, in execution order.
    """
    if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
        raise TypeError("reconstruct expects nn.Module student and teacher, got "
                        f"{type(student).__name__} and {type(teacher).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"reconstruct: steps must be an int >= 1, got {steps!r}")
    if not ridge >= 0:
        raise ValueError(f"reconstruct: ridge must be >= 0, got {ridge!r}")
    known = refittable(student)
    names = known if layers is None else list(layers)
    s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
    for n in names:
        if n not in known:
            raise ValueError(f"reconstruct: {n!r} is not a refittable factorized layer of the "
                             f"student; accepted: {known}")
        if n not in t_mods:
            raise ValueError(f"reconstruct: the teacher has no module {n!r} (the dense layer "
                             "the student's factorized layer replaced)")
    device = next(student.parameters()).device
    xs = [_to(x, device) for x in _batches(loader, steps)]
    modes = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    fits = []
    try:
        order = _execution_order(student, names, xs[0])
        for n in tqdm(order, desc="reconstruct", disable=not progress):
            fits.append(_fit_layer(n, s_mods[n], t_mods[n], student, teacher, xs, ridge))
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    return fits
