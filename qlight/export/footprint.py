"""How much memory a quantized network needs: float32 as trained versus packed for deployment.

A quantized layer's weight takes at most ``2^b`` distinct values per scale group, so a packed
deployment stores ``b = ⌈log2(levels)⌉`` bits per weight plus each group's level table (1 bit per
binary weight, 2 per ternary, b per b-bit uniform or power-of-two weight). Everything else (BatchNorm,
float first/last layers, biases, activation resolutions α) stays float32. ONNX files store the
quantized weights as float32 values ``level × scale``, so they are as large as the float model; the
packed size is what a runtime with low-bit kernels (or qlight's own format) needs.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from qlight.quant import quant_acts, quant_layers
from qlight.quant.layers import QuantAct, TensorQuantizer
from qlight.quant.packing import pack_weight

__all__ = ["Footprint", "footprint"]


@dataclass
class Footprint:
    """Sizes of a network's state, in bytes, and the bits per quantized weight.

    Args:
        quantized_weights: number of weights in quantized conv/linear layers.
        quantized_layers: number of such layers.
        bits: how many quantized weights need each bit-width, e.g. ``{1: 270000}``.
        packed_weight_bytes: packed indices plus level tables of the quantized weights.
        float_values: every other number of the eval network (float layers, BN, α).
    """

    quantized_weights: int = 0
    quantized_layers: int = 0
    bits: Counter[int] = field(default_factory=Counter)
    packed_weight_bytes: int = 0
    float_values: int = 0

    @property
    def float32_bytes(self) -> int:
        """The whole network at float32."""
        return 4 * (self.quantized_weights + self.float_values)

    @property
    def packed_bytes(self) -> int:
        """Quantized weights packed, the rest float32."""
        return self.packed_weight_bytes + 4 * self.float_values

    @property
    def mean_bits(self) -> float:
        """Average bits per quantized weight."""
        total = sum(b * n for b, n in self.bits.items())
        return total / self.quantized_weights if self.quantized_weights else 0.0

    def summary(self) -> str:
        """One line for the export report."""
        if not self.quantized_weights:
            return f"float network: {self.float_values:,} values, {_mb(self.float32_bytes)} as float32"
        widths = ", ".join(f"{n:,} at {b} bit{'s' if b > 1 else ''}" for b, n in sorted(self.bits.items()))
        return (
            f"{self.quantized_weights:,} quantized weights in {self.quantized_layers} layers ({widths}; "
            f"{self.mean_bits:.2f} bits/weight) + {self.float_values:,} float values: "
            f"{_mb(self.float32_bytes)} as float32 -> {_mb(self.packed_bytes)} packed "
            f"({self.float32_bytes / max(self.packed_bytes, 1):.1f}x smaller)"
        )


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB"


def footprint(model: nn.Module) -> Footprint:
    """The :class:`Footprint` of a (quantized) network in its eval form."""
    result = Footprint()
    quantized = {f"{name}.weight" for name, _ in quant_layers(model)}
    for _, layer in quant_layers(model):
        packed = pack_weight(layer.quantized_weight().cpu(), layer.weight_quantizer.per_channel)
        levels = packed["levels"]
        bits = max(1, math.ceil(math.log2(levels.shape[1])))
        numel = layer.weight.numel()
        result.quantized_layers += 1
        result.quantized_weights += numel
        result.bits[bits] += numel
        result.packed_weight_bytes += math.ceil(numel * bits / 8) + levels.numel() * 4
    internal = {
        f"{name}."
        for name, m in model.named_modules(remove_duplicate=False)
        if isinstance(m, QuantAct | TensorQuantizer)
    }
    alphas = {f"{name}.alpha" for name, _ in quant_acts(model)}
    seen: set[int] = set()
    for key, value in model.state_dict(keep_vars=True).items():
        if key in quantized or id(value) in seen or not value.is_floating_point():
            continue
        if key.startswith(tuple(internal)) and key not in alphas:
            continue  # schedule knobs (mix, rate_factor) that eval does not use
        seen.add(id(value))
        result.float_values += value.numel()
    return result
