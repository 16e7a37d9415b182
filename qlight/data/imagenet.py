"""ImageNet (and any ImageFolder-layout dataset) for multi-GPU training, resumable mid-epoch.

Layout: ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG`` (the usual ILSVRC-2012 layout
after sorting the validation images into class folders); labels follow the sorted class-folder
names, as in torchvision's ``ImageFolder``. The file index is built once per root and cached.

Work split: DataLoader workers read and decode JPEGs and cut the random-resized crop (training) or
the resize + center crop (evaluation) on the CPU, returning uint8 tensors, the cheapest thing to
pin and copy; the horizontal flip and normalization run batched on the device in
:meth:`ImageFolderDataModule.on_after_batch_transfer`.

Randomness is a function of position, not of process state: a sample's crop is drawn from a
generator seeded by (run seed, epoch, sample index), and a batch's flips from (run seed, rank,
epoch, batch position). So augmentation does not depend on the number of workers, and a run resumed
mid-epoch sees the same remaining batches, cropped and flipped as they would have been.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image
from typing_extensions import override

from qlight._lightning_compat import run_seed
from qlight.data.base import DatasetError, ImageDataModule, load_cached, save_atomic
from qlight.data.sampling import batch_seed
from qlight.data.sources import stratified_subset

__all__ = ["ImageFolderDataModule", "ImageFolderDataset", "ImageNetDataModule", "random_resized_crop_box"]

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
INDEX_VERSION = 1


def random_resized_crop_box(
    height: int,
    width: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random-resized crop, the Inception-style box of torchvision's ``RandomResizedCrop``.

    Up to 10 draws of an area fraction uniform in ``scale`` and an aspect ratio log-uniform in
    ``ratio``; the first box that fits is placed uniformly. Otherwise, a center crop of the whole
    image clamped to ``ratio``. Drawn from ``generator``, so the box is a function of its seed.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u[2] * (height - h + 1)), height - h)
            left = min(int(u[3] * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class ImageFolderDataset(Dataset[tuple[Tensor, int]]):
    """Decoded, cropped uint8 ``3 x size x size`` images with integer labels.

    Keys are sample indices or ``(index, epoch)`` pairs (what :class:`ResumableSampler` yields with
    ``with_epoch=True``); the training crop of a sample depends only on ``(seed, epoch, index)``.

    Args:
        root: folder the ``files`` are relative to.
        files: relative image paths.
        labels: class index of each file.
        train: random-resized crop (else resize the shorter side to ``resize_size``, center crop).
        image_size: output side length.
        resize_size: evaluation resize of the shorter side.
        scale, ratio: random-resized-crop ranges.
        seed: run seed of the crops.
    """

    def __init__(
        self,
        root: Path,
        files: list[str],
        labels: Tensor,
        train: bool,
        image_size: int = 224,
        resize_size: int = 256,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        seed: int = 0,
    ) -> None:
        self.root = root
        self.files = files
        self.labels = labels
        self.train = train
        self.image_size = image_size
        self.resize_size = resize_size
        self.scale = scale
        self.ratio = ratio
        self.seed = seed

    def __len__(self) -> int:
        return len(self.files)

    def _decode(self, index: int) -> Tensor:
        path = self.root / self.files[index]
        try:
            return decode_image(str(path), mode=ImageReadMode.RGB)
        except (RuntimeError, OSError) as err:
            raise DatasetError(f"cannot decode image {path}: {err}; expected a JPEG or PNG file") from None

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        image = self._decode(index)
        size = [self.image_size, self.image_size]
        if self.train:
            generator = torch.Generator().manual_seed(batch_seed(self.seed, -1, epoch, index))
            top, left, h, w = random_resized_crop_box(
                image.shape[-2], image.shape[-1], generator, self.scale, self.ratio
            )
            image = TF.resized_crop(image, top, left, h, w, size, antialias=True)
        else:
            image = TF.center_crop(TF.resize(image, [self.resize_size], antialias=True), size)
        return image.contiguous(), int(self.labels[index])


def _scan_split(folder: Path) -> tuple[list[str], dict[str, list[str]]]:
    """Class folders of a split and their image files (sorted relative paths), with clear errors."""
    if not folder.is_dir():
        raise DatasetError(
            f"{folder} does not exist; expected {folder.parent}/{{train,val}}/<class>/*.JPEG "
            "(ImageNet after sorting the validation images into class folders)"
        )
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DatasetError(f"{folder} holds no class folders; expected {folder}/<class>/*.JPEG")
    files: dict[str, list[str]] = {}
    for name in classes:
        images = sorted(
            e.name
            for e in os.scandir(folder / name)
            if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES)
        )
        if not images:
            raise DatasetError(f"class folder {folder / name} holds no images (*.jpeg, *.jpg, *.png)")
        files[name] = [f"{folder.name}/{name}/{image}" for image in images]
    return classes, files


def build_index(root: Path) -> dict[str, Any]:
    """The file lists and labels of ``root/train`` and ``root/val``; the two splits must share classes."""
    train_classes, train_files = _scan_split(root / "train")
    val_classes, val_files = _scan_split(root / "val")
    if train_classes != val_classes:
        only = sorted(set(train_classes) ^ set(val_classes))
        raise DatasetError(
            f"{root}/train and {root}/val have different class folders (in one only: {only[:5]}); "
            "both must hold the same classes"
        )
    index: dict[str, Any] = {"version": INDEX_VERSION, "classes": train_classes}
    for split, files in (("train", train_files), ("val", val_files)):
        names = [f for c in train_classes for f in files[c]]
        labels = [i for i, c in enumerate(train_classes) for _ in files[c]]
        index[split] = {"files": names, "labels": torch.tensor(labels, dtype=torch.int64)}
    return index


class ImageFolderDataModule(ImageDataModule):
    """Train on ``root/train``, validate and test on ``root/val`` (ImageFolder layout).

    Args:
        root: dataset folder holding ``train/`` and ``val/``, each with one folder per class.
        num_classes: number of class folders expected (checked; linked to the model by the CLI).
        batch_size: training batch size per device (last incomplete batch dropped).
        eval_batch_size: validation/test batch size (default ``batch_size``).
        num_workers: decoding processes per device.
        image_size: training crop and evaluation center-crop side.
        resize_size: evaluation shorter-side resize before the center crop.
        scale: area fraction range of the random-resized crop.
        augment: random-resized crop and horizontal flip in training (else the evaluation transform).
        channels_last: hand batches to the model in channels-last memory format.
        pin_memory: pin host batches when CUDA is available.
        cache_dir: where the file index is cached (default ``$QLIGHT_CACHE`` or ``~/.cache/qlight``).
        subset: use a class-balanced subset of this many training images.
        val_subset: the same for the validation images.
    """

    dataset_name = "imagefolder"
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def __init__(
        self,
        root: str,
        num_classes: int,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 8,
        image_size: int = 224,
        resize_size: int = 256,
        scale: tuple[float, float] = (0.08, 1.0),
        augment: bool = True,
        channels_last: bool = False,
        pin_memory: bool = True,
        cache_dir: str | None = None,
        subset: int | None = None,
        val_subset: int | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, augment, channels_last, pin_memory, cache_dir)
        self.check_positive(num_classes=num_classes, image_size=image_size, resize_size=resize_size)
        self.check_positive(" or null (all images)", subset=subset, val_subset=val_subset)
        if resize_size < image_size:
            raise ValueError(f"resize_size={resize_size} is smaller than image_size={image_size}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale={list(scale)} is invalid: it must satisfy 0 < min <= max <= 1")
        self.save_hyperparameters()
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DatasetError(
                f"data root {self.root} does not exist; expected a folder with train/<class>/*.JPEG and "
                "val/<class>/*.JPEG (ImageNet cannot be downloaded automatically)"
            )
        self.num_classes = num_classes
        self.image_size = image_size
        self.resize_size = resize_size
        self.scale = (float(scale[0]), float(scale[1]))
        self.subset = subset
        self.val_subset = val_subset
        self.train_dataset: ImageFolderDataset | None = None
        self.val_dataset: ImageFolderDataset | None = None

    # ------------------------------------------------------------------ index
    def _index_file(self) -> Path:
        """Cache file of the index, keyed by the root and the modification times of every class folder."""
        stats = []
        for split in ("train", "val"):
            folder = self.root / split
            if folder.is_dir():
                stats += sorted((e.name, e.stat().st_mtime_ns) for e in os.scandir(folder) if e.is_dir())
        key = hashlib.sha256(f"{self.root.resolve()}|{stats}|{INDEX_VERSION}".encode()).hexdigest()[:16]
        return self.cache_root / f"{self.dataset_name}-index-{key}.pt"

    @override
    def prepare_data(self) -> None:
        """Scan the folders once (one process per node) and cache the file index."""
        path = self._index_file()
        if not path.exists():
            index = build_index(self.root)
            save_atomic(index, path)
            rank_zero_info(
                f"Indexed {len(index['train']['files'])} training and {len(index['val']['files'])} validation "
                f"images of {len(index['classes'])} classes in {self.root}; cached in {path}"
            )

    def _load_index(self) -> dict[str, Any]:
        path = self._index_file()
        if path.exists():
            return load_cached(path)
        return build_index(self.root)

    @override
    def setup(self, stage: str) -> None:
        if self.train_dataset is not None:
            return
        index = self._load_index()
        self.classes = list(index["classes"])
        if len(self.classes) != self.num_classes:
            raise DatasetError(
                f"{self.root} has {len(self.classes)} class folders but num_classes={self.num_classes}; "
                "set data.num_classes to match the data"
            )
        for split, limit in (("train", self.subset), ("val", self.val_subset)):
            files, labels = index[split]["files"], index[split]["labels"]
            if limit is not None and limit < len(files):
                keep = stratified_subset(labels, limit)
                files, labels = [files[i] for i in keep.tolist()], labels[keep]
            dataset = ImageFolderDataset(
                self.root, files, labels, train=split == "train" and self.augment, image_size=self.image_size,
                resize_size=self.resize_size, scale=self.scale,
            )
            if split == "train":
                self.train_dataset = dataset
            else:
                self.val_dataset = dataset

    # ------------------------------------------------------------------ loaders
    @override
    def train_dataloader(self) -> DataLoader[tuple[Tensor, Tensor]]:
        """Batches of this rank's shard, ordered by (run seed, epoch); resumable mid-epoch."""
        dataset = self._require(self.train_dataset)
        dataset.seed = run_seed()
        return self.train_loader(dataset, str(self.root), with_epoch=True)

    @override
    def val_dataloader(self) -> DataLoader[tuple[Tensor, Tensor]]:
        """The validation images, in order."""
        return self.eval_loader(self.val_dataset)

    @override
    def test_dataloader(self) -> DataLoader[tuple[Tensor, Tensor]]:
        """The validation images again (ImageNet's test labels are not public)."""
        return self.eval_loader(self.val_dataset)

    @override
    def predict_dataloader(self) -> DataLoader[tuple[Tensor, Tensor]]:
        """The validation images, in order."""
        return self.eval_loader(self.val_dataset)

    # ------------------------------------------------------------------ on the device
    @override
    def augment_batch(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Flip half of the batch at random (the workers cut the random-resized crop)."""
        flip = torch.rand(len(images), 1, 1, 1, device=images.device, generator=generator) < 0.5
        return torch.where(flip, images.flip(-1), images)


class ImageNetDataModule(ImageFolderDataModule):
    """ILSVRC-2012: 1,281,167 training and 50,000 validation images of 1,000 classes.

    ``root`` is the folder holding ``train/`` and ``val/`` with one folder per WordNet id (``n01440764``
    ...), the validation images sorted into them (e.g. with the usual ``valprep.sh``). Nothing is
    downloaded. Defaults follow the standard ResNet recipe: random-resized crop 224 and flip for
    training; resize 256 and center crop 224 for evaluation; torchvision's normalization constants.
    """

    dataset_name = "imagenet"

    def __init__(self, root: str, num_classes: int = 1000, **kwargs: Any) -> None:
        super().__init__(root, num_classes, **kwargs)
