"""Running a model on one batch of model inputs as the calibration API accepts them (a tensor,
a tuple / list of positional tensors, or a mapping of keyword tensors such as a tokenizer's
output), its padding mask, and its Linear layers by name: shared by calibration, the model
sensitivities and the refit."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

OutputFn = Callable[[Any, Any], Any]  # (model output, batch) -> the tensors that count


def run_batch(model: nn.Module, batch: Any, device: torch.device | None = None) -> Any:
    """``model`` on one calibration batch: a tensor, a tuple / list of positional tensors or a
    mapping of keyword tensors (moved to ``device`` when given)."""
    move = (lambda t: t.to(device) if isinstance(t, Tensor) and device is not None else t)
    if isinstance(batch, Tensor):
        return model(move(batch))
    if isinstance(batch, Mapping):
        return model(**{k: move(v) for k, v in batch.items()})
    if isinstance(batch, (tuple, list)):
        return model(*[move(v) for v in batch])
    raise TypeError(f"calibration batches must be tensors, tuples of positional tensors or dicts of "
                    f"keyword tensors (a tokenizer's output), got {type(batch).__name__}")


class StopPass(Exception):
    """Raised from a forward hook to end a pass once the layers of interest have run."""


def unpadded(t: Tensor, mask: Tensor | None) -> Tensor:
    """A (B, L, C) activation's rows at real tokens ((N, C); ``mask`` (B, L) True), or ``t``
    unchanged when there is no mask or it does not match ``t``'s first two dims."""
    if mask is not None and t.dim() == 3 and tuple(t.shape[:2]) == tuple(mask.shape):
        return t[mask.to(t.device)]
    return t


WEIGHTINGS = ("token", "sequence")  # how the rows of a (B, L, C) layer input count in the statistics


def weighted_rows(x: Tensor, mask: Tensor | None, weighting: str = "token") -> tuple[Tensor, Tensor]:
    """The rows (R, C) of a layer input ``x`` in float64, padding dropped (see :func:`unpadded`),
    and their weights (R,): all 1 for ``"token"``; for ``"sequence"`` 1 / (real tokens of its
    sequence) per row of a (B, L, C) input, so every text weighs the same however long it is
    (what a mean-pooled sentence embedding sees), 1 per row of any other input."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; known: {', '.join(WEIGHTINGS)}")
    rows = unpadded(x, mask).detach().reshape(-1, x.shape[-1]).double()
    if weighting == "token" or x.dim() != 3:
        return rows, torch.ones(rows.shape[0], dtype=torch.float64, device=rows.device)
    if mask is not None and tuple(x.shape[:2]) == tuple(mask.shape):
        m = mask.to(device=x.device, dtype=torch.float64)
        per = (m / m.sum(1, keepdim=True).clamp_min(1.0))[mask.to(x.device)]
        return rows, per
    return rows, torch.full((rows.shape[0],), 1.0 / x.shape[1], dtype=torch.float64, device=rows.device)


def add_rows(gram: Tensor, total: Tensor, abs_total: Tensor, rows: Tensor, weights: Tensor,
             weighting: str) -> float:
    """Adds ``rows`` (R, C) weighted by ``weights`` (R,) (from :func:`weighted_rows`) to the sums
    in place: ``gram`` += sum w x x^T, ``total`` += sum w x, ``abs_total`` += sum w |x|. Returns
    what they add to the sample count: R for ``"token"``, the sum of the weights otherwise."""
    xw = rows * weights[:, None]
    gram.addmm_(xw.T, rows)
    total += xw.sum(0)
    abs_total += weights @ rows.abs()
    return rows.shape[0] if weighting == "token" else float(weights.sum())


def batch_mask(batch: Any) -> Tensor | None:
    """A tokenizer batch's (B, L) attention mask as booleans (True: a real token), else None."""
    if isinstance(batch, Mapping):
        m = batch.get("attention_mask")
        if isinstance(m, Tensor) and m.dim() == 2:
            return m.bool()
    return None


def named_linears(model: nn.Module, layers: Sequence[str] | None) -> dict[str, nn.Linear]:
    """The nn.Linear modules of ``model`` by name (all, or the names in ``layers``)."""
    found = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if layers is None:
        return found
    bad = [n for n in layers if n not in found]
    if bad:
        raise ValueError(f"calibration: layers {bad} are not nn.Linear modules of the model; "
                         f"Linear layers: {list(found)[:12]}{' ...' if len(found) > 12 else ''}")
    return {n: found[n] for n in layers}
