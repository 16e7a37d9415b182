"""Coarse-gradient estimators: straight-through variants for tensors, and the BCGD quantized-ReLU backward.

Two families live here.

**Tensor ("weight-style") estimators** are small ``nn.Module`` s registered by name (:func:`register_estimator`).
Each is called as ``estimator(x, x_q, mix)``: ``x`` is the latent tensor (it carries the gradient), ``x_q = Q(x)``
the hard quantized value computed without gradient, and ``mix`` a 0-dim tensor in [0, 1]. The training forward
value is the relaxation

    y = mix · x_q + (1 − mix) · x          (torch.lerp: exactly x_q at mix = 1, exactly x at mix = 0)

(mix = 1: exact quantization / BinaryConnect; BinaryRelax: mix = η/(1+η); AQE: mix = α). The backward is
``∂L/∂x = s(x) · ∂L/∂y`` with an estimator-specific multiplier ``s``. It is implemented with the detach trick
``y = value.detach() + s · (x − x.detach())``: the forward value is exact (the second term is exactly 0) and the
gradient is ``s · g``. Scheduled knobs (EDE ``t``, ``k``) are registered 0-dim float buffers of the estimator:
a callback updates them with ``.fill_()`` and they land in the checkpoint.

**Activation coarse derivatives** for the quantized ReLU of BCGD (:func:`quant_relu`): the x-rule (STE through
the staircase) and the α-rule (partial derivative with respect to the resolution α), implemented in one small
``torch.autograd.Function`` that saves only x and α.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor, nn

from .functional import _fp, act_quant, check_choice

__all__ = [
    "ALPHA_RULES",
    "AQE",
    "EDE",
    "ESTIMATORS",
    "STE",
    "X_RULES",
    "ClippedSTE",
    "Estimator",
    "alpha_grad_factor",
    "build_estimator",
    "get_estimator",
    "list_estimators",
    "quant_relu",
    "register_estimator",
    "x_grad_mask",
]

#: name -> estimator class. Extend with :func:`register_estimator`.
ESTIMATORS: dict[str, type[Estimator]] = {}

E = TypeVar("E", bound="type[Estimator]")


def register_estimator(name: str) -> Callable[[E], E]:
    """Class decorator registering a tensor estimator under ``name`` (e.g. ``@register_estimator("lsq")``)."""

    def deco(cls: E) -> E:
        if name in ESTIMATORS and ESTIMATORS[name] is not cls:
            raise ValueError(f"estimator {name!r} is already registered ({ESTIMATORS[name].__name__})")
        ESTIMATORS[name] = cls
        cls.name = name
        return cls

    return deco


def list_estimators() -> list[str]:
    """Registered tensor-estimator names."""
    return sorted(ESTIMATORS)


def get_estimator(name: str) -> type[Estimator]:
    """Estimator class registered as ``name``; ``ValueError`` listing the valid names otherwise."""
    if name not in ESTIMATORS:
        raise ValueError(f"estimator={name!r} is not registered; valid: {list_estimators()}")
    return ESTIMATORS[name]


def build_estimator(name: str, **kwargs: object) -> Estimator:
    """Instantiate the estimator ``name`` with ``kwargs``; bad keyword names raise a ``ValueError``."""
    cls = get_estimator(name)
    try:
        return cls(**kwargs)  # type: ignore[arg-type]
    except TypeError as err:
        raise ValueError(f"bad estimator_kwargs for estimator={name!r}: {err}") from err


def _as_tensor(v: Tensor | float, like: Tensor) -> Tensor:
    if isinstance(v, Tensor):
        return v.to(like.dtype)
    return torch.tensor(float(v), dtype=like.dtype, device=like.device)


def _mix_value(x: Tensor, x_q: Tensor, mix: Tensor | float) -> Tensor:
    """``mix·x_q + (1−mix)·x`` without gradient; exactly ``x_q`` at mix = 1 and ``x`` at mix = 0."""
    xd = x.detach()
    return torch.lerp(xd, x_q.detach().to(xd.dtype), _as_tensor(mix, xd))


def _attach(value: Tensor, x: Tensor, scale: Tensor | None = None) -> Tensor:
    """Return ``value`` (exactly) with the gradient ``scale · ∂L/∂y`` routed to ``x`` (identity if None)."""
    d = x - x.detach()
    if scale is not None:
        d = scale * d
    return value + d


class Estimator(nn.Module):
    """Base class of tensor estimators: ``forward(x, x_q, mix) -> y`` (see the module docstring)."""

    name: str = "base"

    def forward(self, x: Tensor, x_q: Tensor, mix: Tensor | float) -> Tensor:  # pragma: no cover
        raise NotImplementedError


@register_estimator("ste")
class STE(Estimator):
    """Straight-through estimator (BinaryConnect; the BCGD coarse gradient).

    Forward ``y = mix·x_q + (1−mix)·x``; backward ``∂L/∂x = ∂L/∂y`` (the gradient at the forward value is
    applied to the latent x).
    """

    def forward(self, x: Tensor, x_q: Tensor, mix: Tensor | float) -> Tensor:
        return _attach(_mix_value(x, x_q, mix), x)


@register_estimator("clipped_ste")
class ClippedSTE(Estimator):
    """Clipped straight-through estimator (BNN, Hubara et al.).

    Forward ``y = mix·x_q + (1−mix)·x``; backward ``∂L/∂x = ∂L/∂y · 1{|x| ≤ clip}`` (clip = 1 by default).
    """

    def __init__(self, clip: float = 1.0) -> None:
        super().__init__()
        if not clip > 0:
            raise ValueError(f"clip={clip!r} must be > 0")
        self.clip = float(clip)

    def forward(self, x: Tensor, x_q: Tensor, mix: Tensor | float) -> Tensor:
        xd = x.detach()
        mask = (xd.abs() <= self.clip).to(xd.dtype)
        return _attach(_mix_value(x, x_q, mix), x, mask)

    def extra_repr(self) -> str:
        return f"clip={self.clip}"


@register_estimator("aqe")
class AQE(Estimator):
    """Asymptotic-quantized estimator (AQE, Chen et al. 2020, Eqs. 6, 18, 19).

    Forward ``x̂ = α·h(x) + (1−α)·x`` with ``α = mix`` (exactly h(x) at α = 1). Backward, by ``backward_rule``:

    - ``"eq18"`` (default, Eq. 18/19): ``∂L/∂x = 2α · ∂L/∂x̂ · 1{|x| ≤ 1}``,
    - ``"alg1"`` (Algorithm 1 literally): ``∂L/∂x = ∂L/∂x̂ · 1{|x| ≤ 1}``,
    - ``"autograd"`` (plain autograd through the mixture, h having zero derivative): ``(1−α) · ∂L/∂x̂``.

    ``eq18`` and ``alg1`` coincide at α = 1/2; ``autograd`` is half of them there ((1 − α) = 1/2).
    """

    RULES = ("eq18", "alg1", "autograd")

    def __init__(self, backward_rule: str = "eq18", clip: float = 1.0) -> None:
        super().__init__()
        check_choice("backward_rule", backward_rule, self.RULES)
        if not clip > 0:
            raise ValueError(f"clip={clip!r} must be > 0")
        self.backward_rule = backward_rule
        self.clip = float(clip)

    def forward(self, x: Tensor, x_q: Tensor, mix: Tensor | float) -> Tensor:
        xd = x.detach()
        m = _as_tensor(mix, xd)
        if self.backward_rule == "autograd":
            scale = 1.0 - m
        else:
            scale = (xd.abs() <= self.clip).to(xd.dtype)
            if self.backward_rule == "eq18":
                scale = scale * (2.0 * m)
        return _attach(_mix_value(x, x_q, m), x, scale)

    def extra_repr(self) -> str:
        return f"backward_rule={self.backward_rule!r}, clip={self.clip}"


@register_estimator("ede")
class EDE(Estimator):
    """Error-decay estimator of IR-Net (Qin et al. 2020; ``AQE.md`` §5).

    Forward ``y = mix·x_q + (1−mix)·x`` (hard ``x_q`` at the default mix = 1); backward through
    ``g(x) = k·tanh(t·x)``: ``∂L/∂x = k·t·(1 − tanh²(t·x)) · ∂L/∂y``.

    ``t`` and ``k`` are 0-dim float buffers (checkpointed, schedulable with ``.fill_()`` or :meth:`set_t`);
    ``k`` defaults to ``max(1/t, 1)``. IR-Net anneals t geometrically from 0.1 to 10 per epoch.
    """

    t: Tensor
    k: Tensor

    def __init__(self, t: float = 0.1, k: float | None = None) -> None:
        super().__init__()
        if not t > 0:
            raise ValueError(f"t={t!r} must be > 0")
        self.register_buffer("t", torch.tensor(float(t)))
        self.register_buffer("k", torch.tensor(float(k) if k is not None else max(1.0 / float(t), 1.0)))

    @torch.no_grad()
    def set_t(self, t: float | Tensor) -> None:
        """In place: ``t ← t`` and ``k ← max(1/t, 1)`` (IR-Net's rule)."""
        tt = torch.as_tensor(t, dtype=self.t.dtype, device=self.t.device)
        self.t.copy_(tt)
        self.k.copy_(torch.clamp(1.0 / tt, min=1.0))

    def forward(self, x: Tensor, x_q: Tensor, mix: Tensor | float) -> Tensor:
        xd = x.detach()
        t = self.t.to(xd.dtype)
        scale = self.k.to(xd.dtype) * t * (1.0 - torch.tanh(t * xd) ** 2)
        return _attach(_mix_value(x, x_q, mix), x, scale)


# ---------------------------------------------------------------------------------------------------------
# BCGD quantized ReLU: coarse derivatives with respect to x and alpha

#: coarse derivative of the quantized ReLU with respect to x ("bfun" in the authors' code)
X_RULES = ("identity", "relu", "clipped")
#: partial derivative with respect to the resolution alpha ("gd_type" in the authors' code)
ALPHA_RULES = ("ae", "mean", "min", "pact")


def x_grad_mask(x: Tensor, alpha: Tensor, bits: int, x_rule: str) -> Tensor:
    """Coarse derivative ``∂σ/∂x`` of the quantized ReLU as a boolean mask (``L = 2^b − 1``).

    ``identity``: 1; ``relu``: ``1{x > 0}``; ``clipped`` (the authors' ``inplt``, default): ``1{0 < x ≤ Lα}``.
    """
    check_choice("x_rule", x_rule, X_RULES)
    xf = _fp(x)
    if x_rule == "identity":
        return torch.ones_like(xf, dtype=torch.bool)
    if x_rule == "relu":
        return xf > 0
    return (xf > 0) & (xf <= float(2**bits - 1) * alpha.to(xf.dtype))


def alpha_grad_factor(x: Tensor, alpha: Tensor, bits: int, alpha_rule: str, mode: str = "ceil") -> Tensor:
    """Elementwise ``D(x) ≈ ∂σ/∂α`` of the quantized ReLU (``L = 2^b − 1``), zero for ``x ≤ 0``.

    - ``ae`` (a.e. exact): the level index ``σ(x)/α``: ``⌈x/α⌉`` on ``(0, (L−1)α]`` and L above (ceil mode;
      ``clamp(round(x/α), 0, L)`` in round mode),
    - ``mean`` (default): ``2^(b−1) = (L+1)/2`` on ``(0, Lα]``, L above,
    - ``min``: 1 on ``(0, Lα]``, L above,
    - ``pact``: 0 on ``(0, Lα]``, L above.
    """
    check_choice("alpha_rule", alpha_rule, ALPHA_RULES)
    xf = _fp(x)
    a = alpha.to(xf.dtype)
    level = float(2**bits - 1)
    if alpha_rule == "ae":
        return act_quant(xf, a, bits, mode) / a
    inner = {"mean": float(2 ** (bits - 1)), "min": 1.0, "pact": 0.0}[alpha_rule]
    sat = xf > level * a
    if inner == 0.0:
        return torch.where(sat, level, 0.0).to(xf.dtype)
    return torch.where(sat, level, torch.where(xf > 0, inner, 0.0)).to(xf.dtype)


class _QuantReLUFn(torch.autograd.Function):
    """σ(x; clamp(α)) forward; backward ``g·x_mask`` for x and ``clamp(r·Σ g·D(x), −1, 1)`` for α, per call.

    The α clamp to [lo, hi] is straight-through: the α-gradient computed at the clamped value is returned for
    the unclamped α. ``alpha_grad=False`` returns an exactly-zero α-gradient (calibration).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        alpha: Tensor,
        rate_factor: Tensor,
        bits: int,
        mode: str,
        x_rule: str,
        alpha_rule: str,
        lo: float | None,
        hi: float | None,
        alpha_grad: bool,
    ) -> Tensor:
        a = alpha.clamp(lo, hi) if (lo is not None or hi is not None) else alpha
        ctx.save_for_backward(x, a, rate_factor)
        ctx.cfg = (bits, mode, x_rule, alpha_rule, alpha_grad)  # type: ignore[attr-defined]
        return act_quant(x, a, bits, mode)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, a, rate_factor = ctx.saved_tensors  # type: ignore[attr-defined]
        bits, mode, x_rule, alpha_rule, alpha_grad = ctx.cfg  # type: ignore[attr-defined]
        gx = ga = None
        if ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            gx = g if x_rule == "identity" else torch.where(x_grad_mask(x, a, bits, x_rule), g, 0.0)
        if ctx.needs_input_grad[1]:  # type: ignore[attr-defined]
            if alpha_grad:
                s = (_fp(g) * alpha_grad_factor(x, a, bits, alpha_rule, mode)).sum()
                ga = torch.clamp(rate_factor.to(s.dtype) * s, -1.0, 1.0).to(a.dtype).reshape(a.shape)
            else:
                ga = torch.zeros_like(a)
        return gx, ga, None, None, None, None, None, None, None, None


def quant_relu(
    x: Tensor,
    alpha: Tensor,
    bits: int = 4,
    mode: str = "ceil",
    x_rule: str = "clipped",
    alpha_rule: str = "mean",
    rate_factor: Tensor | float = 0.01,
    alpha_min: float | None = None,
    alpha_max: float | None = None,
    alpha_grad: bool = True,
) -> Tensor:
    """BCGD quantized ReLU with coarse gradients (one autograd call).

    Forward: :func:`~qlight.quant.functional.act_quant` ``σ(x; α_c)`` (levels ``{0, α_c, …, Lα_c}``) with
    ``α_c = clamp(α, alpha_min, alpha_max)`` (no clamp by default).
    Backward: ``∂L/∂x = ∂L/∂σ · x_grad_mask(x)`` (:func:`x_grad_mask`) and
    ``∂L/∂α = clamp(rate_factor · Σ_{all elements} ∂L/∂σ · D(x), −1, 1)`` (:func:`alpha_grad_factor`, evaluated at
    α_c; straight through the α clamp), clamped per call: an α used twice in one forward gets the sum of two
    clamped terms (as in the authors' code). ``alpha_grad=False`` gives α an exactly-zero gradient.
    Pass ``rate_factor`` as a tensor in hot loops (a float is turned into a new tensor on x's device).
    """
    check_choice("bits", bits, tuple(range(1, 9)))
    check_choice("mode", mode, ("ceil", "round"))
    check_choice("x_rule", x_rule, X_RULES)
    check_choice("alpha_rule", alpha_rule, ALPHA_RULES)
    rf = rate_factor if isinstance(rate_factor, Tensor) else torch.tensor(float(rate_factor), device=x.device)
    return _QuantReLUFn.apply(x, alpha, rf, bits, mode, x_rule, alpha_rule, alpha_min, alpha_max, alpha_grad)
