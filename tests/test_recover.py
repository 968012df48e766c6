"""recover(): refit -> BatchNorm re-calibration -> fine-tune, each skipped at 0, config JSON."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tensorslim.calibrate import recalibrate_bn
from tensorslim.methods import oneshot
from tensorslim.reconstruct import reconstruct
from tensorslim.recover import RecoverConfig, recover, resolve_bn_steps
from tensorslim.train import evaluate, fine_tune


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _dense() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()


def _data(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 8, 8, generator=g) * 2 + 1, torch.randint(0, 4, (8,), generator=g))
            for _ in range(n)]


def _student(dense: nn.Module) -> nn.Module:
    """The dense model with its second conv Tucker-2 decomposed (no recovery)."""
    return oneshot(dense, "tucker", torch.randn(1, 3, 8, 8), ranks={"3": 4}, progress=False).model


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class _Recording(list):
    """A list of batches that logs who iterated it."""

    def __init__(self, batches, name: str, log: list[str]) -> None:
        super().__init__(batches)
        self.name, self.log = name, log

    def __iter__(self):
        self.log.append(self.name)
        return super().__iter__()


def test_config_json_round_trip_defaults_and_checks():
    cfg = RecoverConfig(reconstruct_steps=3, bn_steps=None, finetune_steps=7, lr=0.02,
                        distill=False, distill_alpha=0.3, distill_T=2.0, seed=5)
    assert RecoverConfig.from_json(cfg.to_json()) == cfg
    assert RecoverConfig.from_dict(cfg.to_dict()) == cfg
    assert RecoverConfig() == RecoverConfig(0, None, 0, 0.01, True, 0.5, 4.0, 0)
    # bn_steps=None: 50 batches unless a refit ran (then 0)
    assert RecoverConfig().bn_batches == 50 and RecoverConfig().steps() == ("bn",)
    assert cfg.bn_batches == 0 and cfg.steps() == ("reconstruct", "finetune")
    assert RecoverConfig(reconstruct_steps=2, bn_steps=6).steps() == ("reconstruct", "bn")
    assert RecoverConfig(bn_steps=0).steps() == ()
    assert resolve_bn_steps(None, 0) == 50 and resolve_bn_steps(None, 16) == 0
    assert resolve_bn_steps(7, 16) == 7
    for field, bad in [("reconstruct_steps", -1), ("bn_steps", 1.5), ("finetune_steps", True)]:
        with pytest.raises(ValueError, match=f"{field} must be an int >= 0"):
            RecoverConfig(**{field: bad})
    with pytest.raises(ValueError, match="lr must be a number > 0, got 0"):
        RecoverConfig(lr=0)
    with pytest.raises(ValueError, match="distill_alpha"):
        RecoverConfig(distill_alpha=1.5)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['steps'\]"):
        RecoverConfig.from_dict({"steps": 3})


def test_steps_run_in_order_and_equal_the_hand_written_pipeline():
    dense, data = _dense(), _data()
    cfg = RecoverConfig(reconstruct_steps=2, bn_steps=3, finetune_steps=6, lr=0.02, seed=4)
    log: list[str] = []
    loaders = {s: _Recording(data, s, log) for s in ("reconstruct", "bn", "finetune")}
    res = recover(_student(dense), dense, cfg, loaders=loaders, evaluate=lambda m: evaluate(m, data)["accuracy"],
                  progress=False)
    assert res.ran == ("reconstruct", "bn", "finetune") and res.config == cfg
    assert list(dict.fromkeys(log)) == ["reconstruct", "bn", "finetune"]  # first use of each
    assert res.history["bn_batches"] == 3 and res.history["finetune"]["steps"] == 6
    (fit,) = res.history["reconstruct"]
    assert fit["name"] == "3" and fit["error_after"] < fit["error_before"]
    assert list(res.accuracy) == ["start", "reconstruct", "bn", "finetune"]
    assert res.accuracy["finetune"] == evaluate(res.model, data)["accuracy"]
    assert not res.model.training
    # the same calls written out by hand give bit-identical weights
    manual = _student(dense)
    reconstruct(manual, dense, data, steps=2, progress=False)
    recalibrate_bn(manual, data, steps=3)
    fine_tune(manual, data, epochs=2, max_steps=6, lr=0.02, teacher=copy.deepcopy(dense).eval(),
              seed=4, progress=False, log_every=0)
    assert _same(manual, res.model)
    # the dense model is left as it was
    assert _same(dense, _dense())


def test_each_step_is_skipped_at_zero():
    dense, data = _dense(), _data()
    none = recover(_student(dense), dense, RecoverConfig(bn_steps=0), train_loader=data, progress=False)
    assert none.ran == () and none.history == {} and none.accuracy == {}
    assert _same(none.model, _student(dense))
    only_bn = recover(_student(dense), dense, RecoverConfig(bn_steps=2), train_loader=data,
                      progress=False)
    assert only_bn.ran == ("bn",) and only_bn.history == {"bn_batches": 2}
    student = _student(dense)  # BN statistics changed, weights not
    assert not torch.equal(only_bn.model[4].running_mean, student[4].running_mean)
    assert torch.equal(only_bn.model[3].core.weight, student[3].core.weight)
    # no distillation: plain cross-entropy, a different result than with the teacher
    kd = recover(_student(dense), dense, RecoverConfig(bn_steps=0, finetune_steps=3),
                 train_loader=data, progress=False)
    ce = recover(_student(dense), dense, RecoverConfig(bn_steps=0, finetune_steps=3, distill=False),
                 train_loader=data, progress=False)
    assert kd.history["finetune"]["steps"] == ce.history["finetune"]["steps"] == 3
    assert kd.history["finetune"]["loss"] != ce.history["finetune"]["loss"]


def test_evaluate_at_and_errors():
    dense, data = _dense(), _data()
    calls: list[int] = []

    def acc(model: nn.Module) -> float:
        calls.append(1)
        return evaluate(model, data)["accuracy"]

    res = recover(_student(dense), dense, RecoverConfig(bn_steps=2, finetune_steps=2),
                  train_loader=data, evaluate=acc, evaluate_at=("bn", "finetune"), progress=False)
    assert list(res.accuracy) == ["bn", "finetune"] and len(calls) == 2
    assert all(0.0 <= a <= 1.0 for a in res.accuracy.values())
    with pytest.raises(ValueError, match="recover: finetune needs a train_loader"):
        recover(_student(dense), dense, RecoverConfig(bn_steps=0, finetune_steps=2))
    with pytest.raises(ValueError, match=r"unknown step name\(s\) \['refit'\]"):
        recover(_student(dense), dense, RecoverConfig(), loaders={"refit": data})
    with pytest.raises(TypeError, match="config must be a RecoverConfig"):
        recover(_student(dense), dense, {"bn_steps": 2}, train_loader=data)  # type: ignore[arg-type]


def test_pipeline_configs_map_to_the_recovery_with_the_project_defaults():
    from tensorslim.demo import demo_config
    from tensorslim.workflows import CompressConfig, Source

    def compress(**kw):
        return CompressConfig(Source(model="vgg16"), "tucker", seed=3, **kw).recover_config()

    # without fine-tuning: 16 refit batches, so no BN re-calibration
    assert compress() == RecoverConfig(reconstruct_steps=16, bn_steps=0, finetune_steps=0, lr=0.01, seed=3)
    # before fine-tuning (or MUSCO stages): no refit, 50 BN batches
    assert compress(finetune_steps=400, finetune_lr=0.02) == RecoverConfig(0, 50, 400, 0.02, True, seed=3)
    assert compress(multi_stage=True).steps() == ("bn",)
    assert compress(reconstruct_steps=2, bn_steps=5).steps() == ("reconstruct", "bn")
    demo = demo_config().recover_config()
    assert demo == RecoverConfig(reconstruct_steps=16, bn_steps=0, finetune_steps=300, lr=0.01, seed=0)
    assert demo.steps() == ("reconstruct", "finetune")
