"""Calibration statistics for data-aware compression: the input second moment X^T X of every
Linear, collected with forward hooks while the model runs on calibration batches.

A calibration batch is whatever the model takes: a tensor (``model(x)``), a tuple / list of
positional tensors (``model(*x)``) or a mapping of keyword tensors (``model(**x)``, what a
Hugging Face tokenizer returns). With a mapping that holds an ``attention_mask`` (B, L), the rows
of a (B, L, N) Linear input at padded positions are left out, so padding does not shape the
statistics. Sums are streamed batch by batch in float64 (nothing is stored per sample).

:class:`Calibration` carries the statistics and the data-aware variant (``"whiten"``: SVD-LLM,
``"asvd"``: activation-scaled, ``"fwsvd"``: Fisher-row-weighted) through
``make_plan(..., calibration=)`` and ``compress(..., calibration=)``, so the statistics are
collected once and reused. FWSVD (Hsu et al. 2022) weighs each output row of a Linear by
sqrt(sum_j (dL/dW_ij)^2); without task labels, L is a random Gaussian probe of the model's
outputs (or of ``output``), sum(r * outputs), so the weights are the Gauss-Newton Fisher of the
outputs that count (:func:`fisher_row_weights` takes any loss).

For rank allocation, :meth:`Calibration.error_curve` prices every rank of a layer by the
``error`` it causes (:data:`ERRORS`): ``relative`` (the layer's output error over its output
energy), ``output`` (its absolute output error), ``fisher`` (the absolute output error per
output channel, weighted by the mean squared gradient of the MODEL's outputs with respect to
that channel, from random probes: the linearised change of the model's outputs) or
``measured`` (the absolute curve rescaled, per rank, by how much the model's outputs actually
change when only this layer is truncated, measured at a few ranks and interpolated). The last
two see what a layer's error does downstream (e.g. whether it is added into a large residual
stream); the first two do not.

``sequential`` (:data:`SEQUENTIAL`) chooses what the layers are fitted on when compressing:
``"off"`` the dense model's inputs (statistics collected once), ``"inputs"`` / ``"outputs"``
the inputs of the partially compressed model, layer after layer, the latter matching the
dense layer's outputs by a closed-form least-squares update (``tensorslim._calib_sequential``;
the Calibration keeps its batches in ``inputs`` for that). Rank allocation is unchanged.

Embedding tables named in ``layers`` are priced too (``output`` and ``measured`` errors): by
their lookups' error, weighted by how often each token is looked up (``tokens``), rescaled by
the measured change of the model's outputs (``tensorslim._calib_embedding``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._calib_embedding import collect_token_counts, embedding_curve, named_embeddings
from ._calib_sequential import DEFAULT_DAMPING, SEQUENTIAL, sequential_layers, variant_options
from .batches import WEIGHTINGS, OutputFn, add_rows, batch_mask, named_linears, run_batch, weighted_rows

VARIANTS = ("whiten", "asvd", "fwsvd")
ERRORS = ("relative", "output", "fisher", "measured")
DEFAULT_ERROR = "measured"  # what calibrate() and make_plan(calibration=batches) allocate by
DEFAULT_SEQUENTIAL = "outputs"  # how calibrate() / compress(calibration=batches) fit the layers

__all__ = ["InputStats", "Calibration", "run_batch", "collect_input_stats", "calibrate",
           "as_calibration", "fisher_row_weights", "with_error", "VARIANTS",
           "ERRORS", "DEFAULT_ERROR", "SEQUENTIAL", "DEFAULT_SEQUENTIAL", "sequential_layers"]


@dataclass(frozen=True, eq=False)
class InputStats:
    """Sums over the ``samples`` input rows x (N,) one Linear saw: ``gram`` = sum x x^T (N, N),
    ``total`` = sum x (N,), ``abs_total`` = sum |x| (N,); all float64. With a ``"sequence"``
    weighting (:data:`~tensorslim.batches.WEIGHTINGS`) every sum is weighted per row and
    ``samples`` is the sum of the weights; ``rows`` counts the rows themselves (0: = samples)."""

    gram: Tensor
    total: Tensor
    abs_total: Tensor
    samples: float
    rows: int = 0

    @property
    def mean(self) -> Tensor:
        """(N,) mean input."""
        return self.total / max(self.samples, 1)

    @property
    def abs_mean(self) -> Tensor:
        """(N,) mean |input| per channel (ASVD's activation scale)."""
        return self.abs_total / max(self.samples, 1)

    @property
    def centered_gram(self) -> Tensor:
        """(N, N) sum (x - mean)(x - mean)^T: the metric of the output error when the bias is
        refitted to absorb the mean of the error."""
        mu = self.mean
        return self.gram - self.samples * torch.outer(mu, mu)


@dataclass(frozen=True, eq=False)
class Calibration:
    """Per-layer input statistics (qualified name -> :class:`InputStats`) and the variant used
    to decompose with them (``whiten`` | ``asvd`` | ``fwsvd``; ``alpha``: ASVD's exponent;
    ``row_weights``: FWSVD's name -> (M,) row weights, a layer without them is whitened;
    ``weighting``: how the statistics weighed the rows, see :func:`calibrate`). ``batches``:
    how many calibration batches were seen. ``error``: what rank allocation minimises (see the
    module docstring); ``row_energy`` (``fisher``: name -> (M,) mean squared model-output
    gradient per output channel and row) and ``measured`` (``measured``: name -> (ranks,
    model-output change per layer input row)) hold what it needs, from :func:`calibrate`.
    ``sequential`` (:data:`SEQUENTIAL`), ``damping`` and ``inputs`` (the calibration batches):
    how compression fits the layers (module docstring). ``tokens``: embedding name -> (V,)
    lookups per row over the calibration batches."""

    stats: Mapping[str, InputStats]
    variant: str = "whiten"
    alpha: float = 0.5
    batches: int = 0
    notes: Mapping[str, str] = field(default_factory=dict)
    error: str = "relative"
    row_energy: Mapping[str, Tensor] = field(default_factory=dict)
    measured: Mapping[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    sequential: str = "off"
    damping: float = DEFAULT_DAMPING
    inputs: Sequence[Any] = field(default=(), repr=False)
    tokens: Mapping[str, Tensor] = field(default_factory=dict, repr=False)
    pending: Callable[[], "Calibration"] | None = field(default=None, repr=False)
    row_weights: Mapping[str, Tensor] = field(default_factory=dict, repr=False)
    weighting: str = "token"
    _done: dict = field(default_factory=dict, repr=False)

    def resolved(self) -> "Calibration":
        """This calibration with its model sensitivities measured: itself, or when
        :func:`as_calibration` deferred them (``pending``), the result of measuring them
        (once, on first use: a plain ``compress`` never needs them)."""
        if self.pending is None:
            return self
        if "cal" not in self._done:
            self._done["cal"] = self.pending()
        return self._done["cal"]

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"Calibration: unknown variant {self.variant!r}; known: {', '.join(VARIANTS)}")
        if self.error not in ERRORS:
            raise ValueError(f"Calibration: unknown error {self.error!r}; known: {', '.join(ERRORS)}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"Calibration: unknown weighting {self.weighting!r}; known: {', '.join(WEIGHTINGS)}")
        if self.sequential not in SEQUENTIAL:
            raise ValueError(f"Calibration: unknown sequential {self.sequential!r}; known: {', '.join(SEQUENTIAL)}")
        if self.sequential != "off" and not self.inputs:
            raise ValueError(f"Calibration: sequential={self.sequential!r} needs the calibration batches in inputs=")
        d = self.damping
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not d >= 0:
            raise ValueError(f"Calibration: damping must be a number >= 0, got {d!r}")

    def layer_options(self, name: str) -> dict[str, Any]:
        """Keyword arguments for ``LowRankLinear.from_dense`` of layer ``name`` ({} if unseen):
        ``gram`` = E[x x^T], ``input_mean`` = E[x] and, for ASVD, ``scale`` = E|x|, for FWSVD
        ``row_weights``."""
        st = self.stats.get(name)
        if st is None or st.samples == 0:
            return {}
        return {"gram": st.gram / st.samples, "input_mean": st.mean,
                **variant_options(self.variant, st.abs_mean, self.alpha, self.row_weights.get(name))}

    def error_curve(self, name: str, weight: Tensor) -> Tensor | None:
        """The ``error`` of layer ``name`` (weight (M, N)) at every rank 0..min(M, N) with this
        variant, centred (the bias absorbs the error's mean): relative, or summed over the
        calibration rows (``output``, ``fisher``, ``measured``: comparable across layers).
        None when the layer was not seen (or has no sensitivity for ``fisher`` / ``measured``)."""
        from .tensor import output_error_curve

        if self.pending is not None:
            return self.resolved().error_curve(name, weight)
        if name in self.tokens:
            return self._table_curve(name, weight)
        st = self.stats.get(name)
        if st is None or st.samples == 0:
            return None
        fit = variant_options(self.variant, st.abs_mean, self.alpha, self.row_weights.get(name))
        method = "asvd" if "scale" in fit else "fwsvd" if "row_weights" in fit else "whiten"
        w = weight.detach()
        if self.error == "relative":
            return output_error_curve(w, st.centered_gram / st.samples, method, **fit)
        energy = self.row_energy.get(name)
        if self.error == "fisher" and energy is None or self.error == "measured" and name not in self.measured:
            return None
        curve = output_error_curve(w, st.centered_gram, method, row_energy=energy if self.error == "fisher"
                                   else None, relative=False, **fit)
        if self.error == "measured":
            ranks, change = self.measured[name]
            curve = _rescaled(curve, ranks, change * (st.rows or st.samples))  # change is per row
        return curve

    def _table_curve(self, name: str, weight: Tensor) -> Tensor | None:
        """An embedding table's lookup error per rank (``output``), rescaled by the measured
        model-output change (``measured``); None for the other errors or an unused table."""
        counts = self.tokens[name]
        lookups = float(counts.sum())
        if lookups == 0 or self.error not in ("output", "measured"):
            return None
        curve = embedding_curve(weight, counts)
        if self.error == "measured":
            if name not in self.measured:
                return None
            ranks, change = self.measured[name]
            curve = _rescaled(curve, ranks, change * lookups)
        return curve


def _rescaled(curve: Tensor, ranks: Tensor, change: Tensor) -> Tensor:
    """``curve`` times the ratio ``change / curve`` measured at ``ranks``, the log-ratio
    interpolated linearly between them (held constant outside): exact where measured."""
    import numpy as np

    base = curve[ranks.long()]
    ok = (base > 0) & (change > 0)
    if not bool(ok.any()):
        return curve * 0.0 if bool((change == 0).all()) else curve
    q = np.interp(np.arange(curve.numel()), ranks[ok].double().numpy(), (change[ok] / base[ok]).log().numpy())
    return curve * torch.from_numpy(q).exp().to(curve)


class _Acc:
    """Streaming float64 sums of one layer's input rows."""

    def __init__(self, n: int, device: torch.device, weighting: str = "token") -> None:
        f64 = dict(dtype=torch.float64, device=device)
        self.gram = torch.zeros(n, n, **f64)
        self.total = torch.zeros(n, **f64)
        self.abs_total = torch.zeros(n, **f64)
        self.samples: float = 0
        self.rows = 0
        self.weighting = weighting

    def add(self, x: Tensor, mask: Tensor | None) -> None:
        rows, w = weighted_rows(x, mask, self.weighting)
        self.samples += add_rows(self.gram, self.total, self.abs_total, rows, w, self.weighting)
        self.rows += rows.shape[0]

    def result(self) -> InputStats:
        return InputStats(self.gram, self.total, self.abs_total, self.samples, self.rows)


@torch.no_grad()
def collect_input_stats(model: nn.Module, calibration: Iterable[Any], *, layers: Sequence[str] | None = None,
                        max_batches: int | None = None, progress: bool = False,
                        weighting: str = "token") -> dict[str, InputStats]:
    """Input statistics of every ``nn.Linear`` of ``model`` (or the names in ``layers``) over the
    ``calibration`` batches (see the module docstring), at most ``max_batches`` of them, each row
    weighted as ``weighting`` says (:func:`~tensorslim.batches.weighted_rows`). The
    model runs in eval mode (restored afterwards); a module called several times accumulates
    every call. ValueError when no batch is given."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"collect_input_stats expects an nn.Module, got {type(model).__name__}")
    if isinstance(calibration, (Tensor, Mapping)):
        raise TypeError("calibration must be an iterable of batches (e.g. a list of tokenizer dicts), "
                        f"got a single {type(calibration).__name__}; wrap it in a list")
    mods = named_linears(model, layers)
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"collect_input_stats: unknown weighting {weighting!r}; known: {', '.join(WEIGHTINGS)}")
    accs = {n: _Acc(m.in_features, device, weighting) for n, m in mods.items()}
    current: dict[str, Tensor | None] = {"mask": None}
    hooks = [m.register_forward_pre_hook(lambda _m, args, n=n: accs[n].add(args[0], current["mask"]))
             for n, m in mods.items()]
    was_training, seen = model.training, 0
    model.eval()
    try:
        for batch in tqdm(calibration, desc="calibration", disable=not progress, total=max_batches):
            current["mask"] = batch_mask(batch)
            run_batch(model, batch, device)
            seen += 1
            if max_batches is not None and seen >= max_batches:
                break
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("calibration yielded no batches; give a non-empty iterable of model inputs")
    return {n: a.result() for n, a in accs.items()}


def calibrate(model: nn.Module, calibration: Iterable[Any], *, variant: str = "whiten", alpha: float = 0.5,
              layers: Sequence[str] | None = None, max_batches: int | None = None, error: str = DEFAULT_ERROR,
              sensitivity_batches: int = 3, probes: int = 2, output: OutputFn | None = None,
              sequential: str = DEFAULT_SEQUENTIAL, damping: float = DEFAULT_DAMPING,
              weighting: str = "token", progress: bool = False) -> Calibration:
    """:func:`collect_input_stats` wrapped as a :class:`Calibration` of ``variant`` that
    allocates ranks by ``error`` (:data:`ERRORS`; ``nn.Embedding`` tables named in ``layers``
    get their lookup counts instead); ``fisher`` and ``measured`` also run
    :func:`~tensorslim.sensitivity.output_sensitivity` (``probes`` random probes) /
    :func:`~tensorslim.sensitivity.measure_truncation` on
    ``sensitivity_batches`` batches spread evenly over the calibration batches, on the model's
    outputs or on ``output(model_output, batch)`` (what the model is used for, e.g. pooled
    sentence embeddings); ``variant="fwsvd"`` takes its row weights from a random probe of
    those outputs on every calibration batch (:func:`fisher_row_weights`). ``sequential`` / ``damping``: how compression fits the layers
    (:data:`SEQUENTIAL`; the batches are kept in the Calibration for it). ``weighting``:
    ``"token"`` (every input row counts once) or ``"sequence"`` (every text counts once, its
    rows weighted 1 / its length: the statistics of what mean-pooled embeddings average), for
    the statistics and the sequential fits."""
    if variant not in VARIANTS:
        raise ValueError(f"calibrate: unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    if error not in ERRORS:
        raise ValueError(f"calibrate: unknown error {error!r}; known: {', '.join(ERRORS)}")
    if sequential not in SEQUENTIAL:
        raise ValueError(f"calibrate: unknown sequential {sequential!r}; known: {', '.join(SEQUENTIAL)}")
    for key, v in (("sensitivity_batches", sensitivity_batches), ("probes", probes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"calibrate: {key} must be an int >= 1, got {v!r}")
    batches = list(calibration) if not isinstance(calibration, (list, tuple)) else calibration
    n = len(batches) if max_batches is None else min(len(batches), max_batches)
    tables = list(named_embeddings(model, layers or []))
    linears = None if layers is None else [x for x in layers if x not in tables]
    stats = collect_input_stats(model, batches, layers=linears, max_batches=max_batches, progress=progress,
                                weighting=weighting) if linears is None or linears else {}
    tokens = collect_token_counts(model, batches[:n], tables)
    rows = {}
    if variant == "fwsvd" and stats:
        from .sensitivity import probe_loss

        rows = fisher_row_weights(model, batches[:n], probe_loss(output), layers=list(stats))
    cal = Calibration(stats, variant, alpha, n, sequential=sequential, damping=damping, inputs=tuple(batches[:n]),
                      tokens=tokens, row_weights=rows, weighting=weighting)
    return with_error(cal, model, batches[:n], error, output=output,
                      sensitivity_batches=sensitivity_batches, probes=probes, progress=progress)


def with_error(cal: Calibration, model: nn.Module, batches: Sequence[Any], error: str, *,
               sensitivity_batches: int = 3, probes: int = 2, output: OutputFn | None = None,
               progress: bool = False) -> Calibration:
    """``cal`` (statistics of ``model`` on ``batches``) allocating by ``error``, with the model
    sensitivities that error needs measured on ``sensitivity_batches`` of ``batches`` spread
    evenly (the statistics are reused, e.g. to compare errors side by side)."""
    from .sensitivity import measure_truncation, output_sensitivity, probe_ranks

    if error not in ERRORS:
        raise ValueError(f"with_error: unknown error {error!r}; known: {', '.join(ERRORS)}")
    few = evenly_spaced(batches, sensitivity_batches)
    cal = replace(cal, error=error, row_energy={}, measured={}, pending=None, _done={})
    if error == "fisher":
        cal = replace(cal, row_energy=output_sensitivity(model, few, layers=list(cal.stats), probes=probes,
                                                         output=output))
    elif error == "measured":
        ranks = {name: probe_ranks(model.get_submodule(name)) for name in (*cal.stats, *cal.tokens)}
        cal = replace(cal, measured=measure_truncation(model, few, ranks, cal.layer_options, output=output,
                                                       progress=progress))
    return cal


def evenly_spaced(batches: Sequence[Any], k: int) -> list[Any]:
    """``k`` of ``batches`` spread evenly, the first and the last included (all when fewer):
    the batches the model sensitivities are measured on."""
    n = len(batches)
    return [batches[round(i * (n - 1) / max(k - 1, 1))] for i in range(min(k, n))]


def as_calibration(model: nn.Module, calibration: Any, layers: Sequence[str] | None = None,
                   progress: bool = False) -> Calibration | None:
    """``calibration`` as a :class:`Calibration`: None stays None, a Calibration is returned as
    it is, an iterable of batches is run through ``model`` (whiten variant, rank allocation by
    :data:`DEFAULT_ERROR`, whose model sensitivities are measured on the first
    :meth:`Calibration.error_curve`: ``model`` must then still be the dense model)."""
    if calibration is None or isinstance(calibration, Calibration):
        return calibration
    batches = list(calibration) if not isinstance(calibration, (Tensor, Mapping)) else calibration
    cal = calibrate(model, batches, layers=layers, error="relative", progress=progress)
    if DEFAULT_ERROR == "relative":
        return cal
    return replace(cal, error=DEFAULT_ERROR, _done={},
                   pending=lambda: with_error(cal, model, batches, DEFAULT_ERROR, progress=progress))


def fisher_row_weights(model: nn.Module, calibration: Iterable[Any], loss: Callable[[Any, Any], Tensor], *,
                       layers: Sequence[str] | None = None, max_batches: int | None = None) -> dict[str, Tensor]:
    """FWSVD row importances: for every Linear (or ``layers``), sqrt(sum over batches and input
    columns of (dL/dW_ij)^2), shape (M,), from ``loss(output, batch)`` on each calibration batch.
    Weights are not changed (gradients are cleared)."""
    mods = named_linears(model, layers)
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    sums = {n: torch.zeros(m.out_features, dtype=torch.float64, device=device) for n, m in mods.items()}
    was_training, seen = model.training, 0
    model.eval()
    try:
        for batch in calibration:
            model.zero_grad(set_to_none=True)
            loss(run_batch(model, batch, device), batch).backward()
            for n, m in mods.items():
                if m.weight.grad is not None:
                    sums[n] += m.weight.grad.double().square().sum(dim=1)
            seen += 1
            if max_batches is not None and seen >= max_batches:
                break
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if seen == 0:
        raise ValueError("fisher_row_weights: calibration yielded no batches")
    return {n: s.sqrt() for n, s in sums.items()}
