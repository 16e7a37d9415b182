"""IR-Net's error-decay estimator schedule (Qin et al. 2020, ``AQE.md`` §5) on the scheduled-knob machinery."""

from __future__ import annotations

from lightning.pytorch import LightningModule
from typing_extensions import override

from qlight.callbacks.knobs import Knob, ScheduledKnobs
from qlight.callbacks.schedules import EDE_T, Schedule
from qlight.quant import EDEEstimator, tensor_quantizers

__all__ = ["EDE"]


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

    @override
    def schedules(self) -> dict[str, Schedule]:
        return {"t": self.t}

    @override
    def build_knobs(self, pl_module: LightningModule) -> list[Knob]:
        quantizers = tensor_quantizers(pl_module)
        estimators = [q.estimator for _, q in quantizers if isinstance(q.estimator, EDEEstimator)]
        return [
            Knob("t", self.t, tuple(e.t for e in estimators)),
            Knob("k", self.t, tuple(e.k for e in estimators), _irnet_k),
        ]

    @override
    def _nothing_to_control(self, pl_module: LightningModule) -> str:
        return (
            f"EDE found no quantizer with the 'ede' estimator in {type(pl_module).__name__}; set "
            "model.init_args.quant.w_estimator and/or a_estimator to 'ede'"
        )


def _irnet_k(t: float) -> float:
    """IR-Net: ``k = 1/t`` while ``t < 1``, else 1 (so the surrogate's slope at 0, k·t, starts at 1)."""
    return max(1.0 / t, 1.0)
