"""The images ``qlight export --verify`` runs through PyTorch and the runtime, and the run's class names.

Real images come from the run's own DataModule, rebuilt from the class path and arguments Lightning
stores in the checkpoint (``--data.*`` flags override them), and are normalised by that DataModule's
``on_after_batch_transfer`` exactly as in validation. Without reachable data, uint8 images drawn at
random are normalised with the recorded :class:`~qlight.export.contract.InputContract`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor

from qlight.export.contract import InputContract

__all__ = ["VerificationImages", "class_names_of", "probe_class_names", "random_images", "validation_images"]


@dataclass
class VerificationImages:
    """Normalised float32 inputs, their labels (None for random images) and where they came from."""

    inputs: Tensor
    labels: Tensor | None
    source: str


def _evenly_spaced(n: int, k: int) -> list[int]:
    """``k`` indices spread over ``range(n)``.

    The validation sets are ordered by class, so the first ``k`` images would all be of one class.
    """
    if k >= n:
        return list(range(n))
    return torch.linspace(0, n - 1, k).round().long().unique().tolist()


def validation_images(datamodule: LightningDataModule, samples: int) -> VerificationImages:
    """``samples`` images spread evenly over the DataModule's validation set (all of it if smaller)."""
    datamodule.prepare_data()
    datamodule.setup("validate")
    dataset: Any = datamodule.val_dataloader().dataset
    index = _evenly_spaced(len(dataset), samples)
    if hasattr(dataset, "__getitems__"):
        images, labels = dataset.__getitems__(index)
    else:
        pairs = [dataset[i] for i in index]
        images = torch.stack([torch.as_tensor(p[0]) for p in pairs])
        labels = torch.as_tensor([int(p[1]) for p in pairs])
    inputs, labels = datamodule.on_after_batch_transfer((images, labels), 0)
    name = type(datamodule).__name__
    return VerificationImages(
        inputs.float().contiguous(),
        labels,
        f"{len(index)} validation images of {name}(root={datamodule.hparams.get('root')!r})",
    )


def random_images(contract: InputContract, samples: int, seed: int = 0) -> VerificationImages:
    """``samples`` random uint8 images normalised with the contract (standard-normal if it is unknown)."""
    generator = torch.Generator().manual_seed(seed)
    height, width = contract.height or 32, contract.width or 32
    if contract.known:
        channels = len(contract.mean or ())
        pixels = torch.randint(
            0, 256, (samples, channels, height, width), dtype=torch.uint8, generator=generator
        )
        return VerificationImages(contract.normalize(pixels), None, f"{samples} random images")
    inputs = torch.randn(samples, 3, height, width, generator=generator)
    return VerificationImages(
        inputs, None, f"{samples} random standard-normal inputs (input contract unknown)"
    )


def class_names_of(datamodule: LightningDataModule) -> list[str] | None:
    """The class names of a DataModule that has loaded its data (``.classes``), else None."""
    names = getattr(datamodule, "classes", None)
    return [str(n) for n in names] if names else None


def probe_class_names(cls: type, init_args: dict[str, Any]) -> list[str] | None:
    """Class names of a CIFAR-style DataModule, read by decoding a tiny class-balanced subset.

    Only DataModules with ``subset`` and ``test_subset`` arguments are probed (decoding a few dozen
    images takes well under a second); for others the names are recorded when ``--verify`` loads data.
    """
    params = inspect.signature(cls).parameters
    if not {"subset", "test_subset"} <= set(params):
        return None
    classes = int(getattr(cls, "num_classes", 0) or 0) or 1
    datamodule = cls(**{**init_args, "subset": classes, "test_subset": classes})
    datamodule.prepare_data()
    datamodule.setup("validate")
    return class_names_of(datamodule)
