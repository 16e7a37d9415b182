"""The coarse-gradient and blending theory of BCGD (``BCGD.md`` §6) as small exact computations.

Two problems small enough to solve exactly on a CPU, used by ``tests/test_bcgd_theory.py`` (which checks
every closed form below against Monte Carlo) and by ``notebooks/coarse_gradient.ipynb``:

1. **The one-hidden-layer teacher/student model** of the STE paper (Yin et al., ICLR 2019):
   ``y(Z) = vᵀσ(Zw)`` with the binarized ReLU ``σ(t) = 1{t > 0}``, Gaussian patches ``Z ∈ R^{m×n}``
   (iid N(0, 1)), teacher ``(v*, w*)`` and sample loss ``ℓ = ½(vᵀσ(Zw) − v*ᵀσ(Zw*))²``. The population
   loss ``f = E_Z ℓ`` and its gradients have closed forms (P1); the *coarse* gradient in ``w`` replaces
   ``σ'`` (zero almost everywhere) by the derivative of an STE ``μ``. :func:`coarse_gradients` takes it
   from autograd through qlight's own 1-bit quantized ReLU (:func:`qlight.quant.quant_relu` with α = 1),
   whose ``x_rule`` ``relu`` / ``identity`` / ``clipped`` are the paper's three STEs.
2. **Blended descent on an L-smooth quadratic** (P6): :func:`blended_descent` runs exactly the iteration
   the :class:`~qlight.callbacks.BCGD` callback performs, ``w ← (1 − ρ)w + ρQ(w) − η∇f(Q(w))`` (blend
   with :func:`qlight.callbacks.bcgd.blend_`, then a ``torch.optim.SGD`` step), so ρ = 0 is BinaryConnect.

All tensors are float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from qlight.callbacks.bcgd import blend_
from qlight.quant import quant_relu

__all__ = [
    "BlendedRun",
    "TeacherStudent",
    "blended_descent",
    "coarse_gradients",
    "expected_identity_coarse_gradient",
    "population_grad_v",
    "population_grad_w",
    "population_loss",
    "random_quadratic",
    "spurious_minimum",
    "teacher_student",
]

F64 = torch.float64

# ----------------------------------------------------------------------------------------------------
# 1. the one-hidden-layer model y(Z) = v' sigma(Z w)


@dataclass(frozen=True)
class TeacherStudent:
    """A student ``(w, v)`` and a teacher ``(w_star, v_star)``: ``w ∈ R^n``, ``v ∈ R^m`` (m patches)."""

    w: Tensor
    v: Tensor
    w_star: Tensor
    v_star: Tensor

    @property
    def theta(self) -> float:
        """The angle between ``w`` and ``w*``."""
        return float(_angle(self.w, self.w_star))

    def with_student(self, w: Tensor | None = None, v: Tensor | None = None) -> TeacherStudent:
        """The same teacher with another student."""
        return TeacherStudent(self.w if w is None else w, self.v if v is None else v, self.w_star, self.v_star)


def teacher_student(
    theta: float, m: int = 5, n: int = 6, w_norm: float = 1.7, v_noise: float = 0.5, seed: int = 0
) -> TeacherStudent:
    """A random teacher and a student with ``∠(w, w*) = theta``, ``‖w‖ = w_norm`` and ``v = v* + noise``.

    The generator is seeded, so the same arguments give the same problem.
    """
    if not 0.0 <= theta <= math.pi:
        raise ValueError(f"theta={theta!r} must lie in [0, pi]")
    g = torch.Generator().manual_seed(seed)
    w_star = torch.randn(n, generator=g, dtype=F64)
    v_star = torch.randn(m, generator=g, dtype=F64)
    e = torch.randn(n, generator=g, dtype=F64)
    e = e - (e @ w_star) / (w_star @ w_star) * w_star
    w = w_norm * (math.cos(theta) * w_star / w_star.norm() + math.sin(theta) * e / e.norm())
    v = v_star + v_noise * torch.randn(m, generator=g, dtype=F64)
    return TeacherStudent(w, v, w_star, v_star)


def _angle(a: Tensor, b: Tensor) -> Tensor:
    return torch.arccos((a @ b / (a.norm() * b.norm())).clamp(-1.0, 1.0))


def _plus_ones(m: int, diagonal: float | Tensor) -> Tensor:
    """``diagonal·I + 𝟙𝟙ᵀ`` (m × m)."""
    return diagonal * torch.eye(m, dtype=F64) + torch.ones(m, m, dtype=F64)


def population_loss(p: TeacherStudent) -> Tensor:
    """``f = E_Z ℓ = ⅛[vᵀ(I+𝟙𝟙ᵀ)v − 2vᵀ((1−2θ/π)I+𝟙𝟙ᵀ)v* + v*ᵀ(I+𝟙𝟙ᵀ)v*]`` (P1)."""
    m = p.v.numel()
    cross = _plus_ones(m, 1.0 - 2.0 * _angle(p.w, p.w_star) / math.pi)
    same = _plus_ones(m, 1.0)
    return (p.v @ same @ p.v - 2.0 * p.v @ cross @ p.v_star + p.v_star @ same @ p.v_star) / 8.0


def population_grad_v(p: TeacherStudent) -> Tensor:
    """``∂f/∂v = ¼(I+𝟙𝟙ᵀ)v − ¼((1−2θ/π)I+𝟙𝟙ᵀ)v*`` (P1)."""
    m = p.v.numel()
    return (_plus_ones(m, 1.0) @ p.v - _plus_ones(m, 1.0 - 2.0 * _angle(p.w, p.w_star) / math.pi) @ p.v_star) / 4.0


def population_grad_w(p: TeacherStudent) -> Tensor:
    """``∂f/∂w = −(vᵀv*)/(2π‖w‖) · q/‖q‖`` with ``q = (I − ŵŵᵀ)w*`` (P1, for θ ∈ (0, π))."""
    w_hat = p.w / p.w.norm()
    q = p.w_star - (p.w_star @ w_hat) * w_hat
    return -(p.v @ p.v_star) / (2.0 * math.pi * p.w.norm()) * q / q.norm()


def expected_identity_coarse_gradient(p: TeacherStudent) -> Tensor:
    """``E[g_id] = (‖v‖²ŵ − (vᵀv*)ŵ*) / √(2π)``: the identity-STE coarse gradient in expectation (P3)."""
    return ((p.v @ p.v) * p.w / p.w.norm() - (p.v @ p.v_star) * p.w_star / p.w_star.norm()) / math.sqrt(
        2.0 * math.pi
    )


def spurious_minimum(p: TeacherStudent) -> TeacherStudent:
    """The spurious local minimiser of P4: ``θ = π`` (``w = −w*``) and ``v = (I+𝟙𝟙ᵀ)⁻¹(𝟙𝟙ᵀ − I)v*``."""
    m = p.v_star.numel()
    v = torch.linalg.solve(_plus_ones(m, 1.0), _plus_ones(m, -1.0) @ p.v_star)
    return p.with_student(w=-p.w_star, v=v)


def coarse_gradients(
    p: TeacherStudent, x_rule: str, samples: int, seed: int = 0, chunk: int = 250_000
) -> Tensor:
    """Per-sample coarse gradients in ``w``, shape ``(samples, n)``.

    ``g = Zᵀ(μ'(Zw) ⊙ v)(vᵀσ(Zw) − v*ᵀσ(Zw*))``, taken by autograd through qlight's 1-bit quantized ReLU
    with α = 1 (``σ = 1{t > 0}``), whose backward applies the STE ``x_rule``: ``relu`` (μ = ReLU),
    ``identity`` (μ(t) = t) or ``clipped`` (μ = min(max(t, 0), 1)). Their mean estimates ``E_Z[g]``.
    """
    if samples < 1:
        raise ValueError(f"samples={samples!r} must be >= 1")
    g = torch.Generator().manual_seed(seed)
    m, n = p.v.numel(), p.w.numel()
    alpha = torch.ones((), dtype=F64)
    out = []
    for start in range(0, samples, chunk):
        k = min(chunk, samples - start)
        z = torch.randn(k, m, n, generator=g, dtype=F64)
        wk = p.w.expand(k, n).clone().requires_grad_(True)
        pre = torch.einsum("kmn,kn->km", z, wk)
        y = quant_relu(pre, alpha, bits=1, x_rule=x_rule) @ p.v
        y_star = (z @ p.w_star > 0).to(F64) @ p.v_star
        (0.5 * (y - y_star).square()).sum().backward()
        assert wk.grad is not None
        out.append(wk.grad)
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------
# 2. blended (BCGD) descent on an L-smooth quadratic


def random_quadratic(n: int = 50, seed: int = 0) -> tuple[Tensor, Tensor, float]:
    """``f(u) = ½uᵀAu − bᵀu`` with ``A`` symmetric positive definite; returns ``A``, ``b`` and ``L = λ_max(A)``."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=F64)
    a = m @ m.T / n + 0.1 * torch.eye(n, dtype=F64)
    b = torch.randn(n, generator=g, dtype=F64)
    return a, b, float(torch.linalg.eigvalsh(a).max())


@dataclass(frozen=True)
class BlendedRun:
    """The trace of :func:`blended_descent`.

    Attributes:
        losses: ``f(Q(w_t))`` for t = 0..steps.
        step_sq: ``‖Q(w_{t+1}) − Q(w_t)‖²`` for t = 0..steps−1.
        changed: how many entries of ``Q(w)`` changed value in each step (level flips, for the
            fixed-scale quantizers of the theory).
    """

    losses: Tensor
    step_sq: Tensor
    changed: Tensor

    @property
    def moves(self) -> int:
        """Steps in which ``Q(w)`` changed at all (without any, the descent property is vacuous)."""
        return int((self.changed > 0).sum())

    @property
    def increases(self) -> int:
        """Steps where ``f(Q(w))`` rose (beyond float64 rounding: 1e-9, with ``|f| ~ 1e2``)."""
        return int((self.losses[1:] > self.losses[:-1] + 1e-9).sum())

    def bound_violations(self, rho: float, lr: float, lip: float) -> int:
        """Steps breaking ``f(u_{t+1}) ≤ f(u_t) − (ρ/(2η) − L/2)‖u_{t+1} − u_t‖²`` (P6; slack 1e-9)."""
        bound = self.losses[:-1] - (rho / (2.0 * lr) - lip / 2.0) * self.step_sq
        return int((self.losses[1:] > bound + 1e-9).sum())


def blended_descent(
    quantize: Callable[[Tensor], Tensor],
    rho: float,
    lr: float,
    steps: int = 1500,
    n: int = 50,
    seed: int = 0,
) -> BlendedRun:
    """BCGD on :func:`random_quadratic` ``(n, seed)`` from a seeded random start (``seed + 1``).

    Each iteration is the BCGD callback's order of operations: the gradient of f at ``u = Q(w)`` is put on
    ``w`` (what the straight-through estimator does), :func:`~qlight.callbacks.bcgd.blend_` moves ``w``
    toward ``u``, then SGD (no momentum, no weight decay) steps on the blended tensor:
    ``w ← (1 − ρ)w + ρQ(w) − lr·∇f(Q(w))``. ``rho = 0`` is BinaryConnect.
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho={rho!r} must lie in [0, 1]")
    if not lr > 0:
        raise ValueError(f"lr={lr!r} must be > 0")
    a, b, _ = random_quadratic(n, seed)
    w = torch.nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(seed + 1), dtype=F64))
    opt = torch.optim.SGD([w], lr=lr, momentum=0.0)
    rho_t = torch.tensor(rho, dtype=F64)

    def f(u: Tensor) -> Tensor:
        return 0.5 * u @ a @ u - b @ u

    u = quantize(w.detach())
    losses, step_sq, changed = [f(u)], [], []
    for _ in range(steps):
        w.grad = a @ u - b
        with torch.no_grad():
            blend_(w, u, rho_t)
        opt.step()
        u_next = quantize(w.detach())
        d = u_next - u
        losses.append(f(u_next))
        step_sq.append(d @ d)
        changed.append((d != 0).sum())
        u = u_next
    return BlendedRun(torch.stack(losses), torch.stack(step_sq), torch.stack(changed))
