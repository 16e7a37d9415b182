"""A general annealing schedule: a scalar knob as a pure function of the epoch or optimizer step.

AQE's mixing weight alpha, IR-Net's EDE temperature t and similar relaxation knobs (``AQE.md`` §5.1)
are all "start here, end there, along this law". Because the value depends only on
``(epoch, step)``, a resumed run recomputes exactly the value the interrupted run had (no state to
save), and every DDP rank computes the same value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

Law = Literal["constant", "linear", "geometric", "exponential", "step"]
Unit = Literal["epoch", "step"]

LAWS: tuple[Law, ...] = get_args(Law)
UNITS: tuple[Unit, ...] = get_args(Unit)


@dataclass(frozen=True)
class Schedule:
    """``value(epoch, step)`` of an annealed scalar; ``t`` below is the epoch or the global step.

    Laws (``tau = min(t / ramp, 1)``):

    - ``constant``: ``start``.
    - ``linear``: ``start + (end - start) * tau`` (clamped at ``end`` after ``ramp``).
    - ``geometric``: ``start * (end / start) ** tau`` (log-linear; ``start``, ``end`` > 0, same sign).
    - ``exponential``: ``end - (end - start) * gamma ** t`` (approaches ``end`` geometrically, as
      AQE's Thm 3 iteration does; ``ramp`` is unused).
    - ``step``: ``start + inc * floor(t / every)``, capped at ``end`` (a staircase).

    Args:
        law: one of the laws above.
        start: value at ``t = 0``.
        end: value reached after ``ramp`` (linear, geometric), the limit (exponential) or the cap (step).
        ramp: epochs or steps from ``start`` to ``end``; ``None`` uses the run's length
            (``max_epochs`` or the trainer's estimated optimizer steps), as IR-Net's EDE does.
        unit: ``epoch`` holds the value constant within an epoch; ``step`` moves it every optimizer step.
        gamma: per-unit ratio of the ``exponential`` law, in (0, 1].
        inc: increment of the ``step`` law (its sign must point from ``start`` towards ``end``).
        every: epochs or steps between increments of the ``step`` law.
    """

    law: Law = "linear"
    start: float = 0.5
    end: float = 1.0
    ramp: int | None = 100
    unit: Unit = "epoch"
    gamma: float = 0.988
    inc: float = 0.1
    every: int = 1

    def __post_init__(self) -> None:
        if self.law not in LAWS:
            raise ValueError(f"Schedule.law={self.law!r}; valid: {list(LAWS)}")
        if self.unit not in UNITS:
            raise ValueError(f"Schedule.unit={self.unit!r}; valid: {list(UNITS)}")
        if self.ramp is not None and self.ramp <= 0:
            raise ValueError(f"Schedule.ramp={self.ramp} must be a positive number of {self.unit}s or None")
        if self.law == "geometric" and not (self.start * self.end > 0):
            raise ValueError(
                f"Schedule(law='geometric') needs start and end of the same sign, both non-zero; "
                f"got start={self.start}, end={self.end}"
            )
        if self.law == "exponential" and not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"Schedule.gamma={self.gamma} must lie in (0, 1] for law='exponential'")
        if self.law == "step":
            if self.every <= 0:
                raise ValueError(f"Schedule.every={self.every} must be a positive number of {self.unit}s")
            if self.inc * (self.end - self.start) < 0:
                raise ValueError(
                    f"Schedule.inc={self.inc} moves away from end={self.end} (start={self.start}); "
                    "flip its sign"
                )

    def value(self, epoch: int, step: int, total: int | None = None) -> float:
        """The knob at ``epoch`` / global optimizer ``step``.

        Args:
            epoch: current epoch (0-based).
            step: optimizer steps taken so far (``trainer.global_step``).
            total: run length in this schedule's unit; needed only when ``ramp`` is ``None``.
        """
        t = epoch if self.unit == "epoch" else step
        if self.law == "constant":
            return self.start
        if self.law == "exponential":
            return self.end - (self.end - self.start) * self.gamma**t
        if self.law == "step":
            raw = self.start + self.inc * math.floor(t / self.every)
            return min(raw, self.end) if self.end >= self.start else max(raw, self.end)
        ramp = self.ramp if self.ramp is not None else total
        if ramp is None or ramp <= 0:
            raise ValueError(f"Schedule(law={self.law!r}, ramp=None) needs the run length (total={total})")
        tau = min(t / ramp, 1.0)
        if self.law == "linear":
            return self.start + (self.end - self.start) * tau
        return self.start * (self.end / self.start) ** tau


#: AQE R0 (theory-faithful): alpha = 0.5 throughout (``AQE.md`` §1.4).
AQE_R0 = Schedule(law="constant", start=0.5, end=0.5)
#: AQE R1 (figure-faithful, the default): alpha(e) = min(1, 0.5 + 0.5 e / 100), once per epoch.
AQE_R1 = Schedule(law="linear", start=0.5, end=1.0, ramp=100, unit="epoch")
#: AQE R2 (Thm-3 style): alpha(e) = 1 - 0.5 * 0.988^e.
AQE_R2 = Schedule(law="exponential", start=0.5, end=1.0, gamma=0.988, unit="epoch")
#: IR-Net EDE temperature: t_e = 10^(log10 0.1 + (log10 10 - log10 0.1) e / E) with E = max_epochs.
EDE_T = Schedule(law="geometric", start=0.1, end=10.0, ramp=None, unit="epoch")
