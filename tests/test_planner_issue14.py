"""Issue 14 regression tests for planning and surgery: transposed convs in plans (item 7),
tied weights (item 5), silent no-ops (item 8), valid ranks for grouped convs (item 10) and
errors naming the layer (item 6)."""
import copy
import json

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import tensorslim as ts
from tensorslim.plan import CompressionPlan, LayerSpec
from tensorslim.surgery import build_layer


class Tied(nn.Module):
    """Two convs sharing one weight Parameter, then a plain compressible conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.b.weight = self.a.weight
        self.c = nn.Conv2d(4, 32, 3, padding=1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _flops(model, x):
    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            model(x)
    return fc.get_total_flops()


def _unique_params(model):
    return sum(p.numel() for p in model.parameters())


def _assert_count_equals_plan(model, plan, x):
    rep = ts.count(model, x)
    assert rep.total_macs == plan.macs_after and rep.total_params == plan.params_after
    assert rep.total_params == _unique_params(model)
    for spec in plan.layers:
        assert (rep[spec.name].macs, rep[spec.name].params) == (spec.macs_after, spec.params_after), spec.name


# -- item 7: transposed convs ---------------------------------------------------------------
class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(4, 32, 3, padding=1)
        self.up = nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1)
        self.dec = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        return self.dec(torch.relu(self.up(torch.relu(self.enc(x)))))


@pytest.mark.parametrize("method", ["tucker", "svd", "cp", "auto"])
def test_transposed_conv_is_listed_kept_and_its_macs_make_the_ratio_honest(method):
    torch.manual_seed(0)
    model, x = Decoder().eval(), torch.randn(2, 4, 12, 12)
    plan = ts.make_plan(model, method, x, target_macs=0.8)
    up = plan["up"]
    assert up.layer_type == "ConvTranspose2d" and up.method == "keep"
    assert "no factorized ConvTranspose2d" in up.reason
    assert plan.macs_before == _flops(model, x) // 2
    assert up.macs_before == 2 * 12 * 12 * 32 * 16 * 16
    assert plan.macs_ratio <= 0.8 + 1e-9
    _assert_count_equals_plan(ts.compress(model, plan, progress=False), plan, x)


# -- item 5: tied weights -------------------------------------------------------------------
def test_tied_convs_are_kept_dense_and_counted_once():
    torch.manual_seed(0)
    model, x = Tied().eval(), torch.randn(1, 4, 8, 8)
    plan = ts.make_plan(model, "svd", x, ranks=4)
    assert plan.params_before == _unique_params(model) == 1336  # before: layers summed 1480
    for name, other in (("a", "b"), ("b", "a")):
        assert plan[name].method == "keep" and f"weight shared with {other}" in plan[name].reason
    assert plan["c"].method == "svd"
    out = ts.compress(model, plan, progress=False)
    assert out.a.weight is out.b.weight  # the tie is intact
    _assert_count_equals_plan(out, plan, x)


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.emb(ids))))


def test_lm_head_tied_to_embedding_stays_tied():
    torch.manual_seed(0)
    model, ids = TiedLM().eval(), torch.randint(0, 50, (2, 7))
    plan = ts.make_plan(model, "svd", ids, ranks=2)
    assert plan["head"].method == "keep" and "weight shared with emb" in plan["head"].reason
    assert plan.params_before == _unique_params(model)
    out = ts.compress(model, plan, progress=False)
    assert out.head.weight is out.emb.weight
    _assert_count_equals_plan(out, plan, ids)
    handmade = plan.with_layers(tuple(
        LayerSpec(**{**s.__dict__, "method": "svd", "rank": 2}) if s.name == "head" else s for s in plan.layers))
    with pytest.raises(ValueError, match="layer head: kept dense: weight shared with emb"):
        ts.compress(TiedLM(), handmade, progress=False)


def test_module_registered_twice_is_replaced_under_both_names():
    torch.manual_seed(0)
    lin = nn.Linear(32, 32)
    model, x = nn.Sequential(lin, nn.ReLU(), lin).eval(), torch.randn(3, 32)
    plan = ts.make_plan(model, "svd", x, ranks=4)
    assert [s.name for s in plan.compressed] == ["0"]
    out = ts.compress(model, plan, progress=False)
    assert out[0] is out[2] and type(out[2]).__name__ == "LowRankLinear"  # before: [2] stayed dense
    _assert_count_equals_plan(out, plan, x)


# -- item 8: silent no-ops ------------------------------------------------------------------
def test_unknown_layer_names_and_empty_globs_are_errors_with_close_matches(small_cnn, image):
    with pytest.raises(ValueError, match=r"ranks names no layer of this model: 'featurs\.5' \(close matches: 'features\.5'"):
        ts.make_plan(small_cnn, "tucker", image, ranks={"featurs.5": 4})  # before: compressed nothing
    with pytest.raises(ValueError, match="ranks gives a rank to layers that stay dense: features.9: .*depthwise"):
        ts.make_plan(small_cnn, "tucker", image, ranks={"features.9": 4, "features.5": 4})
    with pytest.raises(ValueError, match=r"include= .* names no layer of this model: 'head\.\*x'.*'head\.1'"):
        ts.make_plan(small_cnn, "tucker", image, target_macs=0.5, include=["features.*", "head.*x"])
    with pytest.raises(ValueError, match=r"exclude= .* names no layer of this model: 'nope'"):
        ts.make_plan(small_cnn, "tucker", image, ranks=4, exclude="nope")
    with pytest.raises(ValueError, match=r"'featurs\.5' -> \['features\.5'"):
        ts.make_plan(small_cnn, "tucker", image, target_macs=0.5, rank_rule="min_error",
                     layer_weights={"featurs.5": 2.0})


def test_nothing_compressible_says_why():
    x = torch.randn(2, 64)
    qmodel = torch.ao.quantization.quantize_dynamic(
        nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)), {nn.Linear}, dtype=torch.qint8)
    with pytest.raises(ValueError, match=r"no layer of this model can be compressed with method 'svd'.*quantized"):
        ts.make_plan(qmodel, "svd", x, target_macs=0.5)  # before: an empty plan, ratio 1.0
    depthwise = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8)).eval()
    with pytest.raises(ValueError, match=r"compressed with method 'tucker': 0: .*depthwise"):
        ts.make_plan(depthwise, "tucker", torch.randn(1, 8, 6, 6), target_macs=0.5)
    tiny = nn.Sequential(nn.Linear(2, 2)).eval()  # rank 1 costs 2 + 2 MACs: no saving
    with pytest.raises(ValueError, match="0: no svd rank reduces its macs"):
        ts.make_plan(tiny, "svd", torch.randn(1, 2), target_macs=0.5)


def test_compress_refuses_a_plan_made_for_another_model():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    b = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64))
    plan = ts.make_plan(a, "svd", torch.randn(2, 64), ranks=8)
    assert plan["0"].weight_shape == (64, 64)
    with pytest.raises(ValueError, match=r"another model.*layer 0: .*weight shape \(64, 64\), the model's has shape \(64, 32\)"):
        ts.compress(b, plan, progress=False)  # before: compressed b with a's MAC numbers
    assert type(b[2]) is nn.Linear  # nothing was swapped
    old = json.loads(plan.to_json())  # a plan.json written before weight_shape existed
    for spec in old["layers"]:
        del spec["weight_shape"]
    old_plan = CompressionPlan.from_dict(old)
    assert old_plan["0"].weight_shape == ()
    out = ts.compress(copy.deepcopy(a), old_plan, progress=False)
    assert ts.count(out, torch.randn(2, 64)).total_macs == plan.macs_after


# -- item 10: fractional ranks on grouped convs ---------------------------------------------
@pytest.mark.parametrize("method", ["tucker", "svd", "cp"])
def test_fractional_rank_rounds_to_a_valid_rank_of_a_grouped_conv(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 6, 3, groups=2), nn.ReLU(), nn.Conv2d(6, 12, 3, groups=3)).eval()
    x = torch.randn(1, 6, 10, 10)
    plan = ts.make_plan(model, method, x, ranks=0.5)  # before: r_out=3 must be divisible by groups=2
    ranks = {s.name: s.rank for s in plan.compressed}
    assert set(ranks) == {"0", "2"}
    for name, g in (("0", 2), ("2", 3)):
        assert all(r % g == 0 for r in (ranks[name] if isinstance(ranks[name], tuple) else (ranks[name],)))
    if method == "tucker":
        assert ranks == {"0": (4, 4), "2": (3, 6)}  # 0.5 * (6, 6) -> (3, 3) -> (4, 4); (3, 6) valid
        assert "nearest valid rank (4, 4)" in plan["0"].reason
    if method == "svd":
        assert ranks["0"] == 4
    _assert_count_equals_plan(ts.compress(copy.deepcopy(model), plan, progress=False), plan, x)
    with pytest.raises(ValueError, match="layer 0 .*divisible by groups=2"):  # a rank by name stays exact
        ts.make_plan(model, method, x, ranks={"0": 3 if method != "tucker" else (3, 4)})


def test_energy_rank_of_a_grouped_conv_rounds_up(small_cnn, image):
    plan = ts.make_plan(small_cnn, "tucker", image, energy=0.5)  # before: r_in=13 not divisible by 2
    r_in, r_out = plan["features.7"].rank
    assert r_in % 2 == 0 and r_out % 2 == 0


# -- item 6: errors name the layer -----------------------------------------------------------
def test_build_layer_prefixes_every_error_with_the_layer():
    conv = nn.Conv2d(6, 6, 3, groups=2)
    spec = LayerSpec(name="blocks.3", layer_type="Conv2d", method="svd", rank=3, params_before=0,
                     params_after=0, macs_before=0, macs_after=0)
    with pytest.raises(ValueError, match=r"^layer blocks\.3 \(Conv2d\): .*divisible by groups=2"):
        build_layer(conv, spec)
    with pytest.raises(ValueError, match=r"^layer blocks\.3 \(Conv2d\): .*divisible by groups=2"):
        build_layer(conv, spec, decompose=False)
    conv1d = nn.Conv1d(6, 6, 3, groups=2)  # no TT layer for Conv1d (TTConv2d covers Conv2d)
    with pytest.raises(ValueError, match=r"^layer blocks\.3 \(Conv1d\): .*method='tt'"):
        build_layer(conv1d, LayerSpec(**{**spec.__dict__, "method": "tt", "layer_type": "Conv1d"}))
    lin = nn.Linear(8, 8)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^layer head \(Linear\): .*non-finite"):  # before: built, NaN outputs
        build_layer(lin, LayerSpec("head", "Linear", "svd", 2, 0, 0, 0, 0))


@pytest.mark.parametrize("goal", [dict(ranks=4), dict(energy=0.9), dict(ranks=4, measure_error=True),
                                  dict(target_params=0.7, rank_rule="min_error")])
def test_non_finite_weights_are_an_error_naming_the_layer(goal):
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16)).eval()
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"layer 2 \(Linear\): weight has 1 non-finite value.*exclude=\['2'\]"):
        ts.make_plan(model, "svd", torch.randn(2, 16), **goal)  # before: a plan, NaN outputs
    plan = ts.make_plan(model, "svd", torch.randn(2, 16), ranks=4, exclude="2")
    assert [s.name for s in plan.compressed] == ["0"]
