"""Helpers for the grid tests, importable by the ``qlight fit`` processes a grid starts (``tests/`` is put
on their ``PYTHONPATH``)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

KILL_FLAG_ENV = "QLIGHT_TEST_KILL_FLAG"


class KillOnce(Callback):
    """SIGKILL this process at the second batch of epoch 1, if ``$QLIGHT_TEST_KILL_FLAG`` names a file that
    holds this run's ``QLIGHT_RUN_ID``; the file is deleted first, so the re-run is not killed again.

    Epoch 0 has ended by then, so ``last.ckpt`` exists: a real crash mid-way through a run.
    """

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        flag = os.environ.get(KILL_FLAG_ENV)
        if not flag or trainer.current_epoch != 1 or batch_idx != 1:
            return
        path = Path(flag)
        if path.is_file() and path.read_text().strip() == os.environ.get("QLIGHT_RUN_ID"):
            path.unlink()
            os.kill(os.getpid(), signal.SIGKILL)
