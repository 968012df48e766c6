"""NORTON: greedy similarity pruning, the prune_filters edit, plans that match counts, a real run."""
import copy

import pytest
import torch

import tensorslim as ts
from tensorslim.methods import _filter_prune as fp
from tensorslim.methods._prune_graph import find_chains, trace
from tensorslim.methods.norton import norton
from tensorslim.surgery import apply_edits


def _tiny(arch):
    torch.manual_seed(0)
    return ts.models.create(arch, width=0.25).eval()


def test_greedy_pruning_removes_an_exact_duplicate_first():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 10, 3)
    with torch.no_grad():
        conv.weight[8] = conv.weight[3]
    order, stats = fp.score_conv(conv, 2, (1 / 3, 1 / 3, 1 / 3), 200, 0)
    assert order[0] in (3, 8) and sorted(order) == sorted(set(order)) and len(order) == 9
    assert stats["distance_min"] < 1e-6 < stats["distance_mean"]
    # brute force on a hand-made matrix: pair (0, 2) closest; 2 has the smaller row sum
    d = torch.tensor([[0, 5, 1, 9], [5, 0, 6, 7], [1, 6, 0, 2], [9, 7, 2, 0]], dtype=torch.float64)
    assert fp.removal_order(d)[0] == 2
    assert fp.kept([2, 0, 3], 4, 2) == [1, 3]


@pytest.mark.parametrize("arch", ["vgg16", "resnet20"])
def test_prune_edits_keep_shapes_and_zero_pruning_is_identity(arch):
    model = _tiny(arch)
    x = torch.randn(2, 1, 28, 28)
    chains, skipped = find_chains(trace(copy.deepcopy(model), (x,)), set())
    assert chains
    if arch == "resnet20":  # convs feeding residual adds are kept with a reason
        assert any("residual add" in why for why in skipped.values())
    full = [fp.prune_edit(ch, range(ch.channels), {}) for ch in chains]
    same = apply_edits(copy.deepcopy(model), full)
    with torch.no_grad():
        torch.testing.assert_close(same(x), model(x), rtol=0, atol=0)
    half = [fp.prune_edit(ch, range(0, ch.channels, 2), {}) for ch in chains]
    pruned = apply_edits(copy.deepcopy(model), half)
    assert pruned(x).shape == (2, 10)
    mods = dict(pruned.named_modules())
    for ch in chains:
        assert mods[ch.conv].out_channels == (ch.channels + 1) // 2
        assert all(mods[b].num_features == (ch.channels + 1) // 2 for b in ch.bns)
    with pytest.raises(ValueError, match="keep must be sorted"):
        apply_edits(copy.deepcopy(model), [fp.prune_edit(chains[0], [3, 1], {})])


@pytest.mark.parametrize("arch", ["vgg16", "resnet20"])
def test_norton_plan_counts_match_and_records_pruning(arch):
    model = _tiny(arch)
    x = torch.randn(1, 1, 28, 28)
    res = norton(model, x, rank=2, prune=0.25, n_iter=30, progress=False)
    rep = ts.count(res.model, x)
    assert (res.plan.params_after, res.plan.macs_after) == (rep.total_params, rep.total_macs)
    assert res.plan.macs_before == ts.count(model, x).total_macs
    mods = dict(res.model.named_modules())
    for e in res.plan.edits:
        keep = e.args["keep"]
        assert len(keep) == e.args["channels"] - e.args["channels"] // 4
        assert e.args["criterion"] == "cpd principal angles" and "distance_mean" in e.args
        assert mods[e.target].out_channels == len(keep)
    specs = res.plan.compressed
    assert specs and all(s.method == "filtercp" and s.rank == 2 for s in specs)
    if arch == "resnet20":
        assert any("not pruned" in s.reason and "residual" in s.reason for s in res.plan.layers)
    # BatchNorms fold into the FilterCP layers' last stage: same outputs, no BN left after them
    from tensorslim.fusion import fuse_with_report

    fused, report = fuse_with_report(res.model.eval())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), res.model(x), rtol=1e-4, atol=1e-4)
    assert any(f.into in {s.name for s in specs} for f in report.folded)


def test_norton_target_macs_and_refusals():
    model = _tiny("vgg16")
    x = torch.randn(1, 1, 28, 28)
    res = norton(model, x, rank=2, target_macs=0.12, n_iter=20, progress=False)
    assert res.plan.macs_after <= 0.12 * res.plan.macs_before
    assert res.history["rate"] > 0 and res.plan.edits
    with pytest.raises(ValueError, match="not both"):
        norton(model, x, prune=0.1, target_macs=0.2, progress=False)
    with pytest.raises(ValueError, match="not reachable"):
        norton(model, x, rank=2, target_macs=0.001, n_iter=5, progress=False)
    with pytest.raises(ValueError, match="prune names"):
        norton(model, x, prune={"nope": 0.1}, progress=False)


def test_norton_real_fashion_mnist_meets_mac_target():
    """The one real run: shipped VGG-16, 25% of its MACs, 30 fine-tune steps on real images."""
    from tensorslim.data import TensorBatchLoader, make_loaders
    from tensorslim.train import evaluate

    torch.manual_seed(0)
    loaders = make_loaders(64, seed=0, augment=False, subset=2000)
    test = TensorBatchLoader(loaders.test.dataset.subset(torch.arange(1000)), 500)
    model = ts.models.load_pretrained("vgg16").eval()
    base = evaluate(model, test)["accuracy"]
    x = torch.randn(1, 1, 28, 28)
    res = norton(model, x, rank=2, target_macs=0.25, train_loader=loaders.train,
                 finetune_steps=30, bn_steps=10, n_iter=30, progress=False)
    assert res.plan.macs_after <= 0.25 * res.plan.macs_before
    assert ts.count(res.model, x).total_macs == res.plan.macs_after
    acc = evaluate(res.model, test)["accuracy"]
    # floor for this CI-sized budget (30 steps, batch 64): 85% (the shipped model: ~95%)
    assert acc >= 0.85, (base, acc)
