"""Export of the truly quantized model: bit-exact packing, frozen layers that compute what the QAT model
computes in eval mode, ``qlight export`` to the qlight, ONNX and QONNX formats, and ``--verify``.

Parity through onnxruntime and qonnx is tested on networks whose float32 arithmetic is exact
(``exactnet.py``): a correct export must then reproduce the PyTorch logits bit for bit, on any CPU.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import pytest
import torch
from exactnet import ExactCifar10DataModule, exact_inputs, make_exact
from torch import Tensor, nn

import qlight.quant.functional as QF
from qlight.cli import console_main, main
from qlight.export import FORMAT, InputContract, export_task, load_exported
from qlight.export import main as export_main
from qlight.export.deploy import deployable
from qlight.export.onnx_file import write_onnx
from qlight.export.onnx_ops import (
    HardtanhQuantOp,
    ReluQuantOp,
    UnsupportedQuantizerError,
    top_level_needs_comparison,
)
from qlight.export.qonnx_ops import BipolarQuantNode, QuantNode, hardtanh_quant_node, weight_quant_node
from qlight.models import build_model
from qlight.models.convnet import minw_quant
from qlight.quant import (
    QuantAct,
    QuantConv2d,
    QuantHardtanh,
    QuantSpec,
    TensorQuantizer,
    quant_layers,
    quantize_model,
)
from qlight.quant.export import freeze_weights, pack_weight, packed_nbytes, unpack_weight
from qlight.tasks import ImageClassifier

onnx = pytest.importorskip("onnx", reason="the export extra is not installed: pip install -e '.[export]'")
ort = pytest.importorskip("onnxruntime", reason="the export extra is not installed")
pytest.importorskip("qonnx", reason="the export extra is not installed")

CONF = Path(__file__).parent / "conf"

# (quantized tensor, per_channel, expected index width in bits, largest number of levels per group)
W = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(0))
CASES = {
    "binary": (QF.binary_weight(W), False, 1, 2),
    "binary_per_channel": (QF.binary_weight(W, per_channel=True), True, 1, 2),
    "ternary": (QF.ternary_weight(W), False, 2, 3),
    "uniform2": (QF.uniform_weight(W, 2), False, 2, 3),
    "uniform4_per_channel": (QF.uniform_weight(W, 4, per_channel=True), True, 4, 15),
    "uniform8": (QF.uniform_weight(W, 8), False, 8, 255),
    "pow2_3": (QF.pow2_weight(W, 3), False, 4, 7),
    "sign": (QF.sign_quant(W), False, 1, 2),
    "ternary_unit": (QF.ternary_quant(W), False, 2, 3),
}

# the networks of issue 14: name -> (architecture, quantization spec or None)
NETWORKS: dict[str, tuple[str, dict[str, Any] | None]] = {
    "resnet20_w1a4": ("resnet20", {"weight": "binary", "act": "relu_quant", "a_bits": 4}),
    "vgg11_w2a4": ("vgg11", {"weight": "ternary", "w_bits": 2, "act": "relu_quant", "a_bits": 4}),
    "convnet_d_w1a1": ("convnet_d", minw_quant(1, 1)),
    "convnet_d_w3a3": ("convnet_d", minw_quant(3, 3)),
    "resnet20_float": ("resnet20", None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pack_is_bit_exact_and_uses_the_quantizers_width(case: str) -> None:
    weight, per_channel, width, max_levels = CASES[case]
    packed = pack_weight(weight, per_channel)
    assert packed["bits"] == width
    assert packed["levels"].shape[0] == (weight.shape[0] if per_channel else 1)
    assert packed["levels"].shape[1] <= max_levels
    assert packed["codes"].dtype == torch.uint8 and packed["codes"].numel() == -(-weight.numel() * width // 8)
    restored = unpack_weight(packed)
    assert restored.dtype == weight.dtype and torch.equal(restored, weight)


def test_binary_weights_take_one_bit_each() -> None:
    weight = QF.binary_weight(torch.randn(64, 64, 3, 3))
    packed = pack_weight(weight)
    assert packed_nbytes(packed) == 64 * 64 * 9 // 8 + 2 * 4  # indices + two float32 levels
    assert torch.equal(packed["levels"], torch.stack([-weight.abs().max(), weight.abs().max()]).view(1, 2))


def test_pack_refuses_a_float_tensor() -> None:
    with pytest.raises(ValueError, match="at most 256 distinct values per group; this one has 1000"):
        pack_weight(torch.randn(1000))


def _eval_outputs(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _random_task(name: str, seed: int = 0) -> ImageClassifier:
    """A network of NETWORKS with non-trivial float BN statistics, BN affine and α (not exact arithmetic)."""
    torch.manual_seed(seed)
    arch, spec = NETWORKS[name]
    task = ImageClassifier(model=arch, quant=QuantSpec(**spec) if spec else None)
    model = task.model
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 32, 32))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
            if isinstance(m, QuantAct):
                m.alpha.mul_(torch.empty(()).uniform_(0.6, 1.6))
        for _, layer in quant_layers(model):
            layer.weight_quantizer.set_mix(0.5)  # a training-time blend, which eval must ignore
    return task.eval()


def _exact_task(name: str, seed: int = 0) -> ImageClassifier:
    arch, spec = NETWORKS[name]
    task = ImageClassifier(model=arch, quant=QuantSpec(**spec) if spec else None)
    make_exact(task.model, seed)
    return task.eval()


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    ("arch", "spec"),
    [
        ("resnet20", QuantSpec(weight="binary", act="relu_quant", a_bits=4)),
        ("resnet20", QuantSpec(weight="uniform", w_bits=4, per_channel=True, act="relu_quant", a_bits=2)),
        ("convnet_d", QuantSpec(**minw_quant(1, 1))),  # AQE: export uses h, whatever the training alpha
        ("convnet_d", QuantSpec(**minw_quant(3, 3))),
    ],
    ids=["resnet20_w1a4", "resnet20_w4pc_a2", "convnet_d_w1a1", "convnet_d_w3a3"],
)
def test_frozen_model_computes_the_quantized_evaluation(arch: str, spec: QuantSpec) -> None:
    torch.manual_seed(0)
    model = quantize_model(build_model(arch), spec)
    # training moves BN statistics and (for AQE) the blend away from their initial values
    model.train()(torch.randn(8, 3, 32, 32))
    for _, layer in quant_layers(model):
        layer.weight_quantizer.set_mix(0.5)
    x = torch.randn(4, 3, 32, 32)
    expected = _eval_outputs(model, x)
    quantized = {name: layer.quantized_weight() for name, layer in quant_layers(model)}

    frozen = freeze_weights(model)
    assert quant_layers(frozen) == []
    for name, weight in quantized.items():
        assert torch.equal(frozen.get_submodule(name).weight, weight)
    assert torch.equal(_eval_outputs(frozen, x), expected)
    if arch == "resnet20":  # the block's shared activation stays one module
        block = frozen.layer1[0]
        assert isinstance(block.act1, QuantAct) and block.act2 is block.act1


@pytest.mark.usefixtures("one_thread")
def test_export_round_trip_of_an_aqe_convnet(tmp_path: Path) -> None:
    task = ImageClassifier(model="convnet_d", quant=QuantSpec(**minw_quant(1, 1)))
    task.model.train()(torch.randn(8, 3, 32, 32))  # non-trivial BN statistics
    contract = InputContract((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 32, 32)
    torch.save(export_task(task, contract), tmp_path / "d.pt")
    model = load_exported(tmp_path / "d.pt")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and not any(isinstance(m, QuantConv2d) for m in model.modules())
    for conv in convs:  # MINW-Net 1-bit: unscaled +-1 weights
        assert set(torch.unique(conv.weight).tolist()) == {-1.0, 1.0}
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(_eval_outputs(model, x), _eval_outputs(task.model, x))
    # uint8 images are normalised with the recorded contract; floats are taken as already normalised
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(_eval_outputs(model, pixels), _eval_outputs(task.model, contract.normalize(pixels)))
    assert torch.allclose(contract.normalize(pixels), (pixels / 255 - 0.5) / 0.25, atol=1e-6)
    assert model.contract == contract


def test_load_refuses_other_files(tmp_path: Path) -> None:
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=f"not a qlight export .*{FORMAT}"):
        load_exported(tmp_path / "other.pt")


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
    from qlight.export.verify import qonnx_logits

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
        from qlight.export.qonnx_ops import ReluQuantNode

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
    from qlight.export.qonnx_ops import ReluQuantNode

    assert np.array_equal(_run_onnx(ReluQuantNode(act), x, "qonnx", tmp_path / "top.qonnx"), authors.numpy())
    if not torch.equal(QF.act_quant(x, alpha, bits, "ceil"), authors):
        pytest.xfail(
            "qlight.quant.functional.act_quant does not compare with (L-1)·α yet (lead's fix pending)"
        )
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


@pytest.mark.parametrize(
    "case",
    [
        "binary",
        "binary_per_channel",
        "ternary",
        "uniform2",
        "uniform4_per_channel",
        "uniform8",
        "sign",
        "ternary_unit",
    ],
)
def test_qonnx_weight_nodes_reproduce_the_quantized_weights(case: str) -> None:
    weight, per_channel, _, _ = CASES[case]
    quantizer = {
        "binary_per_channel": "binary",
        "uniform2": "uniform",
        "uniform4_per_channel": "uniform",
        "uniform8": "uniform",
    }.get(case, case)
    bits = {"uniform2": 2, "uniform4_per_channel": 4, "uniform8": 8}.get(case)
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
        weight_quant_node("conv", pow2, CASES["pow2_3"][0])
    binary = QuantConv2d(8, 16, 3, weight_quantizer=TensorQuantizer("binary"))
    with_zero = CASES["binary"][0].clone()
    with_zero[0, 0, 0, 0] = 0.0
    with pytest.raises(UnsupportedQuantizerError, match="1 of its binary weights are exactly 0"):
        weight_quant_node("conv", binary, with_zero)


# --------------------------------------------------------------------------- whole networks


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_deployable_network_computes_the_eval_exactly(name: str) -> None:
    """The module that is traced equals the checkpoint's eval in PyTorch, on ordinary float inputs."""
    task = _random_task(name)
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


def _save_checkpoint(task: ImageClassifier, path: Path, data_root: Path | None) -> Path:
    """A Lightning checkpoint as qlight fit writes it (no optimizer state), naming the exact DataModule."""
    checkpoint: dict[str, Any] = {
        "state_dict": task.state_dict(),
        "hyper_parameters": dict(task.hparams),
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 3,
        "global_step": 42,
    }
    if data_root is not None:
        checkpoint["datamodule_hyper_parameters"] = {
            "_class_path": f"{ExactCifar10DataModule.__module__}.{ExactCifar10DataModule.__qualname__}",
            "root": str(data_root),
            "batch_size": 8,
        }
    torch.save(checkpoint, path)
    return path


def _export(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``qlight export`` as the console script does; return (exit status, stdout, stderr)."""
    try:
        export_main(args)
        code = 0
    except SystemExit as stop:
        code = int(stop.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


EXPORTS = [
    ("resnet20_w1a4", "onnx"),
    ("resnet20_w1a4", "qonnx"),
    ("resnet20_w1a4", "qlight"),
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
    task = _exact_task(name)
    ckpt = _save_checkpoint(task, tmp_path / "last.ckpt", cifar10_folder)
    out = tmp_path / f"model.{fmt}"
    code, stdout, stderr = _export(
        ["--ckpt_path", str(ckpt), "--format", fmt, "--output", str(out), "--verify", "--samples", "6"],
        capsys,
    )
    assert code == 0, stdout + stderr
    assert "tensors: " in stdout and "NOT found" not in stdout
    assert "top-1 agreement 100.00% (6/6)" in stdout
    assert "max |Δlogit| 0 (" in stdout and "median over images 0 (" in stdout and "PASS" in stdout
    assert "6 validation images of ExactCifar10DataModule" in stdout
    assert "accuracy: PyTorch" in stdout
    # the same logits, computed here independently of the command's own comparison
    x = exact_inputs(5, seed=3)
    expected = _eval_outputs(task.model, x).numpy()
    if fmt == "qlight":
        assert np.array_equal(_eval_outputs(load_exported(out), x).numpy(), expected)
        return
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
        from qlight.export.verify import qonnx_logits

        assert np.array_equal(qonnx_logits(out, x.numpy()), expected)
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["input.mean"]) == pytest.approx(list(ExactCifar10DataModule.mean))
    assert props["input.size"] == "32x32" and props["input.channel_order"] == "RGB"
    assert json.loads(props["class_names"])[:2] == ["airplane", "automobile"]
    assert props["qlight.format"] == fmt and props["qlight.epoch"] == "3"


@pytest.mark.usefixtures("one_thread")
def test_float_checkpoint_needs_allow_float(
    cifar10_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = _random_task("resnet20_float")
    ckpt = _save_checkpoint(task, tmp_path / "float.ckpt", cifar10_folder)
    code, _, err = _export(["--ckpt_path", str(ckpt), "--format", "onnx"], capsys)
    assert code == 2 and not (tmp_path / "float.onnx").exists()
    assert (
        err.startswith("qlight: error: ckpt_path=")
        and "is a float checkpoint" in err
        and "--allow-float" in err
    )
    assert len(err.strip().splitlines()) == 1
    code, out, err = _export(
        ["--ckpt_path", str(ckpt), "--format", "onnx", "--allow-float", "--verify", "--samples", "4"], capsys
    )
    assert code == 0, out + err
    assert "float network" in out and "PASS" in out and (tmp_path / "float.onnx").is_file()


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("fmt", ["onnx", "qonnx"])
def test_verify_fails_on_a_tampered_file(
    fmt: str, cifar10_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = _exact_task("resnet20_w1a4")
    ckpt = _save_checkpoint(task, tmp_path / "last.ckpt", cifar10_folder)
    out = tmp_path / f"model.{fmt}"
    assert _export(["--ckpt_path", str(ckpt), "--format", fmt, "--output", str(out)], capsys)[0] == 0
    model = onnx.load(str(out))
    (weight,) = [t for t in model.graph.initializer if t.name == "layer1.0.conv1.weight"]
    values = onnx.numpy_helper.to_array(weight).copy()
    # onnx: one weight changes sign; qonnx: one weight moves to 0.9 x its value, which BipolarQuant maps back
    # onto the same level, so the logits stay equal and only the tensor check can see it
    values.flat[7] = -values.flat[7] if fmt == "onnx" else 0.9 * values.flat[7]
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    onnx.save(model, str(out))

    code, stdout, stderr = _export(
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
    task = _random_task("convnet_d_w3a3")
    ckpt = _save_checkpoint(task, tmp_path / "w3a3.ckpt", None)
    code, _out, err = _export(["--ckpt_path", str(ckpt), "--format", "qonnx"], capsys)
    assert code == 2 and not (tmp_path / "w3a3.qonnx.onnx").exists()
    assert err.startswith("qlight: error: features.0: weight quantizer 'pow2_unit' has no exact QONNX form")
    assert err.strip().endswith("export with --format onnx") and len(err.strip().splitlines()) == 1


def test_missing_export_extra_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = _save_checkpoint(_exact_task("resnet20_w1a4"), tmp_path / "last.ckpt", None)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    code, _, err = _export(["--ckpt_path", str(ckpt), "--format", "onnx"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--format onnx needs the optional 'export' dependencies (missing module 'onnxruntime')" in err
    assert 'pip install -e ".[export]"' in err


def test_bad_checkpoints_and_options_fail_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cifar10_folder: Path
) -> None:
    truncated = tmp_path / "cut.ckpt"
    truncated.write_bytes(b"PK\x03\x04 not a whole zip")
    for args, message in [
        (["--ckpt_path", str(tmp_path / "missing.ckpt")], "ckpt_path="),
        (["--ckpt_path", str(truncated), "--format", "onnx"], "is not a readable PyTorch checkpoint"),
        (["--format", "onnx"], "--ckpt_path"),
    ]:
        code, _out, err = _export(args, capsys)
        assert code == 2 and err.startswith("qlight: error: ") and message in err, err
        assert len(err.strip().splitlines()) == 1 and "weights_only=False" not in err
    ckpt = _save_checkpoint(_exact_task("resnet20_w1a4"), tmp_path / "last.ckpt", cifar10_folder)
    for args, message in [
        (["--format", "tflite"], "invalid choice: 'tflite'"),
        (["--format", "onnx", "--verify", "--data.root", str(tmp_path / "nowhere")], "data: CIFAR-10 root"),
        (["--format", "onnx", "--verify-only"], "--verify-only: output="),
        (["--format", "onnx", "--verify-only", "--output", str(truncated)], "is not a runnable 'onnx' export"),
    ]:
        code, _out, err = _export(["--ckpt_path", str(ckpt), *args], capsys)
        assert code == 2 and err.startswith("qlight: error: ") and message in err, err
        assert len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.onnx"))


@pytest.mark.usefixtures("one_thread")
def test_verify_without_reachable_data_uses_random_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = _random_task("resnet20_float")
    ckpt = _save_checkpoint(task, tmp_path / "last.ckpt", tmp_path / "moved-away")
    code, out, err = _export(
        ["--ckpt_path", str(ckpt), "--format", "onnx", "--allow-float", "--verify", "--samples", "3"], capsys
    )
    assert code == 0, out + err
    assert "the run's data are not reachable here" in out and "3 random images" in out and "PASS" in out
    assert "accuracy:" not in out  # random images have no labels


@pytest.mark.usefixtures("one_thread")
def test_qlight_export_command(
    cifar10_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(CONF / "cifar10_ste_w1a4_tiny.yaml"), "--data.root", str(cifar10_folder)])
    (ckpt,) = tmp_path.glob("logs/*/*/version_0/checkpoints/last.ckpt")

    monkeypatch.setattr(sys, "argv", ["qlight", "export", "--ckpt_path", str(ckpt), "--output", "w1a4.pt"])
    console_main()
    out = capsys.readouterr().out
    assert "in 19 layers" in out and "1.00 bits/weight" in out and "packed" in out
    exported = load_exported(tmp_path / "w1a4.pt")
    task = ImageClassifier.load_from_checkpoint(ckpt, map_location="cpu")
    x = torch.randn(8, 3, 32, 32)
    assert torch.equal(_eval_outputs(exported, x), _eval_outputs(task, x))
    # the recorded input contract is the DataModule's: uint8 images give what validation gives
    from qlight.data import CIFAR10DataModule

    assert exported.contract.mean == CIFAR10DataModule.mean and exported.contract.class_names[0] == "airplane"
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    datamodule = CIFAR10DataModule(root=str(cifar10_folder))
    normalised, _ = datamodule.on_after_batch_transfer((pixels, torch.zeros(4)), 0)
    assert torch.equal(exported.contract.normalize(pixels), normalised)
    assert torch.equal(_eval_outputs(exported, pixels), _eval_outputs(task, normalised))

    monkeypatch.setattr(sys, "argv", ["qlight", "export", "--ckpt_path", str(tmp_path / "missing.ckpt")])
    with pytest.raises(SystemExit) as exit_info:
        console_main()
    assert exit_info.value.code == 2
    assert "missing.ckpt" in capsys.readouterr().err
