"""Write tiny fake CIFAR datasets in the three layouts qlight reads.

The images are 32x32 RGB with a per-class base colour plus noise, so a small model can learn them
and every image is unique. Sample ``i`` has label ``i % num_classes`` (interleaved, as in the real
pickled batches); in image folders the ``k``-th image of a class is ``<class>/<k:04d>.<ext>``, so
the folder order of a class equals its order in the pickles.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class FakeCifar:
    """Images (``N x 3 x 32 x 32`` uint8) and int64 labels of a fake CIFAR, in pickle order."""

    classes: list[str]
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor

    def split(self, split: str, folder_order: bool = False) -> tuple[Tensor, Tensor]:
        """Images and labels of ``split``; ``folder_order`` sorts them by label as folder trees are."""
        images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
        if folder_order:
            order = torch.argsort(labels, stable=True)
            images, labels = images[order], labels[order]
        return images, labels


def make_fake_cifar(num_classes: int, train_per_class: int, test_per_class: int, seed: int = 0) -> FakeCifar:
    """A fake CIFAR-10 (real class names) or CIFAR-100 (``class000`` ...) with class-coloured images."""
    rng = np.random.default_rng(seed)
    classes = CIFAR10_CLASSES if num_classes == 10 else [f"class{i:03d}" for i in range(num_classes)]
    colours = rng.integers(40, 216, size=(num_classes, 3, 1, 1))

    def images(n: int) -> tuple[Tensor, Tensor]:
        labels = np.arange(n) % num_classes
        noise = rng.integers(-40, 41, size=(n, 3, 32, 32))
        pixels = np.clip(colours[labels] + noise, 0, 255).astype(np.uint8)
        return torch.from_numpy(pixels), torch.from_numpy(labels).long()

    train_images, train_labels = images(num_classes * train_per_class)
    test_images, test_labels = images(num_classes * test_per_class)
    return FakeCifar(classes, train_images, train_labels, test_images, test_labels)


def write_pickled(root: Path, fake: FakeCifar) -> Path:
    """Write torchvision's ``cifar-10-batches-py`` (10 classes) or ``cifar-100-python`` layout.

    Returns:
        ``root`` (the folder to pass as the DataModule's ``root``).
    """

    def dump(obj: dict, path: Path) -> None:
        with open(path, "wb") as f:
            pickle.dump(obj, f)

    def batch(images: Tensor, labels: Tensor, label_key: str) -> dict:
        return {"data": images.reshape(len(images), -1).numpy(), label_key: labels.tolist()}

    if len(fake.classes) == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        chunks = zip(fake.train_images.chunk(5), fake.train_labels.chunk(5), strict=True)
        for i, (images, labels) in enumerate(chunks, 1):
            dump(batch(images, labels, "labels"), folder / f"data_batch_{i}")
        dump(batch(fake.test_images, fake.test_labels, "labels"), folder / "test_batch")
        dump({"label_names": fake.classes, "num_vis": 3072}, folder / "batches.meta")
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        for split in ("train", "test"):
            images, labels = fake.split(split)
            content = batch(images, labels, "fine_labels") | {"coarse_labels": (labels // 5).tolist()}
            dump(content, folder / split)
        coarse = [f"super{i:02d}" for i in range(len(fake.classes) // 5)]
        dump({"fine_label_names": fake.classes, "coarse_label_names": coarse}, folder / "meta")
    return root


def write_image_folder(root: Path, fake: FakeCifar, ext: str = "png", top: str | None = None) -> Path:
    """Write ``root[/top]/{train,test}/<class>/<k:04d>.<ext>``; JPEGs at quality 95.

    Returns:
        ``root``.
    """
    base = root / top if top else root
    for split in ("train", "test"):
        images, labels = fake.split(split)
        counts = [0] * len(fake.classes)
        for image, label in zip(images, labels.tolist(), strict=True):
            folder = base / split / fake.classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(
                folder / f"{counts[label]:04d}.{ext}", quality=95
            )
            counts[label] += 1
    return root


def write_zip(source: Path, path: Path) -> Path:
    """Zip the files under ``source`` (stored, names relative to ``source``, no folder entries).

    Returns:
        ``path``.
    """
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for file in sorted(p for p in source.rglob("*") if p.is_file()):
            archive.write(file, file.relative_to(source).as_posix())
    return path
