"""The training set-ups the speed benchmarks compare, defined once for all of them.

Each variant is a model, a quantization spec, a method and an optimizer, as the shipped recipes use them:
float and W1A4 ResNet-20 (STE = BinaryConnect, and BCGD) with SGD, and ConvNet-D W1A1 with AQE and Adam.
:func:`make_task` builds the LightningModule and callbacks ``qlight fit`` would; :class:`PlainStep` runs the
same step in a hand-written loop (forward, loss, backward, the method's weight edits, optimizer step).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import Callback
from torch import Tensor, nn

from qlight.callbacks import AQE, BCGD
from qlight.callbacks.bcgd import blend_all_
from qlight.callbacks.clip import clip_weights_
from qlight.quant import QuantSpec, clamp_alphas_, quant_acts, quant_layers, set_mix
from qlight.tasks import ImageClassifier
from qlight.tasks.optim import fast_kernels

W1A4 = {"weight": "binary", "act": "relu_quant", "a_bits": 4, "first_layer": "quantized", "last_layer": "float"}
AQE_W1A1 = {
    "weight": "sign", "w_estimator": "aqe", "act": "hardtanh_quant", "a_bits": 1, "a_estimator": "aqe",
    "first_layer": "quantized", "last_layer": "quantized",
}


@dataclass(frozen=True)
class Variant:
    """A model, its quantization, the method callback and the optimizer."""

    model: str
    spec: dict[str, Any] | None
    method: str | None
    optimizer: str

    @property
    def relu_quant(self) -> bool:
        return self.spec is not None and self.spec["act"] == "relu_quant"


VARIANTS: dict[str, Variant] = {
    "float": Variant("resnet20", None, None, "sgd"),
    "w1a4_ste": Variant("resnet20", W1A4, None, "sgd"),
    "w1a4_bcgd": Variant("resnet20", W1A4, "bcgd", "sgd"),
    "convnet_d_aqe_w1a1": Variant("convnet_d", AQE_W1A1, "aqe", "adam"),
}


def optimizer_factory(kind: str) -> functools.partial[torch.optim.Optimizer]:
    """The recipes' optimizers: SGD lr 0.1, momentum 0.95, wd 1e-4 (BCGD); Adam lr 0.01 (AQE)."""
    if kind == "adam":
        return functools.partial(torch.optim.Adam, lr=0.01)
    return functools.partial(torch.optim.SGD, lr=0.1, momentum=0.95, weight_decay=1e-4)


#: small stand-ins for smoke tests (same layers and methods, a fraction of the graph)
TINY_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "resnet20": ("resnet8", {}),
    "convnet_d": ("convnet", {"channels": [8, 16, 16], "fc_width": 32}),
}


def make_task(name: str, tiny: bool = False, **task_kwargs: Any) -> tuple[ImageClassifier, list[Callback]]:
    """The LightningModule and method callbacks of a variant (``task_kwargs``: compile, channels_last, ...).

    ``tiny`` swaps the network for a small one of the same kind (:data:`TINY_MODELS`), for smoke tests.
    """
    v = VARIANTS[name]
    model, model_kwargs = TINY_MODELS[v.model] if tiny else (v.model, {})
    torch.manual_seed(0)
    task = ImageClassifier(
        model=model,
        model_kwargs=model_kwargs,
        quant=QuantSpec(**v.spec) if v.spec is not None else None,
        optimizer=optimizer_factory(v.optimizer),
        alpha_calibration_steps=1 if v.relu_quant else 0,
        alpha_lr_factor=0.1 if v.relu_quant else 1.0,
        **task_kwargs,
    )
    callbacks: list[Callback] = []
    if v.method == "bcgd":
        callbacks.append(BCGD(rho=1e-5))
    elif v.method == "aqe":
        callbacks.append(AQE())
    return task, callbacks


class PlainStep:
    """One training step of a variant in a hand-written loop, using qlight's layers and method functions.

    The BCGD blend, the AQE clip and the alpha projection are the same functions the callbacks and the task
    call; the AQE mixing weight is held at 0.5 (its first-epoch value).
    """

    def __init__(self, name: str, model: nn.Module, device: torch.device, keep_grads: bool = False) -> None:
        self.variant = VARIANTS[name]
        self.model = model
        self.keep_grads = keep_grads  # CUDA graphs replay into the gradient buffers: keep them between steps
        self.optimizer = fast_kernels(optimizer_factory(self.variant.optimizer)(model.parameters()))
        self.layers = [m for _, m in quant_layers(model)]
        self.weights = [m.weight for m in self.layers]
        self.acts = [m for _, m in quant_acts(model)]
        if self.variant.method == "bcgd":
            for layer in self.layers:
                layer.weight_quantizer.keep_training_value = True
        if self.variant.method == "aqe":
            set_mix(model, 0.5)

    def forward_backward(self, x: Tensor, y: Tensor) -> Tensor:
        loss = nn.functional.cross_entropy(self.model(x), y)
        loss.backward()
        return loss.detach()

    def before_step(self) -> None:
        """BCGD's blend (what the callback does in ``on_before_optimizer_step``)."""
        if self.variant.method == "bcgd":
            with torch.no_grad():
                blend_all_(self.weights, [m.training_weight() for m in self.layers], 1e-5)

    def step(self) -> None:
        """The optimizer step and ``zero_grad``."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=not self.keep_grads)

    def after_step(self) -> None:
        """AQE's latent clip (the callback) and the alpha projection (the task)."""
        if self.variant.method == "aqe":
            clip_weights_(self.weights, 1.0)
        if self.acts:
            clamp_alphas_(self.acts)

    def update(self) -> None:
        """Everything after the backward: blend, optimizer step, clip and projection."""
        self.before_step()
        self.step()
        self.after_step()
