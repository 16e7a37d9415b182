"""LightningDataModules: CIFAR-10/100 (in-memory uint8) and ImageNet / ImageFolder data, augmented on the device."""

from qlight.data.augment import Normalizer, normalize, normalize_affine, random_crop_flip, window_indices
from qlight.data.base import DatasetError, ImageDataModule, default_cache_dir
from qlight.data.cifar import CIFAR10DataModule, CIFAR100DataModule, CIFARDataModule, TensorBatchDataset
from qlight.data.imagenet import (
    ImageFolderDataModule,
    ImageFolderDataset,
    ImageNetDataModule,
    random_resized_crop_box,
)
from qlight.data.sampling import (
    BatchGenerators,
    ResumableDataLoader,
    ResumableSampler,
    batch_seed,
    resumable_train_loader,
)

__all__ = [
    "BatchGenerators",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CIFARDataModule",
    "DatasetError",
    "ImageDataModule",
    "ImageFolderDataModule",
    "ImageFolderDataset",
    "ImageNetDataModule",
    "Normalizer",
    "ResumableDataLoader",
    "ResumableSampler",
    "TensorBatchDataset",
    "batch_seed",
    "default_cache_dir",
    "normalize",
    "normalize_affine",
    "random_crop_flip",
    "random_resized_crop_box",
    "resumable_train_loader",
    "window_indices",
]
