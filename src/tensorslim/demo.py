"""The README's main job, as a preset of ``tensorslim compress``: the shipped Fashion-MNIST
VGG-16 at width 0.5 (``vgg16_w050``: wide enough that fewer MACs give a real speed-up; the
width-0.25 ``vgg16`` is mostly per-op overhead on a CPU), Tucker-2 to 4x fewer MACs (rank rule min_error), data-aware refit and a short
distilled fine-tune, a table of accuracy / params / MACs / CPU latency and a report.

What the demo adds to :func:`tensorslim.workflows.run_compress`: a row after every recovery
step, the checkpoint in ``out_dir/checkpoint`` (the report beside it), an earlier demo's
output replaced, and a model trained for one epoch when a registry model has no shipped
weights."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

from .app.sources import Loaded, Source, load_source, train_loader
from .configs import resolve
from .reconstruct import DEFAULT_STEPS as RECONSTRUCT_STEPS
from .workflows import CompressConfig, begin, compress_loaded

# the demo's settings; every other field keeps CompressConfig's default
DEMO = CompressConfig(
    source=Source(model="vgg16_w050"), method="tucker",
    goal={"target_macs": 0.25, "rank_rule": "min_error"},  # make_plan's default rule, spelled out
    finetune_steps=300, reconstruct_steps=RECONSTRUCT_STEPS, out_dir="runs/demo",
    overwrite=True,  # an earlier demo's checkpoint is replaced (see check_demo_out)
    every_step=True)


def demo_config(config: CompressConfig | Mapping[str, Any] | None = None,
                **settings: Any) -> CompressConfig:
    """:data:`DEMO` (or ``config``: a CompressConfig, or a mapping of fields over DEMO) with
    ``settings`` (CompressConfig fields by keyword) applied."""
    if config is None or isinstance(config, Mapping):
        settings = {**(config or {}), **settings}
        config = DEMO
    return resolve(CompressConfig, config, settings, "demo")


def run_demo(config: CompressConfig | Mapping[str, Any] | None = None,
             **settings: Any) -> dict[str, Any]:
    """Run the demo end to end (:func:`demo_config` of the arguments): writes the report into
    ``out_dir`` and the checkpoint into ``out_dir/checkpoint``; returns ``{"rows", "plan",
    "report"}`` as :func:`tensorslim.workflows.run_compress` does."""
    t0 = time.perf_counter()
    cfg = demo_config(config, **settings)
    out = Path(cfg.out_dir)
    check_demo_out(out, overwrite=cfg.overwrite)  # before any work
    begin(cfg)
    res = compress_loaded(cfg, _load_or_train(cfg), out / "checkpoint", "tensorslim demo", t0)
    print(f"\nreport: {res['report']}   checkpoint: {out / 'checkpoint'}", flush=True)
    return res


def _load_or_train(cfg: CompressConfig) -> Loaded:
    """The model of ``cfg.source``; a registry model without shipped weights is trained here
    for one epoch (at ``width``, default 0.25) so the demo runs anywhere."""
    from .models import available_pretrained, create, list_models
    from .train import train

    s = cfg.source
    if s.checkpoint or s.weights or s.model not in list_models() or s.model in available_pretrained():
        return load_source(s)
    width = 0.25 if s.width is None else s.width
    print(f"no shipped weights for {s.model}; training it at width {width} for 1 epoch first "
          "(ship weights with `tensorslim train` for real numbers)", flush=True)
    model = create(s.model, width=width)
    pad = bool(s.pad_to_32)
    train(model, train_loader(pad, cfg.batch_size, cfg.seed), epochs=1, lr=0.05, seed=cfg.seed,
          log_every=0, channels_last=True)
    return Loaded(model.eval(), f"{s.model} trained for 1 epoch by the demo (no shipped weights found)",
                  pad)


REPORT_FILES = ("report.md", "summary.png", "layers.png")


def check_demo_out(out: Path, *, overwrite: bool = True) -> None:
    """The demo writes ``out/checkpoint`` (a tensorslim checkpoint) and the report files into
    ``out``, replacing those of an earlier demo run there (unless ``overwrite`` is False). It
    refuses a folder whose ``checkpoint`` is not a tensorslim checkpoint, or that holds report
    files but no demo checkpoint (someone else's files); other files in ``out`` are never
    touched."""
    from .io import check_save_target, is_checkpoint

    check_save_target(out / "checkpoint", overwrite=overwrite)
    clash = [n for n in REPORT_FILES if (out / n).exists()]
    if clash and not is_checkpoint(out / "checkpoint"):
        raise ValueError(f"demo: refusing to write into {out}: it holds {clash} but no demo checkpoint "
                         f"({out / 'checkpoint'}), so they are not a previous demo's; choose another --out")
