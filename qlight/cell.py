"""Which table cell an experiment belongs to: (dataset, arch, method, W bits, A bits), read from its config.

The key is derived from a config dict — a run's saved ``config.yaml`` (fully resolved, long class paths)
or a shipped experiment YAML (short class names) — without building the model or the data, by the same
rules ``qlight.cli.describe_run`` applies to the instantiated objects: the dataset is the DataModule's
``dataset_name``, the architecture the task's ``model`` (without ``torchvision.``), the method the
``method_name`` of the first method callback (``bcgd``, ``binaryrelax``, ``aqe``, ``ede``) or else
``float``/``ste`` from the quantization spec, and the bits those of :func:`qlight.cli.bits_tag`.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any

from qlight.protocols import NamedDataset, TrainingMethod

#: a float part of the network counts as 32 bits (the papers' "16" and "32" both mean not quantized)
FLOAT_BITS = 32

#: modules searched for a short ``class_path`` (``BCGD``, ``CIFAR10DataModule``, ``LearningRateMonitor``)
_SHORT_NAME_MODULES = ("qlight.callbacks", "qlight.data", "lightning.pytorch.callbacks")


@dataclass(frozen=True, order=True)
class CellKey:
    """One cell of a results table; weight and activation bits are 32 for a float part."""

    dataset: str
    arch: str
    method: str
    w_bits: int
    a_bits: int

    @property
    def bits(self) -> str:
        """Qlight's tag: ``w1a4``, or ``float`` when nothing is quantized."""
        if self.w_bits >= FLOAT_BITS and self.a_bits >= FLOAT_BITS:
            return "float"
        return f"w{self.w_bits}a{self.a_bits}"

    def __str__(self) -> str:
        return f"{self.dataset}/{self.arch}/{self.method}/{self.bits}"


def normalize_bits(bits: int | None) -> int | None:
    """16-bit float parts (as the AQE tables write them) and 32-bit ones are the same cell."""
    if bits is None:
        return None
    return FLOAT_BITS if bits >= 16 else int(bits)


def resolve_class(class_path: str) -> type | None:
    """The class a config's ``class_path`` names (short names searched in qlight's packages), or None."""
    if "." in class_path:
        module, _, name = class_path.rpartition(".")
        candidates = [(module, name)]
    else:
        candidates = [(module, class_path) for module in _SHORT_NAME_MODULES]
    for module, name in candidates:
        try:
            found = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if isinstance(found, type):
            return found
    return None


def _init_args(section: Any) -> dict[str, Any]:
    if isinstance(section, dict):
        return section.get("init_args") or {}
    return {}


def config_dataset(config: dict[str, Any]) -> str:
    """``dataset_name`` of the config's DataModule (``cifar10``, ``imagenet``, ...)."""
    data = config.get("data") or {}
    class_path = data.get("class_path", "") if isinstance(data, dict) else ""
    cls = resolve_class(class_path) if class_path else None
    if isinstance(cls, NamedDataset) and cls.dataset_name:
        return cls.dataset_name
    return class_path.rpartition(".")[2].removesuffix("DataModule").lower() or "unknown"


def config_method(config: dict[str, Any]) -> str:
    """The first callback's ``method_name``; otherwise ``float`` without a quantization spec, else ``ste``."""
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    if isinstance(callbacks, dict):
        callbacks = [callbacks]
    for callback in callbacks:
        class_path = callback.get("class_path", "") if isinstance(callback, dict) else str(callback)
        cls = resolve_class(class_path) if class_path else None
        if isinstance(cls, TrainingMethod) and cls.method_name:
            return cls.method_name
    return "float" if _init_args(config.get("model")).get("quant") is None else "ste"


def config_bits(config: dict[str, Any]) -> tuple[int, int]:
    """(weight bits, activation bits) of the config's quantization spec; 32 for float parts."""
    from qlight.cli import bits_tag
    from qlight.quant import QuantSpec

    quant = _init_args(config.get("model")).get("quant")
    spec = QuantSpec(**quant) if isinstance(quant, dict) else None
    tag = bits_tag(spec)
    found = re.fullmatch(r"w(\d+)a(\d+)", tag)
    if found is None:
        return FLOAT_BITS, FLOAT_BITS
    return int(found.group(1)), int(found.group(2))


def cell_key(config: dict[str, Any]) -> CellKey:
    """The (dataset, arch, method, bits) cell of an experiment config.

    Raises:
        ValueError: the config has no ``model.init_args.model`` or an invalid quantization spec.
    """
    arch = _init_args(config.get("model")).get("model")
    if not isinstance(arch, str):
        # a ValueError, not a TypeError: the config's content is wrong, and callers report ValueErrors as such
        raise ValueError("config has no model.init_args.model (the architecture)")  # noqa: TRY004
    w_bits, a_bits = config_bits(config)
    return CellKey(
        dataset=config_dataset(config),
        arch=arch.removeprefix("torchvision."),
        method=config_method(config),
        w_bits=normalize_bits(w_bits) or FLOAT_BITS,
        a_bits=normalize_bits(a_bits) or FLOAT_BITS,
    )


def dotted_get(config: dict[str, Any], key: str) -> Any:
    """``config["a"]["b"]`` for ``key="a.b"``; a missing step gives None."""
    value: Any = config
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value
