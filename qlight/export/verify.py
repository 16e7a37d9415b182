"""Deployment parity: run an exported file in its runtime and compare it with the checkpoint's PyTorch eval.

Two checks, both needed for a pass:

1. **Tensors, exactly.** Every tensor of the checkpoint's hard-quantized network (each quantized weight
   ``Q(w)``, float weights and biases, BatchNorm statistics and affine, the clamped activation
   resolutions α) must be stored in the file bit for bit. A changed weight is caught here whatever
   its effect on the logits.
2. **Logits, on images.** The same normalised images go through the runtime (onnxruntime for ``onnx``,
   qonnx's node-by-node executor for ``qonnx``, ``load_exported`` for ``qlight``) and through
   ``model.eval()`` in PyTorch. With ``s = max(1, max |PyTorch logit|)`` and ``Δ_i`` the largest
   |Δlogit| of image i: top-1 must agree on every image, the median ``Δ_i`` must stay at float32
   rounding (``≤ 1e-4 · s``), and every image beyond rounding must be *explained by boundary flips*
   (:mod:`qlight.export.flips`) or stay within the tolerance (default ``0.05 · s``).

Why: quantizers are discontinuous. PyTorch and onnxruntime sum a convolution in different orders, so a
pre-activation can differ in its last float32 bits; where it lies that close to a level boundary (``kα`` of
the quantized ReLU, 0 of a sign) the two pick neighbouring levels, and that image's logits move by more
than rounding, on a trained network by several percent of ``s``. Such an image is rerun in PyTorch with
at most a few near-boundary activations sent to their neighbouring level; when that reproduces the
runtime's logits to rounding, the runtime computed the same network. A wrong op, constant or attribute
(say, a BatchNorm epsilon) moves the logits of every image, which the median catches however small the
change, and leaves images that no flip explains. Measured numbers: ``docs/export.md``. A network whose
arithmetic is exact in float32 (power-of-two scales, as in the tests) gives ``Δ = 0``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from qlight.export.flips import FlipExplanation, explain_flips
from qlight.export.onnx_ops import clamped_alpha
from qlight.quant import quant_acts, quant_layers
from qlight.quant.layers import QuantAct, TensorQuantizer

__all__ = [
    "DEFAULT_TOLERANCE",
    "ROUNDING_TOLERANCE",
    "Parity",
    "compare",
    "explain_differences",
    "missing_tensors",
    "onnxruntime_logits",
    "qonnx_logits",
    "reference_tensors",
    "runtime_logits",
]

#: largest |Δlogit| of any image, as a fraction of max(1, max |PyTorch logit|) (see the module docstring)
DEFAULT_TOLERANCE = 0.05
#: median over images of the largest |Δlogit|, same units: float32 rounding, no systematic difference
ROUNDING_TOLERANCE = 1e-4
#: at most this many images beyond rounding are searched for boundary flips (the rest count as unexplained)
MAX_EXPLAINED_IMAGES = 25


def reference_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The tensors an exact export of ``model`` (a quantized network in eval) must contain, by name.

    Quantized weights as ``Q(w)``, α clamped as the eval forward uses it, everything else as stored;
    schedule knobs that eval ignores (``mix``, ``rate_factor``) and shared duplicates are left out.
    """
    out: dict[str, Tensor] = {
        f"{name}.weight": layer.quantized_weight() for name, layer in quant_layers(model)
    }
    out.update({f"{name}.alpha": clamped_alpha(act) for name, act in quant_acts(model)})
    internal = tuple(
        f"{name}."
        for name, m in model.named_modules(remove_duplicate=False)
        if isinstance(m, QuantAct | TensorQuantizer)
    )
    seen: set[int] = set()
    for key, value in model.state_dict(keep_vars=True).items():
        if key in out or key.startswith(internal) or id(value) in seen or not value.is_floating_point():
            continue
        seen.add(id(value))
        out[key] = value
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def _stored_arrays(onnx_model: Any) -> set[bytes]:
    """The bytes of every float32 tensor stored in an ONNX graph (initializers and Constant nodes)."""
    from onnx import numpy_helper

    tensors = list(onnx_model.graph.initializer)
    for node in onnx_model.graph.node:
        if node.op_type == "Constant":
            tensors += [a.t for a in node.attribute if a.name == "value"]
    arrays = (numpy_helper.to_array(t) for t in tensors)
    return {a.astype(np.float32, copy=False).tobytes() for a in arrays if a.dtype == np.float32}


def missing_tensors(onnx_model: Any, reference: dict[str, Tensor]) -> list[str]:
    """Names of reference tensors that the ONNX graph does not store bit for bit."""
    stored = _stored_arrays(onnx_model)
    missing = []
    for name, tensor in reference.items():
        candidates = [tensor.numpy()]
        if tensor.dim() == 2:  # an exporter may keep a linear weight transposed (MatMul)
            candidates.append(np.ascontiguousarray(tensor.numpy().T))
        if not any(c.tobytes() in stored for c in candidates):
            missing.append(name)
    return missing


def onnxruntime_logits(path: str | Path, inputs: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits of an ONNX file run by onnxruntime (CPU, default graph optimisations)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    chunks = [
        session.run(["logits"], {"input": inputs[i : i + batch_size]})[0]
        for i in range(0, len(inputs), batch_size)
    ]
    return np.concatenate(chunks)


def qonnx_logits(path: str | Path, inputs: np.ndarray, batch_size: int = 50) -> np.ndarray:
    """Logits of a QONNX file run by qonnx's executor.

    ``execute_onnx`` runs custom nodes in numpy and standard nodes one at a time in onnxruntime. Batches
    are small because it keeps every intermediate tensor.
    """
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.change_batchsize import ChangeBatchSize
    from qonnx.transformation.infer_shapes import InferShapes

    base = ModelWrapper(str(path))
    by_size: dict[int, Any] = {}
    chunks = []
    for i in range(0, len(inputs), batch_size):
        chunk = np.ascontiguousarray(inputs[i : i + batch_size])
        if len(chunk) not in by_size:
            by_size[len(chunk)] = base.transform(ChangeBatchSize(len(chunk))).transform(InferShapes())
        chunks.append(execute_onnx(by_size[len(chunk)], {"input": chunk})["logits"])
    return np.concatenate(chunks)


RUNTIMES = {"onnx": ("onnxruntime", onnxruntime_logits), "qonnx": ("qonnx executor", qonnx_logits)}


def runtime_logits(fmt: str, path: str | Path, inputs: Tensor) -> np.ndarray:
    """Logits of the file of format ``fmt`` in its runtime."""
    return RUNTIMES[fmt][1](path, inputs.detach().float().cpu().numpy())


@dataclass
class Parity:
    """The result of comparing an exported file with the checkpoint's PyTorch eval."""

    runtime: str
    source: str
    images: int
    agreeing: int
    max_abs_diff: float
    median_abs_diff: float
    beyond_rounding: int
    max_abs_logit: float
    tolerance: float
    reference_correct: int | None = None
    runtime_correct: int | None = None
    tensors_checked: int = 0
    tensors_missing: list[str] = field(default_factory=list)
    #: images beyond rounding whose difference boundary flips reproduce (see :func:`explain_differences`)
    explanations: dict[int, FlipExplanation] = field(default_factory=dict)
    #: largest |Δlogit| of an image beyond rounding that no flip explains (all of them before explaining)
    unexplained_max_diff: float | None = None

    @property
    def unexplained_diff(self) -> float:
        """The |Δlogit| the tolerance bounds: of images not explained by boundary flips."""
        return self.max_abs_diff if self.unexplained_max_diff is None else self.unexplained_max_diff

    @property
    def scale(self) -> float:
        """``max(1, max |PyTorch logit|)``, the unit of both tolerances."""
        return max(1.0, self.max_abs_logit)

    @property
    def passed(self) -> bool:
        """Every tensor found, every top-1 equal, the median image at rounding, the unexplained within tolerance."""
        return (
            not self.tensors_missing
            and self.agreeing == self.images
            and self.median_abs_diff <= ROUNDING_TOLERANCE * self.scale
            and self.unexplained_diff <= self.tolerance * self.scale
        )

    def lines(self) -> list[str]:
        """The human report."""
        found = self.tensors_checked - len(self.tensors_missing)
        tensors = f"tensors: {found}/{self.tensors_checked} of the checkpoint's network stored bit for bit"
        if self.tensors_missing:
            more = len(self.tensors_missing) - 5
            tensors += f"; NOT found: {', '.join(self.tensors_missing[:5])}" + (
                f" and {more} more" if more > 0 else ""
            )
        s, rounding = self.scale, ROUNDING_TOLERANCE
        lines = [
            f"verify: {self.runtime} vs PyTorch eval of the checkpoint on {self.source}",
            f"  {tensors}",
            f"  top-1 agreement {100 * self.agreeing / self.images:.2f}% ({self.agreeing}/{self.images})",
            (
                f"  max |Δlogit| {self.max_abs_diff:.3g}, median over images {self.median_abs_diff:.3g} "
                f"(allowed {rounding * s:.3g} = {rounding:g} s), s = max(1, max |logit|) = {s:.3g}"
            ),
            *self._flip_lines(),
        ]
        if self.reference_correct is not None and self.runtime_correct is not None:
            lines.append(
                f"  accuracy: PyTorch {100 * self.reference_correct / self.images:.2f}%, {self.runtime} "
                f"{100 * self.runtime_correct / self.images:.2f}%"
            )
        lines.append(
            "  PASS" if self.passed else "  FAIL: the exported file does not compute the checkpoint's network"
        )
        return lines

    def _flip_lines(self) -> list[str]:
        """What the images beyond rounding are: boundary flips found, or differences left unexplained."""
        tol, s = self.tolerance, self.scale
        allowed = f"allowed {tol * s:.3g} = {tol:g} s"
        if not self.beyond_rounding:
            return ["  0 images differ beyond float rounding"]
        if self.unexplained_max_diff is None:
            return [
                (
                    f"  {self.beyond_rounding} image(s) differ beyond float rounding, not searched for boundary "
                    f"flips: max |Δlogit| {self.max_abs_diff:.3g} ({allowed})"
                )
            ]
        explained = len(self.explanations)
        lines = [
            (
                f"  {self.beyond_rounding} image(s) differ beyond float rounding: {explained} explained by "
                f"quantizer boundary flips, {self.beyond_rounding - explained} unexplained (max |Δlogit| "
                f"{self.unexplained_max_diff:.3g}, {allowed})"
            )
        ]
        for image, e in list(self.explanations.items())[:3]:
            where = "; ".join(
                f"{f.layer}{list(f.index[1:])} x={f.x:.9g}: {f.reference:.6g} -> {f.flipped:.6g}" for f in e.flips
            )
            lines.append(
                f"    image {image}: {len(e.flips)} flip(s) within {e.epsilon:g} of a level boundary reproduce "
                f"the runtime to {e.residual:.2g} ({where})"
            )
        return lines


def compare(
    reference: Tensor,
    runtime: np.ndarray,
    labels: Tensor | None,
    *,
    runtime_name: str,
    source: str,
    tolerance: float = DEFAULT_TOLERANCE,
    tensors_checked: int = 0,
    tensors_missing: list[str] | None = None,
) -> Parity:
    """Compare PyTorch logits with a runtime's logits on the same images."""
    ref = reference.detach().float().cpu().numpy()
    if runtime.shape != ref.shape:
        raise ValueError(f"the runtime returned logits of shape {runtime.shape}, PyTorch {ref.shape}")
    ref_top, rt_top = ref.argmax(axis=1), runtime.argmax(axis=1)
    per_image = np.abs(runtime - ref).max(axis=1) if ref.size else np.zeros(len(ref))
    scale = max(1.0, float(np.abs(ref).max())) if ref.size else 1.0
    correct: tuple[int | None, int | None] = (None, None)
    if labels is not None:
        y = labels.cpu().numpy()
        correct = (int((ref_top == y).sum()), int((rt_top == y).sum()))
    return Parity(
        runtime=runtime_name,
        source=source,
        images=len(ref),
        agreeing=int((ref_top == rt_top).sum()),
        max_abs_diff=float(per_image.max()) if len(ref) else 0.0,
        median_abs_diff=float(np.median(per_image)) if len(ref) else 0.0,
        beyond_rounding=int((~(per_image <= ROUNDING_TOLERANCE * scale)).sum()),
        max_abs_logit=float(np.abs(ref).max()) if ref.size else 0.0,
        tolerance=tolerance,
        reference_correct=correct[0],
        runtime_correct=correct[1],
        tensors_checked=tensors_checked,
        tensors_missing=list(tensors_missing or []),
    )


def explain_differences(
    parity: Parity,
    model: nn.Module,
    inputs: Tensor,
    reference: Tensor,
    runtime: np.ndarray,
    max_images: int = MAX_EXPLAINED_IMAGES,
) -> Parity:
    """``parity`` with its images beyond rounding searched for boundary flips (:mod:`qlight.export.flips`).

    Skipped when the median image is not at rounding: then the file differs systematically and the
    verdict is FAIL anyway. At most ``max_images`` images are searched; the others count as unexplained.
    """
    if parity.median_abs_diff > ROUNDING_TOLERANCE * parity.scale:
        return parity
    ref = reference.detach().float().cpu().numpy()
    per_image = np.abs(runtime - ref).max(axis=1) if ref.size else np.zeros(len(ref))
    beyond = np.nonzero(~(per_image <= ROUNDING_TOLERANCE * parity.scale))[0].tolist()
    explanations: dict[int, FlipExplanation] = {}
    for i in beyond[:max_images]:
        target = torch.from_numpy(np.ascontiguousarray(runtime[i]))
        found = explain_flips(model, inputs[i], target, ROUNDING_TOLERANCE * parity.scale)
        if found is not None:
            explanations[i] = found
    left = [per_image[i] for i in beyond if i not in explanations]
    return dataclasses.replace(
        parity, explanations=explanations, unexplained_max_diff=float(max(left, default=0.0))
    )
