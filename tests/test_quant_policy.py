"""QuantSpec validation, quantize_model placement/sharing, parameter groups and callback helpers."""

import pytest
import torch
from torch import nn

from qlight.quant import (
    QuantAct,
    QuantConv2d,
    QuantHardtanh,
    QuantLinear,
    QuantSpec,
    TensorQuantizer,
    binary_weight,
    param_groups,
    quant_acts,
    quant_layers,
    quantize_model,
    quantized_weights,
    set_calibrating,
    set_mix,
    tensor_quantizers,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


class Block(nn.Module):
    """CIFAR-ResNet-style basic block sharing one activation module (one α) across the block."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.act2 = self.act1

    def forward(self, x):
        y = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(y)) + x)


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_1_3x3 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn_1 = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.stage = nn.Sequential(Block(8), Block(8))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stage(self.act(self.bn_1(self.conv_1_3x3(x))))
        return self.fc(x.mean((2, 3)))


def minw_net():
    """MINW-Net pattern: QuantConv → (Pool) → BN → HardTanh, FC → BN."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardtanh(),
        nn.Conv2d(8, 8, 3, padding=1), nn.MaxPool2d(2), nn.BatchNorm2d(8), nn.Hardtanh(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.BatchNorm1d(16), nn.Hardtanh(),
        nn.Linear(16, 10), nn.BatchNorm1d(10),
    )


# ---------------------------------------------------------------------------------------------- QuantSpec
def test_spec_defaults_and_resolution():
    s = QuantSpec()
    assert (s.weight, s.w_bits, s.act, s.a_bits, s.first_layer, s.last_layer) == (
        "binary", None, "relu_quant", 4, "quantized", "float")
    assert s.weight_bits == 1 and s.w_bits is None  # resolved on read, fields never rewritten
    assert (s.x_rule, s.alpha_rule, s.rate_factor, s.a_mode, s.alpha_init) == ("clipped", "mean", 0.01, "ceil", "table")
    assert QuantSpec(weight="ternary").weight_bits == 2 and QuantSpec(weight="uniform").weight_bits == 4
    assert QuantSpec(weight="float").weight_bits is None
    assert QuantSpec(act="hardtanh_quant", a_bits=1).act_quantizer_name == "sign"
    assert QuantSpec(act="hardtanh_quant", a_bits=2).act_quantizer_name == "ternary_unit"
    assert QuantSpec(act="hardtanh_quant", a_bits=3).act_quantizer_name == "pow2_unit"
    assert QuantSpec(alpha_init="0.5").alpha_init == 0.5
    assert QuantSpec(alpha_init=2).alpha_init == 2.0
    assert QuantSpec().to_dict()["w_estimator_kwargs"] == {}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"w_bits": 3}, r"QuantSpec.w_bits=3 is not supported by weight='binary'; valid: \[1\]"),
        ({"weight": "ternary", "w_bits": 4}, r"QuantSpec.w_bits=4 is not supported by weight='ternary'; valid: \[2\]"),
        ({"weight": "uniform", "w_bits": 9}, r"QuantSpec.w_bits=9 .* valid: \[2, 3, 4, 5, 6, 7, 8\]"),
        ({"weight": "int4"}, r"QuantSpec.weight='int4' is not supported; valid: \['binary', .*'float'\]"),
        ({"w_scale": "twn"}, r"QuantSpec.w_scale='twn' is not supported by weight='binary'; valid: \['mean', 'median'\]"),
        ({"w_threshold": 0.5}, r"QuantSpec.w_threshold=0.5 is not used by weight='binary'"),
        ({"weight": "ternary", "w_threshold": -1.0}, r"QuantSpec.w_threshold=-1.0 must be > 0"),
        ({"weight": "sign", "per_channel": True}, r"QuantSpec.per_channel=True is not supported by weight='sign'"),
        ({"w_estimator": "lsq"}, r"QuantSpec.w_estimator='lsq' is not supported; valid: \['aqe', 'clipped_ste'"),
        ({"w_estimator": "aqe", "w_estimator_kwargs": {"backward_rule": "x"}}, r"w_estimator_kwargs=.*backward_rule='x'"),
        ({"act": "gelu"}, r"QuantSpec.act='gelu' is not supported; valid: \['relu_quant', 'hardtanh_quant', 'float'\]"),
        ({"a_bits": 0}, r"QuantSpec.a_bits=0 is not supported by act='relu_quant'; valid: \[1, 2, 3, 4, 5, 6, 7, 8\]"),
        ({"a_quantizer": "sign"}, r"QuantSpec.a_quantizer='sign' is only used by act='hardtanh_quant'"),
        ({"act": "hardtanh_quant", "a_bits": 1, "a_quantizer": "pow2_unit"},
         r"QuantSpec.a_bits=1 is not supported by a_quantizer='pow2_unit'; valid: \[2, 3"),
        ({"act": "hardtanh_quant", "a_quantizer": "uniform"}, r"QuantSpec.a_quantizer='uniform' is not supported"),
        ({"act": "hardtanh_quant", "a_estimator": "x"}, r"QuantSpec.a_estimator='x' is not supported; valid"),
        ({"a_mode": "floor"}, r"QuantSpec.a_mode='floor' is not supported; valid: \['ceil', 'round'\]"),
        ({"x_rule": "ste"}, r"QuantSpec.x_rule='ste' is not supported; valid: \['identity', 'relu', 'clipped'\]"),
        ({"alpha_rule": "lsq"}, r"QuantSpec.alpha_rule='lsq' is not supported; valid: \['ae', 'mean', 'min', 'pact'\]"),
        ({"rate_factor": -0.1}, r"QuantSpec.rate_factor=-0.1 must be >= 0"),
        ({"alpha_init": "lloyd"}, r"QuantSpec.alpha_init='lloyd' is not supported; valid: \['table', 'calibrate', 'checkpoint'\] or a float"),
        ({"alpha_init": -0.5}, r"QuantSpec.alpha_init=-0.5 is not supported"),
        ({"first_layer": "4bit"}, r"QuantSpec.first_layer='4bit' is not supported; valid: \['quantized', 'float', '8bit'\]"),
        ({"last_layer": "int8"}, r"QuantSpec.last_layer='int8' is not supported"),
    ],
)
def test_spec_validation_messages(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kwargs)


def test_spec_parses_with_jsonargparse():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--quant", type=QuantSpec, default=QuantSpec())
    cfg = parser.parse_args(["--quant.weight=ternary", "--quant.w_scale=twn", "--quant.a_bits=2",
                             "--quant.alpha_init=0.3", "--quant.last_layer=8bit"])
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    spec = instantiate(cfg).quant
    assert isinstance(spec, QuantSpec)
    assert (spec.weight, spec.weight_bits, spec.w_scale, spec.a_bits, spec.alpha_init, spec.last_layer) == (
        "ternary", 2, "twn", 2, 0.3, "8bit")
    with pytest.raises(Exception, match="w_bits=3 is not supported by weight='ternary'"):
        instantiate(parser.parse_args(["--quant.weight=ternary", "--quant.w_bits=3"]))


# ---------------------------------------------------------------------------------------------- quantize_model
def test_quantize_model_placement_and_sharing():
    model = TinyResNet()
    w_first = model.conv_1_3x3.weight
    quantize_model(model, QuantSpec())
    assert isinstance(model.conv_1_3x3, QuantConv2d) and model.conv_1_3x3.weight is w_first  # first: quantized
    assert type(model.fc) is nn.Linear  # last: float (BCGD CIFAR code)
    for blk in model.stage:
        assert isinstance(blk.conv1, QuantConv2d) and isinstance(blk.conv2, QuantConv2d)
        assert isinstance(blk.act1, QuantAct) and blk.act2 is blk.act1  # sharing preserved: one α per block
    assert isinstance(model.act, QuantAct) and model.act is not model.stage[0].act1
    assert len(quant_acts(model)) == 3 and len(quant_layers(model)) == 5
    assert len(param_groups(model)["alphas"]) == 3
    out = model(torch.randn(2, 3, 8, 8))
    out.sum().backward()
    assert all(a.alpha.grad is not None for _, a in quant_acts(model))


@pytest.mark.parametrize("first, last", [("float", "quantized"), ("8bit", "8bit"), ("quantized", "float")])
def test_first_last_layer_options(first, last):
    model = quantize_model(TinyResNet(), QuantSpec(weight="ternary", first_layer=first, last_layer=last))
    for mod, opt in ((model.conv_1_3x3, first), (model.fc, last)):
        if opt == "float":
            assert type(mod) in (nn.Conv2d, nn.Linear)
        else:
            tq = mod.weight_quantizer
            assert (tq.quantizer, tq.bits) == (("uniform", 8) if opt == "8bit" else ("ternary", 2))
            assert tq.estimator_name == "ste"
    assert model.stage[0].conv1.weight_quantizer.quantizer == "ternary"


def test_float_weights_and_float_acts():
    m = quantize_model(TinyResNet(), QuantSpec(weight="float"))
    assert not quant_layers(m) and len(quant_acts(m)) == 3  # 'ft': float weights, quantized activations
    m = quantize_model(TinyResNet(), QuantSpec(act="float"))
    assert not quant_acts(m) and len(quant_layers(m)) == 5 and type(m.act) is nn.ReLU


def test_minw_net_hardtanh_quant():
    spec = QuantSpec(weight="sign", w_estimator="aqe", act="hardtanh_quant", a_bits=3, a_estimator="aqe",
                     last_layer="quantized")
    m = quantize_model(minw_net(), spec)
    hts = [x for x in m if isinstance(x, QuantHardtanh)]
    assert len(hts) == 3 and all(h.act_quantizer.quantizer == "pow2_unit" for h in hts)
    assert all(isinstance(x, (QuantConv2d, QuantLinear)) for x in (m[0], m[3], m[8], m[11]))
    assert len(tensor_quantizers(m, "weight")) == 4 and len(tensor_quantizers(m, "act")) == 3
    set_mix(m, 0.6, "act")
    assert all(q.mix.item() == pytest.approx(0.6) for _, q in tensor_quantizers(m, "act"))
    assert all(q.mix.item() == 1.0 for _, q in tensor_quantizers(m, "weight"))
    set_mix(m, torch.tensor(0.7))
    assert all(q.mix.item() == pytest.approx(0.7) for _, q in tensor_quantizers(m))
    x = torch.randn(4, 3, 8, 8)
    m(x).sum().backward()
    m.eval()
    set_mix(m, 0.5)
    with torch.no_grad():
        seen = []
        hook = m[8].register_forward_pre_hook(lambda mod, inp: seen.append(inp[0]))
        m(x)
        hook.remove()
    assert set(seen[0].unique().tolist()) <= {-1, -0.5, -0.25, 0, 0.25, 0.5, 1}  # eval: hard inputs
    assert set(m[3].quantized_weight().unique().tolist()) == {-1.0, 1.0}


def test_torchvision_resnet18():
    tv = pytest.importorskip("torchvision")
    model = tv.models.resnet18(num_classes=10)
    n_conv = sum(type(x) is nn.Conv2d for x in model.modules())
    quantize_model(model, QuantSpec(weight="binary", per_channel=True, first_layer="float", last_layer="float"))
    assert type(model.conv1) is nn.Conv2d and type(model.fc) is nn.Linear
    assert len(quant_layers(model)) == n_conv - 1 == 19
    assert isinstance(model.layer2[0].downsample[0], QuantConv2d)
    # torchvision's BasicBlock calls self.relu twice: one QuantAct per block (+ the stem)
    assert len(quant_acts(model)) == 1 + 8
    model(torch.randn(2, 3, 32, 32)).logsumexp(1).sum().backward()
    assert model.layer1[0].conv1.weight.grad is not None
    qw = quantized_weights(model)
    assert set(qw) == {n for n, _ in quant_layers(model)}
    k = qw["layer1.0.conv1"]
    assert torch.equal(k, binary_weight(model.layer1[0].conv1.weight, per_channel=True))
    assert all(k[c].abs().unique().numel() == 1 for c in range(k.shape[0]))


def test_param_groups_partition():
    model = quantize_model(TinyResNet(), QuantSpec(first_layer="float"))
    model.stage[0].conv1.bias = nn.Parameter(torch.zeros(8))
    g = param_groups(model)
    assert list(g) == ["quantized_weights", "weights", "biases", "alphas"]
    ids = [id(p) for ps in g.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert {id(p) for p in g["quantized_weights"]} == {id(m.weight) for _, m in quant_layers(model)}
    assert {id(p) for p in g["alphas"]} == {id(m.alpha) for _, m in quant_acts(model)}
    assert id(model.conv_1_3x3.weight) in {id(p) for p in g["weights"]}  # float first conv
    assert id(model.bn_1.weight) in {id(p) for p in g["weights"]}
    assert {id(model.bn_1.bias), id(model.fc.bias), id(model.stage[0].conv1.bias)} <= {id(p) for p in g["biases"]}


def test_calibration_toggle():
    """set_calibrating switches max-calibration on (α = max|x|/L of the batch) and off, by model or act list."""
    model = quantize_model(TinyResNet(), QuantSpec(a_bits=4))
    set_calibrating(model, True)
    x = torch.randn(2, 3, 8, 8)
    seen = {}
    hook = model.act.register_forward_pre_hook(lambda mod, inp: seen.setdefault("x", inp[0].detach().clone()))
    model(x)
    hook.remove()
    assert model.act.alpha.item() == pytest.approx(seen["x"].abs().max().item() / 15)
    set_calibrating(model, False)
    assert not any(a.calibrating for _, a in quant_acts(model))
    acts = [a for _, a in quant_acts(model)]
    set_calibrating(acts[:1], True)
    assert [a.calibrating for a in acts] == [True] + [False] * (len(acts) - 1)


def test_quantized_model_pickles_and_copies():
    """ddp_spawn and torch.save(module) pickle the model; deepcopy is used by EMA/SWA-style callbacks."""
    import copy
    import io
    import pickle

    spec = QuantSpec(weight="pow2", w_estimator="ede", act="hardtanh_quant", a_bits=2, a_estimator="aqe")
    m = quantize_model(minw_net(), spec)
    set_mix(m, 0.6)
    m.eval()
    x = torch.randn(2, 3, 8, 8)
    for clone in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
        assert torch.equal(clone(x), m(x))
        assert clone[2].act_quantizer.mix.item() == pytest.approx(0.6)
    buf = io.BytesIO()
    torch.save(quantize_model(TinyResNet(), QuantSpec()), buf)
    buf.seek(0)
    r = torch.load(buf, weights_only=False)
    assert r.stage[0].act2 is r.stage[0].act1


def test_quantize_model_errors_and_device_dtype():
    with pytest.raises(ValueError, match=r"role='weights' is not supported"):
        tensor_quantizers(nn.Linear(2, 2), "weights")  # type: ignore[arg-type]
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2)).double()
    quantize_model(m, QuantSpec(last_layer="quantized"))
    assert m[0].weight.dtype == torch.float64 and m[1].alpha.dtype == torch.float32
    assert m(torch.randn(1, 3, 3, 3, dtype=torch.float64)).dtype == torch.float64
    assert isinstance(quantize_model(nn.Linear(3, 3), QuantSpec(last_layer="quantized")), QuantLinear)
    tq = TensorQuantizer("binary")
    assert isinstance(QuantConv2d(1, 1, 1, weight_quantizer=tq).weight_quantizer, TensorQuantizer)
