"""Property test over random conv geometries (a seeded loop): for every registered conv layer
class (one test case per class and draw), a dense Conv1d/Conv2d is either refused with a
ValueError that gives a reason, or its factorized layer at FULL rank (exact: Tucker-2 (S, T),
SVD min(T/g, S/g*prod(k)) per group, CP the generic maximum rank per group, TT every bond at
its exact rank) computes the dense output (float64). At a random lower rank the layer computes
exactly the conv of the kernel it represents and reports that kernel's error, which lies
between a lower bound no kernel of that rank beats and an upper one: Eckart-Young of the
output unfolding and 1 (the zero kernel's) for CP / Tucker-2 / SVD; for TT the largest
per-bond Eckart-Young tail and TT-SVD's quasi-optimality bound; for filter-wise CP the per-filter
unfolding tails (:func:`filter_cp_lower`) and 1. Never silently wrong."""
import random
from math import prod

import pytest
import torch
from _bounds import eckart_young, unfold_rank
from _layer_helpers import filter_cp_lower
from torch import nn

from tensorslim.layers import LAYERS, layer_for
from tensorslim.layers.ttconv import TTConv2d, tt_conv_kernel
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


# the kernel (T, S/g, *k) a layer of each method represents, rebuilt from its factors
KERNELS = {
    "tucker": lambda layer: torch.cat([p.to_tensor() for p in layer.to_tucker()]),
    "cp": lambda layer: torch.cat([p.to_tensor() for p in layer.to_cp()]),
    "svd": lambda layer: torch.cat([s.to_tensor() for s in layer.to_svd()]).reshape(
        layer.geometry.out_channels, layer.geometry.in_group, *layer.geometry.kernel),
    "tt": tt_conv_kernel,
    # the library's reconstruction; test_filtercp.py checks kernel() against an einsum of factors
    "filtercp": lambda layer: layer.kernel(),
}


def _kernel(method: str, layer: nn.Module) -> torch.Tensor:
    if method not in KERNELS:
        raise KeyError(f"no reference kernel for method {method!r} ({type(layer).__name__}): add "
                       f"one to KERNELS in tests/layers/test_layers_property.py (known: {sorted(KERNELS)})")
    return KERNELS[method](layer)


def tt_bounds(w: torch.Tensor, groups: int, in_modes: tuple[int, ...], out_modes: tuple[int, ...],
              ranks: tuple[int, ...]) -> tuple[float, float]:
    """(lower, upper) bounds on the relative error of TTConv2d's TT-SVD at ``ranks``.

    Bond j (0-based) of the chain (spatial, channel mode d, ..., 1) separates the spatial mode
    and channel modes d-j+1..d (1-based) from the rest, so any TT with these ranks has that
    unfolding of rank <= r_j (per group): its error is at least the largest Eckart-Young tail
    over bonds; TT-SVD's is at most the root of the sum of the tails (Oseledets 2011, Thm 2.2)."""
    w = w.detach().double()
    d = len(in_modes)
    tails = [0.0] * d
    for wg in w.chunk(groups):
        t = wg.reshape(*out_modes, *in_modes, -1)  # (m_1..m_d, n_1..n_d, kh kw)
        for j in range(d):
            left = [2 * d] + [a for k in range(d - j, d) for a in (k, d + k)]
            right = [a for k in range(d - j) for a in (k, d + k)]
            u = t.permute(left + right).reshape(prod(t.shape[a] for a in left), -1)
            tails[j] += float((torch.linalg.svdvals(u)[ranks[j]:] ** 2).sum())
    total = float((w ** 2).sum())
    return (max(tails) / total) ** 0.5, (sum(tails) / total) ** 0.5


def _bounds(method: str, conv: nn.Module, layer: nn.Module) -> tuple[float, float]:
    """(lower, upper) bounds on ``layer.approx_error`` (see the module doc). Filter-wise CP:
    :func:`filter_cp_lower` and 1 (every ALS step is a least-squares fit, never worse than
    the zero factor it could pick)."""
    if method == "filtercp":
        return filter_cp_lower(conv.weight, layer.rank), 1.0
    if method == "tt":
        return tt_bounds(conv.weight, conv.groups, layer.in_modes, layer.out_modes, layer.rank)
    return eckart_young(conv.weight, conv.groups, unfold_rank(layer.rank)), 1.0


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def _cases(seeds: range) -> list:
    """(method, layer class, seed) for every registered conv class whose dense type is the draw's."""
    out = []
    for seed in seeds:
        dense = nn.Conv2d if len(draw(seed)[0]["kernel_size"]) == 2 else nn.Conv1d
        out += [pytest.param(m, cls, seed, id=f"{m}-{seed}") for (m, d), cls in LAYERS.items() if d is dense]
    return out


@pytest.mark.parametrize("method,cls,seed", _cases(range(N_CASES)))
def test_full_rank_layer_equals_dense_or_is_refused(method, cls, seed):
    cfg, in_shape = draw(seed)
    torch.manual_seed(seed)
    conv = _dense(cfg)
    x = torch.randn(2, *in_shape, dtype=torch.float64)
    with torch.no_grad():
        ref = conv(x)
    try:
        assert layer_for(method, conv) is cls
    except ValueError as e:  # refused: the reason is in the message
        assert str(e).startswith(f"{cls.__name__}: ") and len(str(e)) > 40, str(e)
        return
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


@pytest.mark.parametrize("method,cls,seed", _cases(range(0, N_CASES, 3)))
def test_low_rank_layer_is_the_conv_of_its_kernel(method, cls, seed):
    """At a random lower rank: output == dense conv with the layer's own kernel, and the
    reported approx_error is that kernel's error, within the bounds of the module doc."""
    cfg, in_shape = draw(seed)
    torch.manual_seed(seed)
    conv = _dense(cfg)
    x = torch.randn(2, *in_shape, dtype=torch.float64)
    rng = random.Random(seed)
    try:
        cls.check(conv)
    except ValueError:  # refusals: test_full_rank_layer_equals_dense_or_is_refused
        return
    full = cls.valid_rank(conv, 10**9)
    top = max(full) if isinstance(full, tuple) else full
    rank = cls.valid_rank(conv, rng.uniform(0.5, top))
    layer = cls.from_conv(conv, rank, **({"n_iter": 30} if method == "cp" else {}))
    kernel = _kernel(method, layer)
    twin = _dense(cfg)
    with torch.no_grad():
        twin.weight.copy_(kernel)
        if conv.bias is not None:
            twin.bias.copy_(conv.bias)
        assert _rel(layer(x), twin(x)) < 1e-9, (method, cfg, rank)
    lower, upper = _bounds(method, conv, layer)
    assert lower * (1 - 1e-6) <= layer.approx_error <= min(upper, 1) * (1 + 1e-6) + 1e-9, \
        (method, cfg, rank, lower, upper)
    if method == "svd":  # SVD attains Eckart-Young
        assert layer.approx_error == pytest.approx(lower, rel=1e-6, abs=1e-9), (cfg, rank)
    assert layer.approx_error == pytest.approx(rel_error(conv.weight.detach(), kernel),
                                               rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("groups", [1, 2])
def test_tt_error_is_within_its_bounds_when_several_bonds_are_cut(groups):
    """The draws above have few channels (mostly one non-trivial bond). On 8 -> 12 channels:
    cutting ONE bond, TT-SVD's error is exactly that bond's Eckart-Young tail (both bounds
    coincide), which pins the unfoldings of tt_bounds to the layer's chain; cutting several,
    it lies between the bounds and grows as the ranks shrink."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, groups=groups, dtype=torch.float64)
    caps = TTConv2d.like(conv, 10**9).rank
    for j in range(len(caps)):
        if caps[j] > 1:
            cut = tuple(max(1, c // 2) if i == j else c for i, c in enumerate(caps))
            layer = TTConv2d.from_conv(conv, cut)
            lower, upper = tt_bounds(conv.weight, groups, layer.in_modes, layer.out_modes, layer.rank)
            assert 0 < lower == pytest.approx(upper, rel=1e-9)
            assert layer.approx_error == pytest.approx(lower, rel=1e-6), (j, layer.rank)
    errors = []
    for r in (3, 2, 1):
        layer = TTConv2d.from_conv(conv, r)
        assert sum(c > r for c in caps) >= 2, (caps, r)  # several bonds cut
        lower, upper = tt_bounds(conv.weight, groups, layer.in_modes, layer.out_modes, layer.rank)
        assert lower < layer.approx_error < min(upper, 1), (r, lower, layer.approx_error, upper)
        errors.append(layer.approx_error)
    assert errors == sorted(errors) and errors[0] > 0


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
