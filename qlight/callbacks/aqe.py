"""AQE (Chen et al. 2020, ``AQE.md`` §1) as a callback: anneal the mixing weight α, clip the latent weights.

Training forward ``x̂ = α·h(x) + (1 − α)·x``, backward ``2α·g·1{|x| ≤ 1}`` (the ``aqe`` estimator of
:mod:`qlight.quant`), evaluation with ``h``; α follows the R1 ramp ``min(1, 0.5 + 0.5·e/100)`` by default;
after every optimizer step the latent weights are clipped to [−1, 1] (Algorithm 1). The callback is both a
:class:`~qlight.callbacks.knobs.ScheduledKnobs` (α) and a :class:`~qlight.callbacks.clip.LatentWeightClip`
(the clip): their ``__init__`` and hooks cooperate through ``super()``, so neither forwards the other's.
"""

from __future__ import annotations

from lightning.pytorch import LightningModule
from torch import Tensor
from typing_extensions import override

from qlight.callbacks.clip import LatentWeightClip
from qlight.callbacks.knobs import Knob, ScheduledKnobs
from qlight.callbacks.schedules import AQE_R1, Schedule
from qlight.quant import AQEEstimator, quant_layers, tensor_quantizers

__all__ = ["AQE"]


class AQE(ScheduledKnobs, LatentWeightClip):
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
    requires_weights = False  # AQE on the inputs only (float weights) has nothing to clip

    def __init__(
        self, alpha: Schedule = AQE_R1, input_alpha: Schedule | None = None, clip_weights: bool = True
    ) -> None:
        super().__init__(bound=1.0)  # ScheduledKnobs, then LatentWeightClip (the MRO), each once
        for name, s in (("alpha", alpha), ("input_alpha", input_alpha)):
            if s is not None and not 0.0 <= min(s.start, s.end) <= max(s.start, s.end) <= 1.0:
                raise ValueError(f"AQE {name} must stay in [0, 1]; got start={s.start}, end={s.end}")
        self.alpha = alpha
        self.input_alpha = input_alpha
        self.clip_weights = clip_weights

    @override
    def schedules(self) -> dict[str, Schedule]:
        out = {"alpha": self.alpha}
        if self.input_alpha is not None:
            out["alpha_input"] = self.input_alpha
        return out

    @override
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

    @override
    def select(self, pl_module: LightningModule) -> list[Tensor]:
        """Clip only the layers whose weight quantizer uses the ``aqe`` estimator (none without ``clip_weights``)."""
        if not self.clip_weights:
            return []
        return [
            layer.weight
            for _, layer in quant_layers(pl_module)
            if isinstance(layer.weight_quantizer.estimator, AQEEstimator)
        ]

    @override
    def _nothing_to_control(self, pl_module: LightningModule) -> str:
        return (
            f"AQE found no quantizer with the 'aqe' estimator in {type(pl_module).__name__}; set "
            "model.init_args.quant.w_estimator and/or a_estimator to 'aqe' (act: hardtanh_quant for inputs)"
        )
