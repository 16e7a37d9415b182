"""Latent weight clipping: keep the float weights of quantized layers inside [−bound, bound].

AQE's Algorithm 1 and BNN-style STE baselines clip the latent weights after every optimizer step, so that a
weight far outside the quantizer's range cannot stall there (its sign or level would never change again).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from qlight.quant import quant_layers

__all__ = ["LatentWeightClip", "clip_weights_"]


@torch.no_grad()
def clip_weights_(weights: Sequence[Tensor], bound: float = 1.0) -> None:
    """In place ``w ← clamp(w, −bound, bound)`` (AQE Algorithm 1 keeps latent weights in [−1, 1]).

    Two multi-tensor kernels for all weights instead of one per tensor (launches dominate small steps).
    """
    weights = list(weights)
    if weights:
        torch._foreach_clamp_min_(weights, -bound)
        torch._foreach_clamp_max_(weights, bound)


class LatentWeightClip(Callback):
    """Clamp the latent weights of quantized layers to [−bound, bound] once per optimizer step.

    Runs in ``on_train_batch_end`` guarded by ``global_step`` (it fires on every batch, but
    ``global_step`` only moves on real optimizer steps, e.g. every k batches under
    ``accumulate_grad_batches=k``), and once at ``on_train_start`` so that a float initialisation
    (``model.init_from``) starts inside the box. Use it alone for BNN-style STE baselines; the
    :class:`~qlight.callbacks.AQE` callback is one too (``clip_weights``). The hooks call ``super()``, so a
    callback can combine this with another base class.

    Args:
        bound: the box half-width (BNN and AQE: 1).
    """

    #: whether finding no weight to clip is an error (a standalone clip is useless without them)
    requires_weights = True

    def __init__(self, bound: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not bound > 0:
            raise ValueError(f"LatentWeightClip bound={bound!r} must be > 0")
        self.bound = float(bound)
        self.weights: list[Tensor] = []
        self._clipped_step = -1

    def select(self, pl_module: LightningModule) -> list[Tensor]:
        """The latent weights to clip: those of every weight-quantized layer (subclasses narrow it)."""
        return [layer.weight for _, layer in quant_layers(pl_module)]

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self.weights = self.select(pl_module)
        if not self.weights and self.requires_weights:
            raise ValueError(
                f"{type(self).__name__} found no weight-quantized layer to clip in "
                f"{type(pl_module).__name__}; give the model weight quantization "
                "(model.init_args.quant.weight) or drop the callback"
            )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._clipped_step = trainer.global_step
        clip_weights_(self.weights, self.bound)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.global_step > self._clipped_step:
            clip_weights_(self.weights, self.bound)
            self._clipped_step = trainer.global_step
