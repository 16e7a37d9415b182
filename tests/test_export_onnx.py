"""``qlight export --format onnx|qonnx``: exact activation ops, QONNX nodes and what they refuse, whole
networks through onnxruntime and qonnx's executor, and ``--verify``.

Parity through the runtimes is tested on networks whose float32 arithmetic is exact (``exportnets.py``):
a correct export must then reproduce the PyTorch logits bit for bit, on any CPU. Single ops are tested on
dense grids that include every decision boundary and its float32 neighbours.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from exportnets import (
    NETWORKS,
    ExactCifar10DataModule,
    exact_inputs,
    exact_task,
    random_task,
    run_export,
    save_checkpoint,
)
from torch import Tensor, nn

import qlight.quant.functional as QF
from qlight.export.deploy import deployable
from qlight.export.onnx_file import write_onnx
from qlight.export.onnx_ops import (
    HardtanhQuantOp,
    ReluQuantOp,
    UnsupportedQuantizerError,
    top_level_needs_comparison,
)
from qlight.export.qonnx_ops import (
    BipolarQuantNode,
    QuantNode,
    ReluQuantNode,
    hardtanh_quant_node,
    weight_quant_node,
)
from qlight.export.verify import qonnx_logits
from qlight.quant import QuantAct, QuantConv2d, QuantHardtanh, TensorQuantizer, quant_layers

onnx = pytest.importorskip("onnx", reason="the export extra is not installed: pip install -e '.[export]'")
ort = pytest.importorskip("onnxruntime", reason="the export extra is not installed")
pytest.importorskip("qonnx", reason="the export extra is not installed")

W = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(0))
#: quantized weights by quantizer: (tensor, quantizer, bits, per_channel)
WEIGHTS = {
    "binary": (QF.binary_weight(W), "binary", None, False),
    "binary_per_channel": (QF.binary_weight(W, per_channel=True), "binary", None, True),
    "ternary": (QF.ternary_weight(W), "ternary", None, False),
    "uniform2": (QF.uniform_weight(W, 2), "uniform", 2, False),
    "uniform4_per_channel": (QF.uniform_weight(W, 4, per_channel=True), "uniform", 4, True),
    "uniform8": (QF.uniform_weight(W, 8), "uniform", 8, False),
    "sign": (QF.sign_quant(W), "sign", None, False),
    "ternary_unit": (QF.ternary_quant(W), "ternary_unit", None, False),
}


def _eval_outputs(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model.eval()(x)


# --------------------------------------------------------------------------- exact activation ops


def _boundary_grid(points: list[float], extra: Tensor) -> Tensor:
    """``points`` and their float32 neighbours (two ulps each way), plus ``extra``."""
    base = torch.tensor(points, dtype=torch.float32)
    grid = [base]
    up, down = base.clone(), base.clone()
    for _ in range(2):
        up, down = torch.nextafter(up, torch.tensor(np.inf)), torch.nextafter(down, torch.tensor(-np.inf))
        grid += [up, down]
    return torch.cat(grid + [extra.float()])


def _run_onnx(module: nn.Module, x: Tensor, flavour: str, path: Path) -> np.ndarray:
    """Run a one-module graph on the flat tensor ``x`` in onnxruntime (onnx) or qonnx's executor (qonnx)."""

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, v: Tensor) -> Tensor:
            return self.inner(v)

    n = x.numel()
    write_onnx(Wrap().eval(), path, flavour, (1, 1, n), {})  # type: ignore[arg-type]
    inputs = x.reshape(1, 1, 1, n).numpy()
    if flavour == "onnx":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"input": inputs})[0].reshape(-1)
    return qonnx_logits(path, inputs).reshape(-1)


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("mode", ["ceil", "round"])
def test_quantized_relu_ops_equal_act_quant(tmp_path: Path, bits: int, mode: str) -> None:
    levels = 2**bits - 1
    for alpha_value in (0.1946, 0.3, 1.2221):
        alpha = torch.tensor(alpha_value)
        assert not top_level_needs_comparison(alpha, levels)  # that case: the next test
        boundaries = [k * alpha_value for k in range(levels + 1)] + [0.0, float((levels - 1.0) * alpha)]
        x = _boundary_grid(boundaries, torch.linspace(-1, (levels + 1) * alpha_value, 4001))
        expected = QF.act_quant(x, alpha, bits, mode)
        op = ReluQuantOp(alpha, bits, mode)
        assert torch.equal(op(x), expected)
        assert np.array_equal(_run_onnx(op, x, "onnx", tmp_path / "relu.onnx"), expected.numpy())
        act = QuantAct(bits, alpha_init=alpha_value, mode=mode).eval()
        assert np.array_equal(
            _run_onnx(ReluQuantNode(act), x, "qonnx", tmp_path / "relu.qonnx"), expected.numpy()
        )


def _alpha_needing_the_top_comparison(levels: int) -> Tensor:
    for i in range(10_000):
        alpha = torch.tensor(0.1 + i * 1e-5)
        if top_level_needs_comparison(alpha, levels):
            return alpha
    raise AssertionError("no such alpha")


def test_ceil_mode_sends_x_above_the_top_threshold_to_the_top_level(tmp_path: Path) -> None:
    """The authors' code compares x with (L-1)·α: just above it the level is L, even where float32
    division rounds x/α down to L-1."""
    bits, levels = 4, 15
    alpha = _alpha_needing_the_top_comparison(levels)
    threshold = (levels - 1.0) * alpha
    x = torch.stack([threshold, torch.nextafter(threshold, torch.tensor(np.inf))])
    assert float(x[1] / alpha) <= levels - 1  # the division alone would give level L-1
    authors = torch.stack([(levels - 1) * alpha, levels * alpha])
    op = ReluQuantOp(alpha, bits, "ceil")
    assert op.compare_top and torch.equal(op(x), authors)
    assert np.array_equal(_run_onnx(op, x, "onnx", tmp_path / "top.onnx"), authors.numpy())
    act = QuantAct(bits, alpha_init=float(alpha)).eval()
    assert np.array_equal(_run_onnx(ReluQuantNode(act), x, "qonnx", tmp_path / "top.qonnx"), authors.numpy())
    assert torch.equal(QF.act_quant(x, alpha, bits, "ceil"), authors)
    assert torch.equal(QuantAct(bits, alpha_init=float(alpha)).eval()(x), authors)


@pytest.mark.parametrize(
    ("quantizer", "bits", "kwargs"),
    [
        ("sign", 1, {}),
        ("ternary_unit", 2, {}),
        ("ternary_unit", 2, {"delta": 0.3}),
        ("pow2_unit", 3, {}),
        ("pow2_unit", 4, {}),
        ("pow2_unit", 3, {"thresholds": [0.1, 0.3, 0.7]}),
    ],
)
def test_hardtanh_quantizer_ops_equal_the_eval_forward(
    tmp_path: Path, quantizer: str, bits: int, kwargs: dict[str, Any]
) -> None:
    layer = QuantHardtanh(act_quantizer=TensorQuantizer(quantizer, bits, quantizer_kwargs=kwargs)).eval()
    points = [0.0, 1.0, -1.0, 0.5, -0.5, kwargs.get("delta", 0.5), -kwargs.get("delta", 0.5)]
    if quantizer == "pow2_unit":
        levels = QF.pow2_levels(bits)
        thresholds = kwargs.get("thresholds") or [(a + b) / 2 for a, b in itertools.pairwise(levels)]
        points += [s * t for t in thresholds + levels for s in (1, -1)]
    x = _boundary_grid(points, torch.linspace(-1.5, 1.5, 6001))
    with torch.no_grad():
        expected = layer(x)
    op = HardtanhQuantOp.from_layer(layer)
    assert torch.equal(op(x), expected)
    assert np.array_equal(_run_onnx(op, x, "onnx", tmp_path / "h.onnx"), expected.numpy())
    if quantizer == "pow2_unit" or kwargs.get("delta", 0.5) != 0.5:
        with pytest.raises(UnsupportedQuantizerError, match="no exact QONNX form.*export with --format onnx"):
            hardtanh_quant_node("features.2", layer)
    else:
        node = hardtanh_quant_node("features.2", layer)
        assert np.array_equal(_run_onnx(node, x, "qonnx", tmp_path / "h.qonnx"), expected.numpy())


@pytest.mark.parametrize("case", sorted(WEIGHTS))
def test_qonnx_weight_nodes_reproduce_the_quantized_weights(case: str) -> None:
    weight, quantizer, bits, per_channel = WEIGHTS[case]
    layer = QuantConv2d(8, 16, 3, weight_quantizer=TensorQuantizer(quantizer, bits, per_channel=per_channel))
    node = weight_quant_node("conv", layer, weight)
    assert isinstance(node, BipolarQuantNode if quantizer in ("binary", "sign") else QuantNode)
    assert torch.equal(node(weight), weight)  # the PyTorch twin
    assert np.array_equal(node.reference(weight.numpy()), weight.numpy())  # qonnx's own implementation


def test_qonnx_refuses_what_it_cannot_express() -> None:
    pow2 = QuantConv2d(8, 16, 3, weight_quantizer=TensorQuantizer("pow2", 3))
    with pytest.raises(
        UnsupportedQuantizerError, match=r"conv: weight quantizer 'pow2' has no exact QONNX form"
    ):
        weight_quant_node("conv", pow2, QF.pow2_weight(W, 3))
    binary = QuantConv2d(8, 16, 3, weight_quantizer=TensorQuantizer("binary"))
    with_zero = WEIGHTS["binary"][0].clone()
    with_zero[0, 0, 0, 0] = 0.0
    with pytest.raises(UnsupportedQuantizerError, match="1 of its binary weights are exactly 0"):
        weight_quant_node("conv", binary, with_zero)


# --------------------------------------------------------------------------- whole networks


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_deployable_network_computes_the_eval_exactly(name: str) -> None:
    """The module that is traced equals the checkpoint's eval in PyTorch, on ordinary float inputs."""
    task = random_task(name)
    x = torch.randn(4, 3, 32, 32)
    expected = _eval_outputs(task.model, x)
    for flavour in ("onnx", "qonnx"):
        if name == "convnet_d_w3a3" and flavour == "qonnx":
            with pytest.raises(UnsupportedQuantizerError, match="'pow2_unit' has no exact QONNX form"):
                deployable(task.model, flavour)
            continue
        network = deployable(task.model, flavour)
        assert not any(isinstance(m, QuantAct | QuantHardtanh | QuantConv2d) for m in network.modules())
        assert torch.equal(_eval_outputs(network, x), expected)


EXPORTS = [
    ("resnet20_w1a4", "onnx"),
    ("resnet20_w1a4", "qonnx"),
    ("vgg11_w2a4", "onnx"),
    ("vgg11_w2a4", "qonnx"),
    ("convnet_d_w1a1", "onnx"),
    ("convnet_d_w1a1", "qonnx"),
    ("convnet_d_w3a3", "onnx"),
]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("name", "fmt"), EXPORTS, ids=[f"{n}-{f}" for n, f in EXPORTS])
def test_export_and_verify_reproduces_the_logits_exactly(
    name: str, fmt: str, cifar10_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = exact_task(name)
    ckpt = save_checkpoint(task, tmp_path / "last.ckpt", cifar10_folder)
    out = tmp_path / f"model.{fmt}"
    code, stdout, stderr = run_export(
        ["--ckpt_path", str(ckpt), "--format", fmt, "--output", str(out), "--verify", "--samples", "6"],
        capsys,
    )
    assert code == 0, stdout + stderr
    assert "tensors: " in stdout and "NOT found" not in stdout
    assert "top-1 agreement 100.00% (6/6)" in stdout
    assert "max |Δlogit| 0, " in stdout and "median over images 0 (" in stdout and "PASS" in stdout
    assert "6 validation images of ExactCifar10DataModule" in stdout
    assert "accuracy: PyTorch" in stdout
    # the same logits, computed here independently of the command's own comparison
    x = exact_inputs(5, seed=3)
    expected = _eval_outputs(task.model, x).numpy()
    model = onnx.load(str(out))
    ops = {node.op_type for node in model.graph.node}
    if fmt == "onnx":
        assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
        assert "BatchNormalization" in ops  # kept, so the weights stay at their quantized values
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        assert np.array_equal(session.run(None, {"input": x.numpy()})[0], expected)
        dims = model.graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    else:
        assert {"Quant", "BipolarQuant"} & ops
        n_quantized = len(quant_layers(task.model))
        quant_nodes = [n for n in model.graph.node if n.op_type in ("Quant", "BipolarQuant")]
        assert len(quant_nodes) >= n_quantized  # one per quantized weight, plus the activations
        assert np.array_equal(qonnx_logits(out, x.numpy()), expected)
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["input.mean"]) == pytest.approx(list(ExactCifar10DataModule.mean))
    assert props["input.size"] == "32x32" and props["input.channel_order"] == "RGB"
    assert json.loads(props["class_names"])[:2] == ["airplane", "automobile"]
    assert props["qlight.format"] == fmt and props["qlight.epoch"] == "3"


@pytest.mark.usefixtures("one_thread")
def test_float_network_exports_to_onnx_with_allow_float(
    cifar10_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = random_task("resnet20_float")
    ckpt = save_checkpoint(task, tmp_path / "float.ckpt", cifar10_folder)
    code, _, err = run_export(["--ckpt_path", str(ckpt), "--format", "onnx"], capsys)
    assert code == 2 and "is a float checkpoint" in err and not (tmp_path / "float.onnx").exists()
    for fmt in ("onnx", "qonnx"):  # a float network has no quantizer: its QONNX form is plain ONNX
        args = ["--ckpt_path", str(ckpt), "--format", fmt, "--allow-float", "--verify", "--samples", "4"]
        code, out, err = run_export(args, capsys)
        assert code == 0, out + err
        assert "float network" in out and "PASS" in out and "top-1 agreement 100.00% (4/4)" in out
    model = onnx.load(str(tmp_path / "float.qonnx.onnx"))
    assert not {"Quant", "BipolarQuant"} & {n.op_type for n in model.graph.node}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("fmt", ["onnx", "qonnx"])
def test_verify_fails_on_a_tampered_file(
    fmt: str, cifar10_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = exact_task("resnet20_w1a4")
    ckpt = save_checkpoint(task, tmp_path / "last.ckpt", cifar10_folder)
    out = tmp_path / f"model.{fmt}"
    assert run_export(["--ckpt_path", str(ckpt), "--format", fmt, "--output", str(out)], capsys)[0] == 0
    model = onnx.load(str(out))
    (weight,) = [t for t in model.graph.initializer if t.name == "layer1.0.conv1.weight"]
    values = onnx.numpy_helper.to_array(weight).copy()
    # onnx: one weight changes sign; qonnx: one weight moves to 0.9 x its value, which BipolarQuant maps back
    # onto the same level, so the logits stay equal and only the tensor check can see it
    values.flat[7] = -values.flat[7] if fmt == "onnx" else 0.9 * values.flat[7]
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    onnx.save(model, str(out))

    code, stdout, stderr = run_export(
        ["--ckpt_path", str(ckpt), "--format", fmt, "--output", str(out), "--verify-only", "--samples", "6"],
        capsys,
    )
    assert code == 1
    assert "NOT found: layer1.0.conv1.weight" in stdout and "FAIL" in stdout
    assert stderr.strip() == (
        "qlight: error: --verify failed: the exported file does not compute the checkpoint's network "
        "(report above)"
    )
    if fmt == "onnx":
        assert "median over images 0 (" not in stdout  # the logits moved too


def test_qonnx_export_of_power_of_two_quantizers_fails_with_the_documented_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = random_task("convnet_d_w3a3")
    ckpt = save_checkpoint(task, tmp_path / "w3a3.ckpt", None)
    code, _out, err = run_export(["--ckpt_path", str(ckpt), "--format", "qonnx"], capsys)
    assert code == 2 and not (tmp_path / "w3a3.qonnx.onnx").exists()
    assert err.startswith("qlight: error: features.0: weight quantizer 'pow2_unit' has no exact QONNX form")
    assert err.strip().endswith("export with --format onnx") and len(err.strip().splitlines()) == 1
