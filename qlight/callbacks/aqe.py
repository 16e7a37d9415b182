"""AQE and IR-Net's EDE as callbacks on one annealing machinery, plus AQE's latent weight clipping.

Both methods only *schedule* knobs the quantized layers already own as 0-dim buffers
(``TensorQuantizer.mix`` is AQE's alpha; the ``ede`` estimator's ``t`` and ``k``): the model is
complete and evaluable without the callbacks (``DESIGN.md`` contract 1), and the buffers land in
every checkpoint. Each knob is a pure function of ``(current_epoch, global_step)``
(:class:`~qlight.callbacks.schedules.Schedule`), written with ``.fill_()`` when its value changes, so
a resumed run (mid-epoch included) and every DDP rank see the same values.

AQE (``AQE.md`` §1): training forward ``x̂ = α·h(x) + (1 − α)·x``, backward ``2α·g·1{|x| ≤ 1}``
(the ``aqe`` estimator of :mod:`qlight.quant`), evaluation with ``h``; alpha follows the R1 ramp
``min(1, 0.5 + 0.5·e/100)`` by default; after every optimizer step the latent weights are clipped to
[−1, 1] (Algorithm 1).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from qlight.callbacks.schedules import AQE_R1, EDE_T, Schedule
from qlight.quant import AQE as AQEEstimator
from qlight.quant import EDE as EDEEstimator
from qlight.quant import quant_layers, tensor_quantizers
from qlight.tasks.logging import step_logging_due

__all__ = ["AQE", "EDE", "Knob", "LatentWeightClip", "ScheduledKnobs", "clip_weights_"]


@torch.no_grad()
def clip_weights_(weights: Sequence[Tensor], bound: float = 1.0) -> None:
    """In place ``w ← clamp(w, −bound, bound)`` (AQE Algorithm 1 keeps latent weights in [−1, 1]).

    Two multi-tensor kernels for all weights instead of one per tensor (launches dominate small steps).
    """
    weights = list(weights)
    if weights:
        torch._foreach_clamp_min_(weights, -bound)
        torch._foreach_clamp_max_(weights, bound)


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

    def __init__(self) -> None:
        self.knobs: list[Knob] = []
        self.current: dict[str, float] = {}
        self._per_step = False
        self._totals: dict[str, int | None] = {}
        self._logged_epoch: int | None = None

    def build_knobs(self, pl_module: LightningModule) -> list[Knob]:
        raise NotImplementedError

    def schedules(self) -> dict[str, Schedule]:
        """The configured schedules by name (echoed into checkpoints)."""
        raise NotImplementedError

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
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

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.current = {}  # the checkpoint may have replaced the buffers' values: write them all
        self._logged_epoch = None
        units = {k.schedule.unit for k in self.knobs if k.schedule.ramp is None}
        self._totals = {unit: _run_length(trainer, unit) for unit in units}
        self._apply(trainer)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply(trainer)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
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

    def state_dict(self) -> dict[str, Any]:
        return {"schedules": {k: dataclasses.asdict(s) for k, s in self.schedules().items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("schedules", {})
        now = {k: dataclasses.asdict(s) for k, s in self.schedules().items()}
        if saved != now:
            rank_zero_warn(
                f"{type(self).__name__}: the checkpoint was trained with schedules {saved}, "
                f"this run uses {now}; the knobs follow the new schedules from the restored epoch/step on"
            )


class LatentWeightClip(Callback):
    """Clamp the latent weights of quantized layers to [−bound, bound] once per optimizer step.

    Runs in ``on_train_batch_end`` guarded by ``global_step`` (it fires on every batch, but
    ``global_step`` only moves on real optimizer steps, e.g. every k batches under
    ``accumulate_grad_batches=k``), and once at ``on_train_start`` so that a float initialisation
    (``model.init_from``) starts inside the box. Use it alone for BNN-style STE baselines; the
    :class:`AQE` callback includes it (``clip_weights``).

    Args:
        bound: the box half-width (BNN and AQE: 1).
    """

    def __init__(self, bound: float = 1.0) -> None:
        if not bound > 0:
            raise ValueError(f"LatentWeightClip bound={bound!r} must be > 0")
        self.bound = float(bound)
        self.weights: list[Tensor] = []
        self._clipped_step = -1

    def select(self, pl_module: LightningModule) -> list[Tensor]:
        """The latent weights to clip: those of every weight-quantized layer."""
        return [layer.weight for _, layer in quant_layers(pl_module)]

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.weights = self.select(pl_module)
        if not self.weights:
            raise ValueError(
                f"{type(self).__name__} found no weight-quantized layer to clip in "
                f"{type(pl_module).__name__}; give the model weight quantization "
                "(model.init_args.quant.weight) or drop the callback"
            )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._clipped_step = trainer.global_step
        clip_weights_(self.weights, self.bound)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step > self._clipped_step:
            clip_weights_(self.weights, self.bound)
            self._clipped_step = trainer.global_step


class _AQEWeightClip(LatentWeightClip):
    """The AQE callback's clipper: only layers whose weight quantizer uses the ``aqe`` estimator."""

    def select(self, pl_module: LightningModule) -> list[Tensor]:
        return [
            layer.weight
            for _, layer in quant_layers(pl_module)
            if isinstance(layer.weight_quantizer.estimator, AQEEstimator)
        ]


class AQE(ScheduledKnobs):
    """Anneal the AQE mixing weight alpha of every ``aqe``-estimated quantizer; clip latent weights.

    alpha is written into ``TensorQuantizer.mix`` of the weight quantizers (N-bit weights) and of the
    MINW-Net input quantizers (``QuantHardtanh``, M-bit inputs) whose estimator is ``aqe``. The model's
    quantization spec chooses h (``sign``/``ternary_unit``/``pow2_unit``) and the backward rule
    (``w_estimator_kwargs``/``a_estimator_kwargs: {backward_rule: eq18|alg1|autograd}``).

    Args:
        alpha: schedule of alpha; default R1 (figure-faithful): ``min(1, 0.5 + 0.5·e/100)`` per epoch.
            R0: ``{law: constant, start: 0.5}``;
            R2: ``{law: exponential, start: 0.5, end: 1.0, gamma: 0.988}``.
        input_alpha: a separate schedule for the input (activation) quantizers; None: they follow ``alpha``.
        clip_weights: clamp the latent weights of AQE-quantized layers to [−1, 1] after every optimizer
            step (AQE Algorithm 1).

    Logged: ``aqe/alpha`` (and ``aqe/alpha_input`` with a separate input schedule).
    """

    method_name = "aqe"

    def __init__(
        self, alpha: Schedule = AQE_R1, input_alpha: Schedule | None = None, clip_weights: bool = True
    ) -> None:
        super().__init__()
        for name, s in (("alpha", alpha), ("input_alpha", input_alpha)):
            if s is not None and not 0.0 <= min(s.start, s.end) <= max(s.start, s.end) <= 1.0:
                raise ValueError(f"AQE {name} must stay in [0, 1]; got start={s.start}, end={s.end}")
        self.alpha = alpha
        self.input_alpha = input_alpha
        self.clipper = _AQEWeightClip(1.0) if clip_weights else None

    def schedules(self) -> dict[str, Schedule]:
        out = {"alpha": self.alpha}
        if self.input_alpha is not None:
            out["alpha_input"] = self.input_alpha
        return out

    def build_knobs(self, pl_module: LightningModule) -> list[Knob]:
        def knob(name: str, schedule: Schedule, role: str) -> Knob:
            quantizers = [
                q for _, q in tensor_quantizers(pl_module, role)  # type: ignore[arg-type]
                if isinstance(q.estimator, AQEEstimator)
            ]
            return Knob(name, schedule, tuple(q.mix for q in quantizers), setters=tuple(q.set_mix for q in quantizers))

        if self.input_alpha is None:
            return [knob("alpha", self.alpha, "all")]
        return [knob("alpha", self.alpha, "weight"), knob("alpha_input", self.input_alpha, "act")]

    def _nothing_to_control(self, pl_module: LightningModule) -> str:
        return (
            f"AQE found no quantizer with the 'aqe' estimator in {type(pl_module).__name__}; set "
            "model.init_args.quant.w_estimator and/or a_estimator to 'aqe' (act: hardtanh_quant for inputs)"
        )

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.clipper is not None:
            self.clipper.weights = self.clipper.select(pl_module)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.clipper is not None:
            self.clipper.on_train_start(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.clipper is not None:
            self.clipper.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class EDE(ScheduledKnobs):
    """IR-Net's error-decay estimator schedule (``AQE.md`` §5) on the same machinery as :class:`AQE`.

    Writes ``t`` and ``k = max(1/t, 1)`` into every ``ede`` estimator (weights and activations), whose
    backward is ``k·t·sech²(t·x)·g``. Default:
    ``t_e = 10^(log10 0.1 + (log10 10 − log10 0.1)·e/E)`` with ``E = max_epochs`` (IR-Net's VGG-small
    code; its ResNet-20 code starts at ``t = 1e-3``).

    Args:
        t: schedule of the temperature t (``ramp: null`` spans the run's ``max_epochs``).

    Logged: ``ede/t`` and ``ede/k``.
    """

    method_name = "ede"

    def __init__(self, t: Schedule = EDE_T) -> None:
        super().__init__()
        if not min(t.start, t.end) > 0:
            raise ValueError(f"EDE t must stay > 0; got start={t.start}, end={t.end}")
        self.t = t

    def schedules(self) -> dict[str, Schedule]:
        return {"t": self.t}

    def build_knobs(self, pl_module: LightningModule) -> list[Knob]:
        quantizers = tensor_quantizers(pl_module)
        estimators = [q.estimator for _, q in quantizers if isinstance(q.estimator, EDEEstimator)]
        return [
            Knob("t", self.t, tuple(e.t for e in estimators)),
            Knob("k", self.t, tuple(e.k for e in estimators), _irnet_k),
        ]

    def _nothing_to_control(self, pl_module: LightningModule) -> str:
        return (
            f"EDE found no quantizer with the 'ede' estimator in {type(pl_module).__name__}; set "
            "model.init_args.quant.w_estimator and/or a_estimator to 'ede'"
        )


def _irnet_k(t: float) -> float:
    """IR-Net: ``k = 1/t`` while ``t < 1``, else 1 (so the surrogate's slope at 0, k·t, starts at 1)."""
    return max(1.0 / t, 1.0)
