"""LightningDataModules for CIFAR-10/100 with in-memory uint8 data and device-side augmentation."""

from qlight.data.augment import normalize, normalize_affine, random_crop_flip, window_indices
from qlight.data.cifar import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    CIFARDataModule,
    TensorBatchDataset,
    default_cache_dir,
)
from qlight.data.sampling import ResumableDataLoader, ResumableSampler, batch_seed
from qlight.data.sources import DatasetError

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CIFARDataModule",
    "DatasetError",
    "ResumableDataLoader",
    "ResumableSampler",
    "TensorBatchDataset",
    "batch_seed",
    "default_cache_dir",
    "normalize",
    "normalize_affine",
    "random_crop_flip",
    "window_indices",
]
