"""CIFAR-10 and CIFAR-100 DataModules that keep the data in memory as uint8 and augment on the device.

The training loop reads whole batches by slicing in-memory uint8 tensors (no per-sample
``__getitem__``, no per-sample collate, no PIL), ships 3 KB per image to the device and augments
and normalizes there in :meth:`CIFARDataModule.on_after_batch_transfer`. Decoding happens once per
source and machine; see :mod:`qlight.data.sources`.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from qlight.data.augment import random_crop_flip
from qlight.data.base import DatasetError, ImageDataModule, load_cached
from qlight.data.sources import CIFAR10, CIFAR100, CifarSpec, ensure_cached, resolve_source, stratified_split

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule", "CIFARDataModule", "TensorBatchDataset"]


class TensorBatchDataset(Dataset[tuple[Tensor, Tensor]]):
    """In-memory images and labels that a DataLoader reads a whole batch at a time.

    ``__getitems__`` (used by ``DataLoader`` for map-style datasets since torch 2.0) returns the
    batch as two tensor slices, so the per-sample Python work of ``TensorDataset`` plus
    ``default_collate`` disappears, while the DataLoader keeps its ordinary ``batch_size``/``sampler``
    arguments and Lightning can still inject a ``DistributedSampler`` under DDP.

    Args:
        images: ``N x 3 x H x W`` uint8 images.
        labels: ``N`` int64 labels.
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(indices, dtype=torch.int64)
        return self.images.index_select(0, index), self.labels.index_select(0, index)


def collate_batch(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """The batch from :meth:`TensorBatchDataset.__getitems__` is already collated."""
    return batch


class CIFARDataModule(ImageDataModule):
    """Common implementation of the CIFAR-10 and CIFAR-100 DataModules.

    Batches are ``(images, labels)``: uint8 ``N x 3 x 32 x 32`` out of the DataLoader, float32
    normalized (and, in training, randomly cropped and flipped) after the transfer to the device.

    Validation data: with ``val_split=0`` (the default) the *test set* is used for validation, as in
    the BCGD and AQE papers, whose reported accuracies are the best test accuracies during training.
    Set ``val_split > 0`` for honest model selection: that class-stratified fraction of the training
    set (fixed by ``seed``) is held out for validation, and ``test`` still uses the test set.

    Training order and augmentation resume exactly, also from a checkpoint saved mid-epoch (see
    :mod:`qlight.data.sampling`): each epoch's order is a permutation seeded by the run seed
    (``seed_everything``) and the epoch, sharded over the ranks under DDP (each rank reads its own
    shard, all ranks run the same number of batches), and every training batch's crops and flips
    come from a generator seeded by the run seed, rank, epoch and batch position. Evaluation
    shards under DDP are padded to equal length by Lightning, so report final accuracies from
    ``qlight validate``/``test`` on one device.

    The augmentation runs in :meth:`on_after_batch_transfer`, which Lightning calls only when the
    DataModule is passed to the Trainer (``datamodule=``, as the CLI does), not for bare loaders.

    Args:
        root: the data; one of (a) a folder holding torchvision's pickled batches
            (``cifar-10-batches-py`` / ``cifar-100-python``), (b) an image-folder tree
            ``root/{train,test}/<class>/*.png|jpg`` (optionally inside one extra top-level folder),
            (c) a ``.zip`` file of such a tree, read without extracting it. Labels follow the sorted
            class-folder names (which give the standard label order for CIFAR-10 and CIFAR-100).
        download: fetch torchvision's pickled batches into ``root`` if no data are there.
        batch_size: training batch size per device; the last incomplete batch is dropped so every
            step has the same shape (no ``torch.compile`` recompiles).
        eval_batch_size: batch size for validation, test and predict (default: ``batch_size``);
            evaluation keeps every sample.
        num_workers: DataLoader worker processes; 0 is fastest for in-memory data, since a batch is
            one tensor slice.
        val_split: fraction of the training set held out for validation; 0 validates on the test set.
        cache_dir: folder for the decoded tensors (default ``$QLIGHT_CACHE`` or ``~/.cache/qlight``).
        augment: random 4-pixel-padded crop and horizontal flip of training batches.
        channels_last: hand batches to the model in channels-last memory format.
        pin_memory: pin host batches for asynchronous copies when CUDA is available.
        seed: seed of the ``val_split`` hold-out (independent of the global seed, so the split
            does not change with the training seed).
        subset: use only a class-balanced subset of this many training images (decoding only those);
            for quick experiments and tests.
        test_subset: the same for the test set.
    """

    spec: ClassVar[CifarSpec]

    def __init__(
        self,
        root: str,
        download: bool = False,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_split: float = 0.0,
        cache_dir: str | None = None,
        augment: bool = True,
        channels_last: bool = False,
        pin_memory: bool = True,
        seed: int = 0,
        subset: int | None = None,
        test_subset: int | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, augment, channels_last, pin_memory, cache_dir)
        self.check_positive(" or null (all images)", subset=subset, test_subset=test_subset)
        if not 0.0 <= val_split < 1.0:
            raise ValueError(
                f"val_split={val_split} is invalid: it must be in [0, 1) (0 validates on the test set)"
            )
        self.save_hyperparameters()
        self.root = root
        self.download = download
        self.val_split = val_split
        self.seed = seed
        self.subset = subset
        self.test_subset = test_subset
        self.train_dataset: TensorBatchDataset | None = None
        self.val_dataset: TensorBatchDataset | None = None
        self.test_dataset: TensorBatchDataset | None = None
        if not download:
            resolve_source(self.spec, root)  # fail at construction on a wrong root, on every rank

    def _cache_file(self) -> Path:
        return ensure_cached(
            self.spec,
            self.root,
            self.cache_root,
            download=self.download,
            subset=self.subset,
            test_subset=self.test_subset,
        )

    @override
    def prepare_data(self) -> None:
        """Download (if asked) and decode into the cache; Lightning runs this on one process per node."""
        self._cache_file()

    @override
    def setup(self, stage: str) -> None:
        """Load the cached tensors and build the train, validation and test sets."""
        if self.train_dataset is not None:
            return
        data = load_cached(self._cache_file())
        self.classes = list(data["classes"])
        train_images, train_labels = data["train_images"], data["train_labels"]
        self.test_dataset = TensorBatchDataset(data["test_images"], data["test_labels"])
        if self.val_split > 0:
            train_idx, val_idx = stratified_split(train_labels, self.val_split, self.seed)
            if len(val_idx) == 0 or len(train_idx) == 0:
                raise DatasetError(
                    f"val_split={self.val_split} of the {len(train_labels)} training images of {self.root} "
                    "leaves an empty train or validation set; change val_split or subset"
                )
            self.val_dataset = TensorBatchDataset(train_images[val_idx], train_labels[val_idx])
            self.train_dataset = TensorBatchDataset(train_images[train_idx], train_labels[train_idx])
        else:
            self.val_dataset = self.test_dataset
            self.train_dataset = TensorBatchDataset(train_images, train_labels)

    @override
    def train_dataloader(self) -> DataLoader[tuple[Tensor, Tensor]]:
        """Shuffled uint8 batches of (this rank's shard of) the training set; resumable mid-epoch.

        The last incomplete batch is dropped.
        """
        return self.train_loader(self.train_dataset, str(self.root), collate_fn=collate_batch)

    @override
    def val_dataloader(self) -> DataLoader[tuple[Tensor, Tensor]]:
        """The held-out part of train, or the test set when ``val_split`` is 0."""
        return self.eval_loader(self.val_dataset, collate_fn=collate_batch)

    @override
    def test_dataloader(self) -> DataLoader[tuple[Tensor, Tensor]]:
        """The test set, in order."""
        return self.eval_loader(self.test_dataset, collate_fn=collate_batch)

    @override
    def predict_dataloader(self) -> DataLoader[tuple[Tensor, Tensor]]:
        """The test set, in order, so ``qlight predict`` has data without extra arguments."""
        return self.eval_loader(self.test_dataset, collate_fn=collate_batch)

    @override
    def augment_batch(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Random 4-pixel-padded crop and horizontal flip."""
        return random_crop_flip(images, padding=4, generator=generator)


class CIFAR10DataModule(CIFARDataModule):
    """CIFAR-10: 50,000 training and 10,000 test images of 10 classes.

    ``mean``/``std`` are the normalization constants of the BCGD reference code.
    """

    spec = CIFAR10
    dataset_name = "cifar10"
    num_classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2023, 0.1994, 0.2010)


class CIFAR100DataModule(CIFARDataModule):
    """CIFAR-100: 50,000 training and 10,000 test images of 100 (fine) classes."""

    spec = CIFAR100
    dataset_name = "cifar100"
    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
