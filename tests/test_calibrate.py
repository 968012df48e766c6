"""BatchNorm re-calibration: exact statistics, modes restored, weights untouched, errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tensorslim.calibrate import batchnorms, recalibrate_bn


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU())


def test_running_stats_are_the_equal_weight_average_of_batch_stats():
    net = _net().double()
    batches = [torch.randn(5, 3, 6, 6, dtype=torch.float64) * (i + 1) + i for i in range(3)]
    weights_before = [p.clone() for p in net.parameters()]
    net.eval()
    used = recalibrate_bn(net, [(b, torch.zeros(5)) for b in batches], steps=10)
    assert used == 3
    with torch.no_grad():
        feats = [net[0](b) for b in batches]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    bn = net[1]
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-12, atol=1e-12)
    assert not net.training and bn.momentum == 0.3  # mode and momentum restored
    assert all(torch.equal(a, b) for a, b in zip(weights_before, net.parameters()))


def test_steps_limits_the_batches_and_plain_tensors_are_accepted():
    net = _net()
    batches = [torch.randn(4, 3, 6, 6) for _ in range(5)]
    assert recalibrate_bn(net, batches, steps=2) == 2
    assert int(net[1].num_batches_tracked) == 2
    assert net.training  # was training, stays training


def test_repairs_a_network_whose_statistics_are_stale():
    net = _net().eval()
    x = torch.randn(64, 3, 6, 6) * 3 + 1
    with torch.no_grad():
        net[1].running_mean.fill_(5.0)
        net[1].running_var.fill_(0.01)
        stale = net(x)
        recalibrate_bn(net, [x], steps=1)
        fresh = net(x)
        net.train()
        ref = net(x)  # batch statistics
    assert (fresh - ref).abs().max() < 0.05 < (stale - ref).abs().max()


def test_no_batchnorm_and_bad_arguments():
    lin = nn.Linear(3, 2)
    assert batchnorms(lin) == [] and recalibrate_bn(lin, [torch.randn(2, 3)]) == 0
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        recalibrate_bn(_net(), [], steps=0)
    with pytest.raises(ValueError, match="yielded no batches"):
        recalibrate_bn(_net(), [], steps=3)
    with pytest.raises(TypeError, match="expects an nn.Module"):
        recalibrate_bn("model", [], steps=3)
