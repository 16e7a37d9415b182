"""Estimators: forward values, backward masks and α-gradients against hand-computed values."""

import math

import pytest
import torch

from qlight.quant import (
    ESTIMATORS,
    STE,
    AQEEstimator,
    ClippedSTE,
    EDEEstimator,
    Estimator,
    TensorQuantizer,
    alpha_grad_factor,
    build_estimator,
    get_estimator,
    quant_relu,
    register_estimator,
    sign_quant,
    x_grad_mask,
)
from qlight.quant.estimators import _attach, _mix_value


def run(est, x, x_q, mix, g=None):
    x = x.clone().requires_grad_(True)
    y = est(x, x_q, torch.tensor(mix))
    y.backward(torch.ones_like(x) if g is None else g)
    return y.detach(), x.grad


X = torch.tensor([-2.0, -1.0, -0.3, 0.0, 0.4, 1.0, 1.5])


# ---------------------------------------------------------------------------------------------- registry
def test_registry_and_errors():
    assert {"ste", "clipped_ste", "aqe", "ede"} <= set(ESTIMATORS)
    assert get_estimator("aqe") is AQEEstimator
    with pytest.raises(ValueError, match=r"estimator='lsq' is not registered; valid: \['aqe', 'clipped_ste', 'ede', 'ste'"):
        get_estimator("lsq")
    with pytest.raises(ValueError, match=r"bad estimator_kwargs for estimator='ste'"):
        build_estimator("ste", clip=2.0)
    with pytest.raises(ValueError, match=r"backward_rule='eq19' is not supported; valid: \['eq18', 'alg1', 'autograd'\]"):
        AQEEstimator("eq19")
    with pytest.raises(ValueError, match="already registered"):
        register_estimator("ste")(ClippedSTE)


def test_new_estimator_plugs_into_layers_without_touching_them():
    @register_estimator("_test_half")
    class Half(Estimator):
        def forward(self, x, x_q, mix):
            return _attach(_mix_value(x, x_q, mix), x, torch.full_like(x, 0.5))

    try:
        tq = TensorQuantizer("sign", estimator="_test_half")
        x = X.clone().requires_grad_(True)
        tq(x).sum().backward()
        assert torch.equal(x.grad, torch.full_like(X, 0.5))
    finally:
        ESTIMATORS.pop("_test_half")


# ---------------------------------------------------------------------------------------------- STE family
@pytest.mark.parametrize("mix", [0.0, 0.3, 0.5, 1.0])
def test_ste_forward_mixture_backward_identity(mix):
    xq = sign_quant(X)
    g = torch.arange(1.0, 8.0)
    y, gx = run(STE(), X, xq, mix, g)
    torch.testing.assert_close(y, mix * xq + (1 - mix) * X)
    assert torch.equal(gx, g)
    if mix == 1.0:
        assert torch.equal(y, xq)  # exact quantization, not x + (x_q − x)
    if mix == 0.0:
        assert torch.equal(y, X)


def test_clipped_ste_mask():
    g = torch.arange(1.0, 8.0)
    y, gx = run(ClippedSTE(), X, sign_quant(X), 1.0, g)
    assert torch.equal(y, sign_quant(X))
    assert torch.equal(gx, g * torch.tensor([0.0, 1, 1, 1, 1, 1, 0]))
    _, gx = run(ClippedSTE(clip=0.5), X, sign_quant(X), 1.0, g)
    assert torch.equal(gx, g * torch.tensor([0.0, 0, 1, 1, 1, 0, 0]))


# ---------------------------------------------------------------------------------------------- AQE
def test_aqe_forward_exact_at_mix_one_and_mixture():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g)
    h = sign_quant(x)
    y, _ = run(AQEEstimator(), x, h, 1.0)
    assert torch.equal(y, h)
    for a in (0.5, 0.8):
        y, _ = run(AQEEstimator(), x, h, a)
        torch.testing.assert_close(y, a * h + (1 - a) * x)
        # the gap (−α, α) of |x̂| is empty when the latent values are in [−1, 1] (AQEEstimator.md §1.4)
        inside = x.abs() <= 1
        assert y[inside].abs().min() >= a - 1e-6


@pytest.mark.parametrize("mix", [0.25, 0.5, 0.8, 1.0])
def test_aqe_backward_rules(mix):
    g = torch.arange(1.0, 8.0)
    inside = torch.tensor([0.0, 1, 1, 1, 1, 1, 0])
    _, gx = run(AQEEstimator(), X, sign_quant(X), mix, g)
    torch.testing.assert_close(gx, 2 * mix * g * inside, rtol=0, atol=0)  # Eq. 18/19
    _, gx = run(AQEEstimator("alg1"), X, sign_quant(X), mix, g)
    assert torch.equal(gx, g * inside)  # Algorithm 1
    _, gx = run(AQEEstimator("autograd"), X, sign_quant(X), mix, g)
    x = X.clone().requires_grad_(True)
    (mix * sign_quant(x).detach() + (1 - mix) * x).backward(g)  # true autograd through the mixture
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gx, (1 - mix) * g)


def test_aqe_rules_at_half():
    """eq18 and alg1 coincide at α = 1/2; plain autograd is half of them there (AQEEstimator.md §6 #2 says all three
    agree, which does not hold for (1 − α)·g)."""
    g = torch.randn(7)
    x = X.clamp(-1, 1)
    eq18, alg1, auto = (run(AQEEstimator(r), x, sign_quant(x), 0.5, g)[1] for r in AQEEstimator.RULES)
    torch.testing.assert_close(eq18, alg1)
    torch.testing.assert_close(auto, 0.5 * alg1)


# ---------------------------------------------------------------------------------------------- EDE
def test_ede_gradient_and_buffers():
    est = EDEEstimator(t=0.1)
    assert est.k.item() == pytest.approx(10.0)  # k = max(1/t, 1)
    g = torch.arange(1.0, 8.0)
    for t in (0.1, 1.0, 3.0):
        est.set_t(t)
        k = max(1 / t, 1.0)
        assert est.k.item() == pytest.approx(k)
        y, gx = run(est, X, sign_quant(X), 1.0, g)
        assert torch.equal(y, sign_quant(X))  # hard forward
        ref = torch.tensor([k * t * (1 - math.tanh(t * v) ** 2) for v in X.tolist()]) * g
        torch.testing.assert_close(gx, ref)
    sd = est.state_dict()
    assert set(sd) == {"t", "k"} and sd["t"].dim() == 0
    est.t.fill_(2.0)  # a callback may also fill_ the buffers directly
    assert EDEEstimator(t=5.0, k=3.0).k.item() == 3.0


# ---------------------------------------------------------------------------------------------- quant ReLU
# L = 3 (2 bits), α = 0.5, so Lα = 1.5 and (L−1)α = 1.0
XA = torch.tensor([-1.0, 0.0, 0.2, 0.5, 0.7, 1.0, 1.2, 1.5, 2.0])
GA = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])
ALPHA = 0.5

X_MASKS = {
    "identity": [1, 1, 1, 1, 1, 1, 1, 1, 1],
    "relu": [0, 0, 1, 1, 1, 1, 1, 1, 1],
    "clipped": [0, 0, 1, 1, 1, 1, 1, 1, 0],  # 1{0 < x ≤ Lα}
}
D_RULES = {  # ∂σ/∂α proxies (BCGD.md §2) at the points of XA
    "ae": [0, 0, 1, 1, 2, 2, 3, 3, 3],  # ⌈x/α⌉ on (0, (L−1)α], L above
    "mean": [0, 0, 2, 2, 2, 2, 2, 2, 3],  # 2^(b−1) on (0, Lα], L above
    "min": [0, 0, 1, 1, 1, 1, 1, 1, 3],
    "pact": [0, 0, 0, 0, 0, 0, 0, 0, 3],
}


def qrelu_grads(x_rule="clipped", alpha_rule="mean", rf=0.01, g=GA, x=XA, mode="ceil", bits=2):
    x = x.clone().requires_grad_(True)
    a = torch.tensor(ALPHA, requires_grad=True)
    y = quant_relu(x, a, bits, mode, x_rule, alpha_rule, rf)
    y.backward(g)
    return y.detach(), x.grad, a.grad


def test_quant_relu_forward():
    y, _, _ = qrelu_grads()
    assert torch.equal(y, torch.tensor([0, 0, 0.5, 0.5, 1.0, 1.0, 1.5, 1.5, 1.5]))
    y, _, _ = qrelu_grads(mode="round")
    assert torch.equal(y, torch.tensor([0, 0, 0.0, 0.5, 0.5, 1.0, 1.0, 1.5, 1.5]))


@pytest.mark.parametrize("x_rule", list(X_MASKS))
def test_quant_relu_x_rules(x_rule):
    _, gx, _ = qrelu_grads(x_rule=x_rule)
    assert torch.equal(gx, GA * torch.tensor(X_MASKS[x_rule], dtype=torch.float32))
    assert torch.equal(x_grad_mask(XA, torch.tensor(ALPHA), 2, x_rule), torch.tensor(X_MASKS[x_rule]).bool())


@pytest.mark.parametrize("alpha_rule", list(D_RULES))
def test_quant_relu_alpha_rules(alpha_rule):
    d = torch.tensor(D_RULES[alpha_rule], dtype=torch.float32)
    assert torch.equal(alpha_grad_factor(XA, torch.tensor(ALPHA), 2, alpha_rule), d)
    # Σ g·D by hand, e.g. 'mean': 2·(3+4+5+6+7+8) + 3·9 = 93
    sums = {"ae": 3 + 4 + 10 + 12 + 21 + 24 + 27, "mean": 93, "min": 33 + 27, "pact": 27}
    for rf in (0.005, 0.001):
        _, _, ga = qrelu_grads(alpha_rule=alpha_rule, rf=rf)
        assert ga.item() == pytest.approx(rf * sums[alpha_rule], rel=1e-6)
    # the default rate factor 0.01 already saturates 'ae' here: 0.01·101 = 1.01 → 1
    _, _, ga = qrelu_grads(alpha_rule=alpha_rule)
    assert ga.item() == pytest.approx(min(0.01 * sums[alpha_rule], 1.0), rel=1e-6)
    _, _, ga = qrelu_grads(alpha_rule=alpha_rule, rf=1.0)
    assert ga.item() == 1.0
    _, _, ga = qrelu_grads(alpha_rule=alpha_rule, rf=1.0, g=-GA)
    assert ga.item() == -1.0


def test_ae_rule_round_mode_is_level_index():
    d = alpha_grad_factor(XA, torch.tensor(ALPHA), 2, "ae", mode="round")
    assert torch.equal(d, torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3.0]))


def test_alpha_grad_clamped_per_call():
    """An α used twice in one forward receives the sum of two separately clamped terms."""
    a = torch.tensor(ALPHA, requires_grad=True)
    x = XA.clone().requires_grad_(True)
    y1 = quant_relu(x, a, 2, rate_factor=1.0)
    y2 = quant_relu(x * 0.1, a, 2, rate_factor=1.0)
    (y1 * GA + y2 * GA).sum().backward()
    # call 1: clamp(0.93·100) = 1; call 2: x·0.1 ∈ (0, 0.2], D = 2 on the positive entries: clamp(2·Σ g) = 1
    assert a.grad.item() == 2.0


def test_quant_relu_validation():
    with pytest.raises(ValueError, match=r"x_rule='ste' is not supported; valid: \['identity', 'relu', 'clipped'\]"):
        quant_relu(XA, torch.tensor(0.5), 2, x_rule="ste")
    with pytest.raises(ValueError, match=r"alpha_rule='exact' is not supported; valid: \['ae', 'mean', 'min', 'pact'\]"):
        quant_relu(XA, torch.tensor(0.5), 2, alpha_rule="exact")
    with pytest.raises(ValueError, match=r"bits=9 is not supported"):
        quant_relu(XA, torch.tensor(0.5), 9)


def test_quant_relu_bf16_input():
    x = XA.bfloat16().requires_grad_(True)
    a = torch.tensor(ALPHA, requires_grad=True)
    y = quant_relu(x, a, 2)
    y.backward(GA.bfloat16())
    assert y.dtype == x.grad.dtype == torch.bfloat16 and a.grad.dtype == torch.float32
    assert a.grad.item() == pytest.approx(0.93, rel=1e-3)
