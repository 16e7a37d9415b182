"""What ImageClassifier logs during training: epoch accuracies from device-side hit counts, the
loss as a mean over each logging window, and nothing on steps whose values Lightning discards."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from qlight._lightning_compat import step_logging_due
from qlight.tasks import ImageClassifier

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int = 48) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g))


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.logged: list[tuple[int, float]] = []

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.losses.append(float(outputs["loss"]))
        if step_logging_due(trainer, batch_idx):
            self.logged.append((batch_idx, float(trainer.callback_metrics["train/loss"])))


def _fit(tmp_path: Path, lr: float, **trainer_kwargs: Any) -> tuple[ImageClassifier, Trainer, LossRecorder]:
    seed_everything(0)
    task = ImageClassifier(model="resnet20", optimizer=functools.partial(torch.optim.SGD, lr=lr))
    recorder = LossRecorder()
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
        default_root_dir=tmp_path,
        **trainer_kwargs,
    )
    trainer.fit(task, DataLoader(_data(), batch_size=8))
    return task, trainer, recorder


def test_training_accuracy_counts_every_sample(tmp_path: Path) -> None:
    """With lr=0 the weights never change, so the logged epoch accuracy must equal the top-1/top-5
    accuracy of the same train-mode forward over the same batches."""
    task, trainer, _ = _fit(tmp_path, lr=0.0)
    logits: list[Tensor] = []
    task.train()
    with torch.no_grad():
        for x, _ in DataLoader(_data(), batch_size=8):
            logits.append(task(x))
    scores, labels = torch.cat(logits), _data().tensors[1]
    top5 = scores.topk(5, dim=1).indices == labels.unsqueeze(1)
    assert float(trainer.callback_metrics["train/acc1"]) == pytest.approx(float(top5[:, 0].double().mean()))
    assert float(trainer.callback_metrics["train/acc5"]) == pytest.approx(float(top5.any(1).double().mean()))
    assert 0 < float(trainer.callback_metrics["train/acc5"]) < 1  # not a trivial 0 or 1


def test_train_loss_is_the_mean_over_each_logging_window(tmp_path: Path) -> None:
    """6 steps, log_every_n_steps=4: logged after step 4 (mean of steps 1-4) and at the epoch's
    last step (mean of steps 5-6)."""
    _, _, recorder = _fit(tmp_path, lr=0.05, log_every_n_steps=4)
    losses = recorder.losses
    assert [i for i, _ in recorder.logged] == [3, 5]
    assert recorder.logged[0][1] == pytest.approx(sum(losses[:4]) / 4, rel=1e-6)
    assert recorder.logged[1][1] == pytest.approx(sum(losses[4:]) / 2, rel=1e-6)


def test_train_loss_window_spans_accumulated_micro_batches(tmp_path: Path) -> None:
    """accumulate_grad_batches=2, log_every_n_steps=1: one value per optimizer step, the mean of its two
    micro-batches (values logged between them would never be written)."""
    _, trainer, recorder = _fit(tmp_path, lr=0.05, log_every_n_steps=1, accumulate_grad_batches=2)
    losses = recorder.losses
    assert trainer.global_step == 3
    assert [i for i, _ in recorder.logged] == [1, 3, 5]
    for i, value in recorder.logged:  # Lightning's outputs["loss"] is the loss / accumulate_grad_batches
        assert value == pytest.approx((2 * losses[i - 1] + 2 * losses[i]) / 2, rel=1e-6)
