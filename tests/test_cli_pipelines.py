"""``tensorslim compress --method NAME`` runs a registered pipeline end to end on the shipped
model and real Fashion-MNIST images, and its checkpoint reloads to the same outputs."""
from __future__ import annotations

import pytest
import torch

import tensorslim as ts
from tensorslim.cli import main


@pytest.mark.slow
def test_compress_runs_the_ron_pipeline_and_its_checkpoint_reloads(tmp_path, capsys):
    out = tmp_path / "ron"
    argv = ["compress", "--model", "vgg16", "--method", "ron", "--target-macs", "0.5",
            "--reconstruct-steps", "4", "--test-subset", "500", "--latency-batch", "4",
            "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "MACs ratio" in text and "edit: ron_tail" in text
    plan = ts.CompressionPlan.load(out / "plan.json")
    assert plan.method == "ron" and plan.edits and plan.macs_ratio <= 0.5
    assert "pipeline ron" in (out / "report.md").read_text()
    model = ts.load(out).eval()  # the registry architecture recorded, the edits replayed
    x = torch.randn(2, 1, 28, 28)
    assert ts.count(model, x[:1]).total_macs == plan.macs_after
    dense = ts.models.load_pretrained("vgg16").eval()
    with torch.no_grad():
        assert model(x).shape == dense(x).shape


def test_a_pipeline_refuses_a_goal_it_does_not_take(capsys):
    assert main(["compress", "--model", "vgg16", "--method", "ron", "--energy", "0.9",
                 "--out", "/nonexistent/x"]) == 2
    err = capsys.readouterr().err
    assert "--method ron takes --target-macs, --ranks; got --energy" in err, err


def test_multi_stage_is_refused_for_a_pipeline(tmp_path, capsys):
    assert main(["compress", "--model", "vgg16", "--method", "norton", "--target-macs", "0.5",
                 "--multi-stage", "--out", str(tmp_path / "o")]) == 2
    assert "--multi-stage is MUSCO's" in capsys.readouterr().err
