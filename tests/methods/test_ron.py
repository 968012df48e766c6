"""RON: exactness at full rank (VGG and residual networks, also on Tucker-2), the plan (MACs,
edits, JSON), replay, errors, and one short real run on Fashion-MNIST with the shipped VGG-16."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.methods import _ron_residual, _ron_tail
from tensorslim.methods.ron import ron
from tensorslim.plan import CompressionPlan
from tensorslim.surgery import apply_edits

from _threads import one_thread  # noqa: F401 - every test here on one thread


def _live(name: str, width: float) -> nn.Module:
    torch.manual_seed(0)
    m = ts.models.create(name, width=width).double().eval()
    with torch.no_grad():  # O(1) logits (the registry init makes them ~1e-18) and live BNs
        for mod in m.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.normal_(0, 0.3)
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.bias.normal_(0, 0.1)
    return m


def _inputs(n: int = 300) -> torch.Tensor:
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("start", ["features.17", "pool"])
def test_full_rank_ron_reproduces_the_network(start):
    m, x = _vgg(), _inputs()
    res = ron(m, x[:2], calibration=[x[:150], x[150:]], ranks="full", start_layer=start, progress=False)
    with torch.no_grad():
        assert _rel(res.model(x), m(x)) < 1e-12  # V = I, every row: the same network


def test_full_rank_svd_bases_reproduce_the_network():
    # 300 calibration samples >= every activation's dimension: the SVD bases span everything
    m, x = _vgg(), _inputs()
    res = ron(m, x[:2], calibration=[x], ranks=10**6, start_layer="features.24", progress=False)
    assert res.history["ranks"] == [128, 256, 256, 64, 64, 64, 64, 64]
    with torch.no_grad():
        assert _rel(res.model(x), m(x)) < 1e-9


def test_full_rank_ron_on_top_of_tucker2_is_exact():
    # factorized convs are linear maps too: RON runs them through the module itself
    m, x = _vgg(), _inputs()
    tucker = ts.methods.oneshot(m, "tucker", x[:2], target_macs=0.6, progress=False).model.eval()
    assert any(type(mod).__name__ == "TuckerConv2d" for mod in tucker.features[24:])
    res = ron(tucker, x[:2], calibration=[x], ranks="full", start_layer="features.24", progress=False)
    with torch.no_grad():
        assert _rel(res.model(x), tucker(x)) < 1e-12


def _vgg() -> nn.Module:
    return _live("vgg16", 0.125)


def _resnet() -> nn.Module:
    return _live("resnet20", 0.25)


@pytest.mark.parametrize("start", ["layers.1.0", "layers.2.1", "pool"])
def test_full_rank_ron_reproduces_a_residual_network(start):
    # every block's output from the sampled rows of both branches; layers.1.0 has a strided
    # conv + BN shortcut, the others identity shortcuts
    m, x = _resnet(), _inputs()
    res = ron(m, x[:2], calibration=[x[:150], x[150:]], ranks="full", start_layer=start, progress=False)
    n_blocks = sum(isinstance(mod, _ron_residual.ReducedBlock) for mod in res.model.fc)
    assert n_blocks == {"layers.1.0": 6, "layers.2.1": 2, "pool": 0}[start]
    with torch.no_grad():
        assert _rel(res.model(x), m(x)) < 1e-12


def test_full_rank_svd_bases_reproduce_a_residual_network():
    # 600 samples >= every activation's dimension (512 entering layers.2.0, 256 after)
    m, x = _resnet(), _inputs(600)
    res = ron(m, x[:2], calibration=[x], ranks=10**6, start_layer="layers.2.0", progress=False)
    assert res.history["ranks"] == [512] + [256] * 6
    with torch.no_grad():
        assert _rel(res.model(x), m(x)) < 1e-9


def test_full_rank_ron_on_top_of_tucker2_resnet_is_exact():
    m, x = _resnet(), _inputs()
    tucker = ts.methods.oneshot(m, "tucker", x[:2], target_macs=0.6, progress=False).model.eval()
    assert any(type(mod).__name__ == "TuckerConv2d" for mod in tucker.layers[1:].modules())
    res = ron(tucker, x[:2], calibration=[x], ranks="full", start_layer="layers.1.0", progress=False)
    with torch.no_grad():
        assert _rel(res.model(x), tucker(x)) < 1e-12


def test_run_affine_is_the_affine_map_of_the_modules():
    # columns A U and offset b of conv + BN, checked on random coefficients: A U c + b == f(U c)
    g = torch.Generator().manual_seed(3)
    conv, bn = nn.Conv2d(3, 4, 3, stride=2, padding=1).double(), nn.BatchNorm2d(4).double().eval()
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5, generator=g)
        bn.bias.normal_(0, 0.5, generator=g)
    U = torch.randn(3 * 6 * 6, 5, generator=g, dtype=torch.float64)
    cols, bias = _ron_residual.run_affine([conv, bn], U, (3, 6, 6))
    c = torch.randn(5, 7, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ref = bn(conv((U @ c).T.reshape(7, 3, 6, 6))).flatten(1).T
    torch.testing.assert_close(cols @ c + bias[:, None], ref, rtol=0, atol=1e-12)


def test_residual_plan_counts_exactly_and_replays():
    m, x = _resnet(), _inputs()
    res = ron(m, x[:2], calibration=[x], target_macs=0.5, progress=False)
    plan, start = res.plan, res.history["start"]
    assert start.startswith("layers.")  # the default start lies inside the residual stages
    counted = ts.count(res.model, x[:1])
    assert (plan.macs_after, plan.params_after) == (counted.total_macs, counted.total_params)
    assert plan.macs_after <= 0.5 * plan.macs_before
    (edit,) = plan.edits
    layers = edit.args["layers"]
    blocks = [mod for mod in res.model.fc if isinstance(mod, _ron_residual.ReducedBlock)]
    skipped = [l for l in layers if l["skip_features"]]
    assert len(skipped) == len(blocks) > 0
    for l, b in zip(skipped, blocks):  # the skip input is the block's input: P_in rows
        assert (l["skip_features"], l["out_features"]) == (b.skip.in_features, b.skip.out_features)
        assert l["macs_after"] == b.outer.weight.numel() + b.skip.weight.numel()
    assert sum(l["macs_after"] for l in layers) == counted.total_macs - (
        plan.macs_before - sum(l["macs_before"] for l in layers))
    fresh = apply_edits(_resnet(), plan.edits, weights=False)
    fresh.load_state_dict(res.model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), res.model(x), rtol=0, atol=0)


def test_max_pool_window_sampling_matches_max_pool():
    pool = nn.MaxPool2d(2, 2, ceil_mode=True)
    z = torch.randn(4, 3, 7, 5, dtype=torch.float64)
    win = _ron_tail.pool_windows(pool, (3, 7, 5), "test")
    got = _ron_tail.GroupMax(4)(z.flatten(1)[:, win.flatten()])
    torch.testing.assert_close(got, pool(z).flatten(1), rtol=0, atol=0)


def test_plan_records_layers_and_counts_exactly():
    m, x = _vgg(), _inputs()
    res = ron(m, x[:2], calibration=[x], target_macs=0.6, start_layer="features.17", progress=False)
    plan = res.plan
    counted = ts.count(res.model, x[:1])
    assert (plan.macs_after, plan.params_after) == (counted.total_macs, counted.total_params)
    assert plan.macs_before == ts.count(m, x[:1]).total_macs
    assert plan.macs_after <= 0.6 * plan.macs_before
    (edit,) = plan.edits
    assert edit.op == "ron_tail" and edit.target == "classifier"
    layers = edit.args["layers"]
    linears = [mod for mod in res.model.classifier if isinstance(mod, nn.Linear)]
    assert [lin.weight.shape[0] for lin in linears] == [l["out_features"] for l in layers]
    assert sum(l["macs_after"] for l in layers) == sum(w.weight.numel() for w in linears)
    for l in layers[:-1]:  # rows P_k = ceil(2 r_k) (oversample 2), sampled positions distinct
        assert l["rows"] == min(l["dim"], 2 * l["rank"]) == len(set(l["sampled"]))
    assert CompressionPlan.from_json(plan.to_json()) == plan
    # the plan alone rebuilds the shapes; the weights come from the checkpoint
    fresh = apply_edits(_vgg(), plan.edits, weights=False)
    fresh.load_state_dict(res.model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), res.model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="calibration data"):
        apply_edits(_vgg(), plan.edits, weights=True)


def test_same_seed_same_result_and_input_untouched():
    m, x = _vgg(), _inputs(64)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    a = ron(m, x[:2], calibration=[x], ranks=5, start_layer="features.24", progress=False)
    b = ron(m, x[:2], calibration=[x], ranks=5, start_layer="features.24", progress=False)
    assert a.plan == b.plan
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])


def test_ron_refuses_bad_arguments():
    m, x = _vgg(), _inputs(16)
    with pytest.raises(ValueError, match="exactly one of target_macs or ranks"):
        ron(m, x[:2], calibration=[x], progress=False)
    with pytest.raises(ValueError, match="start_layer/cut 'features.2'.*accepted: features.0"):
        ron(m, x[:2], calibration=[x], ranks=3, start_layer="features.2", progress=False)
    with pytest.raises(ValueError, match="not reachable"):
        ron(m, x[:2], calibration=[x], target_macs=0.05, start_layer="features.34", progress=False)
    with pytest.raises(ValueError, match="target_macs must be"):
        ron(m, x[:2], calibration=[x], target_macs=1.5, progress=False)
    with pytest.raises(TypeError, match="registry VGG or ResNet"):
        ron(nn.Linear(3, 2), torch.zeros(1, 3), calibration=[torch.zeros(2, 3)], ranks=1, progress=False)
    r = ts.models.create("resnet20", width=0.25)
    with pytest.raises(ValueError, match="start_layer/cut 'layers.2'.*accepted: layers.0.0"):
        ron(r, x[:2].float(), calibration=[x.float()], ranks=3, start_layer="layers.2",
            progress=False)


def test_real_fashion_mnist_half_the_macs():
    """Shipped VGG-16, 384 calibration images, the first 1024 official test images: RON at
    target_macs=0.5 from features.14 on (no fine-tuning) stays within 4 points of the dense
    accuracy."""
    from tensorslim.train import evaluate

    m = ts.models.load_pretrained("vgg16").eval()
    loaders = ts.data.make_loaders(128, augment=False, subset=384)
    cal = [x for x, _ in loaders.train]
    test = [b for _, b in zip(range(8), loaders.test)]
    res = ron(m, cal[0][:2], calibration=cal, target_macs=0.5, start_layer="features.14",
              progress=False)
    assert res.plan.macs_after <= 0.5 * res.plan.macs_before
    assert res.plan.macs_after == ts.count(res.model, cal[0][:1]).total_macs
    dense, small = evaluate(m, test)["accuracy"], evaluate(res.model, test)["accuracy"]
    assert small >= dense - 0.04, (dense, small)


@pytest.mark.parametrize("net", ["vgg", "resnet"])
def test_default_start_has_the_least_held_out_error(net):
    # each candidate is scored by the reduced network fitted on the first 3/4 of the
    # calibration samples; brute force: RON from that start on those samples alone, its
    # relative logit error on the last 1/4; the winner is then refitted on all samples
    m, x = (_vgg() if net == "vgg" else _resnet()), _inputs()
    res = ron(m, x[:2], calibration=[x[:150], x[150:]], target_macs=0.5, progress=False)
    scores, n_fit = res.history["start_scores"], 300 - res.history["holdout_samples"]
    assert n_fit == 225 and len([v for v in scores.values() if v is not None]) >= 2
    for start, score in scores.items():
        if score is None:
            continue
        alone = ron(m, x[:2], calibration=[x[:n_fit]], target_macs=0.5, start_layer=start,
                    progress=False)
        with torch.no_grad():
            assert score == pytest.approx(_rel(alone.model(x[n_fit:]), m(x[n_fit:])), rel=1e-9)
    assert res.history["start"] == min((s for s in scores if scores[s] is not None), key=scores.get)
    fixed = ron(m, x[:2], calibration=[x], target_macs=0.5, start_layer=res.history["start"],
                progress=False)
    assert fixed.history["start_scores"] is None and fixed.plan == res.plan
