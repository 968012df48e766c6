import copy
import json

import pytest
import torch

import tensorslim as ts
from tensorslim.plan import CompressionPlan


@pytest.mark.parametrize("method", ["tucker", "cp", "svd", "auto"])
@pytest.mark.parametrize("target", [0.25, 0.5])
def test_target_macs_met_within_2_percent(small_cnn, image, method, target):
    plan = ts.make_plan(small_cnn, method, image, target_macs=target)
    assert plan.macs_ratio <= target * 1.000001
    assert plan.macs_ratio >= target * 0.98
    counted = ts.count(ts.compress(small_cnn, plan, progress=False), image)
    assert counted.total_macs == plan.macs_after
    assert counted.total_params == plan.params_after
    for spec in plan.layers:  # planned == counted, layer by layer
        assert counted[spec.name].macs == spec.macs_after, spec.name
        assert counted[spec.name].params == spec.params_after, spec.name


def test_target_params(seq_net, sequence):
    plan = ts.make_plan(seq_net, "svd", sequence, target_params=0.5)
    assert 0.49 <= plan.params_ratio <= 0.5
    assert plan.goal["objective"] == "params"


def test_unreachable_target_says_best_ratio(small_cnn, image):
    with pytest.raises(ValueError, match=r"unreachable.*best reachable target_macs=0\.\d+"):
        ts.make_plan(small_cnn, "tucker", image, target_macs=0.001)


def test_layers_that_cannot_save_are_kept_with_reason(small_cnn, image):
    plan = ts.make_plan(small_cnn, "tucker", image, target_macs=0.3, rank_rule="uniform")
    assert all(len(s.reason) <= 100 and "\n" not in s.reason for s in plan.layers)  # one line each
    for spec in plan.compressed:  # nothing compressed gets more expensive
        assert spec.macs_after < spec.macs_before
    dw = plan["features.9"]
    assert dw.method == "keep" and "depthwise" in dw.reason
    lin = plan["head.1"]  # a Tucker-2 of a matrix is its truncated SVD: Linear layers get SVD
    assert lin.method == "svd" and lin.macs_after < lin.macs_before
    assert lin.reason == "svd: a matrix's Tucker-2 is its truncated SVD"
    assert all(s.method == "tucker" for s in plan.compressed if s.layer_type == "Conv2d")


@pytest.mark.parametrize("method", ["tucker", "cp"])
def test_matrix_layers_get_svd_unless_excluded(small_cnn, image, method):
    x1 = torch.nn.Sequential(torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.Conv2d(32, 48, 1),
                             torch.nn.Flatten(), torch.nn.Linear(48 * 28 * 28, 64)).eval()
    plan = ts.make_plan(x1, method, image, ranks={"1": 8, "3": 8})
    for name in ("1", "3"):  # the 1x1 conv and the Linear layer
        s = plan[name]
        assert (s.method, s.rank) == ("svd", 8) and s.reason.startswith("svd: ") and "\n" not in s.reason
    counted = ts.count(ts.compress(copy.deepcopy(x1), plan, progress=False), image)
    assert counted.total_macs == plan.macs_after
    kept = ts.make_plan(x1, method, image, target_macs=0.5, exclude=["1"])  # the user keeps the 1x1 conv
    assert kept["1"].method == "keep" and kept["1"].reason == "not selected by include/exclude"
    assert kept["3"].method == "svd"


def test_manual_rank_that_does_not_pay_is_kept(small_cnn, image):
    plan = ts.make_plan(small_cnn, "tucker", image, ranks=64)
    spec = plan["features.5"]  # 48 -> 64 at (48, 64): full rank, more MACs than dense
    assert spec.method == "keep" and "would not reduce macs" in spec.reason
    assert plan.macs_after <= plan.macs_before


def test_manual_ranks_per_layer_and_errors(small_cnn, image):
    plan = ts.make_plan(small_cnn, "tucker", image, ranks={"features.5": (8, 16)}, measure_error=True)
    spec = plan["features.5"]
    assert spec.method == "tucker" and tuple(spec.rank) == (8, 16)
    assert 0 < spec.error < 1
    assert plan["features.2"].method == "keep"
    with pytest.raises(ValueError, match="features.5"):
        ts.make_plan(small_cnn, "tucker", image, ranks={"features.5": (0, 16)})
    with pytest.raises(ValueError, match="features.5"):
        ts.make_plan(small_cnn, "tucker", image, ranks={"features.5": (49, 16)})


def test_energy_rule_keeps_fraction(seq_net, sequence):
    plan = ts.make_plan(seq_net, "svd", sequence, energy=0.9)
    for spec in plan.compressed:
        w = seq_net.get_submodule(spec.name).weight.detach().double().reshape(
            seq_net.get_submodule(spec.name).weight.shape[0], -1)
        s2 = torch.linalg.svdvals(w) ** 2
        kept = s2[: spec.rank].sum() / s2.sum()
        assert kept >= 0.9 and s2[: spec.rank - 1].sum() / s2.sum() < 0.9


def test_include_exclude(small_cnn, image):
    plan = ts.make_plan(small_cnn, "auto", image, target_macs=0.6, exclude=["head.*"])
    assert all(not s.compressed for s in plan.layers if s.name.startswith("head"))
    plan = ts.make_plan(small_cnn, "auto", image, ranks=0.25, include="head.*")
    assert {s.name for s in plan.compressed} <= {"head.1", "head.3"}


def test_plan_json_round_trip(small_cnn, image, tmp_path):
    plan = ts.make_plan(small_cnn, "auto", image, target_macs=0.4, measure_error=True)
    again = CompressionPlan.from_json(plan.to_json())
    assert again == plan
    plan.save(tmp_path / "plan.json")
    assert CompressionPlan.load(tmp_path / "plan.json") == plan
    assert json.loads((tmp_path / "plan.json").read_text())["version"] == 1


def test_plan_rejects_bad_input(small_cnn, image):
    with pytest.raises(ValueError, match="known methods: cp, tucker, svd, tt, auto"):
        ts.make_plan(small_cnn, "magic", image, ranks=4)
    with pytest.raises(ValueError, match="exactly one of"):
        ts.make_plan(small_cnn, "tucker", image)
    with pytest.raises(ValueError, match="target_macs must be"):
        ts.make_plan(small_cnn, "tucker", image, target_macs=1.5)
    with pytest.raises(ValueError, match="example_inputs"):
        ts.make_plan(small_cnn, "tucker", None, ranks=4)
    with pytest.raises(TypeError, match="nn.Module"):
        ts.make_plan("model", "tucker", image, ranks=4)
    with pytest.raises(ValueError, match="unsupported plan version"):
        CompressionPlan.from_json('{"version": 99, "layers": [], "method": "svd"}')
    with pytest.raises(ValueError, match="not valid JSON"):
        CompressionPlan.from_json("{")


def test_with_errors_records_errors_and_rejects_unknown_layers(small_cnn, image):
    plan = ts.make_plan(small_cnn, "tucker", image, target_macs=0.5)
    name = plan.compressed[0].name
    assert plan[name].error is None
    again = plan.with_errors({name: 0.25, plan.layers[-1].name: None})
    assert again[name].error == 0.25 and again.layers[-1].error == plan.layers[-1].error
    assert again.macs_after == plan.macs_after and CompressionPlan.from_json(again.to_json()) == again
    with pytest.raises(ValueError, match="no layers \\['nope'\\]"):
        plan.with_errors({"nope": 0.1})


def test_plan_records_fused_batchnorms_and_old_plans_load():
    from tensorslim.plan import FusedBN

    plan = CompressionPlan(layers=(), method="keep",
                           fused=(FusedBN("features.1", "features.0", "TuckerConv2d"),))
    data = json.loads(plan.to_json())
    assert data["fused"] == [{"bn": "features.1", "into": "features.0", "into_type": "TuckerConv2d"}]
    assert CompressionPlan.from_json(plan.to_json()) == plan
    assert "fused: 1 BatchNorm(s) folded" in plan.table()
    del data["fused"]  # a plan written before issue 16
    assert CompressionPlan.from_dict(data).fused == ()
    for bad in ({"bn": "a", "into": 3, "into_type": "Conv2d"}, ["a", "b"], "a"):
        with pytest.raises(ValueError, match="'fused' entry must be an object"):
            CompressionPlan.from_dict({**data, "fused": [bad]})
    with pytest.raises(ValueError, match="'fused' must be a JSON list, got dict"):
        CompressionPlan.from_dict({**data, "fused": {"bn": "a"}})
