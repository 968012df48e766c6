"""Tensor algebra primitives against their definitions."""
from __future__ import annotations

import pytest
import torch
from _tensor_helpers import gen

from tensorslim.tensor import (CPTensor, fold, hadamard, khatri_rao, kron, mode_dot,
                               multi_mode_dot, rel_error, unfold)

LETTERS = "abcd"


@pytest.mark.parametrize("mode", [0, 1, 2, 3, -1])
def test_unfold_fold_round_trip(mode):
    x = torch.randn(2, 3, 4, 5, generator=gen(), dtype=torch.float64)
    m = unfold(x, mode)
    assert m.shape == (x.shape[mode], x.numel() // x.shape[mode])
    assert torch.equal(fold(m, mode, x.shape), x)


def test_unfold_matches_tensorly_convention():
    x = torch.arange(24.0).reshape(2, 3, 4)
    # mode-1: rows indexed by i1, columns by (i0, i2) with i2 fastest
    m = unfold(x, 1)
    assert m[2, 0 * 4 + 3] == x[0, 2, 3]
    assert m[1, 1 * 4 + 2] == x[1, 1, 2]


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_mode_dot_matches_einsum(mode):
    x = torch.randn(2, 3, 4, 5, generator=gen(), dtype=torch.float64)
    a = torch.randn(7, x.shape[mode], generator=gen(1), dtype=torch.float64)
    out_letters = LETTERS[:mode] + "z" + LETTERS[mode + 1:]
    ref = torch.einsum(f"{LETTERS},z{LETTERS[mode]}->{out_letters}", x, a)
    got = mode_dot(x, a, mode)
    assert got.shape[mode] == 7
    assert torch.allclose(got, ref, atol=1e-12)
    # mode product == matrix product on the unfolding
    assert torch.allclose(unfold(got, mode), a @ unfold(x, mode), atol=1e-12)


def test_multi_mode_dot_and_transpose():
    x = torch.randn(4, 5, 6, generator=gen(), dtype=torch.float64)
    a = torch.randn(2, 4, generator=gen(1), dtype=torch.float64)
    c = torch.randn(3, 6, generator=gen(2), dtype=torch.float64)
    ref = torch.einsum("ijk,ai,ck->ajc", x, a, c)
    assert torch.allclose(multi_mode_dot(x, [a, c], [0, 2]), ref, atol=1e-12)
    assert torch.allclose(multi_mode_dot(x, [a.T, c.T], [0, 2], transpose=True), ref, atol=1e-12)


def test_kron_definition():
    a = torch.randn(2, 3, generator=gen(), dtype=torch.float64)
    b = torch.randn(4, 5, generator=gen(1), dtype=torch.float64)
    k = kron(a, b)
    assert k.shape == (8, 15)
    for i, j, p, q in [(0, 0, 0, 0), (1, 2, 3, 4), (1, 0, 2, 3)]:
        assert k[i * 4 + p, j * 5 + q] == a[i, j] * b[p, q]


def test_khatri_rao_definition_and_cp_unfolding():
    fs = [torch.randn(s, 3, generator=gen(i), dtype=torch.float64) for i, s in enumerate((2, 4, 5))]
    kr = khatri_rao(fs)
    assert kr.shape == (40, 3)
    for i, j, k, r in [(0, 0, 0, 0), (1, 3, 4, 2), (1, 2, 0, 1)]:
        assert torch.isclose(kr[(i * 4 + j) * 5 + k, r], fs[0][i, r] * fs[1][j, r] * fs[2][k, r])
    # columns are Kronecker products of the columns
    assert torch.allclose(kr[:, 1], torch.kron(torch.kron(fs[0][:, 1], fs[1][:, 1]), fs[2][:, 1]))
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    x = CPTensor(weights=w, factors=tuple(fs)).to_tensor()
    for n in range(3):
        others = [f for k, f in enumerate(fs) if k != n]
        ref = fs[n] @ torch.diag(w) @ khatri_rao(others).T
        assert torch.allclose(unfold(x, n), ref, atol=1e-12)


def test_hadamard_and_rel_error():
    a = torch.randn(3, 4, generator=gen(), dtype=torch.float64)
    b = torch.randn(3, 4, generator=gen(1), dtype=torch.float64)
    assert torch.equal(hadamard(a, b), a * b)
    assert rel_error(a, a) == 0.0
    assert rel_error(a, 2 * a) == pytest.approx(1.0, rel=1e-12)
    assert rel_error(a, b) == pytest.approx(float((a - b).norm() / a.norm()), rel=1e-12)


def test_ops_validation_messages():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="mode=3"):
        unfold(x, 3)
    with pytest.raises(TypeError, match="torch.Tensor"):
        unfold([[1.0]], 0)
    with pytest.raises(ValueError, match=r"\(J, 3\)"):
        mode_dot(x, torch.randn(5, 4), 1)
    with pytest.raises(ValueError, match="same number of columns"):
        khatri_rao([torch.randn(2, 3), torch.randn(2, 4)])
    with pytest.raises(ValueError, match="equal shapes"):
        hadamard(torch.randn(2), torch.randn(3))
    with pytest.raises(ValueError, match="unfolding"):
        fold(torch.randn(3, 7), 0, (3, 2, 4))
