"""``qlight export``: write the truly quantized model of a training checkpoint, and load it back.

A qlight checkpoint holds float latent weights plus optimizer and schedule state (DESIGN.md,
contract 5). The export keeps what inference needs: each quantized layer's weight as a level
table and bit-packed indices (:func:`qlight.quant.export.pack_weight`), the remaining float state
(BatchNorm, biases, activation resolutions, float first/last layers), and the architecture and
quantization spec to rebuild the network. :func:`load_exported` returns a plain ``nn.Module`` in
eval mode whose outputs equal the checkpoint's hard-quantized evaluation exactly.

The file is a ``torch.save`` dict of tensors, strings and numbers, readable with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlight.models import build_model
from qlight.quant import QuantSpec, quant_layers, quantize_model
from qlight.quant.export import freeze_weights, pack_weight, packed_nbytes, unpack_weight
from qlight.tasks import ImageClassifier

FORMAT = "qlight-quantized/1"

__all__ = ["FORMAT", "export_checkpoint", "export_task", "load_exported", "main"]


def export_task(task: ImageClassifier) -> dict[str, Any]:
    """The export dict of a task: architecture, spec, packed quantized weights and the other state."""
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
    }


def export_checkpoint(ckpt_path: str, output: str | None = None) -> Path:
    """Write the truly quantized model of a qlight checkpoint.

    Args:
        ckpt_path: a checkpoint written by ``qlight fit`` (``last.ckpt``, ``best-epochNNN.ckpt``).
        output: the file to write (default: the checkpoint's path with ``.quantized.pt``).

    Returns:
        The path written.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={str(path)!r} does not exist; pass a checkpoint written by qlight fit"
        )
    task = ImageClassifier.load_from_checkpoint(path, map_location="cpu")
    exported = export_task(task)
    out = Path(output) if output else path.with_suffix(".quantized.pt")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(exported, out)
    latent = sum(layer.weight.numel() for _, layer in quant_layers(task.model))
    packed = sum(packed_nbytes(p) for p in exported["packed"].values())
    print(
        f"qlight export: {len(exported['packed'])} quantized layers, {latent:,} weights: "
        f"{latent * 4 / 1e6:.2f} MB as float32 -> {packed / 1e6:.3f} MB packed; wrote {out}"
    )
    return out


def load_exported(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the quantized network of an export file, in eval mode.

    Quantized layers come back as plain ``nn.Conv2d``/``nn.Linear`` holding the quantized weights;
    activation quantizers stay and quantize in eval mode.
    """
    data = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} is not a qlight export (format {found!r}; expected {FORMAT!r})")
    model = build_model(data["model"], num_classes=data["num_classes"], **data["model_kwargs"])
    if data["quant"] is not None:
        quantize_model(model, QuantSpec(**data["quant"]))
    freeze_weights(model)
    state = dict(data["state_dict"])
    state.update({k: unpack_weight(p) for k, p in data["packed"].items()})
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()


def main(args: list[str] | None = None) -> Path:
    """``qlight export --ckpt_path C [--output O]``."""
    from jsonargparse import auto_cli

    return auto_cli(
        export_checkpoint,
        args=sys.argv[2:] if args is None else args,
        as_positional=False,
        prog="qlight export",
    )
