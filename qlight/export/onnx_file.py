"""Write a deployable network as an ONNX or QONNX file with its input contract in ``metadata_props``.

The graph is produced by PyTorch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``):
it exists unchanged from torch 2.4 to 2.14, needs no onnxscript, keeps module names in node names, and
turns the ``symbolic`` of an autograd function into a custom-domain node, which is how the QONNX
``Quant``/``BipolarQuant`` nodes are emitted (as Brevitas does). Opset 17; the batch dimension is
dynamic; the input is the normalised float32 NCHW tensor ``input``, the output ``logits``. Export runs in
``TrainingMode.PRESERVE`` on a network in eval mode so that the exporter does not fold BatchNorm into
the preceding convolution (its eval-mode peephole would), which would change the stored weights.
The exporter's own constant folding leaves small shape computations unfolded (the zero-channel
padding of ResNet's option-A shortcut becomes a ConstantOfShape/Concat/Reshape chain), which hides
tensor shapes from tools such as qonnx's shape inference; :func:`fold_small_constants` folds them.
"""

from __future__ import annotations

import importlib
import inspect
import io
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qlight.export.deploy import Flavour
from qlight.export.qonnx_ops import QONNX_DOMAIN, BipolarQuantNode, QuantNode

__all__ = ["OPSET", "MissingExtraError", "fold_small_constants", "require_extra", "write_onnx"]

OPSET = 17
#: modules each format needs, to write (and, for --verify, to run) its files
EXTRA_MODULES = {"onnx": ("onnx", "onnxruntime"), "qonnx": ("onnx", "onnxruntime", "qonnx")}


#: newer torch has a ``dynamo`` switch (True by default in 2.14); torch 2.4 has only the TorchScript exporter
_HAS_DYNAMO_SWITCH = "dynamo" in inspect.signature(torch.onnx.export).parameters
_TORCHSCRIPT_EXPORTER: dict[str, Any] = {"dynamo": False} if _HAS_DYNAMO_SWITCH else {}


class MissingExtraError(ImportError):
    """An optional dependency of ``qlight export`` is not installed (one line naming the extra)."""


def require_extra(fmt: str) -> None:
    """Import what ``--format fmt`` needs, or raise one line that names the ``export`` extra.

    Raises:
        MissingExtraError: a module of the extra is missing.
    """
    for module in EXTRA_MODULES.get(fmt, ()):
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise MissingExtraError(
                f"--format {fmt} needs the optional 'export' dependencies (missing module {module!r}): "
                f'pip install -e ".[export]" (or pip install "qlight[export]")'
            ) from err


def write_onnx(
    network: nn.Module,
    path: str | Path,
    flavour: Flavour,
    input_shape: tuple[int, int, int],
    metadata: Mapping[str, str],
    doc: str = "",
) -> Any:
    """Export ``network`` (from :func:`~qlight.export.deploy.deployable`) to ``path``; return the ONNX model.

    Args:
        network: the deployable network, in eval mode.
        path: the file to write.
        flavour: ``onnx`` (standard opset only) or ``qonnx`` (with ``Quant``/``BipolarQuant`` nodes).
        input_shape: ``(C, H, W)`` of one input image.
        metadata: ``metadata_props`` to record (input contract, class names, provenance).
        doc: the model's ``doc_string``.
    """
    import onnx

    example = torch.zeros(2, *input_shape)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # the TorchScript exporter announces its deprecation, and PRESERVE mode advises against folding
        warnings.simplefilter("ignore")
        torch.onnx.export(
            network.eval(),
            (example,),
            buffer,  # type: ignore[arg-type]  # a file object works as well as a path
            **_TORCHSCRIPT_EXPORTER,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=True,
            custom_opsets={QONNX_DOMAIN: 1} if _has_qonnx_nodes(network) else None,
        )
    model = onnx.load_from_string(buffer.getvalue())
    fold_small_constants(model)
    if flavour == "onnx":
        onnx.checker.check_model(model, full_check=True)
    model.doc_string = doc
    model.producer_name = "qlight"
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return model


def _has_qonnx_nodes(network: nn.Module) -> bool:
    return any(isinstance(m, QuantNode | BipolarQuantNode) for m in network.modules())


def fold_small_constants(model: Any, max_elements: int = 4096) -> None:
    """Fold constant subgraphs of the graph into initializers, in place.

    Standard-domain nodes whose inputs are all constant and whose outputs are small become initializers
    (evaluated with ``onnx.reference``); initializers nothing uses any more are dropped.

    Identity nodes (the exporter's aliases of shared weights) and custom-domain nodes are kept.
    """
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    known = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    kept, folded = [], []
    for node in graph.node:
        constant_inputs = all(name == "" or name in known for name in node.input)
        if node.domain in ("", "ai.onnx") and node.op_type != "Identity" and constant_inputs:
            feeds = {name: known[name] for name in node.input if name}
            outputs = ReferenceEvaluator(node).run(None, feeds)
            if all(np.asarray(out).size <= max_elements for out in outputs):
                for name, value in zip(node.output, outputs, strict=True):
                    known[name] = np.asarray(value)
                    folded.append(numpy_helper.from_array(np.asarray(value), name))
                continue
        kept.append(node)
    if not folded:
        return
    used = {name for node in kept for name in node.input} | {out.name for out in graph.output}
    initializers = [init for init in list(graph.initializer) + folded if init.name in used]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
