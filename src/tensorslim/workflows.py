"""The pipelines behind the command line (``tensorslim compress | evaluate | sweep | export``),
so ``cli.py`` only parses arguments. Each is one function of a frozen config.

A model comes from a registry name with the shipped weights, a registry name plus a weights
file (``--weights``), or a checkpoint folder (``--checkpoint``: a ``tensorslim.save`` folder
or a ``tensorslim train`` output folder).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .methods.oneshot import resolve_bn_steps
from .reconstruct import DEFAULT_STEPS as RECONSTRUCT_STEPS
from .report import ModelSummary


@dataclass(frozen=True)
class Source:
    """Where a model comes from: exactly one of ``checkpoint`` or ``model`` (with optional
    ``weights``). ``width`` builds a registry model for a bare state dict (default 1.0);
    ``pad_to_32`` overrides the input size recorded with the weights (28 or 32 pixels)."""

    model: str | None = None
    weights: str | None = None
    checkpoint: str | None = None
    width: float | None = None
    pad_to_32: bool | None = None

    def __post_init__(self) -> None:
        if self.checkpoint is not None and self.weights is not None:
            raise ValueError(f"--weights goes with --model NAME, not with --checkpoint DIR "
                             f"(got weights={self.weights!r}, checkpoint={self.checkpoint!r})")
        if self.checkpoint is None and self.model is None and self.weights is None:
            raise ValueError("no model given: pass --model NAME (registry, shipped weights or "
                             "--weights PATH) or --checkpoint DIR")


@dataclass
class Loaded:
    """A loaded model (eval mode), a description, and the input size it expects."""

    model: nn.Module
    description: str
    pad_to_32: bool

    @property
    def size(self) -> int:
        return 32 if self.pad_to_32 else 28

    def example(self, batch: int = 1, seed: int = 0) -> torch.Tensor:
        return torch.randn(batch, 1, self.size, self.size, generator=torch.Generator().manual_seed(seed))


def _pad(info: Mapping[str, Any] | None) -> bool:
    inp = (info or {}).get("input") or {}
    return bool(inp.get("pad_to_32", False)) if isinstance(inp, Mapping) else False


def load_source(src: Source) -> Loaded:
    """Load the model ``src`` names (raises FileNotFoundError / ValueError with the fix)."""
    try:
        if src.checkpoint is not None:
            loaded = _from_checkpoint(Path(src.checkpoint), src.model)
        elif src.weights is not None:
            loaded = _from_weights(Path(src.weights), src.model, src.width)
        else:
            loaded = _from_registry(src.model)  # type: ignore[arg-type]
    except (ValueError, OSError) as e:  # name the argument (same exception type)
        flag = "--checkpoint" if src.checkpoint is not None else "--weights" if src.weights else "--model"
        kind = next(k for k in (FileNotFoundError, PermissionError, ValueError, OSError) if isinstance(e, k))
        raise kind(f"{flag}: {e}") from None
    if src.pad_to_32 is not None:
        loaded.pad_to_32 = src.pad_to_32
    loaded.model.eval()
    return loaded


def _from_registry(name: str) -> Loaded:
    from .models import available_pretrained, list_models, load_pretrained, pretrained_info

    if name not in list_models():
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    if name not in available_pretrained():
        raise ValueError(f"no shipped weights for {name!r} (shipped: {available_pretrained() or 'none'}); "
                         f"pass --weights PATH, --checkpoint DIR, or train one with `tensorslim train`")
    return Loaded(load_pretrained(name), f"{name}, shipped weights", _pad(pretrained_info(name)))


def _from_weights(path: Path, name: str | None, width: float | None) -> Loaded:
    from .io import load_state_checked, load_state_dict_file
    from .models import checkpoint_info, create, list_models, load_checkpoint

    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    record = path.with_suffix(".json")
    if path.suffix == ".safetensors" and record.is_file():
        info = checkpoint_info(path.stem, path.parent)
        arch = (info.get("arch") if isinstance(info.get("arch"), dict) else {}).get("name")
        if name is not None and arch != name:
            raise ValueError(f"{path} holds a {arch!r} model ({record}), not {name!r}")
        return Loaded(load_checkpoint(path.stem, path.parent), f"{arch}, weights {path}", _pad(info))
    if name is None:
        raise ValueError(f"{path} has no {record.name} record of its architecture; also give "
                         f"--model NAME (known: {', '.join(list_models())}) and --width")
    model = create(name, width=1.0 if width is None else width)
    load_state_checked(model, load_state_dict_file(path), str(path))
    return Loaded(model, f"{name} (width {width or 1.0}), weights {path}", False)


def _from_checkpoint(path: Path, name: str | None) -> Loaded:
    from .io import META, load, read_meta
    from .models import available_pretrained, checkpoint_info, load_checkpoint

    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    if (path / META).is_file():
        meta = read_meta(path)
        return Loaded(load(path), f"checkpoint {path}", _pad(meta.get("extra")))
    names = available_pretrained(path)
    if name in names or (name is None and len(names) == 1):
        pick = name or names[0]
        return Loaded(load_checkpoint(pick, path), f"{pick}, weights {path / pick}.safetensors",
                      _pad(checkpoint_info(pick, path)))
    raise FileNotFoundError(f"{path} is not a checkpoint folder: it has no {META} (tensorslim.save) "
                            f"and no single NAME.safetensors + NAME.json pair (found: {names or 'none'})")


def test_loader(pad_to_32: bool, subset: int | None, batch_size: int = 500) -> Any:
    """The official Fashion-MNIST test set (first ``subset`` images when given)."""
    from .data import FashionMNIST, TensorBatchLoader, Transform, load_fashion_mnist

    if subset is not None and (not isinstance(subset, int) or not 1 <= subset <= 10000):
        raise ValueError(f"test subset must be an int in [1, 10000], got {subset!r}")
    images, labels = load_fashion_mnist("test")
    ds = FashionMNIST("test", transform=Transform(pad_to_32=pad_to_32), images=images, labels=labels)
    if subset is not None:
        ds = ds.subset(torch.arange(subset))
    return TensorBatchLoader(ds, batch_size)


def train_loader(pad_to_32: bool, batch_size: int, seed: int) -> Any:
    """Augmented Fashion-MNIST training batches (the seeded 55k split, validation held out)."""
    from .data import make_loaders

    return make_loaders(batch_size, seed=seed, augment=True, pad_to_32=pad_to_32).train


def summarize(label: str, model: nn.Module, test: Any, x1: torch.Tensor, xb: torch.Tensor | None,
              threads: int, repeats: int = 15) -> ModelSummary:
    """Accuracy on ``test`` (None if ``test`` is None), params, MACs per image on ``x1``
    (1, C, H, W), median latency on the batch ``xb`` (None if ``xb`` is None: see
    :func:`with_side_by_side_latency`)."""
    from .cost import count, measure_latency
    from .train import evaluate

    acc = evaluate(model, test)["accuracy"] if test is not None else None
    c = count(model, x1)
    lat = None if xb is None else measure_latency(model, xb, repeats=repeats, warmup=3,
                                                  threads=threads).median_ms
    return ModelSummary(label, acc, c.total_params, c.total_macs, lat)


LATENCY_ROUNDS = 5
LATENCY_NOTE = (f"dense and compressed timed interleaved, median of {LATENCY_ROUNDS} rounds of 5 calls, "
                "each in its faster memory layout (NCHW or channels_last); the compressed rows "
                "share one architecture and one measurement")


def latency_note() -> str:
    """:data:`LATENCY_NOTE` plus the memory allocator this process runs on."""
    from .runtime import allocator

    return f"{LATENCY_NOTE}; memory allocator: {allocator()}"


def side_by_side_latency(models: Sequence[nn.Module], xb: torch.Tensor | Sequence[torch.Tensor],
                         threads: int, rounds: int = LATENCY_ROUNDS, repeats: int = 5) -> list[float]:
    """Latency (ms) of each model on ``xb`` (one input for all, or one per model), measured
    interleaved: every round times each model (``repeats`` calls, median), the result is the
    median over rounds. On a shared machine the load drifts; interleaving keeps the ratios
    between the models honest."""
    from .cost import measure_latency

    inputs = [xb] * len(models) if isinstance(xb, torch.Tensor) else list(xb)
    if len(inputs) != len(models):
        raise ValueError(f"side_by_side_latency: {len(inputs)} inputs for {len(models)} models; "
                         f"give one tensor or one per model")
    times: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for t, m, x in zip(times, models, inputs):
            t.append(measure_latency(m, x, repeats=repeats, warmup=2, threads=threads).median_ms)
    return [statistics.median(t) for t in times]


def with_side_by_side_latency(rows: Sequence[ModelSummary], dense: nn.Module, compressed: nn.Module,
                              xb: torch.Tensor, threads: int) -> list[ModelSummary]:
    """``rows`` (first the dense model, then variants of ONE compressed architecture: before and
    after BN re-calibration / fine-tuning) with latencies from one interleaved measurement of
    ``dense`` and ``compressed`` (weights do not change latency; measuring each row separately
    would show the machine's drift as differences). A 4-D input is timed in both memory
    layouts (NCHW and channels_last, on copies of the models) and each model gets its faster
    one, as a deployment would choose."""
    models, inputs = [dense, compressed], [xb, xb]
    if xb.dim() == 4:
        cl = torch.channels_last
        models += [copy.deepcopy(m).to(memory_format=cl) for m in (dense, compressed)]
        inputs += [xb.contiguous(memory_format=cl)] * 2
    t = side_by_side_latency(models, inputs, threads)
    d, c = min(t[0::2]), min(t[1::2])
    return [dataclasses.replace(r, latency_ms=d if i == 0 else c) for i, r in enumerate(rows)]


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


def resolve_reconstruct_steps(reconstruct_steps: int | None, finetune_steps: int,
                              multi_stage: bool) -> int:
    """Data-aware refit batches: as given, or for None 16 when the model is used without
    fine-tuning and 0 before fine-tuning. Measured on the shipped VGG-16 (1500 KD steps, same
    run): the refit start fine-tunes to 92.85% vs 92.64% at 4x fewer MACs, but to 91.19% vs
    91.78% at 8x, although it starts far higher (84.96% vs 58.95% after BN re-calibration)."""
    if reconstruct_steps is None:
        return 0 if finetune_steps or multi_stage else RECONSTRUCT_STEPS
    return reconstruct_steps


def validation_evaluator(pad_to_32: bool, subset: int, seed: int = 0) -> Any:
    """``evaluate(model) -> accuracy`` on the first ``subset`` images of the seeded validation
    split (held out of training; for ``rank_rule="accuracy_drop"``)."""
    from .data import FashionMNIST, TensorBatchLoader, Transform, load_fashion_mnist, split_indices
    from .train import evaluate

    if isinstance(subset, bool) or not isinstance(subset, int) or not 1 <= subset <= 5000:
        raise ValueError(f"validation subset must be an int in [1, 5000], got {subset!r}")
    images, labels = load_fashion_mnist("train")
    ds = FashionMNIST("train", transform=Transform(pad_to_32=pad_to_32), images=images, labels=labels)
    _, val_idx = split_indices(len(ds), 5000, seed)
    loader = TensorBatchLoader(ds.subset(val_idx[:subset]), 500)

    def validation_accuracy(model: nn.Module) -> float:
        return float(evaluate(model, loader)["accuracy"])

    return validation_accuracy


def run_compress(cfg: CompressConfig) -> dict[str, Any]:
    """Plan, compress, optionally fine-tune (KD from the dense model), compare and save:
    ``out_dir`` gets the checkpoint (model.safetensors, plan.json, meta.json), report.md,
    summary.png and layers.png. Returns ``{"rows", "plan", "report"}``."""
    from .io import check_save_target, save
    from .methods import oneshot
    from .report import summary_table, write_report
    from .train import fine_tune

    t0 = time.perf_counter()
    check_save_target(cfg.out_dir, overwrite=cfg.overwrite)  # refuse a bad --out before any work
    cfg = dataclasses.replace(cfg, reconstruct_steps=resolve_reconstruct_steps(
        cfg.reconstruct_steps, cfg.finetune_steps, cfg.multi_stage))
    bn_steps = resolve_bn_steps(cfg.bn_steps, cfg.reconstruct_steps)
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
    else:
        train = train_loader(src.pad_to_32, cfg.batch_size, cfg.seed) if bn_steps or cfg.reconstruct_steps else None
        res = oneshot(src.model, cfg.method, x1, progress=True, train_loader=train,
                      bn_steps=bn_steps, reconstruct_steps=cfg.reconstruct_steps, **goal)
        done = [s for s, on in (("refit", cfg.reconstruct_steps), ("BN re-calibrated", bn_steps)) if on]
        label = f"{cfg.method} (no fine-tune{''.join(', ' + d for d in done)})"
    print(res.plan.table(), flush=True)
    rows.append(summarize(label, res.model, test, x1, None, cfg.threads))
    if cfg.finetune_steps and not cfg.multi_stage:
        train = train_loader(src.pad_to_32, cfg.batch_size, cfg.seed)
        epochs = max(1, -(-cfg.finetune_steps // len(train)))
        fine_tune(res.model, train, epochs=epochs, max_steps=cfg.finetune_steps, lr=cfg.finetune_lr,
                  teacher=src.model, seed=cfg.seed, log_every=0)
        res.model.eval()
        rows.append(summarize(f"{cfg.method} + {cfg.finetune_steps} steps KD", res.model, test, x1,
                              None, cfg.threads))
    rows = with_side_by_side_latency(rows, src.model, res.model, xb, cfg.threads)
    print("\n" + summary_table(rows), flush=True)
    out = Path(cfg.out_dir)
    save(res.model, res.plan, out, overwrite=cfg.overwrite,
         extra={"input": {"pad_to_32": src.pad_to_32}, "source": src.description})
    notes = [f"base model: {src.description}",
             f"goal: {cfg.method}, {dict(cfg.goal)}",
             f"data-aware refit of the factors: {cfg.reconstruct_steps} training batches"
             + (" (every stage)" if cfg.multi_stage else "") + ("" if cfg.reconstruct_steps else " (off)"),
             f"BatchNorm re-calibration: {bn_steps} training batches after decomposing"
             if bn_steps else "BatchNorm re-calibration: off",
             f"fine-tune: {cfg.finetune_steps} SGD steps (batch {cfg.batch_size}, lr {cfg.finetune_lr}, "
             f"distilled from the dense model)",
             f"test set: official Fashion-MNIST test, {cfg.test_subset or 10000} images; latency: batch "
             f"{cfg.latency_batch}, {cfg.threads} threads; {latency_note()}",
             f"wall time: {time.perf_counter() - t0:.0f} s"]
    if cfg.multi_stage:
        notes[3] = (f"multi-stage (MUSCO): {res.stages_done} stages, {cfg.finetune_steps} SGD steps "
                    f"each (batch {cfg.batch_size}, lr {cfg.finetune_lr}, distilled); {res.stop_reason}")
    report = write_report(out, f"tensorslim compress: {src.description}", rows, res.plan, notes)
    print(f"\nwrote checkpoint + report to {out}", flush=True)
    return {"rows": rows, "plan": res.plan, "report": report}


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
    bn_steps = resolve_bn_steps(cfg.bn_steps, cfg.reconstruct_steps)
    need = cfg.finetune_steps or bn_steps or cfg.reconstruct_steps
    train = train_loader(src.pad_to_32, cfg.batch_size, cfg.seed) if need else None
    return musco(src.model, cfg.method, x1, train_loader=train, stages=cfg.stages,
                 finetune_steps_per_stage=cfg.finetune_steps, finetune_lr=cfg.finetune_lr,
                 bn_steps=bn_steps, reconstruct_steps=cfg.reconstruct_steps,
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
