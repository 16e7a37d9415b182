"""BCGD: Blended Coarse Gradient Descent (Yin et al., arXiv 1808.05240) as a Lightning callback.

Once per optimizer step, right before ``optimizer.step()``, every quantized kernel is blended toward
the weight its training forward used::

    w <- (1 - rho) w + rho G,    G = Q(w), or BinaryRelax's relaxed (eta Q(w) + w) / (1 + eta)

The gradient already on ``w`` is the coarse gradient at G (the layers' straight-through estimator
routes dL/dG to w), so the optimizer then applies momentum and weight decay to the BLENDED tensor,
exactly as the authors' code does (``BCGD.md`` §3 item 4)::

    m_t = mu m_{t-1} + grad + lambda B_t,   w_{t+1} = B_t - lr m_t,   B_t = (1 - rho) w_t + rho G_t

rho = 0 is BinaryConnect. The module stays complete without this callback (it only blends).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from qlight.quant import QuantConv2d, QuantLinear, quant_layers

__all__ = ["BCGD", "blend_", "blend_all_", "rho_at", "weight_quantized_layers"]


def rho_at(epoch: int, rho: float, rho_growth: float = 1.0, rho_max: float = 0.01) -> float:
    """The blending weight of an epoch: ``min(rho * rho_growth ** (epoch + 1), rho_max)``.

    The authors' code multiplies at the START of every epoch (``rho <- min(rho_rate * rho, 0.01)``),
    so epoch 0 already uses ``rho * rho_growth``; with ``rho_growth = 1`` rho is constant (capped at
    ``rho_max``).
    """
    try:
        value = rho * rho_growth ** (epoch + 1)
    except OverflowError:
        value = math.inf
    return min(value, rho_max)


def blend_(weight: Tensor, target: Tensor, rho: Tensor | float) -> None:
    """In place ``w <- (1 - rho) w + rho target`` (lerp: exactly ``w`` at rho = 0, no host sync)."""
    weight.lerp_(target, rho.to(weight.dtype) if isinstance(rho, Tensor) else rho)


def blend_all_(weights: list[Tensor], targets: list[Tensor], rho: float) -> None:
    """``blend_`` for every pair in one multi-tensor kernel (``torch._foreach_lerp_``), bit-identical to the loop.

    ``rho`` is a Python number, converted by the kernel to each weight's dtype exactly as a 0-dim ``rho``
    tensor of that dtype would be (so a float64 run blends with 1e-5, not its float32 rounding).
    """
    if weights:
        torch._foreach_lerp_(weights, targets, rho)


def weight_quantized_layers(pl_module: LightningModule, owner: str) -> list[QuantConv2d | QuantLinear]:
    """Every weight-quantized layer of the module; a clear error if there is none."""
    layers = [m for _, m in quant_layers(pl_module)]
    if not layers:
        raise ValueError(
            f"{owner} needs weight-quantized layers (QuantConv2d/QuantLinear), but "
            f"{type(pl_module).__name__} has none; give the model a quantization spec "
            "(e.g. model.init_args.quant.weight: binary) or drop the callback"
        )
    return layers


class BCGD(Callback):
    """Blend every quantized kernel toward its quantization once per optimizer step (BCGD).

    The rho schedule is a pure function of ``trainer.current_epoch`` (:func:`rho_at`), so resuming
    from any checkpoint, mid-epoch included, continues it exactly and every DDP rank computes the same
    value. The current value lives in a 0-dim tensor on the module's device, is logged as
    ``bcgd/rho`` and saved in the callback state.

    Args:
        rho: blending weight rho_0 (the authors' README: 1e-5), at most ``rho_max``. 0 gives
            BinaryConnect.
        rho_growth: factor applied at the start of every epoch (authors' ``rho_rate``; 1 keeps rho
            constant, their function default 1.01 grows it toward ``rho_max``).
        rho_max: cap of the schedule (authors: 0.01).
    """

    method_name = "bcgd"

    def __init__(self, rho: float = 1e-5, rho_growth: float = 1.0, rho_max: float = 0.01) -> None:
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"BCGD rho={rho!r} must lie in [0, 1]")
        if not rho_growth > 0.0:
            raise ValueError(f"BCGD rho_growth={rho_growth!r} must be > 0")
        if not 0.0 <= rho_max <= 1.0:
            raise ValueError(f"BCGD rho_max={rho_max!r} must lie in [0, 1]")
        if rho > rho_max:
            raise ValueError(
                f"BCGD rho={rho!r} exceeds rho_max={rho_max!r}, which would cap it; raise rho_max"
            )
        self.rho = float(rho)
        self.rho_growth = float(rho_growth)
        self.rho_max = float(rho_max)
        self.value = rho_at(0, self.rho, self.rho_growth, self.rho_max)
        self._rho: Tensor | None = None
        self._logged_epoch: int | None = None
        self._layers: list[QuantConv2d | QuantLinear] = []
        self._weights: list[Tensor] = []
        self._weight_keys: list[tuple[int, int]] | None = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":  # only training blends or relaxes
            return
        self._layers = weight_quantized_layers(pl_module, "BCGD")
        self._weights = [layer.weight for layer in self._layers]
        for layer in self._layers:  # the blend targets the exact tensor each training forward used
            layer.weight_quantizer.keep_training_value = True

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for layer in self._layers:
            layer.weight_quantizer.keep_training_value = False
            layer.weight_quantizer.forget_training_value()

    def _update(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.value = rho_at(trainer.current_epoch, self.rho, self.rho_growth, self.rho_max)
        dtype = self._layers[0].weight.dtype if self._layers else torch.float32
        device = self._layers[0].weight.device if self._layers else pl_module.device
        if self._rho is None or self._rho.device != device or self._rho.dtype != dtype:
            self._rho = torch.zeros((), device=device, dtype=dtype)
        self._rho.fill_(self.value)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # also covers a mid-epoch resume, where on_train_epoch_start does not run
        self._update(trainer, pl_module)
        self._logged_epoch = None

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._update(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx % trainer.accumulate_grad_batches == 0 or self._weight_keys is None:
            # a new optimizer step: only its own forward may provide the blend targets
            for layer in self._layers:
                layer.weight_quantizer.forget_training_value()
            self._weight_keys = [(w._version, w.data_ptr()) for w in self._weights]
        if self._logged_epoch != trainer.current_epoch and self._rho is not None:  # constant in an epoch: log once
            pl_module.log("bcgd/rho", self._rho, on_step=False, on_epoch=True, batch_size=1)
            self._logged_epoch = trainer.current_epoch

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """``w <- lerp(w, G, rho)`` for every quantized kernel in one multi-tensor kernel.

        ``G`` is the tensor the training forward used, kept by the layer (see
        :meth:`~qlight.quant.QuantConv2d.training_weight`). It stays the right target: under gradient
        accumulation every micro-batch of a step sees the same weights (they change only in the step), so the
        last forward's tensor is the one all of them used; validation runs in eval mode and keeps nothing, and
        runs between steps, after this blend; and if anything wrote a weight in place since its forward (a
        callback, ``load_state_dict``), the layer's version check notices and ``G`` is recomputed from the
        current weight, as it was before tensors were kept. A compiled forward keeps its tensor without the
        version (reading it would recompile every step); the step-start snapshot of the weights' versions
        taken here vouches for it instead.
        """
        if self.value == 0.0:  # BinaryConnect: lerp with weight 0 leaves w unchanged anyway
            return
        # weights unwritten since the step began: a kept tensor (also one from a compiled forward) is this step's
        unchanged = self._weight_keys == [(w._version, w.data_ptr()) for w in self._weights]
        with torch.no_grad():
            targets = [layer.training_weight(fresh=unchanged) for layer in self._layers]
            blend_all_(self._weights, targets, self.value)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"rho": self.rho, "rho_growth": self.rho_growth, "rho_max": self.rho_max, "value": self.value}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = (state_dict["rho"], state_dict["rho_growth"], state_dict["rho_max"])
        if saved != (self.rho, self.rho_growth, self.rho_max):
            rank_zero_warn(
                f"BCGD: the checkpoint was trained with (rho, rho_growth, rho_max)={saved}, this run uses "
                f"{(self.rho, self.rho_growth, self.rho_max)}; the schedule continues with the new values"
            )
        self.value = float(state_dict["value"])
