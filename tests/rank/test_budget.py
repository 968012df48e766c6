from types import SimpleNamespace

import pytest

from tensorslim.rank import solve_budget


def _layers():
    # two layers with dense MACs 1000 and 3000; candidate rank r costs 10*r and 30*r MACs
    layers = [SimpleNamespace(name="a", params=0, macs=1000), SimpleNamespace(name="b", params=0, macs=3000)]
    cands = {
        "a": [(r, (0, 10 * r)) for r in range(1, 100)],
        "b": [(r, (0, 30 * r)) for r in range(1, 100)],
    }
    return layers, cands


@pytest.mark.parametrize("target", [0.21, 0.25, 0.5, 0.9])
def test_budget_meets_target_within_2_percent(target):
    layers, cands = _layers()
    total = 5000  # 1000 MACs belong to layers that cannot be compressed
    ranks = solve_budget(layers, cands, total, target, objective=1)
    cost = 1000 + 10 * ranks["a"] + 30 * ranks["b"]
    assert cost <= target * total
    assert cost >= 0.98 * target * total


def test_budget_unreachable_names_best_ratio():
    layers, cands = _layers()
    with pytest.raises(ValueError, match=r"best reachable target_macs=0\.2080"):
        solve_budget(layers, cands, 5000, 0.05, objective=1, kind="target_macs")


def test_budget_keeps_layers_without_candidates():
    layers, cands = _layers()
    cands["a"] = []
    ranks = solve_budget(layers, cands, 5000, 0.6, objective=1)
    assert isinstance(ranks["a"], str) and "no rank" in ranks["a"]
    assert 2000 + 30 * ranks["b"] <= 3000
