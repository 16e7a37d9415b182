"""Scheduled knobs: annealing callbacks that write scalars into buffers the quantized layers own.

AQE's mixing weight α, IR-Net's EDE temperature t and similar relaxation knobs (``AQE.md`` §5.1) are scalars the
layers already hold as 0-dim buffers (``TensorQuantizer.mix``, the ``ede`` estimator's ``t`` and ``k``): the model
is complete and evaluable without the callbacks (``DESIGN.md`` contract 1), and the buffers land in every
checkpoint. Each knob is a pure function of ``(current_epoch, global_step)``
(:class:`~qlight.callbacks.schedules.Schedule`), written when its value changes, so a resumed run (mid-epoch
included) and every DDP rank see the same values.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from qlight._lightning_compat import step_logging_due
from qlight.callbacks.schedules import Schedule

__all__ = ["Knob", "ScheduledKnobs"]


@dataclass(frozen=True)
class Knob:
    """One scheduled scalar and the 0-dim buffers it is written into.

    ``transform`` maps the schedule's value to this knob's (EDE's ``k = max(1/t, 1)`` follows ``t``).
    ``setters``, when given, write the value instead of ``buffer.fill_`` (one per buffer), e.g.
    :meth:`~qlight.quant.TensorQuantizer.set_mix`, which also lets the quantizer skip its ``lerp`` at 1.
    """

    name: str
    schedule: Schedule
    buffers: tuple[Tensor, ...]
    transform: Callable[[float], float] | None = None
    setters: tuple[Callable[[float], None], ...] | None = None

    def value(self, epoch: int, step: int, total: int | None) -> float:
        """The knob's value at ``(epoch, step)`` of a run ``total`` epochs or steps long."""
        v = self.schedule.value(epoch, step, total)
        return self.transform(v) if self.transform is not None else v

    def write(self, value: float) -> None:
        """Write ``value`` into every buffer (no host sync)."""
        if self.setters is not None:
            for setter in self.setters:
                setter(value)
        else:
            for buf in self.buffers:
                buf.fill_(value)


def _run_length(trainer: Trainer, unit: str) -> int | None:
    """Epochs or optimizer steps of the whole run (for schedules with ``ramp=None``); None if unbounded."""
    if unit == "epoch":
        return trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
    steps = trainer.estimated_stepping_batches
    return int(steps) if math.isfinite(steps) else None


class ScheduledKnobs(Callback):
    """Base of annealing callbacks: write each :class:`Knob` into its buffers and log it.

    Subclasses build their knobs in :meth:`build_knobs` (called in ``setup``). Values are written at
    ``on_train_start`` (after a checkpoint restored epoch and step, also mid-epoch, where
    ``on_train_epoch_start`` does not run), at every epoch start and, for per-step schedules, every batch.
    Each knob is logged as ``<method_name>/<knob>`` from its first buffer (a device tensor: no host sync).
    """

    method_name = ""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # cooperative: a subclass may combine this with another base (AQE: the clip)
        self.knobs: list[Knob] = []
        self.current: dict[str, float] = {}
        self._per_step = False
        self._totals: dict[str, int | None] = {}
        self._logged_epoch: int | None = None

    def build_knobs(self, pl_module: LightningModule) -> list[Knob]:
        """The knobs this callback schedules in ``pl_module`` (called in ``setup`` for fit)."""
        raise NotImplementedError

    def schedules(self) -> dict[str, Schedule]:
        """The configured schedules by name (echoed into checkpoints)."""
        raise NotImplementedError

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self.knobs = [k for k in self.build_knobs(pl_module) if k.buffers]
        if not self.knobs:
            raise ValueError(self._nothing_to_control(pl_module))
        self._per_step = any(k.schedule.unit == "step" for k in self.knobs)

    def _nothing_to_control(self, pl_module: LightningModule) -> str:
        return f"{type(self).__name__} found nothing to schedule in {type(pl_module).__name__}"

    @torch.no_grad()
    def _apply(self, trainer: Trainer) -> None:
        epoch, step = trainer.current_epoch, trainer.global_step
        for knob in self.knobs:
            value = knob.value(epoch, step, self._totals.get(knob.schedule.unit))
            if self.current.get(knob.name) != value:
                knob.write(value)
                self.current[knob.name] = value

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.current = {}  # the checkpoint may have replaced the buffers' values: write them all
        self._logged_epoch = None
        units = {k.schedule.unit for k in self.knobs if k.schedule.ramp is None}
        self._totals = {unit: _run_length(trainer, unit) for unit in units}
        self._apply(trainer)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._apply(trainer)

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self._per_step:
            self._apply(trainer)
        # per-epoch knobs once per epoch; per-step knobs on the steps whose values get written
        new_epoch = self._logged_epoch != trainer.current_epoch
        step_due = self._per_step and step_logging_due(trainer, batch_idx)
        for knob in self.knobs:
            per_step = knob.schedule.unit == "step"
            if step_due if per_step else new_epoch:
                pl_module.log(
                    f"{self.method_name}/{knob.name}", knob.buffers[0], on_step=per_step, on_epoch=not per_step,
                    batch_size=1,
                )
        self._logged_epoch = trainer.current_epoch

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"schedules": {k: dataclasses.asdict(s) for k, s in self.schedules().items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("schedules", {})
        now = {k: dataclasses.asdict(s) for k, s in self.schedules().items()}
        if saved != now:
            rank_zero_warn(
                f"{type(self).__name__}: the checkpoint was trained with schedules {saved}, "
                f"this run uses {now}; the knobs follow the new schedules from the restored epoch/step on"
            )
