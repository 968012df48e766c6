"""The planning package: one registry of rank rules (frozen configs that round-trip through
JSON) and the public candidate-pricing functions every method uses."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import tensorslim as ts
from tensorslim.planning import (RULES, AccuracyDrop, Constant, Energy, Manual, MinError, RankRule, Uniform,
                                 VBMF, build_spec, collect_layers, layer_cost, rank_candidates, rank_space)


def _acc(model) -> float:
    return 1.0


EXAMPLES = [
    Manual(ranks={"features.2": (4, 6), "head.1": 8}),
    Manual(ranks=0.5),
    Uniform(target_macs=0.5),
    MinError(target_params=0.3, layer_weights={"head.1": 2.0}),
    Constant(rate=3.0),
    VBMF(vbmf_factor=0.5),
    Energy(energy=0.8),
    AccuracyDrop(drop=0.01, evaluate=_acc),
]


def test_every_registered_rule_has_an_example():
    assert list(RULES) == ["manual", "uniform", "min_error", "constant", "vbmf", "energy", "accuracy_drop"]
    assert {type(r) for r in EXAMPLES} == set(RULES.values())


@pytest.mark.parametrize("rule", EXAMPLES, ids=lambda r: r.name)
def test_rules_are_frozen_and_round_trip_through_json(rule):
    d = rule.to_dict()
    assert d["rank_rule"] == rule.name
    assert json.loads(json.dumps(d)) == d  # plain JSON data
    back = RankRule.from_dict(json.loads(json.dumps(d)))
    assert back == rule and type(back) is type(rule)
    assert back.to_dict() == d
    assert RankRule.from_json(rule.to_json()) == rule
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.name_of_nothing = 1  # type: ignore[attr-defined]


def test_rule_json_values():
    assert Manual(ranks={"a": (4, 6)}).to_dict() == {"rank_rule": "manual", "ranks": {"a": [4, 6]}}
    assert Constant().to_dict() == {"rank_rule": "constant", "rate": 4.0}  # defaults are written
    assert VBMF().to_dict() == {"rank_rule": "vbmf", "vbmf_factor": 0.8}
    assert Energy().to_dict() == {"rank_rule": "energy", "energy": 0.9}
    d = AccuracyDrop(evaluate=_acc).to_dict()
    assert d == {"rank_rule": "accuracy_drop", "drop": 0.005,
                 "evaluate": f"<callable {__name__}._acc>"}


@pytest.mark.parametrize("bad,err,msg", [
    (dict(rank_rule="nope"), ValueError, "known rank rules: manual, uniform"),
    (dict(rank_rule="constant", rate=0.5), ValueError, "rate must be a number >= 1"),
    (dict(rank_rule="uniform", target_macs=0.5, target_params=0.5), ValueError, "exactly one of"),
    (dict(rank_rule="uniform", target_macs=1.5), ValueError, r"target_macs must be a number in \(0, 1\]"),
    (dict(rank_rule="vbmf", rate=2.0), ValueError, r"rank_rule='vbmf' has no parameters \['rate'\]"),
    (dict(rank_rule="accuracy_drop"), TypeError, "needs evaluate=callable"),
    (["uniform"], ValueError, "must be a JSON object with 'rank_rule'"),
])
def test_from_dict_validates(bad, err, msg):
    with pytest.raises(err, match=msg):
        RankRule.from_dict(bad)


def test_plan_goal_records_the_rule(small_cnn, image):
    plan = ts.make_plan(small_cnn, "tucker", image, rank_rule="constant", rate=3)
    rule = RankRule.from_dict({k: plan.goal[k] for k in ("rank_rule", "rate")})
    assert rule == Constant(rate=3)
    plan = ts.make_plan(small_cnn, "svd", image, target_macs=0.5)  # a target's default rule
    assert RankRule.from_dict({k: plan.goal[k] for k in ("rank_rule", "target_macs")}) == MinError(target_macs=0.5)


def test_an_accuracy_drop_rule_read_from_json_needs_the_callable_again(small_cnn, image):
    rule = RankRule.from_dict(AccuracyDrop(evaluate=_acc).to_dict())
    from tensorslim.cost import count
    from tensorslim.planning import PlanContext

    todo, _ = collect_layers(small_cnn, "svd", count(small_cnn, image))
    ctx = PlanContext(small_cnn, "svd", "macs", 1)
    with pytest.raises(TypeError, match="give it evaluate=callable"):
        rule.choose(todo, ctx)


def test_candidate_pricing_is_public_and_agrees_with_counting(small_cnn, image):
    report = ts.count(small_cnn, image)
    todo, kept = collect_layers(small_cnn, "svd", report)
    names = {l.name for l in todo}
    assert "features.9" in {s.name for s in kept} and "features.9" not in names  # depthwise
    lin = next(l for l in todo if l.name == "head.1")  # Linear(384, 128)
    assert rank_space(lin) == list(range(1, 129))
    assert layer_cost(lin, 10) == (10 * (384 + 128) + 128, 2 * 10 * (384 + 128))
    cands = rank_candidates(lin, "macs")
    macs = [c[1][1] for c in cands]
    assert macs == sorted(macs) and macs[-1] < lin.macs and cands[0][0] == 1
    assert rank_candidates(lin, 1) == cands  # 1 = MACs, as an index
    spec = build_spec(lin, 10)
    assert (spec.method, spec.rank, spec.params_after, spec.macs_after) == ("svd", 10, *layer_cost(lin, 10))
    plan = ts.make_plan(small_cnn, "svd", image, ranks={"head.1": 10})
    assert plan["head.1"].params_after == spec.params_after and plan["head.1"].macs_after == spec.macs_after
    counted = ts.count(ts.compress(small_cnn, plan, progress=False), image)
    assert counted["head.1"].macs == spec.macs_after and counted["head.1"].params == spec.params_after
    dense = build_spec(lin, 128)  # full rank costs more than dense: kept with a one-line reason
    assert dense.method == "keep" and dense.reason.startswith("kept dense: svd at rank 128 would not reduce macs")


def test_vbmf_ranks_factorized_lives_in_planning_not_rank():
    import tensorslim.rank as rank
    from tensorslim.planning import vbmf_ranks_factorized

    assert not hasattr(rank, "vbmf_ranks_factorized")
    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 30)
    assert isinstance(vbmf_ranks_factorized(ts.layers.LowRankLinear.from_dense(lin, 20)), int)


def test_reasons_fit_one_line(small_cnn, image):
    from tensorslim.planning.candidates import one_line

    msg = ("TuckerConv2d: cannot factorize a depthwise conv (in_channels == groups == 64): each filter "
           "sees one input channel, so there is no channel mode to compress; keep it dense")
    assert one_line(msg) == "TuckerConv2d: cannot factorize a depthwise conv (in_channels == groups == 64)"
    assert one_line("first\nsecond") == "first" and one_line("x" * 120) == "x" * 97 + "..."
    for method in ("tucker", "cp", "svd", "tt"):
        plan = ts.make_plan(small_cnn, method, image, rank_rule="constant")
        assert all(len(s.reason) <= 110 and "\n" not in s.reason for s in plan.layers), method
    assert plan["features.9"].reason == "TTConv2d: cannot factorize a depthwise conv (in_channels == groups == 64)"
