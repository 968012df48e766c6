"""How much a model's output depends on each of its Linear layers, for the calibrated rank
allocation (``tensorslim.calibration``, errors ``fisher`` and ``measured``):
:func:`output_sensitivity` (squared output gradients per output channel, from random probes)
and :func:`measure_truncation` (the change of the model's output when one layer alone is
truncated), at the ranks :func:`probe_ranks` chooses."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .batches import OutputFn, batch_mask, named_linears, run_batch


def probe_ranks(lin: nn.Module) -> list[int]:
    """Ranks at 1/4, 1/2 and 3/4 of the rank at which a factorised Linear has as many
    parameters as the dense one (where allocations choose); for an ``nn.Embedding`` (cut
    deep when a whole-model target prices it) also 1/16 and 1/8 of it."""
    if isinstance(lin, nn.Embedding):
        m, n, fracs = lin.num_embeddings, lin.embedding_dim, (1 / 16, 1 / 8, 0.25, 0.5, 0.75)
    else:
        m, n, fracs = lin.out_features, lin.in_features, (0.25, 0.5, 0.75)
    even = m * n / (m + n)
    return sorted({min(max(1, round(f * even)), min(m, n) - 1) for f in fracs} - {0})


def _outputs(model: nn.Module, batch: Any, device: Any, output: OutputFn | None) -> list[Tensor]:
    """The floating tensors of ``model`` on ``batch``, or of ``output(model_output, batch)``."""
    out = run_batch(model, batch, device)
    return _floats(out if output is None else output(out, batch))


def _floats(out: Any) -> list[Tensor]:
    """The floating-point tensors of a model output (a tensor, a sequence, a mapping or a
    Hugging Face ``ModelOutput``, nested)."""
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() else []
    vals = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    return [t for v in vals for t in _floats(v)]


def _row_weight(t: Tensor, mask: Tensor | None) -> Tensor:
    """1 per element of ``t``, 0 at padded positions when ``t`` is (B, L, ...) like ``mask``."""
    if mask is not None and t.dim() >= 2 and tuple(t.shape[:2]) == tuple(mask.shape):
        return mask.to(device=t.device, dtype=t.dtype).reshape(*mask.shape, *([1] * (t.dim() - 2)))
    return torch.ones((), dtype=t.dtype, device=t.device)


def _rows(t: Tensor, mask: Tensor | None) -> int:
    """Rows of a (..., C) layer tensor, or lookups of an integer index tensor (one row
    each), padded positions left out."""
    if not t.is_floating_point():
        return int(mask.sum()) if mask is not None and tuple(t.shape) == tuple(mask.shape) else t.numel()
    if mask is not None and t.dim() == 3 and tuple(t.shape[:2]) == tuple(mask.shape):
        return int(mask.sum())
    return t.numel() // max(t.shape[-1], 1)


def _probe(outs: Sequence[Tensor], mask: Tensor | None, gen: torch.Generator) -> Tensor:
    """sum(r * outputs) for a fresh standard Gaussian r per element (0 at padded positions)."""
    return sum((torch.randn(o.shape, generator=gen).to(o) * _row_weight(o, mask) * o).sum() for o in outs)


def probe_loss(output: OutputFn | None = None, seed: int = 0) -> Callable[[Any, Any], Tensor]:
    """A loss ``(model_output, batch) -> sum(r * outputs)`` with a fresh Gaussian probe r on
    every call (padding masked; ``output(model_output, batch)``: the outputs that count): its
    squared gradients average to the Gauss-Newton Fisher of the outputs, a label-free task loss
    (FWSVD's row weights, ``calibrate(variant="fwsvd")``)."""
    gen = torch.Generator().manual_seed(seed)
    return lambda out, batch: _probe(_floats(out if output is None else output(out, batch)), batch_mask(batch), gen)


def output_sensitivity(model: nn.Module, calibration: Iterable[Any], *, layers: Sequence[str] | None = None,
                       probes: int = 2, seed: int = 0, output: OutputFn | None = None) -> dict[str, Tensor]:
    """Per Linear (or ``layers``): (M,) float64, the mean over input rows and ``probes`` random
    Gaussian probes r of the squared gradient of sum(r * outputs) (all floating outputs of the
    model, padding masked) with respect to each output channel of the layer. An error e (M,) on
    one row of the layer's output then changes the model's outputs by about sum(energy * e^2)
    in squared norm (linearised, cross terms dropped). ``output(model_output, batch)``: the
    outputs that count instead. Parameters' ``.grad`` are not touched."""
    mods = named_linears(model, layers)
    sums = {n: torch.zeros(m.out_features, dtype=torch.float64) for n, m in mods.items()}
    rows = dict.fromkeys(mods, 0)
    seen: list[tuple[str, Tensor]] = []
    hooks = [m.register_forward_hook(lambda _m, _a, out, n=n: seen.append((n, out))) for n, m in mods.items()]
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        for batch in calibration:
            seen.clear()
            mask = batch_mask(batch)
            p = next(model.parameters(), None)
            outs = _outputs(model, batch, p.device if p is not None else None, output)
            seen_now = [(n, o) for n, o in seen if o.requires_grad]
            for k in range(probes):
                loss = _probe(outs, mask, gen)
                grads = torch.autograd.grad(loss, [o for _, o in seen_now], retain_graph=k < probes - 1,
                                            allow_unused=True)
                for (n, o), g in zip(seen_now, grads):
                    if g is not None:
                        sums[n] += g.detach().double().reshape(-1, g.shape[-1]).square().sum(0).cpu()
            for n, o in seen_now:
                rows[n] += _rows(o, mask)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {n: s / max(rows[n] * probes, 1) for n, s in sums.items()}


@torch.no_grad()
def measure_truncation(model: nn.Module, calibration: Sequence[Any], ranks: Mapping[str, Sequence[int]],
                       options: Callable[[str], dict] = lambda _n: {}, output: OutputFn | None = None,
                       progress: bool = False) -> dict[str, tuple[Tensor, Tensor]]:
    """Per Linear named in ``ranks``: (ranks, change) where change[j] is the squared change of
    the model's outputs (all floating outputs, padding masked, summed over ``calibration``)
    when only that layer is replaced by its rank-ranks[j] ``LowRankLinear`` (built with
    ``options(name)``, e.g. :meth:`Calibration.layer_options`; an ``nn.Embedding``: its
    truncated-SVD ``LowRankEmbedding``), per row of the layer's input (per lookup);
    ``output(model_output, batch)``: the outputs that count instead of the model's."""
    from .layers import LowRankEmbedding, LowRankLinear

    was_training = model.training
    model.eval()
    p = next(model.parameters(), None)
    device = p.device if p is not None else None
    out: dict[str, tuple[Tensor, Tensor]] = {}
    try:
        refs = [_outputs(model, b, device, output) for b in calibration]
        for name in tqdm(list(ranks), desc="truncation sensitivity", disable=not progress):
            lin, rows, change = model.get_submodule(name), [0], []
            for r in ranks[name]:
                cls = LowRankEmbedding if isinstance(lin, nn.Embedding) else LowRankLinear
                low = cls.from_dense(lin, int(r), **options(name)).to(device=device, dtype=lin.weight.dtype)
                total, rows[0] = 0.0, 0
                for b, ref in zip(calibration, refs):
                    mask = batch_mask(b)

                    def swap(_m, args, _o, low=low, mask=mask):
                        rows[0] += _rows(args[0], mask)
                        return low(args[0])

                    h = lin.register_forward_hook(swap)
                    try:
                        now = _outputs(model, b, device, output)
                    finally:
                        h.remove()
                    total += sum(float(((a - c).double().square() * _row_weight(a, mask)).sum())
                                 for a, c in zip(now, ref))
                change.append(total / max(rows[0], 1))
            out[name] = (torch.tensor([int(r) for r in ranks[name]]), torch.tensor(change, dtype=torch.float64))
    finally:
        model.train(was_training)
    return out
