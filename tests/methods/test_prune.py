"""L1-norm filter pruning (Li et al. 2017): MAC targets, top-L1 choice, exact slicing."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tensorslim import count
from tensorslim.methods.prune import PruneResult, l1_prune
from tensorslim.models import create

X = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(3))


class BranchNet(nn.Module):
    """Functional pooling, a concat, a Linear after ``view`` over 5x5 maps (groups of 25)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 12, 3, padding=1)
        self.c3, self.c4 = nn.Conv2d(12, 6, 1), nn.Conv2d(12, 6, 1)
        self.c5, self.b5 = nn.Conv2d(12, 10, 3), nn.BatchNorm2d(10)
        self.fc = nn.Linear(10 * 5 * 5, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)
        x = F.avg_pool2d(torch.relu(self.c2(x)), 2)  # (B, 12, 7, 7)
        x = torch.cat([self.c3(x), self.c4(x)], 1)
        x = F.leaky_relu(self.b5(self.c5(x)), 0.1)  # (B, 10, 5, 5)
        return self.fc(x.view(x.size(0), -1))


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = BranchNet() if name == "branchnet" else create(
        name, **({"width": 0.25} if name == "vgg16" else {}))
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.fixture(scope="module", params=["vgg16", "resnet20"])
def pruned(request) -> tuple[str, nn.Module, PruneResult]:
    model = _model(request.param)
    return request.param, model, l1_prune(model, X, target_macs=0.25)


def test_target_macs_met_and_counted(pruned) -> None:
    name, model, res = pruned
    dense = count(model, X)
    assert res.macs_before == dense.total_macs
    assert res.params_before == dense.total_params
    assert 0.98 * 0.25 * res.macs_before <= res.macs_after <= 0.25 * res.macs_before
    after = count(res.model, X)
    assert after.total_macs == res.macs_after
    assert after.total_params == res.params_after < res.params_before
    assert res.model(X).shape == (2, 10)
    modules = dict(res.model.named_modules())
    for conv, idx in res.kept.items():
        assert modules[conv].out_channels == len(idx)
        c = dict(model.named_modules())[conv].out_channels
        floor_keep = max(1, c - math.floor(res.ratio * c))  # the global ratio, +1 from fill
        assert floor_keep <= len(idx) <= floor_keep + 1


def test_which_convs_are_pruned(pruned) -> None:
    name, model, res = pruned
    if name == "vgg16":
        assert len(res.kept) == 13 and res.skipped == {}
        assert isinstance(res.model.classifier[0], nn.Linear)
        assert res.model.classifier[0].in_features == len(res.kept["features.40"])
        return
    firsts = {f"layers.{s}.{b}.conv1" for s in range(3) for b in range(3)}
    assert set(res.kept) == firsts
    residual = {f"layers.{s}.{b}.conv2" for s in range(3) for b in range(3)}
    residual |= {"conv1", "layers.1.0.shortcut.0", "layers.2.0.shortcut.0"}
    assert set(res.skipped) == residual
    assert all("residual add" in why for why in res.skipped.values())
    block = res.model.layers[1][2]
    k = len(res.kept["layers.1.2.conv1"])
    assert (block.bn1.num_features, block.conv2.in_channels, block.conv2.out_channels) == (k, k, 32)


def test_kept_filters_are_top_l1(pruned) -> None:
    name, model, res = pruned
    conv, bn, prev = (("features.3", "features.4", "features.0") if name == "vgg16"
                      else ("layers.2.1.conv1", "layers.2.1.bn1", None))
    old = dict(model.named_modules())
    new = dict(res.model.named_modules())
    norms = old[conv].weight.abs().sum(dim=(1, 2, 3))
    keep = res.kept[conv]
    dropped = sorted(set(range(len(norms))) - set(keep))
    assert len(dropped) > 0
    assert norms[list(keep)].min() > norms[dropped].max()  # every kept filter beats every dropped
    w = old[conv].weight[list(keep)]
    if prev is not None:
        w = w[:, list(res.kept[prev])]
    torch.testing.assert_close(new[conv].weight, w, rtol=0, atol=0)
    for attr in ("weight", "bias", "running_mean", "running_var"):
        torch.testing.assert_close(getattr(new[bn], attr), getattr(old[bn], attr)[list(keep)],
                                   rtol=0, atol=0)


@pytest.mark.parametrize("name", ["vgg16", "resnet20"])
def test_target_one_is_the_same_model(name: str) -> None:
    model = _model(name)
    res = l1_prune(model, X, target_macs=1.0)
    assert res.kept == {} and res.ratio == 0.0
    assert res.macs_after == res.macs_before and res.params_after == res.params_before
    assert res.model is not model
    assert torch.equal(res.model(X), model(X))


@pytest.mark.parametrize("name", ["vgg16", "resnet20", "branchnet"])
def test_pruning_dead_filters_keeps_outputs(name: str) -> None:
    model = _model(name)
    counts = {k: len(v) for k, v in l1_prune(model, X, target_macs=0.5, fill=False).kept.items()}
    dead: dict[str, list[int]] = {}
    gen = torch.Generator().manual_seed(1)
    modules = dict(model.named_modules())
    bn_of = _bn_of(name)
    with torch.no_grad():
        for conv, k in counts.items():
            c = modules[conv].out_channels
            dead[conv] = torch.randperm(c, generator=gen)[: c - k].tolist()
            modules[conv].weight[dead[conv]] = 0.0
            if modules[conv].bias is not None:
                modules[conv].bias[dead[conv]] = 0.0
            bn = modules[bn_of[conv]]
            bn.weight[dead[conv]] = 0.0
            bn.bias[dead[conv]] = 0.0
    res = l1_prune(model, X, target_macs=0.5, fill=False)
    assert {k: len(v) for k, v in res.kept.items()} == counts
    for conv, keep in res.kept.items():
        assert set(keep) == set(range(modules[conv].out_channels)) - set(dead[conv])
    assert res.macs_after < 0.5 * res.macs_before
    torch.testing.assert_close(res.model(X), model(X), rtol=1e-5, atol=1e-6)


def _bn_of(name: str) -> dict[str, str]:
    if name == "vgg16":
        return {f"features.{i}": f"features.{i + 1}"
                for i in (0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40)}
    if name == "resnet20":
        return {f"layers.{s}.{b}.conv1": f"layers.{s}.{b}.bn1" for s in range(3) for b in range(3)}
    return {"c1": "b1", "c5": "b5"}


def test_branchnet_chains_and_linear_groups() -> None:
    model = _model("branchnet")
    res = l1_prune(model, X, target_macs=0.6)
    assert set(res.kept) == {"c1", "c5"}
    assert "2 conv/linear layers" in res.skipped["c2"]
    assert "cat" in res.skipped["c3"] and "cat" in res.skipped["c4"]
    k = len(res.kept["c5"])
    assert res.model.fc.in_features == 25 * k < 250
    cols = [25 * c + j for c in res.kept["c5"] for j in range(25)]
    torch.testing.assert_close(res.model.fc.weight, model.fc.weight[:, cols], rtol=0, atol=0)
    assert count(res.model, X).total_macs == res.macs_after <= 0.6 * res.macs_before


def test_input_model_untouched_in_train_mode() -> None:
    model = _model("resnet20").train()
    model.layers[0][0].bn1.eval()  # a per-module flag that must survive too
    before = copy.deepcopy(model.state_dict())
    res = l1_prune(model, X, target_macs=0.3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and not model.layers[0][0].bn1.training
    assert res.model.training and not res.model.layers[0][0].bn1.training


def test_exclude_and_fill_off() -> None:
    model = _model("vgg16")
    res = l1_prune(model, X, target_macs=0.4, exclude=["features.0", "features.40"], fill=False)
    assert "features.0" not in res.kept and "features.40" not in res.kept
    assert res.skipped == {"features.0": "excluded by the caller",
                           "features.40": "excluded by the caller"}
    modules = dict(model.named_modules())
    for conv, keep in res.kept.items():
        c = modules[conv].out_channels
        assert len(keep) == max(1, c - math.floor(res.ratio * c))
    assert res.model.features[40].in_channels == len(res.kept["features.37"])
    assert res.macs_after <= 0.4 * res.macs_before


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if x.sum() > 0 else x


@pytest.mark.parametrize("target", [0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_bad_target_raises_value_error(target: float) -> None:
    with pytest.raises(ValueError, match=r"target_macs must be in \(0, 1\]"):
        l1_prune(_model("branchnet"), X, target_macs=target)


def test_bad_inputs_raise() -> None:
    model = _model("branchnet")
    for target in ("0.5", True, None):
        with pytest.raises(TypeError, match="target_macs must be a number"):
            l1_prune(model, X, target_macs=target)
    with pytest.raises(TypeError, match="nn.Module"):
        l1_prune("vgg16", X, target_macs=0.5)
    with pytest.raises(TypeError, match=r"torch\.fx.*TraceError"):
        l1_prune(Untraceable(), X, target_macs=0.5)
    with pytest.raises(ValueError, match=r"\['nope'\].*not Conv2d"):
        l1_prune(model, X, target_macs=0.5, exclude="nope")
    with pytest.raises(ValueError, match=r"not reachable.*leaves 0\.\d+ of the dense MACs"):
        l1_prune(_model("resnet20"), X, target_macs=0.001)
