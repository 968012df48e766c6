"""One-shot compression: BatchNorm re-calibration before fine-tuning, argument checks."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tensorslim.methods import oneshot


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 8, 8, generator=g) * 2 + 1, torch.randint(0, 4, (8,), generator=g))
            for _ in range(n)]


def test_bn_statistics_are_reestimated_on_the_compressed_activations():
    dense, data, x = _net(), _batches(6), torch.randn(1, 3, 8, 8)
    res = oneshot(dense, "tucker", x, ranks={"3": 4}, train_loader=data, bn_steps=4, progress=False)
    assert res.history == {"bn_batches": 4}
    assert not res.model.training
    bn = res.model[4]
    with torch.no_grad():  # statistics of the compressed conv's output over those 4 batches,
        head = copy.deepcopy(res.model[:4]).train()  # earlier BNs normalising by batch stats
        feats = [head(xb) for xb, _ in data[:4]]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(bn.running_mean, dense[4].running_mean)
    # the input model is untouched, and bn_steps=0 keeps the dense statistics
    raw = oneshot(dense, "tucker", x, ranks={"3": 4}, train_loader=data, bn_steps=0, progress=False)
    assert raw.history == {} and torch.equal(raw.model[4].running_mean, dense[4].running_mean)
    torch.testing.assert_close(raw.model[3].project_in.weight, res.model[3].project_in.weight)


def test_fine_tune_history_follows_the_recalibration():
    res = oneshot(_net(), "tucker", torch.randn(1, 3, 8, 8), ranks={"3": 4}, train_loader=_batches(3),
                  bn_steps=2, finetune_steps=3, progress=False)
    assert res.history["bn_batches"] == 2 and res.history["steps"] == 3


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_bad_bn_steps(bad):
    with pytest.raises(ValueError, match="bn_steps must be an int >= 0 or None"):
        oneshot(_net(), "tucker", torch.randn(1, 3, 8, 8), ranks={"3": 4}, bn_steps=bad, progress=False)


def test_reconstruct_steps_refit_before_bn_and_leave_the_dense_model_alone():
    dense, data, x = _net(), _batches(6), torch.randn(1, 3, 8, 8)
    before = copy.deepcopy(dense.state_dict())
    plain = oneshot(dense, "tucker", x, ranks={"3": 4}, train_loader=data, bn_steps=0, progress=False)
    res = oneshot(dense, "tucker", x, ranks={"3": 4}, train_loader=data, bn_steps=0,
                  reconstruct_steps=3, progress=False)
    (fit,) = res.history["reconstruct"]
    assert fit["name"] == "3" and fit["samples"] == 3 * 8 * 8 * 8
    assert fit["error_after"] < fit["error_before"]
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in before.items())
    with torch.no_grad():  # the refit layer's output is closer to the dense conv's on that data
        def err(model):
            return sum(float((model[:4](xb) - dense[:4](xb)).square().sum()) for xb, _ in data[:3])
        assert err(res.model) < err(plain.model)
    # bn_steps=None: BN re-calibration (all 6 batches here) only when there is no refit
    auto = oneshot(dense, "tucker", x, ranks={"3": 4}, train_loader=data, progress=False)
    assert auto.history == {"bn_batches": 6}
    auto = oneshot(dense, "tucker", x, ranks={"3": 4}, train_loader=data, reconstruct_steps=2,
                   progress=False)
    assert list(auto.history) == ["reconstruct"]
    with pytest.raises(ValueError, match="reconstruct_steps"):
        oneshot(dense, "tucker", x, ranks={"3": 4}, train_loader=data, reconstruct_steps=-1)
    with pytest.raises(ValueError, match="needs a train_loader"):
        oneshot(dense, "tucker", x, ranks={"3": 4}, reconstruct_steps=2)


def test_plan_records_each_layers_weight_error_measured_while_decomposing():
    from tensorslim.tensor import rel_error

    dense, x = _net(), torch.randn(1, 3, 8, 8)
    res = oneshot(dense, "tucker", x, ranks={"3": 4, "0": (3, 8)}, progress=False)
    for name in ("0", "3"):
        kernel = torch.cat([t.to_tensor() for t in res.model.get_submodule(name).to_tucker()])
        w = dense.get_submodule(name).weight
        want = rel_error(w, kernel.to(w))  # the dense weight is the reference
        assert 0.05 < res.plan[name].error < 1.0
        assert res.plan[name].error == pytest.approx(float(want), rel=1e-4)
    assert res.plan["8"].error is None  # kept dense: nothing measured
    assert "at decomposition" in res.plan.table() and f"{res.plan['3'].error:.3f}" in res.plan.table()


def test_recovery_without_data_fails_before_decomposing():
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="oneshot: finetune_steps > 0 needs a train_loader"):
        oneshot(_net(), "tucker", x, ranks={"3": 4}, finetune_steps=3, progress=False)
    with pytest.raises(ValueError, match="oneshot: lr must be a number > 0, got -1"):
        oneshot(_net(), "tucker", x, ranks={"3": 4}, finetune_lr=-1, progress=False)
    # no data and nothing asked: the decomposition alone, BN statistics kept
    res = oneshot(_net(), "tucker", x, ranks={"3": 4}, progress=False)
    assert res.history == {} and torch.equal(res.model[4].running_mean, _net()[4].running_mean)
