"""Issue 16 item 1: fused models round-trip through ts.save / ts.load exactly; the plan records
the folded BatchNorms and checkpoints written before that field existed keep loading."""
import copy
import json

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import tensorslim as ts
from tensorslim.plan import CompressionPlan, FusedBN

from test_fuse import randomize_bn

KEEP = CompressionPlan(layers=(), method="keep")


def _same(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    assert a.state_dict().keys() == b.state_dict().keys()
    with torch.no_grad():
        assert_close(b(x), a(x), rtol=0, atol=0)


def test_a_fused_dense_registry_model_round_trips(tmp_path):
    model = ts.fuse(randomize_bn(ts.models.create("vgg16", width=0.25)))
    ts.save(model, KEEP, tmp_path / "ck")
    plan = json.loads((tmp_path / "ck" / "plan.json").read_text())
    assert len(plan["fused"]) == 13
    assert plan["fused"][0] == {"bn": "features.1", "into": "features.0", "into_type": "Conv2d"}
    loaded = ts.load(tmp_path / "ck").eval()
    assert isinstance(loaded.features[1], nn.Identity) and loaded.features[0].bias is not None
    assert loaded.tensorslim_fused == model.tensorslim_fused
    _same(model, loaded, torch.randn(2, 1, 32, 32))


@pytest.mark.parametrize("method", ["tucker", "auto", "cp"])
def test_compressed_then_fused_round_trips(tmp_path, method):
    torch.manual_seed(0)
    dense = randomize_bn(ts.models.create("resnet20"))
    x = torch.randn(2, 1, 32, 32)
    goal = {"ranks": 8} if method == "cp" else {"target_macs": 0.5}
    plan = ts.make_plan(dense, method, x, **goal)
    model = ts.fuse(ts.compress(copy.deepcopy(dense), plan, progress=False))
    ts.save(model, plan, tmp_path / "ck")
    loaded = ts.load(tmp_path / "ck").eval()
    saved = CompressionPlan.load(tmp_path / "ck" / "plan.json")
    assert saved.layers == plan.layers and len(saved.fused) == 21
    assert {f.into_type for f in saved.fused} > {"Conv2d"}  # factorized layers absorbed some
    _same(model, loaded, x)


class _Head(nn.Module):
    """Linear + BatchNorm1d pairs (TT and SVD compress Linear layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(512, 256, bias=False), nn.BatchNorm1d(256)
        self.fc2, self.bn2 = nn.Linear(256, 216), nn.BatchNorm1d(216)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.fc2(torch.relu(self.bn1(self.fc1(x)))))


@pytest.mark.parametrize("fuse_first", [False, True])
def test_tt_layers_round_trip_whichever_came_first(tmp_path, fuse_first):
    """Fused then compressed, the TT layers decompose the folded weights (no out_scale);
    compressed then fused, they get an out_scale: load replays the folds in the saved order."""
    torch.manual_seed(0)
    dense = randomize_bn(_Head())
    x = torch.randn(6, 512)
    start = ts.fuse(dense) if fuse_first else copy.deepcopy(dense)
    plan = ts.make_plan(start, "tt", x, ranks=4)
    model = ts.compress(copy.deepcopy(start), plan, progress=False)
    if not fuse_first:
        model = ts.fuse(model)
    assert plan["fc1"].method == plan["fc2"].method == "tt"
    assert (model.fc1.out_scale is None) == fuse_first
    ts.save(model, plan, tmp_path / "ck")
    loaded = ts.load(tmp_path / "ck", model=copy.deepcopy(dense)).eval()
    _same(model, loaded, x)


def test_a_checkpoint_written_before_the_fused_field_still_loads(tmp_path):
    torch.manual_seed(0)
    dense = randomize_bn(ts.models.create("resnet20"))
    x = torch.randn(2, 1, 32, 32)
    plan = ts.make_plan(dense, "tucker", x, target_macs=0.5)
    model = ts.compress(copy.deepcopy(dense), plan, progress=False)
    ts.save(model, plan, tmp_path / "old")
    path = tmp_path / "old" / "plan.json"
    old = json.loads(path.read_text())
    del old["fused"]  # what the code before issue 16 wrote
    path.write_text(json.dumps(old))
    loaded = ts.load(tmp_path / "old").eval()
    assert not hasattr(loaded, "tensorslim_fused")
    _same(model, loaded, x)
    # and it can be fused after loading, then saved and loaded again
    fused = ts.fuse(loaded)
    ts.save(fused, CompressionPlan.load(path), tmp_path / "new")
    _same(fused, ts.load(tmp_path / "new").eval(), x)


def test_saving_a_loaded_fused_model_keeps_the_record(tmp_path):
    model = ts.fuse(randomize_bn(ts.models.create("resnet20")))
    ts.save(model, KEEP, tmp_path / "a")
    loaded = ts.load(tmp_path / "a")
    ts.save(loaded, KEEP, tmp_path / "b")  # the plan given has no record: the model's counts
    assert len(CompressionPlan.load(tmp_path / "b" / "plan.json").fused) == 21


def test_save_refuses_a_plan_whose_fused_batchnorm_is_still_there(tmp_path):
    model = randomize_bn(ts.models.create("resnet20"))
    plan = CompressionPlan(layers=(), method="keep", fused=(FusedBN("bn1", "conv1", "Conv2d"),))
    with pytest.raises(ValueError, match="records BatchNorm bn1 as folded into conv1, but the "
                                         "model's bn1 is a BatchNorm2d"):
        ts.save(model, plan, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("entry,match", [
    ({"bn": "nowhere", "into": "conv1", "into_type": "Conv2d"}, "has no such module"),
    ({"bn": "bn1", "into": "layers", "into_type": "Sequential"}, "cannot fold: its input comes "
                                                                 "from a Sequential"),
    ({"bn": "bn1", "into": "conv1"}, "not a valid compression plan.*'fused' entry"),
])
def test_a_bad_fused_record_is_one_clear_value_error(tmp_path, entry, match):
    model = ts.fuse(randomize_bn(ts.models.create("resnet20")))
    ts.save(model, KEEP, tmp_path / "ck")
    path = tmp_path / "ck" / "plan.json"
    plan = json.loads(path.read_text())
    plan["fused"][0] = entry
    path.write_text(json.dumps(plan))
    with pytest.raises(ValueError, match=match):
        ts.load(tmp_path / "ck")
