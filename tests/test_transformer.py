"""A tiny random-init Hugging Face BertModel (no download) through the data-aware pipeline:
make_plan(calibration) -> compress(calibration) -> save -> load(model=fresh) -> ONNX."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import tensorslim as ts
from _hf import LastHidden  # tests/_hf.py

transformers = pytest.importorskip("transformers")


def _bert(seed: int = 0) -> nn.Module:
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(seed)
    return transformers.BertModel(cfg).eval()


def _batches(n: int = 4, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 120, (4, 16), generator=g)
        mask = torch.ones(4, 16, dtype=torch.long)
        mask[:, 12:] = 0  # padded tail, as a tokenizer returns
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _hidden(model: nn.Module, b: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**b).last_hidden_state


def test_bert_plan_compress_save_load_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    dense, batches = _bert(), _batches()
    example = (batches[0]["input_ids"], batches[0]["attention_mask"])
    plan = ts.make_plan(dense, "svd", example, target_params=0.85, calibration=batches)
    # 13 Linear layers and the 3 tables (their lookups measured), fitted sequentially
    assert plan.goal["calibration"] == {"variant": "whiten", "error": "measured", "batches": 4, "layers": 16,
                                        "sequential": "outputs"}
    assert ts.plan.CompressionPlan.from_json(plan.to_json()).goal["calibration"]["error"] == "measured"
    assert plan.compressed and all("output error" in s.reason for s in plan.compressed)
    assert abs(plan.params_after / plan.params_before - 0.85) < 0.02
    model = ts.compress(copy.deepcopy(dense), plan, calibration=batches, progress=False)
    assert ts.count(model, example).total_params == plan.params_after
    # data-aware beats plain SVD of the same plan on held-out inputs
    plain = ts.compress(copy.deepcopy(dense), plan, progress=False)
    held = _batches(2, seed=9)
    err = lambda m: sum(float((_hidden(m, b) - _hidden(dense, b)).square().sum()) for b in held)  # noqa: E731
    assert err(model) < 0.85 * err(plain)

    ts.save(model, plan, tmp_path / "ckpt")
    loaded = ts.load(tmp_path / "ckpt", model=_bert(seed=5))
    for b in held:
        assert torch.equal(_hidden(loaded, b), _hidden(model, b))

    path = str(tmp_path / "enc.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the TorchScript exporter (dynamo=False) mis-traces transformers' attention mask
        torch.onnx.export(LastHidden(loaded), example, path, dynamo=True, opset_version=17, external_data=False,
                          input_names=["input_ids", "attention_mask"], output_names=["hidden"],
                          verbose=False)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": example[0].numpy(), "attention_mask": example[1].numpy()})[0]
    want = _hidden(loaded, batches[0]).numpy()
    assert np.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_output_error_allocation_gives_sensitive_layers_more_rank():
    """A Linear whose inputs are nearly one-dimensional loses almost nothing at low rank, so
    the data-aware min_error gives its rank to the other layer; weight errors cannot see it."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(24, 24), nn.Linear(24, 24))
    with torch.no_grad():
        m[1].weight.copy_(m[0].weight)
        m[0].bias.zero_()
    direction = torch.randn(1, 24)
    xs = [torch.randn(64, 1) @ direction + 1e-3 * torch.randn(64, 24) for _ in range(2)]
    weight_plan = ts.make_plan(m, "svd", xs[0], target_params=0.6)
    from tensorslim.calibration import calibrate

    data_plan = ts.make_plan(m, "svd", xs[0], target_params=0.6, calibration=calibrate(m, xs, error="relative"))
    r_weight = {s.name: s.rank for s in weight_plan.compressed}
    r_data = {s.name: s.rank for s in data_plan.compressed}
    assert r_weight.get("0") == r_weight.get("1")  # same weights: same rank without data
    assert r_data["0"] < r_data.get("1", 24)  # rank-one inputs: layer 0 needs little rank


def test_sentence_embedding_is_the_masked_mean_pooled_unit_vector():
    from tensorslim.app.hf import sentence_embedding

    dense, b = _bert(), _batches(1)[0]
    got = sentence_embedding(dense(**b), b)
    hidden = _hidden(dense, b)
    for i in range(hidden.shape[0]):
        keep = hidden[i][b["attention_mask"][i].bool()].double().mean(0)
        assert torch.allclose(got[i].double(), keep / keep.norm(), atol=1e-6)


def test_fwsvd_row_weights_on_bert_ignore_padding():
    """FWSVD on tokenizer dicts: the probe loss masks padded positions, so the row weights do
    not change when the padded token ids do; the FWSVD-fitted BERT tracks the dense one better
    than plain SVD of the same plan."""
    from tensorslim.calibration import calibrate

    dense, batches = _bert(), _batches()
    cal = calibrate(dense, batches, variant="fwsvd", error="relative", sequential="off")
    assert len(cal.row_weights) == 13
    noisy = [dict(b, input_ids=torch.where(b["attention_mask"] == 1, b["input_ids"], (b["input_ids"] + 7) % 120))
             for b in batches]
    other = calibrate(dense, noisy, variant="fwsvd", error="relative", sequential="off")
    for n, w in cal.row_weights.items():
        assert torch.allclose(w, other.row_weights[n], rtol=1e-4), n
    example = (batches[0]["input_ids"], batches[0]["attention_mask"])
    plan = ts.make_plan(dense, "svd", example, target_params=0.85, calibration=cal, exclude=["embeddings*"])
    model = ts.compress(copy.deepcopy(dense), plan, calibration=cal, progress=False)
    plain = ts.compress(copy.deepcopy(dense), plan, progress=False)
    held = _batches(2, seed=9)
    err = lambda m: sum(float((_hidden(m, b) - _hidden(dense, b)).square().sum()) for b in held)  # noqa: E731
    assert err(model) < err(plain)
