"""Activation quantizers written with the few standard ops that ONNX has, computing exactly what qlight's do.

The quantized layers of :mod:`qlight.quant.layers` carry training machinery (coarse-gradient autograd
functions, calibration, blending) that an exporter must not trace. In eval mode each reduces to a
closed form of :mod:`qlight.quant.functional`; the modules here spell that closed form with ops
that map one to one onto standard ONNX operators (Relu, Div, Ceil, Round, Clip, Greater, Where, Sign,
Abs, Mul), so the exported graph computes the same float32 values, bit for bit, as PyTorch's eval.

- :class:`ReluQuantOp`: the BCGD quantized ReLU ``σ(x; α)`` with levels ``{0, α, …, Lα}``, ``L = 2^b − 1``.
  Ceil mode follows the authors' code: ``σ = Lα`` where ``x > (L−1)α``, else ``α·⌈relu(x)/α⌉``. The
  explicit comparison matters only where float32 division rounds ``x/α`` down onto ``L−1`` for an ``x``
  just above ``fl((L−1)α)``; :func:`top_level_needs_comparison` finds the α for which that can happen
  and the graph then uses Greater/Where, otherwise ``min(⌈relu(x)/α⌉, L)`` (Clip), which is then equal.
- :class:`HardtanhQuantOp`: AQE/MINW-Net's input quantizer ``h(hardtanh(x))`` with ``h`` = sign
  (``+1`` for ``x ≥ 0``, else ``−1``), ternary (``0`` for ``|x| ≤ Δ``, else ``sign(x)``) or power of two
  (levels ``{0, ±2^−k}`` chosen by comparisons with the thresholds, which are exact in float32).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from typing_extensions import override

from qlight.quant import functional as QF
from qlight.quant.checks import check_choice
from qlight.quant.layers import QuantAct, QuantHardtanh

__all__ = [
    "HARDTANH_QUANTIZERS",
    "HardtanhQuantOp",
    "ReluQuantOp",
    "UnsupportedQuantizerError",
    "clamped_alpha",
    "pow2_unit_thresholds",
    "ternary_unit_delta",
    "top_level_needs_comparison",
]

#: activation quantizers of :class:`~qlight.quant.layers.QuantHardtanh` with an exact standard-op form
HARDTANH_QUANTIZERS = ("sign", "ternary_unit", "pow2_unit")


class UnsupportedQuantizerError(ValueError):
    """A quantizer that the requested format cannot express exactly (one line, names the layer)."""


def clamped_alpha(act: QuantAct) -> Tensor:
    """The resolution the eval forward uses: ``clamp(alpha, alpha_min, alpha_max)``, float32, 0-dim."""
    return act.alpha.detach().float().clamp(act.alpha_min, act.alpha_max).cpu().clone()


def top_level_needs_comparison(alpha: Tensor, levels: int) -> bool:
    """Whether ``⌈x/α⌉`` can give ``L − 1`` for an ``x > fl((L−1)α)`` (float32); the authors' code: ``L``.

    ``fl(x/α)`` is non-decreasing in ``x``, so it suffices to look at the first float32 above the
    threshold.
    """
    threshold = (levels - 1.0) * alpha.float()
    first_above = torch.nextafter(threshold, torch.tensor(float("inf")))
    return bool(first_above / alpha.float() <= levels - 1.0)


def ternary_unit_delta(quantizer_kwargs: dict[str, object]) -> float:
    """Δ of :func:`~qlight.quant.functional.ternary_quant` for these quantizer kwargs (default when unset)."""
    return float(quantizer_kwargs.get("delta", 0.5))  # type: ignore[arg-type]


def pow2_unit_thresholds(bits: int, thresholds: Sequence[float] | None) -> list[float]:
    """Ascending thresholds of :func:`~qlight.quant.functional.pow2_quant`.

    The given ones, or the nearest-level ones (midpoints of consecutive levels of
    :func:`~qlight.quant.functional.pow2_levels`).
    """
    if thresholds is not None:
        return [float(t) for t in thresholds]
    levels = QF.pow2_levels(bits)
    return [(lo + hi) / 2 for lo, hi in itertools.pairwise(levels)]


class ReluQuantOp(nn.Module):
    """Eval form of :class:`~qlight.quant.layers.QuantAct` in standard ONNX ops (see the module docstring).

    Args:
        alpha: the clamped resolution α (float32, 0-dim).
        bits: activation bits (``L = 2^bits − 1``).
        mode: ``ceil`` or ``round`` (``round``: ``α·clip(round(x/α), 0, L)``, half to even as ONNX Round).
    """

    alpha: Tensor
    threshold: Tensor
    top: Tensor

    def __init__(self, alpha: Tensor, bits: int, mode: str) -> None:
        super().__init__()
        check_choice("mode", mode, QF.ACT_MODES)
        self.levels = 2**bits - 1
        self.mode = mode
        self.register_buffer("alpha", alpha.detach().float().reshape(()).clone())
        self.compare_top = mode == "ceil" and top_level_needs_comparison(self.alpha, self.levels)
        if self.compare_top:
            self.register_buffer("threshold", (self.levels - 1.0) * self.alpha)
            self.register_buffer("top", torch.tensor(float(self.levels)))

    @classmethod
    def from_layer(cls, act: QuantAct) -> ReluQuantOp:
        """The op computing ``act``'s eval forward."""
        return cls(clamped_alpha(act), act.bits, act.mode)

    @override
    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "round":
            k = torch.clamp(torch.round(x / self.alpha), 0.0, float(self.levels))
        elif self.compare_top:
            k = torch.where(x > self.threshold, self.top, torch.ceil(torch.relu(x) / self.alpha))
        else:
            k = torch.clamp(torch.ceil(torch.relu(x) / self.alpha), max=float(self.levels))
        return k * self.alpha

    @override
    def extra_repr(self) -> str:
        alpha = float(self.alpha)
        return f"levels={self.levels}, mode={self.mode!r}, alpha={alpha:.6g}, compare_top={self.compare_top}"


class HardtanhQuantOp(nn.Module):
    """Eval form of :class:`~qlight.quant.layers.QuantHardtanh`: ``h(clip(x, min_val, max_val))``.

    Args:
        quantizer: ``sign``, ``ternary_unit`` or ``pow2_unit``.
        min_val, max_val: the Hardtanh range.
        delta: Δ of ``ternary_unit``.
        levels: non-negative magnitudes of ``pow2_unit`` (ascending, starting at 0).
        thresholds: ``pow2_unit`` thresholds (ascending; ``len(levels) − 1`` of them).
    """

    one: Tensor
    minus_one: Tensor
    zero: Tensor
    delta: Tensor
    levels: Tensor
    thresholds: Tensor

    def __init__(
        self,
        quantizer: str,
        min_val: float,
        max_val: float,
        delta: float = 0.5,
        levels: Sequence[float] = (),
        thresholds: Sequence[float] = (),
    ) -> None:
        super().__init__()
        check_choice("quantizer", quantizer, HARDTANH_QUANTIZERS)
        self.quantizer = quantizer
        self.min_val = float(min_val)
        self.max_val = float(max_val)
        self.register_buffer("one", torch.tensor(1.0))
        self.register_buffer("minus_one", torch.tensor(-1.0))
        self.register_buffer("zero", torch.tensor(0.0))
        self.register_buffer("delta", torch.tensor(float(delta)))
        if quantizer == "pow2_unit":
            if len(thresholds) != len(levels) - 1:
                raise ValueError(f"pow2_unit needs {len(levels) - 1} thresholds for levels {list(levels)}")
            self.register_buffer("levels", torch.tensor([float(v) for v in levels]))
            self.register_buffer("thresholds", torch.tensor([float(t) for t in thresholds]))

    @classmethod
    def from_layer(cls, layer: QuantHardtanh, name: str = "") -> HardtanhQuantOp:
        """The op computing ``layer``'s eval forward.

        Raises:
            UnsupportedQuantizerError: the layer's quantizer is not one of :data:`HARDTANH_QUANTIZERS`.
        """
        q = layer.act_quantizer
        if q.quantizer not in HARDTANH_QUANTIZERS:
            raise UnsupportedQuantizerError(
                f"{name or 'a QuantHardtanh'}: activation quantizer {q.quantizer!r} has no exact ONNX form; "
                f"exportable: {list(HARDTANH_QUANTIZERS)}"
            )
        kwargs = dict(q.quantizer_kwargs)
        if q.quantizer == "pow2_unit":
            levels = QF.pow2_levels(q.bits)
            thresholds = pow2_unit_thresholds(q.bits, kwargs.get("thresholds"))
            return cls("pow2_unit", layer.min_val, layer.max_val, levels=levels, thresholds=thresholds)
        return cls(q.quantizer, layer.min_val, layer.max_val, delta=ternary_unit_delta(kwargs))

    @override
    def forward(self, x: Tensor) -> Tensor:
        y = torch.clamp(x, self.min_val, self.max_val)
        if self.quantizer == "sign":
            return torch.where(y >= 0, self.one, self.minus_one)
        if self.quantizer == "ternary_unit":
            return torch.where(torch.abs(y) > self.delta, torch.sign(y), self.zero)
        magnitude = torch.abs(y)
        level = torch.zeros_like(y)
        for i in range(len(self.thresholds)):  # unrolled at export: one Greater + Where per level
            level = torch.where(magnitude > self.thresholds[i], self.levels[i + 1], level)
        return torch.sign(y) * level

    @override
    def extra_repr(self) -> str:
        return f"quantizer={self.quantizer!r}, range=[{self.min_val:g}, {self.max_val:g}]"
