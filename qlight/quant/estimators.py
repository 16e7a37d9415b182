"""Coarse-gradient estimators for tensors (weights, AQE/MINW-Net inputs), and their registry.

An estimator is a small ``nn.Module`` registered by name (:func:`register_estimator`) and called as
``estimator(x, x_q, mix)``: ``x`` is the latent tensor (it carries the gradient), ``x_q = Q(x)`` the hard quantized
value computed without gradient, and ``mix`` a 0-dim tensor in [0, 1]. The training forward value is the
relaxation

    y = mix · x_q + (1 − mix) · x          (torch.lerp: exactly x_q at mix = 1, exactly x at mix = 0)

(mix = 1: exact quantization / BinaryConnect; BinaryRelax: mix = η/(1+η); AQE: mix = α). The backward is
``∂L/∂x = s(x) · ∂L/∂y`` with an estimator-specific multiplier ``s``.

Built-in estimators define ``input_grad(x, g, mix)`` (the backward) and run through one small autograd Function
(:func:`straight_through`) whose forward returns the value without any arithmetic: at mix = 1 the forward of a
weight quantizer is just ``Q(w)``, and STE's backward is free. The generic detach trick
``y = value.detach() + s · (x − x.detach())`` (:func:`_attach`) stays available for estimators that override
``forward`` themselves. Scheduled knobs (EDE ``t``, ``k``) are registered 0-dim float buffers of the estimator:
a callback updates them with ``.fill_()`` and they land in the checkpoint.

The BCGD quantized-ReLU coarse gradients live in :mod:`qlight.quant.quant_relu`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal, TypeVar, get_args

import torch
from torch import Tensor, nn
from typing_extensions import override

from .checks import Arg, ChoiceError, QuantArgError, check_choice, check_that
from .quant_relu import ALPHA_RULES, X_RULES, alpha_grad_factor, quant_relu, x_grad_mask

__all__ = [
    "ALPHA_RULES",
    "ESTIMATORS",
    "STE",
    "X_RULES",
    "AQEEstimator",
    "ClippedSTE",
    "EDEEstimator",
    "Estimator",
    "alpha_grad_factor",
    "build_estimator",
    "get_estimator",
    "list_estimators",
    "quant_relu",
    "register_estimator",
    "straight_through",
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
        raise ChoiceError("estimator", name, list_estimators(), problem="is not registered")
    return ESTIMATORS[name]


def build_estimator(name: str, **kwargs: object) -> Estimator:
    """Instantiate the estimator ``name`` with ``kwargs``; bad names or values raise a :class:`QuantArgError`."""
    cls = get_estimator(name)
    try:
        return cls(**kwargs)
    except TypeError as err:  # a keyword the estimator does not take
        error = QuantArgError(
            Arg("estimator_kwargs"), f"={dict(kwargs)!r}: bad estimator_kwargs for estimator={name!r}: {err}"
        )
    except ValueError as err:  # a value the estimator rejects
        error = QuantArgError(Arg("estimator_kwargs"), f"={dict(kwargs)!r}: {err}")
    raise error  # outside the except clause: this line is the whole story


def _as_tensor(v: Tensor | float, like: Tensor) -> Tensor:
    if isinstance(v, Tensor):
        return v.to(like.dtype)
    return torch.tensor(float(v), dtype=like.dtype, device=like.device)


def _mix_value(x: Tensor, x_q: Tensor, mix: Tensor | float) -> Tensor:
    """``mix·x_q + (1−mix)·x`` without gradient; exactly ``x_q`` at mix = 1 and ``x`` at mix = 0."""
    xd = x.detach()
    return torch.lerp(xd, x_q.detach().to(xd.dtype), _as_tensor(mix, xd))


def _attach(value: Tensor, x: Tensor, scale: Tensor | None = None) -> Tensor:
    """Return ``value`` (exactly) with the gradient ``scale · ∂L/∂y`` routed to ``x`` (identity if None).

    The generic detach trick, for estimators that write their own ``forward``; built-in estimators use the
    cheaper :func:`straight_through`.
    """
    d = x - x.detach()
    if scale is not None:
        d = scale * d
    return value + d


class _StraightThrough(torch.autograd.Function):
    """Forward: ``value`` as is (no arithmetic). Backward: ``estimator.input_grad(x, g, mix)`` for ``x``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, value: Tensor, estimator: Estimator, mix: Tensor) -> Tensor:
        ctx.estimator = estimator
        ctx.save_for_backward(x if estimator.needs_input else None, mix)
        return value.view_as(value)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, mix = ctx.saved_tensors
        gx = ctx.estimator.input_grad(x, g, mix) if ctx.needs_input_grad[0] else None
        return gx, None, None, None


def straight_through(x: Tensor, value: Tensor, estimator: Estimator, mix: Tensor) -> Tensor:
    """``value`` in the forward, ``estimator.input_grad(x, ∂L/∂y, mix)`` as the gradient of ``x``.

    ``value`` must carry no gradient (compute it under ``torch.no_grad()`` or from detached tensors).
    """
    return _StraightThrough.apply(x, value, estimator, mix)


class Estimator(nn.Module):
    """Base class of tensor estimators: ``forward(x, x_q, mix) -> y`` (see the module docstring).

    Subclasses define the backward as :meth:`input_grad` (and set :attr:`needs_input` when it reads ``x``), or
    override ``forward`` entirely (e.g. with :func:`_attach`).
    """

    name: str = "base"
    #: whether :meth:`input_grad` reads the latent tensor (otherwise it is not kept for the backward)
    needs_input: ClassVar[bool] = True

    def input_grad(self, x: Tensor, g: Tensor, mix: Tensor) -> Tensor:  # pragma: no cover - abstract
        """``∂L/∂x`` given ``g = ∂L/∂y`` (``x`` is the latent tensor, detached; ``mix`` the 0-dim mixing weight)."""
        raise NotImplementedError

    @override
    def forward(self, x: Tensor, x_q: Tensor, mix: Tensor | float) -> Tensor:
        m = _as_tensor(mix, x)
        return straight_through(x, _mix_value(x, x_q, m), self, m)


@register_estimator("ste")
class STE(Estimator):
    """Straight-through estimator (BinaryConnect; the BCGD coarse gradient).

    Forward ``y = mix·x_q + (1−mix)·x``; backward ``∂L/∂x = ∂L/∂y`` (the gradient at the forward value is
    applied to the latent x).
    """

    needs_input = False

    @override
    def input_grad(self, x: Tensor, g: Tensor, mix: Tensor) -> Tensor:
        return g


@register_estimator("clipped_ste")
class ClippedSTE(Estimator):
    """Clipped straight-through estimator (BNN, Hubara et al.).

    Forward ``y = mix·x_q + (1−mix)·x``; backward ``∂L/∂x = ∂L/∂y · 1{|x| ≤ clip}`` (clip = 1 by default).
    """

    def __init__(self, clip: float = 1.0) -> None:
        super().__init__()
        check_that(clip > 0, "clip", clip, "must be > 0")
        self.clip = float(clip)

    @override
    def input_grad(self, x: Tensor, g: Tensor, mix: Tensor) -> Tensor:
        return g.masked_fill(x.abs() > self.clip, 0.0)

    @override
    def extra_repr(self) -> str:
        return f"clip={self.clip}"


#: AQE's backward rules (:class:`AQEEstimator`)
BackwardRule = Literal["eq18", "alg1", "autograd"]


@register_estimator("aqe")
class AQEEstimator(Estimator):
    """Asymptotic-quantized estimator (AQE, Chen et al. 2020, Eqs. 6, 18, 19).

    Forward ``x̂ = α·h(x) + (1−α)·x`` with ``α = mix`` (exactly h(x) at α = 1). Backward, by ``backward_rule``:

    - ``"eq18"`` (default, Eq. 18/19): ``∂L/∂x = 2α · ∂L/∂x̂ · 1{|x| ≤ 1}``,
    - ``"alg1"`` (Algorithm 1 literally): ``∂L/∂x = ∂L/∂x̂ · 1{|x| ≤ 1}``,
    - ``"autograd"`` (plain autograd through the mixture, h having zero derivative): ``(1−α) · ∂L/∂x̂``.

    ``eq18`` and ``alg1`` coincide at α = 1/2; ``autograd`` is half of them there ((1 − α) = 1/2).
    """

    RULES: tuple[BackwardRule, ...] = get_args(BackwardRule)

    def __init__(self, backward_rule: BackwardRule = "eq18", clip: float = 1.0) -> None:
        super().__init__()
        check_choice("backward_rule", backward_rule, self.RULES)
        check_that(clip > 0, "clip", clip, "must be > 0")
        self.backward_rule = backward_rule
        self.clip = float(clip)

    @override
    def input_grad(self, x: Tensor, g: Tensor, mix: Tensor) -> Tensor:
        m = mix.to(g.dtype)
        if self.backward_rule == "autograd":
            return g * (1.0 - m)
        if self.backward_rule == "eq18":
            g = g * (2.0 * m)
        return g.masked_fill(x.abs() > self.clip, 0.0)

    @override
    def extra_repr(self) -> str:
        return f"backward_rule={self.backward_rule!r}, clip={self.clip}"


@register_estimator("ede")
class EDEEstimator(Estimator):
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
        check_that(t > 0, "t", t, "must be > 0")
        self.register_buffer("t", torch.tensor(float(t)))
        self.register_buffer("k", torch.tensor(float(k) if k is not None else max(1.0 / float(t), 1.0)))

    @torch.no_grad()
    def set_t(self, t: float | Tensor) -> None:
        """In place: ``t ← t`` and ``k ← max(1/t, 1)`` (IR-Net's rule)."""
        tt = torch.as_tensor(t, dtype=self.t.dtype, device=self.t.device)
        self.t.copy_(tt)
        self.k.copy_(torch.clamp(1.0 / tt, min=1.0))

    @override
    def input_grad(self, x: Tensor, g: Tensor, mix: Tensor) -> Tensor:
        t = self.t.to(x.dtype)
        scale = self.k.to(x.dtype) * t * (1.0 - torch.tanh(t * x) ** 2)
        return g * scale
