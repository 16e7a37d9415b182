"""Hard quantizers: closed-form weight quantizers and activation quantizers.

Everything here is plain PyTorch, free of host synchronisation (no ``.item()``, no Python branches on tensor
values) and made of a handful of elementwise ops and reductions, so ``torch.compile`` fuses it. None of these
functions defines a useful gradient: they are the *hard* maps ``Q``; the coarse gradients live in
:mod:`qlight.quant.estimators`. Arithmetic runs in float32 (float64 stays float64) and the result is cast back
to the input dtype.

Notation: ``a = |w|`` elementwise, ``s = sign(w)`` with ``sign(0) = 0`` (as ``torch.sign`` and the BCGD authors'
code), ``n`` the number of entries a statistic runs over. ``per_channel=False`` gives one scale per tensor;
``per_channel=True`` one scale per output channel (dim 0), with statistics over all other dims.

References: BCGD (Yin et al., arXiv 1808.05240; official code penhunt/full-quantization-DNN, ``quant.py`` and
``quant_uni_type.py``), AQE/MINW-Net (Chen et al., arXiv 2003.04296, Eqs. 4, 21, 22), TWN (Li et al. 2016).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

from .checks import Arg, QuantArgError, check_choice, check_that

__all__ = [
    "ACT_BITS",
    "ACT_MODES",
    "BINARY_SCALES",
    "POW2_BITS",
    "POW2_SCALES",
    "TERNARY_SCALES",
    "UNIFORM_BITS",
    "ActMode",
    "act_bounds",
    "act_level_index",
    "act_levels",
    "act_quant",
    "act_regions",
    "binary_weight",
    "pow2_levels",
    "pow2_quant",
    "pow2_weight",
    "sign_quant",
    "ternary_quant",
    "ternary_weight",
    "uniform_weight",
]

#: bit-widths accepted by :func:`uniform_weight`, :func:`pow2_weight`, :func:`pow2_quant`, :func:`act_quant`.
UNIFORM_BITS = tuple(range(2, 9))
POW2_BITS = tuple(range(2, 9))
ACT_BITS = tuple(range(1, 9))

#: rounding of x/α inside the quantized ReLU's staircase: ``ceil`` (the BCGD authors' code) or ``round``
ActMode = Literal["ceil", "round"]
ACT_MODES: tuple[ActMode, ...] = get_args(ActMode)
#: scale rules of :func:`binary_weight`, :func:`ternary_weight` and :func:`pow2_weight`
BINARY_SCALES = ("mean", "median")
TERNARY_SCALES = ("code", "twn")
POW2_SCALES = ("ls", "max")


def _fp(x: Tensor) -> Tensor:
    """Promote half/bfloat16 (or integer) tensors to float32; float32/float64 pass through."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _flat(a: Tensor, per_channel: bool) -> Tensor:
    """View ``a`` as (groups, n): one row per output channel, or a single row."""
    if per_channel and a.dim() >= 1:
        return a.reshape(a.shape[0], -1)
    return a.reshape(1, -1)


def _stat_shape(w: Tensor, per_channel: bool) -> tuple[int, ...]:
    """Shape that broadcasts a (groups,) statistic against ``w``: ``(C, 1, ..., 1)`` or ``()``."""
    if per_channel and w.dim() >= 1:
        return (w.shape[0],) + (1,) * (w.dim() - 1)
    return ()


def _reduce(a: Tensor, per_channel: bool, op: str) -> Tensor:
    """Sum / mean / max / median of ``a`` per tensor or per output channel, shaped to broadcast against ``a``."""
    f = _flat(a, per_channel)
    if op == "sum":
        r = f.sum(dim=1)
    elif op == "mean":
        r = f.mean(dim=1)
    elif op == "max":
        r = f.amax(dim=1)
    else:  # median (torch returns the lower of the two middle values for even n)
        r = f.median(dim=1).values
    return r.reshape(_stat_shape(a, per_channel))


def binary_weight(w: Tensor, scale: str = "mean", per_channel: bool = False) -> Tensor:
    """Binary (1-bit) weight quantizer ``Q(w) = δ · sign(w)``.

    ``scale="mean"``: ``δ = mean|w| = ||w||_1 / n``, the least-squares optimal scale for the sign pattern
    (``argmin_δ ||w − δ s||²`` with ``s ∈ {±1}^n``), i.e. the Euclidean projection onto ``{δ·{±1}^n : δ > 0}``.
    ``scale="median"``: ``δ = median|w|`` (lower median for even n, as ``torch.median``).

    ``sign(0) = 0``: an exactly-zero weight stays 0 (``torch.sign``; the authors' code does the same). This has
    probability zero for trained float weights.

    Args:
        w: weight tensor (any shape; dim 0 is the output channel for ``per_channel``).
        scale: ``"mean"`` or ``"median"``.
        per_channel: one δ per output channel instead of one per tensor.

    Returns:
        Tensor of ``w``'s shape and dtype with values in ``{−δ, 0, +δ}`` (0 only where ``w == 0``).
    """
    check_choice("scale", scale, BINARY_SCALES)
    wf = _fp(w)
    a = wf.abs()
    delta = _reduce(a, per_channel, scale)
    return (delta * torch.sign(wf)).to(w.dtype)


def ternary_weight(
    w: Tensor, threshold: float = 0.7, scale: str = "code", per_channel: bool = False
) -> Tensor:
    """Ternary (2-bit) weight quantizer ``Q(w) = c · sign(w) · 1{|w| ≥ t}`` (BCGD code / TWN).

    ``t = min(threshold · mean|w|, 100)`` (the cap at 100 is in the authors' code), ``I = {i : |w_i| ≥ t}``.

    - ``scale="code"`` (authors' code): ``c = Σ_{i∈I} |w_i| / n`` with n = ALL entries.
    - ``scale="twn"`` (TWN closed form): ``c = Σ_{i∈I} |w_i| / |I|``; ``|I| = 0`` (only possible for an
      all-zero w) is guarded by dividing by ``max(|I|, 1)``, giving c = 0 without a host sync.

    Returns:
        Tensor of ``w``'s shape and dtype with values in ``{−c, 0, +c}``.
    """
    check_choice("scale", scale, TERNARY_SCALES)
    check_that(threshold > 0, "threshold", threshold, "must be > 0")
    wf = _fp(w)
    a = wf.abs()
    t = (threshold * _reduce(a, per_channel, "mean")).clamp(max=100.0)
    keep = (a >= t).to(a.dtype)
    kept = _reduce(a * keep, per_channel, "sum")
    if scale == "code":
        n = a.numel() if not (per_channel and a.dim() >= 1) else a[0].numel()
        c = kept / max(n, 1)
    else:
        c = kept / _reduce(keep, per_channel, "sum").clamp(min=1.0)
    return (c * torch.sign(wf) * keep).to(w.dtype)


def uniform_weight(w: Tensor, bits: int, per_channel: bool = False) -> Tensor:
    """Symmetric uniform b-bit weight quantizer with a one-step least-squares scale refit (BCGD code, n-bit).

    Levels ``c · {0, ±1, …, ±K}`` with ``K = 2^(b−1) − 1`` (``2^b − 1`` levels). With ``a = |w|``:

    1. ``δ0 = min(max(a) / (2^b − 1), 10)`` (half the initial step ``s0 = 2·max(a)/(2^b − 1)``; the authors cap δ0
       at 10),
    2. ``q_i = k`` for ``a_i ∈ ((2k−1)δ0, (2k+1)δ0]``, ``k = 0..K``, and ``q_i = K`` above, i.e.
       ``q = min(round_half_down(a / s0), K)``,
    3. ``c = <a, q> / <q, q>`` (least-squares scale for fixed q; c = 0 for an all-zero w),
    4. ``Q(w) = c · q · sign(w)``.

    At ``bits=4`` this equals the authors' ``quantize_fbit`` bit for bit, ties included: q is first computed
    as ``ceil(a/(2δ0) − 1/2)`` and then corrected with the literal comparisons ``a > (2q−1)·δ0`` and
    ``a ≤ (2q+1)·δ0``, so float rounding of the division cannot move a value across a boundary.

    Args:
        w: weight tensor.
        bits: 2..8.
        per_channel: one (δ0, c) per output channel.
    """
    check_choice("bits", bits, UNIFORM_BITS)
    wf = _fp(w)
    a = wf.abs()
    kmax = float(2 ** (bits - 1) - 1)
    delta = (_reduce(a, per_channel, "max") / float(2**bits - 1)).clamp(max=10.0)
    # guard the all-zero tensor (delta = 0) without a host sync: any positive delta gives q = 0 there
    delta = torch.where(delta > 0, delta, torch.ones_like(delta))
    q = torch.ceil(a / (2.0 * delta) - 0.5).clamp(min=0.0)
    # exact correction against the literal interval bounds ((2q-1)δ0, (2q+1)δ0]
    q = q - ((a <= (2.0 * q - 1.0) * delta) & (q > 0)).to(a.dtype)
    q = q + (a > (2.0 * q + 1.0) * delta).to(a.dtype)
    q = q.clamp(max=kmax)
    aq = _reduce(a * q, per_channel, "sum")
    qq = _reduce(q * q, per_channel, "sum")
    c = aq / torch.where(qq > 0, qq, torch.ones_like(qq))
    return (c * q * torch.sign(wf)).to(w.dtype)


def sign_quant(x: Tensor) -> Tensor:
    """Unscaled 1-bit quantizer (AQE Eq. 4 / BNN): ``h(x) = +1 if x ≥ 0 else −1``.

    Unlike ``torch.sign``, 0 (and −0) maps to +1, so the output takes exactly two values {−1, +1}; NaN maps to −1.
    Three elementwise ops (``ge``, ``mul``, ``sub``): ``torch.where`` with Python scalars would add two device fills.
    """
    return (x >= 0).mul(2.0).sub_(1.0).to(x.dtype)


def ternary_quant(x: Tensor, delta: float = 0.5) -> Tensor:
    """Unscaled ternary quantizer (AQE Eq. 21 / TNN): ``h(x) = 0 if |x| ≤ Δ else sign(x)``, levels {−1, 0, 1}.

    The default Δ = 0.5 is the nearest-level threshold (the paper does not give Δ).
    """
    check_that(delta >= 0, "delta", delta, "must be >= 0")
    return torch.sign(x).masked_fill_(x.abs() <= delta, 0.0)


def pow2_levels(bits: int) -> list[float]:
    """Non-negative magnitudes of the b-bit power-of-two grid: ``[0, 2^−(m−1), …, 1/2, 1]``, ``m = 2^(b−1) − 1``."""
    check_choice("bits", bits, POW2_BITS)
    m = 2 ** (bits - 1) - 1
    return [0.0] + [2.0 ** (-(m - 1 - i)) for i in range(m)]


def _pow2_thresholds(bits: int, thresholds: Sequence[float] | None) -> tuple[float, ...] | None:
    """Validate user thresholds (ascending, one per non-zero magnitude) or return None for the defaults."""
    if thresholds is None:
        return None
    m = 2 ** (bits - 1) - 1
    th = tuple(float(t) for t in thresholds)
    if len(th) != m or any(t <= 0 for t in th) or any(b <= a for a, b in itertools.pairwise(th)):
        raise QuantArgError(
            Arg("thresholds"),
            f"={list(thresholds)!r} must be {m} strictly increasing positive numbers for bits={bits} "
            f"([zero threshold, then one boundary per pair of adjacent non-zero levels]; "
            f"default {_default_pow2_thresholds(bits)})",
        )
    return th


def _default_pow2_thresholds(bits: int) -> list[float]:
    m = 2 ** (bits - 1) - 1
    # zero threshold 2^-m (midpoint of 0 and 2^-(m-1)), then 0.75·2^-j between 2^-(j+1) and 2^-j
    return [2.0**-m] + [0.75 * 2.0 ** (-(m - 2 - i)) for i in range(m - 1)]


def pow2_quant(x: Tensor, bits: int = 3, thresholds: Sequence[float] | None = None) -> Tensor:
    """Unscaled power-of-two quantizer (AQE Eq. 22): levels ``{0, ±2^−(m−1), …, ±1/2, ±1}``, ``m = 2^(b−1) − 1``.

    At 3 bits the levels are {0, ±1/4, ±1/2, ±1}; at 2 bits {0, ±1} (ternary with Δ = 1/2). With ascending
    thresholds ``Δ_m < … < Δ_1`` (``thresholds[0]`` is the zero threshold):
    ``h(x) = 0`` if ``|x| ≤ Δ_m``; ``sign(x)·2^−p`` if ``Δ_{p+1} < |x| ≤ Δ_p``; ``sign(x)`` if ``|x| > Δ_1``.

    Default thresholds are the nearest-level ones: ``Δ_m = 2^−m`` and ``Δ_p = 0.75·2^−(p−1)``
    (3 bits: 0.125, 0.375, 0.75). They are evaluated with ``log2``/``exp2`` plus an exact correction against
    the thresholds (a handful of ops for any b); custom thresholds use one comparison per level.
    """
    check_choice("bits", bits, POW2_BITS)
    th = _pow2_thresholds(bits, thresholds)
    m = 2 ** (bits - 1) - 1
    xf = _fp(x)
    a = xf.abs()
    if th is None:
        tiny = torch.finfo(a.dtype).tiny
        # candidate level 2^e with the nearest-level interval (0.75·2^e, 1.5·2^e]
        lvl = torch.exp2(torch.ceil(torch.log2(a.clamp(min=tiny) / 0.75)) - 1.0)
        lvl = torch.where(a <= 0.75 * lvl, 0.5 * lvl, lvl)
        lvl = torch.where(a > 1.5 * lvl, 2.0 * lvl, lvl)
        lvl = lvl.clamp(min=2.0 ** -(m - 1), max=1.0)
        mag = torch.where(a > 2.0**-m, lvl, torch.zeros_like(a))
    else:
        count = torch.zeros_like(a)
        for t in th:
            count = count + (a > t).to(a.dtype)
        mag = torch.where(count > 0, torch.exp2(count - float(m)), torch.zeros_like(a))
    return (torch.sign(xf) * mag).to(x.dtype)


def pow2_weight(
    w: Tensor,
    bits: int = 3,
    scale: str = "ls",
    per_channel: bool = False,
    thresholds: Sequence[float] | None = None,
) -> Tensor:
    """Scaled power-of-two weight quantizer ``Q(w) = c · h(w / max|w|)`` with ``h`` = :func:`pow2_quant`.

    The weights are normalised by ``M = max|w|`` (per tensor or channel) onto [−1, 1], mapped to the levels
    ``{0, ±2^−(m−1), …, ±1}`` with nearest-level thresholds, and rescaled:

    - ``scale="max"``: ``c = M`` (the largest weight is represented exactly),
    - ``scale="ls"`` (default): ``c = <|w|, q> / <q, q>`` with ``q = |h(w/M)|``, the least-squares scale for
      the fixed level pattern, as in :func:`uniform_weight`.

    An all-zero w gives 0.
    """
    check_choice("scale", scale, POW2_SCALES)
    check_choice("bits", bits, POW2_BITS)
    wf = _fp(w)
    a = wf.abs()
    mx = _reduce(a, per_channel, "max")
    mx_safe = torch.where(mx > 0, mx, torch.ones_like(mx))
    q = pow2_quant(a / mx_safe, bits, thresholds)  # non-negative levels
    if scale == "max":
        c = mx
    else:
        qq = _reduce(q * q, per_channel, "sum")
        c = _reduce(a * q, per_channel, "sum") / torch.where(qq > 0, qq, torch.ones_like(qq))
    return (c * q * torch.sign(wf)).to(w.dtype)


def act_levels(bits: int) -> int:
    """``L = 2^b − 1``: the top level index of a b-bit quantized ReLU (levels ``{0, α, …, Lα}``)."""
    check_choice("bits", bits, ACT_BITS)
    return 2**bits - 1


def act_bounds(alpha: Tensor, bits: int) -> Tensor:
    """The region boundaries ``[0, (L−1)α, Lα]`` of a quantized ReLU, each rounded once (``α·[0, L−1, L]``).

    They split the input line into four regions (:func:`act_regions`): ``x ≤ 0``, ``0 < x ≤ (L−1)α`` (the ceil
    staircase), ``(L−1)α < x ≤ Lα`` and ``x > Lα`` (both at the top level; the coarse gradients treat them
    differently). The products are the values the BCGD authors' code compares against (``a*(level-1)`` and
    ``a*level`` with ``a = alpha.item()``: the exact product rounded once to the tensor's dtype).
    """
    level = act_levels(bits)
    return alpha.reshape(1) * torch.tensor([0.0, level - 1.0, float(level)], dtype=alpha.dtype, device=alpha.device)


def act_regions(x: Tensor, bounds: Tensor) -> Tensor:
    """Region index in {0, 1, 2, 3} of every element of ``x`` (int32): how many of ``bounds`` are ``< x``.

    ``torch.bucketize`` compares ``x`` with the rounded boundaries exactly, in one op. With 1-bit activations
    ``(L−1)α = 0``, so region 1 is empty and every ``x > 0`` (subnormal included) is at the top level.
    """
    return torch.bucketize(x, bounds, out_int32=True)


def level_rows(bits: int, mode: str) -> list[list[float]]:
    """``[[low per region], [high per region]]``: the level index is ``clamp(ceil(x/α), low, high)``.

    ceil (the authors' quantized ReLU): region 0 → 0; region 1 → ``ceil(x/α)`` as computed in floating point,
    at most L; regions 2, 3 → L. round: ``clamp(round(x/α), 0, L)`` everywhere.
    """
    level = float(act_levels(bits))
    if mode == "ceil":
        return [[0.0, 0.0, level, level], [0.0, level, level, level]]
    return [[0.0, 0.0, 0.0, 0.0], [level, level, level, level]]


def level_index(x: Tensor, alpha: Tensor, bounds_rows: Tensor, mode: str) -> Tensor:
    """``k = clamp(ceil|round(x/α), low[r], high[r])`` with ``bounds_rows = (low[r], high[r])`` looked up per element.

    ``x/α`` is rounded once, as in the authors' code (``(input/a).ceil()``), so the staircase is theirs bit for bit.
    """
    k = x / alpha
    k = k.ceil_() if mode == "ceil" else k.round_()
    return k.clamp_(bounds_rows[0], bounds_rows[1])


def act_level_index(x: Tensor, alpha: Tensor | float, bits: int, mode: str = "ceil") -> Tensor:
    """The level index ``k ∈ {0, …, L}`` of :func:`act_quant` (``act_quant = α·k``), in x's compute dtype.

    It is also the a.e.-exact α-derivative of the quantized ReLU (``alpha_rule="ae"``).
    """
    check_choice("mode", mode, ACT_MODES)
    xf = _fp(x)
    a = alpha if isinstance(alpha, Tensor) else torch.tensor(float(alpha), dtype=xf.dtype, device=xf.device)
    a = a.to(device=xf.device, dtype=xf.dtype)
    rows = torch.tensor(level_rows(bits, mode), dtype=xf.dtype, device=xf.device)
    regions = act_regions(xf, act_bounds(a, bits))
    return level_index(xf, a, rows[:, regions], mode)


def act_quant(x: Tensor, alpha: Tensor | float, bits: int, mode: str = "ceil") -> Tensor:
    """Quantized ReLU with resolution α (BCGD §2), levels ``{0, α, 2α, …, Lα}``, ``L = 2^b − 1``.

    - ``mode="ceil"`` (authors' code): ``σ(x) = 0`` for ``x ≤ 0``; ``⌈x/α⌉·α`` for ``0 < x ≤ (L−1)α``; ``Lα`` for
      ``x > (L−1)α``. The last test compares ``x`` with the rounded product ``(L−1)α``, as the authors' code does,
      so two floating-point cases come out as theirs: the float just above ``(L−1)α`` whose quotient ``x/α`` rounds
      down to exactly ``L−1`` (level L, not L−1), and 1-bit activations with subnormal ``x > 0``, where ``x/α``
      underflows to 0 (level 1, not 0).
    - ``mode="round"``: ``σ(x) = α · clamp(round(x/α), 0, L)`` (``torch.round``: half to even).

    Both take exactly ``2^b`` values. α must be positive (the layer clamps it); it may be a 0-dim tensor.
    """
    check_choice("bits", bits, ACT_BITS)
    check_choice("mode", mode, ACT_MODES)
    xf = _fp(x)
    a = alpha if isinstance(alpha, Tensor) else torch.tensor(float(alpha), dtype=xf.dtype, device=xf.device)
    a = a.to(device=xf.device, dtype=xf.dtype)
    return (act_level_index(xf, a, bits, mode) * a).to(x.dtype)
