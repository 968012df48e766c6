"""Decomposition-backed constructors (from_conv / from_linear), TT training, init, validation."""
from math import prod

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import tensorslim.tensor as tensor
from _layer_helpers import known_tt
# the decompositions the layers below are built on: a rename fails here, never a silent skip
from tensorslim.tensor import cp_als, svd, tt_matrix, tucker  # noqa: F401
from tensorslim.layers import (
    CPConv1d, CPConv2d, FilterCPConv2d, LayerTypeError, LowRankConv1d, LowRankConv2d,
    LowRankLinear, TTLinear, TuckerConv1d, TuckerConv2d, factorize,
)


def _x2(dtype=torch.float64):
    return torch.randn(2, 8, 9, 7, generator=torch.Generator().manual_seed(5), dtype=dtype)


# -- full-rank decompositions reproduce the dense layer ---------------------------------------
@pytest.mark.parametrize("cfg", [dict(padding=1), dict(padding="same", padding_mode="circular",
                                                        groups=2, stride=1, dilation=2)])
def test_tucker_from_conv_full_rank_is_exact(cfg):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, **cfg).double()
    layer = TuckerConv2d.from_conv(conv, (8, 12))
    assert layer.approx_error < 1e-10
    with torch.no_grad():
        assert_close(layer(_x2()), conv(_x2()), rtol=1e-9, atol=1e-9)
    conv1 = nn.Conv1d(8, 12, 3, padding=1).double()
    layer1 = TuckerConv1d.from_conv(conv1, (8, 12))
    x1 = torch.randn(2, 8, 10, dtype=torch.float64)
    with torch.no_grad():
        assert_close(layer1(x1), conv1(x1), rtol=1e-9, atol=1e-9)


def test_svd_layers_full_rank_are_exact():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, (3, 2), stride=2, padding=(1, 0), groups=2).double()
    layer = LowRankConv2d.from_conv(conv, 12)
    assert layer.approx_error < 1e-10
    with torch.no_grad():
        assert_close(layer(_x2()), conv(_x2()), rtol=1e-9, atol=1e-9)
    conv1 = nn.Conv1d(8, 12, 3, padding=1, padding_mode="reflect").double()
    x1 = torch.randn(2, 8, 10, dtype=torch.float64)
    with torch.no_grad():
        assert_close(LowRankConv1d.from_conv(conv1, 12)(x1), conv1(x1), rtol=1e-9, atol=1e-9)
    lin = nn.Linear(12, 20).double()
    x = torch.randn(3, 12, dtype=torch.float64)
    with torch.no_grad():
        assert_close(LowRankLinear.from_linear(lin, 12)(x), lin(x), rtol=1e-9, atol=1e-9)
    # truncation: error decreases with rank
    errs = [LowRankLinear.from_linear(lin, r).approx_error for r in (2, 6, 10)]
    assert errs[0] > errs[1] > errs[2] > 0


def test_cp_from_conv_recovers_known_rank_kernel():
    g = torch.Generator().manual_seed(0)
    a, b, c, d = (torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (12, 8, 3, 3))
    conv = nn.Conv2d(8, 12, 3, padding=1).double()
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("ir,jr,kr,lr->ijkl", a, b, c, d))
    layer = CPConv2d.from_conv(conv, 3, n_iter=200, tol=1e-14)
    assert layer.approx_error < 1e-6
    with torch.no_grad():
        assert_close(layer(_x2()), conv(_x2()), rtol=1e-5, atol=1e-5)
    conv1 = nn.Conv1d(8, 12, 3, padding=1).double()
    with torch.no_grad():
        conv1.weight.copy_(torch.einsum("ir,jr,kr->ijk", a, b, c))
    assert CPConv1d.from_conv(conv1, 3, n_iter=200, tol=1e-14).approx_error < 1e-6


def test_tt_from_linear_recovers_known_tt_rank_exactly():
    ttm = known_tt((2, 3, 4), (4, 2, 3), (3, 5))
    lin = nn.Linear(24, 24).double()
    with torch.no_grad():
        lin.weight.copy_(ttm.to_tensor())
    layer = TTLinear.from_linear(lin, (3, 5), in_modes=(2, 3, 4), out_modes=(4, 2, 3))
    assert layer.approx_error < 1e-10
    x = torch.randn(5, 24, dtype=torch.float64)
    with torch.no_grad():
        assert_close(layer(x), lin(x), rtol=1e-9, atol=1e-9)


# -- TTLinear from scratch ---------------------------------------------------------------------
def test_tt_linear_init_matches_dense_output_variance():
    torch.manual_seed(0)
    x = torch.randn(512, 256)
    torch.set_grad_enabled(False)
    dense_var = torch.stack([nn.Linear(256, 256, bias=False)(x).var() for _ in range(8)]).mean()
    tt_var = torch.stack([TTLinear(256, 256, ranks=8, bias=False)(x).var()
                          for _ in range(8)]).mean()
    torch.set_grad_enabled(True)
    assert 0.6 < float(tt_var / dense_var) < 1.6


def test_conv_like_init_matches_dense_output_variance():
    torch.manual_seed(0)
    x = torch.randn(16, 32, 12, 12)
    with torch.no_grad():
        dense = torch.stack([nn.Conv2d(32, 32, 3, bias=False)(x).var() for _ in range(4)]).mean()
        for cls, rank in ((TuckerConv2d, 16), (CPConv2d, 32), (LowRankConv2d, 16)):
            conv = nn.Conv2d(32, 32, 3, bias=False)
            var = torch.stack([cls.like(conv, rank)(x).var() for _ in range(4)]).mean()
            assert 0.5 < float(var / dense) < 2.0, cls.__name__


def test_tt_linear_trains():
    torch.manual_seed(0)
    x = torch.randn(64, 24)
    layer = TTLinear(24, 12, (2, 3, 4), (2, 2, 3), 4)
    y = x @ torch.randn(24, 12)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.mse_loss(layer(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_factorize_is_balanced_and_exact():
    assert factorize(4096, 3) == (16, 16, 16)
    assert factorize(768, 3) == (8, 8, 12)
    assert factorize(1000, 3) == (10, 10, 10)
    assert factorize(97, 2) == (1, 97)
    for n, d in [(360, 4), (50000, 3), (1, 3)]:
        f = factorize(n, d)
        assert prod(f) == n and len(f) == d and list(f) == sorted(f)
    layer = TTLinear(768, 3072, ranks=4)
    assert layer.in_modes == (8, 8, 12) and layer.out_modes == factorize(3072, 3)


def test_tt_int_rank_is_clipped_per_bond():
    layer = TTLinear(64, 64, (2, 8, 4), (2, 8, 4), 10)
    assert layer.rank == (4, 10)  # bond 1 holds at most 2*2 = 4


# -- validation ----------------------------------------------------------------------------------
CONV_LAYERS = [CPConv2d, TuckerConv2d, LowRankConv2d]


@pytest.mark.parametrize("cls", CONV_LAYERS + [CPConv1d, TuckerConv1d, LowRankConv1d, FilterCPConv2d])
def test_depthwise_conv_is_rejected_everywhere(cls):
    dense = nn.Conv2d if cls.dims == 2 else nn.Conv1d
    dw = dense(16, 32, 3, groups=16)
    rank = (16, 16) if cls.method == "tucker" else 16
    shape = (16, 8, 8) if cls.dims == 2 else (16, 8)
    from tensorslim.layers import layer_for

    for call in (lambda: cls.like(dw, rank), lambda: cls.from_dense(dw, rank),
                 lambda: cls.cost(dw, rank, shape, shape), lambda: cls.check(dw),
                 lambda: layer_for(cls.method, dw)):
        with pytest.raises(ValueError, match=rf"{cls.__name__}.*depthwise"):
            call()


@pytest.mark.parametrize("cls,bad", [
    (CPConv2d, 0), (CPConv2d, 10_000), (CPConv2d, 3),  # 3: not divisible by groups=2
    (TuckerConv2d, (0, 4)), (TuckerConv2d, (4, 13)), (TuckerConv2d, (4, 4, 4)),
    (LowRankConv2d, -1), (LowRankConv2d, 14),
    (FilterCPConv2d, 0), (FilterCPConv2d, 10),  # 10 > a 4x3x3 filter's generic rank 9
])
def test_bad_conv_rank_raises(cls, bad):
    conv = nn.Conv2d(8, 12, 3, groups=2)
    with pytest.raises(ValueError, match=cls.__name__):
        cls.like(conv, bad)
    with pytest.raises(ValueError, match=cls.__name__):
        cls.cost(conv, bad, (8, 5, 5), (12, 3, 3))


def test_bad_rank_messages_say_what_is_accepted():
    with pytest.raises(ValueError, match=r"rank=9 is out of range; accepted: 1 <= rank <= 8"):
        LowRankLinear.like(nn.Linear(8, 12), 9)
    with pytest.raises(ValueError, match=r"r_out=13 .* <= 12"):
        TuckerConv2d.like(nn.Conv2d(8, 12, 3), (4, 13))
    with pytest.raises(TypeError, match="must be an int"):
        CPConv2d.like(nn.Conv2d(8, 12, 3), 2.5)
    with pytest.raises(ValueError, match=r"TTLinear: rank=0"):
        TTLinear.like(nn.Linear(24, 24), 0)
    with pytest.raises(ValueError, match=r"TTLinear: TT-rank r_1=9 .* <= 8"):
        TTLinear.like(nn.Linear(24, 24), (9, 2), in_modes=(2, 3, 4), out_modes=(4, 2, 3))
    with pytest.raises(ValueError, match=r"TTLinear: rank=1000 is larger"):
        TTLinear.like(nn.Linear(24, 24), 1000)
    with pytest.raises(ValueError, match=r"in_modes=\(2, 3\) must be positive ints whose product"):
        TTLinear(24, 24, (2, 3), (4, 6))


@pytest.mark.parametrize("cls,module", [
    (CPConv2d, nn.Linear(4, 4)), (TuckerConv2d, nn.Conv1d(4, 4, 3)),
    (LowRankConv1d, nn.Conv2d(4, 4, 3)), (LowRankLinear, nn.Conv2d(4, 4, 3)),
    (TTLinear, nn.Conv2d(4, 4, 3)), (TuckerConv2d, nn.ConvTranspose2d(4, 4, 3)),
])
def test_wrong_module_type_raises(cls, module):
    with pytest.raises(ValueError, match=rf"{cls.__name__}: cannot replace a {type(module).__name__}"):
        cls.like(module, 2)
    with pytest.raises(TypeError):  # LayerTypeError is both
        cls.like(module, 2)
    assert issubclass(LayerTypeError, TypeError) and issubclass(LayerTypeError, ValueError)


def test_cost_checks_in_shape():
    with pytest.raises(ValueError, match=r"TuckerConv2d: in_shape=\(3, 5, 5\)"):
        TuckerConv2d.cost(nn.Conv2d(8, 12, 3), 4, (3, 5, 5), (12, 3, 3))


def test_tt_eager_chunking_is_exact_and_not_baked_into_exports():
    torch.manual_seed(0)
    layer = TTLinear(24, 20, (2, 3, 4), (5, 2, 2), (3, 4)).double()
    x = torch.randn(7, 3, 24, dtype=torch.float64)
    ref = layer._contract(x)
    layer.chunk_rows = 4  # 21 rows -> 6 chunks
    with torch.no_grad():
        assert_close(layer(x), ref, rtol=1e-12, atol=1e-12)
        traced = torch.jit.trace(layer, (x,))
    other = torch.randn(2, 5, 24, dtype=torch.float64)  # a batch size the trace never saw
    with torch.no_grad():
        assert_close(traced(other), layer._contract(other), rtol=1e-12, atol=1e-12)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        layer(x)
    assert fc.get_total_flops() == 2 * layer.macs(tuple(x.shape))


def test_conv_output_keeps_input_memory_format():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1)
    x = torch.randn(2, 8, 9, 7)
    for cls, rank in ((TuckerConv2d, 4), (CPConv2d, 8), (LowRankConv2d, 4)):
        layer = cls.like(conv, rank)
        with torch.no_grad():
            out = layer(x)
            out_cl = layer(x.contiguous(memory_format=torch.channels_last))
        assert out.is_contiguous()
        assert out_cl.is_contiguous(memory_format=torch.channels_last)
        assert_close(out_cl, out, rtol=1e-5, atol=1e-5)


def test_conv_ambiguous_layout_input_gives_channels_last_output():
    """A one-channel input is both NCHW- and channels-last-contiguous: the layer answers
    channels-last (its fast path), and the numbers equal the dense conv's."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 12, 3, padding=1).double()
    x = torch.randn(3, 1, 9, 7, dtype=torch.float64)
    kernel = tensor.CPTensor(torch.ones(2, dtype=torch.float64),  # exact CP rank 2
                             tuple(torch.randn(n, 2, dtype=torch.float64) for n in (12, 1, 3, 3)))
    with torch.no_grad():
        conv.weight.copy_(kernel.to_tensor())
    for cls, rank in ((TuckerConv2d, (1, 12)), (CPConv2d, 2), (LowRankConv2d, 9)):
        layer = cls.from_conv(conv, rank)
        with torch.no_grad():
            out = layer(x)
            ref = conv(x)
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
        assert_close(out, ref, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("cls,rank", [(TuckerConv2d, 4), (CPConv2d, 8), (LowRankConv1d, 4)])
def test_conv_eager_chunking_is_exact_and_not_baked_into_exports(cls, rank):
    torch.manual_seed(0)
    dense = nn.Conv2d(8, 12, 3, padding=1) if cls.dims == 2 else nn.Conv1d(8, 12, 3, padding=1)
    layer = cls.like(dense.double(), rank)
    x = torch.randn((5, 8, 6, 7) if cls.dims == 2 else (5, 8, 9), dtype=torch.float64)
    with torch.no_grad():
        ref = layer._forward(x)
        layer.chunk_bytes = 1  # force chunks of one sample
        assert_close(layer(x), ref, rtol=1e-12, atol=1e-12)
        traced = torch.jit.trace(layer, (x,))
        other = x[:3] * 2
        assert_close(traced(other), layer._forward(other), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls,rank", [(TuckerConv2d, 4), (CPConv2d, 8)])
def test_conv_eager_chunking_keeps_gradients_and_the_memory_format(cls, rank):
    torch.manual_seed(0)
    layer = cls.like(nn.Conv2d(8, 12, 3, padding=1).double(), rank)
    x = torch.randn(5, 8, 6, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    ref = layer._forward(x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), layer.project_in.weight)
    layer.chunk_bytes = 1  # chunks of one sample
    out = layer(x)
    (g,) = torch.autograd.grad(out.square().sum(), layer.project_in.weight)
    assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert_close(g, g_ref, rtol=1e-10, atol=1e-10)
    with torch.inference_mode():  # the in-place path keeps channels-last output
        fast = layer(x)
    assert fast.is_contiguous(memory_format=torch.channels_last) and not fast.is_contiguous()
    assert_close(fast, ref.detach(), rtol=1e-12, atol=1e-12)
    assert CPConv2d.chunk_default == 8 << 20 and TuckerConv2d.chunk_default == 32 << 20


@pytest.mark.parametrize("cls", [TuckerConv2d, CPConv2d])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_nchw_input_runs_nchw_stages_and_matches_the_dense_conv(cls, padding_mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, padding=1, padding_mode=padding_mode).double()
    layer = cls.from_conv(conv, (6, 10) if cls is TuckerConv2d else 20)  # Tucker: full rank
    x = torch.randn(3, 6, 9, 8, dtype=torch.float64)
    seen = []
    hook = layer.project_out.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    out = layer(x)
    hook.remove()
    assert out.is_contiguous() and not seen[0].is_contiguous(memory_format=torch.channels_last)
    if cls is TuckerConv2d:
        assert_close(out, conv(x), rtol=1e-9, atol=1e-9)
    cl = layer(x.contiguous(memory_format=torch.channels_last))  # the channels-last stages
    assert cl.is_contiguous(memory_format=torch.channels_last) and not cl.is_contiguous()
    assert_close(cl, out, rtol=1e-9, atol=1e-9)
