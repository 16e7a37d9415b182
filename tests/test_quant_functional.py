"""Hard quantizers of qlight.quant.functional against closed forms and the BCGD authors' loops."""

import math

import pytest
import torch
from helpers import authors_act_forward

from qlight.quant import (
    act_quant,
    binary_weight,
    pow2_levels,
    pow2_quant,
    pow2_weight,
    sign_quant,
    ternary_quant,
    ternary_weight,
    uniform_weight,
)


def per_channel_ref(fn, w, **kw):
    """Reference per-channel result: apply the per-tensor quantizer to each output channel."""
    return torch.stack([fn(w[c], **kw) for c in range(w.shape[0])])


def rand_w(*shape, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


# ---------------------------------------------------------------------------------------------- binary
@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (10, 7), (33,)])
def test_binary_mean_closed_form(shape):
    w = rand_w(*shape)
    q = binary_weight(w)
    delta = w.abs().mean()
    torch.testing.assert_close(q, delta * torch.sign(w), rtol=0, atol=0)
    assert q.unique().numel() == 2


def test_binary_median_and_per_channel():
    w = rand_w(6, 4, 3, 3, seed=1)
    torch.testing.assert_close(binary_weight(w, "median"), w.abs().median() * w.sign(), rtol=0, atol=0)
    for scale in ("mean", "median"):
        ref = per_channel_ref(binary_weight, w, scale=scale)
        torch.testing.assert_close(binary_weight(w, scale, per_channel=True), ref)
    q = binary_weight(w, per_channel=True)
    for c in range(6):
        assert q[c].abs().unique().numel() == 1


def test_binary_scale_is_least_squares_optimum():
    w = rand_w(32, 16, 3, 3, seed=2)
    delta = binary_weight(w).abs().max()
    s = w.sign()
    grid = delta * torch.linspace(0.9, 1.1, 2001, dtype=torch.float64)
    err = ((w.double()[None] - grid.view(-1, 1, 1, 1, 1) * s.double()[None]) ** 2).flatten(1).sum(1)
    best = grid[err.argmin()]
    assert abs(best - delta) <= 1.01 * (grid[1] - grid[0])
    # stationarity: d/dδ ||w − δ s||² = −2<w − δ s, s> = 0
    assert abs(((w - delta * s) * s).sum()) < 1e-4 * w.abs().sum()


def test_binary_sign_of_zero_is_zero():
    w = torch.tensor([0.5, -0.25, 0.0, 1.0])
    q = binary_weight(w)
    assert q[2] == 0 and q[0] == -q[1] == q[3] == w.abs().mean()


# ---------------------------------------------------------------------------------------------- ternary
def ternary_ref(w, threshold=0.7, scale="code"):
    a = w.abs()
    t = min(threshold * a.mean(), 100.0)  # authors: delta = min(delta, 100.0)
    idx = (a >= t).float()
    c = (a * idx).mean() if scale == "code" else (a * idx).sum() / idx.sum()
    return c * idx * w.sign()


@pytest.mark.parametrize("scale", ["code", "twn"])
@pytest.mark.parametrize("threshold", [0.7, 0.5])
def test_ternary_closed_form(scale, threshold):
    w = rand_w(12, 6, 3, 3, seed=3)
    q = ternary_weight(w, threshold, scale)
    torch.testing.assert_close(q, ternary_ref(w, threshold, scale))
    assert q.unique().numel() == 3
    qc = ternary_weight(w, threshold, scale, per_channel=True)
    torch.testing.assert_close(qc, per_channel_ref(ternary_ref, w, threshold=threshold, scale=scale))


def test_ternary_code_vs_twn_scale_ratio():
    w = rand_w(64, 64, 3, 3, seed=4)
    c_code = ternary_weight(w, scale="code").abs().max()
    c_twn = ternary_weight(w, scale="twn").abs().max()
    kept = (w.abs() >= 0.7 * w.abs().mean()).float().mean()
    torch.testing.assert_close(c_code / c_twn, kept)
    assert 0.5 < kept < 0.65  # ≈ 0.577 for Gaussian weights (BCGD.md §1)


def test_ternary_threshold_cap_and_zero_guard():
    w = rand_w(50, seed=5) * 1e5  # 0.7·mean|w| ≫ 100: threshold capped at 100
    q = ternary_weight(w, scale="twn")
    keep = w.abs() >= 100
    assert torch.equal(q != 0, keep)
    torch.testing.assert_close(q.abs().max(), w.abs()[keep].mean())
    z = torch.zeros(4, 3, 3, 3)
    for scale in ("code", "twn"):
        for pc in (False, True):
            assert torch.equal(ternary_weight(z, scale=scale, per_channel=pc), z)


# ---------------------------------------------------------------------------------------------- uniform
def authors_fbit(kernel):
    """Literal re-implementation of quantize_fbit (penhunt/full-quantization-DNN, BCGD_cifar/util/quant.py)."""
    data = kernel.abs()
    delta = data.max() / 15
    delta = min(delta, 10.0)
    sign = kernel.sign().float()
    q = 0.0 * data
    for i in range(3, 17, 2):
        if i < 15:
            index = data.gt((i - 2) * delta).float() * data.le(i * delta).float()
        else:
            index = data.gt(13 * delta).float()
        q += (i - 1) / 2 * index
    scale = (data * q).sum() / (q * q).sum()
    return scale * q * sign


def uniform_ref(kernel, bits):
    """The same loop generalised to b bits (BCGD.md §1 item 3, n-bit generalisation)."""
    data = kernel.abs()
    delta = min(data.max() / (2**bits - 1), 10.0)
    kmax = 2 ** (bits - 1) - 1
    q = 0.0 * data
    for k in range(1, kmax + 1):
        if k < kmax:
            index = data.gt((2 * k - 1) * delta).float() * data.le((2 * k + 1) * delta).float()
        else:
            index = data.gt((2 * kmax - 1) * delta).float()
        q += k * index
    scale = (data * q).sum() / (q * q).sum()
    return scale * q * kernel.sign()


def with_ties(w, seed):
    """Put entries exactly on the authors' interval bounds (i−2)·δ0 (odd multiples of δ0)."""
    g = torch.Generator().manual_seed(seed)
    w = w.clone()
    delta = w.abs().max() / 15
    flat = w.view(-1)
    pos = torch.randperm(flat.numel(), generator=g)[: flat.numel() // 3]
    odd = torch.tensor([1, 3, 5, 7, 9, 11, 13])[torch.randint(0, 7, (pos.numel(),), generator=g)]
    sgn = torch.where(torch.rand(pos.numel(), generator=g) < 0.5, -1.0, 1.0)
    keep_max = flat.abs().argmax()
    pos = pos[pos != keep_max]
    flat[pos] = (sgn[: pos.numel()] * (odd[: pos.numel()] * delta))
    return w


def test_uniform4_equals_authors_loop():
    n_ties = 0
    for seed in range(60):
        shape = [(16, 8, 3, 3), (7, 5), (300,), (2, 3, 1, 1)][seed % 4]
        w = rand_w(*shape, seed=seed, scale=10.0 ** (seed % 5 - 3))
        if seed % 2 == 0:
            w = with_ties(w, seed)
            d = w.abs().max() / 15
            n_ties += int(sum((w.abs() == k * d).sum() for k in (1, 3, 5, 7, 9, 11, 13)))
        assert torch.equal(uniform_weight(w, 4), authors_fbit(w)), seed
    assert n_ties > 1000
    # exactly representable grid: ties at every odd multiple of δ0 = 0.125
    w = torch.arange(-15, 16, dtype=torch.float32) * 0.125
    assert torch.equal(uniform_weight(w, 4), authors_fbit(w))
    # δ0 capped at 10 (max|w| > 150)
    w = rand_w(4, 4, 3, 3, seed=7, scale=300.0)
    assert w.abs().max() / 15 > 10
    assert torch.equal(uniform_weight(w, 4), authors_fbit(w))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_uniform_generalisation_and_levels(bits):
    w = with_ties(rand_w(8, 4, 3, 3, seed=bits), bits)
    q = uniform_weight(w, bits)
    torch.testing.assert_close(q, uniform_ref(w, bits), rtol=1e-6, atol=0)
    assert q.unique().numel() <= 2**bits - 1
    # c = <a,q>/<q,q> on the integer codes
    c = q.abs().max() / (2 ** (bits - 1) - 1)
    codes = torch.round(q.abs() / c)
    torch.testing.assert_close(c, (w.abs() * codes).sum() / (codes * codes).sum())
    qc = uniform_weight(w, bits, per_channel=True)
    torch.testing.assert_close(qc, per_channel_ref(uniform_ref, w, bits=bits), rtol=1e-6, atol=0)


def test_uniform_zero_guard():
    for pc in (False, True):
        z = torch.zeros(3, 2, 3, 3)
        assert torch.equal(uniform_weight(z, 4, per_channel=pc), z)
    w = rand_w(3, 5, seed=9)
    w[1] = 0
    q = uniform_weight(w, 4, per_channel=True)
    assert torch.isfinite(q).all() and torch.equal(q[1], torch.zeros(5))


# ---------------------------------------------------------------------------------------------- AQE unit
def test_sign_quant_two_values():
    x = torch.tensor([-2.0, -0.0, 0.0, 1e-30, 3.0])
    assert torch.equal(sign_quant(x), torch.tensor([-1.0, 1.0, 1.0, 1.0, 1.0]))
    assert sign_quant(torch.randn(1000)).unique().tolist() == [-1.0, 1.0]


def test_ternary_quant():
    x = torch.tensor([-0.9, -0.5, -0.49, 0.0, 0.5, 0.51, 2.0])
    assert torch.equal(ternary_quant(x), torch.tensor([-1.0, 0, 0, 0, 0, 1, 1]))
    assert torch.equal(ternary_quant(x, 0.0), torch.tensor([-1.0, -1, -1, 0, 1, 1, 1]))


def pow2_cascade(x, thresholds):
    """AQE Eq. 22 read as a cascade: |x| ≤ Δ3 → 0, ≤ Δ2 → 1/4, ≤ Δ1 → 1/2, else 1 (generalised)."""
    m = len(thresholds)
    out = torch.empty_like(x)
    a = x.abs()
    for i, v in enumerate(a.tolist()):
        if v <= thresholds[0]:
            out[i] = 0.0
        else:
            p = next((m - j for j in range(1, m) if v <= thresholds[j]), 0)
            out[i] = 2.0 ** (-p)
    return out * x.sign()


def test_pow2_quant_3bit():
    x = torch.tensor([0.0, 0.125, 0.1251, 0.375, 0.3751, 0.75, 0.7501, 1.0, 5.0, -0.2, -0.6, -0.9])
    exp = torch.tensor([0, 0, 0.25, 0.25, 0.5, 0.5, 1, 1, 1, -0.25, -0.5, -1])
    assert torch.equal(pow2_quant(x, 3), exp)
    assert torch.equal(pow2_quant(x, 3, thresholds=[0.125, 0.375, 0.75]), exp)
    assert pow2_levels(3) == [0.0, 0.25, 0.5, 1.0]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_pow2_quant_matches_cascade(bits):
    m = 2 ** (bits - 1) - 1
    th = [2.0**-m] + [0.75 * 2.0 ** (-(m - 2 - i)) for i in range(m - 1)]
    g = torch.Generator().manual_seed(bits)
    x = torch.cat([
        torch.randn(500, generator=g) * 0.5,
        torch.exp2(-torch.rand(300, generator=g) * (m + 1)),  # log-uniform magnitudes
        torch.tensor(th), torch.tensor([math.nextafter(t, 2) for t in th]),  # exact thresholds
    ])
    q = pow2_quant(x, bits)
    assert torch.equal(q, pow2_cascade(x, th))
    assert torch.equal(q, pow2_quant(x, bits, thresholds=th))
    assert set(q.abs().unique().tolist()) <= set(pow2_levels(bits))
    if bits == 2:
        assert torch.equal(q, ternary_quant(x, 0.5))
    custom = sorted(float(v) for v in torch.rand(m, generator=g))
    assert torch.equal(pow2_quant(x, bits, thresholds=custom), pow2_cascade(x, custom))


def test_pow2_weight():
    w = rand_w(8, 3, 3, 3, seed=11)
    mx = w.abs().max()
    h = pow2_quant(w / mx, 3)
    torch.testing.assert_close(pow2_weight(w, 3, scale="max"), mx * h)
    c = (w.abs() * h.abs()).sum() / (h * h).sum()
    torch.testing.assert_close(pow2_weight(w, 3), c * h)
    ref = per_channel_ref(lambda v: pow2_weight(v, 3), w)
    torch.testing.assert_close(pow2_weight(w, 3, per_channel=True), ref)
    assert torch.equal(pow2_weight(torch.zeros(3, 3), 3), torch.zeros(3, 3))


# ---------------------------------------------------------------------------------------------- act_quant
def authors_act(x, a, bits):
    """Forward of QtUniFunction (nets/quant_uni_type.py) with fw='quant', at ``bits`` bits."""
    return authors_act_forward(x, a, 2**bits - 1)


@pytest.mark.parametrize("bits", range(1, 9))
def test_act_quant_levels_and_piecewise(bits):
    L = 2**bits - 1
    alpha = 0.25 if bits < 6 else 2.0**-6
    x = torch.linspace(-1.0, (L + 2) * alpha, 20000)
    for mode in ("ceil", "round"):
        y = act_quant(x, torch.tensor(alpha), bits, mode)
        vals = y.unique()
        assert vals.numel() == 2**bits, (mode, vals.numel())
        torch.testing.assert_close(vals, alpha * torch.arange(L + 1, dtype=torch.float32), rtol=0, atol=0)
    assert torch.equal(act_quant(x, alpha, bits, "ceil"), authors_act(x, alpha, bits))
    # round: α·clamp(round(x/α), 0, L)
    assert torch.equal(act_quant(x, alpha, bits, "round"), alpha * torch.clamp(torch.round(x / alpha), 0, L))


def test_act_quant_random_alpha_matches_authors_up_to_boundary_rounding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g)
    a = torch.tensor(0.1946)
    y = act_quant(x, a, 4)
    ref = authors_act(x, a, 4)
    bad = y != ref
    assert bad.float().mean() < 1e-3
    k = x[bad] / a  # any mismatch sits within float rounding of a level boundary
    assert (k - k.round()).abs().max() < 1e-5 if bad.any() else True
    # b = 1: σ = α·1{x > 0}
    assert torch.equal(act_quant(x, a, 1), a * (x > 0).float())


def test_dtypes():
    w = rand_w(4, 4, 3, 3).bfloat16()
    for fn in (binary_weight, ternary_weight, lambda v: uniform_weight(v, 4), lambda v: pow2_weight(v, 3)):
        assert fn(w).dtype == torch.bfloat16
        assert fn(w.double()).dtype == torch.float64
    assert act_quant(torch.randn(5).half(), 0.5, 4).dtype == torch.float16


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda w: binary_weight(w, scale="max"), r"scale='max' is not supported; valid: \['mean', 'median'\]"),
        (lambda w: ternary_weight(w, scale="x"), r"scale='x' is not supported; valid: \['code', 'twn'\]"),
        (lambda w: uniform_weight(w, 1), r"bits=1 is not supported; valid: \[2, 3, 4, 5, 6, 7, 8\]"),
        (lambda w: uniform_weight(w, 9), r"bits=9 is not supported; valid: \[2, 3"),
        (lambda w: pow2_quant(w, 1), r"bits=1 is not supported; valid: \[2,"),
        (lambda w: pow2_quant(w, 3, thresholds=[0.1, 0.2]), r"3 strictly increasing"),
        (lambda w: pow2_quant(w, 3, thresholds=[0.3, 0.2, 0.5]), r"default \[0.125, 0.375, 0.75\]"),
        (lambda w: pow2_weight(w, 3, scale="mean"), r"scale='mean' is not supported; valid: \['ls', 'max'\]"),
        (lambda w: act_quant(w, 0.5, 0), r"bits=0 is not supported; valid: \[1, 2, 3, 4, 5, 6, 7, 8\]"),
        (lambda w: act_quant(w, 0.5, 4, "floor"), r"mode='floor' is not supported; valid: \['ceil', 'round'\]"),
    ],
)
def test_errors_name_value_and_choices(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(4, 4))
