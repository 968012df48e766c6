"""TTConv2d (issue 19): exact at full TT-rank for every conv geometry, TT-SVD recovers a kernel
of known TT-rank, cost() == counted params / FlopCounterMode MACs, the ranks contract of
``from_conv``, t3f's Glorot initialisation, refusals."""
import copy
from math import prod

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from torch.utils.flop_counter import FlopCounterMode

from tensorslim.layers import TTConv2d, TTLinear
from tensorslim.layers.ttconv import conv_tt_caps, kernel_tt_tensors, tt_conv_kernel
from tensorslim.tensor import tt_svd

GEOMETRIES = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=(3, 2), stride=2, padding=(1, 0)),
    dict(kernel_size=3, stride=(2, 1), padding=2, dilation=2, bias=False),
    dict(kernel_size=(4, 2), padding="same"),
    dict(kernel_size=3, padding="valid"),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
    dict(kernel_size=(2, 3), padding="same", dilation=2, padding_mode="replicate"),
    dict(kernel_size=3, stride=2, padding=(2, 1), padding_mode="circular"),
    dict(kernel_size=3, padding=1, groups=2),
    dict(kernel_size=1, bias=False),
]


def _flops(module: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        module(x)
    return fc.get_total_flops()


@pytest.mark.parametrize("cfg", GEOMETRIES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_full_rank_tt_conv_equals_dense(cfg):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, **cfg).double()
    x = torch.randn(2, 8, 9, 7, dtype=torch.float64)
    layer = TTConv2d.from_conv(conv, 10**6)  # an int bound, clipped per bond to the exact ranks
    caps = conv_tt_caps(conv.kernel_size, layer.in_modes, layer.out_modes)
    assert layer.rank == tuple(caps) and layer.approx_error < 1e-12
    with torch.no_grad():
        ref = conv(x)
        out = layer(x)
        out_cl = layer(x.contiguous(memory_format=torch.channels_last))
    assert out.is_contiguous() and out.shape == ref.shape
    assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert_close(out_cl, ref, rtol=1e-10, atol=1e-10)
    params, macs = TTConv2d.cost(conv, layer.rank, (8, 9, 7), tuple(ref.shape[1:]))
    assert params == sum(p.numel() for p in layer.parameters())
    assert 2 * macs * x.shape[0] == _flops(layer, x) and layer.macs(x.shape) == macs * x.shape[0]
    fresh = TTConv2d.like(conv, layer.rank)
    fresh.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert_close(fresh(x), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cfg", [GEOMETRIES[1], GEOMETRIES[5], GEOMETRIES[8]], ids=["strided", "reflect", "groups"])
def test_low_rank_layer_is_the_conv_of_its_own_kernel(cfg):
    """Both forward paths (depthwise spatial conv, or spatial core merged with the first channel
    core into one conv) compute the conv of the kernel the cores represent; MACs == counted."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, **cfg).double()
    x = torch.randn(2, 8, 9, 7, dtype=torch.float64)
    paths = set()
    for rank in (1, 2, 10**6):
        layer = TTConv2d.from_conv(conv, rank)
        paths.add(layer.merged)
        twin = copy.deepcopy(conv)
        with torch.no_grad():
            twin.weight.copy_(tt_conv_kernel(layer))
            assert_close(layer(x), twin(x), rtol=1e-10, atol=1e-10)
        assert 2 * layer.macs(x.shape) == _flops(layer, x)
    assert paths == {True, False}


@pytest.mark.parametrize("cfg", [GEOMETRIES[0], GEOMETRIES[2], GEOMETRIES[6], GEOMETRIES[8]],
                         ids=["plain", "strided-dilated", "same-replicate", "groups"])
def test_merged_step_as_im2col_bmm_equals_the_conv(cfg):
    """The merged spatial + first-core step runs as im2col + bmm for small inputs (batch x
    H' W' <= im2col_pixels) and as a conv otherwise: both equal the conv of the layer's own
    kernel in float64, and both count the same MACs (FlopCounterMode == macs())."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, **cfg).double()
    layer = TTConv2d.from_conv(conv, (9, 3) if cfg.get("groups", 1) == 1 else (9, 2), d=2)
    assert layer.merged and layer.approx_error > 1e-3  # a truncated TT: exactness is not free
    twin = copy.deepcopy(conv)
    with torch.no_grad():
        twin.weight.copy_(tt_conv_kernel(layer))
    x = torch.randn(1, 8, 9, 7, dtype=torch.float64)
    outs = []
    for pixels in (10**6, 0):  # im2col + bmm, then the conv
        layer.im2col_pixels = pixels
        with torch.no_grad():
            outs.append(layer(x))
            assert_close(outs[-1], twin(x), rtol=1e-10, atol=1e-10)
        assert 2 * layer.macs(x.shape) == _flops(layer, x)
    assert outs[0].is_contiguous() and outs[0].shape == outs[1].shape
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        layer.im2col_pixels = 10**6
        layer(x)
    assert "convolution" not in str(fc.get_flop_counts()).lower()  # the im2col path ran


def test_from_conv_ranks_contract_and_error_monotone():
    """``from_conv(conv, in_modes=(4, 4), out_modes=(4, 4), ranks=...)``: an int bound or a
    tuple of interior ranks, clipped to the exact TT-ranks; the error falls with the rank."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1).double()
    caps = conv_tt_caps((3, 3), (4, 4), (4, 4))
    assert caps == [9, 16]
    full = TTConv2d.from_conv(conv, in_modes=(4, 4), out_modes=(4, 4), ranks=(100, 100))
    assert full.rank == (9, 16) and full.approx_error < 1e-12
    errors = []
    for r in (1, 2, 4, 8, 16):
        layer = TTConv2d.from_conv(conv, in_modes=(4, 4), out_modes=(4, 4), ranks=r)
        assert layer.rank == (min(r, 9), r)
        ref = tt_conv_kernel(layer).double()
        w = conv.weight.detach()
        assert layer.approx_error == pytest.approx(float((ref - w).norm() / w.norm()), rel=1e-9)
        errors.append(layer.approx_error)
    assert all(a >= b - 1e-12 for a, b in zip(errors, errors[1:])) and errors[-1] < 1e-12
    assert TTConv2d.from_conv(conv, (3, 5), in_modes=(4, 4), out_modes=(4, 4)).rank == (3, 5)
    with pytest.raises(TypeError, match="give the TT-rank once"):
        TTConv2d.from_conv(conv, 4, ranks=4)
    with pytest.raises(ValueError, match=r"TTConv2d: ranks=\(1, 2, 3\) must be an int or 2 interior"):
        TTConv2d.from_conv(conv, (1, 2, 3), in_modes=(4, 4), out_modes=(4, 4))
    with pytest.raises(ValueError, match=r"TTConv2d: in_modes=\(4, 5\) must be positive ints whose product is 16"):
        TTConv2d.from_conv(conv, 4, in_modes=(4, 5), out_modes=(4, 4))


def test_tt_svd_recovers_a_kernel_of_known_tt_rank():
    """A random TTConv2d's kernel (TT-ranks (3, 5, 2), two groups) is recovered by TT-SVD in
    float64 to < 1e-8, and the layer built from it equals the random one."""
    torch.manual_seed(1)
    src = TTConv2d(24, 36, (3, 2), (3, 5, 2), padding=1, groups=2, in_modes=(2, 3, 2),
                   out_modes=(3, 2, 3)).double()
    conv = nn.Conv2d(24, 36, (3, 2), padding=1, groups=2).double()
    with torch.no_grad():
        conv.weight.copy_(tt_conv_kernel(src))
        conv.bias.copy_(src.bias)
    for t in kernel_tt_tensors(conv.weight.detach(), 2, (2, 3, 2), (3, 2, 3)):
        tt = tt_svd(t, [3, 5, 2])
        assert tt.errors[0] < 1e-8 and float((tt.to_tensor() - t).norm() / t.norm()) < 1e-8
    layer = TTConv2d.from_conv(conv, (3, 5, 2), in_modes=(2, 3, 2), out_modes=(3, 2, 3))
    assert layer.approx_error < 1e-8
    x = torch.randn(2, 24, 8, 7, dtype=torch.float64)
    with torch.no_grad():
        assert_close(layer(x), src(x), rtol=1e-8, atol=1e-8)
        assert_close(layer(x), conv(x), rtol=1e-8, atol=1e-8)


def _variance_ratio(make_tt, make_dense, x: torch.Tensor, seeds: int = 24) -> float:
    """Mean output variance of TT layers over seeds / that of Glorot-initialised dense ones."""
    tt_var, dense_var = 0.0, 0.0
    with torch.no_grad():
        for s in range(seeds):
            torch.manual_seed(s)
            tt_var += float(make_tt()(x).var())
            dense = make_dense()
            nn.init.xavier_normal_(dense.weight)
            dense_var += float(dense(x).var())
    return tt_var / dense_var


def test_glorot_init_keeps_output_variance_of_a_glorot_dense_layer():
    """t3f's rule: core std = sigma^(1/n) prod(r_k)^(-1/(2n)), sigma^2 = 2/(fan_in + fan_out)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 32, 12, 12, generator=g)
    ratio = _variance_ratio(lambda: TTConv2d(32, 48, 3, 8, padding=1, bias=False),
                            lambda: nn.Conv2d(32, 48, 3, padding=1, bias=False), x)
    assert 0.8 < ratio < 1.2, ratio
    xl = torch.randn(256, 784, generator=g)
    ratio = _variance_ratio(lambda: TTLinear(784, 625, (7, 4, 7, 4), (5, 5, 5, 5), 4, bias=False, init="glorot"),
                            lambda: nn.Linear(784, 625, bias=False), xl)
    assert 0.8 < ratio < 1.2, ratio
    # init="dense": nn.Conv2d's default weight variance 1/(3 fan_in) (Kaiming-uniform, a=sqrt(5))
    with torch.no_grad():
        tt_var = sum(float(TTConv2d(32, 48, 3, 8, padding=1, bias=False, init="dense")(x).var())
                     for _ in range(24))
        dense_var = sum(float(nn.Conv2d(32, 48, 3, padding=1, bias=False)(x).var()) for _ in range(24))
    assert 0.8 < tt_var / dense_var < 1.2
    with pytest.raises(ValueError, match=r"TTConv2d: init='he' is not known; accepted: dense, glorot"):
        TTConv2d(8, 8, 3, init="he")


def test_tt_conv_trains_and_gradients_match_the_dense_kernel():
    """Autograd through the sequential contraction: the gradient of the loss w.r.t. the
    layer's kernel (via the chain rule on the cores) equals the dense conv's weight gradient
    contracted the same way (checked by comparing outputs after one identical SGD step)."""
    torch.manual_seed(0)
    layer = TTConv2d(8, 12, 3, 4, padding=1).double()
    x = torch.randn(4, 8, 6, 6, dtype=torch.float64)
    target = torch.randn(4, 12, 6, 6, dtype=torch.float64)
    loss0 = float(((layer(x) - target) ** 2).mean())
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        ((layer(x) - target) ** 2).mean().backward()
        opt.step()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    assert float(((layer(x) - target) ** 2).mean()) < loss0


def test_refusals_name_the_layer_and_the_reason():
    with pytest.raises(ValueError, match=r"TTConv2d: cannot factorize a depthwise conv"):
        TTConv2d.check(nn.Conv2d(8, 8, 3, groups=8))
    with pytest.raises(TypeError, match=r"TTConv2d: cannot replace a Conv1d"):
        TTConv2d.from_conv(nn.Conv1d(8, 8, 3), 4)
    with pytest.raises(ValueError, match=r"TTConv2d: TT-rank r_1=0 must be an int >= 1"):
        TTConv2d(8, 8, 3, (2, 0, 1))
    assert TTConv2d.valid_rank(nn.Conv2d(16, 16, 3), (2.4, 99), in_modes=(4, 4), out_modes=(4, 4)) == (2, 16)
    assert TTConv2d.valid_rank(nn.Conv2d(16, 16, 3), 1e9, in_modes=(4, 4), out_modes=(4, 4)) == 16


def test_rank_space_stops_at_the_dense_parameter_count():
    conv = nn.Conv2d(64, 64, 3, padding=1)
    space = TTConv2d.rank_space(conv, in_modes=(8, 8), out_modes=(8, 8))
    dense = sum(p.numel() for p in conv.parameters())
    costs = [TTConv2d.cost(conv, r, (64, 8, 8), (), in_modes=(8, 8), out_modes=(8, 8))[0] for r in space]
    assert space == list(range(1, len(space) + 1)) and costs == sorted(costs)
    assert costs[-2] < dense <= costs[-1]
    assert prod(conv.kernel_size) == 9


def test_a_following_batchnorm_folds_into_the_layer():
    """ts.fuse folds an eval BatchNorm2d into TTConv2d (bias and out_scale, no op added)."""
    from tensorslim.fusion import fuse_with_report

    torch.manual_seed(0)
    bn = nn.BatchNorm2d(12)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    model = nn.Sequential(TTConv2d(8, 12, 3, 4, padding=1, groups=2, bias=False), bn).double().eval()
    fused, report = fuse_with_report(model)
    assert [f.bn for f in report.folded] == ["1"] and isinstance(fused[1], nn.Identity)
    assert fused[0].out_scale is not None and fused[0].bias is not None
    x = torch.randn(2, 8, 7, 6, dtype=torch.float64)
    with torch.no_grad():
        assert_close(fused(x), model(x), rtol=1e-12, atol=1e-12)
