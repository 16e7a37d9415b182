"""Training speed as a researcher quotes it: warm-up (compilation, CUDA-graph capture) apart from steady state.

A compiled run spends its first steps compiling and capturing graphs; averaging them into the epoch time
hides both the one-off cost and the speed that matters for a 200-epoch run. This callback times

- ``time/warmup_s``: the first ``warmup_steps`` training steps of the run (logged once),
- ``time/epoch_s``: each epoch's training steps, warm-up steps excluded (validation excluded),
- ``time/images_per_s``: training images per second over those steady steps,

reading the clock only at the warm-up boundary and at epoch ends (after a device synchronisation there, so
queued kernels are counted), never inside a step. Logged to the loggers and kept in :attr:`records`.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

__all__ = ["Throughput"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Throughput(Callback):
    """Log warm-up time apart from steady-state epoch time and images per second.

    Args:
        warmup_steps: training steps counted as warm-up at the start of the run (and of a resumed run):
            compilation and graph capture happen there. 0 measures everything as steady state.
    """

    def __init__(self, warmup_steps: int = 10) -> None:
        if warmup_steps < 0:
            raise ValueError(f"Throughput warmup_steps={warmup_steps!r} must be >= 0")
        self.warmup_steps = int(warmup_steps)
        self.records: list[dict[str, float]] = []
        self.warmup_s: float | None = None
        self._run_start = 0.0
        self._epoch_start: float | None = None
        self._steps_seen = 0
        self._images = 0
        self._steady_batches = 0
        self._paused: float | None = None

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._steps_seen = 0
        self.warmup_s = None
        _sync(pl_module.device)
        self._run_start = time.perf_counter()

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._images = 0
        self._steady_batches = 0
        self._epoch_start = time.perf_counter() if self.warmup_s is not None or self.warmup_steps == 0 else None
        if self.warmup_steps == 0 and self.warmup_s is None:
            self.warmup_s = 0.0

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._steps_seen += 1
        if self.warmup_s is None:
            if self._steps_seen >= self.warmup_steps:
                _sync(pl_module.device)
                now = time.perf_counter()
                self.warmup_s = now - self._run_start
                self._epoch_start = now
                pl_module.log("time/warmup_s", self.warmup_s, on_step=False, on_epoch=True, batch_size=1)
            return
        self._steady_batches += 1
        self._images += _batch_size(batch)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._epoch_start is None or self._steady_batches == 0:
            return
        _sync(pl_module.device)
        seconds = time.perf_counter() - self._epoch_start
        record = {
            "epoch": float(trainer.current_epoch),
            "epoch_s": seconds,
            "steady_steps": float(self._steady_batches),
            "images_per_s": self._images / seconds if seconds > 0 else float("nan"),
        }
        self.records.append(record)
        pl_module.log_dict(
            {"time/epoch_s": seconds, "time/images_per_s": record["images_per_s"]},
            on_step=False, on_epoch=True, batch_size=1,
        )

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # validation during fit (at the epoch's end or every val_check_interval) is not training time
        if self._epoch_start is not None:
            _sync(pl_module.device)
            self._paused = time.perf_counter()

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._paused is not None and self._epoch_start is not None:
            _sync(pl_module.device)
            self._epoch_start += time.perf_counter() - self._paused
        self._paused = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"warmup_steps": self.warmup_steps}


def _batch_size(batch: Any) -> int:
    first = batch[0] if isinstance(batch, list | tuple) else batch
    return int(first.shape[0]) if isinstance(first, torch.Tensor) else 0
