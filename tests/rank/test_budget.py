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


def test_budget_on_any_numeric_cost():
    # measured ms: dense times per layer, candidates (rank, ms) ascending; 1 ms is fixed
    dense = {"a": 2.0, "b": 6.0}
    cands = {"a": [(4, 1.8), (8, 1.9)], "b": [(r, 0.5 * r) for r in range(1, 12)]}
    ranks = solve_budget(dense, cands, 9.0, 0.5, kind="target_latency")
    # by hand: 4.5 ms budget = 1 fixed + a 1.8 + b 0.5 * 3 (b at 4 would be 4.8 ms), then the
    # 0.2 ms of slack takes a's step to rank 8 (0.1 ms) but not b's (0.5 ms): 4.4 ms
    assert ranks == {"a": 8, "b": 3}
    assert 1.0 + 1.9 + 0.5 * 3 <= 4.5
    with pytest.raises(ValueError, match=r"target_latency=0.2 is unreachable.*best reachable target_latency=0\.3667"):
        solve_budget(dense, cands, 9.0, 0.2, kind="target_latency")


def test_budget_pairs_and_numbers_agree():
    layers, cands = _layers()
    as_numbers = {n: [(r, c[1]) for r, c in cs] for n, cs in cands.items()}
    dense = {l.name: l.macs for l in layers}
    for target in (0.25, 0.5, 0.9):
        assert solve_budget(layers, cands, 5000, target, objective=1) == \
            solve_budget(dense, as_numbers, 5000, target)
