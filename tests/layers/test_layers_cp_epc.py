"""CP layers with CPD-EPC (``from_conv(..., epc=True)``) and the ``cp_epc`` plan option."""
from __future__ import annotations

import copy

import pytest
import torch
from _layer_helpers import CONV1D_CONFIGS, CONV2D_CONFIGS, conv_input, dense_conv, hook_macs, known_factors
from torch import nn

import tensorslim as ts
from tensorslim.layers import CPConv1d, CPConv2d
from tensorslim.tensor import sensitivity


def _exact_cp_conv(dims: int, cfg: dict) -> tuple[nn.Module, int]:
    conv = dense_conv(dims, cfg)
    rank = 4 * conv.groups
    _, kernel = known_factors("cp", conv, rank)
    with torch.no_grad():
        conv.weight.copy_(kernel)
    return conv, rank


@pytest.mark.parametrize("dims,cfg", [(2, CONV2D_CONFIGS[2]), (2, CONV2D_CONFIGS[9]),
                                      (1, CONV1D_CONFIGS[2])])
def test_epc_layer_equals_dense_conv_on_exact_cp_kernel(dims, cfg):
    conv, rank = _exact_cp_conv(dims, cfg)
    cls = CPConv2d if dims == 2 else CPConv1d
    layer = cls.from_conv(conv, rank, epc=True, n_iter=500, tol=1e-12)
    x = conv_input(dims)
    assert layer.approx_error < 1e-9
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-9, atol=1e-9)


def test_epc_layer_same_error_lower_sensitivity():
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 16, 3, padding=1).double()
    plain = CPConv2d.from_conv(conv, 10)
    epc = CPConv2d.from_conv(conv, 10, epc=True)
    assert epc.approx_error <= plain.approx_error * (1 + 1e-6)
    ss_plain, ss_epc = sensitivity(plain.to_cp()[0]), sensitivity(epc.to_cp()[0])
    assert ss_epc < 0.8 * ss_plain  # measured: 31.8 -> 15.6
    w = conv.weight.detach()
    rebuilt = epc.to_cp()[0].to_tensor()
    assert float((w - rebuilt).norm() / w.norm()) == pytest.approx(epc.approx_error, rel=1e-9)


def test_epc_option_validation_and_like_cost():
    conv = nn.Conv2d(6, 8, 3)
    with pytest.raises(TypeError, match="CPConv2d: epc must be True or False"):
        CPConv2d.from_conv(conv, 4, epc="yes")
    shapes = ((6, 9, 9), (8, 7, 7))
    params, macs = CPConv2d.cost(conv, 4, *shapes, epc=True)
    assert (params, macs) == CPConv2d.cost(conv, 4, *shapes)
    # rank 4 on 6 -> 8 channels, 3x3: weights 6*4 in, 3*4 + 3*4 depthwise, 4*8 out, 8 bias;
    # MACs: the 1x1 in-projection on 9x9, the fused 3x3 depthwise and the out-projection on 7x7
    assert params == 6 * 4 + 3 * 4 + 3 * 4 + 4 * 8 + 8
    assert macs == 6 * 4 * 81 + 4 * 9 * 49 + 4 * 8 * 49
    # like(..., epc=True) is the same skeleton from_conv(..., epc=True) fills: its state loads
    # strictly and then the layer computes exactly what the decomposed one does
    like, full = CPConv2d.like(conv, 4, epc=True), CPConv2d.from_conv(conv, 4, epc=True)
    assert type(like) is CPConv2d and like.rank == 4 and like.approx_error is None
    assert sum(p.numel() for p in like.parameters()) == params
    like.load_state_dict(full.state_dict(), strict=True)
    x = torch.randn(2, 6, 9, 9, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(like(x), full(x), rtol=0, atol=0)
    assert hook_macs(like.eval(), x) == macs


class _Net(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5))


def test_make_plan_cp_epc_reaches_the_layers(tmp_path):
    torch.manual_seed(0)
    model = _Net().eval()
    dense = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    plan = ts.make_plan(model, "cp", x, ranks=6, cp_epc=True)
    cp_specs = [s for s in plan.compressed if s.method == "cp"]
    assert cp_specs and all(dict(s.options) == {"epc": True} for s in cp_specs)
    assert plan.goal["cp_epc"] is True
    assert ts.CompressionPlan.from_json(plan.to_json()) == plan
    plain = ts.make_plan(model, "cp", x, ranks=6)
    assert [s.macs_after for s in plain.layers] == [s.macs_after for s in plan.layers]

    compressed = ts.compress(model, plan, progress=False)
    ref = ts.compress(copy.deepcopy(dense), plain, progress=False)
    for spec in cp_specs:
        layer, base = compressed.get_submodule(spec.name), ref.get_submodule(spec.name)
        assert isinstance(layer, CPConv2d)
        assert layer.approx_error <= base.approx_error * (1 + 1e-5)
        assert sensitivity(layer.to_cp()[0]) <= sensitivity(base.to_cp()[0]) * (1 + 1e-6)
    ts.save(compressed, plan, tmp_path / "ckpt")  # the plan replays (like() takes epc)
    again = ts.load(tmp_path / "ckpt", model=dense)
    torch.testing.assert_close(again(x), compressed(x), rtol=0, atol=0)


def test_make_plan_cp_epc_needs_cp():
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="cp_epc .* needs method='cp'"):
        ts.make_plan(_Net(), "tucker", x, ranks=4, cp_epc=True)
    with pytest.raises(ValueError, match="cp_epc must be True or False"):
        ts.make_plan(_Net(), "cp", x, ranks=4, cp_epc="yes")
