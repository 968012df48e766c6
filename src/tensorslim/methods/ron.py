"""RON: reduced-order modelling of a network's activations with maximum-volume sampling
(Gusak et al. 2021, "Reduced-Order Modeling of Deep Neural Networks"; seed talk 003).

For the layers after a cut, ``z_k = pool_k(psi_k(A_k z_{k-1} + b_k))`` (``A_k`` a conv or
Linear with its BatchNorm, computed through the modules themselves, never as a matrix), each
activation is assumed to lie near a low-dimensional space, ``z_k ~= V_k c_k`` with ``V_k``
(D_k, r_k) the leading left singular vectors of its values on calibration inputs. Rows
``S_k`` (P_k >= r_k of them) are picked by rectangular maxvol on ``V_k``, so
``c_k ~= (S_k V_k)^+ S_k z_k`` and the network runs on the P_k sampled values only:

    s_0 = S_0 z_0,   s_k = pool_g(psi_k(S^g_k A_k U_{k-1} s_{k-1} + S^g_k b_k)),
    U_k = V_k (S_k V_k)^+,   logits = A_K U_{K-1} s_{K-1} + b_K,

where ``S^g_k`` samples, for every kept pooled position, the g members of its max-pool
window (ReLU commutes with sampling; the max is taken after sampling, :class:`GroupMax`).
The network output (logits, D_K = classes) is kept whole (V_K = I, S_K = all rows), so the
final projection ``V_K (S_K V_K)^+`` is the identity. Each reduced step is one
``nn.Linear(P_{k-1} -> g P_k)``, so the result is counted exactly by :func:`tensorslim.count`.

Residual blocks are approximated jointly (:mod:`._ron_residual`): a ResNet BasicBlock's
sampled output rows are computed from the sampled rows of both branches,
``s_out = relu(W_2 s_h + W_sc s_in + b)``, so RON can start at any block
(``start_layer="layers.<s>.<b>"``). Scope: the layers before ``start_layer`` stay as they are
(the talk applies RON where it pays: the later blocks and the head). Under a MAC target
without ``start_layer``, a few candidate starts are each reduced from part of the calibration
samples and the one with the smallest logit error on the held-out rest is kept (:func:`ron`). The plan records everything as one ``Edit``
(``ron_tail``: per reduced layer the kept dimension, rows, sampled positions and MACs), which
:func:`tensorslim.load` replays to the right shapes; the reduced weights depend on the
calibration data, so replaying the plan on a dense model with weights is refused.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ..cost import as_tuple, count
from ..plan import CompressionPlan, Edit
from ..surgery import register_edit
from ..tensor.maxvol import rect_maxvol
from . import _ron_residual as res_lib
from . import _ron_tail as tail_lib
from .registry import Pipeline, register_pipeline

__all__ = ["RONResult", "ron"]

OP = "ron_tail"
START_SHARE = 0.5  # reference start: the latest cut whose dense prefix costs <= this share of the budget
START_OFFSETS = (0, 1, 2)  # default candidates under a MAC target: the reference start and later ones
HOLDOUT = 0.25  # share of the calibration samples that scores the candidate starts


@dataclass(frozen=True)
class RONResult:
    """The reduced model, its plan (one ``ron_tail`` edit) and ``history``: ``start``,
    ``energy`` (kept share of every activation's squared singular values, when chosen from
    ``target_macs``), ``ranks``/``rows`` per reduced layer, ``calib_samples`` and
    ``calib_rel_error`` (||logits - dense logits|| / ||dense logits|| on the calibration
    inputs), ``start_scores`` (candidate start -> held-out relative logit error, None where the
    target is not reachable from it; None when the start was not chosen by score) and
    ``holdout_samples``, plus the fine-tuning record when ``finetune_steps > 0``."""

    model: nn.Module
    plan: CompressionPlan
    history: dict[str, Any] = field(default_factory=dict)


def _build_tail(args: Mapping[str, Any]) -> nn.Sequential:
    """The reduced modules an edit's args describe (weights uninitialised)."""
    mods: list[nn.Module] = [tail_lib.Gather(args["sampled"])]
    layers = list(args["layers"])
    for k, layer in enumerate(layers):
        if k + 1 < len(layers) and int(layers[k + 1].get("skip_features", 0)):
            continue  # the inner half of a residual block, built with the next entry
        if int(layer.get("skip_features", 0)):
            if k == 0:
                raise ValueError(f"edit {OP}: the first layer entry cannot have a skip input")
            mods.append(res_lib.build_block(layers[k - 1], layer, f"edit {OP}"))
            continue
        mods.append(nn.Linear(int(layer["in_features"]), int(layer["out_features"])))
        if layer["act"]:
            mods.append(nn.ReLU())
        if int(layer["group"]) > 1:
            mods.append(tail_lib.GroupMax(int(layer["group"])))
    return nn.Sequential(*mods)


def _replay(model: nn.Module, edit: Edit, weights: bool) -> None:
    if weights:
        raise ValueError(f"edit {OP} on {edit.target!r}: RON's reduced weights come from "
                         f"calibration data and cannot be rebuilt from the dense model; load the "
                         f"checkpoint with tensorslim.load, or run methods.ron.ron again")
    start = edit.args.get("start")
    tail_lib.check_start(model, start, f"edit {OP}", blocks=True, first_block=True)
    if edit.target != tail_lib.head_name(model) or not edit.args.get("layers"):
        raise ValueError(f"edit {OP}: target {edit.target!r} / args do not fit this "
                         f"{type(model).__name__} (expected target {tail_lib.head_name(model)!r})")
    tail_lib.install_cut(model, start, _build_tail(edit.args))


register_edit(OP, _replay)


def _check(target_macs: Any, ranks: Any, oversample: Any, max_samples: Any) -> None:
    if (target_macs is None) == (ranks is None):
        raise ValueError(f"ron: give exactly one of target_macs or ranks, got "
                         f"target_macs={target_macs!r}, ranks={ranks!r}")
    if target_macs is not None and (isinstance(target_macs, bool) or not isinstance(
            target_macs, (int, float)) or not 0 < target_macs <= 1):
        raise ValueError(f"ron: target_macs must be a fraction of the dense MACs in (0, 1], "
                         f"got {target_macs!r}")
    if isinstance(oversample, bool) or not isinstance(oversample, (int, float)) or oversample < 1:
        raise ValueError(f"ron: oversample must be a number >= 1 (rows P_k = ceil(oversample * "
                         f"r_k)), got {oversample!r}")
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise ValueError(f"ron: max_samples must be a positive int, got {max_samples!r}")


def _inputs(calibration: Any):
    """Model inputs from ``calibration`` (tensors, or (x, y) batches: x is used)."""
    if isinstance(calibration, torch.Tensor):
        raise TypeError("ron: calibration must be an iterable of input batches (B, ...), "
                        "not one tensor; wrap it in a list")
    for b in calibration:
        yield b[0] if isinstance(b, (tuple, list)) else b


def _share_start(model: nn.Module, dense_macs: Mapping[str, int], budget: float) -> str:
    """The latest start whose dense prefix costs at most ``START_SHARE`` of ``budget``."""
    names = tail_lib.starts(model, "ron", blocks=True, first_block=True)
    total = sum(dense_macs.values())
    best = names[0]
    for name in names:
        if total - tail_lib.tail_macs(model, name, dense_macs) <= START_SHARE * budget:
            best = name
    return best


def _start_candidates(model: nn.Module, dense_macs: Mapping[str, int], budget: float) -> list[str]:
    """The starts tried by default under a MAC target, in forward order: the
    ``START_SHARE`` start moved by each of ``START_OFFSETS``, where the dense prefix leaves
    part of the budget for the reduced layers."""
    names = tail_lib.starts(model, "ron", blocks=True, first_block=True)
    total = sum(dense_macs.values())
    i = names.index(_share_start(model, dense_macs, budget))
    picked = sorted({i + o for o in START_OFFSETS if 0 <= i + o < len(names)})
    ok = [names[j] for j in picked if total - tail_lib.tail_macs(model, names[j], dense_macs) < budget]
    return ok or [names[i]]


def _reduced_weights(steps, in_shapes, U_prev, sel, windows):
    """(weight, bias, skip weight or None) of every reduced step: rows of A_k U_k and b_k,
    computed by running the step's modules on U_k's columns (and on zero for the bias); a
    residual step adds its shortcut's rows of A_sc U_{k-1} (and the shortcut's bias)."""
    out = []
    for k, st in enumerate(steps):
        cols, bias = res_lib.run_affine(st["modules"], U_prev[k], in_shapes[k])
        rows = windows[k][sel[k]].flatten() if windows[k] is not None else sel[k]
        w, b, ws = cols[rows].contiguous(), bias[rows], None
        if st["skip"] is not None:
            sc_cols, sc_bias = res_lib.run_affine(st["skip"], U_prev[k - 1], in_shapes[k - 1])
            ws, b = sc_cols[rows].contiguous(), b + sc_bias[rows]
        out.append((w, b, ws))
    return out


def ron(model: nn.Module, example_inputs: Any, *, calibration: Any,
        ranks: Any = None, target_macs: float | None = None, start_layer: str | None = None,
        oversample: float = 2.0, max_samples: int = 1024, train_loader: Any = None,
        finetune_steps: int = 0, finetune_lr: float = 0.002, progress: bool = True,
        seed: int = 0) -> RONResult:
    """Reduce the layers of a copy of ``model`` (a registry VGG or ResNet, left untouched)
    from ``start_layer`` on to RON form; returns :class:`RONResult`.

    ``example_inputs``: a tensor (B, C, H, W) (its first sample prices the plan, per sample).
    ``calibration``: an iterable of input batches (B, C, H, W) (or (x, y) batches), of which
    the first ``max_samples`` samples give the activation bases. Goal, exactly one of:
    ``target_macs`` (a fraction of the dense MACs: one kept-energy share of the activations'
    squared singular values for all layers, the largest that fits) or ``ranks`` (``"full"``:
    V_k = I and every row, the exact network; an int, a fraction in (0, 1] of each activation's
    available rank, a list with one value per reduced activation or a mapping name -> value;
    a ResNet block gives two activations, named ``layers.<s>.<b>.conv1`` (its branch's inner
    activation) and ``layers.<s>.<b>`` (its output)).
    ``oversample``: rows P_k = ceil(oversample * r_k). ``start_layer``: the first replaced
    module, ``features.<i>`` (a VGG conv), ``layers.<s>.<b>`` (a ResNet block: every block from
    there on is reduced jointly over both branches) or ``pool``. Default with ``ranks``: the
    latest start whose dense prefix costs at most half the MACs; with ``target_macs``: of the
    candidates (that start, moved by :data:`START_OFFSETS`), the one whose reduced network,
    built from the first ``1 - HOLDOUT`` of the calibration samples, has the smallest relative
    logit error on the rest (``history["start_scores"]``); the chosen start is then rebuilt from
    all samples. ``finetune_steps > 0`` fine-tunes the result on ``train_loader`` (distilling
    from the dense model) with ``finetune_lr`` and ``seed`` (the reduction itself makes no
    random choices). The reduced part is a chain of Linear layers without BatchNorm, so its
    default rate is below ``fine_tune``'s (README: RON on ResNet-20).
    """
    _check(target_macs, ranks, oversample, max_samples)
    dense = copy.deepcopy(model).eval()
    x1 = as_tuple(example_inputs)[0][:1]
    before = count(dense, x1)
    dense_macs = {l.name: l.macs for l in before.layers}
    budget = (target_macs or 1.0) * before.total_macs
    if start_layer is not None:
        cands = [tail_lib.check_start(dense, start_layer, "ron", blocks=True, first_block=True)]
    elif target_macs is None:
        cands = [_share_start(dense, dense_macs, budget)]
    else:
        cands = _start_candidates(dense, dense_macs, budget)
    bar = (lambda it: tqdm(it, desc="ron calibration", leave=False)) if progress else None
    z0 = tail_lib.cut_input(dense, cands[0], _inputs(calibration), max_samples, bar)
    prep = _prepare(dense, cands[0], z0)
    fit = functools.partial(_fit, prep, dense, dense_macs, ranks=ranks, oversample=oversample,
                            budget=budget, total=before.total_macs, progress=progress)
    start, scores = cands[0], None
    n = z0.shape[0]
    n_fit = n - max(1, round(HOLDOUT * n))
    if len(cands) > 1 and n_fit >= 1:
        scores = _score_starts(fit, prep, cands, n_fit)
        prep["svd"].clear()  # the held-out split's bases are not needed any more
        start = min((c for c in cands if scores[c] is not None), key=scores.get, default=cands[-1])
    tail, args, info = fit(start, slice(None))
    student = copy.deepcopy(model)
    tail_lib.install_cut(student, start, tail)
    student.eval()
    zs = prep["zs"][_offset(prep, dense, start):]
    info.update(start=start, start_scores=scores, holdout_samples=None if scores is None else n - n_fit)
    return _finish(model, student, x1, before, args, info, zs, tail,
                   dict(target_macs=target_macs, ranks=ranks), train_loader, finetune_steps,
                   finetune_lr, progress, seed)


def _prepare(dense: nn.Module, start: str, z0: torch.Tensor) -> dict[str, Any]:
    """Everything the reduction from ``start`` (or a later start) needs: the steps, the dense
    activations (N, D_k) on the calibration inputs, shapes, pool windows and an SVD cache."""
    steps = tail_lib.linear_steps(tail_lib.tail_units(dense, start), "ron")
    zs, pre_shapes = tail_lib.activations(steps, z0)
    in_shapes = [tuple(z0.shape[1:])] + [tail_lib.unflat_shape(st, pre) for st, pre in zip(steps, pre_shapes)]
    windows = [tail_lib.pool_windows(st["pool"], pre, "ron") if st["pool"] is not None else None
               for st, pre in zip(steps, pre_shapes)]
    return {"steps": steps, "zs": zs, "in_shapes": in_shapes, "windows": windows, "svd": {}}


def _offset(prep: dict, dense: nn.Module, start: str) -> int:
    """Index of ``start``'s first step among the prepared steps (a later start's steps are a
    suffix of an earlier one's)."""
    n = len(tail_lib.linear_steps(tail_lib.tail_units(dense, start), "ron"))
    return len(prep["steps"]) - n


def _svds(prep: dict, o: int, part: slice, progress: bool) -> list[torch.Tensor]:
    """Singular values and right vectors ``(S, Vh)`` of the activations z_o..z_{K-1} on the
    samples ``part``, cached per activation and part."""
    key = (part.start, part.stop)
    out = []
    for j in tqdm(range(o, len(prep["zs"]) - 1), desc="ron bases", disable=not progress, leave=False):
        if (j, key) not in prep["svd"]:
            _, sv, vh = torch.linalg.svd(prep["zs"][j][part], full_matrices=False)
            prep["svd"][(j, key)] = (sv, vh)
        out.append(prep["svd"][(j, key)])
    return out


def _fit(prep, dense, dense_macs, start, part, *, ranks, oversample, budget, total, progress):
    """The reduced tail from ``start`` fitted on the calibration samples ``part``: (tail
    module with weights, edit args, history entries)."""
    o = _offset(prep, dense, start)
    steps, zs = prep["steps"][o:], prep["zs"][o:]
    dims = [z.shape[1] for z in zs[:-1]]
    groups = [1] + [tail_lib.group_size(st) for st in steps[:-1]]
    names = ["input"] + [st["label"] for st in steps[:-1]]
    skips = [k for k, st in enumerate(steps) if st["skip"] is not None]
    left = budget - (total - tail_lib.tail_macs(dense, start, dense_macs))
    svds = None if ranks == "full" else _svds(prep, o, part, progress)
    energy, bases, rank_list = _bases(svds, dims, groups, zs[-1].shape[1], ranks, names, oversample,
                                      left, skips, zs[0].dtype)
    rows_n = [tail_lib.rows_for(r, d, oversample) for r, d in zip(rank_list, dims)]
    sel = [torch.arange(d) if ranks == "full" else rect_maxvol(V, p) for V, p, d in zip(bases, rows_n, dims)]
    U = [V @ torch.linalg.pinv(V[s]) for V, s in zip(bases, sel)]
    sel_out = sel[1:] + [torch.arange(zs[-1].shape[1])]
    weights = _reduced_weights(steps, prep["in_shapes"][o:], U, sel_out, prep["windows"][o:])
    args = _edit_args(start, steps, prep["in_shapes"][o], sel, rank_list, dims, groups, weights, dense_macs)
    tail = _build_tail(args).to(zs[0].dtype)
    with torch.no_grad():
        for (lin, skip), (w, b, ws) in zip(_step_linears(tail), weights):
            lin.weight.copy_(w)
            lin.bias.copy_(b)
            if skip is not None:
                skip.weight.copy_(ws)
    return tail, args, {"energy": energy, "ranks": rank_list, "rows": rows_n, "offset": o}


def _score_starts(fit, prep: dict, cands: list[str], n_fit: int) -> dict[str, float | None]:
    """Per candidate start, the relative logit error on the held-out calibration samples
    (from ``n_fit`` on) of the reduced network fitted on the others (None: not reachable)."""
    scores: dict[str, float | None] = {}
    first_err = None
    for c in cands:
        try:
            tail, _, info = fit(c, slice(0, n_fit))
        except ValueError as e:  # the target does not fit after this start's dense prefix
            scores[c], first_err = None, first_err or e
            continue
        zs = prep["zs"]
        scores[c] = _rel_error(tail, zs[info["offset"]][n_fit:], zs[-1][n_fit:])
    if all(v is None for v in scores.values()):
        raise first_err
    return scores


def _rel_error(tail: nn.Module, z_in: torch.Tensor, target: torch.Tensor) -> float:
    """||tail(z_in) - target|| / ||target||."""
    with torch.no_grad():
        approx = tail(z_in.to(next(tail.parameters()).dtype))
    return float(torch.linalg.norm(approx - target) / torch.linalg.norm(target).clamp_min(1e-30))


def _step_linears(tail: nn.Sequential) -> list[tuple[nn.Linear, nn.Linear | None]]:
    """(Linear, skip Linear or None) of every reduced step, in order."""
    out: list[tuple[nn.Linear, nn.Linear | None]] = []
    for m in tail:
        if isinstance(m, nn.Linear):
            out.append((m, None))
        elif isinstance(m, res_lib.ReducedBlock):
            out += [(m.inner, None), (m.outer, m.skip)]
    return out


def _bases(svds, dims, groups, out_dim, ranks, names, oversample, budget, skips, dtype):
    """Energy share, bases V_k (D_k, r_k) and ranks for every reduced activation, from the
    activations' ``svds`` ((S, Vh) each; None for ``ranks="full"``)."""
    if ranks == "full":
        return 1.0, [torch.eye(d, dtype=dtype) for d in dims], list(dims)
    svs = [sv for sv, _ in svds]
    if ranks is None:
        energy, rank_list = tail_lib.energy_for_budget(svs, dims, groups, out_dim, oversample, budget, skips)
        if energy < 0:
            low = tail_lib.reduced_macs([tail_lib.rows_for(1, d, oversample) for d in dims], groups,
                                        out_dim, skips)
            raise ValueError(f"ron: the MAC target is not reachable from this start_layer: rank 1 "
                             f"everywhere already costs {low} MACs in the reduced part, over the "
                             f"{budget:.0f} left after the dense layers before the cut; choose an "
                             f"earlier start_layer or a larger target_macs")
    else:
        energy = None
        rank_list = tail_lib.given_ranks(ranks, names, [len(sv) for sv in svs])
    return energy, [vh[:r].T.contiguous() for (_, vh), r in zip(svds, rank_list)], rank_list


def _edit_args(start, steps, in_shape, sel, rank_list, dims, groups, weights, dense_macs) -> dict:
    layers = []
    for k, st in enumerate(steps):
        w, _, ws = weights[k]
        last = k == len(steps) - 1
        layers.append({"names": list(st["names"]), "act": bool(st["act"]),
                       "group": 1 if last else groups[k + 1],
                       "dim": None if last else dims[k + 1], "rank": None if last else rank_list[k + 1],
                       "rows": int(w.shape[0]) // (1 if last else groups[k + 1]),
                       "sampled": None if last else sel[k + 1].tolist(),
                       "in_features": int(w.shape[1]), "out_features": int(w.shape[0]),
                       "skip_features": 0 if ws is None else int(ws.shape[1]),
                       "macs_before": int(sum(dense_macs.get(n, 0) for n in st["names"])),
                       "macs_after": int(w.numel() + (0 if ws is None else ws.numel()))})
    return {"start": start, "input_shape": list(in_shape), "dim": dims[0], "rank": rank_list[0],
            "sampled": sel[0].tolist(), "layers": layers}


def _finish(model, student, x1, before, args, info, zs, tail, goal, train_loader,
            finetune_steps, finetune_lr, progress, seed) -> RONResult:
    history: dict[str, Any] = {k: info[k] for k in ("start", "energy", "ranks", "rows")}
    history.update(calib_samples=int(zs[0].shape[0]), calib_rel_error=_rel_error(tail, zs[0], zs[-1]),
                   start_scores=info["start_scores"], holdout_samples=info["holdout_samples"])
    if finetune_steps:
        if train_loader is None:
            raise ValueError("ron: finetune_steps > 0 needs a train_loader (labelled batches)")
        from ..train import fine_tune

        history["finetune"] = fine_tune(student, train_loader, steps=finetune_steps, lr=finetune_lr,
                                        teacher=copy.deepcopy(model).eval(), progress=progress, seed=seed)
        student.eval()
    after = count(student, x1)
    goal = {k: v for k, v in goal.items() if v is not None}
    plan = CompressionPlan(layers=(), method="ron", goal=goal, params_before=before.total_params,
                           params_after=after.total_params, macs_before=before.total_macs,
                           macs_after=after.total_macs,
                           edits=(Edit(OP, tail_lib.head_name(student), args),))
    plan = CompressionPlan.from_json(plan.to_json())  # JSON-normal form (tuples), as saved
    return RONResult(student, plan, history)


register_pipeline(Pipeline(
    name="ron", run=ron, summary="RON: activations reduced by SVD bases + maxvol row sampling",
    goals=("target_macs", "ranks"), data="calibration",
    smoke={"ranks": 4, "progress": False, "max_samples": 32}))
