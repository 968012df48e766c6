"""Property test over random conv geometries (a seeded loop): for every registered conv layer
class, a dense Conv1d/Conv2d is either refused with a ValueError that gives a reason, or its
factorized layer at FULL rank (exact: Tucker-2 (S, T), SVD min(T/g, S/g*prod(k)) per group,
CP the generic maximum rank per group) computes the dense output (float64). At a random lower
rank the layer computes exactly the conv of the kernel it represents and reports an error
between the Eckart-Young floor of that rank and 1 (the zero kernel's). Never silently wrong."""
import random
from math import prod

import pytest
import torch
from _bounds import eckart_young, unfold_rank
from torch import nn

from tensorslim.layers import LAYERS, layer_for
from tensorslim.tensor import rel_error

N_CASES = 120
MODES = ("zeros", "reflect", "replicate", "circular")


def draw(seed: int) -> tuple[dict, tuple[int, ...]]:
    """Random nn.Conv{1,2}d arguments (legal for torch) and a per-sample input shape."""
    rng = random.Random(seed)
    dims = rng.choice((1, 2))
    groups = rng.choice((1, 1, 1, 2, 3))
    in_c, out_c = groups * rng.randint(1, 3), groups * rng.randint(1, 3)
    kernel = [rng.randint(1, 7) for _ in range(dims)]
    if dims == 2 and rng.random() < 0.3:  # 1xk / kx1
        kernel[rng.randrange(2)] = 1
    stride = [rng.choice((1, 1, 2, 3)) for _ in range(dims)]
    dilation = [rng.choice((1, 2)) for _ in range(dims)]
    kinds = ["int", "tuple", "valid"] + (["same", "same"] if max(stride) == 1 else [])
    kind = rng.choice(kinds)
    padding = {"int": rng.randint(0, 3), "tuple": tuple(rng.randint(0, 3) for _ in range(dims)),
               "valid": "valid", "same": "same"}[kind]
    # large enough for every padding mode (reflect needs pad < size) and a non-empty output
    size = tuple(d * (k - 1) + 1 + rng.randint(3, 6) for k, d in zip(kernel, dilation))
    cfg = dict(in_channels=in_c, out_channels=out_c, kernel_size=tuple(kernel),
               stride=tuple(stride), padding=padding, dilation=tuple(dilation), groups=groups,
               bias=rng.random() < 0.6, padding_mode=rng.choice(MODES))
    return cfg, (in_c, *size)


def _dense(cfg: dict) -> nn.Module:
    cls = nn.Conv2d if len(cfg["kernel_size"]) == 2 else nn.Conv1d
    return cls(**cfg, dtype=torch.float64)


def _kernel(layer: nn.Module) -> torch.Tensor:
    """The kernel (T, S/g, *k) the layer represents, rebuilt from its factors."""
    parts = getattr(layer, "to_tucker", None) or getattr(layer, "to_cp", None)
    if parts is not None:
        return torch.cat([p.to_tensor() for p in parts()])
    shape = (layer.geometry.out_channels, layer.geometry.in_group, *layer.geometry.kernel)
    return torch.cat([s.to_tensor() for s in layer.to_svd()]).reshape(shape)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


@pytest.mark.parametrize("seed", range(N_CASES))
def test_full_rank_layer_equals_dense_or_is_refused(seed):
    cfg, in_shape = draw(seed)
    torch.manual_seed(seed)
    conv = _dense(cfg)
    x = torch.randn(2, *in_shape, dtype=torch.float64)
    with torch.no_grad():
        ref = conv(x)
    for (method, dense), cls in LAYERS.items():
        if type(conv) is not dense:
            continue
        try:
            assert layer_for(method, conv) is cls
        except ValueError as e:  # refused: the reason is in the message
            assert str(e).startswith(f"{cls.__name__}: ") and len(str(e)) > 40, str(e)
            continue
        full = cls.valid_rank(conv, 10**9)  # the largest valid rank: exact
        layer = cls.from_conv(conv, full)
        # CP-ALS solves normal equations: on an ill-conditioned full-rank problem its floor is
        # ~sqrt(eps) (a few 1e-8), which it reports; the others are exact to rounding.
        tol = 1e-7 if method == "cp" else 1e-10
        assert layer.approx_error < tol, (method, cfg, full)
        with torch.no_grad():
            out = layer(x)
            assert out.shape == ref.shape
            assert _rel(out, ref) < 1e-9 + 10 * layer.approx_error, (method, cfg, full)
            if len(in_shape) == 3:  # channels-last input, same numbers
                out_cl = layer(x.contiguous(memory_format=torch.channels_last))
                assert _rel(out_cl, ref) < 1e-9 + 10 * layer.approx_error, (method, cfg)


@pytest.mark.parametrize("seed", range(0, N_CASES, 3))
def test_low_rank_layer_is_the_conv_of_its_kernel(seed):
    """At a random lower rank: output == dense conv with the layer's own kernel, and the
    reported approx_error is that kernel's error (<= 1: ALS/HOOI/SVD never end worse than 0)."""
    cfg, in_shape = draw(seed)
    torch.manual_seed(seed)
    conv = _dense(cfg)
    x = torch.randn(2, *in_shape, dtype=torch.float64)
    rng = random.Random(seed)
    for (method, dense), cls in LAYERS.items():
        if type(conv) is not dense:
            continue
        try:
            cls.check(conv)
        except ValueError:
            continue
        full = cls.valid_rank(conv, 10**9)
        top = max(full) if isinstance(full, tuple) else full
        rank = cls.valid_rank(conv, rng.uniform(0.5, top))
        layer = cls.from_conv(conv, rank, **({"n_iter": 30} if method == "cp" else {}))
        twin = _dense(cfg)
        with torch.no_grad():
            twin.weight.copy_(_kernel(layer))
            if conv.bias is not None:
                twin.bias.copy_(conv.bias)
            assert _rel(layer(x), twin(x)) < 1e-9, (method, cfg, rank)
        # no kernel of that rank is closer to W than the Eckart-Young floor of its per-group
        # output unfolding (equal to it for SVD); ALS / HOOI never end worse than zero
        floor = eckart_young(conv.weight, conv.groups, unfold_rank(rank))
        assert floor * (1 - 1e-6) <= layer.approx_error <= 1 + 1e-9, (method, cfg, rank, floor)
        if method == "svd":
            assert layer.approx_error == pytest.approx(floor, rel=1e-6, abs=1e-9), (cfg, rank)
        assert layer.approx_error == pytest.approx(rel_error(conv.weight.detach(), _kernel(layer)),
                                                   rel=1e-6, abs=1e-9)


def test_draws_cover_the_geometries():
    """The seeded draws exercise every feature the property is about."""
    cfgs = [draw(s)[0] for s in range(N_CASES)]
    ks = [c["kernel_size"] for c in cfgs]
    assert any(len(k) == 2 and k[0] == 1 < k[1] for k in ks)  # 1xk
    assert any(len(k) == 2 and k[1] == 1 < k[0] for k in ks)  # kx1
    assert any(len(k) == 1 for k in ks) and any(7 in k for k in ks)
    assert {c["padding_mode"] for c in cfgs} == set(MODES)
    assert {c["padding"] for c in cfgs if isinstance(c["padding"], str)} == {"same", "valid"}
    assert any(isinstance(c["padding"], tuple) for c in cfgs)
    assert any(3 in c["stride"] for c in cfgs) and any(2 in c["dilation"] for c in cfgs)
    assert {c["groups"] for c in cfgs} == {1, 2, 3}
    assert any(c["groups"] > 1 and c["in_channels"] > c["groups"] for c in cfgs)  # not depthwise
    assert {c["bias"] for c in cfgs} == {True, False}
    assert any(prod(c["kernel_size"]) == 1 for c in cfgs)
