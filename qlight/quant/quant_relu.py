"""The BCGD quantized ReLU and its coarse gradients: one autograd Function, ten ATen ops per call.

Forward (:func:`~qlight.quant.functional.act_quant`): ``σ(x; α) = α·k(x)`` with the level index ``k`` of the
authors' code. Backward (``BCGD.md`` §2)::

    ∂L/∂x = ∂L/∂σ · M(x)                          (x_rule: identity | relu | clipped)
    ∂L/∂α = clamp(r · Σ ∂L/∂σ · D(x), −1, 1)      (alpha_rule: ae | mean | min | pact), once per call

The boundaries ``[0, (L−1)α, Lα]`` (:func:`~qlight.quant.functional.act_bounds`) cut the input line into four
regions on which the level bounds, ``M`` and ``D`` are constant (``D`` of ``ae`` is the level index itself). One
``bucketize`` and one lookup in a 4×4 uint8 table therefore give every per-element factor the forward and the
backward need, and the backward multiplies ``∂L/∂σ`` by ``M`` and ``D`` in a single op:

    forward   bucketize, index, div, ceil, clamp, mul       6 ops
    backward  mul (M and D at once), sum, mul r, clamp       4 ops

The looked-up rows are saved for the backward as uint8 (4 bytes per element, as much as saving ``x``). Products
and sums are the same as ``(∂L/∂σ · D).sum()`` elementwise, so the α-gradient is bit-identical to that
expression. Every comparison is made against the rounded boundaries, as the authors' code does (``x > a*level``
with ``a = alpha.item()``).
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch
from torch import Tensor

from .checks import check_choice
from .functional import ACT_BITS, ACT_MODES, _fp, act_bounds, act_levels, act_regions, level_index, level_rows

__all__ = [
    "ALPHA_RULES",
    "X_RULES",
    "AlphaRule",
    "QuantReLUFunction",
    "XRule",
    "alpha_grad_factor",
    "quant_relu",
    "quant_relu_table",
    "x_grad_mask",
]

#: coarse derivative of the quantized ReLU with respect to x ("bfun" in the authors' code)
XRule = Literal["identity", "relu", "clipped"]
X_RULES: tuple[XRule, ...] = get_args(XRule)
#: partial derivative with respect to the resolution alpha ("gd_type" in the authors' code)
AlphaRule = Literal["ae", "mean", "min", "pact"]
ALPHA_RULES: tuple[AlphaRule, ...] = get_args(AlphaRule)

# regions: 0: x ≤ 0 | 1: 0 < x ≤ (L−1)α | 2: (L−1)α < x ≤ Lα | 3: x > Lα
_X_MASKS = {"identity": [1, 1, 1, 1], "relu": [0, 1, 1, 1], "clipped": [0, 1, 1, 0]}


def _alpha_factors(bits: int, alpha_rule: str) -> list[int]:
    level = act_levels(bits)
    inner = {"mean": 2 ** (bits - 1), "min": 1, "pact": 0, "ae": 0}[alpha_rule]
    return [0, inner, inner, level]


def quant_relu_table(bits: int, mode: str, x_rule: str, alpha_rule: str) -> list[list[int]]:
    """Rows ``[low level, high level, M, D]`` by region (columns): everything the quantized ReLU needs per element.

    ``D`` of ``ae`` is the level index, not a constant: its row is unused (zeros).
    """
    check_choice("mode", mode, ACT_MODES)
    check_choice("x_rule", x_rule, X_RULES)
    check_choice("alpha_rule", alpha_rule, ALPHA_RULES)
    low, high = ([int(v) for v in row] for row in level_rows(bits, mode))
    return [low, high, _X_MASKS[x_rule], _alpha_factors(bits, alpha_rule)]


def _table(bits: int, mode: str, x_rule: str, alpha_rule: str, device: torch.device) -> Tensor:
    return torch.tensor(quant_relu_table(bits, mode, x_rule, alpha_rule), dtype=torch.uint8, device=device)


def x_grad_mask(x: Tensor, alpha: Tensor, bits: int, x_rule: str) -> Tensor:
    """Coarse derivative ``∂σ/∂x`` of the quantized ReLU as a boolean mask (``L = 2^b − 1``).

    ``identity``: 1; ``relu``: ``1{x > 0}``; ``clipped`` (the authors' ``inplt``, default): ``1{0 < x ≤ Lα}``.
    """
    xf = _fp(x)
    table = _table(bits, "ceil", x_rule, "mean", xf.device)
    return table[2, act_regions(xf, act_bounds(alpha.to(xf.dtype), bits))].bool()


def alpha_grad_factor(x: Tensor, alpha: Tensor, bits: int, alpha_rule: str, mode: str = "ceil") -> Tensor:
    """Elementwise ``D(x) ≈ ∂σ/∂α`` of the quantized ReLU (``L = 2^b − 1``), zero for ``x ≤ 0``.

    - ``ae`` (a.e. exact): the level index ``k`` (:func:`~qlight.quant.functional.act_level_index`): ``⌈x/α⌉`` on
      ``(0, (L−1)α]`` and L above (ceil mode; ``clamp(round(x/α), 0, L)`` in round mode),
    - ``mean`` (default): ``2^(b−1) = (L+1)/2`` on ``(0, Lα]``, L above,
    - ``min``: 1 on ``(0, Lα]``, L above,
    - ``pact``: 0 on ``(0, Lα]``, L above.
    """
    xf = _fp(x)
    a = alpha.to(xf.dtype)
    table = _table(bits, mode, "clipped", alpha_rule, xf.device)
    rows = table[:, act_regions(xf, act_bounds(a, bits))]
    if alpha_rule == "ae":
        return level_index(xf, a, rows, mode)
    return rows[3].to(xf.dtype)


class QuantReLUFunction(torch.autograd.Function):
    """``σ(x; a)`` forward; backward ``g·M`` for x and ``clamp(r·Σ g·D, −1, 1)`` for α (per call).

    Inputs: ``x``; ``alpha`` (the parameter that receives the α-gradient); ``a`` (the resolution actually used,
    e.g. α clamped to its range: the clamp is straight-through) and ``bounds = act_bounds(a)`` in x's compute
    dtype, without gradient; the uint8 ``table`` of :func:`quant_relu_table`; ``rate_factor`` (0-dim r).
    ``alpha_grad=False`` returns an exactly-zero α-gradient (calibration).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        alpha: Tensor,
        a: Tensor,
        bounds: Tensor,
        table: Tensor,
        rate_factor: Tensor,
        mode: str,
        level_is_factor: bool,
        alpha_grad: bool,
    ) -> Tensor:
        """``σ(x; α)``; saves the per-element table rows the backward needs."""
        xf = _fp(x)
        rows = table[:, act_regions(xf, bounds)]
        k = level_index(xf, a, rows, mode)
        ctx.alpha_grad = alpha_grad
        ctx.level_is_factor = level_is_factor
        ctx.x_dtype = x.dtype
        ctx.alpha_meta = (alpha.shape, alpha.dtype)
        ctx.save_for_backward(rows, k if level_is_factor else None, rate_factor)
        return (k * a).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        """``∂L/∂x = g·M`` and ``∂L/∂α = clamp(r·Σ g·D, −1, 1)`` from the saved rows."""
        rows, k, rate_factor = ctx.saved_tensors
        gf = _fp(g)
        need_x, need_alpha = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx = ga = None
        if ctx.level_is_factor or not (need_alpha and ctx.alpha_grad):
            if need_x:
                gx = (gf * rows[2]).to(ctx.x_dtype)
            weighted = (gf * k) if (need_alpha and ctx.alpha_grad) else None
        else:
            both = gf * rows[2:4]  # M and D in one op
            gx = both[0].to(ctx.x_dtype) if need_x else None
            weighted = both[1]
        shape, dtype = ctx.alpha_meta
        if need_alpha:
            if weighted is None:
                ga = torch.zeros(shape, dtype=dtype, device=g.device)
            else:
                s = weighted.sum()
                ga = torch.clamp(s * rate_factor.to(s.dtype), -1.0, 1.0).to(dtype).reshape(shape)
        return gx, ga, None, None, None, None, None, None, None


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

    :class:`~qlight.quant.layers.QuantAct` calls :class:`QuantReLUFunction` directly with its cached resolution,
    bounds and table; this function builds them per call.
    """
    check_choice("bits", bits, ACT_BITS)
    table = _table(bits, mode, x_rule, alpha_rule, x.device)
    xf_dtype = _fp(x).dtype
    with torch.no_grad():
        a = alpha.detach()
        if alpha_min is not None or alpha_max is not None:
            a = a.clamp(alpha_min, alpha_max)
        a = a.to(xf_dtype)
        bounds = act_bounds(a, bits)
    rf = rate_factor if isinstance(rate_factor, Tensor) else torch.tensor(float(rate_factor), device=x.device)
    return QuantReLUFunction.apply(x, alpha, a, bounds, table, rf, mode, alpha_rule == "ae", alpha_grad)
