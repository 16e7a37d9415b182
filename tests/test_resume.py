"""Resume from a mid-epoch checkpoint with the real CIFAR DataModule continues the same run: the
same remaining batches with the same crops and flips, and the same final weights, buffers and
optimizer state as a run that was never interrupted (DESIGN.md, reliability rules)."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import Fit, assert_same_state, checkpointing, crash_and_resume
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer, seed_everything

from qlight.callbacks import BCGD
from qlight.data import CIFAR10DataModule, ImageNetDataModule, ResumableSampler
from qlight.quant import QuantSpec
from qlight.tasks import ImageClassifier

STEPS_PER_EPOCH = 10  # 80 fake training images, batch 8 (the fake ImageNet: 24 images, batch 4 -> 6)


def data_classes(root: Path) -> int:
    return 3 if root.name.startswith("imagenet") else 10


class BatchRecorder(Callback):
    """(epoch, batch_idx, checksum of the augmented images, labels) of every training batch."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, int, float, list[int]]] = []

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        images, labels = batch
        self.batches.append((trainer.current_epoch, batch_idx, float(images.double().sum()), labels.tolist()))


def _datamodule(root: Path) -> LightningDataModule:
    """The fake CIFAR-10 (80 training images) or the fake ImageNet (24 training images, 3 classes)."""
    if root.name.startswith("imagenet"):
        return ImageNetDataModule(
            str(root), num_classes=3, batch_size=4, num_workers=0, image_size=16, resize_size=20
        )
    return CIFAR10DataModule(str(root), batch_size=8, pin_memory=False)


def _fit(root: Path) -> Fit:
    """The quantized ResNet-20 with BCGD on the fake data at ``root``, 2 epochs."""

    def fit(callbacks: list[Callback], run_dir: Path, ckpt_path: str | None) -> tuple[LightningModule, Trainer]:
        seed_everything(7)
        task = ImageClassifier(
            model="resnet20",
            quant=QuantSpec(weight="binary", act="relu_quant", a_bits=4),
            optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=1e-4),
            alpha_calibration_steps=3,
            num_classes=data_classes(root),
        )
        trainer = Trainer(
            accelerator="cpu",
            max_epochs=2,
            callbacks=[BCGD(rho=1e-3, rho_growth=2.0), *callbacks],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=checkpointing(callbacks),
            deterministic=True,
            limit_val_batches=1,
            default_root_dir=run_dir,
        )
        trainer.fit(task, datamodule=_datamodule(root), ckpt_path=ckpt_path)
        return task, trainer

    return fit


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    ("data", "crash_step", "steps_per_epoch"),
    [("cifar10_pickle", 13, 10), ("cifar10_pickle", 10, 10), ("imagenet_folder", 8, 6)],
    ids=["cifar_mid_epoch", "cifar_epoch_boundary", "imagenet_mid_epoch"],
)
def test_crash_then_resume_reads_the_same_batches_and_ends_identical(
    data: str, crash_step: int, steps_per_epoch: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    root = request.getfixturevalue(data)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        runs = crash_and_resume(_fit(root), tmp_path, crash_step, lambda: [BatchRecorder()])
    assert not [w for w in warned if "not resumable" in str(w.message)]
    straight, resumed = runs.straight_callbacks[0], runs.resumed_callbacks[0]
    assert isinstance(straight, BatchRecorder) and isinstance(resumed, BatchRecorder)
    assert len(straight.batches) == 2 * steps_per_epoch
    # epochs are reshuffled and re-augmented
    assert straight.batches[0][2:] != straight.batches[steps_per_epoch][2:]
    assert resumed.batches == straight.batches[crash_step:]
    assert_same_state(runs.straight, runs.resumed)


def test_sampler_resumes_after_the_samples_already_read() -> None:
    """Rank r of R reads positions r, r+R, ... of the epoch's permutation, so a resumed epoch skips a
    prefix of each rank's shard; the skip applies to the saved epoch only, once."""
    data = list(range(20))
    samplers = [ResumableSampler(data, num_replicas=2, rank=r, seed=3) for r in range(2)]
    for s in samplers:
        s.set_epoch(4)
    full = [list(s) for s in samplers]
    order = torch.randperm(20, generator=torch.Generator().manual_seed(3 + 4)).tolist()
    assert full == [order[0::2], order[1::2]]

    samplers[0].resume(epoch=4, skip=3)
    assert list(samplers[0]) == full[0][3:]
    assert list(samplers[0]) == full[0]  # once only
    samplers[1].resume(epoch=4, skip=3)
    samplers[1].set_epoch(5)
    assert len(list(samplers[1])) == 10  # a later epoch is not shortened


def test_loader_state_is_a_prefix_of_the_epoch(cifar10_pickle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loader's checkpointed state counts finished batches over all ranks and restores that skip."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    data = CIFAR10DataModule(str(cifar10_pickle), batch_size=8, pin_memory=False)
    data.setup("fit")
    loader = data.train_dataloader()
    assert loader.state_dict() == {"epoch": 0, "samples": 0, "seed": 0, "num_samples": 80}
    loader.load_state_dict({"epoch": 0, "samples": 24, "seed": 0, "num_samples": 80})
    assert len(list(loader)) == STEPS_PER_EPOCH - 3

    with pytest.warns(UserWarning, match="num_samples: 40 -> 80"):
        loader.load_state_dict({"epoch": 0, "samples": 24, "seed": 0, "num_samples": 40})
    assert len(list(loader)) == STEPS_PER_EPOCH
