"""The theory statements of BCGD.md §6 as seeded numerical property tests of :mod:`qlight.theory`.

P6 (sufficient descent of blending) runs :func:`qlight.theory.blended_descent`, the iteration the BCGD
callback performs (blend with :func:`qlight.callbacks.bcgd.blend_`, then a plain ``torch.optim.SGD`` step
with the gradient taken at Q(w)), on a random quadratic. P1-P5 (the two-layer Gaussian model of paper B)
compare the Monte-Carlo means of :func:`qlight.theory.coarse_gradients` (autograd through qlight's own
1-bit quantized ReLU, whose x-rules ``relu``, ``identity`` and ``clipped`` are the paper's three STEs) and
of the sample loss with the closed forms of :mod:`qlight.theory`.

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

from qlight.quant.functional import binary_weight
from qlight.theory import (
    TeacherStudent,
    blended_descent,
    coarse_gradients,
    expected_identity_coarse_gradient,
    population_grad_v,
    population_grad_w,
    population_loss,
    random_quadratic,
    spurious_minimum,
    teacher_student,
)

# ----------------------------------------------------------------------------------------------------
# P6: sufficient descent of the blended iteration on an L-smooth quadratic

LIP = random_quadratic(50, seed=0)[2]


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
    rho, lr = 0.01, 0.009 / LIP
    run = blended_descent(quantize, rho=rho, lr=lr)
    assert run.moves >= min_moves
    assert run.bound_violations(rho, lr, LIP) == 0
    assert run.increases == 0


@pytest.mark.parametrize("quantize", [_fixed_binary, _fixed_grid], ids=["binary", "grid"])
def test_p6_binaryconnect_lacks_descent(quantize: Callable[[Tensor], Tensor]) -> None:
    """rho = 0 (BinaryConnect) with the same step: f(Q(w_t)) rises in about half of the steps."""
    assert blended_descent(quantize, rho=0.0, lr=0.009 / LIP).increases > 250


def test_p6_guarantee_needs_small_steps() -> None:
    """Outside lr < rho/L (lr = 0.5/L, rho = 0.01) blending alone does not prevent increases."""
    assert blended_descent(_fixed_binary, rho=0.01, lr=0.5 / LIP).increases > 250


def test_p6_mean_scale_binary_observation() -> None:
    """qlight's data-dependent binary quantizer (delta = mean|w|): no increase with BCGD, many with BC.

    The proof covers fixed-scale quantizers only; for delta = mean|w| this is the numerical
    observation of BCGD.md §6 on this seed, kept as a regression check.
    """
    assert blended_descent(binary_weight, rho=0.01, lr=0.009 / LIP).increases == 0
    assert blended_descent(binary_weight, rho=0.0, lr=0.009 / LIP).increases > 250


def test_blended_descent_is_the_bcgd_update() -> None:
    """One step by hand: w1 = (1 - rho) w0 + rho Q(w0) - lr (A Q(w0) - b)."""
    a, b, _ = random_quadratic(5, seed=3)
    w0 = torch.randn(5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    rho, lr = 0.3, 0.1
    u0 = _fixed_grid(w0)
    u1 = _fixed_grid((1 - rho) * w0 + rho * u0 - lr * (a @ u0 - b))
    run = blended_descent(_fixed_grid, rho=rho, lr=lr, steps=1, n=5, seed=3)
    f = lambda u: 0.5 * u @ a @ u - b @ u
    assert torch.allclose(run.losses, torch.stack([f(u0), f(u1)]), rtol=0, atol=1e-12)
    assert int(run.changed[0]) == int((u1 != u0).sum())


@pytest.mark.parametrize(("kwargs", "match"), [({"rho": 1.5}, "rho=1.5"), ({"lr": 0.0}, "lr=0.0")])
def test_blended_descent_rejects_bad_arguments(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        blended_descent(_fixed_grid, **{"rho": 0.1, "lr": 0.1, **kwargs})


# ----------------------------------------------------------------------------------------------------
# P1-P5: coarse gradients of the two-layer model y(Z) = v' sigma(Z w), Z with iid N(0, 1) entries

THETA = math.pi / 3
SAMPLES = 300_000


def _mean_and_se(x: Tensor) -> tuple[Tensor, Tensor]:
    return x.mean(0), x.std(0) / math.sqrt(x.shape[0])


def _sample_losses(p: TeacherStudent, samples: int, seed: int) -> tuple[Tensor, Tensor]:
    """Per-sample losses and v-gradients (exact: the loss is linear in v inside the square)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(samples, p.v.numel(), p.w.numel(), generator=g, dtype=torch.float64)
    s, s_star = (z @ p.w > 0).double(), (z @ p.w_star > 0).double()
    residual = s @ p.v - s_star @ p.v_star
    return 0.5 * residual.square(), residual[:, None] * s


def test_p1_population_loss_and_v_gradient_in_closed_form() -> None:
    p = teacher_student(THETA)
    losses, grads_v = _sample_losses(p, SAMPLES, seed=6)
    mean, se = _mean_and_se(losses[:, None])
    assert abs(float(mean) - float(population_loss(p))) < 5 * float(se)
    mean, se = _mean_and_se(grads_v)
    assert torch.all((mean - population_grad_v(p)).abs() < 5 * se)


def test_p1_w_gradient_is_the_derivative_of_the_loss() -> None:
    """The closed-form df/dw matches central differences of the closed-form loss."""
    p = teacher_student(THETA)
    h = 1e-6
    numeric = torch.stack(
        [
            (population_loss(p.with_student(w=p.w + h * e)) - population_loss(p.with_student(w=p.w - h * e))) / (2 * h)
            for e in torch.eye(p.w.numel(), dtype=torch.float64)
        ]
    )
    assert torch.allclose(population_grad_w(p), numeric, rtol=1e-6, atol=1e-9)


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
    p = teacher_student(THETA)
    grads = coarse_gradients(p, x_rule, SAMPLES, seed=1)
    inner, se = _mean_and_se(grads @ population_grad_w(p))
    expected = math.sin(THETA) * float(p.v @ p.v_star) ** 2 * constant / float(p.w.norm())
    assert expected > 20 * float(se), "the sample must resolve the value, or the check is vacuous"
    assert abs(float(inner) - expected) < 5 * float(se)


def test_p3_identity_ste_expectation_in_closed_form() -> None:
    """E[g_id] = (||v||^2 w^ - (v'v*) w*^) / sqrt(2 pi), coordinate by coordinate."""
    p = teacher_student(THETA)
    mean, se = _mean_and_se(coarse_gradients(p, "identity", SAMPLES, seed=2))
    assert torch.all((mean - expected_identity_coarse_gradient(p)).abs() < 5 * se)


def test_p5_clipped_ste_correlates_positively() -> None:
    """P5: the clipped-ReLU STE's expected coarse gradient is a descent direction as well."""
    p = teacher_student(THETA)
    grads = coarse_gradients(p, "clipped", SAMPLES, seed=3)
    inner, se = _mean_and_se(grads @ population_grad_w(p))
    assert float(inner) > 5 * float(se)


def test_p4_identity_ste_cannot_rest_at_spurious_minimum() -> None:
    """P4: at theta = pi, v = (I + 11')^{-1}(11' - I)v*, E[g_relu] = E[g_clipped] = 0 but E[g_id] != 0.

    ||E[g_id]|| = |(||v||^2 + v'v*)| / sqrt(2 pi) (about 0.02 here, ~30 standard errors per coordinate), so
    identity-STE coarse gradient descent is pushed away from this local minimum while the ReLU and
    clipped-ReLU STEs can stay.
    """
    p = spurious_minimum(teacher_student(THETA))
    assert p.theta == pytest.approx(math.pi)
    for rule in ("relu", "clipped"):
        mean, se = _mean_and_se(coarse_gradients(p, rule, SAMPLES // 2, seed=4))
        assert torch.all(mean.abs() < 5 * se), rule
    mean, se = _mean_and_se(coarse_gradients(p, "identity", SAMPLES // 2, seed=5))
    expected = abs(float(p.v @ p.v + p.v @ p.v_star)) / math.sqrt(2 * math.pi)
    assert expected > 20 * float(se.max())
    assert abs(float(mean.norm()) - expected) < 5 * float(se.max()) * math.sqrt(p.w.numel())
    # the mean is the closed form E[g_id] (here along w^, since w*^ = -w^)
    assert torch.all((mean - expected_identity_coarse_gradient(p)).abs() < 5 * se)
    assert float(expected_identity_coarse_gradient(p).norm()) == pytest.approx(expected)


def test_teacher_student_has_the_requested_angle() -> None:
    p = teacher_student(1.0, m=3, n=4, w_norm=2.0)
    assert p.theta == pytest.approx(1.0)
    assert float(p.w.norm()) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="theta=4"):
        teacher_student(4.0)
