"""Export of the truly quantized model: bit-exact packing, frozen layers that compute what the QAT model
computes in eval mode, the qlight format and ``qlight export``'s checks of its input. The ONNX and QONNX
formats are tested in ``test_export_onnx.py``; nothing here needs the ``export`` extra.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from exportnets import exact_inputs, exact_task, random_task, run_export, save_checkpoint
from torch import Tensor, nn

import qlight.quant.functional as QF
from qlight.cli import console_main, main
from qlight.export import FORMAT, InputContract, export_task, load_exported
from qlight.models import build_model
from qlight.models.convnet import minw_quant
from qlight.quant import QuantAct, QuantConv2d, QuantSpec, quant_layers, quantize_model
from qlight.quant.packing import freeze_weights, pack_weight, packed_nbytes, unpack_weight
from qlight.tasks import ImageClassifier

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


@pytest.mark.usefixtures("one_thread")
def test_qlight_format_verify_is_exact_and_sees_a_changed_weight(
    cifar10_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = exact_task("resnet20_w1a4")
    ckpt = save_checkpoint(task, tmp_path / "last.ckpt", cifar10_folder)
    code, out, err = run_export(["--ckpt_path", str(ckpt), "--verify", "--samples", "6"], capsys)
    assert code == 0, out + err
    assert "wrote " + str(tmp_path / "last.quantized.pt") in out
    assert "top-1 agreement 100.00% (6/6)" in out and "max |Δlogit| 0, " in out and "PASS" in out
    x = exact_inputs(5, seed=3)
    exported = load_exported(tmp_path / "last.quantized.pt")
    assert torch.equal(_eval_outputs(exported, x), _eval_outputs(task.model, x))

    data = torch.load(tmp_path / "last.quantized.pt", weights_only=True)
    data["state_dict"]["bn1.running_mean"][0] += 0.25  # one statistic changed
    torch.save(data, tmp_path / "last.quantized.pt")
    code, out, err = run_export(["--ckpt_path", str(ckpt), "--verify-only", "--samples", "6"], capsys)
    assert code == 1 and "NOT found: bn1.running_mean" in out and "FAIL" in out
    assert err.startswith("qlight: error: --verify failed")


def test_missing_export_extra_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = save_checkpoint(exact_task("resnet20_w1a4"), tmp_path / "last.ckpt", None)
    monkeypatch.setitem(sys.modules, "onnx", None)  # import fails as if not installed
    for fmt in ("onnx", "qonnx"):
        code, _, err = run_export(["--ckpt_path", str(ckpt), "--format", fmt], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert f"--format {fmt} needs the optional 'export' dependencies (missing module 'onnx')" in err
        assert 'pip install -e ".[export]"' in err


def test_bad_checkpoints_and_options_fail_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cifar10_folder: Path
) -> None:
    truncated = tmp_path / "cut.ckpt"
    truncated.write_bytes(b"PK\x03\x04 not a whole zip")
    for args, message in [
        (["--ckpt_path", str(tmp_path / "missing.ckpt")], "ckpt_path="),
        (["--ckpt_path", str(truncated), "--format", "onnx"], "is not a readable PyTorch checkpoint"),
        (["--format", "onnx"], "--ckpt_path is required"),
    ]:
        code, _out, err = run_export(args, capsys)
        assert code == 2 and err.startswith("qlight: error: ") and message in err, err
        assert len(err.strip().splitlines()) == 1 and "weights_only=False" not in err
    ckpt = save_checkpoint(exact_task("resnet20_w1a4"), tmp_path / "last.ckpt", cifar10_folder)
    for args, message in [
        (["--format", "tflite"], "invalid choice: 'tflite'"),
        (["--samples", "0", "--verify"], "samples=0 is invalid"),
        (["--verify", "--data.root", str(tmp_path / "nowhere")], "data: CIFAR-10 root"),
        (["--verify", "--data.rooot", "x"], "--data.rooot"),
        (["--verify-only"], "--verify-only: output="),
        (["--verify-only", "--output", str(truncated)], "is not a runnable 'qlight' export"),
    ]:
        code, _out, err = run_export(["--ckpt_path", str(ckpt), *args], capsys)
        assert code == 2 and err.startswith("qlight: error: ") and message in err, err
        assert len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.quantized.pt"))


def test_float_checkpoint_needs_allow_float(
    cifar10_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = save_checkpoint(random_task("resnet20_float"), tmp_path / "float.ckpt", cifar10_folder)
    code, _, err = run_export(["--ckpt_path", str(ckpt)], capsys)
    assert code == 2 and not (tmp_path / "float.quantized.pt").exists()
    assert (
        err.startswith("qlight: error: ckpt_path=")
        and "is a float checkpoint" in err
        and "--allow-float" in err
    )
    assert len(err.strip().splitlines()) == 1
    code, out, err = run_export(
        ["--ckpt_path", str(ckpt), "--allow-float", "--verify", "--samples", "3"], capsys
    )
    assert code == 0, out + err
    assert "float network" in out and "PASS" in out and (tmp_path / "float.quantized.pt").is_file()


@pytest.mark.usefixtures("one_thread")
def test_verify_without_reachable_data_uses_random_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = save_checkpoint(random_task("resnet20_w1a4"), tmp_path / "last.ckpt", tmp_path / "moved-away")
    code, out, err = run_export(["--ckpt_path", str(ckpt), "--verify", "--samples", "3"], capsys)
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
