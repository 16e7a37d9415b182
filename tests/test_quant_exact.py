"""The lean quantizers compute the same bits as the formulas they replaced and as the BCGD authors' code.

Three references, each written out literally (the authors' forward in ``helpers.authors_act_forward``):

- ``old_*``: qlight's previous implementations (one op per formula step, masks built separately). The lean
  estimators, weight quantizers, unit quantizers and the multi-tensor blend must equal them bit for bit,
  forward and gradients, on random tensors.
- ``authors_*``: the quantized ReLU of penhunt/full-quantization-DNN ``nets/quant_uni_type.py``
  (``QtUniFunction``: boolean masks, ``a = alpha.item()`` and Python-float thresholds). The layer must equal it
  everywhere, including the two floating-point cases where the previous formula did not: the float just above
  ``(L−1)α`` whose quotient ``x/α`` rounds down to exactly ``L−1``, and 1-bit activations with subnormal ``x``.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import authors_act_forward
from torch import Tensor

from qlight.callbacks.bcgd import blend_, blend_all_
from qlight.quant import (
    QuantAct,
    TensorQuantizer,
    act_quant,
    alpha_grad_factor,
    quant_relu,
    sign_quant,
    ternary_quant,
)

DTYPES = [torch.float32, torch.float64]


# ------------------------------------------------------------------------------------------- references
def old_act_quant(x: Tensor, a: Tensor, bits: int, mode: str) -> Tensor:
    level = float(2**bits - 1)
    if mode == "ceil":
        return torch.ceil(x.clamp(min=0.0) / a).clamp(max=level) * a
    return torch.round(x / a).clamp(min=0.0, max=level) * a


def _old_level(x: Tensor, a: Tensor, bits: int, mode: str) -> Tensor:
    level = float(2**bits - 1)
    if mode == "ceil":
        return torch.ceil(x.clamp(min=0.0) / a).clamp(max=level)
    return torch.round(x / a).clamp(min=0.0, max=level)


def old_quant_relu_grads(x: Tensor, a: Tensor, g: Tensor, bits: int, mode: str, x_rule: str, alpha_rule: str, rf: float):
    level = float(2**bits - 1)
    if x_rule == "identity":
        mask = torch.ones_like(x, dtype=torch.bool)
    elif x_rule == "relu":
        mask = x > 0
    else:
        mask = (x > 0) & (x <= level * a)
    gx = torch.where(mask, g, 0.0)
    if alpha_rule == "ae":
        # the level index itself, as the authors' code uses it; the previous (k·α)/α could differ in the last bit
        d = _old_level(x, a, bits, mode)
    else:
        inner = {"mean": float(2 ** (bits - 1)), "min": 1.0, "pact": 0.0}[alpha_rule]
        sat = x > level * a
        d = torch.where(sat, level, torch.where(x > 0, inner, 0.0)).to(x.dtype)
    s = (g * d).sum()
    ga = torch.clamp(torch.tensor(rf, dtype=s.dtype) * s, -1.0, 1.0)
    return gx, ga


def authors_backward(x: Tensor, g: Tensor, a: float, level: int, bfun: str, gd_type: str, r: float):
    grad_input = g.clone()
    if bfun != "idnty":
        grad_input[x <= 0] = 0
    if bfun == "inplt":
        grad_input[x > a * level] = 0
    grad_0 = torch.zeros_like(g)
    if gd_type == "ae":
        ind = x.gt(0) * x.le(a * (level - 1))
        grad_0[ind] = (x[ind] / a).ceil()
        grad_0[x > a * (level - 1)] = level
    elif gd_type == "pact":
        grad_0[x > a * level] = level
    else:
        ind = x.gt(0) * x.le(a * level)
        grad_0[ind] = 1 if gd_type == "min" else (level + 1) / 2
    grad_0[x > a * level] = level
    grad_alpha = (g * grad_0).sum() * r
    return grad_input, torch.clamp(grad_alpha, -1, 1)


AUTHORS_X = {"identity": "idnty", "relu": "relu", "clipped": "inplt"}


def run_layer(x: Tensor, alpha: float, bits: int, x_rule: str, alpha_rule: str, g: Tensor, mode: str = "ceil"):
    act = QuantAct(bits, alpha_init=alpha, mode=mode, x_rule=x_rule, alpha_rule=alpha_rule).to(x.dtype)
    with torch.no_grad():
        act.alpha.fill_(alpha)  # exactly alpha in x's dtype (a cast would keep float32's rounding)
    xx = x.clone().requires_grad_(True)
    y = act(xx)
    y.backward(g)
    return y.detach(), xx.grad, act.alpha.grad


# ------------------------------------------------------------------------------------------- quantized ReLU
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("mode", ["ceil", "round"])
def test_quant_relu_equals_previous_formulas(dtype: torch.dtype, bits: int, mode: str) -> None:
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(2, 4, 12, 12, generator=gen, dtype=dtype) * 2
    g = torch.randn(x.shape, generator=gen, dtype=dtype)
    for alpha in (0.05, 0.31, 1.7):
        for x_rule in ("identity", "relu", "clipped"):
            for alpha_rule in ("ae", "mean", "min", "pact"):
                y, gx, ga = run_layer(x, alpha, bits, x_rule, alpha_rule, g * 1e-3, mode)
                a = torch.tensor(alpha, dtype=dtype)
                assert torch.equal(y, old_act_quant(x, a, bits, mode))
                ref_gx, ref_ga = old_quant_relu_grads(x, a, g * 1e-3, bits, mode, x_rule, alpha_rule, 0.01)
                assert torch.equal(gx, ref_gx), (x_rule, alpha_rule)
                assert torch.equal(ga, ref_ga.to(ga.dtype)), (x_rule, alpha_rule)


def boundary_cases(dtype: torch.dtype, bits: int, count: int = 2000) -> tuple[list[float], list[float]]:
    """α values where the float just above ``c = fl((L−1)α)`` divides to exactly ``L−1``, and that float."""
    level = 2**bits - 1
    gen = torch.Generator().manual_seed(7)
    alphas = (torch.rand(count, generator=gen, dtype=torch.float64) * 2 + 0.01).to(dtype)
    c = alphas * (level - 1)
    above = torch.nextafter(c, torch.full_like(c, math.inf))
    hit = (above / alphas) == (level - 1)
    return alphas[hit].tolist(), above[hit].tolist()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [3, 4, 5])  # with L−1 a power of two, (L−1)α is exact and the case cannot occur
def test_level_just_above_top_threshold_is_the_authors(dtype: torch.dtype, bits: int) -> None:
    """x = next float above fl((L−1)α) with fl(x/α) = L−1: the authors' code gives level L (x > (L−1)α)."""
    level = 2**bits - 1
    alphas, xs = boundary_cases(dtype, bits)
    assert len(alphas) > 5, "the case must occur for a few percent of alphas"
    for alpha, xv in zip(alphas[:20], xs[:20], strict=True):
        x = torch.tensor([xv], dtype=dtype)
        a = torch.tensor(alpha, dtype=dtype)
        expected = authors_act_forward(x, float(a), level)
        assert expected.item() == (a * level).item()
        assert not torch.equal(old_act_quant(x, a, bits, "ceil"), expected)  # the previous formula: L−1
        assert torch.equal(act_quant(x, a, bits), expected)
        g = torch.tensor([0.25], dtype=dtype)
        y, gx, ga = run_layer(x, alpha, bits, "clipped", "ae", g)
        ref_gx, ref_ga = authors_backward(x, g, float(a), level, "inplt", "ae", float(torch.tensor(0.01, dtype=dtype)))
        assert torch.equal(y, expected) and torch.equal(gx, ref_gx) and torch.equal(ga, ref_ga.to(ga.dtype))
        assert alpha_grad_factor(x, a, bits, "ae").item() == level


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_bit_subnormal_input_is_the_top_level(dtype: torch.dtype) -> None:
    """1 bit: (L−1)α = 0, so every x > 0 is at level 1, also when x/α underflows to 0."""
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps  # the smallest subnormal
    x = torch.tensor([tiny, 2 * tiny, -tiny, 0.0], dtype=dtype)
    alpha = 2.5
    a = torch.tensor(alpha, dtype=dtype)
    assert (x[0] / a).item() == 0.0  # the quotient underflows
    expected = authors_act_forward(x, float(a), 1)
    assert expected.tolist() == [alpha, alpha, 0.0, 0.0]
    assert old_act_quant(x, a, 1, "ceil")[0].item() == 0.0
    g = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=dtype)
    for x_rule in ("identity", "relu", "clipped"):
        y, gx, ga = run_layer(x, alpha, 1, x_rule, "ae", g)
        ref_gx, ref_ga = authors_backward(x, g, float(a), 1, AUTHORS_X[x_rule], "ae", float(torch.tensor(0.01, dtype=dtype)))
        assert torch.equal(y, expected) and torch.equal(gx, ref_gx) and torch.equal(ga, ref_ga.to(ga.dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quant_relu_equals_authors_code_everywhere(dtype: torch.dtype, bits: int) -> None:
    """Random inputs plus every threshold and its neighbours, all rules: forward and both gradients."""
    level = 2**bits - 1
    gen = torch.Generator().manual_seed(3)
    alphas, above = boundary_cases(dtype, bits)
    alpha = alphas[0] if alphas else 0.37
    a = torch.tensor(alpha, dtype=dtype)
    marks = torch.stack([a * k for k in range(level + 2)] + [torch.zeros((), dtype=dtype)])
    near = torch.cat([marks, torch.nextafter(marks, marks + 1), torch.nextafter(marks, marks - 1)])
    x = torch.cat([torch.randn(500, generator=gen, dtype=dtype) * alpha * level, near, torch.tensor(above, dtype=dtype)])
    g = torch.randn(x.shape, generator=gen, dtype=dtype) * 1e-2
    r = float(torch.tensor(0.01, dtype=dtype))
    for x_rule, bfun in AUTHORS_X.items():
        for alpha_rule in ("ae", "mean", "min", "pact"):
            y, gx, ga = run_layer(x, alpha, bits, x_rule, alpha_rule, g)
            assert torch.equal(y, authors_act_forward(x, float(a), level))
            ref_gx, ref_ga = authors_backward(x, g, float(a), level, bfun, alpha_rule, r)
            assert torch.equal(gx, ref_gx), (x_rule, alpha_rule)
            assert torch.equal(ga, ref_ga.to(ga.dtype)), (x_rule, alpha_rule)


def test_functional_quant_relu_equals_layer() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, generator=gen)
    g = torch.randn(64, generator=gen)
    y, gx, ga = run_layer(x, 0.4, 2, "clipped", "mean", g)
    xx = x.clone().requires_grad_(True)
    alpha = torch.tensor(0.4, requires_grad=True)
    yy = quant_relu(xx, alpha, 2, alpha_min=1e-3, alpha_max=5.0)
    yy.backward(g)
    assert torch.equal(y, yy) and torch.equal(gx, xx.grad) and torch.equal(ga, alpha.grad)


def test_resolution_cache_follows_alpha_writes() -> None:
    """The cached (clamped α, bounds) is recomputed after every in-place write of α, and the clamp applies."""
    act = QuantAct(2, alpha_init=0.5)
    x = torch.linspace(-1, 3, 41)
    assert torch.equal(act(x), act_quant(x, torch.tensor(0.5), 2))
    with torch.no_grad():
        act.alpha.fill_(9.0)  # beyond alpha_max = 5: the forward uses the clamped value
    assert torch.equal(act(x), act_quant(x, torch.tensor(5.0), 2))
    act.clamp_alpha_()  # projected: the clamp is known to be the identity
    assert act.alpha.item() == 5.0 and torch.equal(act(x), act_quant(x, torch.tensor(5.0), 2))
    with torch.no_grad():
        act.alpha.copy_(torch.tensor(1e-6))
    assert torch.equal(act(x), act_quant(x, torch.tensor(1e-3), 2))


def test_rate_factor_follows_the_module_dtype_exactly() -> None:
    act = QuantAct(4, rate_factor=0.01)
    assert act.rate_factor.item() == float(torch.tensor(0.01, dtype=torch.float32))
    act.double()
    assert act.rate_factor.dtype == torch.float64 and act.rate_factor.item() == 0.01
    act.float()
    assert act.rate_factor.item() == float(torch.tensor(0.01, dtype=torch.float32))
    # a value changed on purpose is kept through a cast
    act.rate_factor.fill_(0.5)
    act.double()
    assert act.rate_factor.item() == 0.5


# ------------------------------------------------------------------------------------------- tensor quantizers
def old_unit(name: str, x: Tensor) -> Tensor:
    if name == "sign":
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
    return torch.where(x.abs() > 0.5, torch.sign(x), torch.zeros_like(x))


def old_estimator_grad(name: str, x: Tensor, g: Tensor, mix: Tensor, kind: str | None) -> Tensor:
    if name == "ste":
        return g
    inside = (x.abs() <= 1.0).to(x.dtype)
    if name == "clipped_ste":
        return g * inside
    if kind == "autograd":
        return g * (1.0 - mix)
    if kind == "alg1":
        return g * inside
    return g * (inside * (2.0 * mix))


@pytest.mark.parametrize("quantizer", ["binary", "ternary", "uniform", "pow2", "sign", "ternary_unit", "pow2_unit"])
@pytest.mark.parametrize("estimator", ["ste", "clipped_ste", "aqe", "aqe:alg1", "aqe:autograd"])
@pytest.mark.parametrize("mix", [1.0, 0.3])
def test_tensor_quantizer_equals_previous_formulas(quantizer: str, estimator: str, mix: float) -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(8, 4, 3, 3, generator=gen) * 0.7
    g = torch.randn(w.shape, generator=gen)
    name, _, rule = estimator.partition(":")
    kwargs = {"backward_rule": rule} if rule else {}
    tq = TensorQuantizer(quantizer, estimator=name, estimator_kwargs=kwargs)
    tq.set_mix(mix)
    x = w.clone().requires_grad_(True)
    y = tq(x)
    y.backward(g)
    q = tq.quantize(w)
    m = torch.tensor(mix)
    assert torch.equal(y, torch.lerp(w, q, m))
    assert torch.equal(x.grad, old_estimator_grad(name, w, g, m, rule or "eq18"))


@pytest.mark.parametrize("mix", [1.0, 0.6])
def test_mix_known_one_skips_lerp_and_any_other_write_falls_back(mix: float) -> None:
    tq = TensorQuantizer("binary")
    w = torch.randn(16)
    tq.mix.fill_(mix)  # a write the quantizer did not see: it must not assume 1
    assert not tq._mix_is_one()
    assert torch.equal(tq(w), torch.lerp(w, tq.quantize(w), torch.tensor(mix)))
    tq.set_mix(1.0)
    assert tq._mix_is_one()
    state = tq.state_dict()
    other = TensorQuantizer("binary")
    other.set_mix(0.2)
    other.load_state_dict(state)
    assert other._mix_is_one() and torch.equal(other(w), tq.quantize(w))


def test_unit_quantizers_equal_previous_formulas() -> None:
    x = torch.cat([torch.randn(1000), torch.tensor([0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 1e-40, -1e-40])])
    for name, fn in (("sign", sign_quant), ("ternary_unit", ternary_quant)):
        assert torch.equal(fn(x), old_unit(name, x)), name
        assert torch.equal(fn(x.double()), old_unit(name, x.double())), name
    assert sign_quant(torch.tensor([-0.0])).item() == 1.0


def test_multi_tensor_blend_equals_the_loop() -> None:
    """One ``_foreach_lerp_`` with a Python rho equals per-tensor ``lerp_`` with a 0-dim rho, bit for bit."""
    gen = torch.Generator().manual_seed(0)
    for dtype in DTYPES:
        ws = [torch.randn(s, generator=gen, dtype=dtype) for s in ((16, 3, 3, 3), (32, 16, 3, 3), (10, 64))]
        ts = [torch.sign(w) * w.abs().mean() for w in ws]
        for rho in (1e-5, 0.01, 0.5, 0.9):
            loop = [w.clone() for w in ws]
            for w, t in zip(loop, ts, strict=True):
                blend_(w, t, torch.tensor(rho, dtype=dtype))
            fused = [w.clone() for w in ws]
            blend_all_(fused, ts, rho)
            assert all(torch.equal(a, b) for a, b in zip(loop, fused, strict=True))


def test_kept_training_value_is_the_forward_tensor_and_goes_stale_on_writes() -> None:
    from qlight.quant import QuantConv2d

    conv = QuantConv2d(3, 4, 3, weight_quantizer=TensorQuantizer("binary"))
    conv.weight_quantizer.keep_training_value = True
    conv.weight_quantizer.set_mix(0.25)
    x = torch.randn(2, 3, 8, 8)
    conv(x).sum().backward()
    kept = conv.weight_quantizer.training_value(conv.weight)
    assert kept is not None
    recomputed = torch.lerp(conv.weight.detach(), conv.quantized_weight(), torch.tensor(0.25))
    assert torch.equal(kept, recomputed) and conv.training_weight() is kept
    with torch.no_grad():
        conv.weight.mul_(2.0)  # e.g. a callback writes the weight: the kept tensor is stale
    assert conv.weight_quantizer.training_value(conv.weight) is None
    assert torch.equal(conv.training_weight(), torch.lerp(conv.weight.detach(), conv.quantized_weight(), torch.tensor(0.25)))
    conv.eval()
    conv(x)  # an evaluation forward keeps nothing
    assert conv.weight_quantizer.training_value(conv.weight) is None
