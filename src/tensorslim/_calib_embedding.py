"""Pricing an embedding table by its effect, for calibrated rank allocation.

A ``LowRankEmbedding`` of rank r keeps the truncated SVD E ~= U_r S_r V_r^T of the (V, D)
table. A lookup of token t then errs by e_t = sum_{i>r} U_ti S_i V_i, ||e_t||^2 =
sum_{i>r} U_ti^2 S_i^2 (V orthonormal), so over the calibration lookups (token t seen c_t
times) the summed squared output error of the table is

    curve(r) = sum_{i>r} S_i^2 m_i,   m_i = sum_t c_t U_ti^2,

one SVD for every rank (:func:`embedding_curve`). That is the ``output`` error of the table,
the analogue of a Linear's; the ``measured`` error rescales it by how much the model's outputs
change when only the table is truncated (``tensorslim.sensitivity.measure_truncation``, at
:func:`~tensorslim.sensitivity.probe_ranks`), per lookup x lookups, exactly as for a Linear,
so tables and Linears compete on one scale. Token counts come from one early-stopped pass
(:func:`collect_token_counts`): only the embedding lookups run.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from .batches import StopPass, batch_mask, run_batch


def named_embeddings(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Embedding]:
    """The ``nn.Embedding`` modules of ``model`` among ``names`` (others are left out)."""
    mods = dict(model.named_modules())
    return {n: mods[n] for n in names if isinstance(mods.get(n), nn.Embedding)}


@torch.no_grad()
def collect_token_counts(model: nn.Module, calibration: Iterable[Any], names: Sequence[str]) -> dict[str, Tensor]:
    """Per embedding in ``names``: (V,) float64, how often each row is looked up over the
    ``calibration`` batches (padded positions of a tokenizer batch left out). Every pass
    stops after the lookups (one call per embedding and forward is assumed; a table called
    again later in the forward counts its first call only)."""
    mods = named_embeddings(model, names)
    counts = {n: torch.zeros(m.num_embeddings, dtype=torch.float64) for n, m in mods.items()}
    if not mods:
        return counts
    seen: set[str] = set()
    mask: list[Tensor | None] = [None]

    def hook(_m, args, name):
        if name not in seen:
            ids = args[0]
            if mask[0] is not None and tuple(ids.shape) == tuple(mask[0].shape):
                ids = ids[mask[0].to(ids.device)]
            counts[name] += torch.bincount(ids.reshape(-1).cpu(), minlength=counts[name].numel()).double()
            seen.add(name)
        if len(seen) == len(mods):
            raise StopPass

    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)) for n, m in mods.items()]
    p = next(model.parameters(), None)
    was_training = model.training
    model.eval()
    try:
        for batch in calibration:
            seen.clear()
            mask[0] = batch_mask(batch)
            try:
                run_batch(model, batch, p.device if p is not None else None)
            except StopPass:
                pass
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return counts


def embedding_curve(weight: Tensor, counts: Tensor) -> Tensor:
    """(min(V, D) + 1,) float64: sum_t counts[t] ||E_t - E^_t(r)||^2 at every rank r of the
    truncated SVD E^(r) of ``weight`` (V, D) (module docstring)."""
    from .tensor._common import small_linalg_threads

    w = weight.detach().double()
    c = counts.detach().double().to(w.device)
    if c.shape != (w.shape[0],) or bool((c < 0).any()):
        raise ValueError(f"counts must be ({w.shape[0]},) and >= 0 (lookups per row), got shape {tuple(c.shape)}")
    with small_linalg_threads(float(w.shape[0]) * w.shape[1] * min(w.shape)):
        u, s, _ = torch.linalg.svd(w, full_matrices=False)
    mass = (c[:, None] * u.square()).sum(0) * s.square()  # (k,)
    tail = torch.flip(torch.cumsum(torch.flip(mass, (0,)), 0), (0,))
    return torch.cat([tail, tail.new_zeros(1)]).clamp_min(0.0).cpu()
