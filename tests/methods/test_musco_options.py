"""MUSCO's settings: one frozen MuscoOptions or keywords (the same run), the deprecated
``rank_rule=`` alias of ``stage_ranks=``, one-line errors, JSON round trips, old state dirs."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tensorslim.methods.musco import VBMF_FACTOR, MuscoConfig, MuscoOptions, musco

X = torch.randn(1, 8, 8, 8, generator=torch.Generator().manual_seed(1))
HALF = dict(stages=2, stage_ranks=[0.5, 0.5], progress=False)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10)).eval()


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_options_object_mapping_and_keywords_give_identical_runs():
    by_keywords = musco(_net(), "tucker", X, **HALF)
    # stage 1 halves the dense ranks (S, T) = (16, 24), stage 2 halves them again
    assert [h["ranks"]["2"] for h in by_keywords.history] == [[8, 12], [4, 6]]
    assert by_keywords.plan["2"].rank == (4, 6) and by_keywords.stages_done == 2
    opts = MuscoOptions(stages=2, stage_ranks=(0.5, 0.5))
    runs = [musco(_net(), "tucker", X, opts, progress=False),
            musco(_net(), "tucker", X, {"stages": 2, "stage_ranks": [0.5, 0.5]}, progress=False),
            # keywords override the options' fields
            musco(_net(), "tucker", X, MuscoOptions(stages=5, stage_ranks=0.9), **HALF)]
    for res in runs:
        assert res.plan == by_keywords.plan and res.plan.macs_after == by_keywords.plan.macs_after
        assert [h["ranks"] for h in res.history] == [h["ranks"] for h in by_keywords.history]
        assert _same_weights(res.model, by_keywords.model)


def test_options_and_keywords_meet_the_same_mac_target():
    a = musco(_net(), "auto", X, stages=2, target_macs=0.4, progress=False)
    b = musco(_net(), "auto", X, MuscoOptions(stages=2, target_macs=0.4), progress=False)
    assert a.plan == b.plan and a.stop_reason == b.stop_reason == "MAC target reached"
    assert 0.4 * 0.95 <= b.plan.macs_ratio <= 0.4
    assert [h["macs"] for h in a.history] == [h["macs"] for h in b.history]


@pytest.mark.parametrize("value", [[0.5, 0.5], 0.5, "vbmf", {"2": (6, 9), "6": 4}])
def test_rank_rule_alias_gives_the_same_ranks_as_stage_ranks(value):
    new = musco(_net(), "tucker", X, stages=2, stage_ranks=value, progress=False)
    with pytest.warns(DeprecationWarning, match=r"rank_rule=.*deprecated; use stage_ranks="):
        old = musco(_net(), "tucker", X, stages=2, rank_rule=value, progress=False)
    assert [h["ranks"] for h in old.history] == [h["ranks"] for h in new.history]
    assert old.plan == new.plan and old.stages_done == new.stages_done >= 1
    assert _same_weights(old.model, new.model)
    if isinstance(value, dict):  # without a target, stage 1 goes to the final ranks given
        assert new.history[0]["ranks"] == {"2": [6, 9], "6": 4} and new.stages_done == 1


def test_unknown_or_bad_settings_are_one_line_errors():
    net = _net()
    cases = [
        (dict(stagez=2), TypeError, "musco: unknown setting(s) 'stagez' (did you mean 'stages'?); "
                                    "accepted: stages, finetune_steps_per_stage, target_macs"),
        (dict(stage_ranks=0.5, rank_rule=0.5), TypeError, "musco: give stage_ranks= or its deprecated "
                                                           "alias rank_rule=, not both"),
        (dict(stage_ranks="energy"), ValueError, "musco: stage_ranks must be 'vbmf', a fraction in "
                                                 "(0, 1)"),
        (dict(stages=0), ValueError, "musco: stages must be an int >= 1, got 0"),
        (dict(vbmf_factor=1.5), ValueError, "musco: vbmf_factor must be a number in [0, 1], got 1.5"),
        (dict(finetune_lr=0), ValueError, "musco: finetune_lr must be a number > 0, got 0"),
        (dict(bn_steps=-1), ValueError, "musco: bn_steps must be an int >= 0, got -1"),
        (dict(seed="3"), TypeError, "seed must be an int, got '3'"),
        (dict(distill=1), TypeError, "distill must be True or False, got 1"),
        (dict(include=[3]), TypeError, "include must be a glob pattern or a list of them"),
        (dict(max_stages_this_call=-1), ValueError, "musco: max_stages_this_call must be an int >= 0"),
    ]
    for kwargs, err, text in cases:
        with pytest.raises(err) as info:
            musco(net, "tucker", X, progress=False, **kwargs)
        msg = str(info.value)
        assert msg.startswith("musco: ") and text in msg and "\n" not in msg, (kwargs, msg)
    with pytest.raises(TypeError, match="musco: config must be a MuscoOptions or a mapping of its "
                                        "fields, got int"):
        musco(net, "tucker", X, 3)
    with pytest.raises(TypeError, match="unknown setting\\(s\\) 'rank_rule'"):
        MuscoOptions.from_dict({"rank_rule": "vbmf"})  # the alias is a keyword of musco only


def test_settings_json_round_trip():
    assert MuscoOptions().vbmf_factor == VBMF_FACTOR == 0.8
    cases = [MuscoOptions(),
             MuscoOptions(stages=4, finetune_steps_per_stage=10, target_macs=1, stage_ranks=0.5,
                          vbmf_factor=1, seed=7, distill=False, finetune_lr=0.05, include="features.*",
                          exclude=["head.*", "fc"], bn_steps=0, reconstruct_steps=3),
             MuscoOptions(stage_ranks={"b": [2, 3], "a": 4}, target_macs=0.3)]
    for opts in cases:
        text = json.dumps(opts.to_dict())
        assert MuscoOptions.from_dict(json.loads(text)) == opts
    d = cases[1].to_dict()
    assert d["stage_ranks"] == [0.5] and d["target_macs"] == 1.0 and d["include"] == ["features.*"]
    assert d["exclude"] == ["head.*", "fc"] and d["vbmf_factor"] == 1.0
    assert cases[2].stage_ranks == {"a": 4, "b": (2, 3)}
    assert cases[2].to_dict()["stage_ranks"] == {"a": 4, "b": [2, 3]}
    # the flat record state.json stores: the settings plus the method and the traced input shape
    rec = MuscoConfig("tucker", cases[2], (1, 8, 8, 8)).to_dict()
    assert rec == {"method": "tucker", **cases[2].to_dict(), "example_shape": [1, 8, 8, 8]}


def _as_version_1(state_dir) -> None:
    """Rewrite a state dir as tensorslim wrote it before ``stage_ranks`` had its name."""
    path = state_dir / "state.json"
    state = json.loads(path.read_text())
    state["version"] = 1
    state["config"]["rank_rule"] = state["config"].pop("stage_ranks")
    path.write_text(json.dumps(state))
    for plan in state_dir.glob("stage_*/plan.json"):
        p = json.loads(plan.read_text())
        goal = p["goal"]["musco"]
        goal["rank_rule"] = goal.pop("stage_ranks", goal.get("rank_rule"))
        plan.write_text(json.dumps(p))


def test_a_state_dir_of_version_1_resumes_to_the_same_result(tmp_path):
    whole = musco(_net(), "tucker", X, **HALF)
    part = musco(_net(), "tucker", X, state_dir=tmp_path, max_stages_this_call=1, **HALF)
    assert part.stages_done == 1 and json.loads((tmp_path / "state.json").read_text())["version"] == 2
    _as_version_1(tmp_path)
    done = musco(_net(), "tucker", X, state_dir=tmp_path, **HALF)
    assert done.stages_done == 2 and done.plan == whole.plan and _same_weights(done.model, whole.model)
    assert done.plan["2"].rank == (4, 6)
    _as_version_1(tmp_path)  # a setting that differs is named with the name of today
    with pytest.raises(ValueError, match=r"other settings \(stage_ranks: \[0.5, 0.5\] -> \[0.25\]\)"):
        musco(_net(), "tucker", X, state_dir=tmp_path, **{**HALF, "stage_ranks": 0.25})
    state = json.loads((tmp_path / "state.json").read_text())
    (tmp_path / "state.json").write_text(json.dumps({**state, "version": 9}))
    with pytest.raises(ValueError, match="unknown musco state version 9; this tensorslim reads "
                                         "versions 1 to 2"):
        musco(_net(), "tucker", X, state_dir=tmp_path, **HALF)
