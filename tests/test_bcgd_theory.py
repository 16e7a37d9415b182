"""The theory statements of BCGD.md §6 as seeded numerical property tests.

P6 (sufficient descent of blending) runs the iteration the BCGD callback performs -- blend with
:func:`qlight.callbacks.bcgd.blend_`, then a plain ``torch.optim.SGD`` step with the gradient taken at
Q(w) -- on a random quadratic. P2-P4 (coarse gradients in the two-layer Gaussian model of paper B)
take the coarse gradients from autograd through qlight's own quantized ReLU
(:func:`qlight.quant.estimators.quant_relu` with 1 bit and alpha = 1 is the binarized ReLU 1{t > 0};
its x-rules ``relu``, ``identity`` and ``clipped`` are the three STEs of the paper) and compare their
Monte-Carlo means with the closed forms.

Monte-Carlo tolerances: every comparison allows 5 standard errors of the sample mean (sample std /
sqrt(N)). By the CLT a correct implementation then fails with probability < 1e-6 per comparison for a
fresh seed; the generators are seeded, so the outcome is deterministic. The standard errors are a few
percent of the compared values, so a wrong constant (a factor 2 or a missing sin(theta)) fails.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from qlight.callbacks.bcgd import blend_
from qlight.quant.estimators import quant_relu
from qlight.quant.functional import binary_weight

# ----------------------------------------------------------------------------------------------------
# P6: sufficient descent of the blended iteration on an L-smooth quadratic


def _quadratic(n: int, seed: int) -> tuple[Tensor, Tensor, float]:
    """f(u) = u'Au/2 - b'u with A symmetric positive definite; returns A, b and L = lambda_max(A)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    a = m @ m.T / n + 0.1 * torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    return a, b, float(torch.linalg.eigvalsh(a).max())


def _run_blended(
    quantize: Callable[[Tensor], Tensor], rho: float, lr: float, steps: int = 1500, n: int = 50
) -> tuple[int, int, int]:
    """BCGD on the quadratic: returns (#increases of f(Q(w_t)), #violations of the descent bound, #moves).

    Each iteration is exactly the callback's order of operations: the gradient of f at u = Q(w) is put
    on w (what the STE does), ``blend_`` moves w toward u, then SGD (no momentum, no weight decay)
    steps on the blended tensor: w <- (1 - rho) w + rho Q(w) - lr grad f(Q(w)).
    """
    a, b, lip = _quadratic(n, seed=0)
    w = torch.nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=lr, momentum=0.0)
    rho_t = torch.tensor(rho, dtype=torch.float64)

    def f(u: Tensor) -> Tensor:
        return 0.5 * u @ a @ u - b @ u

    u = quantize(w.detach())
    fu = f(u)
    increases = violations = moves = 0
    for _ in range(steps):
        w.grad = a @ u - b
        with torch.no_grad():
            blend_(w, u, rho_t)
        opt.step()
        u_next = quantize(w.detach())
        f_next = f(u_next)
        d = u_next - u
        # BCGD.md §6 P6: f(u_{t+1}) <= f(u_t) - (rho/(2 lr) - L/2) ||u_{t+1} - u_t||^2. The slack 1e-9
        # absorbs float64 rounding of f (|f| ~ 1e2, eps ~ 1e-16 per op, ~1e3 ops).
        if f_next > fu - (rho / (2 * lr) - lip / 2) * (d @ d) + 1e-9:
            violations += 1
        if f_next > fu + 1e-9:
            increases += 1
        moves += int(bool((d != 0).any()))
        u, fu = u_next, f_next
    return increases, violations, moves


def _fixed_binary(w: Tensor) -> Tensor:
    return 0.5 * torch.sign(w)


def _fixed_grid(w: Tensor) -> Tensor:
    return 0.5 * torch.round(w / 0.5)


@pytest.mark.parametrize(
    ("quantize", "min_moves"),
    # Q(w) must actually change, or the property is vacuous. With a fixed delta the blend locks the
    # signs after a few flips (4 here), the grid keeps moving (97 of 1500 steps).
    [(_fixed_binary, 3), (_fixed_grid, 50)],
    ids=["binary", "grid"],
)
def test_p6_blending_gives_sufficient_descent(quantize: Callable[[Tensor], Tensor], min_moves: int) -> None:
    """Fixed-scale projections, lr < rho/L: every step satisfies the descent bound, f(Q(w)) never rises."""
    _, _, lip = _quadratic(50, seed=0)
    increases, violations, moves = _run_blended(quantize, rho=0.01, lr=0.009 / lip)
    assert moves >= min_moves
    assert violations == 0
    assert increases == 0


@pytest.mark.parametrize("quantize", [_fixed_binary, _fixed_grid], ids=["binary", "grid"])
def test_p6_binaryconnect_lacks_descent(quantize: Callable[[Tensor], Tensor]) -> None:
    """rho = 0 (BinaryConnect) with the same step: f(Q(w_t)) rises in about half of the steps."""
    _, _, lip = _quadratic(50, seed=0)
    increases, _, _ = _run_blended(quantize, rho=0.0, lr=0.009 / lip)
    assert increases > 250


def test_p6_guarantee_needs_small_steps() -> None:
    """Outside lr < rho/L (lr = 0.5/L, rho = 0.01) blending alone does not prevent increases."""
    _, _, lip = _quadratic(50, seed=0)
    increases, _, _ = _run_blended(_fixed_binary, rho=0.01, lr=0.5 / lip)
    assert increases > 250


def test_p6_mean_scale_binary_observation() -> None:
    """qlight's data-dependent binary quantizer (delta = mean|w|): no increase with BCGD, many with BC.

    The proof covers fixed-scale quantizers only; for delta = mean|w| this is the numerical
    observation of BCGD.md §6 on this seed, kept as a regression check.
    """
    _, _, lip = _quadratic(50, seed=0)
    assert _run_blended(binary_weight, rho=0.01, lr=0.009 / lip)[0] == 0
    assert _run_blended(binary_weight, rho=0.0, lr=0.009 / lip)[0] > 250


# ----------------------------------------------------------------------------------------------------
# P2-P4: coarse gradients of the two-layer model y(Z) = v' sigma(Z w), Z with iid N(0, 1) entries

M_PATCHES, N_DIM = 5, 6


def _coarse_grads(
    w: Tensor, v: Tensor, w_star: Tensor, v_star: Tensor, x_rule: str, samples: int, seed: int
) -> Tensor:
    """Per-sample coarse gradients in w of l = (v' sigma(Zw) - v*' sigma(Zw*))^2 / 2, shape (samples, n).

    sigma is qlight's 1-bit quantized ReLU with alpha = 1 (= 1{t > 0}); autograd through it applies the
    STE ``x_rule``, so the result is g = Z'(mu'(Zw) * v) (v' sigma(Zw) - v*' sigma(Zw*)).
    """
    g = torch.Generator().manual_seed(seed)
    alpha = torch.ones((), dtype=torch.float64)
    out = []
    for chunk in range(0, samples, 250_000):
        k = min(250_000, samples - chunk)
        z = torch.randn(k, M_PATCHES, N_DIM, generator=g, dtype=torch.float64)
        wk = w.expand(k, N_DIM).clone().requires_grad_(True)
        pre = torch.einsum("kmn,kn->km", z, wk)
        y = quant_relu(pre, alpha, bits=1, x_rule=x_rule) @ v
        y_star = (z @ w_star > 0).to(torch.float64) @ v_star
        (0.5 * (y - y_star).square()).sum().backward()
        out.append(wk.grad)
    return torch.cat(out)


def _teacher_and_student(theta: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Teacher (w*, v*) and a student (w, v) with angle(w, w*) = theta, ||w|| = 1.7, v'v* != 0."""
    g = torch.Generator().manual_seed(0)
    w_star = torch.randn(N_DIM, generator=g, dtype=torch.float64)
    v_star = torch.randn(M_PATCHES, generator=g, dtype=torch.float64)
    e = torch.randn(N_DIM, generator=g, dtype=torch.float64)
    e = e - (e @ w_star) / (w_star @ w_star) * w_star
    w = 1.7 * (math.cos(theta) * w_star / w_star.norm() + math.sin(theta) * e / e.norm())
    v = v_star + 0.5 * torch.randn(M_PATCHES, generator=g, dtype=torch.float64)
    return w, v, w_star, v_star


def _true_grad_w(w: Tensor, v: Tensor, w_star: Tensor, v_star: Tensor) -> Tensor:
    """df/dw = -(v'v*)/(2 pi ||w||) p/||p||, p = (I - w^ w^') w* (BCGD.md §6 P1)."""
    wh = w / w.norm()
    p = w_star - (w_star @ wh) * wh
    return -(v @ v_star) / (2 * math.pi * w.norm()) * p / p.norm()


def _mean_and_se(x: Tensor) -> tuple[Tensor, Tensor]:
    return x.mean(0), x.std(0) / math.sqrt(x.shape[0])


THETA = math.pi / 3
SAMPLES = 300_000


@pytest.mark.parametrize(
    ("x_rule", "constant"),
    [
        # P2: <E g_relu, df/dw> = sin(theta) (v'v*)^2 / (2 (2 pi)^{3/2} ||w||)
        ("relu", 1.0 / (2 * (2 * math.pi) ** 1.5)),
        # P3: <E g_id, df/dw> = sin(theta) (v'v*)^2 / ((2 pi)^{3/2} ||w||)
        ("identity", 1.0 / (2 * math.pi) ** 1.5),
    ],
    ids=["relu", "identity"],
)
def test_p2_p3_coarse_gradient_correlates_with_true_gradient(x_rule: str, constant: float) -> None:
    w, v, w_star, v_star = _teacher_and_student(THETA)
    grads = _coarse_grads(w, v, w_star, v_star, x_rule, SAMPLES, seed=1)
    inner, se = _mean_and_se(grads @ _true_grad_w(w, v, w_star, v_star))
    expected = math.sin(THETA) * float(v @ v_star) ** 2 * constant / float(w.norm())
    assert expected > 20 * float(se), "the sample must resolve the value, or the check is vacuous"
    assert abs(float(inner) - expected) < 5 * float(se)


def test_p3_identity_ste_expectation_in_closed_form() -> None:
    """E[g_id] = (||v||^2 w^ - (v'v*) w*^) / sqrt(2 pi), coordinate by coordinate."""
    w, v, w_star, v_star = _teacher_and_student(THETA)
    mean, se = _mean_and_se(_coarse_grads(w, v, w_star, v_star, "identity", SAMPLES, seed=2))
    expected = ((v @ v) * w / w.norm() - (v @ v_star) * w_star / w_star.norm()) / math.sqrt(2 * math.pi)
    assert torch.all((mean - expected).abs() < 5 * se)


def test_p5_clipped_ste_correlates_positively() -> None:
    """P5: the clipped-ReLU STE's expected coarse gradient is a descent direction as well."""
    w, v, w_star, v_star = _teacher_and_student(THETA)
    grads = _coarse_grads(w, v, w_star, v_star, "clipped", SAMPLES, seed=3)
    inner, se = _mean_and_se(grads @ _true_grad_w(w, v, w_star, v_star))
    assert float(inner) > 5 * float(se)


def test_p4_identity_ste_cannot_rest_at_spurious_minimum() -> None:
    """P4: at theta = pi, v = (I + 11')^{-1}(11' - I)v*, E[g_relu] = E[g_clipped] = 0 but E[g_id] != 0.

    ||E[g_id]|| = |(||v||^2 + v'v*)| / sqrt(2 pi) (about 0.02 here, ~30 standard errors per coordinate), so
    identity-STE coarse gradient descent is pushed away from this local minimum while the ReLU and
    clipped-ReLU STEs can stay.
    """
    _, _, w_star, v_star = _teacher_and_student(THETA)
    ones = torch.ones(M_PATCHES, M_PATCHES, dtype=torch.float64)
    eye = torch.eye(M_PATCHES, dtype=torch.float64)
    v = torch.linalg.solve(eye + ones, (ones - eye) @ v_star)
    w = -w_star
    for rule in ("relu", "clipped"):
        mean, se = _mean_and_se(_coarse_grads(w, v, w_star, v_star, rule, SAMPLES // 2, seed=4))
        assert torch.all(mean.abs() < 5 * se), rule
    mean, se = _mean_and_se(_coarse_grads(w, v, w_star, v_star, "identity", SAMPLES // 2, seed=5))
    expected = abs(float(v @ v + v @ v_star)) / math.sqrt(2 * math.pi)
    assert expected > 20 * float(se.max())
    assert abs(float(mean.norm()) - expected) < 5 * float(se.max()) * math.sqrt(N_DIM)
    # the mean points along w^ (E[g_id] = (||v||^2 + v'v*) w^ / sqrt(2 pi) since w*^ = -w^)
    sign = math.copysign(1.0, float(v @ v + v @ v_star))
    assert torch.all((mean - sign * expected * w / w.norm()).abs() < 5 * se)
