"""One parametrised test over the registry: every factorized conv/linear/embedding equals its
dense layer on a weight of exactly known rank, across conv geometries; cost() == counted params/MACs;
like() builds the same parameter shapes."""
from math import prod

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from torch.utils.flop_counter import FlopCounterMode

from _layer_helpers import (
    CONV1D_CONFIGS, CONV2D_CONFIGS, EMB_D, EMB_V, config_id, conv_input, dense_conv, dense_embedding,
    hook_macs, known_factors, known_tt, n_params, rank_of, token_input,
)
import tensorslim as ts
from tensorslim.layers import LAYERS, TTLinear, layer_for
from tensorslim.layers.tt import tt_weight

CONV_CASES = [
    pytest.param(method, dims, cfg, id=f"{method}-{dims}d-{config_id(cfg)}")
    for (method, dense), cls in LAYERS.items()
    if dense in (nn.Conv1d, nn.Conv2d)
    for dims in [2 if dense is nn.Conv2d else 1]
    for cfg in (CONV2D_CONFIGS if dims == 2 else CONV1D_CONFIGS)
]


def _flops(module: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        module(x)
    return fc.get_total_flops()


@pytest.mark.parametrize("method,dims,cfg", CONV_CASES)
def test_conv_layer_equals_dense_on_known_rank_kernel(method, dims, cfg):
    conv = dense_conv(dims, cfg)
    cls = layer_for(method, conv)
    rank = rank_of(method)
    if method == "filtercp":  # a filter's CP rank is at most min(kh*kw, S/g*kw, S/g*kh): 1 for 1x1
        rank = min(rank, cls.valid_rank(conv, rank))
    parts, kernel = known_factors(method, conv, rank)
    with torch.no_grad():
        conv.weight.copy_(kernel)
    layer = cls.from_factors(conv, parts)
    x = conv_input(dims)
    with torch.no_grad():
        out, ref = layer(x), conv(x)
        # channels-last input gives the same (contiguous) output
        if dims == 2:
            out_cl = layer(x.contiguous(memory_format=torch.channels_last))
            assert_close(out_cl, ref, rtol=1e-10, atol=1e-10)
    assert out.is_contiguous()
    assert_close(out, ref, rtol=1e-10, atol=1e-10)

    # cost(): params == built layer, MACs == hooks on its children == FlopCounterMode / 2
    in_shape, out_shape = tuple(x.shape[1:]), tuple(ref.shape[1:])
    params, macs = cls.cost(conv, rank, in_shape, out_shape)
    assert params == n_params(layer)
    assert macs == hook_macs(layer, x)
    assert 2 * macs * x.shape[0] == _flops(layer, x)

    # like(): same parameter names and shapes, random values
    fresh = cls.like(conv, rank)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == \
        {k: v.shape for k, v in layer.state_dict().items()}
    assert fresh.rank == layer.rank
    fresh.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert_close(fresh(x), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bias", [True, False])
def test_lowrank_linear_equals_dense(bias):
    torch.manual_seed(0)
    lin = nn.Linear(12, 20, bias=bias).double()
    g = torch.Generator().manual_seed(0)
    from tensorslim.tensor.results import SVDResult

    svd = SVDResult(torch.randn(20, 5, generator=g, dtype=torch.float64),
                    torch.rand(5, generator=g, dtype=torch.float64),
                    torch.randn(5, 12, generator=g, dtype=torch.float64))
    with torch.no_grad():
        lin.weight.copy_(svd.to_tensor())
    cls = layer_for("svd", lin)
    layer = cls.from_factors(lin, svd)
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    with torch.no_grad():
        assert_close(layer(x), lin(x), rtol=1e-10, atol=1e-10)
    params, macs = cls.cost(lin, 5, (3, 12), (3, 20))
    assert params == n_params(layer)
    assert macs == hook_macs(layer, x)
    assert {k: v.shape for k, v in cls.like(lin, 5).state_dict().items()} == \
        {k: v.shape for k, v in layer.state_dict().items()}


EMBEDDING_CASES = [pytest.param(method, id=f"{method}-Embedding") for (method, dense) in LAYERS
                   if dense is nn.Embedding]


@pytest.mark.parametrize("method", EMBEDDING_CASES)
@pytest.mark.parametrize("rank", [3, EMB_D])  # a known low rank; the full rank min(V, D)
def test_embedding_layer_equals_dense_table_on_known_rank(method, rank):
    """The Embedding branch: a table of exactly known rank is reproduced row for row (float64)
    for token indices of any shape; cost() == counted params, and its MACs == what ts.count adds
    (``own_macs``) == FlopCounterMode / 2 (the gather itself multiplies nothing)."""
    emb = dense_embedding(dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    table = torch.randn(EMB_V, rank, generator=g, dtype=torch.float64) @ \
        torch.randn(rank, EMB_D, generator=g, dtype=torch.float64)
    with torch.no_grad():
        emb.weight.copy_(table)
    cls = layer_for(method, emb)
    layer = cls.from_dense(emb, rank)
    assert layer.approx_error < 1e-12
    x = token_input()
    with torch.no_grad():
        assert_close(layer(x), emb(x), rtol=1e-10, atol=1e-10)
        assert_close(layer(torch.arange(EMB_V)), table, rtol=1e-10, atol=1e-10)  # every row
    params, macs = cls.cost(emb, rank, tuple(x.shape[1:]), (x.shape[1], EMB_D))
    assert params == n_params(layer) == rank * (EMB_V + EMB_D)
    assert macs * x.shape[0] == layer.own_macs(tuple(x.shape), (*x.shape, EMB_D)) == x.numel() * rank * EMB_D
    assert 2 * macs * x.shape[0] == _flops(layer, x)
    report = ts.count(layer, x)
    assert (report.total_params, report.total_macs) == (params, macs * x.shape[0])
    assert (ts.count(emb, x).total_params, ts.count(emb, x).total_macs) == (EMB_V * EMB_D, 0)
    fresh = cls.like(emb, rank)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == \
        {k: v.shape for k, v in layer.state_dict().items()}
    fresh.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))


TT_CASES = [
    ((2, 3, 4), (5, 2, 2), (3, 4), True),
    ((4, 3, 2), (2, 2, 5), (2, 3), False),
    ((4, 4), (3, 5), (6,), True),
    ((2, 2, 2, 3), (3, 2, 2, 2), (2, 4, 3), True),
]


@pytest.mark.parametrize("in_modes,out_modes,ranks,bias", TT_CASES)
def test_tt_linear_equals_dense_on_known_tt_matrix(in_modes, out_modes, ranks, bias):
    ttm = known_tt(in_modes, out_modes, ranks)
    n, m = prod(in_modes), prod(out_modes)
    torch.manual_seed(0)
    lin = nn.Linear(n, m, bias=bias).double()
    with torch.no_grad():
        lin.weight.copy_(ttm.to_tensor())
    layer = layer_for("tt", lin).from_factors(lin, ttm)
    assert_close(tt_weight(layer), lin.weight.detach(), rtol=1e-12, atol=1e-12)
    x = torch.randn(3, 2, n, dtype=torch.float64)
    with torch.no_grad():
        assert_close(layer(x), lin(x), rtol=1e-10, atol=1e-10)
    # macs() == FlopCounterMode / 2; cost() == (params, macs)
    assert 2 * layer.macs((2, n)) * 3 == _flops(layer, x)
    assert TTLinear.cost(lin, ranks, (2, n), (2, m), in_modes=in_modes, out_modes=out_modes) == \
        (n_params(layer), layer.macs((2, n)))
    fresh = TTLinear.like(lin, ranks, in_modes=in_modes, out_modes=out_modes)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == \
        {k: v.shape for k, v in layer.state_dict().items()}


def test_tt_both_contraction_orders_are_exercised():
    orders = {TTLinear(prod(i), prod(o), i, o, r).ltr for i, o, r, _ in TT_CASES}
    assert orders == {True, False}


def test_tt_picks_cheaper_order():
    # 4096 -> 64: contracting the big input modes first (left-to-right here) is far cheaper
    a = TTLinear(4096, 64, (16, 16, 16), (4, 4, 4), 8)
    b = TTLinear(64, 4096, (4, 4, 4), (16, 16, 16), 8)
    for layer in (a, b):
        other = TTLinear(layer.in_features, layer.out_features, layer.in_modes,
                         layer.out_modes, 8)
        other_order_macs = sum(r * i * o for r, i, o in zip(other.rows, other.k_in, other.k_out))
        assert layer.macs((layer.in_features,)) <= other_order_macs


def test_registry_covers_the_brief():
    expected = {("cp", nn.Conv2d), ("cp", nn.Conv1d), ("tucker", nn.Conv2d),
                ("tucker", nn.Conv1d), ("svd", nn.Linear), ("svd", nn.Conv2d),
                ("svd", nn.Conv1d), ("tt", nn.Linear), ("tt", nn.Conv2d), ("filtercp", nn.Conv2d),
                ("svd", nn.Embedding)}
    assert set(LAYERS) == expected
    for (method, dense), cls in LAYERS.items():
        assert cls.method == method and dense in cls.dense_types


def test_layer_for_unknown_combination_lists_known():
    with pytest.raises(ValueError, match=r"known combinations: .*'tucker', Conv2d"):
        layer_for("tt", nn.Conv1d(4, 4, 3))
    with pytest.raises(ValueError, match="method='nope'"):
        layer_for("nope", nn.Linear(3, 3))
    # subclasses of the dense types are found
    assert layer_for("svd", nn.modules.linear.NonDynamicallyQuantizableLinear(3, 3)).__name__ \
        == "LowRankLinear"

