"""The pipelines behind the command line (``tensorslim compress | evaluate | sweep | export``),
so ``cli.py`` only parses arguments. Each is one function of a frozen config. Model sources and
loaders live in :mod:`tensorslim.app.sources`, summary rows and latency in
:mod:`tensorslim.app.summary` (re-exported here).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .app.sources import (Loaded, Source, load_source, test_loader, train_loader,  # noqa: F401
                          validation_evaluator)
from .app.summary import (LATENCY_NOTE, LATENCY_ROUNDS, latency_note, recovered_rows,  # noqa: F401
                          side_by_side_latency, summarize, test_accuracy, with_side_by_side_latency)
from .recover import DEFAULT_RECONSTRUCT_STEPS as RECONSTRUCT_STEPS  # noqa: F401
from .recover import RecoverConfig, resolve_bn_steps, resolve_reconstruct_steps  # noqa: F401
from .report import ModelSummary


@dataclass(frozen=True)
class CompressConfig:
    """``tensorslim compress``: ``goal`` is one of ranks / target_macs / target_params /
    energy (plus include / exclude), passed to :func:`tensorslim.make_plan`."""

    source: Source
    method: str
    goal: Mapping[str, Any] = field(default_factory=dict)
    out_dir: str = "runs/compress"
    finetune_steps: int = 0
    finetune_lr: float = 0.01
    bn_steps: int | None = None  # BatchNorm re-calibration batches (0: off; None: see resolve_bn_steps)
    reconstruct_steps: int | None = None  # data-aware refit batches (0: off; None: see resolve_reconstruct_steps)
    batch_size: int = 128
    latency_batch: int = 64
    threads: int = 2
    test_subset: int | None = None
    seed: int = 0
    val_subset: int = 1000  # validation images for rank_rule="accuracy_drop"
    multi_stage: bool = False  # MUSCO: finetune_steps per stage
    stages: int = 3
    state_dir: str | None = None  # resumable multi-stage runs
    overwrite: bool = False  # replace a tensorslim checkpoint already at out_dir (never other files)

    def recover_config(self) -> RecoverConfig:
        """The recovery after decomposing (per stage with ``multi_stage``), defaults resolved."""
        steps = resolve_reconstruct_steps(self.reconstruct_steps, self.finetune_steps, self.multi_stage)
        return RecoverConfig(reconstruct_steps=steps, bn_steps=resolve_bn_steps(self.bn_steps, steps),
                             finetune_steps=self.finetune_steps, lr=self.finetune_lr, seed=self.seed)

    def __post_init__(self) -> None:
        check_counts("compress", positive=("batch_size", "latency_batch", "threads", "val_subset",
                                           "stages"), non_negative=("finetune_steps", "bn_steps",
                                                                    "reconstruct_steps"), obj=self)
        if self.test_subset is not None:
            check_counts("compress", positive=("test_subset",), obj=self)


def check_counts(where: str, *, obj: Any, positive: Sequence[str] = (),
                 non_negative: Sequence[str] = ()) -> None:
    """Each named int field of ``obj`` (None skipped) is a positive / non-negative int."""
    for names, low in ((positive, 1), (non_negative, 0)):
        for name in names:
            v = getattr(obj, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                raise ValueError(f"{where}: {name} must be an int >= {low}, got {v!r}")


def run_compress(cfg: CompressConfig) -> dict[str, Any]:
    """Plan, compress, recover (refit, BN re-calibration, KD fine-tuning from the dense model),
    compare and save: ``out_dir`` gets the checkpoint (model.safetensors, plan.json, meta.json),
    report.md, summary.png and layers.png. Returns ``{"rows", "plan", "report"}``."""
    from .io import check_save_target, save
    from .report import summary_table, write_report

    t0 = time.perf_counter()
    check_save_target(cfg.out_dir, overwrite=cfg.overwrite)  # refuse a bad --out before any work
    rc = cfg.recover_config()
    if cfg.multi_stage:
        musco_arguments(cfg.goal)  # fail before any work on a goal MUSCO does not take
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    src = load_source(cfg.source)
    test = test_loader(src.pad_to_32, cfg.test_subset)
    x1, xb = src.example(1), src.example(cfg.latency_batch)
    rows = [summarize("dense", src.model, test, x1, None, cfg.threads)]
    goal = dict(cfg.goal)
    if goal.get("rank_rule") == "accuracy_drop" and goal.get("evaluate") is None:
        goal["evaluate"] = validation_evaluator(src.pad_to_32, cfg.val_subset, cfg.seed)
    if cfg.multi_stage:
        res = run_multi_stage(cfg, src, x1, goal)
        label = f"{cfg.method} MUSCO {res.stages_done} stages" + (
            f" x {cfg.finetune_steps} steps KD" if cfg.finetune_steps else " (no fine-tune)")
        print(res.plan.table(), flush=True)
        rows.append(summarize(label, res.model, test, x1, None, cfg.threads))
    else:
        res, compressed = _oneshot_recovered(cfg, rc, src, x1, goal, test)
        rows += compressed
    rows = with_side_by_side_latency(rows, src.model, res.model, xb, cfg.threads)
    print("\n" + summary_table(rows), flush=True)
    out = Path(cfg.out_dir)
    save(res.model, res.plan, out, overwrite=cfg.overwrite,
         extra={"input": {"pad_to_32": src.pad_to_32}, "source": src.description})
    report = write_report(out, f"tensorslim compress: {src.description}", rows, res.plan,
                          _compress_notes(cfg, rc, src, res, t0))
    print(f"\nwrote checkpoint + report to {out}", flush=True)
    return {"rows": rows, "plan": res.plan, "report": report}


def _oneshot_recovered(cfg: CompressConfig, rc: RecoverConfig, src: Loaded, x1: torch.Tensor,
                       goal: Mapping[str, Any], test: Any) -> tuple[Any, list[ModelSummary]]:
    """One-shot decomposition, then :func:`tensorslim.recover.recover`; the result and its rows:
    the model before fine-tuning (after refit / BN re-calibration) and after it."""
    from .methods import oneshot
    from .recover import recover

    res = oneshot(src.model, cfg.method, x1, progress=True, **goal)  # decomposition only
    print(res.plan.table(), flush=True)
    ran = rc.steps()
    train = train_loader(src.pad_to_32, cfg.batch_size, cfg.seed) if ran else None
    before = ("start", *(s for s in ran if s != "finetune"))[-1]  # the model before fine-tuning
    rec = recover(res.model, src.model, rc, train_loader=train, evaluate=test_accuracy(test),
                  evaluate_at=(before, "finetune"), progress=True)
    done = [d for s, d in (("reconstruct", "refit"), ("bn", "BN re-calibrated")) if s in ran]
    label = f"{cfg.method} (no fine-tune{''.join(', ' + d for d in done)})"
    return res, recovered_rows(cfg.method, rec, x1, cfg.threads, {before: label})


def _compress_notes(cfg: CompressConfig, rc: RecoverConfig, src: Loaded, res: Any,
                    t0: float) -> list[str]:
    notes = [f"base model: {src.description}",
             f"goal: {cfg.method}, {dict(cfg.goal)}",
             f"data-aware refit of the factors: {rc.reconstruct_steps} training batches"
             + (" (every stage)" if cfg.multi_stage else "") + ("" if rc.reconstruct_steps else " (off)"),
             f"BatchNorm re-calibration: {rc.bn_batches} training batches after decomposing"
             if rc.bn_batches else "BatchNorm re-calibration: off",
             f"fine-tune: {cfg.finetune_steps} SGD steps (batch {cfg.batch_size}, lr {cfg.finetune_lr}, "
             f"distilled from the dense model)",
             f"test set: official Fashion-MNIST test, {cfg.test_subset or 10000} images; latency: batch "
             f"{cfg.latency_batch}, {cfg.threads} threads; {latency_note()}",
             f"wall time: {time.perf_counter() - t0:.0f} s"]
    if cfg.multi_stage:
        notes[3] = (f"multi-stage (MUSCO): {res.stages_done} stages, {cfg.finetune_steps} SGD steps "
                    f"each (batch {cfg.batch_size}, lr {cfg.finetune_lr}, distilled); {res.stop_reason}")
    return notes


def musco_arguments(goal: Mapping[str, Any]) -> dict[str, Any]:
    """``tensorslim compress --multi-stage`` goal -> :func:`tensorslim.methods.musco` keywords:
    ``target_macs``, ``rank_rule`` (``vbmf``; ``ranks`` = a fraction per stage), ``vbmf_factor``,
    ``include`` / ``exclude``. Other goals raise ValueError."""
    goal = {k: v for k, v in goal.items() if v is not None}
    rule = goal.pop("rank_rule", None)
    out: dict[str, Any] = {k: goal.pop(k) for k in ("target_macs", "vbmf_factor", "include", "exclude")
                           if k in goal}
    if "ranks" in goal:
        frac = goal.pop("ranks")
        if isinstance(frac, bool) or not isinstance(frac, float) or not 0 < frac < 1:
            raise ValueError(f"--multi-stage takes --ranks as the fraction of every rank kept per "
                             f"stage, a number in (0, 1), got {frac!r}")
        out["rank_rule"] = frac
    if rule not in (None, "vbmf") or goal:
        bad = [f"rank_rule={rule}"] if rule not in (None, "vbmf") else []
        raise ValueError(f"--multi-stage does not support {', '.join(bad + sorted(goal))}; its goals are "
                         f"--target-macs, --rank-rule vbmf [--vbmf-factor] or --ranks FRACTION")
    return out


def run_multi_stage(cfg: CompressConfig, src: Loaded, x1: torch.Tensor, goal: Mapping[str, Any]) -> Any:
    """MUSCO on the loaded model (``cfg.finetune_steps`` KD steps per stage); the result."""
    from .methods import musco

    kwargs = musco_arguments(goal)
    rc = cfg.recover_config()
    train = train_loader(src.pad_to_32, cfg.batch_size, cfg.seed) if rc.steps() else None
    return musco(src.model, cfg.method, x1, train_loader=train, stages=cfg.stages,
                 finetune_steps_per_stage=rc.finetune_steps, finetune_lr=rc.lr,
                 bn_steps=rc.bn_batches, reconstruct_steps=rc.reconstruct_steps,
                 state_dir=cfg.state_dir, seed=cfg.seed, progress=True, **kwargs)


def run_evaluate(source: Source, *, test_subset: int | None, latency_batch: int, threads: int,
                 with_accuracy: bool = True) -> dict[str, Any]:
    """Accuracy, params, MACs per image and latency of one model, as a JSON-able dict."""
    torch.set_num_threads(threads)
    src = load_source(source)
    test = test_loader(src.pad_to_32, test_subset) if with_accuracy else None
    s = summarize(src.description, src.model, test, src.example(1), src.example(latency_batch), threads)
    from .runtime import allocator

    return {**s.as_dict(), "test_images": (test_subset or 10000) if with_accuracy else 0,
            "input_size": src.size, "latency_batch": latency_batch, "threads": threads,
            "allocator": allocator()}


@dataclass(frozen=True)
class SweepConfig:
    """``tensorslim sweep``: see :func:`tensorslim.sweep.run_sweep`."""

    source: Source
    layers: tuple[str, ...]
    ranks: tuple[int, ...]
    methods: tuple[str, ...] = ("cp", "tucker")
    finetune_steps: int = 50
    finetune_lr: float = 0.01
    batch_size: int = 128
    test_subset: int | None = None
    latency_batch: int = 64
    threads: int = 2
    repeats: int = 20
    out_dir: str = "runs/sweep"
    seed: int = 0


def check_sweep_out(out_dir: str | Path) -> None:
    """The sweep writes ``sweep.csv`` and ``sweep_<layer>.png`` into ``out_dir``, replacing
    those of an earlier sweep; it refuses a file at ``out_dir`` or a ``sweep.csv`` that is not
    a sweep's (other header), so nothing of someone else's is replaced."""
    from .files import check_writable
    from .sweep import COLUMNS, CSV_NAME

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder; choose a new or existing folder")
    csv = out / CSV_NAME
    if csv.exists():
        try:
            first = csv.read_text(errors="replace").partition("\n")[0].strip()
        except OSError:
            first = ""
        if first != ",".join(COLUMNS):
            raise ValueError(f"refusing to replace {csv}: it is not a tensorslim sweep table "
                             f"(header {first[:60]!r}); choose another folder")
    check_writable(out, out)


def run_sweep_config(cfg: SweepConfig) -> list[Any]:
    """Load the model and data, run the sweep, print its table; returns the rows."""
    from .sweep import CSV_NAME, run_sweep, sweep_table

    check_sweep_out(cfg.out_dir)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    src = load_source(cfg.source)
    test = test_loader(src.pad_to_32, cfg.test_subset)
    train = train_loader(src.pad_to_32, cfg.batch_size, cfg.seed) if cfg.finetune_steps else None
    rows = run_sweep(src.model, list(cfg.layers), list(cfg.ranks), list(cfg.methods),
                     test_loader=test, train_loader=train, finetune_steps=cfg.finetune_steps,
                     example_input=src.example(1), latency_batch=cfg.latency_batch,
                     threads=cfg.threads, out_dir=cfg.out_dir, finetune_lr=cfg.finetune_lr,
                     repeats=cfg.repeats)
    print(sweep_table(rows))
    print(f"\nwrote {Path(cfg.out_dir) / CSV_NAME} and sweep_<layer>.png plots", flush=True)
    return rows


def run_export(source: Source, out: str, *, check: bool, opset: int, dynamo: bool,
               latency_batch: int, threads: int) -> Any:
    """Export the model to ONNX at ``out``; returns the :class:`~tensorslim.export.ExportResult`."""
    from .export import export_onnx

    torch.set_num_threads(threads)
    src = load_source(source)
    return export_onnx(src.model, src.example(1), out, check=check, opset=opset, dynamo=dynamo,
                       latency_input=src.example(latency_batch), threads=threads)
