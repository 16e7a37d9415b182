"""Export of the truly quantized model: bit-exact packing, frozen layers that compute what the
QAT model computes in eval mode, and ``qlight export`` from a trained checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import qlight.quant.functional as QF
from qlight.cli import console_main, main
from qlight.export import FORMAT, export_task, load_exported
from qlight.models import build_model
from qlight.models.convnet import minw_quant
from qlight.quant import QuantAct, QuantConv2d, QuantSpec, quant_layers, quantize_model
from qlight.quant.export import freeze_weights, pack_weight, packed_nbytes, unpack_weight
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
    torch.save(export_task(task), tmp_path / "d.pt")
    model = load_exported(tmp_path / "d.pt")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and not any(isinstance(m, QuantConv2d) for m in model.modules())
    for conv in convs:  # MINW-Net 1-bit: unscaled +-1 weights
        assert set(torch.unique(conv.weight).tolist()) == {-1.0, 1.0}
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(_eval_outputs(model, x), _eval_outputs(task.model, x))


def test_load_refuses_other_files(tmp_path: Path) -> None:
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=f"not a qlight export .*expected '{FORMAT}'"):
        load_exported(tmp_path / "other.pt")


@pytest.mark.usefixtures("one_thread")
def test_qlight_export_command(
    cifar10_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(CONF / "cifar10_ste_w1a4_tiny.yaml"), "--data.root", str(cifar10_folder)])
    (ckpt,) = tmp_path.glob("logs/*/*/version_0/checkpoints/last.ckpt")

    monkeypatch.setattr(sys, "argv", ["qlight", "export", "--ckpt_path", str(ckpt), "--output", "w1a4.pt"])
    console_main()
    assert "19 quantized layers" in capsys.readouterr().out
    exported = load_exported(tmp_path / "w1a4.pt")
    task = ImageClassifier.load_from_checkpoint(ckpt, map_location="cpu")
    x = torch.randn(8, 3, 32, 32)
    assert torch.equal(_eval_outputs(exported, x), _eval_outputs(task, x))

    monkeypatch.setattr(sys, "argv", ["qlight", "export", "--ckpt_path", str(tmp_path / "missing.ckpt")])
    with pytest.raises(SystemExit) as exit_info:
        console_main()
    assert exit_info.value.code == 2
    assert "missing.ckpt" in capsys.readouterr().err
