"""The Lightning internals qlight relies on exist in the installed Lightning and mean what qlight assumes.

When a Lightning release moves one, these tests fail naming ``qlight/_lightning_compat.py``, the one module
to update (and the version bound in ``pyproject.toml`` to raise).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.demos.boring_classes import BoringModel

from qlight import _lightning_compat as compat


def test_every_internal_exists_in_the_installed_lightning() -> None:
    missing = compat.missing_internals()
    assert not missing, "\n".join(missing)


def test_a_moved_internal_fails_naming_the_module() -> None:
    with pytest.raises(compat.LightningInternalsError, match=r"qlight/_lightning_compat.py: Lightning .* has no "
                       r"SimpleNamespace.fit_loop.epoch_loop._batches_that_stepped"):
        compat.logged_step(SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace())))
    with pytest.raises(compat.LightningInternalsError, match="_signal_connector.received_sigterm"):
        compat.set_stop_requested(SimpleNamespace(_signal_connector=SimpleNamespace()), True)


class Positions(Callback):
    """(started, finished, logged step, global step, logs written) at every training batch's start and end."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, int, int, int, int, int]] = []

    def _row(self, when: str, trainer: Trainer, batch_idx: int) -> None:
        self.rows.append((when, batch_idx, compat.batches_started(trainer), compat.batches_finished(trainer),
                          compat.logged_step(trainer), trainer.global_step))

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._row("start", trainer, batch_idx)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._row("end", trainer, batch_idx)


@pytest.mark.usefixtures("one_thread")
def test_loop_positions_mean_what_qlight_assumes(tmp_path: Path) -> None:
    """Started counts the current batch, finished does not until its step is done (what a mid-epoch resume and
    the augmentation seeds are built on), and the logged step counts the optimizer steps taken before this batch."""
    torch.manual_seed(0)
    positions = Positions()
    trainer = Trainer(
        max_epochs=1, limit_train_batches=4, limit_val_batches=0, accumulate_grad_batches=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[positions],
        default_root_dir=tmp_path,
    )
    trainer.fit(BoringModel())
    starts = [r[1:] for r in positions.rows if r[0] == "start"]
    ends = [r[1:] for r in positions.rows if r[0] == "end"]
    # (batch_idx, started, finished, logged step, global step)
    assert starts == [(0, 1, 0, 0, 0), (1, 2, 1, 0, 0), (2, 3, 2, 1, 1), (3, 4, 3, 1, 1)]
    # at a batch's end its step counts as finished; the logged step catches up after the end hooks
    assert ends == [(0, 1, 1, 0, 0), (1, 2, 2, 0, 1), (2, 3, 3, 1, 1), (3, 4, 4, 1, 2)]
