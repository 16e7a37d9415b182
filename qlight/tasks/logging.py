"""When to call ``self.log`` in the training step: on the steps whose values Lightning writes.

Every ``LightningModule.log`` call costs Lightning about half a millisecond of Python (it moves its
result record to the value's device), which is a large share of a CIFAR ResNet-20 step on a GPU.
Values logged ``on_step`` reach the loggers only every ``log_every_n_steps``, so logging on the
other steps buys nothing but ``callback_metrics`` freshness; the epoch's last batch is logged too so
``callback_metrics`` ends each epoch current. Lightning's ``LearningRateMonitor`` gates on the same
flag.
"""

from __future__ import annotations

from lightning.pytorch import Trainer

__all__ = ["step_logging_due", "step_values_written"]


def step_logging_due(trainer: Trainer, batch_idx: int) -> bool:
    """True on the training batches whose ``on_step`` values get written, and on the epoch's last one.

    With gradient accumulation, only batches that end in an optimizer step qualify: Lightning writes
    step values only there, so a mean over a logging window covers all its micro-batches.
    """
    last = batch_idx + 1 >= trainer.num_training_batches
    if not (last or (batch_idx + 1) % trainer.accumulate_grad_batches == 0):
        return False
    connector = getattr(trainer, "_logger_connector", None)
    return last or connector is None or connector.should_update_logs


def step_values_written(trainer: Trainer) -> bool:
    """Whether Lightning writes the values logged ``on_step`` in the current training step."""
    connector = getattr(trainer, "_logger_connector", None)
    return connector is None or connector.should_update_logs
