"""``fold_output_affine``: every registered layer folds ``y -> scale * y + shift`` into its last
stage (issue 16, inference fusion), validates its arguments, and stays a working layer."""
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from _layer_helpers import EMB_D, dense_embedding, is_embedding, token_input
from tensorslim.layers import LAYERS

KEYS = [pytest.param(k, id=f"{k[0]}-{k[1].__name__}") for k in LAYERS]
RANKS = {"cp": 8, "tucker": (4, 6), "svd": 4, "tt": 3, "filtercp": 2}


def _layer(key, bias: bool = False):
    torch.manual_seed(0)
    method, dense = key
    if dense is nn.Linear:
        mod, x = nn.Linear(24, 20, bias=bias), torch.randn(4, 24, dtype=torch.float64)
    elif is_embedding(dense):  # (4,) token indices -> (4, EMB_D): the layout a BatchNorm1d can follow
        mod, x = dense_embedding(), token_input(shape=(4,))
        assert EMB_D == 20
    else:
        mod = dense(8, 12, 3, padding=1, groups=2, bias=bias)
        x = torch.randn((2, 8, 9, 7) if dense is nn.Conv2d else (2, 8, 11), dtype=torch.float64)
    return LAYERS[key].like(mod, RANKS[method]).double(), x


@pytest.mark.parametrize("key", KEYS)
def test_fold_output_affine_is_the_affine_map_and_keeps_the_ops(key):
    layer, x = _layer(key)
    out = 20 if key[1] in (nn.Linear, nn.Embedding) else 12
    g = torch.Generator().manual_seed(3)
    scale = torch.rand(out, generator=g, dtype=torch.float64) + 0.5
    shift = torch.randn(out, generator=g, dtype=torch.float64)
    view = (1, -1) + (1,) * (x.dim() - 2)
    with torch.no_grad():
        ref = layer(x) * scale.view(view) + shift.view(view)
        children = [type(m) for m in layer.modules()]
        layer.fold_output_affine(scale, shift)
        assert_close(layer(x), ref, rtol=1e-12, atol=1e-12)
    assert [type(m) for m in layer.modules()] == children  # no module added
    if hasattr(layer, "geometry"):  # the geometry knows the layer has a bias now
        assert layer.geometry.bias and "bias=False" not in layer.extra_repr()


@pytest.mark.parametrize("key", KEYS)
def test_fold_output_affine_refuses_wrong_shapes_and_types(key):
    layer, _ = _layer(key, bias=True)
    name = type(layer).__name__
    out = 20 if key[1] in (nn.Linear, nn.Embedding) else 12
    with pytest.raises(ValueError, match=rf"{name}.fold_output_affine: scale has shape \(5,\); "
                                         rf"accepted: \({out},\)"):
        layer.fold_output_affine(torch.ones(5), torch.zeros(out))
    with pytest.raises(TypeError, match=rf"{name}.fold_output_affine: shift must be a float tensor"):
        layer.fold_output_affine(torch.ones(out), torch.zeros(out, dtype=torch.long))


@pytest.mark.parametrize("key", [k for k in KEYS if hasattr(LAYERS[k.values[0]], "recompress")])
def test_a_folded_layer_still_recompresses(key):
    """recompress rebuilds the layer from its geometry: the bias a fold created must stay."""
    layer, x = _layer(key)
    out = 20 if key[1] in (nn.Linear, nn.Embedding) else 12
    with torch.no_grad():
        layer.fold_output_affine(torch.full((out,), 2.0, dtype=torch.float64),
                                 torch.arange(out, dtype=torch.float64))
        again = layer.recompress(layer.rank)
        # FilterCPConv2d keeps its bias on the layer itself (no project_out stage)
        last = lambda m: getattr(m, "project_out", m)  # noqa: E731
        assert_close(last(again).bias, last(layer).bias)
        if key[0] not in ("cp", "filtercp"):  # Tucker / SVD at the same rank are exact (CP-ALS
            # and filter-wise CP-ALS run again)
            assert_close(again(x), layer(x), rtol=1e-9, atol=1e-9)
