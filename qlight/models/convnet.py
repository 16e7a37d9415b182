"""MINW-Net ConvNet Models A-D for CIFAR (``AQE.md`` §3, reconstruction).

Model A is the BNN ConvNet of Courbariaux et al.:
``2x128C3 - MP2 - 2x256C3 - MP2 - 2x512C3 - MP2 - FC1024 - FC1024 - FC(classes)``.
B halves every conv width, C halves B's FC widths and D halves them again. Their weight counts
(A 14.02M; B/A, C/A, D/A = 0.456 / 0.250 / 0.161) match the paper's ratios 0.439 / 0.244 / 0.171.

Each layer is ``Conv -> (MaxPool) -> BN -> Hardtanh`` (and ``Linear -> BN -> Hardtanh``); the model
is built from float modules and :func:`qlight.quant.quantize_model` swaps Conv2d/Linear for quantized
layers and Hardtanh for the quantized Hardtanh that feeds the next layer its M-bit input. So:

- conv1 sees the full-precision image (no Hardtanh in front of it);
- every other conv/FC layer sees the quantized output of the previous Hardtanh;
- the last FC is followed by BN, as in BNN: with unscaled +-1 weights and inputs the raw logits grow
  with the fan-in (up to 1024), and the BN rescales them before the softmax (``last_bn=False``
  drops it); no Hardtanh follows, so the logits are never quantized (``AQE.md`` §6 #6).

Conv/FC layers have no bias: a BN follows each of them. :func:`minw_quant` gives the quantization spec of
a MINW-Net cell (M-bit inputs, N-bit weights).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from typing_extensions import override

from qlight.models.registry import register_model


class ConvNet(nn.Module):
    """Six 3x3 convs in three pairs (pool after each pair) and three FC layers.

    Args:
        channels: widths of the three conv pairs.
        fc_width: width of the two hidden FC layers.
        num_classes: number of logits.
        last_bn: batch-normalise the logits (BNN's ConvNet does).
    """

    def __init__(
        self,
        channels: tuple[int, int, int] = (128, 256, 512),
        fc_width: int = 1024,
        num_classes: int = 10,
        last_bn: bool = True,
    ) -> None:
        super().__init__()
        if len(channels) != 3:
            raise ValueError(f"channels={list(channels)} must give the widths of the three conv pairs")
        layers: list[nn.Module] = []
        in_ch = 3
        for width in channels:
            for pool in (False, True):
                layers.append(nn.Conv2d(in_ch, width, 3, padding=1, bias=False))
                if pool:
                    layers.append(nn.MaxPool2d(2))
                layers += [nn.BatchNorm2d(width), nn.Hardtanh()]
                in_ch = width
        self.features = nn.Sequential(*layers)
        flat = in_ch * 4 * 4  # 32x32 input pooled three times
        self.classifier = nn.Sequential(
            nn.Linear(flat, fc_width, bias=False),
            nn.BatchNorm1d(fc_width),
            nn.Hardtanh(),
            nn.Linear(fc_width, fc_width, bias=False),
            nn.BatchNorm1d(fc_width),
            nn.Hardtanh(),
            nn.Linear(fc_width, num_classes, bias=False),
            nn.BatchNorm1d(num_classes) if last_bn else nn.Identity(),
        )

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model("convnet")
def convnet(
    channels: tuple[int, int, int] = (128, 256, 512),
    fc_width: int = 1024,
    num_classes: int = 10,
    last_bn: bool = True,
) -> ConvNet:
    """A ConvNet of any width (``model_kwargs: {channels: [...], fc_width: ...}``), e.g. for ablations."""
    return ConvNet(tuple(channels), fc_width, num_classes, last_bn)  # type: ignore[arg-type]


@register_model("convnet_a")
def convnet_a(num_classes: int = 10, last_bn: bool = True) -> ConvNet:
    """MINW-Net Model A: the BNN ConvNet (128/256/512 conv, FC 1024)."""
    return ConvNet((128, 256, 512), 1024, num_classes, last_bn)


@register_model("convnet_b")
def convnet_b(num_classes: int = 10, last_bn: bool = True) -> ConvNet:
    """Model B: A with half the conv channels (64/128/256, FC 1024)."""
    return ConvNet((64, 128, 256), 1024, num_classes, last_bn)


@register_model("convnet_c")
def convnet_c(num_classes: int = 10, last_bn: bool = True) -> ConvNet:
    """Model C: B with half the FC width (FC 512)."""
    return ConvNet((64, 128, 256), 512, num_classes, last_bn)


@register_model("convnet_d")
def convnet_d(num_classes: int = 10, last_bn: bool = True) -> ConvNet:
    """Model D: C with the FC width halved again (FC 256)."""
    return ConvNet((64, 128, 256), 256, num_classes, last_bn)


#: MINW-Net N-bit weights -> unscaled hard quantizer (``AQE.md`` §1.2); 16 = float weights.
MINW_WEIGHT = {1: "sign", 2: "ternary_unit", 3: "pow2_unit"}
MINW_BITS = (1, 2, 3, 16)


def minw_quant(w_bits: int, a_bits: int, estimator: str = "aqe") -> dict[str, Any] | None:
    """``QuantSpec`` fields (YAML-ready) of the MINW-Net cell with N = ``w_bits``, M = ``a_bits``.

    Bits 1/2/3 pick h = sign / ternary (Δ = 0.5) / power of two (thresholds 0.125, 0.375, 0.75), with no
    scaling factor; 16 leaves that side float (the HardTanh stays, unquantized); 32/32 is the float network
    (``None``: no quantization layers at all). Every conv/FC weight is quantized, the first and last layer
    included (``AQE.md`` §2); the image input and the logits are not.
    """
    if (w_bits, a_bits) == (32, 32):
        return None
    for name, bits in (("w_bits", w_bits), ("a_bits", a_bits)):
        if bits not in MINW_BITS:
            raise ValueError(
                f"{name}={bits} is not a MINW-Net width; valid: {list(MINW_BITS)} or 32/32 (float)"
            )
    spec: dict[str, Any] = {"weight": "float"}
    if w_bits != 16:
        spec = {"weight": MINW_WEIGHT[w_bits], "w_bits": w_bits, "w_estimator": estimator}
    if a_bits != 16:
        spec |= {"act": "hardtanh_quant", "a_bits": a_bits, "a_estimator": estimator}
    else:
        spec["act"] = "float"
    return spec | {"first_layer": "quantized", "last_layer": "quantized"}
