"""ts.count / measure_latency with keyword (dict) example inputs, and embedding tables counted
(parameters only, no MACs), on a tiny random-init BertModel."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.cost import KeywordInputs, as_tuple, call, measure_latency

transformers = pytest.importorskip("transformers")


def _bert():
    cfg = transformers.BertConfig(vocab_size=70, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=20, type_vocab_size=2)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def _inputs(batch=3, length=7):
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 5:] = 0
    return torch.randint(0, 70, (batch, length), generator=g), mask


def test_dict_inputs_count_like_positional_ones_with_embedding_rows():
    model, (ids, mask) = _bert(), _inputs()
    by_dict = ts.count(model, {"attention_mask": mask, "input_ids": ids})  # not in signature order
    by_tuple = ts.count(model, (ids, mask))
    assert by_dict == by_tuple and by_dict.batch_size == 3
    emb = {l.name: l for l in by_dict if l.type == "Embedding"}
    assert set(emb) == {"embeddings.word_embeddings", "embeddings.position_embeddings",
                        "embeddings.token_type_embeddings"}
    assert emb["embeddings.word_embeddings"].params == 70 * 16 and emb["embeddings.word_embeddings"].macs == 0
    assert emb["embeddings.word_embeddings"].out_shape == (3, 7, 16)
    # Linear MACs by hand: per token, 4 attention/output maps 16x16, FFN 16x24 twice; pooler on CLS
    per_token = 4 * 16 * 16 + 2 * 16 * 24
    assert by_dict.total_macs == 3 * 7 * per_token + 3 * 16 * 16
    norms = sum(p.numel() for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters())
    assert sum(l.params for l in by_dict) + norms == by_dict.total_params == sum(p.numel() for p in model.parameters())


def test_plan_reports_whole_model_params_and_keeps_embeddings():
    model, x = _bert(), _inputs()
    plan = ts.make_plan(model, "svd", x, ranks=4)
    kept = {s.name: s for s in plan.layers if s.layer_type == "Embedding"}
    assert len(kept) == 3 and not any(s.compressed for s in kept.values())
    assert sum(s.params_before for s in plan.layers) == ts.count(model, x).total_params - sum(
        p.numel() for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters())


def test_keyword_inputs_and_latency():
    model, (ids, mask) = _bert(), _inputs(batch=5)
    k = as_tuple({"input_ids": ids, "attention_mask": mask})
    assert isinstance(k, KeywordInputs) and k.names == ("input_ids", "attention_mask") and k[0] is ids
    assert as_tuple(k) is k
    with torch.no_grad():
        assert torch.equal(call(model, k).last_hidden_state, model(ids, mask).last_hidden_state)
    lat = measure_latency(model, {"input_ids": ids, "attention_mask": mask}, repeats=2, warmup=0, threads=1)
    assert lat.batch_size == 5 and len(lat.times_ms) == 2 and lat.median_ms > 0
    with pytest.raises(ValueError, match="at least one entry and string keys"):
        as_tuple({})
    with pytest.raises(TypeError, match="a dict of keyword inputs"):
        as_tuple(3)
