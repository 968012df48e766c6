"""Issue 14, the layers' part: one factory protocol for every registered class (item 9), dense
subclasses with their own forward are kept dense (item 4), non-finite weights are refused
(item 6) and ``valid_rank`` maps any requested rank to the nearest valid one (item 10)."""
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tensorslim as ts
from _layer_helpers import NOT_FOR_EMBEDDING, dense_embedding, factory_name, is_embedding, token_input
from tensorslim.layers import LAYERS, TTLinear, layer_for, register_safe
from tensorslim.layers import base as layers_base

P = inspect.Parameter
POSITIONAL = (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)
KEYS = [pytest.param(k, id=f"{k[0]}-{k[1].__name__}") for k in LAYERS]
# classmethod -> its positional parameters after the module; everything else keyword options
PROTOCOL = {"like": ["rank"], "from_dense": ["rank"], "valid_rank": ["rank"],
            "cost": ["rank", "in_shape", "out_shape"], "check": []}


def _dense(dense: type) -> nn.Module:
    torch.manual_seed(0)
    if is_embedding(dense):
        return dense_embedding()
    if issubclass(dense, nn.Linear):
        return dense(24, 16)
    return dense(8, 12, 3, padding=1, groups=2)


def _factory(dense: type) -> str:
    return factory_name(dense)


def _input(dense: type) -> torch.Tensor:
    """A batch of 2 inputs of the test module: token indices for an embedding, floats else."""
    if is_embedding(dense):
        return token_input(shape=(2, 6))
    return torch.randn(2, *((24,) if dense is nn.Linear else (8,) + (6,) * (2 if dense is nn.Conv2d else 1)))


# -- item 9: the factory protocol ---------------------------------------------------------------
@pytest.mark.parametrize("key", KEYS)
def test_every_registered_class_honours_the_factory_protocol(key):
    """surgery/planner call ``factory(module, rank, **spec.options)``: a second positional
    parameter that is not the rank (TTLinear.from_linear's ``in_modes``) breaks them."""
    cls = LAYERS[key]
    for name, after in {**PROTOCOL, _factory(key[1]): ["rank"]}.items():
        fn = getattr(cls, name)
        assert inspect.ismethod(fn) and fn.__self__ is cls, f"{cls.__name__}.{name}: classmethod?"
        params = list(inspect.signature(fn).parameters.values())
        pos = [p.name for p in params if p.kind in POSITIONAL]
        assert pos[1:] == after and len(pos) == 1 + len(after), f"{cls.__name__}.{name}{pos}"
        for p in params:
            if p.kind not in POSITIONAL:  # options: keyword-only with a default, or **options
                assert p.kind == P.VAR_KEYWORD or (p.kind == P.KEYWORD_ONLY
                                                   and p.default is not P.empty), \
                    f"{cls.__name__}.{name}: parameter {p}"
    if hasattr(cls, "recompress"):
        pos = [p.name for p in inspect.signature(cls.recompress).parameters.values()
               if p.kind in POSITIONAL]
        assert pos == ["self", "rank"], f"{cls.__name__}.recompress{pos}"


@pytest.mark.parametrize("key", KEYS)
def test_factory_protocol_calls_work_with_default_options(key):
    """The calls build_layer and the planner make, positional rank, default options."""
    cls, module = LAYERS[key], _dense(key[1])
    rank = cls.valid_rank(module, 4)
    layer = getattr(cls, _factory(key[1]))(module, rank)
    fresh = cls.like(module, rank)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == \
        {k: v.shape for k, v in layer.state_dict().items()}
    x = _input(key[1])
    in_shape = tuple(x.shape[1:])
    params, _ = cls.cost(module, rank, in_shape, tuple(module(x).shape[1:]))
    assert params == sum(p.numel() for p in layer.parameters())
    cls.check(module)


def test_tt_compresses_through_make_plan_and_compress():
    """Before: TypeError "got multiple values for argument 'in_modes'"."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 48))
    x = torch.randn(4, 64)
    plan = ts.make_plan(model, "tt", x, ranks=2)
    assert [s.name for s in plan.compressed] == ["0", "2"]
    ts.compress(model, plan, progress=False)
    assert all(isinstance(model[i], TTLinear) for i in (0, 2))
    assert model[0].in_modes == (4, 4, 4) and model[2].out_modes == (3, 4, 4)
    assert model[0].rank == (2, 2) and ts.count(model, x).total_params == plan.params_after


def test_tt_from_linear_modes_are_options_with_balanced_default():
    torch.manual_seed(0)
    lin = nn.Linear(24, 20).double()
    full = TTLinear.from_linear(lin, 20)  # an int is clipped per bond: the exact TT (4, 20)
    assert full.in_modes == (2, 3, 4) and full.out_modes == (2, 2, 5)
    assert full.approx_error < 1e-12
    lay = TTLinear.from_linear(lin, (3,), in_modes=[4, 6], out_modes=[4, 5])  # JSON lists
    assert lay.in_modes == (4, 6) and lay.rank == (3,)
    assert TTLinear.from_dense(lin, (3,), in_modes=(4, 6), out_modes=(4, 5)).approx_error == \
        pytest.approx(lay.approx_error, rel=1e-12)


# -- item 4: subclasses with their own forward ---------------------------------------------------
class StdConv2d(nn.Conv2d):
    """timm's weight-standardised conv: not what a plain Conv2d computes."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class OwnConvForward(nn.Conv1d):
    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, weight * 2, bias)


class InitOnly(nn.Conv2d):
    def __init__(self, c):
        super().__init__(c, c, 3, padding=1)


def _qat_conv() -> nn.Module:
    qconfig = torch.ao.quantization.get_default_qat_qconfig("fbgemm")
    return torch.ao.nn.qat.Conv2d(8, 16, 3, padding=1, qconfig=qconfig)


@pytest.mark.parametrize("make", [lambda: StdConv2d(8, 16, 3, padding=1), _qat_conv,
                                  lambda: OwnConvForward(8, 16, 3)], ids=["std", "qat", "conv_fwd"])
def test_module_with_its_own_forward_is_refused(make):
    """Before: layer_for accepted them and compress shipped a layer computing a plain conv."""
    module = make()
    for (method, dense), cls in LAYERS.items():
        if not isinstance(module, dense):
            continue
        with pytest.raises(ValueError, match=r"overrides (forward|_conv_forward); kept dense"):
            layer_for(method, module)
        with pytest.raises(ValueError, match="overrides"):  # the constructors refuse too
            getattr(cls, _factory(dense))(module, 2)


def test_plan_keeps_std_conv_dense_with_the_reason():
    torch.manual_seed(0)
    model = nn.Sequential(StdConv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3))
    x = torch.randn(2, 8, 12, 12)
    ref = model[0](x)
    plan = ts.make_plan(model, "tucker", x, ranks=4)
    kept = {s.name: s.reason for s in plan.layers if not s.compressed}
    assert "cannot replace a test_layers_protocol.StdConv2d: it overrides forward" in kept["0"]
    assert [s.name for s in plan.compressed] == ["2"]
    ts.compress(model, plan, progress=False)
    assert type(model[0]) is StdConv2d and torch.equal(model[0](x), ref)


def test_stock_subclasses_and_registered_types_are_accepted(monkeypatch):
    monkeypatch.setattr(layers_base, "_SAFE_TYPES", set(layers_base._SAFE_TYPES))
    assert layer_for("tucker", InitOnly(4)).__name__ == "TuckerConv2d"
    ndq = nn.modules.linear.NonDynamicallyQuantizableLinear(6, 6)
    assert layer_for("svd", ndq).__name__ == "LowRankLinear"
    assert register_safe(StdConv2d) is StdConv2d
    assert layer_for("svd", StdConv2d(4, 4, 3)).__name__ == "LowRankConv2d"
    with pytest.raises(TypeError, match="register_safe: expected an nn.Module subclass"):
        register_safe(3)


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 8)

    def forward(self, x):
        return self.head(self.mha(x, x, x)[0])


def test_multihead_attention_out_proj_is_not_refused_as_overriding_forward():
    """``out_proj`` is a NonDynamicallyQuantizableLinear (a plain Linear); MHA reads its
    weight directly, so it is kept only because it is never called."""
    plan = ts.make_plan(_Attention(), "svd", torch.randn(2, 5, 8), ranks=2)
    reason = {s.name: s.reason for s in plan.layers}["mha.out_proj"]
    assert "overrides" not in reason and "not called" in reason
    assert [s.name for s in plan.compressed] == ["head"]


# -- item 6: non-finite weights -------------------------------------------------------------------
NON_FINITE = [pytest.param(k, where, value, id=f"{where}-{value}-{k[0]}-{k[1].__name__}") for k in LAYERS
              for where, value in [("weight", float("nan")), ("weight", float("inf")), ("bias", float("-inf"))]
              if not (where == "bias" and is_embedding(k[1]))]  # NOT_FOR_EMBEDDING["bias"]


def test_non_finite_cases_cover_every_key_and_say_what_is_left_out():
    """Every registered pair is checked for a NaN and an Inf weight; a bias only where the dense
    type has one (nn.Embedding has none: NOT_FOR_EMBEDDING)."""
    assert {c.values[0] for c in NON_FINITE if c.values[1] == "weight"} == set(LAYERS)
    no_bias = set(LAYERS) - {c.values[0] for c in NON_FINITE if c.values[1] == "bias"}
    assert no_bias == {k for k in LAYERS if is_embedding(k[1])}
    assert all(getattr(_dense(d), "bias", None) is None for _, d in no_bias) and NOT_FOR_EMBEDDING["bias"]


@pytest.mark.parametrize("key,where,value", NON_FINITE)
def test_non_finite_weights_are_refused(key, where, value):
    """Before: SVD gave all-NaN outputs, CP/Tucker a LinAlgError about ill-conditioning."""
    cls, module = LAYERS[key], _dense(key[1])
    with torch.no_grad():
        getattr(module, where).view(-1)[3] = value
    msg = rf"{cls.__name__}: {where} has non-finite entries \(\d NaN, \d Inf\)"
    with pytest.raises(ValueError, match=msg):
        getattr(cls, _factory(key[1]))(module, 2)


@pytest.mark.parametrize("key", [k for k in KEYS if hasattr(LAYERS[k.values[0]], "recompress")])
def test_recompress_refuses_non_finite_parameters(key):
    cls, module = LAYERS[key], _dense(key[1])
    layer = getattr(cls, _factory(key[1]))(module, 8)
    with torch.no_grad():
        next(layer.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=r"recompress: .* non-finite"):
        layer.recompress(4)


# -- item 10: valid_rank ---------------------------------------------------------------------------
def test_valid_rank_rounds_to_multiples_of_groups():
    """Before: no such method; the planner's 0.5 * 6 = 3 failed 'r_out=3 must be divisible'."""
    conv = nn.Conv2d(4, 6, 3, groups=2)
    tucker, cp, svd = (LAYERS[(m, nn.Conv2d)] for m in ("tucker", "cp", "svd"))
    assert tucker.valid_rank(conv, 3) == (4, 4)
    assert tucker.valid_rank(conv, (2.2, 3.0)) == (2, 4)
    assert tucker.valid_rank(conv, (0.4, 100)) == (2, 6)
    assert cp.valid_rank(conv, 5) == 6 and cp.valid_rank(conv, 1e9) == 2 * 18
    assert svd.valid_rank(conv, 2.9) == 2 and svd.valid_rank(conv, 40) == 6
    assert LAYERS[("svd", nn.Linear)].valid_rank(nn.Linear(5, 9), 7.5) == 5
    assert TTLinear.valid_rank(nn.Linear(24, 20), 1000) == 20  # bonds of modes 2,3,4 / 2,2,5: 4, 20
    assert TTLinear.valid_rank(nn.Linear(24, 20), [2.6, 500]) == (3, 20)
    for bad, err in [(0, ValueError), (-2, ValueError), (float("nan"), ValueError),
                     ("4", TypeError), (True, TypeError)]:
        with pytest.raises(err, match="rank"):
            cp.valid_rank(conv, bad)


@pytest.mark.parametrize("key", KEYS)
def test_valid_rank_is_valid_nearest_and_idempotent(key):
    cls, module = LAYERS[key], _dense(key[1])
    x = _input(key[1])
    in_shape, out_shape = tuple(x.shape[1:]), tuple(module(x).shape[1:])
    for want in (0.3, 1, 2, 3.5, 5, 7, 11, 17.5, 40, 10**6):
        r = cls.valid_rank(module, want)
        cls.cost(module, r, in_shape, out_shape)  # accepted as it is
        assert cls.valid_rank(module, r) == r
    with pytest.raises(TypeError, match="valid_rank: unexpected options|unexpected keyword"):
        cls.valid_rank(module, 2, nonsense=1)
