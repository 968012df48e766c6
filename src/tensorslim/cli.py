"""Command line: the commands' handlers, thin calls into the public API (no logic here); the
arguments are declared in :mod:`tensorslim.app.parser`.

    tensorslim train    --model vgg16 --width 0.25 --epochs 30 --out runs/train
    tensorslim compress --model vgg16 --method tucker --target-macs 0.25 --finetune-steps 400 --out runs/c
    tensorslim evaluate --checkpoint runs/c --test-subset 2000 [--json]
    tensorslim sweep    --model vgg16 --layers features.3,features.24 --ranks 4,8,16,32 --out runs/sweep
    tensorslim export   --checkpoint runs/c --out runs/c/model.onnx
    tensorslim demo
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from .app import parser
from .app.parser import _PER_LAYER_RULES, _TARGETS, GOAL_ARGS
from .configs import from_namespace


def _source(args: argparse.Namespace) -> Any:
    from .workflows import Source

    return from_namespace(Source, args)


def _out(argument: str, check: Callable[[], Any]) -> None:
    """Run an output check before any work; its error names the argument."""
    try:
        check()
    except (ValueError, OSError) as e:
        raise ValueError(f"argument {argument}: {e}") from None


def _file_out(path: str, suffix: str) -> None:
    """An output file may be new or an earlier ``suffix`` file, in a writable folder."""
    from .files import check_writable

    p = Path(os.path.abspath(path))
    if p.is_dir() or (p.exists() and p.suffix != suffix):
        raise ValueError(f"{p} exists and is not a {suffix} file; it is never replaced")
    check_writable(p.parent, p)


# Each handler checks its output argument before any work, then builds its config from the
# parsed arguments with configs.from_namespace: every argument's dest is the field's name.

def _demo(args: argparse.Namespace) -> int:
    from .demo import check_demo_out, run_demo

    _out("--out", lambda: check_demo_out(Path(args.out_dir), overwrite=args.overwrite))
    run_demo(_compress_config(args))
    return 0


def _train(args: argparse.Namespace) -> int:
    from .app.train_shipped import RegistryTrainConfig, train_registry_model
    from .models.checkpoint import check_checkpoint_target

    _out("--out", lambda: check_checkpoint_target(args.out_dir, args.model))
    train_registry_model(from_namespace(RegistryTrainConfig, args))
    return 0


def _compress(args: argparse.Namespace) -> int:
    from .io import check_save_target
    from .workflows import run_compress

    if args.hf_model is not None:
        return _compress_hf(args)
    if args.calibration_text is not None or args.distill_steps or args.target_scope is not None \
            or args.distill_target is not None or args.fit or args.sequential or args.weighting:
        raise ValueError("--calibration-text, --distill-steps, --distill-target, --target-scope, --fit, "
                         "--sequential and --weighting only apply with --hf-model")
    _out("--out", lambda: check_save_target(args.out_dir, overwrite=args.overwrite))
    run_compress(_compress_config(args))
    return 0


def _compress_hf(args: argparse.Namespace) -> int:
    """--hf-model: the Hugging Face encoder pipeline (tensorslim.app.hf.run_compress_hf)."""
    from .app.hf import HFCompressConfig, run_compress_hf
    from .io import check_save_target

    if args.model is not None or args.checkpoint is not None:
        raise ValueError("--hf-model cannot be combined with --model or --checkpoint: give one model")
    if args.multi_stage or args.finetune_steps or args.reconstruct_steps:
        raise ValueError("--hf-model takes --distill-steps for recovery, not --finetune-steps, "
                         "--reconstruct-steps or --multi-stage")
    _out("--out", lambda: check_save_target(args.out_dir, overwrite=args.overwrite))
    run_compress_hf(HFCompressConfig(
        model=args.hf_model, out_dir=args.out_dir, method=args.method, goal=_goal(args),
        calibration_text=args.calibration_text, calibration_batches=args.calibration_batches,
        distill_steps=args.distill_steps, distill_target=args.distill_target or "sentence",
        target_scope=args.target_scope or "linears", overwrite=args.overwrite, threads=args.threads,
        **{k: getattr(args, k) for k in ("fit", "sequential", "weighting") if getattr(args, k) is not None}))
    return 0


def _compress_config(args: argparse.Namespace) -> Any:
    from .workflows import CompressConfig

    return from_namespace(CompressConfig, args, source=_source(args), goal=_goal(args))


def _goal(args: argparse.Namespace) -> dict[str, Any]:
    """The make_plan goal of the parsed arguments (validated by make_plan): a target or a
    per-layer --rank-rule is required."""
    goal = {k: getattr(args, k) for k in GOAL_ARGS if getattr(args, k, None) is not None}
    if "target_latency" in goal:  # timed at the batch the report's latency is measured at
        goal.update(latency_batch=args.latency_batch, layout=getattr(args, "layout", None))
    elif getattr(args, "layout", None) is not None:
        raise ValueError("argument --layout: only takes effect with --target-latency")
    if not set(_TARGETS) & set(goal) and goal.get("rank_rule") not in _PER_LAYER_RULES:
        raise ValueError(f"one of the arguments {' '.join('--' + t.replace('_', '-') for t in _TARGETS)} "
                         f"is required (or --rank-rule {'|'.join(_PER_LAYER_RULES)}, which choose "
                         "ranks per layer)")
    return goal


def _sweep(args: argparse.Namespace) -> int:
    from .sweep import SweepOptions
    from .workflows import SweepConfig, check_sweep_out, run_sweep_config

    _out("--out", lambda: check_sweep_out(args.out_dir))
    run_sweep_config(from_namespace(SweepConfig, args, source=_source(args),
                                    options=from_namespace(SweepOptions, args)))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .report import ModelSummary, summary_table
    from .workflows import EvaluateConfig, run_evaluate

    res = run_evaluate(from_namespace(EvaluateConfig, args, source=_source(args)))
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(summary_table([ModelSummary(res["label"], res["accuracy"], res["params"], res["macs"],
                                          res["latency_ms"])]))
        print(f"(test images: {res['test_images']}, input {res['input_size']}x{res['input_size']}, "
              f"MACs per image, latency at batch {res['latency_batch']} with {res['threads']} threads)")
        if res["plan_latency"]:
            p = res["plan_latency"]
            print(f"latency plan (batch {p['batch']}, {p['layout']}, {p['threads']} threads, BatchNorms "
                  f"folded): predicted {p['predicted_ms']:.3f} ms, measured now {p['measured_ms']:.3f} ms "
                  f"(dense when planned {p['dense_ms']:.3f} ms)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .workflows import ExportConfig, run_export

    _out("--out", lambda: _file_out(args.out, ".onnx"))
    res = run_export(from_namespace(ExportConfig, args, source=_source(args)))
    print(json.dumps(res.to_dict(), indent=2) if args.json else res.table())
    if res.matches is False:
        print("tensorslim export: error: onnxruntime outputs differ from torch beyond the tolerance",
              file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    return parser.build_parser({"demo": _demo, "train": _train, "compress": _compress, "sweep": _sweep,
                                "evaluate": _evaluate, "export": _export})


# user errors: one line on stderr, exit code 2 (OSError: unreadable input, unwritable output)
USER_ERRORS = (ValueError, TypeError, OSError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. A user error is one line on stderr and exit code 2; set
    TENSORSLIM_DEBUG=1 to see its traceback."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a bad argument (2, one line already printed)
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.func(args)
    except USER_ERRORS as e:
        if os.environ.get("TENSORSLIM_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        print(f"tensorslim {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def entry() -> int:
    """The ``tensorslim`` console script: re-launch under TCMalloc if asked for and not yet
    loaded (:func:`tensorslim.runtime.relaunch`), then :func:`main`."""
    from .runtime import allocator_choice, relaunch, script_argv

    argv = sys.argv[1:]
    try:
        relaunch(script_argv(argv), allocator_choice(argv))
    except ValueError as e:
        print(f"tensorslim: error: {e}", file=sys.stderr)
        return 2
    return main(argv)


if __name__ == "__main__":
    raise SystemExit(entry())
