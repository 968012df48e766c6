"""Registry-driven end-to-end test: for every (method, dense type) pair in ``LAYERS``,
make_plan -> compress -> count == plan -> save -> load -> identical outputs.

Parametrised over ``LAYERS`` itself, so a newly registered pair is covered for free (it only
needs a tiny model for a new dense type in ``MODELS``)."""
import copy

import pytest
import torch
from torch import nn

import tensorslim as ts
from tensorslim.layers import LAYERS

class TwoTables(nn.Module):
    """Two embeddings named "0" and "2" (as in the Sequential models) reading the same tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.add_module("0", nn.Embedding(50, 32))
        self.add_module("1", nn.ReLU())
        self.add_module("2", nn.Embedding(50, 24))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        a, b = getattr(self, "0")(idx), getattr(self, "2")(idx)
        return torch.cat([getattr(self, "1")(a), b], -1)


# dense type -> (tiny model with two such layers, example input)
MODELS = {
    nn.Embedding: (TwoTables, lambda: torch.randint(0, 50, (3, 7))),  # int64 token indices
    nn.Linear: (lambda: nn.Sequential(nn.Linear(512, 343), nn.ReLU(), nn.Linear(343, 216)),
                lambda: torch.randn(3, 512)),
    nn.Conv1d: (lambda: nn.Sequential(nn.Conv1d(8, 16, 5, padding=2), nn.ReLU(),
                                      nn.Conv1d(16, 12, 3, stride=2, groups=2)),
                lambda: torch.randn(2, 8, 20)),
    nn.Conv2d: (lambda: nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, padding_mode="reflect"),
                                      nn.ReLU(), nn.Conv2d(16, 12, (1, 3), stride=(2, 1),
                                                           groups=2)),
                lambda: torch.randn(2, 8, 10, 9)),
}
# (method, dense type) -> its own tiny model where the shared one cannot exercise it: filter-wise
# CP costs R*T*(S/g + kh + kw) params and R*T*(S/g + kh*kw) MACs per pixel (fused 3x3) against
# T*S/g*kh*kw, so the (1, 3) grouped conv (S/g = 8) never gains; 3x3 convs with S/g = 16 at
# rank 4 save both (unstrided: the 1x1 stage runs at the input resolution)
METHOD_MODELS = {
    ("filtercp", nn.Conv2d): (lambda: nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(),
                                                    nn.Conv2d(24, 20, 3, groups=2, padding=1,
                                                              padding_mode="reflect")),
                              lambda: torch.randn(2, 16, 10, 9)),
}
RANKS = 4  # even (the grouped convs), below every layer's dense cost
# the cost the plan must reduce, where MACs do not fall for both layers: TT of the grouped
# (1, 3) conv (16 -> 12) saves parameters but costs more MACs, so macs rightly keeps it dense
OBJECTIVE = {("tt", nn.Conv2d): "params",
             # a lookup has no MACs, its factorised form r * D per token: only params can fall
             ("svd", nn.Embedding): "params"}


@pytest.mark.parametrize("method,dense", [pytest.param(m, d, id=f"{m}-{d.__name__}")
                                          for m, d in LAYERS])
def test_plan_compress_count_save_load_roundtrip(method, dense, tmp_path):
    assert dense in MODELS, f"register a tiny model for {dense.__name__} in MODELS"
    make_model, make_input = METHOD_MODELS.get((method, dense), MODELS[dense])
    torch.manual_seed(0)
    model, x = make_model(), make_input()
    fresh = copy.deepcopy(model)
    plan = ts.make_plan(model, method, x, ranks=RANKS, objective=OBJECTIVE.get((method, dense), "macs"))
    assert [s.name for s in plan.compressed] == ["0", "2"], plan.layers
    ts.compress(model, plan, progress=False)
    for spec in plan.compressed:
        assert isinstance(model.get_submodule(spec.name), LAYERS[(method, dense)])

    # count == plan: totals and each layer
    report = ts.count(model, x)
    assert (report.total_params, report.total_macs) == (plan.params_after, plan.macs_after)
    for spec in plan.layers:
        assert (report[spec.name].params, report[spec.name].macs) == \
            (spec.params_after, spec.macs_after), spec.name

    # save -> load into a fresh dense copy -> identical outputs
    model.eval()
    with torch.no_grad():
        ref = model(x)
    folder = tmp_path / "ckpt"  # new: ts.save refuses existing foreign folders
    ts.save(model, plan, folder)
    loaded = ts.load(folder, model=fresh).eval()
    with torch.no_grad():
        out = loaded(x)
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    for spec in plan.compressed:
        assert type(loaded.get_submodule(spec.name)) is type(model.get_submodule(spec.name))
