"""The eval-only network an ONNX exporter traces: qlight's quantized layers swapped for their exact forms.

``deployable(model, "onnx")`` freezes every quantized conv/linear to ``nn.Conv2d``/``nn.Linear`` holding
``Q(w)`` (stored as float32 values ``level × scale``) and replaces the activation quantizers by the
standard-op modules of :mod:`qlight.export.onnx_ops`; ``deployable(model, "qonnx")`` wraps the stored
quantized weights and the activations in QONNX ``Quant``/``BipolarQuant`` nodes
(:mod:`qlight.export.qonnx_ops`). BatchNorm stays a separate op: folding it into the weights would
turn them into ``level × scale × γ/σ`` and lose the quantized values. The result computes the
same logits as ``model.eval()`` in PyTorch.
"""

from __future__ import annotations

import copy
from typing import Literal

from torch import nn

from qlight.export.onnx_ops import HardtanhQuantOp, ReluQuantOp, UnsupportedQuantizerError
from qlight.export.qonnx_ops import QonnxConv2d, QonnxLinear, ReluQuantNode, hardtanh_quant_node
from qlight.quant import iter_quant_modules
from qlight.quant.layers import QuantAct, QuantConv2d, QuantHardtanh, QuantLinear
from qlight.quant.packing import freeze_weights

__all__ = ["Flavour", "deployable"]

Flavour = Literal["onnx", "qonnx"]


def _replacement(name: str, module: nn.Module, flavour: Flavour) -> nn.Module | None:
    """The exact eval form of one qlight module (None: keep it)."""
    if isinstance(module, QuantConv2d):
        return freeze_weights(module) if flavour == "onnx" else QonnxConv2d(name, module)
    if isinstance(module, QuantLinear):
        return freeze_weights(module) if flavour == "onnx" else QonnxLinear(name, module)
    if isinstance(module, QuantAct):
        return ReluQuantOp.from_layer(module) if flavour == "onnx" else ReluQuantNode(module)
    if isinstance(module, QuantHardtanh):
        return (
            HardtanhQuantOp.from_layer(module, name)
            if flavour == "onnx"
            else hardtanh_quant_node(name, module)
        )
    return None


def deployable(model: nn.Module, flavour: Flavour) -> nn.Module:
    """A copy of ``model`` in eval mode with every quantized module replaced by its exact exportable form.

    A module used at several places (the shared activation of a ResNet block) stays one module.

    Raises:
        UnsupportedQuantizerError: a quantizer has no exact form in ``flavour`` (QONNX: power-of-two
            quantizers, ...), or a quantized module of an unknown kind is left.
    """
    net = copy.deepcopy(model).float().eval()
    names = {id(m): n for n, m in reversed(list(net.named_modules(remove_duplicate=False)))}
    done: dict[int, nn.Module] = {}
    for parent in list(net.modules()):
        for attr, child in list(parent._modules.items()):  # every attribute name, shared modules included
            if child is None:
                continue
            if id(child) not in done:
                new = _replacement(names.get(id(child), attr), child, flavour)
                done[id(child)] = new if new is not None else child
            if done[id(child)] is not child:
                setattr(parent, attr, done[id(child)])
    left = [f"{n} ({type(m).__name__})" for n, m in iter_quant_modules(net)]
    if left:
        raise UnsupportedQuantizerError(f"no exact {flavour.upper()} form for {left[:3]}")
    return net.eval()
