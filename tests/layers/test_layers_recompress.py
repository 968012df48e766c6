"""Re-compression of factorized layers at smaller ranks (MUSCO's further stages)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tensorslim.cost import count
from tensorslim.layers import CPConv2d, LowRankConv2d, LowRankLinear, TuckerConv1d, TuckerConv2d
from tensorslim.tensor import rel_error
from tensorslim.surgery import recompress
from tensorslim.tensor import cp_als, svd, tucker


def _perturbed(layer: nn.Module, scale: float = 0.1, seed: int = 0) -> nn.Module:
    """Factors that are no longer orthonormal, as after fine-tuning."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


def _tucker_kernel(layer: nn.Module) -> torch.Tensor:
    return torch.cat([t.to_tensor() for t in layer.to_tucker()])


@pytest.mark.parametrize("groups", [1, 2])
def test_tucker_recompress_equals_tucker2_of_its_reconstructed_kernel(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=groups).double()
    layer = _perturbed(TuckerConv2d.from_conv(conv, (8, 12)))
    w = _tucker_kernel(layer)  # (12, 8/g, 3, 3): the layer's current kernel, exactly
    x = torch.randn(2, 8, 9, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer(x), F.conv2d(x, w, layer.project_out.bias, stride=2,
                                                  padding=1, groups=groups), rtol=0, atol=1e-12)

    new = layer.recompress((4, 6))
    assert new.rank == (4, 6) and layer.rank == (8, 12)  # the old layer is untouched
    ref = torch.cat([tucker(wg, (6 // groups, 4 // groups), modes=(0, 1)).to_tensor()
                     for wg in w.chunk(groups)])
    torch.testing.assert_close(_tucker_kernel(new), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(new(x), F.conv2d(x, ref, layer.project_out.bias, stride=2,
                                                padding=1, groups=groups), rtol=0, atol=1e-12)
    assert new.approx_error == pytest.approx(rel_error(w, ref), rel=1e-10)
    assert 0.1 < new.approx_error < 1.0
    assert count(new, x).total_macs == 2 * TuckerConv2d.cost(conv, (4, 6), (8, 9, 7), ())[1]
    assert sum(p.numel() for p in new.parameters()) == TuckerConv2d.cost(conv, (4, 6), (8, 9, 7), ())[0]


def test_tucker_recompress_at_the_same_rank_is_exact_and_1d_works():
    conv = nn.Conv1d(6, 10, 5, padding=2).double()
    layer = _perturbed(TuckerConv1d.from_conv(conv, (4, 5)))
    same = layer.recompress((4, 5))
    torch.testing.assert_close(_tucker_kernel(same), _tucker_kernel(layer), rtol=0, atol=1e-12)
    assert same.approx_error < 1e-12
    with pytest.raises(ValueError, match=r"rank=\(5, 5\) exceeds the current rank \(4, 5\)"):
        layer.recompress((5, 5))


def test_lowrank_linear_recompress_is_the_best_approximation_of_the_current_weight():
    lin = nn.Linear(20, 15).double()
    layer = _perturbed(LowRankLinear.from_linear(lin, 10))
    w = (layer.project_out.weight @ layer.project_in.weight).detach()
    exact = layer.to_svd()
    torch.testing.assert_close(exact.to_tensor(), w, rtol=0, atol=1e-12)
    new = layer.recompress(4)
    best = svd(w, 4, method="full")  # Eckart-Young
    torch.testing.assert_close(new.project_out.weight @ new.project_in.weight, best.to_tensor(),
                               rtol=0, atol=1e-12)
    assert new.approx_error == pytest.approx(best.errors[0], rel=1e-10)
    torch.testing.assert_close(new.project_out.bias, layer.project_out.bias, rtol=0, atol=0)
    with pytest.raises(ValueError, match="exceeds the current rank 10"):
        layer.recompress(11)


def test_lowrank_conv_recompress_truncates_each_group():
    conv = nn.Conv2d(8, 12, 3, padding=1, groups=2).double()
    layer = _perturbed(LowRankConv2d.from_conv(conv, 8))
    new = layer.recompress(4)
    w = torch.cat([s.to_tensor() for s in layer.to_svd()])  # (12, 36): both groups stacked
    ref = torch.cat([svd(wg, 2, method="full").to_tensor() for wg in w.chunk(2)])
    got = torch.cat([s.to_tensor() for s in new.to_svd()])
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    assert new.approx_error == pytest.approx(rel_error(w, ref), rel=1e-10)


def test_cp_recompress_reruns_cp_on_the_current_kernel():
    conv = nn.Conv2d(8, 12, 3, padding=1).double()
    layer = _perturbed(CPConv2d.from_conv(conv, 12), scale=0.05)
    w = torch.cat([c.to_tensor() for c in layer.to_cp()])
    x = torch.randn(2, 8, 9, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer(x), F.conv2d(x, w, layer.project_out.bias, padding=1),
                               rtol=0, atol=1e-12)
    new = layer.recompress(6)
    ref = cp_als(w, 6)
    got = torch.cat([c.to_tensor() for c in new.to_cp()])
    torch.testing.assert_close(got, ref.to_tensor(), rtol=0, atol=1e-10)
    assert new.rank == 6 and new.approx_error == pytest.approx(ref.errors[-1], rel=1e-6)


def test_surgery_recompress_swaps_layers_and_names_bad_ones():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Linear(7, 5))
    model[0] = TuckerConv2d.from_conv(model[0], (4, 8))
    model[2] = LowRankLinear.from_linear(model[2], 5)
    old = model[0]
    recompress(model, {"0": (2, 3), "2": 2}, progress=False)
    assert model[0] is not old and model[0].rank == (2, 3) and model[2].rank == 2
    with pytest.raises(ValueError, match="layer 1 is a ReLU, which cannot be re-compressed"):
        recompress(model, {"1": 2}, progress=False)
    with pytest.raises(ValueError, match="layer 0: .*exceeds the current rank"):
        recompress(model, {"0": (3, 3)}, progress=False)
    with pytest.raises(ValueError, match=r"no layer .*'nope'"):
        recompress(model, {"nope": 1}, progress=False)
