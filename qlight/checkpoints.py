"""Read a checkpoint file safely and cheaply, before anything expensive starts.

Every command that takes a checkpoint (``fit --ckpt_path``, ``validate``, ``test``, ``predict``,
``--model.init_from``, ``qlight export``) checks it first, so a missing, truncated or foreign file
is one ``qlight: error:`` line naming the option and the path, not a traceback after the data was
decoded and the loggers created.

Checkpoints are read with ``weights_only=True`` (no arbitrary code runs while unpickling) and
``mmap=True`` (the tensors are not read into memory until used), so the check costs milliseconds
even for large checkpoints.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "model_differences", "read_checkpoint"]


class CheckpointError(ValueError):
    """A checkpoint path that cannot be used, described in one line."""


def _first_line(err: BaseException) -> str:
    """The useful part of a loading error, without torch's advice to load with ``weights_only=False``."""
    text = str(err)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return f"it pickles a Python object that is not allow-listed for safe loading ({found.group(1)})"
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(err).__name__)
    return line if "weights_only" not in line else type(err).__name__


def read_checkpoint(
    path: str | os.PathLike[str], field: str, *, lightning: bool = True, map_location: str = "cpu"
) -> dict[str, Any]:
    """Load ``path`` as a checkpoint dict (memory-mapped, ``weights_only=True``) or raise one clear line.

    Args:
        path: the checkpoint file.
        field: the option the user set, e.g. ``ckpt_path`` or ``model.init_from``; it starts the message.
        lightning: require a Lightning checkpoint (a dict with ``state_dict``); otherwise a plain
            ``state_dict`` file (a dict of tensors) is accepted too.
        map_location: where tensors are mapped.

    Raises:
        CheckpointError: the file is missing, a folder, truncated, not written by ``torch.save``, holds
            objects that cannot be loaded safely, or is not a checkpoint.
    """
    p = Path(path)
    where = f"{field}={str(p)!r}"
    hint = "pass a checkpoint written by qlight fit (e.g. logs/<group>/<run>/version_N/checkpoints/last.ckpt)"
    if not p.exists():
        raise CheckpointError(f"{where}: no such file; {hint}")
    if p.is_dir():
        raise CheckpointError(f"{where} is a folder, not a checkpoint file; {hint}")
    if not zipfile.is_zipfile(p):
        size = p.stat().st_size
        raise CheckpointError(
            f"{where} ({size:,} bytes) is not a readable PyTorch checkpoint: truncated (e.g. a copy or "
            f"write that was cut short) or not written by torch.save; {hint}"
        )
    try:
        data = torch.load(p, map_location=map_location, weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as err:  # damaged or unsafe
        raise CheckpointError(f"{where} cannot be loaded: {_first_line(err)}; {hint}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{where} holds a {type(data).__name__}, not a checkpoint dict; {hint}")
    if lightning and "state_dict" not in data:
        raise CheckpointError(
            f"{where} is not a Lightning checkpoint (it has no 'state_dict'; keys: {sorted(data)[:6]}); {hint}"
        )
    if not lightning and "state_dict" not in data and not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{where} is neither a Lightning checkpoint nor a state_dict of tensors; {hint}")
    return data


NETWORK_HPARAMS = ("_class_path", "model", "model_kwargs", "num_classes", "quant")
"""The model hyper-parameters that define the network a checkpoint's weights belong to. The others
(learning-rate factors, calibration, ``compile``, ``init_from``, ...) may differ when resuming or
evaluating."""


#: model_kwargs the task takes from the checkpoint when the config leaves them unset (the option-A shortcut
#: placement, which checkpoints of older qlight versions do not record)
ADOPTED_MODEL_KWARGS = ("shortcut_pad",)


def model_differences(config: Mapping[str, Any], checkpoint: Mapping[str, Any]) -> list[str]:
    """``field: config value vs checkpoint value`` for each network-defining hyper-parameter that differs.

    ``quant`` is compared field by field (``quant.a_bits: 4 vs 2``); a spec against none reads
    ``quant: {...} vs None``. Fields the checkpoint does not record are not compared.
    """
    found = []
    for key in NETWORK_HPARAMS:
        if key not in checkpoint or key not in config:
            continue
        mine, theirs = config[key], checkpoint[key]
        if key == "model_kwargs":
            mine, theirs = dict(mine or {}), dict(theirs or {})
            for adopted in ADOPTED_MODEL_KWARGS:  # unset in the config: the checkpoint's value is used
                if adopted not in mine:
                    theirs.pop(adopted, None)
        if key == "quant":
            found += _quant_differences(_as_dict(mine), _as_dict(theirs))
        elif mine != theirs:
            found.append(f"{key}: {mine!r} vs {theirs!r}")
    return found


def _as_dict(spec: Any) -> dict[str, Any] | None:
    """A quantization spec (a QuantSpec, the CLI's dict, or None) as a dict with every field filled in."""
    from qlight.quant import QuantSpec

    if spec is None:
        return None
    if isinstance(spec, QuantSpec):
        return dataclasses.asdict(spec)
    try:
        return dataclasses.asdict(QuantSpec(**dict(spec)))
    except (TypeError, ValueError):  # a spec from another qlight version: compare what is there
        return dict(spec)


def _quant_differences(mine: dict[str, Any] | None, theirs: dict[str, Any] | None) -> list[str]:
    if mine is None or theirs is None:
        return [] if mine == theirs else [f"quant: {_short(mine)} vs {_short(theirs)}"]
    keys = list(mine) + [k for k in theirs if k not in mine]
    return [f"quant.{k}: {mine.get(k)!r} vs {theirs.get(k)!r}" for k in keys if mine.get(k) != theirs.get(k)]


def _short(spec: dict[str, Any] | None) -> str:
    """A spec by its main fields and those that differ from the defaults (``None``: a float model)."""
    from qlight.quant import QuantSpec

    if spec is None:
        return "None (float)"
    defaults = dataclasses.asdict(QuantSpec())
    main = ("weight", "w_bits", "act", "a_bits")
    shown = {k: v for k, v in spec.items() if k in main or defaults.get(k, object()) != v}
    return "{" + ", ".join(f"{k}: {v!r}" for k, v in shown.items()) + "}"
