"""A callback that holds a training run at a chosen step until the test has signalled it.

Used by the signal tests (``tests/test_interrupt.py``), which start ``qlight fit`` in a subprocess: the
run writes ``<folder>/paused`` when step ``step`` has finished its optimizer update and waits (at most
``timeout`` seconds) until the test, after sending its signal(s), writes ``<folder>/go``. The signal
therefore always lands inside the same step, so the stop point is deterministic.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class PauseAt(Callback):
    def __init__(self, step: int, folder: str, timeout: float = 60.0) -> None:
        self.step = step
        self.folder = Path(folder)
        self.timeout = timeout

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step != self.step:
            return
        (self.folder / "paused").write_text(str(self.step))
        deadline = time.monotonic() + self.timeout
        while not (self.folder / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
