"""One parametrised contract test for every registered pipeline (methods/registry.py).

Each pipeline runs its own ``smoke`` settings on two tiny registry models (a VGG-16 and a
ResNet-20 at width 0.25, so plain, strided and residual convs, BatchNorms and a Linear head
are all there) with a few random labelled batches, and must: leave the input model
untouched; return a new model whose output has the dense model's shape; return a
CompressionPlan that round-trips through JSON and whose MACs equal the counted MACs of the
model it returned; replay through ``ts.save`` / ``ts.load(model=fresh dense)`` to identical
outputs; and refuse a goal it does not accept with a message naming the accepted ones.
"""
from __future__ import annotations


import pytest
import torch

import tensorslim as ts
from tensorslim.methods.registry import PIPELINES, Pipeline, pipeline
from tensorslim.plan import CompressionPlan

import tensorslim.methods  # noqa: F401 - registers every pipeline

NAMES = sorted(PIPELINES)
ARCHES = ("vgg16", "resnet20")


def _model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return ts.models.create(arch, width=0.25).eval()


def _batches(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g))
            for _ in range(n)]


def _data_kwargs(p: Pipeline, batches: list) -> dict:
    if p.data == "train_loader":
        return {"train_loader": batches}
    if p.data == "calibration":
        return {"calibration": [x for x, _ in batches]}
    return {}


def _run(p: Pipeline, arch: str):
    dense, batches = _model(arch), _batches()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    x = batches[0][0][:1]  # batch 1: plans count MACs for the example inputs as given
    res = p.run(dense, x, **_data_kwargs(p, batches), **dict(p.smoke))
    return dense, before, x, res


def test_registry_refuses_unknown_pipeline():
    with pytest.raises(ValueError, match="unknown pipeline 'nope'.*known"):
        pipeline("nope")


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("name", NAMES)
def test_pipeline_contract(name, arch, tmp_path):
    p = PIPELINES[name]
    dense, before, x, res = _run(p, arch)
    for k, v in dense.state_dict().items():  # the input model is left untouched
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert res.model is not dense
    res.model.eval()
    with torch.no_grad():
        y, y_dense = res.model(x), dense(x)
    assert y.shape == y_dense.shape and torch.isfinite(y).all()
    plan = res.plan
    assert isinstance(plan, CompressionPlan)
    assert CompressionPlan.from_json(plan.to_json()) == plan
    c, c_dense = ts.count(res.model, x), ts.count(dense, x)
    params, macs, params_d, macs_d = c.total_params, c.total_macs, c_dense.total_params, c_dense.total_macs
    assert plan.macs_before == macs_d and plan.params_before == params_d
    if p.exact_counts:
        assert (plan.params_after, plan.macs_after) == (params, macs)
    assert res.history is not None
    ts.save(res.model, plan, tmp_path / "ckpt")
    again = ts.load(tmp_path / "ckpt", model=_model(arch)).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), y, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_pipeline_refuses_goals_it_does_not_take(name):
    p = PIPELINES[name]
    other = [g for g in ("target_macs", "target_params", "ranks", "lam") if g not in p.goals]
    if not other:
        assert p.goal_kwargs({p.goals[0]: 0.5})  # takes every goal
        return
    with pytest.raises(ValueError, match=f"--method {name} takes"):
        p.goal_kwargs({other[0]: 0.5})


def test_cli_names_every_registered_pipeline():
    from tensorslim.app.parser import PIPELINE_NAMES

    assert sorted(PIPELINE_NAMES) == NAMES


def test_cli_refuses_an_unknown_method_with_the_known_ones(capsys):
    from tensorslim.cli import main

    assert main(["compress", "--model", "vgg16", "--method", "nope", "--target-macs", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "argument --method: expected one of cp, tucker, svd, tt, auto" in err
