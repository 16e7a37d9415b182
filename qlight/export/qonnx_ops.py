"""QONNX quantizer nodes (``Quant``, ``BipolarQuant``) for qlight's quantizers, and which map exactly.

QONNX (the ONNX dialect of FINN and Brevitas, domain ``qonnx.custom_op.general``) writes a quantizer as
``Quant(x, scale, zero_point, bit_width; signed, narrow, rounding_mode)``::

    y = rounding_mode(clip(x / scale + zero_point, min_int, max_int)); out = (y − zero_point) · scale

with the integer range ``[min_int, max_int]`` given by ``bit_width``, ``signed`` and ``narrow``, and
``BipolarQuant(x, scale) = scale · (+1 if x ≥ 0 else −1)``. These modules emit those nodes when traced by
the TorchScript ONNX exporter, and compute the same formula when run in PyTorch.

Which qlight quantizers map exactly (``docs/export.md`` has the table):

- weights are stored at their quantized values and wrapped in the node that reproduces them bit for
  bit (checked with qonnx's own implementation before anything is written): ``binary`` and ``sign`` →
  ``BipolarQuant`` (scale δ, or 1); ``ternary``, ``ternary_unit`` → 2-bit narrow signed ``Quant``;
  ``uniform`` (b bits, any b including the 8-bit first layer) → b-bit narrow signed ``Quant``; per-channel
  scales have shape ``C x 1 x …``;
- the BCGD quantized ReLU → unsigned b-bit ``Quant`` with scale α and rounding ``CEIL`` (or ``ROUND``):
  ``ceil(clip(x/α, 0, L))`` equals qlight's ``min(⌈relu(x)/α⌉, L)``; where float32 rounding could put
  ``x/α`` on ``L − 1`` for an ``x`` above ``fl((L−1)α)`` (see :mod:`qlight.export.onnx_ops`) a standard
  Greater/Where in front sends such ``x`` to the top level, as the authors' code does;
- AQE's ``sign`` input quantizer → ``BipolarQuant`` with scale 1; ``ternary_unit`` with Δ = 0.5 → 2-bit
  narrow signed ``Quant`` with scale 1 and ``ROUND`` (``|x| ≤ 0.5 → 0``, half to even).

Not expressible, so export fails with :class:`UnsupportedQuantizerError` rather than approximating:
``pow2`` / ``pow2_unit`` (levels ``{0, ±2^−k}`` are not a uniform integer grid), ``ternary_unit`` with
Δ ≠ 0.5 (Quant's rounding threshold is half a step), binary weights that are exactly 0 (``sign(0) = 0``),
and quantizers registered by users.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from qlight.export.onnx_ops import (
    UnsupportedQuantizerError,
    clamped_alpha,
    ternary_unit_delta,
    top_level_needs_comparison,
)
from qlight.quant.layers import QuantAct, QuantConv2d, QuantHardtanh, QuantLinear

__all__ = [
    "QONNX_DOMAIN",
    "BipolarQuantNode",
    "QonnxConv2d",
    "QonnxLinear",
    "QuantNode",
    "ReluQuantNode",
    "hardtanh_quant_node",
    "weight_quant_node",
]

QONNX_DOMAIN = "qonnx.custom_op.general"
_ROUNDING = {"ROUND": torch.round, "CEIL": torch.ceil, "FLOOR": torch.floor}


def _int_range(bits: int, signed: bool, narrow: bool) -> tuple[float, float]:
    """``[min_int, max_int]`` of a QONNX ``Quant`` node."""
    if signed:
        return float(-(2 ** (bits - 1)) + (1 if narrow else 0)), float(2 ** (bits - 1) - 1)
    return 0.0, float(2**bits - 1 - (1 if narrow else 0))


class _QuantFn(torch.autograd.Function):
    """QONNX ``Quant`` in PyTorch; traces into one ``Quant`` node."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        scale: Tensor,
        zero_point: Tensor,
        bit_width: Tensor,
        signed: int,
        narrow: int,
        rounding_mode: str,
    ) -> Tensor:
        bits = int(bit_width)
        y = x / scale + zero_point
        if bits == 1 and signed:
            y = torch.where(y >= 0, torch.ones_like(y), -torch.ones_like(y))
        else:
            lo, hi = _int_range(bits, bool(signed), bool(narrow))
            y = _ROUNDING[rounding_mode](torch.clamp(y, lo, hi))
        return (y - zero_point) * scale

    @staticmethod
    def symbolic(
        g: Any,
        x: Any,
        scale: Any,
        zero_point: Any,
        bit_width: Any,
        signed: int,
        narrow: int,
        rounding_mode: str,
    ) -> Any:
        out = g.op(
            f"{QONNX_DOMAIN}::Quant",
            x,
            scale,
            zero_point,
            bit_width,
            signed_i=int(signed),
            narrow_i=int(narrow),
            rounding_mode_s=rounding_mode,
        )
        out.setType(x.type())
        return out


class _BipolarQuantFn(torch.autograd.Function):
    """QONNX ``BipolarQuant`` in PyTorch; traces into one ``BipolarQuant`` node."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor) -> Tensor:
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x)) * scale

    @staticmethod
    def symbolic(g: Any, x: Any, scale: Any) -> Any:
        out = g.op(f"{QONNX_DOMAIN}::BipolarQuant", x, scale)
        out.setType(x.type())
        return out


class QuantNode(nn.Module):
    """A QONNX ``Quant`` node with constant scale, zero point 0 and bit width."""

    scale: Tensor
    zero_point: Tensor
    bit_width: Tensor

    def __init__(self, scale: Tensor, bits: int, signed: bool, narrow: bool, rounding_mode: str) -> None:
        super().__init__()
        if rounding_mode not in _ROUNDING:
            raise ValueError(f"rounding_mode={rounding_mode!r}; valid: {sorted(_ROUNDING)}")
        self.register_buffer("scale", scale.detach().float().clone())
        self.register_buffer("zero_point", torch.tensor(0.0))
        self.register_buffer("bit_width", torch.tensor(float(bits)))
        self.signed, self.narrow, self.rounding_mode = int(signed), int(narrow), rounding_mode

    @override
    def forward(self, x: Tensor) -> Tensor:
        return _QuantFn.apply(
            x, self.scale, self.zero_point, self.bit_width, self.signed, self.narrow, self.rounding_mode
        )

    def reference(self, x: np.ndarray) -> np.ndarray:
        """What qonnx's executor computes for this node (its own implementation)."""
        from qonnx.custom_op.general.quant import quant

        return np.asarray(
            quant(
                x,
                self.scale.numpy(),
                self.zero_point.numpy(),
                self.bit_width.numpy(),
                self.signed,
                self.narrow,
                self.rounding_mode,
            ),
            dtype=np.float32,
        )

    @override
    def extra_repr(self) -> str:
        return (
            f"bits={int(self.bit_width)}, signed={self.signed}, narrow={self.narrow}, "
            f"rounding_mode={self.rounding_mode!r}, scale_shape={tuple(self.scale.shape)}"
        )


class BipolarQuantNode(nn.Module):
    """A QONNX ``BipolarQuant`` node with a constant scale."""

    scale: Tensor

    def __init__(self, scale: Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().float().clone())

    @override
    def forward(self, x: Tensor) -> Tensor:
        return _BipolarQuantFn.apply(x, self.scale)

    def reference(self, x: np.ndarray) -> np.ndarray:
        """What qonnx's executor computes for this node (its own implementation)."""
        from qonnx.custom_op.general.bipolar_quant import binary_quant

        return np.asarray(binary_quant(x, self.scale.numpy()), dtype=np.float32)


def _group_shape(weight: Tensor, per_channel: bool) -> tuple[int, ...]:
    return (weight.shape[0],) + (1,) * (weight.dim() - 1) if per_channel else ()


def _group_absmax(weight: Tensor, per_channel: bool) -> Tensor:
    groups = weight.abs().reshape(weight.shape[0] if per_channel else 1, -1).amax(dim=1)
    return groups.reshape(_group_shape(weight, per_channel))


def _uniform_scale(weight: Tensor, qmax: int, per_channel: bool) -> Tensor | None:
    """A float32 scale per group with ``fl(round(w/s)·s) == w`` and ``|round(w/s)| ≤ qmax``, or None.

    Tries the grid whose top code is ``qmax`` first (the training grid), then coarser ones, each with
    the nearest float32 candidates around ``max|w| / top``.
    """
    rows = weight.reshape(weight.shape[0] if per_channel else 1, -1)
    scales = []
    for row in rows:
        top = row.abs().max()
        if top == 0:
            scales.append(torch.tensor(1.0))
            continue
        found = None
        for code in range(qmax, 0, -1):
            base = top / code
            candidates = [base]
            for direction in (float("inf"), float("-inf")):
                step = base
                for _ in range(2):
                    step = torch.nextafter(step, torch.tensor(direction))
                    candidates.append(step)
            for s in candidates:
                q = torch.round(row / s)
                if q.abs().max() <= qmax and torch.equal(q * s, row):
                    found = s
                    break
            if found is not None:
                break
        if found is None:
            return None
        scales.append(found)
    return torch.stack(scales).reshape(_group_shape(weight, per_channel))


def weight_quant_node(
    name: str, layer: QuantConv2d | QuantLinear, weight: Tensor
) -> QuantNode | BipolarQuantNode:
    """The QONNX node that reproduces ``weight`` (= ``layer.quantized_weight()``) bit for bit.

    Raises:
        UnsupportedQuantizerError: the quantizer has no exact QONNX form (see the module docstring).
    """
    q = layer.weight_quantizer
    kind, bits, per_channel = q.quantizer, q.bits, q.per_channel
    weight = weight.detach().float().cpu()
    node: QuantNode | BipolarQuantNode
    scale: Tensor | None
    if kind in ("binary", "sign"):
        zeros = int((weight == 0).sum())
        if zeros:
            raise UnsupportedQuantizerError(
                f"{name}: {zeros} of its {kind} weights are exactly 0 (sign(0) = 0), which QONNX "
                "BipolarQuant (±scale only) cannot express; export with --format onnx"
            )
        scale = _group_absmax(weight, per_channel) if kind == "binary" else torch.tensor(1.0)
        node = BipolarQuantNode(scale)
    elif kind in ("ternary", "ternary_unit", "uniform"):
        qmax = 2 ** (bits - 1) - 1
        if kind == "ternary_unit":
            scale = torch.tensor(1.0)
        elif kind == "ternary":
            absmax = _group_absmax(weight, per_channel)
            scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        else:
            scale = _uniform_scale(weight, qmax, per_channel)
        if scale is None:
            raise UnsupportedQuantizerError(
                f"{name}: its {kind} {bits}-bit weights lie on no {bits}-bit integer grid that QONNX Quant "
                "reproduces exactly; export with --format onnx"
            )
        node = QuantNode(scale, bits, signed=True, narrow=True, rounding_mode="ROUND")
    else:
        raise UnsupportedQuantizerError(
            f"{name}: weight quantizer {kind!r} has no exact QONNX form (QONNX Quant needs a uniform integer "
            "grid; power-of-two levels {0, ±2^-k} are not one); QONNX-exact weight quantizers: "
            "['binary', 'sign', 'ternary', 'ternary_unit', 'uniform']; export with --format onnx"
        )
    reproduced = node.reference(weight.numpy())
    if not np.array_equal(reproduced, weight.numpy()):
        raise UnsupportedQuantizerError(
            f"{name}: QONNX {type(node).__name__} does not reproduce its {kind} weights bit for bit; "
            "export with --format onnx"
        )
    return node


class _QonnxWeightLayer(nn.Module):
    """A conv/linear layer whose stored quantized weight passes through its QONNX node."""

    weight: Tensor
    bias: Tensor | None
    quant: QuantNode | BipolarQuantNode

    def __init__(self, name: str, layer: QuantConv2d | QuantLinear) -> None:
        super().__init__()
        weight = layer.quantized_weight().detach().float().cpu()
        self.quant = weight_quant_node(name, layer, weight)
        self.register_buffer("weight", weight)
        self.register_buffer(
            "bias", layer.bias.detach().float().cpu().clone() if layer.bias is not None else None
        )


class QonnxConv2d(_QonnxWeightLayer):
    """``conv2d(x, Quant(w_q))`` with the geometry of the QuantConv2d it replaces."""

    def __init__(self, name: str, layer: QuantConv2d) -> None:
        super().__init__(name, layer)
        if layer.padding_mode != "zeros":
            raise UnsupportedQuantizerError(f"{name}: padding_mode={layer.padding_mode!r} is not exported")
        self.stride, self.padding, self.dilation, self.groups = (
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
        )

    @override
    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(
            x, self.quant(self.weight), self.bias, self.stride, self.padding, self.dilation, self.groups
        )


class QonnxLinear(_QonnxWeightLayer):
    """``linear(x, Quant(w_q))``."""

    @override
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.quant(self.weight), self.bias)


class ReluQuantNode(nn.Module):
    """The BCGD quantized ReLU as an unsigned QONNX ``Quant`` (scale α).

    The authors' top-level comparison goes in front where float32 division needs it
    (:func:`top_level_needs_comparison`).
    """

    threshold: Tensor
    top_value: Tensor

    def __init__(self, act: QuantAct) -> None:
        super().__init__()
        alpha = clamped_alpha(act)
        levels = act.levels
        self.quant = QuantNode(
            alpha,
            act.bits,
            signed=False,
            narrow=False,
            rounding_mode="CEIL" if act.mode == "ceil" else "ROUND",
        )
        self.compare_top = act.mode == "ceil" and top_level_needs_comparison(alpha, levels)
        if self.compare_top:
            self.register_buffer("threshold", (levels - 1.0) * alpha)
            self.register_buffer("top_value", levels * alpha)

    @override
    def forward(self, x: Tensor) -> Tensor:
        if self.compare_top:
            x = torch.where(x > self.threshold, self.top_value, x)
        return self.quant(x)


class _ClipThen(nn.Module):
    """``node(clip(x, lo, hi))``: the Hardtanh kept only where its range changes the quantizer's decision."""

    def __init__(self, node: nn.Module, lo: float, hi: float) -> None:
        super().__init__()
        self.node, self.lo, self.hi = node, lo, hi

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.node(torch.clamp(x, self.lo, self.hi))


def hardtanh_quant_node(name: str, layer: QuantHardtanh) -> nn.Module:
    """The QONNX form of AQE's ``h(hardtanh(x))`` input quantizer.

    Raises:
        UnsupportedQuantizerError: ``pow2_unit``, ``ternary_unit`` with Δ ≠ 0.5, or another quantizer.
    """
    q = layer.act_quantizer
    lo, hi = float(layer.min_val), float(layer.max_val)
    if q.quantizer == "sign":
        node: nn.Module = BipolarQuantNode(torch.tensor(1.0))
        keeps_decision = lo < 0 <= hi  # then sign(clip(x)) = sign(x)
    elif q.quantizer == "ternary_unit":
        delta = ternary_unit_delta(dict(q.quantizer_kwargs))
        if delta != 0.5:
            raise UnsupportedQuantizerError(
                f"{name}: ternary_unit with delta={delta:g} has no exact QONNX form (Quant rounds at half a "
                "step, so only delta=0.5 maps); export with --format onnx"
            )
        node = QuantNode(torch.tensor(1.0), 2, signed=True, narrow=True, rounding_mode="ROUND")
        keeps_decision = lo < -delta and hi > delta  # Quant clips to [-1, 1] itself
    else:
        raise UnsupportedQuantizerError(
            f"{name}: activation quantizer {q.quantizer!r} has no exact QONNX form (QONNX Quant needs a "
            "uniform integer grid; power-of-two levels {0, ±2^-k} are not one); QONNX-exact activation "
            "quantizers: relu_quant, hardtanh_quant with sign or ternary_unit (delta 0.5); "
            "export with --format onnx"
        )
    return node if keeps_decision else _ClipThen(node, lo, hi)
