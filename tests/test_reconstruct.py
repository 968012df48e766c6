"""Data-aware refit of factorized layers (tensorslim.reconstruct): exact recovery where the
factors can represent the dense map, optimality of the reduced-rank fit, error bookkeeping."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tensorslim.layers import CPConv2d, LowRankConv2d, LowRankLinear, TuckerConv1d, TuckerConv2d
from tensorslim.reconstruct import reconstruct, refittable

D = torch.float64


def _batches(shape: tuple[int, ...], n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=D) for _ in range(n)]


def _out_err(a: nn.Module, b: nn.Module, xs: list[torch.Tensor]) -> float:
    with torch.no_grad():
        num = sum(float((a(x) - b(x)).square().sum()) for x in xs)
        den = sum(float(b(x).square().sum()) for x in xs)
    return (num / den) ** 0.5


def _wrap(layer: nn.Module) -> nn.Sequential:
    return nn.Sequential(layer)


def _perturb(*params: torch.Tensor, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * p.std())


def _low_tucker_conv(cls: type, s: int, t: int, r: tuple[int, int], **kw) -> nn.Module:
    """A dense conv whose kernel has exact Tucker-2 rank r = (r_in, r_out)."""
    torch.manual_seed(0)
    conv = cls(s, t, 3, **kw).double()
    dims = conv.weight.dim() - 2
    core = torch.randn(r[1], r[0], *(3,) * dims, dtype=D)
    u_out, u_in = torch.randn(t, r[1], dtype=D), torch.randn(s, r[0], dtype=D)
    w = torch.einsum("oi...,to,si->ts...", core, u_out, u_in)
    with torch.no_grad():
        conv.weight.copy_(w)
    return conv


@pytest.mark.parametrize("cls,kind,kw", [
    (nn.Conv2d, TuckerConv2d, dict(padding=1, bias=True)),
    (nn.Conv2d, TuckerConv2d, dict(padding=2, dilation=2, stride=2, bias=False)),
    (nn.Conv2d, TuckerConv2d, dict(padding=1, padding_mode="reflect", bias=True)),
    (nn.Conv1d, TuckerConv1d, dict(padding=1, bias=True)),
])
def test_tucker_refit_recovers_exact_map(cls: type, kind: type, kw: dict) -> None:
    dense = _low_tucker_conv(cls, 12, 10, (5, 4), **kw)
    layer = kind.from_conv(dense, (5, 4))
    _perturb(layer.core.weight, layer.project_out.weight)  # project_in stays exact
    if layer.project_out.bias is not None:
        _perturb(layer.project_out.bias, seed=2)
    shape = (4, 12, 9, 9) if cls is nn.Conv2d else (4, 12, 17)
    xs = _batches(shape)
    student, teacher = _wrap(layer), _wrap(dense)
    assert _out_err(student, teacher, xs) > 0.3
    fits = reconstruct(student, teacher, xs, steps=3, ridge=0.0)
    assert [f.name for f in fits] == ["0"]
    assert fits[0].error_before > 0.3 and fits[0].error_after < 1e-6  # sqrt of a Gram difference
    assert _out_err(student, teacher, xs) < 1e-8
    assert layer.rank == (5, 4)  # same architecture, same cost


def test_lowrank_linear_refit_is_exact_from_random_factors() -> None:
    torch.manual_seed(0)
    dense = nn.Linear(16, 12).double()
    with torch.no_grad():  # exact rank 3
        dense.weight.copy_(torch.randn(12, 3, dtype=D) @ torch.randn(3, 16, dtype=D))
    layer = LowRankLinear.like(dense, 3)  # random factors: both stages are refitted
    xs = _batches((64, 16))
    fits = reconstruct(_wrap(layer), _wrap(dense), xs, steps=3, ridge=0.0)
    assert fits[0].error_before > 0.5 and fits[0].error_after < 1e-8
    assert _out_err(_wrap(layer), _wrap(dense), xs) < 1e-8


def test_lowrank_linear_refit_is_the_optimal_reduced_rank_fit() -> None:
    # correlated inputs: the data-aware optimum beats the weight SVD (Eckart-Young on W only)
    torch.manual_seed(0)
    dense = nn.Linear(20, 15, bias=False).double()
    mix = torch.randn(20, 20, dtype=D) * torch.logspace(0, -2, 20, dtype=D)
    xs = [x @ mix for x in _batches((200, 20))]
    layer = LowRankLinear.from_linear(dense, 4)
    before = _out_err(_wrap(layer), _wrap(dense), xs)
    fits = reconstruct(_wrap(layer), _wrap(dense), xs, steps=3, ridge=0.0)
    after = _out_err(_wrap(layer), _wrap(dense), xs)
    assert fits[0].error_before == pytest.approx(before, rel=1e-9)
    assert fits[0].error_after == pytest.approx(after, rel=1e-6)
    # closed form: Y = X W^T; best rank-4 X M is the rank-4 truncation of Yhat = Y here
    x = torch.cat(xs)
    y = x @ dense.weight.detach().t()
    u, sv, vh = torch.linalg.svd(y, full_matrices=False)
    best = float(sv[4:].square().sum().sqrt() / sv.square().sum().sqrt())
    assert after == pytest.approx(best, rel=1e-6) and after < 0.9 * before


def test_cp_refits_last_factor_per_group() -> None:
    torch.manual_seed(0)
    dense = nn.Conv2d(8, 6, 3, padding=1, groups=2).double()
    layer = CPConv2d.from_conv(dense, 40, n_iter=200)  # above the per-group kernel rank
    assert float(layer.approx_error) < 1e-6
    exact = copy.deepcopy(layer)
    _perturb(layer.project_out.weight, layer.project_out.bias)
    xs = _batches((3, 8, 7, 7))
    fits = reconstruct(_wrap(layer), _wrap(dense), xs, steps=3, ridge=0.0)
    assert fits[0].error_before > 0.3 and fits[0].error_after < 1e-5
    torch.testing.assert_close(layer.project_out.weight, exact.project_out.weight, atol=1e-4, rtol=0)


def test_sequential_fit_uses_compressed_inputs_and_never_raises_error() -> None:
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(6, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1)).double()
    student = copy.deepcopy(dense)
    student[0] = TuckerConv2d.from_conv(dense[0], (3, 4))
    student[2] = LowRankConv2d.from_conv(dense[2], 5)
    student[4] = CPConv2d.from_conv(dense[4], 6, seed=0)
    assert refittable(student) == ["0", "2", "4"]
    xs = _batches((4, 6, 8, 8))
    errs = [_out_err(student, dense, xs)]
    # error_before of layer 2 is measured on the student's own (compressed) inputs
    target = nn.Sequential(*dense[:3])
    first_fit = copy.deepcopy(student)
    fits = reconstruct(first_fit, dense, xs, steps=3, layers=["0"], ridge=0.0)
    fits2 = reconstruct(first_fit, dense, xs, steps=3, layers=["2"], ridge=0.0)
    refit_head = nn.Sequential(*first_fit[:2], student[2])
    assert fits2[0].error_before == pytest.approx(_out_err(refit_head, target, xs), rel=1e-9)
    assert fits[0].error_after <= fits[0].error_before
    all_fits = reconstruct(student, dense, xs, steps=3)
    assert [f.name for f in all_fits] == ["0", "2", "4"]
    assert all(f.error_after <= f.error_before for f in all_fits)
    assert all(f.samples == 3 * 4 * 8 * 8 for f in all_fits)
    errs.append(_out_err(student, dense, xs))
    assert errs[1] < errs[0]


def test_modes_restored_and_bad_input() -> None:
    dense = nn.Sequential(nn.Linear(8, 6)).double()
    student = nn.Sequential(LowRankLinear.from_linear(dense[0], 2))
    student.train()
    dense.eval()
    xs = _batches((10, 8))
    reconstruct(student, dense, xs, steps=2)
    assert student.training and not dense.training
    with pytest.raises(ValueError, match="steps"):
        reconstruct(student, dense, xs, steps=0)
    with pytest.raises(ValueError, match="ridge"):
        reconstruct(student, dense, xs, ridge=-1.0)
    with pytest.raises(TypeError, match="nn.Module"):
        reconstruct(student, "dense", xs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a refittable.*accepted: \\['0'\\]"):
        reconstruct(student, dense, xs, layers=["1"])
    with pytest.raises(ValueError, match="no batches"):
        reconstruct(student, dense, [])
    with pytest.raises(ValueError, match="teacher has no module"):
        reconstruct(student, nn.Sequential(), xs)


def test_refit_on_dense_inputs_equals_whitened_svd_compression() -> None:
    """One mechanism: the refit of a single Linear (its own dense inputs in, dense outputs as
    targets) is the data-aware factorisation compress(calibration=) builds (SVD-LLM with the
    bias absorbing the mean), to float64 precision."""
    from tensorslim.calibration import calibrate

    torch.manual_seed(0)
    dense = nn.Linear(20, 14).double()
    mix = torch.randn(20, 20, dtype=D)  # correlated, shifted inputs
    xs = [torch.randn(48, 20, dtype=D) @ mix + 0.5 for _ in range(3)]
    cal = calibrate(_wrap(dense), xs)
    aware = LowRankLinear.from_dense(dense, 5, **cal.layer_options("0"))
    refit = LowRankLinear.from_dense(dense, 5)  # plain SVD, then refitted
    reconstruct(_wrap(refit), _wrap(dense), xs, steps=3, ridge=0.0)
    probe = torch.randn(30, 20, dtype=D) @ mix
    with torch.no_grad():
        assert torch.allclose(refit(probe), aware(probe), atol=1e-8, rtol=0)


def test_refit_takes_dict_batches_of_a_transformer_and_skips_padding() -> None:
    transformers = pytest.importorskip("transformers")
    import tensorslim as ts

    cfg = transformers.BertConfig(vocab_size=90, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    dense = transformers.BertModel(cfg).eval()
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(3):
        mask = torch.ones(4, 12, dtype=torch.long)
        mask[:, 9:] = 0
        batches.append({"input_ids": torch.randint(0, 90, (4, 12), generator=g), "attention_mask": mask})
    example = (batches[0]["input_ids"], batches[0]["attention_mask"])
    plan = ts.make_plan(dense, "svd", example, ranks=6, exclude=["pooler.*"])
    student = ts.compress(copy.deepcopy(dense), plan, progress=False)

    def err(m: nn.Module) -> float:
        with torch.no_grad():
            return sum(float((m(**b).last_hidden_state - dense(**b).last_hidden_state)[b["attention_mask"].bool()]
                             .square().sum()) for b in batches)

    before = err(student)
    fits = reconstruct(student, dense, batches, steps=3)
    assert len(fits) == len(plan.compressed) and all(f.error_after <= f.error_before for f in fits)
    assert all(f.samples == 3 * 4 * 9 for f in fits)  # padded positions left out
    assert err(student) < 0.5 * before
