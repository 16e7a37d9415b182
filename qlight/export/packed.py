"""qlight's own export format: the truly quantized network, bit-packed, reloadable as a PyTorch module.

A qlight checkpoint holds float latent weights plus optimizer and schedule state (DESIGN.md,
contract 5). This format keeps what inference needs: each quantized layer's weight as a level
table and bit-packed indices (:func:`qlight.quant.packing.pack_weight`), the remaining float state
(BatchNorm, biases, activation resolutions, float first/last layers), the architecture and
quantization spec to rebuild the network, and its :class:`~qlight.export.contract.InputContract`.
:func:`load_exported` returns an :class:`ExportedClassifier` whose outputs equal the checkpoint's
hard-quantized evaluation exactly.

The file is a ``torch.save`` dict of tensors, strings and numbers, readable with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from qlight.export.contract import InputContract
from qlight.models import build_model
from qlight.quant import QuantSpec, quant_layers, quantize_model
from qlight.quant.packing import freeze_weights, pack_weight, unpack_weight
from qlight.tasks import ImageClassifier

FORMAT = "qlight-quantized/2"
#: formats :func:`load_exported` reads; version 1 had no input contract
READABLE = ("qlight-quantized/1", FORMAT)

__all__ = ["FORMAT", "ExportedClassifier", "export_task", "load_exported"]


class ExportedClassifier(nn.Module):
    """An exported network together with its input contract.

    ``forward(images)`` takes either

    - ``uint8`` images, N x 3 x H x W, RGB, pixels 0..255: they are normalised with the recorded
      ``contract`` (``(x / 255 - mean) / std``) first; or
    - a floating-point tensor that is *already normalised* (what ``ImageClassifier.forward`` and the
      DataModule's batches are): it is passed to the network unchanged.

    It returns the logits. ``network`` is the bare network (normalised input).
    """

    def __init__(self, network: nn.Module, contract: InputContract) -> None:
        super().__init__()
        self.network = network
        self.contract = contract

    @override
    def forward(self, images: Tensor) -> Tensor:
        x = self.contract.normalize(images) if images.dtype == torch.uint8 else images
        return self.network(x)


def export_task(task: ImageClassifier, contract: InputContract | None = None) -> dict[str, Any]:
    """The export dict of a task: architecture, spec, packed quantized weights, other state, contract."""
    spec = task.quant_spec
    packed = {
        f"{name}.weight": pack_weight(layer.quantized_weight().cpu(), layer.weight_quantizer.per_channel)
        for name, layer in quant_layers(task.model)
    }
    frozen = freeze_weights(copy.deepcopy(task.model))
    state = {k: v.detach().cpu() for k, v in frozen.state_dict().items() if k not in packed}
    hp = task.hparams
    return {
        "format": FORMAT,
        "model": hp["model"],
        "model_kwargs": dict(hp.get("model_kwargs") or {}),
        "num_classes": int(hp["num_classes"]),
        "quant": spec.to_dict() if spec is not None else None,
        "packed": packed,
        "state_dict": state,
        "input": (contract or InputContract(None, None, None, None)).to_dict(),
    }


def load_exported(path: str | Path, map_location: str | torch.device = "cpu") -> ExportedClassifier:
    """Rebuild the quantized network of a qlight export file, in eval mode.

    Quantized layers come back as plain ``nn.Conv2d``/``nn.Linear`` holding the quantized weights;
    activation quantizers stay and quantize in eval mode. The returned module normalises ``uint8``
    images with the recorded contract and takes float tensors as already normalised
    (:class:`ExportedClassifier`); ``.contract`` says what was recorded.
    """
    data = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(data, dict) or data.get("format") not in READABLE:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(
            f"{path} is not a qlight export (format {found!r}; expected one of {list(READABLE)})"
        )
    model = build_model(data["model"], num_classes=data["num_classes"], **data["model_kwargs"])
    if data["quant"] is not None:
        quantize_model(model, QuantSpec(**data["quant"]))
    freeze_weights(model)
    state = dict(data["state_dict"])
    state.update({k: unpack_weight(p) for k, p in data["packed"].items()})
    model.load_state_dict(state, strict=True)
    contract = InputContract.from_dict(data.get("input"))
    return ExportedClassifier(model, contract).to(map_location).eval()
