"""The README's main job: compress a trained Fashion-MNIST model whole-model to a MAC target,
fine-tune briefly, and compare accuracy / params / MACs / CPU latency in a table and a report."""
from __future__ import annotations

import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .report import summary_table, write_report
from .app.summary import latency_note, recovered_rows, summarize, test_accuracy, with_side_by_side_latency
from .reconstruct import DEFAULT_STEPS as RECONSTRUCT_STEPS
from .recover import RecoverConfig


@dataclass(frozen=True)
class DemoConfig:
    model: str = "vgg16"
    method: str = "tucker"
    rank_rule: str = "min_error"  # make_plan's default for a target (README, "Default rank rule")
    target_macs: float = 0.25
    finetune_steps: int = 400
    finetune_lr: float = 0.01
    bn_steps: int | None = None  # None: 50 without the refit, 0 after it (see recover.resolve_bn_steps)
    reconstruct_steps: int = RECONSTRUCT_STEPS
    batch_size: int = 128
    latency_batch: int = 64
    threads: int = 2
    test_subset: int | None = None
    out_dir: str = "runs/demo"
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.target_macs, bool) or not 0 < self.target_macs <= 1:
            raise ValueError(f"target_macs must be a number in (0, 1], got {self.target_macs!r}")
        if self.method not in ("tucker", "cp", "svd", "auto", "tt"):
            raise ValueError(f"unknown method {self.method!r}; known: tucker, cp, svd, auto, tt")
        if self.rank_rule not in ("uniform", "min_error"):
            raise ValueError(f"demo: rank_rule must be 'uniform' or 'min_error' (the rules that meet a "
                             f"MAC target), got {self.rank_rule!r}")
        for name in ("finetune_steps", "bn_steps", "reconstruct_steps", "threads", "batch_size",
                     "latency_batch"):
            if name == "bn_steps" and self.bn_steps is None:
                continue
            v, zero_ok = getattr(self, name), name in ("finetune_steps", "bn_steps", "reconstruct_steps")
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if zero_ok else 1):
                raise ValueError(f"{name} must be a {'non-negative' if zero_ok else 'positive'} int, got {v!r}")


    def recover_config(self) -> RecoverConfig:
        """Refit, BatchNorm re-calibration and KD fine-tuning after decomposing."""
        return RecoverConfig(reconstruct_steps=self.reconstruct_steps, bn_steps=self.bn_steps,
                             finetune_steps=self.finetune_steps, lr=self.finetune_lr, seed=self.seed)


def _pretrained_or_trained(name: str, loaders: Any, seed: int) -> tuple[nn.Module, str]:
    from .models import available_pretrained, create, load_pretrained

    if name in available_pretrained():
        return load_pretrained(name), f"shipped weights tensorslim/weights/{name}.safetensors"
    from .train import train

    print(f"no shipped weights for {name}; training a width-0.25 VGG-16 for 1 epoch first (ship weights with `tensorslim train` for real numbers)")
    model = create(name, width=0.25)
    train(model, loaders.train, epochs=1, lr=0.05, seed=seed, log_every=0, channels_last=True)
    return model.eval(), "trained for 1 epoch by the demo (no shipped weights found)"


def run_demo(cfg: DemoConfig = DemoConfig()) -> dict[str, Any]:
    """Run the demo end to end; returns the summaries and the plan, writes ``cfg.out_dir``."""
    from .data import TensorBatchLoader, make_loaders
    from .io import save
    from .methods import oneshot
    from .models import pretrained_info
    from .recover import recover

    t0 = time.perf_counter()
    check_demo_out(Path(cfg.out_dir))  # before any work
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    pad = bool(pretrained_info(cfg.model).get("input", {}).get("pad_to_32", False)) if _has(cfg.model) else False
    loaders = make_loaders(cfg.batch_size, seed=cfg.seed, augment=True, pad_to_32=pad)
    test = loaders.test
    if cfg.test_subset:
        test = TensorBatchLoader(test.dataset.subset(torch.arange(cfg.test_subset)), 500)
    model, source = _pretrained_or_trained(cfg.model, loaders, cfg.seed)
    size = 32 if pad else 28
    x1, xb = torch.randn(1, 1, size, size), torch.randn(cfg.latency_batch, 1, size, size)
    rows = [summarize(f"{cfg.model} dense", model, test, x1, None, cfg.threads)]
    res = oneshot(model, cfg.method, x1, target_macs=cfg.target_macs, rank_rule=cfg.rank_rule,
                  progress=True)
    rc = cfg.recover_config()
    rec = recover(res.model, model, rc, train_loader=loaders.train, evaluate=test_accuracy(test),
                  progress=True)  # evaluated before and after each step that runs
    rows += recovered_rows(cfg.method, rec, x1, cfg.threads, {})
    if not rc.finetune_steps:  # the report always shows the fine-tuned row
        rows.append(dataclasses.replace(rows[-1], label=f"{cfg.method} + 0 steps KD"))
    tuned = rec.model
    rows = with_side_by_side_latency(rows, model, tuned, xb, cfg.threads)
    print(res.plan.table())
    print()
    print(summary_table(rows))
    out = Path(cfg.out_dir)
    save(tuned, res.plan, out / "checkpoint", overwrite=True)  # the demo's own folder: see check_demo_out
    notes = [
        f"base model: {source}",
        f"goal: {cfg.method}, target_macs={cfg.target_macs} (keep {100 * cfg.target_macs:.0f}% of MACs), "
        f"rank rule {cfg.rank_rule}",
        f"data-aware refit: {cfg.reconstruct_steps} training batches, every factorized layer's last "
        "factors fitted by least squares to the dense layer's outputs" + ("" if cfg.reconstruct_steps else " (off)"),
        f"BatchNorm re-calibration: {rc.bn_batches} training batches after decomposing, before fine-tuning"
        if rc.bn_batches else "BatchNorm re-calibration: off (after the refit the dense statistics fit)",
        f"fine-tune: {cfg.finetune_steps} SGD steps, batch {cfg.batch_size}, lr {cfg.finetune_lr}, "
        f"distillation from the dense model",
        f"test set: official Fashion-MNIST test, {cfg.test_subset or 10000} images; "
        f"latency: batch {cfg.latency_batch}, {cfg.threads} threads; {latency_note()}",
        f"wall time of the whole demo: {time.perf_counter() - t0:.0f} s",
    ]
    report = write_report(out, f"tensorslim demo: {cfg.model} on Fashion-MNIST", rows, res.plan, notes)
    print(f"\nreport: {report}   checkpoint: {out / 'checkpoint'}")
    return {"rows": rows, "plan": res.plan, "report": report}


REPORT_FILES = ("report.md", "summary.png", "layers.png")


def check_demo_out(out: Path) -> None:
    """The demo writes ``out/checkpoint`` (a tensorslim checkpoint) and the report files into
    ``out``, replacing those of an earlier demo run there. It refuses a folder whose
    ``checkpoint`` is not a tensorslim checkpoint, or that holds report files but no demo
    checkpoint (someone else's files); other files in ``out`` are never touched."""
    from .io import check_save_target, is_checkpoint

    check_save_target(out / "checkpoint", overwrite=True)
    clash = [n for n in REPORT_FILES if (out / n).exists()]
    if clash and not is_checkpoint(out / "checkpoint"):
        raise ValueError(f"demo: refusing to write into {out}: it holds {clash} but no demo checkpoint "
                         f"({out / 'checkpoint'}), so they are not a previous demo's; choose another --out")


def _has(name: str) -> bool:
    from .models import available_pretrained

    return name in available_pretrained()
