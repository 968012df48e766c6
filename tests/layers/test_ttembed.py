"""TTEmbedding: exact at full TT-rank, Eckart-Young-like error decrease, and row gathers that
never allocate a (vocab x hidden) tensor. LowRankEmbedding (the one plans use): exact at full
rank, row-weighted, and over random tables exactly Eckart-Young's error, which is the planner's
min_error proxy for it."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tensorslim.layers import TTEmbedding as Exported
from tensorslim.layers.ttembed import TTEmbedding, vocab_modes_for


class _Largest(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_exact_at_full_rank_with_padded_vocabulary():
    torch.manual_seed(0)
    emb = nn.Embedding(50, 12).double()  # 50 rows -> modes (4, 4, 4) = 64, padded
    tt = TTEmbedding.from_dense(emb, 10_000, dim_modes=(2, 2, 3))
    assert tt.vocab_modes == (4, 4, 4) and tt.ranks == (8, 12)  # clipped to the exact TT-ranks
    idx = torch.arange(50)
    assert float((tt(idx) - emb.weight).abs().max()) < 1e-10
    assert tt.approx_error < 1e-12


def test_error_decreases_with_rank_and_lookup_matches_dense_reference():
    torch.manual_seed(1)
    emb = nn.Embedding(200, 24).double()
    errs = []
    for r in (2, 4, 8, 16):
        tt = TTEmbedding.from_dense(emb, r)
        idx = torch.randint(0, 200, (3, 7))
        table = tt(torch.arange(200))  # reference: the rows one by one
        assert torch.allclose(tt(idx), table[idx], atol=1e-12)
        errs.append(float((table - emb.weight).norm() / emb.weight.norm()))
        assert abs(errs[-1] - tt.approx_error) < 1e-9
    assert errs == sorted(errs, reverse=True) and errs[0] > errs[-1]


def test_gather_never_materialises_the_table():
    emb = nn.Embedding(30522, 384)
    tt = TTEmbedding.like(emb, 16)
    idx = torch.randint(0, 30522, (8, 32))
    with torch.no_grad(), _Largest() as rec:
        out = tt(idx)
    assert out.shape == (8, 32, 384)
    assert rec.largest <= 256 * 384 * 16  # per token: hidden x rank, never vocab x hidden
    assert rec.largest < 30522 * 384 // 10
    params = sum(p.numel() for p in tt.parameters())
    assert params == TTEmbedding.cost(emb, 16, (32,), (32, 384))[0] and params < 0.01 * 30522 * 384


def test_exports_and_checks():
    assert Exported is TTEmbedding
    assert vocab_modes_for(30522, 3) == (32, 32, 30)
    with pytest.raises(ValueError, match="max_norm"):
        TTEmbedding.check(nn.Embedding(10, 4, max_norm=1.0))
    with pytest.raises(ValueError, match="vocab_modes"):
        TTEmbedding(100, 8, 2, vocab_modes=(2, 2, 2), dim_modes=(2, 2, 2))
    with pytest.raises(TypeError, match="unexpected options"):
        TTEmbedding.like(nn.Embedding(10, 4), 2, foo=1)


def test_low_rank_embedding_exact_weighted_and_gathers_rows():
    from tensorslim.layers.ttembed import LowRankEmbedding

    torch.manual_seed(2)
    emb = nn.Embedding(300, 16).double()
    full = LowRankEmbedding.from_dense(emb, 16)
    idx = torch.randint(0, 300, (4, 9))
    assert float((full(idx) - emb(idx)).abs().max()) < 1e-10
    plain = LowRankEmbedding.from_dense(emb, 4)
    s = torch.linalg.svdvals(emb.weight.detach())
    assert abs(plain.approx_error - float((s[4:] ** 2).sum() / (s ** 2).sum()) ** 0.5) < 1e-10
    w = torch.ones(300, dtype=torch.float64)
    w[:4] = 100.0  # four frequent tokens: rank 4 can keep them
    weighted = LowRankEmbedding.from_dense(emb, 4, row_weights=w)
    with torch.no_grad():
        err = lambda m: float((m(torch.arange(4)) - emb.weight[:4]).norm())  # noqa: E731
        assert err(weighted) < 0.1 * err(plain)
    assert LowRankEmbedding.cost(emb, 4, (9,), (9, 16))[0] == sum(p.numel() for p in plain.parameters())
    big, idx = LowRankEmbedding.like(nn.Embedding(30522, 384), 32), torch.randint(0, 30522, (8, 32))
    with torch.no_grad(), _Largest() as rec:
        big(idx)
    assert rec.largest <= 30522 * 32  # the (V, r) factor itself; no (V, D) table


def test_low_rank_embedding_property_over_random_tables():
    """Seeded draws of (V, D, r): at the largest valid rank the layer reproduces every row of the
    table (float64); at r its error is exactly Eckart-Young's, which is what the planner's
    min_error proxy (``error_proxies(table, "svd", ...)``) reports for it; valid_rank is the
    nearest valid rank and idempotent, and refuses what is not a positive number."""
    import random

    from tensorslim.layers.ttembed import LowRankEmbedding
    from tensorslim.rank.rules import error_proxies

    rng = random.Random(0)
    for seed in range(12):
        v, d = rng.randint(2, 60), rng.randint(1, 40)
        torch.manual_seed(seed)
        emb = nn.Embedding(v, d).double()
        full = LowRankEmbedding.valid_rank(emb, 10**9)
        assert full == min(v, d) and LowRankEmbedding.valid_rank(emb, full) == full
        idx = torch.arange(v)
        assert float((LowRankEmbedding.from_dense(emb, full)(idx) - emb.weight).abs().max()) < 1e-10
        r = rng.randint(1, full)
        assert LowRankEmbedding.valid_rank(emb, r - 0.4) == r
        layer = LowRankEmbedding.from_dense(emb, r)
        s2 = torch.linalg.svdvals(emb.weight.detach()) ** 2
        tail = float(s2[r:].sum() / s2.sum())
        assert abs(layer.approx_error ** 2 - tail) < 1e-10
        assert abs(error_proxies(emb.weight, "svd", [r])[0] - tail) < 1e-10
        assert LowRankEmbedding.rank_space(emb) == list(range(1, full + 1))
    for bad, err in [(0, ValueError), (float("nan"), ValueError), ("4", TypeError), (True, TypeError)]:
        with pytest.raises(err, match="LowRankEmbedding: rank"):
            LowRankEmbedding.valid_rank(nn.Embedding(10, 4), bad)
    with pytest.raises(TypeError, match="LowRankEmbedding.valid_rank: unexpected options"):
        LowRankEmbedding.valid_rank(nn.Embedding(10, 4), 2, nonsense=1)
