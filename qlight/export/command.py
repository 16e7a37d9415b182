"""``qlight export``: write the truly quantized network of a checkpoint, and check it in its runtime.

::

    qlight export --ckpt_path C [--format qlight|onnx|qonnx] [--output O] [--allow-float]
                  [--verify | --verify-only] [--samples N] [--tolerance T] [--data.root R ...]

The checkpoint is checked first (:func:`qlight.checkpoints.read_checkpoint`: one ``qlight: error:`` line
and exit status 2 for a missing, truncated or foreign file), then the format's optional dependencies,
then the data options; only then is the model loaded. ``--verify`` compares the file, run in its runtime,
with the checkpoint's hard-quantized PyTorch evaluation (:mod:`qlight.export.verify`) and exits with
status 1 when they differ; ``--verify-only`` checks an existing file (``--output``) without writing it.
"""

from __future__ import annotations

import inspect
import json
import logging
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

import qlight
from qlight.checkpoints import CheckpointError, read_checkpoint
from qlight.data import DatasetError
from qlight.export.contract import InputContract, datamodule_class, datamodule_init_args
from qlight.export.deploy import deployable
from qlight.export.footprint import footprint
from qlight.export.inputs import (
    VerificationImages,
    class_names_of,
    probe_class_names,
    random_images,
    validation_images,
)
from qlight.export.onnx_file import MissingExtraError, require_extra, write_onnx
from qlight.export.onnx_ops import UnsupportedQuantizerError
from qlight.export.packed import export_task, load_exported
from qlight.export.verify import (
    DEFAULT_TOLERANCE,
    RUNTIMES,
    Parity,
    compare,
    explain_differences,
    missing_tensors,
    reference_tensors,
    runtime_logits,
)
from qlight.quant import iter_quant_modules
from qlight.tasks import ImageClassifier

__all__ = ["FORMATS", "ExportError", "ParityError", "export_checkpoint", "main"]

FORMATS = ("qlight", "onnx", "qonnx")
#: default output: the checkpoint's path with this suffix
SUFFIXES = {"qlight": ".quantized.pt", "onnx": ".onnx", "qonnx": ".qonnx.onnx"}


class ExportError(ValueError):
    """A bad ``qlight export`` request, described in one line."""


class ParityError(RuntimeError):
    """``--verify`` found that the exported file does not compute the checkpoint's network."""

    def __init__(self, parity: Parity) -> None:
        super().__init__(" ".join(parity.lines()[1:-1]))
        self.parity = parity


def _is_float(quant: Any) -> bool:
    """Whether a checkpoint's ``quant`` hyper-parameter leaves nothing quantized."""
    if quant is None:
        return True
    spec = quant if isinstance(quant, Mapping) else getattr(quant, "__dict__", {})
    return spec.get("weight") == "float" and spec.get("act") == "float"


def _datamodule(
    checkpoint: Mapping[str, Any], overrides: Mapping[str, Any] | None, log: Callable[[str], None]
) -> Any:
    """The run's DataModule with ``overrides``, or None when its data are not reachable and none were given.

    Raises:
        ExportError: ``--data.*`` was given but the checkpoint names no DataModule, or the given data are bad.
    """
    cls = datamodule_class(checkpoint)
    if cls is None:
        if overrides:
            raise ExportError(
                f"--data.{next(iter(overrides))} was given, but the checkpoint records no DataModule "
                "(it was not written by qlight fit); --verify then runs on random images"
            )
        return None
    params = inspect.signature(cls).parameters
    args = {k: v for k, v in datamodule_init_args(checkpoint).items() if k in params}
    args.update(overrides or {})
    try:
        return cls(**args)
    except (DatasetError, ValueError, OSError) as err:
        if overrides:
            raise ExportError(f"data: {err}") from None
        log(f"qlight export: the run's data are not reachable here ({err}); pass --data.root to use them")
        return None


def _class_names(datamodule: Any, log: Callable[[str], None]) -> list[str] | None:
    """The run's class names, read cheaply where possible (see :func:`probe_class_names`)."""
    if datamodule is None:
        return None
    names = class_names_of(datamodule)
    if names is None:
        try:
            params = inspect.signature(type(datamodule)).parameters
            args = {k: v for k, v in dict(datamodule.hparams).items() if k in params}
            logging.disable(logging.INFO)  # the DataModule announces the (tiny) decode
            names = probe_class_names(type(datamodule), args)
        except (DatasetError, ValueError, OSError) as err:
            log(f"qlight export: class names not recorded ({err})")
        finally:
            logging.disable(logging.NOTSET)
    return names


def _metadata(
    fmt: str, path: Path, checkpoint: Mapping[str, Any], task: ImageClassifier, contract: InputContract
) -> dict[str, str]:
    hp = task.hparams
    spec = task.quant_spec
    return contract.metadata() | {
        "qlight.format": fmt,
        "qlight.version": qlight.__version__,
        "qlight.checkpoint": path.name,
        "qlight.epoch": str(checkpoint.get("epoch")),
        "qlight.global_step": str(checkpoint.get("global_step")),
        "qlight.model": str(hp["model"]),
        "qlight.model_kwargs": json.dumps(dict(hp.get("model_kwargs") or {})),
        "qlight.quant": json.dumps(spec.to_dict() if spec is not None else None),
        "output": f"logits: N x {int(hp['num_classes'])} float32, unnormalised; argmax is the class index "
        "(names in class_names)",
    }


def _doc(fmt: str, contract: InputContract) -> str:
    kind = (
        "standard ONNX ops only; quantized weights stored as float32 values level x scale; activation "
        "quantizers as exact Relu/Div/Ceil/Clip/Where/Mul (BCGD) or Clip/Where/Sign (AQE)"
        if fmt == "onnx"
        else "QONNX: quantized weights and activations as Quant/BipolarQuant nodes "
        "(domain qonnx.custom_op.general)"
    )
    return f"qlight {qlight.__version__} export ({kind}). Input 'input': {contract.formula}. Output 'logits'."


def _torch_logits(model: torch.nn.Module, inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [model.eval()(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
        )


def _verify(
    fmt: str, out: Path, task: ImageClassifier, images: VerificationImages, tolerance: float
) -> Parity:
    """Run ``out`` in its runtime and compare it with the task's PyTorch eval (tensors and logits)."""
    reference = reference_tensors(task.model)
    try:
        if fmt == "qlight":
            exported = load_exported(out)
            stored = {
                v.float().numpy().tobytes() for v in exported.state_dict().values() if v.is_floating_point()
            }
            missing = [k for k, v in reference.items() if v.numpy().tobytes() not in stored]
            runtime, logits = "qlight load_exported (PyTorch)", _torch_logits(exported, images.inputs).numpy()
        else:
            import onnx

            missing = missing_tensors(onnx.load(str(out)), reference)
            runtime, logits = RUNTIMES[fmt][0], runtime_logits(fmt, out, images.inputs)
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file: whatever its runtime raises, in one line
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise ExportError(f"output={str(out)!r} is not a runnable {fmt!r} export: {first[:300]}") from None
    torch_logits = _torch_logits(task.model, images.inputs)
    parity = compare(
        torch_logits,
        logits,
        images.labels,
        runtime_name=runtime,
        source=images.source,
        tolerance=tolerance,
        tensors_checked=len(reference),
        tensors_missing=missing,
    )
    return explain_differences(parity, task.model, images.inputs, torch_logits, logits)


def export_checkpoint(
    ckpt_path: str | Path,
    output: str | Path | None = None,
    format: str = "qlight",
    *,
    allow_float: bool = False,
    verify: bool = False,
    verify_only: bool = False,
    samples: int = 1000,
    tolerance: float = DEFAULT_TOLERANCE,
    data: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Export a ``qlight fit`` checkpoint; with ``verify``, check the file in its runtime.

    Args:
        ckpt_path: ``last.ckpt``, ``best-epochNNN.ckpt``, ...
        output: the file to write (default: the checkpoint's path with ``.quantized.pt``, ``.onnx`` or
            ``.qonnx.onnx``).
        format: ``qlight`` (bit-packed, for :func:`~qlight.export.packed.load_exported`), ``onnx`` (standard
            opset, onnxruntime) or ``qonnx`` (``Quant``/``BipolarQuant`` nodes, FINN/Brevitas).
        allow_float: export a checkpoint in which nothing is quantized.
        verify: run the file in its runtime on ``samples`` images and compare with PyTorch.
        verify_only: verify the existing ``output`` file instead of writing it.
        samples: number of verification images.
        tolerance: allowed max |Δlogit| of an image that no boundary flip explains, as a fraction of
            max(1, max |logit|).
        data: overrides of the run's DataModule arguments for the verification images (e.g. ``root``).
        log: where the report lines go.

    Returns:
        The path written.

    Raises:
        ExportError, CheckpointError, MissingExtraError, UnsupportedQuantizerError: bad request (one line).
        ParityError: ``verify`` found a difference (the file is written and the report logged).
    """
    if format not in FORMATS:
        raise ExportError(f"format={format!r} is not supported; valid: {list(FORMATS)}")
    if samples < 1:
        raise ExportError(f"samples={samples} is invalid: it must be a positive integer")
    if not tolerance > 0:
        raise ExportError(f"tolerance={tolerance} is invalid: it must be > 0")
    path = Path(ckpt_path)
    checkpoint = read_checkpoint(path, "ckpt_path")
    hparams = checkpoint.get("hyper_parameters") or {}
    if "model" not in hparams:
        raise ExportError(
            f"ckpt_path={str(path)!r} was not written by an ImageClassifier (no 'model' hyper-parameter)"
        )
    if _is_float(hparams.get("quant")) and not allow_float:
        raise ExportError(
            f"ckpt_path={str(path)!r} is a float checkpoint (its model.quant quantizes nothing); export the "
            "quantized run's checkpoint, or pass --allow-float to export the float network"
        )
    require_extra(format)
    out = Path(output) if output else path.with_suffix(SUFFIXES[format])
    if verify_only and not out.is_file():
        raise ExportError(
            f"--verify-only: output={str(out)!r} does not exist; export it first (without --verify-only)"
        )
    contract = InputContract.from_checkpoint(checkpoint)
    datamodule = _datamodule(checkpoint, data, log)
    images = None
    if verify or verify_only:
        images = (
            validation_images(datamodule, samples)
            if datamodule is not None
            else random_images(contract, samples)
        )
    task = ImageClassifier.load_from_checkpoint(path, map_location="cpu").eval()
    if not allow_float and not any(True for _ in iter_quant_modules(task.model)):
        raise ExportError(
            f"ckpt_path={str(path)!r} is a float checkpoint (its model.quant quantizes no layer); export the "
            "quantized run's checkpoint, or pass --allow-float to export the float network"
        )
    if not verify_only:
        contract = contract.with_class_names(_class_names(datamodule, log))
        _write(format, out, path, checkpoint, task, contract)
        log(f"qlight export: wrote {out} ({format}, {out.stat().st_size / 1e6:.3f} MB)")
        log(f"  {footprint(task.model).summary()}")
        names = f"; classes {', '.join(contract.class_names)}" if contract.class_names else ""
        log(f"  input: {contract.formula}{names}")
    if images is not None:
        parity = _verify(format, out, task, images, tolerance)
        for line in parity.lines():
            log(line)
        if not parity.passed:
            raise ParityError(parity)
    return out


def _write(
    fmt: str,
    out: Path,
    ckpt_path: Path,
    checkpoint: Mapping[str, Any],
    task: ImageClassifier,
    contract: InputContract,
) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "qlight":
        torch.save(export_task(task, contract), out)
        return
    shape = (len(contract.mean or (0, 0, 0)), contract.height or 32, contract.width or 32)
    network = deployable(task.model, fmt)  # type: ignore[arg-type]
    metadata = _metadata(fmt, ckpt_path, checkpoint, task, contract)
    write_onnx(network, out, fmt, shape, metadata, _doc(fmt, contract))  # type: ignore[arg-type]


def _peek(argv: list[str], option: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    return None


def _parser(datamodule_cls: type | None, defaults: Mapping[str, Any]) -> Any:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="qlight export",
        description="Write the truly quantized network of a qlight checkpoint (qlight, ONNX or QONNX) and "
        "optionally check it in its runtime against the checkpoint's PyTorch evaluation.",
        exit_on_error=False,
        epilog="--data.<arg>: the arguments of the run's DataModule, defaulting to the checkpoint's (e.g. "
        "--data.root for the verification images); qlight export --ckpt_path C --help lists them.",
    )
    parser.add_argument("--ckpt_path", type=str, required=True, help="checkpoint written by qlight fit")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="qlight",
        help="qlight: bit-packed, for load_exported; onnx: standard opset (onnxruntime); "
        "qonnx: Quant/BipolarQuant nodes (FINN, Brevitas)",
    )
    parser.add_argument(
        "--output",
        type=str,
        default=None,
        help="file to write (default: the checkpoint path with .quantized.pt, .onnx or .qonnx.onnx)",
    )
    parser.add_argument(
        "--allow-float", action="store_true", help="export a checkpoint with nothing quantized"
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="run the file in its runtime and compare with the checkpoint's PyTorch eval (exit 1: differ)",
    )
    parser.add_argument(
        "--verify-only",
        action="store_true",
        help="verify the existing --output file against the checkpoint instead of writing it",
    )
    parser.add_argument("--samples", type=int, default=1000, help="number of verification images")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="allowed max |Δlogit| of an image no quantizer boundary flip explains, as a fraction of "
        "max(1, max |logit|)",
    )
    if datamodule_cls is not None:
        parser.add_class_arguments(
            datamodule_cls, "data", help="the run's DataModule (defaults from the checkpoint)"
        )
        parser.set_defaults({f"data.{k}": v for k, v in defaults.items()})
    return parser


def _run(argv: list[str]) -> Path:
    from jsonargparse import ArgumentError

    ckpt = _peek(argv, "--ckpt_path")
    wants_help = "--help" in argv or "-h" in argv
    if ckpt is None and not wants_help:
        raise ExportError(
            "--ckpt_path is required: a checkpoint written by qlight fit "
            "(e.g. logs/<group>/<run>/version_N/checkpoints/last.ckpt)"
        )
    checkpoint = read_checkpoint(ckpt, "ckpt_path") if ckpt else {}
    cls = datamodule_class(checkpoint)
    defaults = {}
    if cls is not None:
        params = inspect.signature(cls).parameters
        defaults = {k: v for k, v in datamodule_init_args(checkpoint).items() if k in params}
    given_data = [a.split("=", 1)[0].removeprefix("--data.") for a in argv if a.startswith("--data.")]
    if given_data and cls is None and checkpoint:
        raise ExportError(f"--data.{given_data[0]} was given, but ckpt_path={ckpt!r} records no DataModule")
    try:
        ns = _parser(cls, defaults).parse_args(argv)
    except ArgumentError as err:
        raise ExportError("; ".join(line.strip() for line in str(err).splitlines() if line.strip())) from None
    data = None
    if given_data and cls is not None:
        parsed = ns.data.as_dict() if hasattr(ns.data, "as_dict") else dict(vars(ns.data))
        data = {k: parsed[k] for k in given_data if k in parsed}
    return export_checkpoint(
        ns.ckpt_path,
        ns.output,
        ns.format,
        allow_float=ns.allow_float,
        verify=ns.verify,
        verify_only=ns.verify_only,
        samples=ns.samples,
        tolerance=ns.tolerance,
        data=data,
    )


def main(args: list[str] | None = None) -> Path:
    """``qlight export ...``: exit 2 with one ``qlight: error:`` line on bad input, 1 when --verify fails."""
    argv = list(sys.argv[2:] if args is None else args)
    try:
        return _run(argv)
    except ParityError:
        print(
            "qlight: error: --verify failed: the exported file does not compute the checkpoint's network "
            "(report above)",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
    except (
        ExportError,
        CheckpointError,
        MissingExtraError,
        UnsupportedQuantizerError,
        DatasetError,
        FileNotFoundError,
    ) as err:
        print(f"qlight: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
