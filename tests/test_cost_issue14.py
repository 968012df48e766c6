"""Issue 14 regression tests for counting: transposed convs are counted exactly (item 7) and
a Parameter shared by several layers counts once (item 5)."""
from math import prod

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import tensorslim as ts

from test_planner_issue14 import Tied  # two convs sharing one weight


def _flops(model, x):
    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            model(x)
    return fc.get_total_flops()


# (dims, in, out, kernel, stride, padding, output_padding, groups, dilation, bias, spatial)
_TRANSPOSED = [
    (1, 4, 6, 3, 1, 0, 0, 1, 1, True, (11,)),
    (1, 6, 4, 5, 3, 2, 1, 2, 1, False, (9,)),
    (2, 8, 8, 4, 2, 0, 0, 1, 1, True, (16, 16)),
    (2, 6, 9, (3, 1), (2, 1), (1, 0), (1, 0), 3, 1, True, (7, 5)),
    (2, 4, 8, 3, 2, 1, 1, 4, 2, False, (6, 9)),
    (2, 4, 4, 2, 1, 0, 0, 4, 1, True, (5, 5)),  # depthwise transposed
    (3, 4, 6, (2, 3, 1), (2, 1, 2), (0, 1, 0), (1, 0, 1), 2, (1, 2, 1), True, (3, 5, 4)),
]


@pytest.mark.parametrize("case", _TRANSPOSED, ids=[f"t{i}" for i in range(len(_TRANSPOSED))])
def test_transposed_conv_macs_exact_and_agree_with_flop_counter(case):
    dims, c_in, c_out, k, stride, pad, opad, groups, dil, bias, spatial = case
    cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 1]
    torch.manual_seed(0)
    layer = cls(c_in, c_out, k, stride=stride, padding=pad, output_padding=opad, groups=groups,
                dilation=dil, bias=bias)
    model = nn.Sequential(layer).eval()
    x = torch.randn(2, c_in, *spatial)
    rep = ts.count(model, x)
    # every input value is multiplied into C_out/g * prod(kernel) outputs
    assert rep["0"].macs == x.numel() * (c_out // groups) * prod(layer.kernel_size)
    assert 2 * rep.total_macs == _flops(model, x)
    assert rep["0"].type == cls.__name__ and rep["0"].params == sum(p.numel() for p in layer.parameters())


def test_issue_decoder_counts_the_transposed_conv():
    # issue probe: Conv2d(4,8,3) + ConvTranspose2d(8,8,4,stride=2) counted only the Conv2d
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ConvTranspose2d(8, 8, 4, stride=2)).eval()
    x = torch.randn(1, 4, 16, 16)
    rep = ts.count(model, x)
    conv = 8 * 14 * 14 * 4 * 9
    up = 8 * 14 * 14 * 8 * 16
    assert rep.total_macs == conv + up == _flops(model, x) // 2  # before: 56,448 of 257,152
    assert [l.name for l in rep.layers] == ["0", "1"]


def test_conv3d_and_unbatched_transposed_input_counted():
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1, groups=2), nn.ConvTranspose3d(4, 2, 2, stride=2)).eval()
    x = torch.randn(1, 2, 4, 5, 6)
    assert 2 * ts.count(model, x).total_macs == _flops(model, x)
    up = nn.Sequential(nn.ConvTranspose2d(3, 5, 3, stride=2)).eval()
    u = torch.randn(3, 6, 6)  # unbatched (C, H, W) input
    assert ts.count(up, u).total_macs == u.numel() * 5 * 9 == _flops(up, u) // 2


def test_count_counts_a_tied_parameter_once():
    model = Tied().eval()
    rep = ts.count(model, torch.randn(1, 4, 8, 8))
    unique = sum(p.numel() for p in model.parameters())
    assert rep.total_params == unique == 144 + 4 + 4 + 32 * 36 + 32
    assert sum(l.params for l in rep.layers) == unique  # before: 148 + 148 + 1184 = 1480
    assert rep["a"].params == 148 and rep["b"].params == 4  # the shared weight counts in 'a'
