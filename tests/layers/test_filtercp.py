"""FilterCPConv2d: exact at full filter rank on every conv geometry, counted exactly, folds BN."""
import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.layers import FilterCPConv2d

CASES = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, padding="same", dilation=2),
    dict(kernel_size=(3, 5), stride=(2, 1), padding=(1, 2)),
    dict(kernel_size=(2, 4), padding="same"),
    dict(kernel_size=3, padding=1, padding_mode="reflect", bias=False),
    dict(kernel_size=3, stride=2, padding=2, padding_mode="circular"),
    dict(kernel_size=(3, 2), padding=1, padding_mode="replicate", dilation=(2, 1)),
    dict(kernel_size=3, padding=1, groups=2),
    dict(kernel_size=1),
]


def _full(conv):
    s, (kh, kw) = conv.in_channels // conv.groups, conv.kernel_size
    return min(kh * kw, s * kw, s * kh)


@pytest.mark.parametrize("cfg", CASES, ids=str)
def test_exact_at_full_filter_rank_and_counted(cfg):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, **cfg).double()
    layer = FilterCPConv2d.from_conv(conv, _full(conv))
    x = torch.randn(2, 6, 11, 10, dtype=torch.float64)
    ref = conv(x)
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-12)
    cl = layer(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, ref, rtol=0, atol=1e-12)
    assert layer.approx_error < 1e-14
    rep = ts.count(layer, x[:1])
    assert (rep.total_params, rep.total_macs) == FilterCPConv2d.cost(conv, _full(conv), x.shape[1:], ref.shape[1:])


def test_low_rank_layer_matches_its_cp_and_costs_less():
    conv = nn.Conv2d(16, 12, 3, padding=1).double()
    layer = FilterCPConv2d.from_conv(conv, 2)
    p, m = FilterCPConv2d.cost(conv, 2, (16, 8, 8), (12, 8, 8))
    assert p == 2 * 12 * (16 + 3 + 3) + 12 and m < 12 * 16 * 9 * 64
    from tensorslim.tensor.filter_cp import filter_cp
    w = filter_cp(conv.weight.detach(), 2).to_tensor()
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    ref = nn.functional.conv2d(x, w, conv.bias, padding=1)
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-10)


def test_clustered_layer_equals_dense_on_coupled_kernel_and_is_counted():
    torch.manual_seed(1)
    t, s, r = 8, 6, 2
    clusters = [0, 1, 2, 0, 1, 2, 0, 1]
    a = torch.randn(3, s, r, dtype=torch.float64)[torch.tensor(clusters)]
    b, c = torch.randn(t, 3, r, dtype=torch.float64), torch.randn(t, 3, r, dtype=torch.float64)
    conv = nn.Conv2d(s, t, 3, padding=1).double()
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("nir,njr,nkr->nijk", a, b, c))
    layer = FilterCPConv2d.from_conv(conv, r, clusters=clusters, n_iter=1000)
    x = torch.randn(2, s, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=1e-7)
    assert layer.project_in.out_channels == 3 * r
    rep = ts.count(layer, x[:1])
    assert (rep.total_params, rep.total_macs) == FilterCPConv2d.cost(conv, r, (s, 7, 7), (t, 7, 7), clusters=clusters)
    like = FilterCPConv2d.like(conv, r, clusters=tuple(clusters))
    like.load_state_dict(layer.state_dict())
    torch.testing.assert_close(like(x), layer(x), rtol=0, atol=0)


def test_fold_bn_script_trace_and_refusals():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    bn = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2)
    layer = FilterCPConv2d.from_conv(conv, 2).eval()
    x = torch.randn(3, 4, 9, 9)
    want = bn(layer(x))
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    layer.fold_output_affine(scale.detach(), (bn.bias - bn.running_mean * scale).detach())
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.jit.script(layer)(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.jit.trace(layer, x)(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rank=10 is out of range"):
        FilterCPConv2d.like(conv, 10)
    with pytest.raises(ValueError, match="clusters has 3 entries"):
        FilterCPConv2d.like(conv, 2, clusters=[0, 1, 0])
    with pytest.raises(ValueError, match="depthwise"):
        FilterCPConv2d.like(nn.Conv2d(4, 4, 3, groups=4), 2)
    assert FilterCPConv2d.valid_rank(conv, 40) == 9 and FilterCPConv2d.rank_space(conv) == list(range(1, 10))


def _factors(t, s, kh, kw, r, seed, clusters=None):
    """Random filter-wise CP factors and the kernel they build, summed here term by term:
    W[o, i, y, x] = sum_r w[o, r] a[o, i, r] b[o, y, r] c[o, x, r] (a shared per cluster)."""
    from tensorslim.tensor import FilterCP

    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    w = rnd(t, r).abs() + 0.5
    a = rnd(t, s, r) if clusters is None else rnd(max(clusters) + 1, s, r)[torch.tensor(clusters)]
    b, c = rnd(t, kh, r), rnd(t, kw, r)
    kernel = torch.zeros(t, s, kh, kw, dtype=torch.float64)
    for o in range(t):
        for q in range(r):
            kernel[o] += (w[o, q] * a[o, :, q, None, None] * b[o, None, :, q, None]
                          * c[o, None, None, :, q])
    return FilterCP(w, (a, b, c), torch.zeros(t, dtype=torch.float64)), kernel


@pytest.mark.parametrize("cfg,clusters", [
    (dict(kernel_size=3, padding=1, groups=2), None),
    (dict(kernel_size=(2, 5), stride=(1, 2), padding="valid"), None),  # 2x5: unfused depthwise
    (dict(kernel_size=3, padding=1, padding_mode="reflect"), [0, 1, 0, 2, 1, 2]),
], ids=str)
def test_kernel_and_output_are_those_of_the_factors_also_after_a_fold(cfg, clusters):
    """kernel() (the reference of the property test) and forward against a kernel built here
    from the factors; a fold scales filter o by scale[o] and shifts the bias."""
    conv = nn.Conv2d(8, 6, **cfg).double()
    s, (kh, kw) = 8 // conv.groups, conv.kernel_size
    cp, kernel = _factors(6, s, kh, kw, 3, seed=4, clusters=clusters)
    layer = FilterCPConv2d.from_factors(conv, cp, clusters=clusters)
    assert layer.fused_depthwise == (kh * kw <= 2 * (kh + kw))
    torch.testing.assert_close(layer.kernel(), kernel, rtol=1e-13, atol=1e-13)
    x = torch.randn(2, 8, 9, 11, dtype=torch.float64)
    conv.weight.data.copy_(kernel)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-11, atol=1e-11)
    scale, shift = torch.rand(6, dtype=torch.float64) + 0.5, torch.randn(6, dtype=torch.float64)
    layer.fold_output_affine(scale, shift)
    torch.testing.assert_close(layer.kernel(), kernel * scale.view(-1, 1, 1, 1), rtol=1e-13,
                               atol=1e-13)
    with torch.no_grad():
        torch.testing.assert_close(layer.bias, conv.bias * scale + shift, rtol=1e-13, atol=1e-13)


def test_error_is_between_the_per_filter_floor_and_one_and_zero_at_full_rank():
    """approx_error at every rank: >= the per-filter unfolding floor (no rank-R filter CP beats
    it), < 1, non-increasing in rank up to rounding, and 0 at the generic rank of a filter."""
    from _layer_helpers import filter_cp_lower

    torch.manual_seed(3)
    conv = nn.Conv2d(5, 7, 3).double()
    errors = []
    for r in (1, 2, 3, 4, _full(conv)):  # 5 <= r < 9 converge slowly (3x3x5's generic rank is 5)
        layer = FilterCPConv2d.from_conv(conv, r)
        lower = filter_cp_lower(conv.weight, r)
        assert lower * (1 - 1e-9) <= layer.approx_error < 1, (r, lower, layer.approx_error)
        errors.append(layer.approx_error)
    assert filter_cp_lower(conv.weight, 1) > 0.3 and errors[-1] < 1e-12
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:])), errors


def test_recompress_recovers_a_lower_rank_kernel_it_holds():
    """A rank-3 layer whose third terms are zero holds a rank-2 kernel: recompress(2) finds it."""
    conv = nn.Conv2d(6, 4, 3, padding=1).double()
    cp, kernel = _factors(4, 6, 3, 3, 3, seed=5)
    a, b, c = cp.factors
    cp = type(cp)(torch.cat([cp.weights[:, :2], torch.zeros(4, 1, dtype=torch.float64)], 1),
                  (a, b, c), cp.errors)
    layer = FilterCPConv2d.from_factors(conv, cp)
    low = layer.recompress(2, n_iter=500)
    assert low.rank == 2 and low.approx_error < 1e-8
    torch.testing.assert_close(low.kernel(), layer.kernel(), rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(low.bias, layer.bias, rtol=0, atol=0)
