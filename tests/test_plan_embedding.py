"""Embedding tables as planned layers (issue 20, item 3): ``make_plan(model, "svd", ...)``
considers every ``nn.Embedding`` (a ``LowRankEmbedding``, the truncated SVD of the table) next to
the Linear layers, and plan -> compress -> count -> save -> load treat it like any other layer.
A model without embeddings (a CNN) plans exactly as before the registration."""
from __future__ import annotations

import copy
import warnings

import numpy as np

import pytest
import torch
from torch import nn

import tensorslim as ts
from _hf import LastHidden  # tests/_hf.py
from tensorslim.layers import LAYERS, LowRankEmbedding
from tensorslim.plan import CompressionPlan
from tensorslim.rank.rules import error_proxies

transformers = pytest.importorskip("transformers")
WORD = "embeddings.word_embeddings"


def _bert(seed: int = 0) -> nn.Module:
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(seed)
    return transformers.BertModel(cfg).eval()


def _inputs(seed: int = 1, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 120, (batch, 16), generator=g)
    mask = torch.ones(batch, 16, dtype=torch.long)
    mask[:, 12:] = 0
    return ids, mask


def _hidden(model: nn.Module, x: tuple) -> torch.Tensor:
    with torch.no_grad():
        return model(*x).last_hidden_state


def _without_embeddings(monkeypatch) -> None:
    """The registry as it was before embeddings were planned."""
    monkeypatch.delitem(LAYERS, ("svd", nn.Embedding))


def test_bert_plan_compress_count_save_load_with_the_embedding_factorised(tmp_path):
    dense, x = _bert(), _inputs()
    plan = ts.make_plan(dense, "svd", x, target_params=0.6)
    spec = {s.name: s for s in plan.layers}[WORD]
    assert spec.compressed and spec.layer_type == "Embedding" and spec.method == "svd"
    assert spec.macs_before == 0 and spec.macs_after == 4 * 16 * spec.rank * 32  # r -> D per token
    assert spec.params_after == spec.rank * (120 + 32) < spec.params_before == 120 * 32
    assert "min_error: error proxy" in spec.reason and "costs more MACs than dense" in spec.reason
    assert abs(plan.params_after / plan.params_before - 0.6) < 0.02
    assert CompressionPlan.from_json(plan.to_json()) == plan

    model = ts.compress(copy.deepcopy(dense), plan, progress=False)
    layer = model.get_submodule(WORD)
    assert isinstance(layer, LowRankEmbedding) and layer.rank == spec.rank
    report = ts.count(model, x)
    assert (report.total_params, report.total_macs) == (plan.params_after, plan.macs_after)
    for s in plan.layers:
        assert (report[s.name].params, report[s.name].macs) == (s.params_after, s.macs_after), s.name

    ts.save(model, plan, tmp_path / "ckpt")
    loaded = ts.load(tmp_path / "ckpt", model=_bert(seed=5))
    assert isinstance(loaded.get_submodule(WORD), LowRankEmbedding)
    for seed in (1, 7):
        assert torch.equal(_hidden(loaded, _inputs(seed)), _hidden(model, _inputs(seed)))
    _onnx_matches(loaded, x, tmp_path / "enc.onnx")


def _onnx_matches(model: nn.Module, x: tuple, path) -> None:
    """The loaded encoder, factorised table included, exported to ONNX runs in onnxruntime with
    the same outputs (dynamo exporter, as tests/test_transformer.py uses for transformers)."""
    ort = pytest.importorskip("onnxruntime")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(LastHidden(model), x, str(path), dynamo=True, opset_version=17, external_data=False,
                          input_names=["input_ids", "attention_mask"], output_names=["hidden"], verbose=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": x[0].numpy(), "attention_mask": x[1].numpy()})[0]
    assert np.allclose(got, _hidden(model, x).numpy(), atol=1e-4, rtol=1e-4)


def test_compressed_bert_equals_dense_bert_with_the_truncated_table():
    """A named rank: the compressed model computes what the dense model computes with its word
    table replaced by the table's truncated SVD (float64 reference), and the plan's error proxy
    for that layer is the SVD truncation error of the table."""
    dense, x = _bert().double(), _inputs()
    plan = ts.make_plan(dense, "svd", x, ranks={WORD: 8}, objective="params")
    assert [s.name for s in plan.compressed] == [WORD]
    model = ts.compress(copy.deepcopy(dense), plan, progress=False)
    table = dense.get_submodule(WORD).weight.detach()
    u, s, vh = torch.linalg.svd(table, full_matrices=False)
    ref = copy.deepcopy(dense)
    with torch.no_grad():
        ref.get_submodule(WORD).weight.copy_(u[:, :8] * s[:8] @ vh[:8])
    assert float((_hidden(model, x) - _hidden(ref, x)).abs().max()) < 1e-10
    tail = float(s[8:].square().sum() / s.square().sum())
    assert abs(model.get_submodule(WORD).approx_error ** 2 - tail) < 1e-12
    proxies = error_proxies(table, "svd", [1, 8, 32])
    assert abs(proxies[1] - tail) < 1e-12 and proxies[2] < 1e-20
    assert proxies[0] == pytest.approx(float(s[1:].square().sum() / s.square().sum()), abs=1e-12)


def test_every_table_counts_as_planned_and_a_tied_table_stays_dense():
    """BERT's three tables at named ranks: the position table is looked up with (1, L) indices,
    the others with (B, L); planned == counted per layer (r * D MACs per token looked up). A
    word table tied to the MLM decoder stays dense with the tie as the reason."""
    dense, x = _bert(), _inputs()
    ranks = {WORD: 5, "embeddings.position_embeddings": 4, "embeddings.token_type_embeddings": 1}
    plan = ts.make_plan(dense, "svd", x, ranks=ranks, objective="params")
    assert {s.name: s.rank for s in plan.compressed} == ranks
    tokens = {WORD: 4 * 16, "embeddings.position_embeddings": 16, "embeddings.token_type_embeddings": 4 * 16}
    vocab = {WORD: 120, "embeddings.position_embeddings": 32, "embeddings.token_type_embeddings": 2}
    report = ts.count(ts.compress(copy.deepcopy(dense), plan, progress=False), x)
    for s in plan.compressed:
        assert (s.params_after, s.macs_after) == (s.rank * (vocab[s.name] + 32), tokens[s.name] * s.rank * 32)
        assert (report[s.name].params, report[s.name].macs) == (s.params_after, s.macs_after)
    assert (report.total_params, report.total_macs) == (plan.params_after, plan.macs_after)

    cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    mlm = transformers.BertForMaskedLM(cfg).eval()
    tied = {s.name: s for s in ts.make_plan(mlm, "svd", x, target_params=0.6).layers}
    assert not tied["bert.embeddings.word_embeddings"].compressed
    assert tied["bert.embeddings.word_embeddings"].reason.startswith(
        "kept dense: weight shared with cls.predictions.decoder")


def test_goals_that_cannot_use_an_embedding_keep_it_dense_with_the_reason(monkeypatch):
    """A MAC goal: a lookup costs no MACs and its factorised form does, so nothing about which
    layers are compressed changes (only the reason the tables stay dense); exclude= opts out;
    methods without an embedding layer say so."""
    dense, x = _bert(), _inputs()
    plan = ts.make_plan(dense, "svd", x, target_macs=0.6)
    tables = [s for s in plan.layers if s.layer_type == "Embedding"]
    assert len(tables) == 3 and not any(s.compressed for s in tables)
    assert {s.reason for s in tables} == {"kept dense: an embedding lookup costs no MACs and its factorised "
                                          "form r*D per token, so only objective='params' / target_params can "
                                          "compress it"}
    opted_out = ts.make_plan(dense, "svd", x, target_params=0.6, exclude=["embeddings.*"])
    assert all(s.reason == "not selected by include/exclude" for s in opted_out.layers
               if s.layer_type == "Embedding")
    tt = ts.make_plan(dense, "tt", x, ranks=2, objective="params")
    assert {s.reason for s in tt.layers if s.layer_type == "Embedding"} == \
        {"kept dense: no tt layer for Embedding (its methods: svd)"}

    _without_embeddings(monkeypatch)
    before = ts.make_plan(dense, "svd", x, target_macs=0.6)
    assert [(s.name, s.rank) for s in before.compressed] == [(s.name, s.rank) for s in plan.compressed]
    assert (before.params_after, before.macs_after) == (plan.params_after, plan.macs_after)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(24, 24, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10))


@pytest.mark.parametrize("method,goal", [("svd", dict(target_params=0.5)), ("auto", dict(target_macs=0.5)),
                                         ("tucker", dict(ranks=0.5))])
def test_a_cnn_plans_exactly_as_before(method, goal, monkeypatch):
    model, x = _cnn(), torch.randn(2, 3, 12, 12)
    now = ts.make_plan(model, method, x, **goal)
    assert now.compressed  # the comparison is about a plan that does compress layers
    _without_embeddings(monkeypatch)
    assert ts.make_plan(model, method, x, **goal).to_json() == now.to_json()


def test_a_planned_table_followed_by_a_batchnorm_fuses_exactly():
    """A (B,) -> (B, D) lookup then BatchNorm1d(D) (a recommender's layout): after compress,
    ts.fuse folds the BatchNorm into the LowRankEmbedding (basis columns scaled, a bias
    created) and the outputs do not change (float64)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 16), nn.BatchNorm1d(16), nn.Linear(16, 4)).double()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randint(0, 50, (32,)))
    model.eval()
    x = torch.randint(0, 50, (8,))
    plan = ts.make_plan(model, "svd", x, ranks={"0": 4}, objective="params")
    compressed = ts.compress(copy.deepcopy(model), plan, progress=False).eval()
    fused = ts.fuse(copy.deepcopy(compressed))
    assert isinstance(fused[0], LowRankEmbedding) and isinstance(fused[1], nn.Identity)
    assert fused[0].bias is not None and compressed[0].bias is None
    with torch.no_grad():
        assert float((fused(x) - compressed(x)).abs().max()) < 1e-12


def test_calibrated_plans_price_tables_by_their_measured_lookups_or_keep_them_dense():
    # measured output errors (absolute) and a table's relative weight error are not on one
    # scale: a plan from raw batches measures the table's lookups too and prices it like the
    # Linears; a Calibration made without the table keeps it dense, saying why; with the
    # relative error it competes by its weight error
    from tensorslim.calibration import calibrate
    from tensorslim.planning.min_error import UNPRICED

    dense, x = _bert(), _inputs()
    batches = [{"input_ids": a, "attention_mask": m} for a, m in (_inputs(s) for s in (2, 3, 4))]
    plan = ts.make_plan(dense, "svd", x, target_params=0.7, calibration=batches)
    spec = {s.name: s for s in plan.layers}
    assert plan.goal["calibration"]["error"] == "measured"
    assert spec[WORD].reason != UNPRICED and plan.goal["calibration"]["layers"] == 16  # 13 Linears, 3 tables
    no_table = ts.make_plan(dense, "svd", x, target_params=0.7, calibration=calibrate(dense, batches))
    assert {s.name: s for s in no_table.layers}[WORD].reason == UNPRICED
    assert sum(s.compressed for s in plan.layers if s.layer_type == "Linear") >= 1
    assert abs(plan.params_after / plan.params_before - 0.7) < 0.02
    rel = ts.make_plan(dense, "svd", x, target_params=0.7,
                       calibration=calibrate(dense, batches, error="relative"))
    assert rel.goal["calibration"]["error"] == "relative"
    assert all(s.reason != UNPRICED for s in rel.layers)
