"""The pipelines behind the command line (``tensorslim compress | evaluate | sweep | export``;
the demo is a preset of compress), so ``cli.py`` only parses arguments. Each is one function
of a frozen config. Model sources and
loaders live in :mod:`tensorslim.app.sources`, summary rows and latency in
:mod:`tensorslim.app.summary` (re-exported here).
"""
from __future__ import annotations

import copy

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .configs import check_int
from .app.sources import (Loaded, Source, load_source, test_loader, train_loader,  # noqa: F401
                          validation_evaluator)
from .app.summary import (LATENCY_NOTE, LATENCY_ROUNDS, latency_note, recovered_rows,  # noqa: F401
                          side_by_side_latency, summarize, test_accuracy, with_side_by_side_latency)
from .recover import DEFAULT_RECONSTRUCT_STEPS as RECONSTRUCT_STEPS  # noqa: F401
from .recover import RecoverConfig, resolve_bn_steps, resolve_reconstruct_steps  # noqa: F401
from .app.pipelines import is_pipeline, pipeline_arguments, pipeline_recovered
from .report import ModelSummary
from .sweep import SweepOptions


@dataclass(frozen=True)
class CompressConfig:
    """``tensorslim compress`` (and, as a preset, ``tensorslim demo``): ``goal`` is one of
    ranks / target_macs / target_params / energy (plus include / exclude and the rank rule's
    settings), passed to :func:`tensorslim.make_plan`."""

    source: Source
    method: str = "tucker"
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
    every_step: bool = False  # one-shot: a summary row after every recovery step, not only around fine-tuning

    def recover_config(self) -> RecoverConfig:
        """The recovery after decomposing (per stage with ``multi_stage``), defaults resolved."""
        steps = resolve_reconstruct_steps(self.reconstruct_steps, self.finetune_steps, self.multi_stage)
        return RecoverConfig(reconstruct_steps=steps, bn_steps=resolve_bn_steps(self.bn_steps, steps),
                             finetune_steps=self.finetune_steps, lr=self.finetune_lr, seed=self.seed)

    def __post_init__(self) -> None:
        check_counts("compress", positive=("batch_size", "latency_batch", "threads", "val_subset",
                                           "stages", "test_subset"),
                     non_negative=("finetune_steps", "bn_steps", "reconstruct_steps"), obj=self)
        self.recover_config()  # its settings (finetune_lr, ...) are checked before any work


def check_counts(where: str, *, obj: Any, positive: Sequence[str] = (),
                 non_negative: Sequence[str] = ()) -> None:
    """Each named int field of ``obj`` (None skipped) is a positive / non-negative int."""
    for names, low in ((positive, 1), (non_negative, 0)):
        for name in names:
            if getattr(obj, name) is not None:
                check_int(name, getattr(obj, name), low, where=where)


def run_compress(cfg: CompressConfig) -> dict[str, Any]:
    """Plan, compress, recover (refit, BN re-calibration, KD fine-tuning from the dense model),
    compare and save: ``out_dir`` gets the checkpoint (model.safetensors, plan.json, meta.json),
    report.md, summary.png and layers.png. Returns ``{"rows", "plan", "report"}``."""
    from .io import check_save_target

    t0 = time.perf_counter()
    check_save_target(cfg.out_dir, overwrite=cfg.overwrite)  # refuse a bad --out before any work
    begin(cfg)
    out = compress_loaded(cfg, load_source(cfg.source), Path(cfg.out_dir), "tensorslim compress", t0)
    print(f"\nwrote checkpoint + report to {cfg.out_dir}", flush=True)
    return out


def begin(cfg: CompressConfig) -> None:
    """Before any work: refuse a goal MUSCO does not take; seed; set the threads."""
    if is_pipeline(cfg.method):
        pipeline_arguments(cfg)
    elif cfg.multi_stage:
        musco_arguments(cfg.goal)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)


def compress_loaded(cfg: CompressConfig, src: Loaded, checkpoint_dir: Path, title: str,
                    t0: float) -> dict[str, Any]:
    """The pipeline of :func:`run_compress` (and the demo) on a loaded model: plan, compress,
    recover, print the table, save the checkpoint to ``checkpoint_dir`` and the report (titled
    ``title: <source>``) to ``cfg.out_dir``. Returns ``{"rows", "plan", "report"}``."""
    from .io import save
    from .report import summary_table, write_report

    test = test_loader(src.pad_to_32, cfg.test_subset)
    x1, xb = src.example(1), src.example(cfg.latency_batch)
    rows = [summarize("dense", src.model, test, x1, None, cfg.threads)]
    goal = dict(cfg.goal)
    if goal.get("rank_rule") == "accuracy_drop" and goal.get("evaluate") is None:
        goal["evaluate"] = validation_evaluator(src.pad_to_32, cfg.val_subset, cfg.seed)
    if is_pipeline(cfg.method):
        res, compressed = pipeline_recovered(cfg, src, x1, test)
        rows += compressed
    elif cfg.multi_stage:
        res = run_multi_stage(cfg, src, x1, goal)
        label = f"{cfg.method} MUSCO {res.stages_done} stages" + (
            f" x {cfg.finetune_steps} steps KD" if cfg.finetune_steps else " (no fine-tune)")
        print(res.plan.table(), flush=True)
        rows.append(summarize(label, res.model, test, x1, None, cfg.threads))
    else:
        res, compressed = _oneshot_recovered(cfg, src, x1, goal, test)
        rows += compressed
    rows = with_side_by_side_latency(rows, src.model, res.model, xb, cfg.threads,
                                     x1 if cfg.latency_batch != 1 else None)
    print("\n" + summary_table(rows), flush=True)
    save(res.model, res.plan, checkpoint_dir, overwrite=cfg.overwrite,
         extra={"input": {"pad_to_32": src.pad_to_32}, "source": src.description})
    report = write_report(Path(cfg.out_dir), f"{title}: {src.description}", rows, res.plan,
                          _compress_notes(cfg, src, res, t0))
    return {"rows": rows, "plan": res.plan, "report": report}


def _oneshot_recovered(cfg: CompressConfig, src: Loaded, x1: torch.Tensor,
                       goal: Mapping[str, Any], test: Any) -> tuple[Any, list[ModelSummary]]:
    """One-shot decomposition, then :func:`tensorslim.recover.recover`; the result and its rows:
    the model before fine-tuning (after refit / BN re-calibration) and after it (with
    ``cfg.every_step``: before recovery and after every step that ran)."""
    from .methods import oneshot
    from .recover import recover

    res = oneshot(src.model, cfg.method, x1, progress=True, **goal)  # decomposition only
    print(res.plan.table(), flush=True)
    rc = cfg.recover_config()
    ran = rc.steps()
    train = train_loader(src.pad_to_32, cfg.batch_size, cfg.seed) if ran else None
    before = ("start", *(s for s in ran if s != "finetune"))[-1]  # the model before fine-tuning
    rec = recover(res.model, src.model, rc, train_loader=train, evaluate=test_accuracy(test),
                  evaluate_at=None if cfg.every_step else (before, "finetune"), progress=True)
    done = [d for s, d in (("reconstruct", "refit"), ("bn", "BN re-calibrated")) if s in ran]
    label = f"{cfg.method} (no fine-tune{''.join(', ' + d for d in done)})"
    labels = {} if cfg.every_step else {before: label}
    return res, recovered_rows(cfg.method, rec, x1, cfg.threads, labels)


def _compress_notes(cfg: CompressConfig, src: Loaded, res: Any, t0: float) -> list[str]:
    if is_pipeline(cfg.method):
        p, _ = pipeline_arguments(cfg)
        return [f"base model: {src.description}", f"goal: {cfg.method}, {dict(cfg.goal)}",
                f"pipeline {cfg.method}: {p.summary}",
                f"fine-tune inside the pipeline: {cfg.finetune_steps} SGD steps (batch {cfg.batch_size})",
                f"test set: official Fashion-MNIST test, {cfg.test_subset or 10000} images; latency: batch "
                f"{cfg.latency_batch} (and 1), {cfg.threads} threads; {latency_note()}",
                f"wall time: {time.perf_counter() - t0:.0f} s"]
    rc = cfg.recover_config()
    notes = [f"base model: {src.description}",
             f"goal: {cfg.method}, {dict(cfg.goal)}",
             f"data-aware refit of the factors: {rc.reconstruct_steps} training batches"
             + (" (every stage)" if cfg.multi_stage else "") + ("" if rc.reconstruct_steps else " (off)"),
             f"BatchNorm re-calibration: {rc.bn_batches} training batches after decomposing"
             if rc.bn_batches else "BatchNorm re-calibration: off",
             f"fine-tune: {cfg.finetune_steps} SGD steps (batch {cfg.batch_size}, lr {cfg.finetune_lr}, "
             f"distilled from the dense model)",
             f"test set: official Fashion-MNIST test, {cfg.test_subset or 10000} images; latency: batch "
             f"{cfg.latency_batch} (and 1), {cfg.threads} threads; {latency_note()}",
             f"wall time: {time.perf_counter() - t0:.0f} s"]
    if cfg.multi_stage:
        notes[3] = (f"multi-stage (MUSCO): {res.stages_done} stages, {cfg.finetune_steps} SGD steps "
                    f"each (batch {cfg.batch_size}, lr {cfg.finetune_lr}, distilled); {res.stop_reason}")
    return notes


def musco_arguments(goal: Mapping[str, Any]) -> dict[str, Any]:
    """``tensorslim compress --multi-stage`` goal -> :func:`tensorslim.methods.musco` keywords:
    ``target_macs``, ``stage_ranks`` (from ``ranks`` = the fraction of each rank kept per
    stage; ``rank_rule`` may only be ``vbmf``, MUSCO's own), ``vbmf_factor``, ``include`` /
    ``exclude``. Other goals raise ValueError."""
    goal = {k: v for k, v in goal.items() if v is not None}
    rule = goal.pop("rank_rule", None)
    out: dict[str, Any] = {k: goal.pop(k) for k in ("target_macs", "vbmf_factor", "include", "exclude")
                           if k in goal}
    if "ranks" in goal:
        frac = goal.pop("ranks")
        if isinstance(frac, bool) or not isinstance(frac, float) or not 0 < frac < 1:
            raise ValueError(f"--multi-stage takes --ranks as the fraction of every rank kept per "
                             f"stage, a number in (0, 1), got {frac!r}")
        out["stage_ranks"] = frac
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


@dataclass(frozen=True)
class EvaluateConfig:
    """``tensorslim evaluate``: accuracy on the first ``test_subset`` test images (all when
    None; skipped unless ``accuracy``), params, MACs per image, latency at ``latency_batch``."""

    source: Source
    test_subset: int | None = None
    latency_batch: int = 64
    threads: int = 2
    accuracy: bool = True

    def __post_init__(self) -> None:
        check_counts("evaluate", positive=("test_subset", "latency_batch", "threads"), obj=self)


def run_evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Accuracy, params, MACs per image and latency of one model, as a JSON-able dict."""
    from .runtime import allocator

    torch.set_num_threads(cfg.threads)
    src = load_source(cfg.source)
    test = test_loader(src.pad_to_32, cfg.test_subset) if cfg.accuracy else None
    s = summarize(src.description, src.model, test, src.example(1), src.example(cfg.latency_batch),
                  cfg.threads)
    return {**s.to_dict(), "test_images": (cfg.test_subset or 10000) if cfg.accuracy else 0,
            "input_size": src.size, "latency_batch": cfg.latency_batch, "threads": cfg.threads,
            "allocator": allocator(), "plan_latency": plan_latency(cfg.source, src)}


def plan_latency(source: Source, src: Loaded) -> dict[str, Any] | None:
    """For a checkpoint planned with ``target_latency``: the plan's predicted time next to the
    time measured now, as the plan timed it (BatchNorms folded, the plan's batch, layout and
    threads). None for other sources."""
    from .cost import measure_latency
    from .fusion import fuse
    from .plan import CompressionPlan

    if source.checkpoint is None or not (Path(source.checkpoint) / "plan.json").is_file():
        return None
    lat = CompressionPlan.load(Path(source.checkpoint) / "plan.json").goal.get("latency")
    if not isinstance(lat, Mapping):
        return None
    model, x = fuse(copy.deepcopy(src.model).eval(), inplace=True), src.example(int(lat["batch"]))
    if lat["layout"] == "channels_last":
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    ms = measure_latency(model, x, repeats=20, warmup=3, threads=int(lat["threads"])).median_ms
    return {k: lat[k] for k in ("batch", "layout", "threads", "dense_ms", "predicted_ms")} | {
        "measured_ms": round(ms, 4)}


@dataclass(frozen=True)
class SweepConfig:
    """``tensorslim sweep``: the model, what to sweep (:class:`tensorslim.sweep.SweepOptions`),
    and its Fashion-MNIST data: fine-tuning batches of ``batch_size`` (seeded by ``seed``),
    the first ``test_subset`` test images (all when None)."""

    source: Source
    options: SweepOptions
    batch_size: int = 128
    test_subset: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.options, SweepOptions):
            raise TypeError(f"sweep: options must be a SweepOptions, got {type(self.options).__name__}")
        check_counts("sweep", positive=("batch_size", "test_subset"), non_negative=("seed",), obj=self)


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

    opts = cfg.options
    if opts.out_dir is not None:
        check_sweep_out(opts.out_dir)
    torch.manual_seed(cfg.seed)
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    src = load_source(cfg.source)
    test = test_loader(src.pad_to_32, cfg.test_subset)
    train = train_loader(src.pad_to_32, cfg.batch_size, cfg.seed) if opts.finetune_steps else None
    rows = run_sweep(src.model, opts, test_loader=test, train_loader=train,
                     example_inputs=src.example(1))
    print(sweep_table(rows))
    if opts.out_dir is not None:
        print(f"\nwrote {Path(opts.out_dir) / CSV_NAME} and sweep_<layer>.png plots", flush=True)
    return rows


@dataclass(frozen=True)
class ExportConfig:
    """``tensorslim export``: write the model as ONNX to ``out`` (``opset``; ``dynamo``: the
    torch.export-based exporter); ``check`` runs onnxruntime on it and times it at
    ``latency_batch`` with ``threads`` threads."""

    source: Source
    out: str
    check: bool = True
    opset: int = 17
    dynamo: bool = False
    latency_batch: int = 64
    threads: int = 2
    fuse: bool = False  # fold BatchNorms into the layers before them first (tensorslim.fuse)

    def __post_init__(self) -> None:
        check_counts("export", positive=("opset", "latency_batch", "threads"), obj=self)


def run_export(cfg: ExportConfig) -> Any:
    """Export the model to ONNX; returns the :class:`~tensorslim.export.ExportResult`."""
    from .export import export_onnx

    torch.set_num_threads(cfg.threads)
    src = load_source(cfg.source)
    model = src.model.eval()
    if cfg.fuse:
        from .fusion import fuse_with_report

        model, report = fuse_with_report(model)
        print(report.summary(), flush=True)
    return export_onnx(model, src.example(1), cfg.out, check=cfg.check, opset=cfg.opset,
                       dynamo=cfg.dynamo, latency_input=src.example(cfg.latency_batch),
                       threads=cfg.threads)
