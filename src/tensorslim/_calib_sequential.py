"""Sequential (error-propagating) data-aware decomposition of a model's SVD Linear layers.

Plain calibrated compression fits every Linear on the inputs the DENSE model feeds it. Once
the layers before it are compressed, a layer sees other inputs x^ instead of x, and the errors
add up. Sequential calibration visits the layers in the order the model calls them; a layer's
statistics are collected on the partially compressed model (every layer before it already
replaced), so each fit sees the inputs it will really get:

* ``"inputs"``: the whitened SVD (SVD-LLM) on the second moment of x^ (the target is the
  layer's own output W x^ on those inputs);
* ``"outputs"``: the closed-form update (SVD-LLM v2 / GPTQ-style error correction): the
  rank-k W', b' minimising sum_i ||W' x^_i + b' - (W x_i + b)||^2 + lam ||W' - W||_F^2, i.e.
  the layer's output on the compressed inputs matches the DENSE layer's output on the dense
  inputs of the same rows. With A = sum (x^ - m^)(x^ - m^)^T, C = sum (x^ - m^)(x - m)^T
  (means m^, m; uncentred and no b' without a bias) the objective is
  ||(W' - W0) T||_F^2 + const with W0 = W (C^T + lam I)(A + lam I)^-1 and T T^T = A + lam I,
  so the optimum is the whitened SVD of the least-squares solution W0 in the metric
  A + lam I (reduced-rank regression) and b' = b + W m - W' m^. ``lam`` = ``damping`` x
  mean(diag A) pulls W0 towards W where the compressed inputs carry little energy (and makes
  A + lam I invertible); with x^ = x, W0 = W for any ``lam``.

Layers that share one input tensor (e.g. query / key / value) form a group fitted from one
pass; each pass stops as soon as the group has seen its inputs. ``"outputs"`` runs every
calibration batch twice per group (dense, then partially compressed) to pair the rows.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .batches import StopPass, add_rows, batch_mask, run_batch, weighted_rows

SEQUENTIAL = ("off", "inputs", "outputs")
DEFAULT_DAMPING = 0.1  # the "outputs" fit's pull towards the dense weight, x mean(diag A)
Build = Callable[..., nn.Module]  # (module, spec, data=...) -> the plan's layer: surgery.build_layer


class PairStats:
    """Streaming float64 sums over input rows of one layer: ``gram_hat`` = sum x^ x^^T,
    ``total_hat`` = sum x^, ``abs_hat`` = sum |x^|, and with dense rows paired,
    ``cross`` = sum x^ x^T, ``gram`` = sum x x^T, ``total`` = sum x; ``samples`` rows (rows
    weighted as ``weighting`` says, ``samples`` then the sum of the weights)."""

    def __init__(self, n: int, paired: bool, device: Any = None, weighting: str = "token") -> None:
        f64 = dict(dtype=torch.float64, device=device)
        self.gram_hat, self.total_hat, self.abs_hat = torch.zeros(n, n, **f64), torch.zeros(n, **f64), \
            torch.zeros(n, **f64)
        self.paired = paired
        if paired:
            self.cross, self.gram, self.total = torch.zeros(n, n, **f64), torch.zeros(n, n, **f64), \
                torch.zeros(n, **f64)
        self.samples: float = 0
        self.weighting = weighting

    def add(self, x_hat: Tensor, x: Tensor | None, mask: Tensor | None) -> None:
        """Add the rows of ``x_hat`` (and the same rows of the dense ``x``), padding dropped."""
        xh, w = weighted_rows(x_hat, mask, self.weighting)
        self.samples += add_rows(self.gram_hat, self.total_hat, self.abs_hat, xh, w, self.weighting)
        if self.paired:
            if x is None or tuple(x.shape) != tuple(x_hat.shape):
                raise ValueError("sequential calibration: the dense and the compressed pass gave inputs of "
                                 f"different shapes ({None if x is None else tuple(x.shape)} vs "
                                 f"{tuple(x_hat.shape)}); the model must be deterministic in eval mode")
            xd = weighted_rows(x, mask)[0]
            self.cross.addmm_((xh * w[:, None]).T, xd)
            self.gram.addmm_((xd * w[:, None]).T, xd)
            self.total += w @ xd


def closed_form_target(weight: Tensor, bias: Tensor | None, st: PairStats, damping: float
                       ) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """(W0 (M, N), its bias b0, the metric A + lam I (N, N), the compressed input mean m^):
    the least-squares target of the ``"outputs"`` fit (module docstring), all float64. The
    whitened SVD of W0 in that metric, with b0 + (W0 - W') m^ as bias, is the optimum; b0 =
    b + W m - W0 m^ (None without a bias)."""
    if not st.paired:
        raise ValueError("closed_form_target needs paired statistics (dense rows recorded)")
    if not (isinstance(damping, (int, float)) and not isinstance(damping, bool) and damping >= 0):
        raise ValueError(f"damping must be a number >= 0, got {damping!r}")
    n = max(st.samples, 1)
    w = weight.detach().double()
    a, c = st.gram_hat, st.cross
    mu_hat = mu = None
    if bias is not None:
        mu_hat, mu = st.total_hat / n, st.total / n
        a = a - n * torch.outer(mu_hat, mu_hat)
        c = c - n * torch.outer(mu_hat, mu)
    lam = float(damping) * float(a.diagonal().mean())
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    metric = a + lam * eye
    rhs = (c + lam * eye) @ w.T  # (N, M)
    if lam > 0:
        w0 = torch.linalg.solve(metric, rhs).T
    else:  # least squares with the minimum norm where A is singular
        w0 = torch.linalg.lstsq(metric.cpu(), rhs.cpu(), driver="gelsd").solution.T.to(w)
    b0 = None if bias is None else bias.detach().double() + w @ mu - w0 @ mu_hat
    return w0, b0, metric, mu_hat


def fit_output_error(layer_weight: Tensor, weight: Tensor, st: PairStats, centred: bool) -> float:
    """sqrt(sum ||W' x^ + b' - W x - b||^2 / sum ||W (x - m)||^2) of a fitted W' (bias b'
    absorbing the mean, when ``centred``) from the paired sums: the relative output error
    the ``"outputs"`` fit achieved on the calibration rows (damping term left out)."""
    n = max(st.samples, 1)
    wp, w = layer_weight.detach().double(), weight.detach().double()
    a, c, g = st.gram_hat, st.cross, st.gram
    if centred:
        mh, m = st.total_hat / n, st.total / n
        a, c, g = a - n * torch.outer(mh, mh), c - n * torch.outer(mh, m), g - n * torch.outer(m, m)
    ref = float(torch.einsum("ij,jk,ik->", w, g, w))
    err = float(torch.einsum("ij,jk,ik->", wp, a, wp)) - 2 * float(torch.einsum("ij,jk,ik->", wp, c, w)) + ref
    return (max(err, 0.0) / ref) ** 0.5 if ref > 0 else 0.0


def variant_options(variant: str, abs_mean: Tensor, alpha: float, row_weights: Tensor | None) -> dict[str, Any]:
    """What a data-aware ``variant`` adds to ``LowRankLinear.from_dense``'s gram / input_mean:
    ASVD's ``scale`` (the mean |x| per input channel) and ``alpha``, FWSVD's ``row_weights``
    (without them the layer is whitened), nothing for ``whiten``."""
    if variant == "asvd":
        return {"scale": abs_mean, "alpha": alpha}
    if variant == "fwsvd" and row_weights is not None:
        return {"row_weights": row_weights}
    return {}


def fit_layer(lin: nn.Linear, spec: Any, st: PairStats | None, mode: str, *, build: Build,
              variant: str = "whiten", alpha: float = 0.5, damping: float = DEFAULT_DAMPING,
              row_weights: Tensor | None = None) -> nn.Module:
    """The plan's factorised layer for ``lin`` (``spec``: its LayerSpec) fitted on ``st``
    (``"inputs"``: whitened SVD on the compressed inputs; ``"outputs"``: the closed-form
    update; ``variant="asvd"``: ASVD scaling by the compressed inputs' mean |x^| instead of
    whitening; ``variant="fwsvd"`` with ``row_weights``: FWSVD's row weighting). Without
    statistics (the layer never ran) a plain SVD, as ``compress`` does.
    ``build(module, spec, data=...)``: the plan's layer builder (``surgery.build_layer``)."""
    from .tensor import rel_error

    if st is None or st.samples == 0:
        return build(lin, spec)
    n = st.samples
    extra = variant_options(variant, st.abs_hat / n, alpha, row_weights)
    if mode == "inputs":
        return build(lin, spec, data={"gram": st.gram_hat / n, "input_mean": st.total_hat / n, **extra})
    w0, b0, metric, mu_hat = closed_form_target(lin.weight, lin.bias, st, damping)
    target = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
    target.to(device=lin.weight.device, dtype=lin.weight.dtype)
    with torch.no_grad():
        target.weight.copy_(w0)
        if b0 is not None:
            target.bias.copy_(b0)
    # from_dense whitens by gram - m^ m^T (with a bias): hand it (A + lam I) / n + m^ m^T
    gram = metric / n + (torch.outer(mu_hat, mu_hat) if mu_hat is not None else 0)
    layer = build(target, spec, data={"gram": gram, "input_mean": mu_hat, **extra})
    approx = layer.project_out.weight.detach().double() @ layer.project_in.weight.detach().double()
    layer.approx_error = rel_error(lin.weight.detach().double(), approx)
    layer.output_error = fit_output_error(approx, lin.weight, st, centred=lin.bias is not None)
    return layer


def call_order(model: nn.Module, batch: Any, names: Sequence[str], device: Any) -> tuple[list[list[str]], dict]:
    """Groups of ``names`` (modules of ``model``) in the order ``model`` first calls them on
    ``batch``: modules called with the same input tensor share a group. Also the number of
    calls per forward of each reached module (unreached names are left out)."""
    order: list[tuple[str, int]] = []
    calls: dict[str, int] = {}
    keep: list[Tensor] = []  # inputs stay alive so their ids are not reused during the pass

    def hook(_m, args, name):
        calls[name] = calls.get(name, 0) + 1
        if calls[name] == 1 and args and isinstance(args[0], Tensor):
            keep.append(args[0])
            order.append((name, id(args[0])))

    mods = {n: model.get_submodule(n) for n in names}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)) for n, m in mods.items()]
    try:
        with torch.no_grad():
            run_batch(model, batch, device)
    finally:
        for h in hooks:
            h.remove()
    groups: dict[int, list[str]] = {}
    for name, key in order:
        groups.setdefault(key, []).append(name)
    return list(groups.values()), calls


def _capture(model: nn.Module, batch: Any, mods: Mapping[str, nn.Module], calls: Mapping[str, int],
             device: Any) -> dict[str, list[Tensor]]:
    """Every input the modules ``mods`` get while ``model`` runs on ``batch``; the pass stops
    once each has had its ``calls`` inputs."""
    got: dict[str, list[Tensor]] = {n: [] for n in mods}

    def hook(_m, args, name):
        got[name].append(args[0].detach())
        if all(len(got[n]) >= calls[n] for n in mods):
            raise StopPass

    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)) for n, m in mods.items()]
    try:
        with torch.no_grad():
            run_batch(model, batch, device)
    except StopPass:
        pass
    finally:
        for h in hooks:
            h.remove()
    return got


class _Replaced:
    """While active, every module ``m`` of ``mapping`` returns ``mapping[m]``'s output
    instead of its own (a forward hook: the model itself is never changed)."""

    def __init__(self, mapping: Mapping[nn.Module, nn.Module]):
        self.mapping, self.hooks = mapping, []

    def __enter__(self) -> "_Replaced":
        for old, new in self.mapping.items():
            self.hooks.append(old.register_forward_hook(lambda _m, args, _out, new=new: new(*args)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []


def sequential_layers(model: nn.Module, specs: Sequence[Any], batches: Sequence[Any], mode: str, *,
                      variant: str = "whiten", alpha: float = 0.5, damping: float = DEFAULT_DAMPING,
                      row_weights: Mapping[str, Tensor] | None = None, weighting: str = "token", build: Build,
                      progress: bool = False) -> dict[str, nn.Module]:
    """The factorised layer of every spec in ``specs`` (the plan's compressed layers; ``model``
    dense, left as it was): SVD Linears fitted sequentially on ``batches`` with ``mode``
    (``"inputs"`` | ``"outputs"``, see the module docstring), every other layer built by
    ``build(module, spec)`` (``surgery.build_layer``, which also builds the fitted ones) and
    already in effect (by forward hooks; ``model`` is never changed) for the passes that fit
    the layers after it. ``weighting``: how the input rows count (``tensorslim.calibration.calibrate``)."""

    if mode not in SEQUENTIAL[1:]:
        raise ValueError(f"sequential_layers: mode must be one of {SEQUENTIAL[1:]}, got {mode!r}")
    if not batches:
        raise ValueError("sequential_layers: no calibration batches; give a non-empty list of model inputs")
    dense = {s.name: model.get_submodule(s.name) for s in specs}
    fitted = [s.name for s in specs if s.method == "svd" and type(dense[s.name]) is nn.Linear]
    by_name = {s.name: s for s in specs}
    new = {n: build(dense[n], by_name[n]) for n in dense if n not in fitted}
    p = next(model.parameters(), None)
    device = p.device if p is not None else None
    was_training = model.training
    model.eval()
    try:
        groups, calls = call_order(model, batches[0], fitted, device)
        for group in tqdm(groups, desc=f"sequential calibration ({mode})", disable=not progress):
            stats = _group_stats(model, batches, {n: dense[n] for n in group}, calls, new, dense, mode, device,
                                 weighting)
            for n in group:
                new[n] = fit_layer(dense[n], by_name[n], stats[n], mode, build=build, variant=variant,
                                   alpha=alpha, damping=damping, row_weights=(row_weights or {}).get(n))
        for n in fitted:  # never called on the calibration batches: plain SVD
            if n not in new:
                new[n] = build(dense[n], by_name[n])
    finally:
        model.train(was_training)
    return new


def _group_stats(model, batches, mods, calls, new, dense, mode, device, weighting="token") -> dict[str, PairStats]:
    """Per module of one group: its input sums with every layer in ``new`` swapped in (and,
    for ``"outputs"``, the dense model's inputs of the same rows)."""
    paired = mode == "outputs"
    stats = {n: PairStats(m.in_features, paired, device, weighting) for n, m in mods.items()}
    swap_in = {dense[n]: layer for n, layer in new.items()}
    for b in batches:
        mask = batch_mask(b)
        ref = _capture(model, b, mods, calls, device) if paired else None
        with _Replaced(swap_in):
            got = _capture(model, b, mods, calls, device)
        for n in mods:
            for k, x_hat in enumerate(got[n]):
                stats[n].add(x_hat, ref[n][k] if paired else None, mask)
    return stats
