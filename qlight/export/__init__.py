"""Export a trained qlight network for deployment, and check that the deployed file computes the same thing.

``qlight export --ckpt_path C --format qlight|onnx|qonnx [--verify]`` (:mod:`qlight.export.command`):

- ``qlight`` (:mod:`~qlight.export.packed`): bit-packed weights (1 bit per binary weight, ...), reloaded
  by :func:`load_exported` as a PyTorch module;
- ``onnx`` (:mod:`~qlight.export.onnx_ops`): standard opset, run by onnxruntime; weights at their
  quantized values, activation quantizers as exact standard ops;
- ``qonnx`` (:mod:`~qlight.export.qonnx_ops`): ``Quant``/``BipolarQuant`` nodes for FINN and Brevitas;
  quantizers QONNX cannot express exactly are refused.

Every file records its :class:`~qlight.export.contract.InputContract` (normalisation, size, channel
order, class names). ``--verify`` (:mod:`~qlight.export.verify`) runs the file in its runtime and compares
it with the checkpoint's hard-quantized PyTorch evaluation.
"""

from qlight.export.command import FORMATS, ExportError, ParityError, export_checkpoint, main
from qlight.export.contract import InputContract
from qlight.export.onnx_file import MissingExtraError
from qlight.export.onnx_ops import UnsupportedQuantizerError
from qlight.export.packed import FORMAT, ExportedClassifier, export_task, load_exported
from qlight.export.verify import DEFAULT_TOLERANCE, Parity

__all__ = [
    "DEFAULT_TOLERANCE",
    "FORMAT",
    "FORMATS",
    "ExportError",
    "ExportedClassifier",
    "InputContract",
    "MissingExtraError",
    "Parity",
    "ParityError",
    "UnsupportedQuantizerError",
    "export_checkpoint",
    "export_task",
    "load_exported",
    "main",
]
