"""Quantized layers: TensorQuantizer, QuantConv2d/QuantLinear, QuantAct, QuantHardtanh."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qlight.quant import (
    BIT_ALPHA,
    Estimator,
    QuantAct,
    QuantConv2d,
    QuantHardtanh,
    QuantLinear,
    QuantSpec,
    TensorQuantizer,
    binary_weight,
    list_estimators,
    quantize_model,
    sign_quant,
    ternary_weight,
    uniform_weight,
)
from qlight.quant.functional import ACT_BITS

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


# ---------------------------------------------------------------------------------------------- TensorQuantizer
@pytest.mark.parametrize(
    "name, bits, kw, ref",
    [
        ("binary", 1, {}, binary_weight),
        ("ternary", 2, {"scale": "twn"}, lambda w: ternary_weight(w, scale="twn")),
        ("uniform", 4, {}, lambda w: uniform_weight(w, 4)),
        ("sign", 1, {}, sign_quant),
    ],
)
def test_tensor_quantizer_train_eval_quantize(name, bits, kw, ref):
    tq = TensorQuantizer(name, bits, quantizer_kwargs=kw)
    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    q = ref(w.detach())
    assert torch.equal(tq.quantize(w), q) and not tq.quantize(w).requires_grad
    y = tq(w)  # training, mix = 1: exactly Q(w), STE gradient
    assert torch.equal(y, q)
    y.backward(torch.ones_like(y))
    assert torch.equal(w.grad, torch.ones_like(w))
    tq.eval()
    assert torch.equal(tq(w), q)
    with torch.no_grad():
        assert torch.equal(tq(w), q)
    tq.train()
    tq.set_mix(0.25)
    torch.testing.assert_close(tq(w), 0.25 * q + 0.75 * w)
    tq.eval()
    assert torch.equal(tq(w), q)  # eval is hard whatever mix is


def test_tensor_quantizer_state_and_repr():
    tq = TensorQuantizer("ternary", 2, per_channel=True, estimator="ede", estimator_kwargs={"t": 0.5})
    assert set(tq.state_dict()) == {"mix", "estimator.t", "estimator.k"}
    assert tq.mix.dim() == 0 and tq.mix.dtype == torch.float32
    r = repr(tq)
    assert "quantizer='ternary', bits=2, per_channel=True" in r and "estimator='ede'" in r


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"quantizer": "binary", "bits": 2}, r"bits=2 is not supported by quantizer='binary'; valid: \[1\]"),
        ({"quantizer": "ternary", "bits": 1}, r"bits=1 is not supported by quantizer='ternary'; valid: \[2\]"),
        ({"quantizer": "uniform", "bits": 1}, r"bits=1 is not supported by quantizer='uniform'; valid: \[2, 3, 4"),
        ({"quantizer": "uniform", "bits": 16}, r"valid: \[2, 3, 4, 5, 6, 7, 8\]"),
        ({"quantizer": "pow2_unit", "bits": 1}, r"bits=1 is not supported by quantizer='pow2_unit'"),
        ({"quantizer": "sign", "bits": 2}, r"bits=2 is not supported by quantizer='sign'; valid: \[1\]"),
        ({"quantizer": "lsq"}, r"quantizer='lsq' is not supported; valid: \['binary', 'pow2', 'pow2_unit', 'sign'"),
        ({"quantizer": "sign", "per_channel": True}, r"per_channel=True is not supported by quantizer='sign'"),
        ({"quantizer": "binary", "quantizer_kwargs": {"threshold": 1}}, (r"key 'threshold' is not accepted by "
         r"quantizer='binary'; valid: \['scale'\]")),
        ({"quantizer": "binary", "quantizer_kwargs": {"scale": "max"}}, r"scale='max' is not supported"),
        ({"estimator": "lsq"}, r"estimator='lsq' is not registered; valid: \["),
        ({"estimator": "aqe", "estimator_kwargs": {"rule": "x"}}, r"bad estimator_kwargs for estimator='aqe'"),
        ({"mix": 1.5}, r"mix=1.5 must be in \[0, 1\]"),
    ],
)
def test_tensor_quantizer_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TensorQuantizer(**kwargs)


# ---------------------------------------------------------------------------------------------- conv / linear
def test_quant_conv_forward_backward_is_ste():
    torch.manual_seed(0)
    conv = QuantConv2d(3, 8, 3, padding=1, weight_quantizer=TensorQuantizer("binary"))
    x = torch.randn(2, 3, 8, 8)
    wq = binary_weight(conv.weight.detach()).requires_grad_(True)
    ref = F.conv2d(x, wq, conv.bias, 1, 1)
    y = conv(x)
    assert torch.equal(y, ref)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(conv.weight.grad, wq.grad)  # coarse gradient at Q(w) applied to latent w
    conv.eval()
    assert torch.equal(conv(x), F.conv2d(x, binary_weight(conv.weight), conv.bias, 1, 1))
    assert torch.equal(conv.quantized_weight(), binary_weight(conv.weight))
    assert "weight_quantizer" in repr(conv) and "quantizer='binary'" in repr(conv)
    assert conv.extra_repr().endswith("weight_q=binary/1b/ste")


def test_quant_conv_from_float_shares_parameters():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, padding_mode="reflect", dtype=torch.float64)
    q = QuantConv2d.from_float(conv, TensorQuantizer("ternary"))
    assert q.weight is conv.weight and q.bias is conv.bias and q.weight.dtype == torch.float64
    assert (q.stride, q.padding, q.groups, q.padding_mode) == ((2, 2), (1, 1), 2, "reflect")
    x = torch.randn(1, 4, 7, 7, dtype=torch.float64)
    q.eval()
    ref = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), ternary_weight(conv.weight), conv.bias, 2, 0, 1, 2)
    torch.testing.assert_close(q(x), ref)
    nb = QuantConv2d.from_float(nn.Conv2d(2, 2, 1, bias=False))
    assert nb.bias is None and nb.weight_quantizer.quantizer == "binary"


class _HalfwayEstimator(Estimator):
    """An estimator with its own forward: the training value is halfway between x and its relaxation."""

    def forward(self, x: torch.Tensor, x_q: torch.Tensor, mix: torch.Tensor | float) -> torch.Tensor:
        value = 0.5 * (x.detach() + torch.lerp(x.detach(), x_q, torch.as_tensor(mix, dtype=x.dtype)))
        return value + (x - x.detach())


@pytest.mark.parametrize("estimator", [*list_estimators(), "own_forward"])
@pytest.mark.parametrize("mix", [1.0, 0.3])
@pytest.mark.parametrize("layer_type", ["conv", "linear"])
def test_training_weight_is_the_training_forward_kernel(estimator: str, mix: float, layer_type: str) -> None:
    """For every registered estimator (and one with its own forward), ``training_weight()`` is the kernel the
    training forward used: the kept tensor after a forward, the same bits recomputed once it is not kept."""
    torch.manual_seed(0)
    q = TensorQuantizer("binary", estimator="ste" if estimator == "own_forward" else estimator)
    if estimator == "own_forward":
        q.estimator = _HalfwayEstimator()
    layer = QuantConv2d(3, 4, 3, weight_quantizer=q) if layer_type == "conv" else QuantLinear(6, 4, weight_quantizer=q)
    q.set_mix(mix)
    layer.train()
    used = q(layer.weight).detach()  # what the forward's conv/linear receives
    assert torch.equal(layer.training_weight(), used)  # recomputed (nothing kept)
    q.keep_training_value = True
    x = torch.randn(2, 3, 8, 8) if layer_type == "conv" else torch.randn(2, 6)
    layer(x).sum().backward()
    kept = layer.training_weight()
    assert kept is q.training_value(layer.weight) and torch.equal(kept, used)
    q.forget_training_value()
    assert torch.equal(layer.training_weight(), used)


def test_quant_linear():
    lin = nn.Linear(5, 3)
    q = QuantLinear.from_float(lin, TensorQuantizer("uniform", 4, per_channel=True))
    x = torch.randn(4, 5)
    wq = uniform_weight(lin.weight.detach(), 4, per_channel=True)
    assert torch.equal(q(x), F.linear(x, wq, lin.bias))
    assert torch.equal(q.quantized_weight(), wq)
    d = QuantLinear(5, 3, bias=False)
    assert d.bias is None and torch.equal(d.quantized_weight().abs().unique(), d.weight.abs().mean().view(1))


# ---------------------------------------------------------------------------------------------- QuantAct
def test_quant_act_init_table_and_float():
    for b, a in BIT_ALPHA.items():
        assert QuantAct(b).alpha.item() == pytest.approx(a)
    assert BIT_ALPHA[1] == 1.2221 and BIT_ALPHA[2] == 0.6511 and BIT_ALPHA[4] == 0.1946  # the authors' constants
    assert tuple(BIT_ALPHA) == ACT_BITS  # a table value for every bit-width QuantAct accepts
    assert QuantAct(4, alpha_init=0.3).alpha.item() == pytest.approx(0.3)
    qa = QuantAct(4)
    assert set(qa.state_dict()) == {"alpha", "rate_factor"} and qa.alpha.dim() == 0
    assert "bits=4, mode='ceil', x_rule='clipped', alpha_rule='mean'" in repr(qa)
    for kw, match in [
        ({"bits": 9}, r"bits=9 is not supported; valid: \[1, 2, 3, 4, 5, 6, 7, 8\]"),
        ({"mode": "floor"}, r"mode='floor' is not supported; valid: \['ceil', 'round'\]"),
        ({"x_rule": "ste"}, r"x_rule='ste' is not supported"),
        ({"alpha_rule": "lsq"}, r"alpha_rule='lsq' is not supported; valid: \['ae', 'mean', 'min', 'pact'\]"),
        ({"alpha_init": -1.0}, r"alpha_init=-1.0 must be > 0"),
        ({"calib_stat": "mean"}, r"calib_stat='mean' is not supported"),
    ]:
        with pytest.raises(ValueError, match=match):
            QuantAct(**kw)


def test_quant_act_forward_and_grads():
    qa = QuantAct(2, alpha_init=0.5)
    x = torch.tensor([-1.0, 0.0, 0.2, 0.5, 0.7, 1.0, 1.2, 1.5, 2.0], requires_grad=True)
    y = qa(x)
    assert torch.equal(y, torch.tensor([0, 0, 0.5, 0.5, 1.0, 1.0, 1.5, 1.5, 1.5]))
    y.backward(torch.arange(1.0, 10.0))
    assert qa.alpha.grad.item() == pytest.approx(0.93)  # 'mean' rule, r = 0.01 (see test_quant_estimators)
    assert torch.equal(x.grad, torch.arange(1.0, 10.0) * torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 0.0]))


def test_quant_act_alpha_clamp_is_straight_through():
    qa = QuantAct(2, alpha_init=10.0)
    x = torch.linspace(-1, 20, 50)
    y = qa(x)
    assert y.max().item() == 15.0  # α used as clamp(10, 1e-3, 5) = 5, top level 3·5
    y.sum().backward()
    assert qa.alpha.grad is not None and qa.alpha.grad.item() != 0
    assert qa.alpha.item() == 10.0  # forward does not mutate the parameter
    qa.clamp_alpha_()
    assert qa.alpha.item() == 5.0


@pytest.mark.parametrize("stat", ["absmax", "max"])
def test_quant_act_calibration(stat):
    qa = QuantAct(4, calib_stat=stat)
    qa.calibrating = True
    x = torch.randn(8, 4, 5, 5) * 3
    y = qa(x)
    m = x.abs().max() if stat == "absmax" else x.max()
    assert qa.alpha.item() == pytest.approx((m / 15).item())  # α = max/L
    assert torch.equal(y, torch.where(x > 0, torch.ceil(x / qa.alpha.detach()).clamp(max=15), 0.0) * qa.alpha.detach())
    y.sum().backward()
    assert torch.equal(qa.alpha.grad, torch.zeros(()))  # no gradient signal (exact zero, DDP-safe)
    qa.calibrating = False
    qa.alpha.grad = None
    qa(x).sum().backward()
    assert qa.alpha.grad.item() != 0


def test_quant_act_calibration_all_reduce_path(tmp_path):
    """Under torch.distributed the calibrated α is MAX-all-reduced (single-process gloo group: the code path)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        qa = QuantAct(2)
        qa.calibrating = True
        x = torch.tensor([0.5, -3.0, 1.5])
        qa(x)
        assert qa.alpha.item() == pytest.approx(1.0)
    finally:
        dist.destroy_process_group()


def test_quant_act_shared_twice_in_one_forward():
    """One QuantAct (one α) used twice, as across a CIFAR ResNet basic block."""
    qa = QuantAct(2, alpha_init=0.5, rate_factor=1.0)
    x = torch.tensor([0.2, 0.7, 2.0], requires_grad=True)
    y = qa(x) + qa(3 * x)
    y.sum().backward()
    # call 1: D = [2, 2, 3] → Σ = 7 → clamp → 1;  call 2 (0.6, 2.1, 6): D = [2, 3, 3] → 8 → 1
    assert qa.alpha.grad.item() == 2.0
    assert torch.equal(x.grad, torch.tensor([1.0 + 3.0, 1.0 + 0.0, 0.0 + 0.0]))
    qa.calibrating = True
    qa(x) + qa(4 * x)  # last call wins: α = max|4x|/3
    assert qa.alpha.item() == pytest.approx(8.0 / 3)


# ---------------------------------------------------------------------------------------------- QuantHardtanh
def test_quant_hardtanh_aqe():
    qh = QuantHardtanh(act_quantizer=TensorQuantizer("sign", estimator="aqe"))
    qh.act_quantizer.set_mix(0.75)
    x = torch.tensor([-2.0, -0.5, 0.25, 0.9, 3.0], requires_grad=True)
    y = qh(x)
    xc = x.detach().clamp(-1, 1)
    torch.testing.assert_close(y, 0.75 * sign_quant(xc) + 0.25 * xc)
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.5, 1.5, 1.5, 0.0]))  # 2α inside, 0 outside
    qh.eval()
    assert torch.equal(qh(x), torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0]))
    qh.act_quantizer.set_mix(1.0)
    qh.train()
    assert torch.equal(qh(x), torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0]))  # α = 1: exactly h
    q3 = QuantHardtanh.from_float(nn.Hardtanh(), TensorQuantizer("pow2_unit", 3))
    q3.eval()
    assert set(q3(torch.linspace(-2, 2, 1001)).unique().tolist()) == {-1, -0.5, -0.25, 0, 0.25, 0.5, 1}
    assert "quantizer='pow2_unit', bits=3" in repr(q3) and "act_q=pow2_unit/3b/ste" in q3.extra_repr()


# ---------------------------------------------------------------------------------------------- training
def test_ste_training_lowers_loss():
    """Binary weights (BinaryConnect/STE) + 2-bit quantized ReLU on a synthetic separable task."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g)
    teacher = torch.randn(16, 4, generator=g)
    y = (x @ teacher).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64), nn.BatchNorm1d(64),
                          nn.ReLU(), nn.Linear(64, 4))
    quantize_model(model, QuantSpec(weight="binary", a_bits=2, last_layer="quantized"))
    assert sum(isinstance(m, QuantLinear) for m in model) == 3
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(150):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
        assert model[0].quantized_weight().unique().numel() == 2
    assert losses[-1] < 0.35 * losses[0], (losses[0], losses[-1])
    assert acc > 0.85


# ---------------------------------------------------------------------------------------------- compile
def test_compiles_without_graph_breaks():
    """Dynamo captures forward+backward of a quantized conv net in one graph (aot_eager: no C++ codegen)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(8)
            self.act = nn.ReLU()
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(8)
            self.ht = nn.Hardtanh()
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            x = self.act(self.bn1(self.conv1(x)))
            x = self.act(self.bn2(self.conv2(x)) + x)  # shared α
            return self.fc(self.ht(x).mean((2, 3)))

    torch.manual_seed(0)
    model = quantize_model(Net(), QuantSpec(weight="ternary", per_channel=True, w_estimator="aqe"))
    model.ht = QuantHardtanh(act_quantizer=TensorQuantizer("pow2_unit", 3, estimator="ede"))
    x = torch.randn(4, 3, 8, 8)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss = compiled(x).square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(x).square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)
    compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model.eval()(x))
    # calibration (in-place α update inside the compiled forward) also traces into one graph
    compiled.train()
    model.act.calibrating = True
    model.zero_grad()
    compiled(x).sum().backward()
    seen = []
    hook = model.act.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].detach()))
    model(x)  # eager reference: the shared act's last call sets α
    hook.remove()
    assert model.act.alpha.item() == pytest.approx(seen[-1].abs().max().item() / 15, rel=1e-5)
    assert model.act.alpha.grad.item() == 0.0
