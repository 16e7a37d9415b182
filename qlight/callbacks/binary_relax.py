"""BinaryRelax (Yin et al. 2018) as a Lightning callback: train with relaxed quantized weights.

Until ``switch_epoch`` the training forward of every quantized layer uses the relaxed weight

    G = (eta Q(w) + w) / (1 + eta) = lerp(w, Q(w), mix),   mix = eta / (1 + eta),

with eta multiplied by ``eta_growth`` every ``eta_every`` optimizer steps, so G moves toward Q(w);
from ``switch_epoch`` on, mix = 1 (exact quantization). Together with :class:`~qlight.callbacks.BCGD`
this is the authors' 'br' method (relaxation + blending toward G, ``BCGD.md`` §3).

Validation and test always see hard-quantized weights: the layers use Q(w) in eval mode whatever
``mix`` is (the authors' code reported the relaxed accuracy before the switch).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from qlight._lightning_compat import step_logging_due
from qlight.callbacks.bcgd import weight_quantized_layers
from qlight.quant import TensorQuantizer

__all__ = ["BinaryRelax", "relaxation_at"]


def relaxation_at(
    step: int, epoch: int, eta0: float, eta_growth: float, eta_every: int, switch_epoch: int
) -> tuple[float, float]:
    """``(eta, mix)`` at an optimizer step.

    ``eta = eta0 * eta_growth ** (step // eta_every)`` and ``mix = eta / (1 + eta)`` while
    ``epoch < switch_epoch``; ``(inf, 1)`` afterwards (exact Q(w)).

    An eta beyond the float range is inf (mix 1) instead of an ``OverflowError``.
    """
    if epoch >= switch_epoch:
        return math.inf, 1.0
    try:
        eta = eta0 * eta_growth ** (step // eta_every)
    except OverflowError:
        eta = math.inf
    return eta, (1.0 if math.isinf(eta) else eta / (1.0 + eta))


def relaxation_at_authors(
    epoch: int, step_in_epoch: int, steps_per_epoch: int, eta0: float, eta_growth: float, eta_every: int,
    switch_epoch: int,
) -> tuple[float, float]:
    """``(eta, mix)`` of the BCGD authors' counter (``train_net_alpha.py``, ``train_alm1_eta_alpha``).

    Before every batch ``i`` of an epoch with ``i % eta_every == 0`` their code multiplies eta by
    ``eta_growth``, starting from ``eta0`` and restarting the count each epoch, so the first step already uses
    ``eta0·growth``: ``eta = eta0 · growth^(e·m + ⌊i / eta_every⌋ + 1)`` with ``m = ⌈n / eta_every⌉``
    multiplications per epoch of ``n`` steps. CIFAR-10 at batch 128 (n = 391, eta_every = 196):
    ``eta = eta0 · 1.02^(2e + 1 + [i ≥ 196])``. From ``switch_epoch`` on: ``(inf, 1)`` (exact Q(w)).
    """
    if epoch >= switch_epoch:
        return math.inf, 1.0
    per_epoch = math.ceil(steps_per_epoch / eta_every)
    try:
        eta = eta0 * eta_growth ** (epoch * per_epoch + step_in_epoch // eta_every + 1)
    except OverflowError:
        eta = math.inf
    return eta, (1.0 if math.isinf(eta) else eta / (1.0 + eta))


#: how eta's growth is counted: ``steps`` (every eta_every optimizer steps of the run, smooth) or ``authors``
#: (twice per epoch, counted within each epoch, the first multiplication before the epoch's first batch)
ETA_COUNTERS = ("steps", "authors")


class BinaryRelax(Callback):
    """Relaxed quantized weights in the training forward until ``switch_epoch``, then exact ones.

    eta and mix are pure functions of ``trainer.global_step`` and ``trainer.current_epoch``
    (:func:`relaxation_at`), written in place into each weight quantizer's ``mix`` buffer (saved with
    the model) before every training batch, so a resumed run (mid-epoch included) and every DDP rank
    use exactly the same relaxation. Logged as ``binaryrelax/eta`` (inf after the switch) and
    ``binaryrelax/mix``.

    Args:
        eta0: initial eta (authors: 1).
        eta_growth: factor applied every ``eta_every`` optimizer steps (authors: 1.02).
        eta_every: growth period in optimizer steps; None takes ``ceil(steps_per_epoch / 2)`` as the
            authors' code (twice per epoch; 196 for CIFAR-10 at batch 128), resolved at the start of
            training and kept in the callback state so a resumed run keeps the period.
        switch_epoch: first epoch with exact quantization (authors' ``m_epochs``: 150).
        eta_counter: ``steps`` (default): eta grows every ``eta_every`` optimizer steps of the run
            (:func:`relaxation_at`); ``authors``: the authors' counter (:func:`relaxation_at_authors`:
            ``1.02^(2e + 1 + [i ≥ 196])`` on CIFAR-10 at batch 128), which the 'br' recipe uses.
    """

    method_name = "binaryrelax"

    def __init__(
        self,
        eta0: float = 1.0,
        eta_growth: float = 1.02,
        eta_every: int | None = None,
        switch_epoch: int = 150,
        eta_counter: str = "steps",
    ) -> None:
        if not eta0 > 0.0:
            raise ValueError(f"BinaryRelax eta0={eta0!r} must be > 0")
        if not eta_growth > 0.0:
            raise ValueError(f"BinaryRelax eta_growth={eta_growth!r} must be > 0")
        if eta_every is not None and not eta_every >= 1:
            raise ValueError(
                f"BinaryRelax eta_every={eta_every!r} must be a positive number of steps or None"
            )
        if not switch_epoch >= 0:
            raise ValueError(f"BinaryRelax switch_epoch={switch_epoch!r} must be >= 0")
        if eta_counter not in ETA_COUNTERS:
            raise ValueError(f"BinaryRelax eta_counter={eta_counter!r} is not supported; valid: {list(ETA_COUNTERS)}")
        self.eta_counter = eta_counter
        self.steps_per_epoch: int | None = None
        self.eta0 = float(eta0)
        self.eta_growth = float(eta_growth)
        self.eta_every = eta_every
        self.switch_epoch = int(switch_epoch)
        self.resolved_every: int | None = None
        self.eta, self.mix = self.eta0, self.eta0 / (1.0 + self.eta0)
        self._applied: float | None = None
        self._eta: Tensor | None = None
        self._mix: Tensor | None = None
        self._quantizers: list[TensorQuantizer] = []

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":  # only training blends or relaxes
            return
        self._quantizers = [m.weight_quantizer for m in weight_quantized_layers(pl_module, "BinaryRelax")]

    def _steps_per_epoch(self, trainer: Trainer, need: str) -> int:
        batches = trainer.num_training_batches
        if math.isinf(batches):
            raise ValueError(f"BinaryRelax {need} needs a training dataloader with a length; set eta_every")
        return math.ceil(batches / trainer.accumulate_grad_batches)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.eta_every is not None:
            self.resolved_every = self.eta_every
        elif self.resolved_every is None:  # not restored from a checkpoint
            self.resolved_every = max(1, math.ceil(self._steps_per_epoch(trainer, "eta_every=None") / 2))
        if self.eta_counter == "authors" and self.steps_per_epoch is None:
            self.steps_per_epoch = self._steps_per_epoch(trainer, "eta_counter='authors'")
        self._eta = torch.zeros((), device=pl_module.device)
        self._mix = torch.zeros((), device=pl_module.device)
        self._applied = None

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        assert self.resolved_every is not None and self._eta is not None and self._mix is not None
        if self.eta_counter == "authors":
            assert self.steps_per_epoch is not None
            self.eta, self.mix = relaxation_at_authors(
                trainer.current_epoch, batch_idx // trainer.accumulate_grad_batches, self.steps_per_epoch,
                self.eta0, self.eta_growth, self.resolved_every, self.switch_epoch,
            )
        else:
            self.eta, self.mix = relaxation_at(
                trainer.global_step, trainer.current_epoch, self.eta0, self.eta_growth, self.resolved_every,
                self.switch_epoch,
            )
        if self.eta != self._applied:  # Python floats: no device work between changes
            self._eta.fill_(self.eta)
            self._mix.fill_(self.mix)
            with torch.no_grad():
                for q in self._quantizers:
                    q.set_mix(self.mix)
            self._applied = self.eta
        if step_logging_due(trainer, batch_idx):
            pl_module.log("binaryrelax/eta", self._eta, on_step=True, on_epoch=False)
            pl_module.log("binaryrelax/mix", self._mix, on_step=True, on_epoch=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        counter = {"eta_counter": self.eta_counter, "steps_per_epoch": self.steps_per_epoch}
        return {
            "eta0": self.eta0,
            "eta_growth": self.eta_growth,
            "switch_epoch": self.switch_epoch,
            "eta_every": self.resolved_every,
            "eta": self.eta,
            "mix": self.mix,
        } | (counter if self.eta_counter != "steps" else {})

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = (state_dict["eta0"], state_dict["eta_growth"], state_dict["switch_epoch"])
        if saved != (self.eta0, self.eta_growth, self.switch_epoch):
            rank_zero_warn(
                f"BinaryRelax: the checkpoint was trained with (eta0, eta_growth, switch_epoch)={saved}, "
                f"this run uses {(self.eta0, self.eta_growth, self.switch_epoch)}; the schedule continues "
                "with the new values"
            )
        self.resolved_every = state_dict["eta_every"]
        self.eta, self.mix = float(state_dict["eta"]), float(state_dict["mix"])
        if state_dict.get("eta_counter", "steps") != self.eta_counter:
            rank_zero_warn(
                f"BinaryRelax: the checkpoint counted eta with eta_counter="
                f"{state_dict.get('eta_counter', 'steps')!r}, this run uses {self.eta_counter!r}; eta follows "
                "the new counter from the restored step on"
            )
        if self.eta_counter == "authors":
            self.steps_per_epoch = state_dict.get("steps_per_epoch")
