"""configs: one way to take settings (resolve), one CLI mapping (from_namespace), and every
command's parsed defaults against its config's defaults."""
import argparse
import dataclasses

import pytest

from tensorslim.configs import field_names, from_namespace, resolve, to_dict


@dataclasses.dataclass(frozen=True)
class Box:
    name: str
    size: int = 3
    tags: tuple[str, ...] = ("a",)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size!r}")


def test_resolve_overrides_a_config_a_mapping_or_the_defaults():
    base = Box("x", size=5)
    assert resolve(Box, base, {}, "f") is base
    assert resolve(Box, base, {"size": 7}, "f") == Box("x", 7, ("a",))
    assert resolve(Box, {"name": "m", "size": 2}, {"size": 4}, "f") == Box("m", 4, ("a",))
    assert resolve(Box, None, {"name": "k"}, "f") == Box("k", 3, ("a",))
    with pytest.raises(ValueError, match="size must be >= 1, got 0"):  # the dataclass validates
        resolve(Box, base, {"size": 0}, "f")


def test_resolve_errors_are_one_line_and_name_the_caller():
    with pytest.raises(TypeError) as e:
        resolve(Box, None, {"name": "x", "sise": 2}, "make_box")
    assert str(e.value) == ("make_box: unknown setting(s) 'sise' (did you mean 'size'?); "
                            "accepted: name, size, tags")
    with pytest.raises(TypeError) as e:
        resolve(Box, {"colour": 1}, {}, "make_box")
    assert str(e.value) == "make_box: unknown setting(s) 'colour'; accepted: name, size, tags"
    with pytest.raises(TypeError) as e:
        resolve(Box, None, {"size": 2}, "make_box")
    assert str(e.value) == "make_box: missing required setting(s) 'name'"
    with pytest.raises(TypeError) as e:
        resolve(Box, [("name", "x")], {}, "make_box")
    assert str(e.value) == "make_box: config must be a Box or a mapping of its fields, got list"


def test_from_namespace_keeps_defaults_for_none_and_takes_extra():
    args = argparse.Namespace(name="n", size=None, tags=("b",), func=print, json=True)
    assert from_namespace(Box, args) == Box("n", 3, ("b",))  # None: the field's default
    assert from_namespace(Box, args, size=9) == Box("n", 9, ("b",))
    assert from_namespace(Box, argparse.Namespace(size=4), name="e") == Box("e", 4, ("a",))
    with pytest.raises(TypeError, match="^Box: missing required setting\\(s\\) 'name'$"):
        from_namespace(Box, argparse.Namespace(size=4))
    assert field_names(Box) == ("name", "size", "tags")
    assert to_dict(Box("n")) == {"name": "n", "size": 3, "tags": ["a"]}


# ---- every command's parsed defaults are its config's defaults --------------------------------

def _parse(*argv):
    from tensorslim.cli import build_parser

    return build_parser().parse_args(list(argv))


def test_compress_and_demo_defaults():
    from tensorslim.cli import _compress_config
    from tensorslim.demo import DEMO
    from tensorslim.workflows import CompressConfig, Source

    cfg = _compress_config(_parse("compress", "--model", "vgg16", "--ranks", "4"))
    assert cfg == CompressConfig(Source(model="vgg16"), goal={"ranks": 4})
    assert _compress_config(_parse("demo")) == DEMO  # the demo's parser defaults are the preset
    cfg = _compress_config(_parse("demo", "--target-macs", "0.5", "--out", "o", "--bn-steps", "3"))
    assert cfg == dataclasses.replace(DEMO, goal={"target_macs": 0.5, "rank_rule": "min_error"},
                                      out_dir="o", bn_steps=3)
    full = _compress_config(_parse("compress", "--checkpoint", "c", "--method", "cp", "--target-macs", "0.5",
                                   "--rank-rule", "accuracy_drop", "--max-drop", "0.01", "--exclude", "fc*",
                                   "--finetune-steps", "5", "--out", "o", "--overwrite", "--multi-stage"))
    assert full == CompressConfig(Source(checkpoint="c"), "cp", {"target_macs": 0.5, "exclude": ["fc*"],
                                                                 "rank_rule": "accuracy_drop", "drop": 0.01},
                                  out_dir="o", finetune_steps=5, overwrite=True, multi_stage=True)


def test_train_evaluate_export_defaults():
    from tensorslim.app.train_shipped import RegistryTrainConfig
    from tensorslim.workflows import EvaluateConfig, ExportConfig, Source

    assert from_namespace(RegistryTrainConfig, _parse("train")) == RegistryTrainConfig()
    assert from_namespace(RegistryTrainConfig, _parse("train", "--out", "w", "--pad-to-32", "--max-steps", "3")) \
        == RegistryTrainConfig(out_dir="w", pad_to_32=True, max_steps=3)
    src = Source(model="vgg16")
    args = _parse("evaluate", "--model", "vgg16")
    assert from_namespace(EvaluateConfig, args, source=src) == EvaluateConfig(src)
    args = _parse("evaluate", "--model", "vgg16", "--no-accuracy")
    assert from_namespace(EvaluateConfig, args, source=src) == EvaluateConfig(src, accuracy=False)
    args = _parse("export", "--model", "vgg16", "--out", "m.onnx", "--no-check")
    assert from_namespace(ExportConfig, args, source=src) == ExportConfig(src, "m.onnx", check=False)


def test_sweep_defaults_differ_from_the_library_where_documented():
    from tensorslim.sweep import SweepOptions
    from tensorslim.workflows import Source, SweepConfig

    args = _parse("sweep", "--model", "vgg16", "--layers", "features.3", "--ranks", "4,8")
    opts = from_namespace(SweepOptions, args)
    cfg = from_namespace(SweepConfig, args, source=Source(model="vgg16"), options=opts)
    assert cfg == SweepConfig(Source(model="vgg16"), opts)
    # deliberately different: the command line fine-tunes 50 steps, pins 2 threads and writes
    # runs/sweep; a Python call does not fine-tune, keeps torch's threads and writes nothing
    assert opts == SweepOptions(layers=("features.3",), ranks=(4, 8), finetune_steps=50, threads=2,
                                out_dir="runs/sweep")


@pytest.mark.parametrize("argv,configs,other", [
    (["demo"], ["CompressConfig", "Source"], {"target_macs", "rank_rule"}),
    (["train"], ["RegistryTrainConfig"], set()),
    (["compress", "--model", "m", "--ranks", "4"], ["CompressConfig", "Source"],
     {"ranks", "target_macs", "target_params", "target_latency", "layout", "energy", "include", "exclude",
      "rank_rule", "rate", "vbmf_factor", "drop", "lam",
      "hf_model", "calibration_text", "calibration_batches", "distill_steps", "distill_target", "target_scope",
      "fit", "sequential", "weighting"}),
    (["sweep", "--model", "m", "--layers", "a", "--ranks", "4"], ["SweepConfig", "SweepOptions", "Source"], set()),
    (["evaluate"], ["EvaluateConfig", "Source"], {"json"}),
    (["export", "--out", "x.onnx"], ["ExportConfig", "Source"], {"json"}),
])
def test_every_argument_is_a_config_field(argv, configs, other):
    # what from_namespace maps: no argument is lost to a dest that is not a field (the goal
    # arguments go to make_plan; --json only chooses the printout)
    from tensorslim.app.train_shipped import RegistryTrainConfig
    from tensorslim.sweep import SweepOptions
    from tensorslim.workflows import CompressConfig, EvaluateConfig, ExportConfig, Source, SweepConfig

    classes = {c.__name__: c for c in (CompressConfig, EvaluateConfig, ExportConfig, RegistryTrainConfig,
                                       Source, SweepConfig, SweepOptions)}
    names = {f for c in configs for f in field_names(classes[c])}
    dests = set(vars(_parse(*argv))) - {"func", "command", "allocator"}
    assert dests - names == other


def test_check_int_and_check_number_messages():
    from tensorslim.configs import check_int, check_number

    assert check_int("steps", 0) is None and check_int("steps", None, none_ok=True) is None
    cases = [(lambda: check_int("steps", -1), "steps must be an int >= 0, got -1"),
             (lambda: check_int("stages", True, 1, where="musco"), "musco: stages must be an int >= 1, got True"),
             (lambda: check_int("threads", 0, 1, none_ok=True), "threads must be an int >= 1 or None, got 0"),
             (lambda: check_int("every", 1.5, hint="(0: off)"), "every must be an int >= 0 (0: off), got 1.5"),
             (lambda: check_number("lr", float("inf"), lambda v: v > 0, "a number > 0", where="musco"),
              "musco: lr must be a number > 0, got inf"),
             (lambda: check_number("rate", "4", lambda v: v > 1, "a number > 1"), "rate must be a number > 1, got '4'")]
    for call, msg in cases:
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value) == msg
    check_number("rate", 4, lambda v: v > 1, "a number > 1")
