"""Packing: the truly quantized weights a quantization-aware model stands for, frozen and bit-packed.

During training a :class:`~qlight.quant.layers.QuantConv2d` keeps float *latent* weights and
recomputes ``Q(w)`` every forward. For inference and storage only ``Q(w)`` matters, and it takes
at most ``2^bits`` distinct values per scale group (the whole tensor, or one output channel with
``per_channel``). This module

- :func:`freeze_weights`: replaces every weight-quantized layer by a plain ``nn.Conv2d`` /
  ``nn.Linear`` holding ``Q(w)`` (activation quantizers stay: in eval mode they apply the hard
  quantizer), so the frozen model computes exactly what the QAT model computes in eval mode;
- :func:`pack_weight` / :func:`unpack_weight`: store a quantized tensor as its table of levels per
  group plus bit-packed level indices (1 bit per binary weight, 2 per ternary, 4 per 4-bit), and
  restore it bit for bit.

Plain PyTorch; the Lightning-side file format is :mod:`qlight.export`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from qlight.quant.layers import QuantConv2d, QuantLinear

__all__ = ["freeze_weights", "pack_weight", "packed_nbytes", "unpack_weight"]

_WIDTHS = (1, 2, 4, 8)


def _frozen(layer: QuantConv2d | QuantLinear) -> nn.Module:
    """The plain twin of a weight-quantized layer with ``weight = Q(latent weight)``."""
    if isinstance(layer, QuantConv2d):
        conv: Any = layer  # nn.Conv2d stores its sizes as tuple[int, ...], its constructor wants pairs
        plain: nn.Module = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            device="meta",
        )
    else:
        plain = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None, device="meta")
    plain.weight = nn.Parameter(layer.quantized_weight().clone(), requires_grad=layer.weight.requires_grad)
    if layer.bias is not None:
        plain.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=layer.bias.requires_grad)
    plain.train(layer.training)
    return plain


@torch.no_grad()
def freeze_weights(model: nn.Module) -> nn.Module:
    """Replace, in place, every QuantConv2d/QuantLinear by ``nn.Conv2d``/``nn.Linear`` with weight ``Q(w)``.

    A layer used at several places stays one shared module. Returns the model (or the frozen layer
    when ``model`` itself is one). In eval mode the result computes the same outputs as before.
    """
    if isinstance(model, (QuantConv2d, QuantLinear)):
        return _frozen(model)
    memo: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (QuantConv2d, QuantLinear)):
                if id(child) not in memo:
                    memo[id(child)] = _frozen(child)
                setattr(parent, name, memo[id(child)])
    return model


def _storage_width(levels: int) -> int:
    need = max(1, math.ceil(math.log2(levels)))
    for width in _WIDTHS:
        if width >= need:
            return width
    raise ValueError(f"a quantized weight has at most 256 distinct values per group; this one has {levels}")


@torch.no_grad()
def pack_weight(weight: Tensor, per_channel: bool = False) -> dict[str, Any]:
    """Levels table and bit-packed level indices of a quantized tensor; :func:`unpack_weight` inverts it.

    Args:
        weight: a quantized tensor (few distinct values per group), e.g. ``layer.quantized_weight()``.
        per_channel: one level table per output channel (dimension 0) instead of one per tensor.

    Returns:
        ``{"shape", "dtype", "levels" (groups x n, sorted, float), "bits" (index width: 1, 2, 4 or 8),
        "codes" (uint8, ``8 / bits`` indices per byte)}``.

    Raises:
        ValueError: a group has more than 256 distinct values (the tensor is not quantized).
    """
    groups = weight.detach().reshape(weight.shape[0] if per_channel else 1, -1)
    ordered = groups.sort(dim=1).values
    is_new = torch.ones_like(ordered, dtype=torch.bool)
    is_new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    slot = is_new.long().cumsum(dim=1) - 1
    count = int(slot[:, -1].max()) + 1
    width = _storage_width(count)
    # unused slots of groups with fewer levels repeat the group's largest value (keeps rows sorted)
    levels = ordered[:, -1:].expand(-1, count).clone().scatter_(1, slot, ordered)
    codes = torch.searchsorted(levels, groups.contiguous()).to(torch.uint8).flatten()
    per_byte = 8 // width
    codes = torch.cat([codes, codes.new_zeros(-len(codes) % per_byte)]).view(-1, per_byte)
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=codes.device)
    packed = (codes << shifts).sum(dim=1, dtype=torch.int32).to(torch.uint8)
    return {
        "shape": list(weight.shape),
        "dtype": str(weight.dtype).removeprefix("torch."),
        "levels": levels,
        "bits": width,
        "codes": packed,
    }


def unpack_weight(packed: dict[str, Any]) -> Tensor:
    """The tensor :func:`pack_weight` packed, bit for bit."""
    width, levels = int(packed["bits"]), packed["levels"]
    numel = math.prod(packed["shape"])
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=levels.device)
    codes = (packed["codes"].to(levels.device).unsqueeze(1) >> shifts) & ((1 << width) - 1)
    codes = codes.flatten()[:numel].long().view(levels.shape[0], -1)
    weight = levels.gather(1, codes).reshape(packed["shape"])
    return weight.to(getattr(torch, packed["dtype"]))


def packed_nbytes(packed: dict[str, Any]) -> int:
    """Bytes of a packed weight's level indices and level table."""
    return packed["codes"].numel() + packed["levels"].numel() * packed["levels"].element_size()
