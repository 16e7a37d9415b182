"""Count the ATen ops (and host syncs) each training batch runs, with a ``TorchDispatchMode``.

Every op that reaches the dispatcher is counted, forward and backward, including those of optimizers and
callbacks; host synchronisations show up as ``aten._local_scalar_dense`` (``.item()``, ``bool(t)``) or as a
copy to the CPU. Use :class:`BatchOps` as the FIRST callback and run ``trainer.fit`` inside ``with counter``;
the counts of a batch then cover its ``on_train_batch_start`` up to the next batch's.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils._python_dispatch import TorchDispatchMode

HOST_SYNC = "aten._local_scalar_dense"


class OpCounter(TorchDispatchMode):
    """ATen op counts per ``(epoch, batch_idx)``; ops outside any batch go to ``None``."""

    def __init__(self) -> None:
        super().__init__()
        self.batch: tuple[int, int] | None = None
        self.counts: dict[tuple[int, int] | None, Counter[str]] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.counts.setdefault(self.batch, Counter())[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


class BatchOps(Callback):
    """Tell an :class:`OpCounter` which batch runs now."""

    def __init__(self, counter: OpCounter) -> None:
        self.counter = counter

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.counter.batch = (trainer.current_epoch, batch_idx)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.counter.batch = None
