"""The input contract of an exported network: what pixels, in which layout, normalised how.

A trained qlight network never sees raw pixels: the DataModule hands it ``float32`` NCHW batches
normalised as ``(uint8 / 255 - mean[c]) / std[c]`` (:class:`qlight.data.Normalizer`). An exported file
that does not say so is a trap, so every export records an :class:`InputContract`, read from the
DataModule the checkpoint was trained with (Lightning stores its class path and arguments in the
checkpoint), and the class names of the run's data where they can be read.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from qlight.data import CIFARDataModule, normalize

__all__ = ["InputContract", "datamodule_class", "datamodule_init_args"]

#: Lightning's keys for the DataModule in a checkpoint written by the qlight CLI.
_DM_HPARAMS = "datamodule_hyper_parameters"
_PRIVATE_KEYS = ("_class_path", "_instantiator")


@dataclass(frozen=True)
class InputContract:
    """How to turn images into the network's input.

    Args:
        mean: per-channel mean of the ``[0, 1]``-scaled pixels (None: unknown).
        std: per-channel standard deviation of the ``[0, 1]``-scaled pixels (None: unknown).
        height: input height in pixels (None: any / unknown).
        width: input width in pixels (None: any / unknown).
        channel_order: order of the colour channels (the DataModules decode RGB).
        pixels: the raw pixel type the normalisation starts from (``uint8``, 0..255).
        datamodule: class path of the DataModule the network was trained with.
        class_names: label names in logit order (None: not known at export time).
    """

    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    height: int | None
    width: int | None
    channel_order: str = "RGB"
    pixels: str = "uint8"
    datamodule: str | None = None
    class_names: tuple[str, ...] | None = field(default=None)

    @property
    def known(self) -> bool:
        """Whether the normalisation constants are known."""
        return self.mean is not None and self.std is not None

    @property
    def formula(self) -> str:
        """The normalisation, spelled out for a reader of the file."""
        if not self.known:
            return "unknown: the checkpoint names no DataModule with mean/std; feed what the model trained on"
        size = f"{self.height}x{self.width}" if self.height and self.width else "any size"
        return (
            f"input[n, c, h, w] = ({self.pixels} pixel / 255 - mean[c]) / std[c] with "
            f"mean={list(self.mean or ())}, std={list(self.std or ())}; float32 NCHW, "
            f"channels {self.channel_order}, {size}"
        )

    def normalize(self, images: Tensor) -> Tensor:
        """``uint8`` N x C x H x W images -> the float32 network input, computed as the DataModule does.

        Raises:
            ValueError: the contract is unknown, the images are not uint8 NCHW, or their size differs.
        """
        if not self.known:
            raise ValueError(f"the export records no input normalisation ({self.formula})")
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != len(self.mean or ()):
            raise ValueError(
                f"expected uint8 images of shape N x {len(self.mean or ())} x H x W ({self.channel_order}), "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        size = tuple(images.shape[2:])
        if self.height is not None and self.width is not None and size != (self.height, self.width):
            raise ValueError(f"expected {self.height}x{self.width} images, got {size[0]}x{size[1]}")
        # the DataModules' arithmetic (images * (1 / (255 std)) - mean / std): validation's inputs bit for bit
        return normalize(
            images,
            torch.tensor(self.mean, device=images.device),
            torch.tensor(self.std, device=images.device),
        )

    def with_class_names(self, names: Sequence[str] | None) -> InputContract:
        """A copy naming the classes."""
        return InputContract(**{**asdict(self), "class_names": tuple(names) if names else None})

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, strings, numbers) for a ``torch.save`` file read with ``weights_only``."""
        data = asdict(self)
        for key in ("mean", "std", "class_names"):
            data[key] = list(data[key]) if data[key] is not None else None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> InputContract:
        """Inverse of :meth:`to_dict` (None gives the unknown contract of files written before it existed)."""
        if not data:
            return cls(None, None, None, None)
        values = dict(data)
        for key in ("mean", "std", "class_names"):
            values[key] = tuple(values[key]) if values.get(key) is not None else None
        return cls(**values)

    def metadata(self) -> dict[str, str]:
        """ONNX ``metadata_props``: readable keys plus the whole contract as JSON."""
        size = f"{self.height}x{self.width}" if self.height and self.width else "any"
        props = {
            "input.layout": "NCHW",
            "input.dtype": "float32",
            "input.size": size,
            "input.channel_order": self.channel_order,
            "input.normalization": self.formula,
            "input.mean": json.dumps(list(self.mean)) if self.mean is not None else "unknown",
            "input.std": json.dumps(list(self.std)) if self.std is not None else "unknown",
            "input.pixels": self.pixels,
            "input.contract": json.dumps(self.to_dict()),
        }
        if self.datamodule:
            props["input.datamodule"] = self.datamodule
        if self.class_names:
            props["class_names"] = json.dumps(list(self.class_names))
        return props

    @classmethod
    def from_metadata(cls, props: Mapping[str, str]) -> InputContract:
        """The contract recorded in an exported ONNX file's ``metadata_props``."""
        return cls.from_dict(json.loads(props["input.contract"]) if "input.contract" in props else None)

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping[str, Any]) -> InputContract:
        """The contract of the DataModule recorded in a Lightning checkpoint (unknown if none is)."""
        cls_ = datamodule_class(checkpoint)
        if cls_ is None:
            return cls(None, None, None, None)
        args = datamodule_init_args(checkpoint)
        mean, std = getattr(cls_, "mean", None), getattr(cls_, "std", None)
        height = width = None
        if "image_size" in args:  # ImageFolder/ImageNet: the evaluation center crop
            height = width = int(args["image_size"])
        elif issubclass(cls_, CIFARDataModule):
            height = width = 32
        return cls(
            tuple(float(v) for v in mean) if mean is not None else None,
            tuple(float(v) for v in std) if std is not None else None,
            height,
            width,
            datamodule=f"{cls_.__module__}.{cls_.__qualname__}",
        )


def datamodule_class(checkpoint: Mapping[str, Any]) -> type | None:
    """The DataModule class a checkpoint was trained with (None if it names none or it cannot be imported)."""
    hparams = checkpoint.get(_DM_HPARAMS) or {}
    path = hparams.get("_class_path") if isinstance(hparams, Mapping) else None
    if not isinstance(path, str) or "." not in path:
        return None
    module, _, name = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    return found if isinstance(found, type) else None


def datamodule_init_args(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The DataModule's constructor arguments recorded in a checkpoint."""
    hparams = checkpoint.get(_DM_HPARAMS) or {}
    return {k: v for k, v in dict(hparams).items() if k not in _PRIVATE_KEYS}
