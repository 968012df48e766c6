import json
import math
import os

import pytest
import torch
from _bounds import eckart_young, unfold_rank

import tensorslim as ts
from tensorslim.cli import build_parser, main

COMMANDS = ["demo", "train", "compress", "sweep", "evaluate", "export"]


def _code(argv) -> int:
    """Exit code of ``tensorslim argv``, whether argparse exits or main returns."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_every_command_has_help(capsys):
    parser = build_parser()
    for cmd in COMMANDS:
        with pytest.raises(SystemExit) as e:
            parser.parse_args([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: tensorslim " + cmd in capsys.readouterr().out


@pytest.mark.slow
def test_demo_runs_end_to_end_on_tiny_settings(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--finetune-steps", "10", "--reconstruct-steps", "2", "--test-subset", "500",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tucker + 10 steps KD" in text and "MACs ratio" in text
    for name in ["report.md", "summary.png", "layers.png", "checkpoint/plan.json", "checkpoint/model.safetensors"]:
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "| model | test acc % |" in report and "## Per-layer plan" in report


def test_bad_argument_is_a_clear_error(capsys):
    assert main(["demo", "--target-macs", "7", "--out", "/nonexistent/x"]) == 2
    assert "argument --target-macs: expected a number in (0, 1], got '7'" in capsys.readouterr().err


def test_demo_is_a_preset_of_compress():
    from tensorslim.demo import DEMO, demo_config
    from tensorslim.workflows import CompressConfig, Source

    cfg = demo_config()
    assert cfg is DEMO and isinstance(cfg, CompressConfig)
    assert (cfg.source, cfg.method, dict(cfg.goal)) == (Source(model="vgg16_w050"), "tucker",
                                                         {"target_macs": 0.25, "rank_rule": "min_error"})
    assert (cfg.finetune_steps, cfg.reconstruct_steps, cfg.bn_steps, cfg.out_dir) == (300, 16, None, "runs/demo")
    # the recovery it runs: 16 refit batches, so no BN re-calibration, then 300 KD steps
    rc = cfg.recover_config()
    assert (rc.reconstruct_steps, rc.bn_batches, rc.finetune_steps, rc.lr) == (16, 0, 300, 0.01)
    assert rc.steps() == ("reconstruct", "finetune")
    # settings override the preset; the rest stays the demo's
    small = demo_config(finetune_steps=10, test_subset=500)
    assert (small.finetune_steps, small.test_subset, small.reconstruct_steps, small.every_step) == (10, 500, 16, True)
    assert demo_config({"threads": 1}).threads == 1 and demo_config({"threads": 1}).method == "tucker"
    with pytest.raises(ValueError, match="compress: reconstruct_steps must be an int >= 0, got -2"):
        demo_config(reconstruct_steps=-2)
    with pytest.raises(ValueError, match="compress: bn_steps must be an int >= 0, got -1"):
        demo_config(bn_steps=-1)
    with pytest.raises(TypeError, match=r"demo: unknown setting\(s\) 'target_macs'; accepted: source, method, goal"):
        demo_config(target_macs=0.5)  # a goal setting: goal={"target_macs": 0.5, ...}


def test_resolve_defaults_of_bn_and_reconstruct_steps():
    from tensorslim.workflows import resolve_bn_steps, resolve_reconstruct_steps

    # BN re-calibration by default only without the refit; an explicit value always wins
    assert resolve_bn_steps(None, 16) == 0 and resolve_bn_steps(None, 0) == 50
    assert resolve_bn_steps(7, 16) == 7 and resolve_bn_steps(0, 0) == 0
    # compress: the refit by default only for a model used without fine-tuning
    assert resolve_reconstruct_steps(None, 0, False) == 16
    assert resolve_reconstruct_steps(None, 400, False) == 0
    assert resolve_reconstruct_steps(None, 0, True) == 0
    assert resolve_reconstruct_steps(3, 400, True) == 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny VGG-16 (width 1/8) trained 150 steps on real Fashion-MNIST by `tensorslim train`."""
    out = tmp_path_factory.mktemp("train")
    assert main(["train", "--model", "vgg16", "--width", "0.125", "--epochs", "1", "--max-steps", "150",
                 "--batch-size", "64", "--subset", "9600", "--threads", "1", "--out", str(out)]) == 0
    info = json.loads((out / "vgg16.json").read_text())
    assert info["arch"]["kwargs"]["width"] == 0.125 and info["steps"] == 150
    assert info["test_accuracy"] > 0.4  # 10 classes: far above chance after 150 steps
    return out


def test_compress_evaluate_export_end_to_end(trained, tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["compress", "--checkpoint", str(trained), "--method", "tucker", "--target-macs", "0.5",
                 "--finetune-steps", "10", "--test-subset", "300", "--latency-batch", "8",
                 "--threads", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tucker + 10 steps KD" in text and "MACs ratio" in text and "total: params" in text
    for name in ["model.safetensors", "plan.json", "meta.json", "report.md", "summary.png", "layers.png"]:
        assert (out / name).is_file(), name
    plan = ts.CompressionPlan.load(out / "plan.json")
    assert plan.macs_ratio <= 0.5 * 1.02 and plan.compressed
    # every factorized layer's weight error, measured while decomposing, in plan and report:
    # no lower than the Eckart-Young floor of its rank on the dense weight, and below 1
    dense = ts.models.load_checkpoint("vgg16", trained)
    for s in plan.compressed:
        layer = dense.get_submodule(s.name)
        floor = eckart_young(layer.weight, getattr(layer, "groups", 1), unfold_rank(s.rank))
        assert floor * (1 - 1e-5) <= s.error < 1.0, (s.name, s.error, floor)
    spec = plan.compressed[0]
    report = (out / "report.md").read_text()
    assert f"| {spec.name} | " in report and f" {spec.error:.3f} | " in report
    acc = _report_accuracy(report)
    assert list(acc)[0] == "dense" and list(acc)[-1] == "tucker + 10 steps KD"

    assert main(["evaluate", "--checkpoint", str(out), "--test-subset", "300", "--latency-batch", "4",
                 "--threads", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["macs"] == plan.macs_after and res["params"] == plan.params_after
    # the saved checkpoint scores what the compressed model scored in memory on the same 300
    # test images (the report's last row, to its 2 decimals in %), well above chance (10 %,
    # +- 1.7 points on 300 images); the dense row is the trained model's recorded accuracy
    # (10000 images) to within 3 sigma of 300 images
    assert res["test_images"] == 300 and f"{100 * res['accuracy']:.2f}" == acc["tucker + 10 steps KD"]
    assert res["accuracy"] >= 0.15, (acc, res["accuracy"])
    dense_acc = json.loads((trained / "vgg16.json").read_text())["test_accuracy"]
    assert abs(float(acc["dense"]) / 100 - dense_acc) <= 0.08, (acc["dense"], dense_acc)
    assert res["latency_batch"] == 4 and math.isfinite(res["latency_ms"]) and res["latency_ms"] > 0
    assert main(["evaluate", "--checkpoint", str(out), "--no-accuracy", "--latency-batch", "2",
                 "--threads", "1"]) == 0
    assert f"{plan.params_after:,d}" in capsys.readouterr().out

    onnx_path = out / "model.onnx"
    assert main(["export", "--checkpoint", str(out), "--out", str(onnx_path), "--latency-batch", "4",
                 "--threads", "1", "--json"]) == 0
    exp = json.loads(capsys.readouterr().out)
    assert onnx_path.is_file() and exp["matches"] is True and exp["max_abs_diff"] <= 1e-4
    # --fuse: every BatchNorm folded (13 in VGG-16), and the fused export still matches torch
    fused_path = out / "fused.onnx"
    assert main(["export", "--checkpoint", str(out), "--out", str(fused_path), "--fuse",
                 "--latency-batch", "4", "--threads", "1", "--json"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("fuse: folded 13 BatchNorm(s), left 0")
    fexp = json.loads(text[text.index("{"):])
    assert fexp["matches"] is True and fexp["max_abs_diff"] <= 1e-4
    import onnx

    ops = {n.op_type for n in onnx.load(str(fused_path)).graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops


def _report_accuracy(report: str) -> dict[str, str]:
    """label -> "test acc %" cell of report.md's model table (the first table)."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| model | test acc % |"))
    rows = []
    for line in lines[start + 2:]:  # after the header and its |---| line
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.split("|")[1:-1]])
    return {r[0]: r[1] for r in rows}


def test_compress_with_per_layer_ranks_and_weights_file(trained, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["compress", "--model", "vgg16", "--weights", str(trained / "vgg16.safetensors"),
                 "--method", "cp", "--ranks", '{"features.24": 4}', "--test-subset", "200",
                 "--latency-batch", "2", "--threads", "1", "--reconstruct-steps", "0",
                 "--out", str(out)]) == 0
    plan = ts.CompressionPlan.load(out / "plan.json")
    assert [(s.name, s.rank) for s in plan.compressed] == [("features.24", 4)]
    assert "cp (no fine-tune, BN re-calibrated)" in capsys.readouterr().out
    assert "BatchNorm re-calibration: 50 training batches" in (out / "report.md").read_text()
    # --bn-steps 0: the same factors, the dense model's BatchNorm statistics
    raw = tmp_path / "raw"
    assert main(["compress", "--model", "vgg16", "--weights", str(trained / "vgg16.safetensors"),
                 "--method", "cp", "--ranks", '{"features.24": 4}', "--test-subset", "200",
                 "--latency-batch", "2", "--threads", "1", "--bn-steps", "0", "--reconstruct-steps",
                 "0", "--out", str(raw)]) == 0
    assert "cp (no fine-tune)" in capsys.readouterr().out
    a, b = ts.load(out).state_dict(), ts.load(raw).state_dict()
    assert torch.equal(a["features.24.project_in.weight"], b["features.24.project_in.weight"])
    assert not torch.allclose(a["features.25.running_mean"], b["features.25.running_mean"])
    assert int(a["features.25.num_batches_tracked"]) == 50
    # a refit (the default is 16 batches) changes only the last factor; BN stays dense by default
    fit = tmp_path / "fit"
    assert main(["compress", "--model", "vgg16", "--weights", str(trained / "vgg16.safetensors"),
                 "--method", "cp", "--ranks", '{"features.24": 4}', "--test-subset", "200",
                 "--latency-batch", "2", "--threads", "1", "--reconstruct-steps", "2",
                 "--out", str(fit)]) == 0
    assert "cp (no fine-tune, refit)" in capsys.readouterr().out
    assert "data-aware refit of the factors: 2 training batches" in (fit / "report.md").read_text()
    c = ts.load(fit).state_dict()
    assert torch.equal(c["features.24.project_in.weight"], b["features.24.project_in.weight"])
    assert not torch.allclose(c["features.24.project_out.weight"], b["features.24.project_out.weight"])
    assert torch.equal(c["features.25.running_mean"], b["features.25.running_mean"])


def test_sweep_command(trained, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sweep", "--checkpoint", str(trained), "--layers", "features.24", "--ranks", "2,8",
                 "--methods", "cp,tucker", "--finetune-steps", "2", "--test-subset", "200",
                 "--latency-batch", "2", "--repeats", "2", "--threads", "1", "--out", str(out)]) == 0
    lines = (out / "sweep.csv").read_text().splitlines()
    assert lines[0].startswith("layer,method,rank,params_dense") and len(lines) == 1 + 4
    assert (out / "sweep_features.24.png").is_file()
    assert "features.24" in capsys.readouterr().out


@pytest.mark.parametrize("argv,msg", [
    (["compress", "--model", "vgg16", "--method", "foo", "--ranks", "4"], "argument --method: expected one of cp, tucker, svd, tt, auto"),
    (["compress", "--model", "vgg16", "--ranks", "4", "--target-macs", "0.5"],
     "argument --target-macs: not allowed with argument --ranks"),
    (["compress", "--model", "vgg16"], "one of the arguments --ranks --target-macs --target-params --target-latency --energy --lam is required"),
    (["compress", "--model", "vgg16", "--ranks", "lots"], "expected an int (8), a fraction in (0, 1]"),
    (["compress", "--checkpoint", "/nonexistent/ckpt", "--ranks", "4"], "checkpoint folder /nonexistent/ckpt does not exist"),
    (["evaluate", "--checkpoint", "/nonexistent/ckpt"], "checkpoint folder /nonexistent/ckpt does not exist"),
    (["export", "--model", "vgg16", "--weights", "/nonexistent/w.safetensors", "--out", "/tmp/x.onnx"],
     "weights file /nonexistent/w.safetensors does not exist"),
    (["evaluate", "--model", "nope"], "unknown model 'nope'; known models: resnet18, resnet20, vgg16"),
    (["evaluate"], "no model given: pass --model NAME"),
    (["sweep", "--model", "vgg16", "--layers", "features.3", "--ranks", "4,x"], "expected comma-separated ints"),
])
def test_bad_inputs_exit_2_with_a_message(argv, msg, capsys):
    assert _code(argv) == 2
    assert msg in capsys.readouterr().err


def test_bad_sweep_layer_and_method(trained, capsys):
    base = ["sweep", "--checkpoint", str(trained), "--ranks", "4", "--finetune-steps", "0",
            "--test-subset", "100", "--threads", "1"]
    assert _code(base + ["--layers", "features.99"]) == 2
    assert "accepted conv layers: features.0, features.3" in capsys.readouterr().err
    assert _code(base + ["--layers", "features.3", "--methods", "cp,tt"]) == 2
    assert "unknown sweep method(s) ['tt']; known: cp, tucker, svd" in capsys.readouterr().err


# ---- issue 14: every user error is one line on stderr, exit code 2, no traceback -------------

def _bad_inputs(tmp):
    torch.save(torch.nn.Linear(2, 2), tmp / "module.pt")  # a pickled module
    (tmp / "empty.safetensors").write_bytes(b"")
    (tmp / "afile").write_text("keep me")
    (tmp / "foreign").mkdir()
    (tmp / "foreign" / "results.csv").write_text("keep me")
    ev = ["evaluate", "--model", "vgg16", "--no-accuracy", "--latency-batch", "1", "--threads", "1"]
    co = ["compress", "--model", "vgg16", "--ranks", "0.5", "--test-subset", "10", "--latency-batch", "1",
          "--threads", "1", "--out"]
    ro = "/sys/tensorslim-test/c" if os.geteuid() == 0 else str(_read_only(tmp) / "c")
    return {
        "pickled module": (ev + ["--weights", str(tmp / "module.pt")], "--weights: ", "pickled objects"),
        "empty safetensors": (ev + ["--weights", str(tmp / "empty.safetensors")], "--weights: ",
                              "truncated or corrupt"),
        "threads 0": (ev + ["--threads", "0"], "argument --threads: ", "expected a positive int"),
        "latency batch -3": (ev + ["--latency-batch", "-3"], "argument --latency-batch: ", "positive int"),
        "latency batch 0": (ev + ["--latency-batch", "0"], "argument --latency-batch: ", "positive int"),
        "read-only out": (co + [ro], "argument --out: ", "is not a writable folder"),
        "out is a file": (co + [str(tmp / "afile")], "argument --out: ", "is not a folder"),
        "out is foreign": (co + [str(tmp / "foreign")], "argument --out: ", "not a tensorslim checkpoint"),
        "export out is a folder": (["export", "--model", "vgg16", "--out", str(tmp / "foreign")],
                                   "argument --out: ", "is not a .onnx file"),
        "train out clash": (["train", "--out", str(tmp / "foreign2")], "argument --out: ",
                            "not a tensorslim model checkpoint"),
        "sweep csv clash": (["sweep", "--model", "vgg16", "--layers", "features.3", "--ranks", "4",
                             "--out", str(tmp / "foreign3")], "argument --out: ", "not a tensorslim sweep"),
        "bad subcommand": (["squash"], "invalid choice", "squash"),
    }


def _read_only(tmp):
    d = tmp / "ro"
    d.mkdir()
    d.chmod(0o555)
    return d


BAD = ["pickled module", "empty safetensors", "threads 0", "latency batch -3", "latency batch 0",
       "read-only out", "out is a file", "out is foreign", "export out is a folder", "train out clash",
       "sweep csv clash", "bad subcommand"]


@pytest.mark.parametrize("case", BAD)
def test_user_errors_are_one_line_exit_2(case, tmp_path, capsys):
    (tmp_path / "foreign2").mkdir()
    (tmp_path / "foreign2" / "vgg16.json").write_text("not json")
    (tmp_path / "foreign3").mkdir()
    (tmp_path / "foreign3" / "sweep.csv").write_text("a,b\n1,2\n")
    argv, flag, msg = _bad_inputs(tmp_path)[case]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert len(err.splitlines()) == 1 and flag in err and msg in err and "Traceback" not in err, err
    assert "decomposing" not in out + err  # refused before any work
    assert (tmp_path / "afile").read_text() == "keep me"
    assert os.listdir(tmp_path / "foreign") == ["results.csv"]
    assert (tmp_path / "foreign3" / "sweep.csv").read_text() == "a,b\n1,2\n"


def test_debug_env_shows_the_traceback(tmp_path, capsys, monkeypatch):
    (tmp_path / "e.safetensors").write_bytes(b"")
    argv = ["evaluate", "--model", "vgg16", "--no-accuracy", "--weights", str(tmp_path / "e.safetensors")]
    monkeypatch.setenv("TENSORSLIM_DEBUG", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("tensorslim evaluate: error: --weights")


def test_console_script_errors_are_one_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "tensorslim.cli", "evaluate", "--model", "vgg16",
                           "--threads", "0"], capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and "--threads" in proc.stderr


def test_compress_out_checkpoint_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "c"
    ts.save(torch.nn.Linear(2, 2), ts.CompressionPlan(layers=(), method="keep"), out)
    argv = ["compress", "--model", "vgg16", "--ranks", "0.5", "--test-subset", "10", "--latency-batch", "1",
            "--reconstruct-steps", "0", "--bn-steps", "0",
            "--threads", "1", "--out", str(out)]
    assert main(argv) == 2
    assert "already holds a tensorslim checkpoint; pass overwrite=True (--overwrite)" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0
    plan = ts.CompressionPlan.load(out / "plan.json")
    assert plan.compressed and (out / "report.md").is_file()
    assert sum(p.numel() for p in ts.load(out).parameters()) == plan.params_after


def test_demo_out_rules(tmp_path):
    from tensorslim.demo import check_demo_out

    check_demo_out(tmp_path / "new")  # new folder
    (tmp_path / "other.txt").write_text("x")
    check_demo_out(tmp_path)  # unrelated files are never touched
    (tmp_path / "report.md").write_text("# my report")
    with pytest.raises(ValueError, match=r"holds \['report.md'\] but no demo checkpoint"):
        check_demo_out(tmp_path)
    ts.save(torch.nn.Linear(2, 2), ts.CompressionPlan(layers=(), method="keep"), tmp_path / "checkpoint")
    check_demo_out(tmp_path)  # an earlier demo's output: replaced by the next run


def test_compress_target_latency_goes_to_make_plan_with_the_latency_batch():
    from tensorslim.cli import _goal, build_parser

    def goal(*extra):
        return _goal(build_parser().parse_args(["compress", "--model", "vgg16", *extra]))

    assert goal("--target-latency", "0.6", "--latency-batch", "8") == {
        "target_latency": 0.6, "latency_batch": 8, "layout": None}
    assert goal("--target-latency", "0.6", "--layout", "nchw")["layout"] == "nchw"
    assert goal("--target-latency", "0.6")["latency_batch"] == 64  # the report's latency batch
    with pytest.raises(ValueError, match="^argument --layout: only takes effect with --target-latency$"):
        goal("--target-macs", "0.5", "--layout", "nchw")
    assert main(["compress", "--model", "vgg16", "--target-latency", "0.5", "--target-macs", "0.5"]) == 2
