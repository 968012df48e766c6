import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import tensorslim as ts


def _flops(model, x):
    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            model(x)
    return fc.get_total_flops()


def test_count_matches_formula_per_layer(small_cnn, image):
    rep = ts.count(small_cnn, image)
    conv = rep["features.2"]  # 16->48, 3x3, stride 2 on 28x28 -> 14x14
    assert conv.macs == 2 * 48 * 14 * 14 * 16 * 9
    assert conv.params == 48 * 16 * 9
    dw = rep["features.9"]  # depthwise 64, 3x3 on 14x14
    assert dw.macs == 2 * 64 * 14 * 14 * 1 * 9
    grouped = rep["features.7"]
    assert grouped.macs == 2 * 64 * 14 * 14 * 32 * 9
    lin = rep["head.1"]
    assert lin.macs == 2 * 128 * 384 and lin.params == 384 * 128 + 128
    assert rep.total_params == sum(p.numel() for p in small_cnn.parameters())
    assert rep.batch_size == 2


@pytest.mark.parametrize("fixture", [("small_cnn", "image"), ("seq_net", "sequence")])
def test_count_agrees_with_flop_counter(fixture, request):
    model, x = (request.getfixturevalue(f) for f in fixture)
    assert 2 * ts.count(model, x).total_macs == _flops(model, x)


def test_count_agrees_with_flop_counter_after_compression(small_cnn, image):
    plan = ts.make_plan(small_cnn, "tucker", image, target_macs=0.5)
    ts.compress(small_cnn, plan, progress=False)
    assert 2 * ts.count(small_cnn, image).total_macs == _flops(small_cnn, image)


def test_count_accumulates_shared_modules():
    lin = nn.Linear(8, 8)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    rep = ts.count(model, torch.randn(3, 8))
    assert rep.total_macs == 2 * 3 * 8 * 8
    assert rep.total_macs * 2 == _flops(model, torch.randn(3, 8))


def test_count_rejects_bad_input(small_cnn):
    with pytest.raises(TypeError, match="example_inputs"):
        ts.count(small_cnn, "not a tensor")
    with pytest.raises(TypeError, match="nn.Module"):
        ts.count(lambda x: x, torch.randn(1))


def test_measure_latency_records_threads(small_cnn, image):
    before = torch.get_num_threads()
    lat = ts.measure_latency(small_cnn, image, repeats=5, warmup=1, threads=1)
    assert lat.threads == 1 and lat.batch_size == 2 and len(lat.times_ms) == 5
    assert 0 < lat.p10_ms <= lat.median_ms <= lat.p90_ms
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="repeats"):
        ts.measure_latency(small_cnn, image, repeats=0)


def test_count_tt_linear_matches_flop_counter():
    from tensorslim.layers import TTLinear

    model = nn.Sequential(TTLinear(256, 256, in_modes=(16, 16), out_modes=(16, 16), ranks=(4,)))
    x = torch.randn(5, 256)
    rep = ts.count(model, x)
    assert rep.total_macs > 0
    assert 2 * rep.total_macs == _flops(model, x)
