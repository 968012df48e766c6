"""Per-layer rank sweeps (Cao 2022, the seed experiment): compress ONE layer at a time (the
rest of the model stays dense) at every rank, with CP and Tucker-2, and measure

- the parameter reduction of the layer (dense params / factorized params),
- the measured latency speed-up of the layer alone (dense vs factorized, on its traced input
  shape at ``latency_batch``, median of repeats),
- the relative weight approximation error ||W - W^|| / ||W||,
- the model's test accuracy without fine-tuning and after a short fine-tune (distilled from
  the dense model).

Results go to ``sweep.csv`` (rewritten atomically after every point, so a long sweep can be
read while it runs) and one four-panel PNG per layer (``sweep_<layer>.png``).
"""
from __future__ import annotations

import copy
import csv
import io
import os
import re
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .configs import check_int, resolve
from .cost import count, measure_latency
from .files import atomic_write, write_text_atomic
from .plan import CompressionPlan, LayerSpec
from .surgery import compress

SWEEP_METHODS = ("cp", "tucker", "svd")
COLUMNS = ("layer", "method", "rank", "params_dense", "params_factorized", "param_reduction",
           "latency_dense_ms", "latency_factorized_ms", "speedup", "approx_error", "acc_dense",
           "acc_compressed", "acc_finetuned")
CSV_NAME = "sweep.csv"


@dataclass(frozen=True)
class SweepRow:
    """One (layer, method, rank) point of a sweep; accuracies in [0, 1], None when not run.

    ``rank`` is the requested rank; Tucker-2 uses (min(rank, S), min(rank, T)) for a layer
    with S input and T output channels. ``param_reduction`` = params_dense /
    params_factorized and ``speedup`` = latency_dense_ms / latency_factorized_ms.
    """

    layer: str
    method: str
    rank: int
    params_dense: int
    params_factorized: int
    param_reduction: float
    latency_dense_ms: float
    latency_factorized_ms: float
    speedup: float
    approx_error: float
    acc_dense: float | None
    acc_compressed: float | None
    acc_finetuned: float | None


@dataclass(frozen=True)
class _Point:
    """A validated sweep point: the one-layer plan to apply."""

    layer: str
    method: str
    rank: int
    plan: CompressionPlan


def layer_rank(module: nn.Module, method: str, rank: int) -> int | tuple[int, int]:
    """The rank a sweep uses for ``module``: an int (cp, svd) or (r_in, r_out) clipped to the
    channels (tucker)."""
    if method != "tucker":
        return rank
    return (min(rank, module.in_channels), min(rank, module.out_channels))


def _check_lists(layers: Sequence[str], ranks: Sequence[int], methods: Sequence[str]) -> None:
    if isinstance(layers, str) or not layers or not all(isinstance(n, str) for n in layers):
        raise ValueError(f"layers must be a non-empty list of layer names, got {layers!r}")
    if isinstance(ranks, (str, int)) or not ranks or not all(
            isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks):
        raise ValueError(f"ranks must be a non-empty list of positive ints, got {ranks!r}")
    if isinstance(methods, str) or not methods:
        raise ValueError(f"methods must be a non-empty list from {SWEEP_METHODS}, got {methods!r}")
    bad = [m for m in methods if m not in SWEEP_METHODS]
    if bad:
        raise ValueError(f"unknown sweep method(s) {bad}; known: {', '.join(SWEEP_METHODS)}")
    for what, seq in (("layers", layers), ("ranks", ranks), ("methods", methods)):
        if len(set(seq)) != len(seq):
            raise ValueError(f"{what} has duplicates: {list(seq)!r}")


@dataclass(frozen=True)
class SweepOptions:
    """What :func:`run_sweep` sweeps and how it measures.

    ``layers`` (qualified names) x ``methods`` x ``ranks``, one layer compressed at a time.
    Latency: each layer alone on its traced input shape at batch ``latency_batch``, with
    ``threads`` threads (None: torch's current setting), median of ``repeats`` calls after
    ``warmup``. ``finetune_steps > 0``: that many SGD steps (lr ``finetune_lr``, distilled
    from the dense model) after compressing. ``out_dir``: where the CSV and the per-layer
    plots go (None: nowhere). Lists are kept as tuples."""

    layers: tuple[str, ...]
    ranks: tuple[int, ...]
    methods: tuple[str, ...] = ("cp", "tucker")
    finetune_steps: int = 0
    finetune_lr: float = 0.01
    latency_batch: int = 64
    threads: int | None = None
    repeats: int = 20
    warmup: int = 3
    out_dir: str | os.PathLike[str] | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        _check_lists(self.layers, self.ranks, self.methods)
        for name in ("layers", "ranks", "methods"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name, low in (("finetune_steps", 0), ("latency_batch", 1), ("repeats", 1),
                          ("warmup", 0), ("threads", 1)):
            check_int(name, getattr(self, name), low, none_ok=name == "threads")
        if isinstance(self.finetune_lr, bool) or not isinstance(self.finetune_lr, (int, float)) \
                or not self.finetune_lr > 0:
            raise ValueError(f"finetune_lr must be a number > 0, got {self.finetune_lr!r}")


def plan_points(model: nn.Module, layers: Sequence[str], ranks: Sequence[int],
                methods: Sequence[str], example_inputs: Any) -> list[_Point]:
    """Validate every (layer, method, rank) up front and build its one-layer plan, so a bad
    rank fails before hours of sweeping rather than in the middle."""
    from .layers import layer_for

    _check_lists(layers, ranks, methods)
    report = count(model, example_inputs)
    counted = {lc.name: lc for lc in report.layers}
    modules = dict(model.named_modules())
    points = []
    for name in layers:
        if name not in counted or not counted[name].out_shape:
            convs = [lc.name for lc in report.layers if lc.out_shape and lc.type.startswith("Conv")]
            raise ValueError(f"layer {name!r} is not a conv/Linear layer called by the example "
                             f"input; accepted conv layers: {', '.join(convs)}")
        lc, mod = counted[name], modules[name]
        for method in methods:
            try:
                cls = layer_for(method, mod)
            except ValueError as e:
                raise ValueError(f"layer {name}: {e}") from None
            for r in ranks:
                rank = layer_rank(mod, method, r)
                try:
                    p, m = cls.cost(mod, rank, lc.in_shape[1:], lc.out_shape[1:])
                except (ValueError, TypeError) as e:
                    raise ValueError(f"layer {name}, method {method}, rank {r}: {e}") from None
                batch = lc.in_shape[0]
                spec = LayerSpec(name=name, layer_type=lc.type, method=method, rank=rank,
                                 params_before=lc.params, params_after=int(p),
                                 macs_before=lc.macs, macs_after=int(m) * batch,
                                 in_shape=lc.in_shape, out_shape=lc.out_shape, reason="rank sweep")
                plan = CompressionPlan(layers=(), method=method, goal={"sweep_rank": r},
                                       params_before=report.total_params,
                                       params_after=report.total_params,
                                       macs_before=report.total_macs, macs_after=report.total_macs)
                points.append(_Point(name, method, r, plan.with_layers((spec,))))
    return points


def run_sweep(model: nn.Module, options: SweepOptions | Mapping[str, Any] | None = None, *,
              test_loader: Iterable | None = None, train_loader: Iterable | None = None,
              example_inputs: torch.Tensor | None = None, **settings: Any) -> list[SweepRow]:
    """Sweep ``ranks`` x ``methods`` for each of ``layers``, one layer compressed at a time;
    ``model`` (dense, trained) is left untouched.

    ``options`` (a :class:`SweepOptions`, a mapping of its fields, or None) and ``settings``
    (its fields by keyword, overriding ``options``) say what to sweep:
    ``run_sweep(model, layers=["features.3"], ranks=[4, 8], example_inputs=x)``.
    ``example_inputs`` (1, C, H, W) traces each layer's input shape. Accuracies use
    ``test_loader`` (skipped, None, when it is None); fine-tuning batches come from
    ``train_loader``. Returns one row per (layer, method, rank).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"run_sweep expects an nn.Module, got {type(model).__name__}")
    opts = resolve(SweepOptions, options, settings, "run_sweep")
    if example_inputs is None:
        raise TypeError("run_sweep: example_inputs is required (a (1, C, H, W) input that "
                        "traces each layer's input shape)")
    if opts.finetune_steps and train_loader is None:
        raise ValueError("finetune_steps > 0 needs a train_loader")
    points = plan_points(model, opts.layers, opts.ranks, opts.methods, example_inputs)
    out = Path(opts.out_dir) if opts.out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    ctx = _Context(model, test_loader, train_loader, opts)
    rows: list[SweepRow] = []
    bar = tqdm(points, desc="sweep", disable=not opts.progress, dynamic_ncols=True)
    for pt in bar:
        bar.set_postfix_str(f"{pt.layer} {pt.method} r={pt.rank}")
        rows.append(ctx.run_point(pt))
        if out is not None:
            write_csv(rows, out / CSV_NAME)
    bar.close()
    if out is not None:
        plot_sweep(rows, out, finetune_steps=opts.finetune_steps)
    return rows


class _Context:
    """What every sweep point shares: the dense model, its accuracy, loaders, timings."""

    def __init__(self, model: nn.Module, test: Iterable | None, train: Iterable | None,
                 opts: SweepOptions) -> None:
        from .train import evaluate

        self.model, self.test, self.train, self.o = model, test, train, opts
        self.acc_dense = evaluate(model, test)["accuracy"] if test is not None else None
        self.teacher = copy.deepcopy(model).eval() if opts.finetune_steps else None
        self._dense_ms: dict[str, float] = {}

    def _latency(self, module: nn.Module, spec: LayerSpec) -> float:
        dev = next(module.parameters()).device
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((self.o.latency_batch, *spec.in_shape[1:]), generator=gen).to(dev)
        return measure_latency(module, x, repeats=self.o.repeats, warmup=self.o.warmup,
                               threads=self.o.threads).median_ms

    def run_point(self, pt: _Point) -> SweepRow:
        from .train import evaluate, fine_tune

        spec = pt.plan.layers[0]
        dense = self.model.get_submodule(pt.layer)
        if pt.layer not in self._dense_ms:
            self._dense_ms[pt.layer] = self._latency(dense, spec)
        student = compress(copy.deepcopy(self.model), pt.plan, progress=False).eval()
        layer = student.get_submodule(pt.layer)
        p_dense = sum(p.numel() for p in dense.parameters())
        p_fact = sum(p.numel() for p in layer.parameters())
        fact_ms = self._latency(layer, spec)
        acc_c = acc_f = None
        if self.test is not None:
            acc_c = evaluate(student, self.test)["accuracy"]
        if self.o.finetune_steps:
            dev = next(student.parameters()).device
            fine_tune(student, self.train, steps=self.o.finetune_steps, lr=self.o.finetune_lr,
                      teacher=self.teacher, progress=False, log_every=0, device=dev)
            if self.test is not None:
                acc_f = evaluate(student, self.test)["accuracy"]
        dense_ms = self._dense_ms[pt.layer]
        return SweepRow(pt.layer, pt.method, pt.rank, p_dense, p_fact, p_dense / p_fact,
                        dense_ms, fact_ms, dense_ms / fact_ms, float(layer.approx_error),
                        self.acc_dense, acc_c, acc_f)


def rows_to_csv(rows: Sequence[SweepRow]) -> str:
    """CSV text with the header :data:`COLUMNS` (None -> empty cell)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in astuple(r)])
    return buf.getvalue()


def write_csv(rows: Sequence[SweepRow], path: str | os.PathLike) -> Path:
    """Write ``rows`` as CSV atomically."""
    return write_text_atomic(path, rows_to_csv(rows))


def read_csv(path: str | os.PathLike) -> list[SweepRow]:
    """Read a sweep CSV written by :func:`write_csv` back into rows."""
    types = {f.name: f.type for f in fields(SweepRow)}
    out = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ValueError(f"{path}: columns {reader.fieldnames} are not the sweep columns {list(COLUMNS)}")
        for d in reader:
            vals = {}
            for k, v in d.items():
                t = types[k]
                vals[k] = (None if v == "" else float(v)) if "None" in t else \
                    int(v) if t == "int" else float(v) if t == "float" else v
            out.append(SweepRow(**vals))
    return out


def sweep_table(rows: Sequence[SweepRow]) -> str:
    """A plain-text table of the sweep (accuracies in %)."""
    pct = lambda a: "-" if a is None else f"{100 * a:.2f}"  # noqa: E731
    head = f"{'layer':16s} {'method':7s} {'rank':>5s} {'params':>17s} {'reduct':>7s} " \
           f"{'ms dense->fact':>17s} {'speedup':>7s} {'error':>7s} {'acc':>6s} {'acc_c':>6s} {'acc_ft':>6s}"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r.layer:16s} {r.method:7s} {r.rank:5d} {r.params_dense:>8,d}->{r.params_factorized:<8,d} "
            f"{r.param_reduction:6.2f}x {r.latency_dense_ms:8.3f}->{r.latency_factorized_ms:<8.3f} "
            f"{r.speedup:6.2f}x {r.approx_error:7.4f} {pct(r.acc_dense):>6s} {pct(r.acc_compressed):>6s} "
            f"{pct(r.acc_finetuned):>6s}")
    return "\n".join(lines)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


_COLORS = {"cp": "#c44", "tucker": "#27a", "svd": "#7a2"}


def plot_sweep(rows: Sequence[SweepRow], out_dir: str | os.PathLike, *,
               finetune_steps: int = 0) -> list[Path]:
    """One figure per layer, four panels vs rank (one line per method): parameter
    reduction, speed-up, approximation error, accuracy before (solid) / after (dashed)
    fine-tuning. Written atomically as ``out_dir/sweep_<layer>.png``; returns the paths."""
    out = Path(out_dir)
    paths = []
    for layer in dict.fromkeys(r.layer for r in rows):
        sub = [r for r in rows if r.layer == layer]
        paths.append(_plot_layer(layer, sub, out / f"sweep_{_safe(layer)}.png", finetune_steps))
    return paths


def _plot_layer(layer: str, rows: Sequence[SweepRow], path: Path, steps: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    panels = [("parameter reduction (x)", "param_reduction"), ("speed-up (x)", "speedup"),
              ("approximation error", "approx_error")]
    methods = list(dict.fromkeys(r.method for r in rows))
    for ax, (title, key) in zip(axes, panels):
        for m in methods:
            pts = sorted((r.rank, getattr(r, key)) for r in rows if r.method == m)
            ax.plot(*zip(*pts), "o-", color=_COLORS.get(m), label=m)
        if key != "approx_error":
            ax.axhline(1.0, color="#999", lw=0.8, ls=":")
        ax.set_title(title)
    ax = axes[3]
    for m in methods:
        sub = sorted((r for r in rows if r.method == m), key=lambda r: r.rank)
        if sub and sub[0].acc_compressed is not None:
            ax.plot([r.rank for r in sub], [100 * r.acc_compressed for r in sub], "o-",
                    color=_COLORS.get(m), label=f"{m}, no fine-tune")
        if sub and sub[0].acc_finetuned is not None:
            ax.plot([r.rank for r in sub], [100 * r.acc_finetuned for r in sub], "s--",
                    color=_COLORS.get(m), label=f"{m}, +{steps} steps fine-tune")
    if rows and rows[0].acc_dense is not None:
        ax.axhline(100 * rows[0].acc_dense, color="#555", lw=1, ls=":", label="dense")
    ax.set_title("test accuracy (%)")
    if not ax.lines:
        ax.text(0.5, 0.5, "accuracy not measured", ha="center", va="center", transform=ax.transAxes)
    ranks = sorted({r.rank for r in rows})
    for ax in axes:
        ax.set_xlabel("rank R")
        if ranks and ranks[-1] / ranks[0] >= 8:
            ax.set_xscale("log", base=2)
            ax.minorticks_off()
        ax.set_xticks(ranks, [str(r) for r in ranks], fontsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"rank sweep of {layer}", fontsize=10)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
