"""The base of qlight's image DataModules, the data error, and the cache files the DataModules write.

Every qlight DataModule declares ``dataset_name`` (it names runs and cache files) and ``num_classes`` (the CLI
links it to the model's ``num_classes``: a declared contract, not an attribute that happens to exist), checks
its arguments when it is built, builds its datasets in ``setup`` and hands uint8 batches to the device, where
:meth:`ImageDataModule.on_after_batch_transfer` augments them (training only) and normalizes them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from qlight.data.augment import Normalizer
from qlight.data.sampling import BatchGenerators, ResumableDataLoader, resumable_train_loader

__all__ = ["DatasetError", "ImageDataModule", "default_cache_dir", "load_cached", "save_atomic"]

D = TypeVar("D")


class DatasetError(ValueError):
    """Raised for missing or malformed data; the message names the path and how to fix it."""


def default_cache_dir() -> Path:
    """``$QLIGHT_CACHE`` if set, else ``~/.cache/qlight``: decoded datasets live outside the repo."""
    return Path(os.environ.get("QLIGHT_CACHE") or Path.home() / ".cache" / "qlight").expanduser()


def save_atomic(data: dict[str, Any], path: Path) -> None:
    """Write via a temporary file in the same folder and ``os.replace``: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(data, f)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_cached(path: Path) -> dict[str, Any]:
    """Load a cache file written by :func:`save_atomic` (tensors and plain containers only)."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:  # a cache damaged outside qlight (disk full, manual edits)
        raise DatasetError(f"cannot load the data cache {path} ({err!r}); delete it to rebuild it") from err


class ImageDataModule(LightningDataModule):
    """What qlight's image DataModules share: loader arguments, their checks, loaders and the device step.

    Subclasses set ``dataset_name``, ``num_classes`` (a class attribute, or an argument checked against the
    data), ``mean`` and ``std``, build ``train_dataset``/``val_dataset``/``test_dataset`` in ``setup`` and
    define :meth:`augment_batch`.

    Args:
        batch_size: training batch size per device (the last incomplete batch is dropped, so every step has
            the same shape and ``torch.compile`` does not recompile).
        eval_batch_size: batch size for validation, test and predict (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        augment: random augmentation of training batches.
        channels_last: hand batches to the model in channels-last memory format.
        pin_memory: pin host batches for asynchronous copies when CUDA is available.
        cache_dir: folder for cache files (default ``$QLIGHT_CACHE`` or ``~/.cache/qlight``).
    """

    #: short lower-case name of the data (run names, W&B groups, cache files)
    dataset_name: ClassVar[str]
    #: number of classes; the CLI passes it on to the model
    num_classes: int
    #: per-channel normalization of images scaled to [0, 1]
    mean: ClassVar[tuple[float, float, float]]
    std: ClassVar[tuple[float, float, float]]

    def __init__(
        self,
        batch_size: int,
        eval_batch_size: int | None,
        num_workers: int,
        augment: bool,
        channels_last: bool,
        pin_memory: bool,
        cache_dir: str | None,
    ) -> None:
        super().__init__()
        self.check_positive(batch_size=batch_size, eval_batch_size=eval_batch_size)
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} is invalid: it must be >= 0")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.augment = augment
        self.channels_last = channels_last
        self.pin_memory = pin_memory
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.classes: list[str] = []
        self._normalize = Normalizer(self.mean, self.std)
        self._generators = BatchGenerators()

    @staticmethod
    def check_positive(hint: str = "", **values: int | None) -> None:
        """Every given value is None or a positive integer; ``hint`` ends the message (e.g. what None means)."""
        for field, value in values.items():
            if value is not None and value < 1:
                raise ValueError(f"{field}={value} is invalid: it must be a positive integer{hint}")

    @property
    def cache_root(self) -> Path:
        """The folder cache files go to."""
        return self.cache_dir or default_cache_dir()

    # ------------------------------------------------------------------ loaders
    def loader_options(self) -> dict[str, Any]:
        """DataLoader arguments every loader of this DataModule shares."""
        return {
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "pin_memory": self.pin_memory and torch.cuda.is_available(),
        }

    def _require(self, dataset: D | None) -> D:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its dataloaders are requested")
        return dataset

    def train_loader(self, dataset: Any, source: str, **options: Any) -> ResumableDataLoader:
        """This rank's shard of ``dataset`` in (run seed, epoch) order, resumable mid-epoch.

        Raises:
            DatasetError: the training set (read from ``source``) has less than one batch per device.
        """
        dataset = self._require(dataset)
        world_size = self.trainer.world_size if self.trainer is not None else 1
        if len(dataset) < self.batch_size * world_size:
            raise DatasetError(
                f"the training set of {source} has {len(dataset)} images, fewer than one batch of {self.batch_size} "
                f"per device on {world_size} device(s), so an epoch would have no steps; lower batch_size or "
                "raise subset"
            )
        return resumable_train_loader(dataset, self.batch_size, self.trainer, **self.loader_options(), **options)

    def eval_loader(self, dataset: Dataset[Any] | None, **options: Any) -> DataLoader[tuple[Tensor, Tensor]]:
        """``dataset`` in order, in batches of ``eval_batch_size``, every sample kept."""
        return DataLoader(
            self._require(dataset), batch_size=self.eval_batch_size, shuffle=False, **self.loader_options(),
            **options,
        )

    # ------------------------------------------------------------------ on the device
    def augment_batch(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Randomly augment a uint8 training batch on its device, drawing from ``generator``."""
        raise NotImplementedError

    @override
    def on_after_batch_transfer(
        self, batch: tuple[Tensor, Tensor], dataloader_idx: int
    ) -> tuple[Tensor, Tensor]:
        """Augment (training only, seeded by the batch's position) and normalize the uint8 batch on its device.

        Lightning calls this only when the DataModule is passed to the Trainer (``datamodule=``, as the CLI
        does), not for bare loaders.
        """
        images, labels = batch
        trainer = self.trainer
        if self.augment and trainer is not None and trainer.training:
            images = self.augment_batch(images, self._generators(trainer, images.device))
        return self._normalize(images, self.channels_last), labels
